"""The shared Deformable-DETR transformer: encoder, a decoder with pluggable cross-attention, and
the query sources (learned queries, or two-stage proposals from the encoder).

Every mode uses these same classes. The decoder runs a *group* of queries (`QueryGroup`): the
one-to-one queries and every training branch's queries (with self-attention skipped, or several
groups kept apart by a self-attention mask) are groups, so a branch is a call to this one decoder
rather than a copy of it. The cross-attention of each decoder layer is built by the decoder mode
(`modes.py`); this module knows only its call signature.
"""
import copy
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import MSDeformAttn
from .position_encoding import box_sine_embedding
from .token_layout import EncoderMemory, LevelLayout


def inverse_sigmoid(x, eps=1e-5):
    """log(x / (1 - x)) with both clamped to `eps` (Deformable DETR's util/misc.py: eps 1e-5; DINO's
    util/misc.py:575-579: eps 1e-3, the same formula)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


@dataclass
class QueryGroup:
    """Queries that go through the decoder together.

    `position` is the queries' fixed positional query, added to the content in every layer. A
    decoder that recomputes the position from each layer's reference box (DINO's `ref_point_head`,
    `DeformableDecoder(query_position_from_reference=True)`) ignores it: groups for such a decoder
    carry zeros there (`TwoStageQueries.embed_boxes` gives zeros then)."""

    content: torch.Tensor  # (N, Q, C)
    position: torch.Tensor  # (N, Q, C); unused by a decoder with query_position_from_reference
    reference: torch.Tensor  # (N, Q, 2) points or (N, Q, 4) cxcywh boxes, normalised to [0, 1]
    # (Q, Q) bool, True where query i may NOT attend to query j (keeps groups apart).
    self_attn_mask: Optional[torch.Tensor] = None
    # (N, Q) bool, True on padding queries (groups padded to a common length per image).
    padding_mask: Optional[torch.Tensor] = None


@dataclass
class DecoderOutput:
    """Per-layer predictions of one query group (layer dim first)."""

    logits: torch.Tensor  # (num_layers, N, Q, num_classes)
    boxes: torch.Tensor  # (num_layers, N, Q, 4) cxcywh in [0, 1]
    hidden: torch.Tensor  # (num_layers, N, Q, C)
    # Each layer's content after its self-attention block (empty when self-attention was skipped).
    self_attn_outputs: Tuple[torch.Tensor, ...] = ()
    # (N, Q) True on padding queries, which the losses leave out (None: no padding).
    padding_mask: Optional[torch.Tensor] = None

    def layer(self, i):
        return self.logits[i], self.boxes[i]

    @property
    def num_layers(self):
        return self.logits.shape[0]


class FeedForward(nn.Module):
    def __init__(self, d_model, d_ffn, dropout):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x):
        return self.norm(x + self.dropout2(self.linear2(self.dropout1(F.relu(self.linear1(x))))))


class DeformableEncoderLayer(nn.Module):
    def __init__(self, d_model, d_ffn, dropout, n_levels, n_heads, n_points):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ffn, dropout)

    def forward(self, src, pos, reference_points, layout: LevelLayout, padding_mask):
        attended = self.self_attn(
            src + pos, reference_points, src, layout.spatial_shapes, layout.level_start_index, padding_mask
        )
        return self.ffn(self.norm(src + self.dropout(attended)))


class DeformableEncoder(nn.Module):
    def __init__(self, layer: DeformableEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    @staticmethod
    def reference_points(layout: LevelLayout, valid_ratios):
        """Centre of every token, seen from every level's padded frame: (N, S, L, 2)."""
        return layout.token_centers(valid_ratios)[:, :, None] * valid_ratios[:, None]

    def forward(self, src, pos, layout: LevelLayout, valid_ratios, padding_mask):
        reference_points = self.reference_points(layout, valid_ratios).to(src.dtype)
        for layer in self.layers:
            src = layer(src, pos, reference_points, layout, padding_mask)
        return src


class DecoderLayer(nn.Module):
    """Self-attention (skippable) -> cross-attention (pluggable) -> FFN, each with add & norm."""

    def __init__(self, d_model, d_ffn, dropout, n_heads, cross_attn: nn.Module):
        super().__init__()
        self.n_heads = n_heads
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout_self = nn.Dropout(dropout)
        self.norm_self = nn.LayerNorm(d_model)
        self.cross_attn = cross_attn
        self.dropout_cross = nn.Dropout(dropout)
        self.norm_cross = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ffn, dropout)

    def self_attention(self, content, position, attn_mask):
        q = k = content + position
        attended = self.self_attn(q, k, content, attn_mask=attn_mask, need_weights=False)[0]
        return self.norm_self(content + self.dropout_self(attended))

    def cross_and_ffn(self, content, position, reference_points, memory, query_reference):
        attended = self.cross_attn(content + position, reference_points, memory, query_reference)
        return self.ffn(self.norm_cross(content + self.dropout_cross(attended)))


class MLP(nn.Module):
    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class PredictionHeads(nn.Module):
    """Class and box heads for each decoder layer (shared unless boxes are refined per layer),
    plus one more pair for the encoder proposals in two-stage mode.

    `share_decoder_heads` (DINO): one class head and one box head for every decoder layer even
    when boxes are refined, and the encoder's pair (two-stage) a separate copy: models/dino/dino.py:141-152
    (`dec_pred_bbox_embed_share = dec_pred_class_embed_share = True`, config/DINO/DINO_4scale.py:94-95)
    and :158-169 (`two_stage_bbox_embed_share = two_stage_class_embed_share = False`, DINO_4scale.py:66-67:
    `copy.deepcopy` of the same freshly initialised heads). DINO's init (dino.py:132-139) is this
    class's: class bias at the 0.01 prior, the box MLP's last layer zero (weight and bias), and DINO
    is always two-stage (w/h bias 0).

    `inverse_sigmoid_eps`: the clamp of the reference's log-odds in `boxes_around` (1e-5 Deformable
    DETR; DINO 1e-3, its util/misc.py:575).
    """

    def __init__(
        self,
        d_model,
        num_classes,
        num_decoder_layers,
        per_layer,
        two_stage,
        share_decoder_heads: bool = False,
        inverse_sigmoid_eps: float = 1e-5,
    ):
        super().__init__()
        self.inverse_sigmoid_eps = inverse_sigmoid_eps
        class_head = nn.Linear(d_model, num_classes)
        prior_prob = 0.01  # focal-loss prior: start every class near p = 0.01
        nn.init.constant_(class_head.bias, -math.log((1 - prior_prob) / prior_prob))
        box_head = MLP(d_model, d_model, 4, 3)
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        num_heads = num_decoder_layers + (1 if two_stage else 0)
        if share_decoder_heads:
            encoder_heads = [(copy.deepcopy(class_head), copy.deepcopy(box_head))] if two_stage else []
            self.class_heads = nn.ModuleList([class_head] * num_decoder_layers + [c for c, _ in encoder_heads])
            self.box_heads = nn.ModuleList([box_head] * num_decoder_layers + [b for _, b in encoder_heads])
        elif per_layer:
            self.class_heads = nn.ModuleList(copy.deepcopy(class_head) for _ in range(num_heads))
            self.box_heads = nn.ModuleList(copy.deepcopy(box_head) for _ in range(num_heads))
        else:
            self.class_heads = nn.ModuleList(class_head for _ in range(num_heads))
            self.box_heads = nn.ModuleList(box_head for _ in range(num_heads))
        # Without two-stage, the first layer's boxes start small around their reference points
        # (log-odds -2 for w and h; head 0, which is the shared head without refinement). With
        # two-stage every head starts at w/h bias 0 (the official code resets them all): boxes
        # then start as their proposals' size.
        nn.init.constant_(self.box_heads[0].layers[-1].bias[2:], -2.0)
        if two_stage:
            for head in self.box_heads:
                nn.init.constant_(head.layers[-1].bias[2:], 0.0)

    def boxes_around(self, delta, reference):
        """Boxes (..., 4) in [0, 1]: `delta` (log-odds) added to `reference` ((..., 2) points or
        (..., 4) boxes, in [0, 1]); a point reference leaves w and h to the delta alone."""
        reference = inverse_sigmoid(reference, self.inverse_sigmoid_eps)
        if reference.shape[-1] == 4:
            boxes = delta + reference
        else:
            boxes = torch.cat((delta[..., :2] + reference, delta[..., 2:]), dim=-1)
        return boxes.sigmoid()

    def predict(self, index, hidden, reference):
        """Logits and boxes of head `index` around `reference` ((..., 2) points or (..., 4) boxes)."""
        return self.class_heads[index](hidden), self.boxes_around(self.box_heads[index](hidden), reference)


class DeformableDecoder(nn.Module):
    """Runs a `QueryGroup` through the decoder layers and the prediction heads.

    With box refinement, each layer's predicted 4-d boxes become the next layer's reference boxes
    (detached, as in Deformable DETR: from layer 1 on the reference is a box even when the group
    starts from 2-d points); otherwise every layer uses the group's references.

    `look_forward_twice` (DINO, Zhang et al. ICLR 2023; needs refinement): layer i's box for the
    loss is layer i's delta added to layer i-1's box *before* its detach, so layer i's loss also
    trains layer i-1; the reference layer i samples around (and the values) are unchanged.

    Two options of DINO's decoder (IDEA-Research/DINO models/dino/deformable_transformer.py
    `TransformerDecoder`), both off by default:
    - `query_position_from_reference`: each layer's positional query is recomputed from that layer's
      reference box, `ref_point_head(sine(reference scaled to level 0))` (:609 `ref_point_head =
      MLP(2 * d_model, d_model, d_model, 2)`; :681-696: the sine embedding of
      `reference_points_input[:, :, 0, :]`, i.e. the 4-d box times level 0's valid ratios, in
      `gen_sineembed_for_position`'s order y, x, w, h, models/dino/utils.py:138-164; no query scale,
      `rm_dec_query_scale=True` :615-616). The group's `position` is then not used. Needs 4-d
      reference boxes (DINO's `query_dim = 4`).
    - `final_norm`: one LayerNorm (`decoder.norm`, :135-136) applied to every layer's output
      before the prediction heads (:755 `intermediate.append(self.norm(output))`, the `hs` the heads
      of models/dino/dino.py:277-285 read); the next layer still gets the un-normed output, and with
      refinement the next reference comes from the box head on the *un-normed* output
      (deformable_transformer.py:731-749 `self.bbox_embed[layer_id](output)`), while the predicted
      boxes (dino.py:277-281) are the box head on the normed output around this layer's reference
      (the previous layer's refined box before its detach with look-forward-twice, :750-753 with
      `use_detached_boxes_dec_out = False`). `hidden` in the output is the normed output.
    """

    def __init__(
        self,
        layers: List[DecoderLayer],
        heads: PredictionHeads,
        refine_boxes: bool,
        look_forward_twice: bool = False,
        query_position_from_reference: bool = False,
        final_norm: bool = False,
    ):
        super().__init__()
        if look_forward_twice and not refine_boxes:
            raise ValueError("MODEL.HYBRID_DETR.LOOK_FORWARD_TWICE needs WITH_BOX_REFINE: True")
        self.layers = nn.ModuleList(layers)
        self.heads = heads
        self.refine_boxes = refine_boxes
        self.look_forward_twice = look_forward_twice
        d_model = heads.class_heads[0].in_features
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2) if query_position_from_reference else None
        self.norm = nn.LayerNorm(d_model) if final_norm else None

    def transformer_parameters(self):
        """Parameters the official transformer's xavier pass covers: the layers, and DINO's
        `ref_point_head` (inside its `TransformerDecoder`, reset with the rest; the norm is 1-d)."""
        extra = list(self.ref_point_head.parameters()) if self.ref_point_head is not None else []
        return list(self.layers.parameters()) + extra

    def query_position(self, reference_points):
        """DINO's positional query (N, Q, C) from the references in each level's padded frame
        (N, Q, L, 4): the MLP of the sine embedding of the level-0 one."""
        if reference_points.shape[-1] != 4:
            raise ValueError(
                "MODEL.HYBRID_DETR.QUERY_POSITION_FROM_REFERENCE needs 4-d reference boxes (TWO_STAGE: True), "
                f"got {reference_points.shape[-1]}-d references"
            )
        d_model = self.ref_point_head.layers[-1].out_features
        sine = box_sine_embedding(reference_points[:, :, 0], d_model // 2, y_first=True)
        return self.ref_point_head(sine.to(reference_points.dtype))

    def forward(self, group: QueryGroup, memory: EncoderMemory, skip_self_attn=False) -> DecoderOutput:
        attn_mask = self._self_attn_mask(group)
        content, reference = group.content, group.reference
        position = group.position
        previous_boxes = None  # the previous layer's boxes before their detach (look-forward-twice)
        all_logits, all_boxes, all_hidden, self_attn_outputs = [], [], [], []
        for i, layer in enumerate(self.layers):
            reference_points = self._scale_to_levels(reference, memory.valid_ratios)
            if self.ref_point_head is not None:
                position = self.query_position(reference_points)
            if not skip_self_attn:
                content = layer.self_attention(content, position, attn_mask)
                self_attn_outputs.append(content)
            content = layer.cross_and_ffn(content, position, reference_points, memory, reference)
            hidden = content if self.norm is None else self.norm(content)
            logits = self.heads.class_heads[i](hidden)
            delta = self.heads.box_heads[i](hidden)
            boxes = self.heads.boxes_around(delta, reference)
            if self.refine_boxes:
                # DINO's final norm: the next reference from the box head on the un-normed output.
                refined = boxes if self.norm is None else self.heads.boxes_around(self.heads.box_heads[i](content), reference)
                if self.look_forward_twice and previous_boxes is not None:
                    boxes = self.heads.boxes_around(delta, previous_boxes)
                previous_boxes = refined
                reference = refined.detach()
            all_logits.append(logits)
            all_boxes.append(boxes)
            all_hidden.append(hidden)
        return DecoderOutput(
            torch.stack(all_logits), torch.stack(all_boxes), torch.stack(all_hidden), tuple(self_attn_outputs)
        )

    @staticmethod
    def _scale_to_levels(reference, valid_ratios):
        """References are normalised to the valid image; attention samples the padded maps."""
        if reference.shape[-1] == 4:
            return reference[:, :, None] * torch.cat((valid_ratios, valid_ratios), -1)[:, None]
        return reference[:, :, None] * valid_ratios[:, None]

    def _self_attn_mask(self, group: QueryGroup):
        """One (N * heads, Q, Q) boolean mask from the group mask and the padding queries.

        A query always may attend to itself, so a padding query or a query alone in its
        group never sees an all-masked row (which would give NaN)."""
        if group.self_attn_mask is None and group.padding_mask is None:
            return None
        n, q = group.content.shape[:2]
        blocked = torch.zeros(n, q, q, dtype=torch.bool, device=group.content.device)
        if group.self_attn_mask is not None:
            blocked |= group.self_attn_mask[None]
        if group.padding_mask is not None:
            blocked |= group.padding_mask[:, None, :]
        blocked &= ~torch.eye(q, dtype=torch.bool, device=blocked.device)
        heads = self.layers[0].n_heads
        return blocked.repeat_interleave(heads, dim=0)


class LearnedQueries(nn.Module):
    """Deformable DETR's learned queries: an embedding split into position and content, and a
    reference point predicted from the position."""

    def __init__(self, num_queries, d_model):
        super().__init__()
        self.embedding = nn.Embedding(num_queries, 2 * d_model)
        self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    def reset_parameters(self):
        """The reference-point init of the official transformer; the embedding keeps its normal_
        init (it lives outside the official transformer)."""
        nn.init.xavier_uniform_(self.reference_points.weight, gain=1)
        nn.init.zeros_(self.reference_points.bias)

    def transformer_parameters(self):
        """Parameters the official code counts as the transformer's (xavier-initialised)."""
        return list(self.reference_points.parameters())

    def embed_boxes(self, boxes: torch.Tensor, dtype=None):
        raise ValueError(
            "queries around given boxes (e.g. DECODER_MODE 'dn') need MODEL.HYBRID_DETR.TWO_STAGE: True: learned "
            "queries have no embedding of a box"
        )

    def forward(self, memory: EncoderMemory):
        n = memory.memory.shape[0]
        position, content = self.embedding.weight.to(memory.memory.dtype).chunk(2, dim=1)
        position = position[None].expand(n, -1, -1)
        content = content[None].expand(n, -1, -1)
        return QueryGroup(content, position, self.reference_points(position).sigmoid()), None


class TwoStageQueries(nn.Module):
    """Two-stage Deformable DETR: every encoder token proposes a box around its location; the
    top-k proposals become the queries' reference boxes and positions.

    As in the official code the encoder head is class-agnostic: proposals are ranked by logit 0
    alone (the meta-architecture trains that head with every target labelled 0). Invalid tokens
    (padding, or a proposal outside (0.01, 0.99)) get a zeroed feature in both. `mask_invalid`
    (our default, TWO_STAGE_MASK_INVALID) then masks them out of the top-k and of the encoder loss;
    without it they behave as in the official code: their box is (1, 1, 1, 1) (the official
    infinite log-odds), they are ranked with the rest and trained as background (what a converted
    official checkpoint needs to give the official outputs).

    `mixed_selection` (DINO's mixed query selection, as in H-DETR, DAC-DETR and Co-DETR's "++"
    head): the positions still come from the selected proposals, the content queries are learned
    embeddings instead of the proposals' embedding halves.

    DINO's two-stage (IDEA-Research/DINO models/dino/deformable_transformer.py:318-360, "standard"),
    three options, all off by default:
    - `ranking="max_class"`: proposals ranked by their best class logit (:342
      `topk(enc_outputs_class_unselected.max(-1)[0], topk)`) instead of logit 0, for an encoder head
      trained class-aware. The top-k still come from every token and keep the selected box and
      the projected memory (`enc_output` + `enc_output_norm` :180-181, :324: `memory_proj` /
      `memory_norm` here, zeroed invalid tokens and box (1, 1, 1, 1) as `mask_invalid=False`).
    - `position_from_decoder`: no proposal projection (`pos_trans`); the decoder computes each query's
      position from its reference box (DINO's `ref_point_head`, `DeformableDecoder(
      query_position_from_reference=True)`), so the group's `position` (and `embed_boxes`'s) are zeros,
      unused. The content queries are the learned `content` embedding with `mixed_selection`
      (DINO's `embed_init_tgt = True`, DINO_4scale.py:102, `tgt_embed` :166-168, :351-352), else the
      selected tokens' projected memory, detached (:350, :354). The content embedding then belongs
      to the transformer's xavier pass (DINO builds `tgt_embed` inside its transformer, reset at
      :210/:225-228; H-DETR's `query_embed`, outside it, keeps normal_).
    - `selected_encoder_outputs`: the encoder predictions returned (for the encoder loss) are those
      of the k selected proposals only, with gradients (DINO's "interm" outputs: :350 `tgt_undetach`,
      :345 `refpoint_embed_undetach`, :416-417; class head on them at models/dino/dino.py:296-300),
      instead of every token's.
    """

    def __init__(
        self,
        num_queries,
        d_model,
        heads: PredictionHeads,
        mixed_selection: bool = False,
        mask_invalid: bool = True,
        ranking: str = "objectness",
        position_from_decoder: bool = False,
        selected_encoder_outputs: bool = False,
    ):
        super().__init__()
        if ranking not in ("objectness", "max_class"):
            raise ValueError(f"MODEL.HYBRID_DETR.TWO_STAGE_RANKING must be 'objectness' or 'max_class', got {ranking!r}")
        self.mask_invalid = mask_invalid
        self.num_queries = num_queries
        self.heads = heads
        self.encoder_head_index = len(heads.class_heads) - 1
        self.ranking = ranking
        self.position_from_decoder = position_from_decoder
        self.selected_encoder_outputs = selected_encoder_outputs
        self.memory_proj = nn.Linear(d_model, d_model)
        self.memory_norm = nn.LayerNorm(d_model)
        if position_from_decoder:
            self.position_proj = self.position_norm = None
        else:
            self.position_proj = nn.Linear(2 * d_model, 2 * d_model)
            self.position_norm = nn.LayerNorm(2 * d_model)
        self.d_model = d_model
        self.mixed_selection = mixed_selection
        # Learned content queries of mixed selection (normal_ init; outside the transformer's reset
        # unless `position_from_decoder`, see the class docstring).
        self.content = nn.Embedding(num_queries, d_model) if mixed_selection else None

    def reset_parameters(self):
        pass  # the xavier pass over `transformer_parameters()` is the whole official init

    def transformer_parameters(self):
        """Parameters the official code counts as the transformer's (xavier-initialised); the
        prediction heads are not, nor is the content embedding except in DINO's layout."""
        modules = [self.memory_proj, self.memory_norm]
        if self.position_from_decoder:
            if self.content is not None:
                modules.append(self.content)
        else:
            modules += [self.position_proj, self.position_norm]
        return [p for m in modules for p in m.parameters()]

    def embed_boxes(self, boxes: torch.Tensor, dtype=None):
        """(position, content) queries (N, Q, C) of boxes (N, Q, 4) cxcywh in [0, 1]: their sine
        embedding through the proposal projection (what the selected proposals get; other queries
        around boxes, e.g. denoising ones, take their position from here too). With
        `position_from_decoder` the decoder computes positions from the boxes itself: zeros
        (unused; `QueryGroup.position`)."""
        if self.position_from_decoder:
            zeros = boxes.new_zeros((), dtype=dtype or boxes.dtype).expand(*boxes.shape[:-1], self.d_model)
            return zeros, zeros
        embedded = self.position_norm(self.position_proj(box_sine_embedding(boxes, self.d_model // 2)))
        return embedded.to(dtype or embedded.dtype).chunk(2, dim=-1)

    def proposal_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The score each token's proposal is ranked by (N, S): logit 0 (`objectness`, Deformable
        DETR's class-agnostic head) or the best class logit (`max_class`, DINO)."""
        return logits[..., 0] if self.ranking == "objectness" else logits.max(-1).values

    @staticmethod
    def token_proposals(memory: EncoderMemory):
        """A box per token: its centre, side 0.05 * 2^level; (N, S, 4) and a validity mask."""
        centers = memory.layout.token_centers(memory.valid_ratios)
        side = torch.cat([centers.new_full((s,), 0.05 * 2.0**level) for level, s in enumerate(memory.layout.sizes)])
        proposals = torch.cat((centers, side[None, :, None].expand(centers.shape[0], -1, 2)), -1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1) & ~memory.padding_mask
        return proposals, valid

    def forward(self, memory: EncoderMemory):
        proposals, valid = self.token_proposals(memory)
        tokens = memory.memory.masked_fill(~valid[..., None], 0.0)
        tokens = self.memory_norm(self.memory_proj(tokens))
        logits, boxes = self.heads.predict(self.encoder_head_index, tokens, proposals)
        if self.mask_invalid:
            # Ranked by logit 0 (the official `enc_outputs_class[..., 0]`) or DINO's best class.
            scores = self.proposal_scores(logits).masked_fill(~valid, float("-inf"))
            # Padding and border tokens take no part in the encoder loss: a very negative logit
            # makes them confident background (-inf would give NaN in the focal loss).
            encoder_predictions = (logits.masked_fill(~valid[..., None], -1e4), boxes)
        else:
            boxes = boxes.masked_fill(~valid[..., None], 1.0)
            scores = self.proposal_scores(logits)
            encoder_predictions = (logits, boxes)
        k = min(self.num_queries, scores.shape[1])
        topk = scores.topk(k, dim=1).indices
        selected_boxes = boxes.gather(1, topk[..., None].expand(-1, -1, 4))
        reference = selected_boxes.detach()
        position, content = self.embed_boxes(reference, memory.memory.dtype)
        if self.mixed_selection:
            content = self.content.weight[:k].to(position.dtype)[None].expand(position.shape[0], -1, -1)
        elif self.position_from_decoder:  # DINO without embed_init_tgt: the selected tokens, detached
            content = tokens.gather(1, topk[..., None].expand(-1, -1, tokens.shape[-1])).detach()
        if self.selected_encoder_outputs:
            selected_logits = encoder_predictions[0].gather(1, topk[..., None].expand(-1, -1, logits.shape[-1]))
            encoder_predictions = (selected_logits, selected_boxes)
        return QueryGroup(content, position, reference), encoder_predictions


def reset_transformer_parameters(encoder: nn.Module, decoder: "DeformableDecoder", query_source: nn.Module, level_embed):
    """The official `DeformableTransformer._reset_parameters`, over our modules.

    xavier_uniform_ on every >1-d parameter of the encoder, of the decoder layers (self-attention,
    cross-attention, FFNs; DINO's `ref_point_head` when present) and of the query source's
    transformer part (two-stage projections, learned-query reference-point linear; DINO's content
    queries); then MSDeformAttn's own reset, then each decoder cross-attention's own
    `reset_parameters()` where it defines one (SMCA's attention keeps its init), the reference-point
    init, and level_embed ~ N(0, 1). The prediction heads, the neck and the learned query
    embeddings (DINO's content queries aside) are not touched (the official code builds them outside the
    transformer, after its reset). Call it once, after the model is built.
    """
    parameters = list(encoder.parameters()) + list(decoder.transformer_parameters()) + list(query_source.transformer_parameters())
    with torch.no_grad():
        for p in parameters:
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
    for module in (encoder, decoder.layers):
        for m in module.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
    for layer in decoder.layers:
        if callable(getattr(layer.cross_attn, "reset_parameters", None)):
            layer.cross_attn.reset_parameters()
    query_source.reset_parameters()
    nn.init.normal_(level_embed)


def build_decoder_layers(num_layers, d_model, d_ffn, dropout, n_heads, cross_attn_factory: Callable[[], nn.Module]):
    return [DecoderLayer(d_model, d_ffn, dropout, n_heads, cross_attn_factory()) for _ in range(num_layers)]
