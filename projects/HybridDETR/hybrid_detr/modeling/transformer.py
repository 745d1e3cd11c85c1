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
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


@dataclass
class QueryGroup:
    """Queries that go through the decoder together."""

    content: torch.Tensor  # (N, Q, C)
    position: torch.Tensor  # (N, Q, C)
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
    plus one more pair for the encoder proposals in two-stage mode."""

    def __init__(self, d_model, num_classes, num_decoder_layers, per_layer, two_stage):
        super().__init__()
        class_head = nn.Linear(d_model, num_classes)
        prior_prob = 0.01  # focal-loss prior: start every class near p = 0.01
        nn.init.constant_(class_head.bias, -math.log((1 - prior_prob) / prior_prob))
        box_head = MLP(d_model, d_model, 4, 3)
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        num_heads = num_decoder_layers + (1 if two_stage else 0)
        if per_layer:
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

    @staticmethod
    def boxes_around(delta, reference):
        """Boxes (..., 4) in [0, 1]: `delta` (log-odds) added to `reference` ((..., 2) points or
        (..., 4) boxes, in [0, 1]); a point reference leaves w and h to the delta alone."""
        reference = inverse_sigmoid(reference)
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
    """

    def __init__(
        self, layers: List[DecoderLayer], heads: PredictionHeads, refine_boxes: bool, look_forward_twice: bool = False
    ):
        super().__init__()
        if look_forward_twice and not refine_boxes:
            raise ValueError("MODEL.HYBRID_DETR.LOOK_FORWARD_TWICE needs WITH_BOX_REFINE: True")
        self.layers = nn.ModuleList(layers)
        self.heads = heads
        self.refine_boxes = refine_boxes
        self.look_forward_twice = look_forward_twice

    def forward(self, group: QueryGroup, memory: EncoderMemory, skip_self_attn=False) -> DecoderOutput:
        attn_mask = self._self_attn_mask(group)
        content, reference = group.content, group.reference
        previous_boxes = None  # the previous layer's boxes before their detach (look-forward-twice)
        all_logits, all_boxes, all_hidden, self_attn_outputs = [], [], [], []
        for i, layer in enumerate(self.layers):
            reference_points = self._scale_to_levels(reference, memory.valid_ratios)
            if not skip_self_attn:
                content = layer.self_attention(content, group.position, attn_mask)
                self_attn_outputs.append(content)
            content = layer.cross_and_ffn(content, group.position, reference_points, memory, reference)
            logits = self.heads.class_heads[i](content)
            delta = self.heads.box_heads[i](content)
            boxes = self.heads.boxes_around(delta, reference)
            if self.refine_boxes:
                refined = boxes
                if self.look_forward_twice and previous_boxes is not None:
                    boxes = self.heads.boxes_around(delta, previous_boxes)
                previous_boxes = refined
                reference = refined.detach()
            all_logits.append(logits)
            all_boxes.append(boxes)
            all_hidden.append(content)
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
    """

    def __init__(
        self, num_queries, d_model, heads: PredictionHeads, mixed_selection: bool = False, mask_invalid: bool = True
    ):
        super().__init__()
        self.mask_invalid = mask_invalid
        self.num_queries = num_queries
        self.heads = heads
        self.encoder_head_index = len(heads.class_heads) - 1
        self.memory_proj = nn.Linear(d_model, d_model)
        self.memory_norm = nn.LayerNorm(d_model)
        self.position_proj = nn.Linear(2 * d_model, 2 * d_model)
        self.position_norm = nn.LayerNorm(2 * d_model)
        self.d_model = d_model
        self.mixed_selection = mixed_selection
        # Learned content queries of mixed selection (normal_ init, outside the transformer's reset).
        self.content = nn.Embedding(num_queries, d_model) if mixed_selection else None

    def reset_parameters(self):
        pass  # the xavier pass over `transformer_parameters()` is the whole official init

    def transformer_parameters(self):
        """Parameters the official code counts as the transformer's (xavier-initialised); the
        prediction heads and the content embedding are not."""
        return [p for m in (self.memory_proj, self.memory_norm, self.position_proj, self.position_norm) for p in m.parameters()]

    def embed_boxes(self, boxes: torch.Tensor, dtype=None):
        """(position, content) queries (N, Q, C) of boxes (N, Q, 4) cxcywh in [0, 1]: their sine
        embedding through the proposal projection (what the selected proposals get; other queries
        around boxes, e.g. denoising ones, take their position from here too)."""
        embedded = self.position_norm(self.position_proj(box_sine_embedding(boxes, self.d_model // 2)))
        return embedded.to(dtype or embedded.dtype).chunk(2, dim=-1)

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
            # Class-agnostic ranking by logit 0 (the official `enc_outputs_class[..., 0]`).
            scores = logits[..., 0].masked_fill(~valid, float("-inf"))
            # Padding and border tokens take no part in the encoder loss: a very negative logit
            # makes them confident background (-inf would give NaN in the focal loss).
            encoder_predictions = (logits.masked_fill(~valid[..., None], -1e4), boxes)
        else:
            boxes = boxes.masked_fill(~valid[..., None], 1.0)
            scores = logits[..., 0]
            encoder_predictions = (logits, boxes)
        k = min(self.num_queries, scores.shape[1])
        topk = scores.topk(k, dim=1).indices
        reference = boxes.gather(1, topk[..., None].expand(-1, -1, 4)).detach()
        position, content = self.embed_boxes(reference, memory.memory.dtype)
        if self.mixed_selection:
            content = self.content.weight[:k].to(position.dtype)[None].expand(position.shape[0], -1, -1)
        return QueryGroup(content, position, reference), encoder_predictions


def reset_transformer_parameters(encoder: nn.Module, decoder: "DeformableDecoder", query_source: nn.Module, level_embed):
    """The official `DeformableTransformer._reset_parameters`, over our modules.

    xavier_uniform_ on every >1-d parameter of the encoder, of the decoder layers (self-attention,
    cross-attention, FFNs) and of the query source's transformer part (two-stage projections,
    learned-query reference-point linear); then MSDeformAttn's own reset, then each decoder
    cross-attention's own `reset_parameters()` where it defines one (SMCA's attention keeps its
    init), the reference-point init, and level_embed ~ N(0, 1). The prediction heads, the neck and
    the learned query embeddings are not touched (the official code builds them outside the
    transformer, after its reset). Call it once, after the model is built.
    """
    parameters = list(encoder.parameters()) + list(decoder.layers.parameters()) + list(query_source.transformer_parameters())
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
