"""Co-DETR's training branch (Zong et al., ICCV 2023, "DETRs with Collaborative Hybrid Assignments
Training"): auxiliary one-to-many heads on the adapted encoder memory, and their positives fed to
the shared decoder as customized positive queries.

    losses = one-to-one (meta-arch) + lambda2 * sum_k aux_head_k + lambda1 * sum_k decoder(positive queries_k)

K = CO_DETR.NUM_AUX_HEADS: 0 (nothing), 1 (ATSS), 2 (ATSS + Faster R-CNN). The K positive-query
groups go through the decoder in one batched pass (a block-diagonal self-attention mask keeps
them apart), instead of one full decoder pass per head. Training only: the meta-arch never calls
a branch at inference, so the adapter and the heads cost nothing at test time.
"""
from typing import Dict

import torch
from torch import nn

from ..meta_arch import BranchInputs
from ..modes import TRAINING_BRANCH_REGISTRY
from .adapter import MultiScaleAdapter, flatten_levels
from .atss import ATSSHead, average_across_workers
from .positive_queries import (
    PositiveQueryEmbedding,
    concat_groups,
    pack_positives,
    padded_focal_loss,
    split_decoder_output,
)
from .rcnn_head import FasterRCNNAuxHead

AUX_HEAD_NAMES = ("atss", "rcnn")  # in the order K adds them


@TRAINING_BRANCH_REGISTRY.register()
class CoDETRBranch(nn.Module):
    def __init__(self, cfg, level_strides):
        super().__init__()
        m = cfg.MODEL.HYBRID_DETR
        co = m.CO_DETR
        self.num_aux_heads = co.NUM_AUX_HEADS
        if not 0 <= self.num_aux_heads <= len(AUX_HEAD_NAMES):
            raise ValueError(
                f"MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS must be 0 (none), 1 (ATSS) or 2 (ATSS + Faster R-CNN), "
                f"got {self.num_aux_heads}"
            )
        self.lambda1 = co.LAMBDA1
        self.aux_scale = co.LAMBDA2 * (m.DEC_LAYERS if co.SCALE_AUX_BY_DEC_LAYERS else 1)
        self.min_queries, self.max_queries = co.MIN_POS_QUERIES, co.MAX_POS_QUERIES
        self.aux_loss = m.AUX_LOSS
        self.head_names = AUX_HEAD_NAMES[: self.num_aux_heads]
        if self.num_aux_heads == 0:
            return
        self.adapter = MultiScaleAdapter(m.HIDDEN_DIM, level_strides)
        heads = {
            "atss": lambda: ATSSHead(
                m.HIDDEN_DIM, m.NUM_CLASSES, self.adapter.strides, co.ATSS_ANCHOR_SCALE, co.ATSS_TOPK,
                co.ATSS_STACKED_CONVS, m.FOCAL_ALPHA, m.FOCAL_GAMMA,
            ),
            "rcnn": lambda: FasterRCNNAuxHead(cfg, m.HIDDEN_DIM, self.adapter.strides),
        }
        self.heads = nn.ModuleDict({name: heads[name]() for name in self.head_names})
        self.query_embeds = nn.ModuleDict({name: PositiveQueryEmbedding(m.HIDDEN_DIM) for name in self.head_names})

    def forward(self, inputs: BranchInputs) -> Dict[str, torch.Tensor]:
        if self.num_aux_heads == 0:
            return {}
        maps = self.adapter(inputs.memory)
        n = len(maps[0])
        image_sizes = torch.as_tensor(inputs.images.image_sizes, device=maps[0].device)  # (N, 2) h, w
        losses, packed = {}, []
        for name, head in self.heads.items():  # K <= 2 heads
            if name == "atss":
                head_losses, positives = head(maps, flatten_levels(maps), image_sizes, inputs.gt_instances)
            else:
                head_losses, positives = head(maps, inputs.images, inputs.gt_instances)
            losses.update({f"co_{name}_{k}": v * self.aux_scale for k, v in head_losses.items()})
            packed.append(pack_positives(positives, n, image_sizes, self.min_queries, self.max_queries))

        # One decoder pass over the K positive-query groups.
        dtype = inputs.memory.memory.dtype
        queries = [self.query_embeds[name](p, dtype) for name, p in zip(self.head_names, packed)]
        group = concat_groups(*zip(*queries), [p.padding_mask for p in packed])
        outputs = split_decoder_output(inputs.decoder(group, inputs.memory), [p.num_queries for p in packed])

        criterion = inputs.criterion
        for name, p, output in zip(self.head_names, packed, outputs):
            normalizer = average_across_workers(
                torch.tensor(float(len(p.assignment)), device=maps[0].device)
            ).clamp(min=1.0).item()
            query_losses = criterion.decoder_losses(
                output,
                inputs.targets,
                lambda _layer, _logits, _boxes, a=p.assignment: a,
                normalizer,
                prefix=f"co_{name}_query_",
                aux_loss=self.aux_loss,
                classification_loss=padded_focal_loss(criterion.focal_alpha, criterion.focal_gamma, p.padding_mask),
            )
            losses.update({k: v * self.lambda1 for k, v in query_losses.items()})
        return losses
