"""Co-DETR's training branch (Zong et al., ICCV 2023, "DETRs with Collaborative Hybrid Assignments
Training"): auxiliary one-to-many heads on the adapted encoder memory, and their positives fed to
the shared decoder as customized positive queries.

    losses = one-to-one (meta-arch) + lambda2 * sum_k aux_head_k + lambda1 * sum_k decoder(positive queries_k)

K = CO_DETR.NUM_AUX_HEADS: 0 (nothing), 1 (ATSS), 2 (ATSS + Faster R-CNN). The K positive-query
groups go through the decoder in one batched pass (a block-diagonal self-attention mask keeps
them apart), instead of one full decoder pass per head as in the official code
(projects/models/co_detr.py lines 326-331). Training only: the meta-arch never calls a branch at
inference, so the adapter and the heads cost nothing at test time.

As the official release: every aux-head loss is weighted lambda2 * DEC_LAYERS (2 * 6 = 12; the
official config puts the factor in each loss_weight), the positive queries' losses lambda1 = 1 on
every decoder layer (co_deformable_detr_head.py lines 370, 563-594), focal over all of a group's
non-padding queries (positives and background negatives), L1 + GIoU on the positives, both
normalised by the positives in the batch (lines 326-369; bg_cls_weight 0).
"""
from typing import Dict, Optional

import torch
from detectron2.config import configurable
from torch import nn

from ..criterion import mean_across_workers
from ..modes import BranchInputs, register_decoder_mode
from ..query_groups import decode_groups
from ..transformer import QueryGroup
from .adapter import MultiScaleAdapter
from .atss import ATSSHead
from .config import add_co_detr_config
from .explain import explain_view
from .positive_queries import AuxPositives, PositiveQueryEmbedding, image_sizes_tensor, pack_positives
from .rcnn_head import FasterRCNNAuxHead

AUX_HEAD_NAMES = ("atss", "rcnn")  # in the order K adds them


class CoDETRBranch(nn.Module):
    """Every auxiliary head is called as head(maps, images, gt_instances) -> (losses, AuxPositives,
    AuxNegatives)."""

    @configurable
    def __init__(
        self,
        *,
        adapter: Optional[MultiScaleAdapter],
        heads: Dict[str, nn.Module],
        query_embeds: Dict[str, PositiveQueryEmbedding],
        lambda1: float = 1.0,
        aux_scale: float = 2.0,
        min_queries: int = 9,
        max_queries: int = 300,
        aux_loss: bool = True,
        zero_padding: bool = False,
        subset: str = "random",
    ):
        """`heads` and `query_embeds`: per auxiliary head name, in AUX_HEAD_NAMES order; `aux_scale`
        weights the heads' own losses (lambda2, times DEC_LAYERS in the official configs)."""
        super().__init__()
        self.head_names = tuple(heads)
        self.num_aux_heads = len(self.head_names)
        self.lambda1 = lambda1
        self.aux_scale = aux_scale
        self.min_queries, self.max_queries = min_queries, max_queries
        self.aux_loss = aux_loss
        self.zero_padding = zero_padding
        self.subset = subset
        self.adapter = adapter  # None without auxiliary heads
        self.heads = nn.ModuleDict(heads)
        self.query_embeds = nn.ModuleDict(query_embeds)

    @classmethod
    def from_config(cls, cfg, level_strides):
        m = cfg.MODEL.HYBRID_DETR
        co = m.CO_DETR
        if not 0 <= co.NUM_AUX_HEADS <= len(AUX_HEAD_NAMES):
            raise ValueError(
                f"MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS must be 0 (none), 1 (ATSS) or 2 (ATSS + Faster R-CNN), "
                f"got {co.NUM_AUX_HEADS}"
            )
        names = AUX_HEAD_NAMES[: co.NUM_AUX_HEADS]
        if names and m.QUERY_POSITION_FROM_REFERENCE and co.HEAD_EMBED != "none":
            # The decoder recomputes every position from the reference box: a per-head embedding
            # added to the position would never be used (and DDP refuses parameters without gradient).
            raise ValueError(
                "MODEL.HYBRID_DETR.CO_DETR.HEAD_EMBED must be 'none' with QUERY_POSITION_FROM_REFERENCE: True "
                f"(got {co.HEAD_EMBED!r}; the decoder ignores the positive queries' positions)"
            )
        adapter = MultiScaleAdapter(m.HIDDEN_DIM, level_strides) if names else None
        builders = {
            "atss": lambda: ATSSHead(
                m.HIDDEN_DIM, m.NUM_CLASSES, adapter.strides, co.ATSS_ANCHOR_SCALE, co.ATSS_TOPK,
                co.ATSS_STACKED_CONVS, m.FOCAL_ALPHA, m.FOCAL_GAMMA, anchor_offset=co.ATSS_ANCHOR_OFFSET,
            ),
            "rcnn": lambda: FasterRCNNAuxHead(cfg, m.HIDDEN_DIM, adapter.strides),
        }
        heads = {name: builders[name]() for name in names}
        return {
            "adapter": adapter,
            "heads": heads,
            "query_embeds": {
                name: PositiveQueryEmbedding(m.HIDDEN_DIM, co.HEAD_EMBED, len(names)) for name in names
            },
            "lambda1": co.LAMBDA1,
            "aux_scale": co.LAMBDA2 * (m.DEC_LAYERS if co.SCALE_AUX_BY_DEC_LAYERS else 1),
            "min_queries": co.MIN_POS_QUERIES,
            "max_queries": co.MAX_POS_QUERIES,
            "aux_loss": m.AUX_LOSS,
            "zero_padding": co.ZERO_PADDING,
            "subset": co.POS_QUERY_SUBSET,
        }

    def aux_positives(self, memory, images, gt_instances) -> Dict[str, AuxPositives]:
        """Each auxiliary head's positives for `gt_instances` (what its assigner gives in a training
        step; the Faster R-CNN head samples, so seed first for a repeatable result)."""
        maps = self.adapter(memory)
        return {name: head(maps, images, gt_instances)[1] for name, head in self.heads.items()}

    def forward(self, inputs: BranchInputs) -> Dict[str, torch.Tensor]:
        if self.num_aux_heads == 0:
            return {}
        maps = self.adapter(inputs.memory)
        n = len(maps[0])
        image_sizes = image_sizes_tensor(inputs.images, maps[0].device)
        losses, packed = {}, []
        for name, head in self.heads.items():  # K <= 2 heads
            head_losses, positives, negatives = head(maps, inputs.images, inputs.gt_instances)
            losses.update({f"co_{name}_{k}": v * self.aux_scale for k, v in head_losses.items()})
            packed.append(
                pack_positives(
                    positives, n, image_sizes, self.min_queries, self.max_queries,
                    negatives=None if self.zero_padding else negatives, subset=self.subset,
                )
            )

        # One decoder pass over the K positive-query groups.
        dtype = inputs.memory.memory.dtype
        groups = [
            QueryGroup(*self.query_embeds[name](p, dtype), padding_mask=p.padding_mask)
            for name, p in zip(self.head_names, packed)
        ]
        outputs = decode_groups(inputs.decoder, groups, inputs.memory)

        criterion = inputs.criterion
        for name, p, output in zip(self.head_names, packed, outputs):
            normalizer = mean_across_workers(
                torch.tensor(float(len(p.assignment)), device=maps[0].device)
            ).clamp(min=1.0).item()
            query_losses = criterion.decoder_losses(
                output,
                inputs.targets,
                lambda _layer, _logits, _boxes, a=p.assignment: a,
                normalizer,
                prefix=f"co_{name}_query_",
                aux_loss=self.aux_loss,
                classification=criterion.focal,  # padding queries left out
            )
            losses.update({k: v * self.lambda1 for k, v in query_losses.items()})
        return losses


register_decoder_mode(
    "co_detr", add_config=add_co_detr_config, training_branch=CoDETRBranch, explain_view=explain_view
)
