"""Co-DETR's customized positive queries (Sec. 3.3 of the paper).

Each auxiliary head's positive anchors / proposals become extra decoder queries:
- position: the box's sine embedding -> Linear + LayerNorm (+ a learned per-head embedding);
- content: the adapter's feature for that positive (the head says which: ATSS takes the feature
  at the anchor's level and position, Faster R-CNN RoI-pools its proposal) -> Linear + LayerNorm;
- reference: the box itself (4-d, normalised to the unpadded image);
- target: the gt the head assigned it to (an `Assignment` built directly, no Hungarian matching).

Per head, images are padded to M = clamp(max positives over the batch, MIN, MAX) queries; the
padding queries are masked out of self-attention and of the loss. The heads' groups go through
the decoder together, in one pass, kept apart by a block-diagonal self-attention mask.
Everything here is vectorised over the batch (no per-image loops).
"""
from dataclasses import dataclass
from typing import List, Sequence

import torch
from torch import nn
from torchvision.ops import box_convert, sigmoid_focal_loss

from detectron2.structures import ImageList

from ..box_ops import sort_within_groups
from ..criterion import ClassLoss
from ..matcher import Assignment
from ..position_encoding import box_sine_embedding
from ..transformer import DecoderOutput, QueryGroup

# Reference box of the padding queries (any valid box: they are masked everywhere).
PADDING_BOX = (0.5, 0.5, 0.5, 0.5)


@dataclass
class AuxPositives:
    """The positives of one auxiliary head over the batch, flat (P = positives in the batch)."""

    batch_index: torch.Tensor  # (P,) int64
    boxes: torch.Tensor  # (P, 4) xyxy in the image's pixels (anchors or proposals)
    gt_index: torch.Tensor  # (P,) int64, index into that image's targets
    score: torch.Tensor  # (P,) priority when an image has more than MAX positives (IoU with its gt)
    features: torch.Tensor  # (P, C) content feature of each positive


def image_sizes_tensor(images: ImageList, device) -> torch.Tensor:
    """(N, 2) (h, w) of the unpadded images of a padded batch."""
    return torch.as_tensor(images.image_sizes, device=device).view(-1, 2)


@dataclass
class PackedPositives:
    """One head's positives laid out as (N, M) queries, padded."""

    boxes: torch.Tensor  # (N, M, 4) cxcywh normalised to the unpadded image
    features: torch.Tensor  # (N, M, C)
    padding_mask: torch.Tensor  # (N, M) True on padding queries
    assignment: Assignment  # query_index in [0, M)

    @property
    def num_queries(self) -> int:
        return self.boxes.shape[1]


def pack_positives(
    positives: AuxPositives, num_images: int, image_sizes: torch.Tensor, min_queries: int, max_queries: int
) -> PackedPositives:
    """Lays the positives of each image out in its row, best score first; M = clamp(max count,
    min_queries, max_queries); an image with more than M positives keeps its M best.

    image_sizes: (N, 2) (h, w) of the unpadded images."""
    if min_queries < 1 or max_queries < min_queries:
        raise ValueError(f"Co-DETR positive queries: need 1 <= MIN_POS_QUERIES <= MAX_POS_QUERIES, got {min_queries}, {max_queries}")
    device = positives.boxes.device
    counts = torch.bincount(positives.batch_index, minlength=num_images)
    m = int(counts.max().clamp(min=min_queries, max=max_queries))
    # By image, then by descending score within an image.
    order, rank = sort_within_groups(positives.score, positives.batch_index)
    batch = positives.batch_index[order]
    keep = rank < m
    order, batch, rank = order[keep], batch[keep], rank[keep]

    size = image_sizes[batch].to(positives.boxes.dtype)  # (P, 2) h, w
    scale = torch.stack((size[:, 1], size[:, 0], size[:, 1], size[:, 0]), -1)
    xyxy = torch.minimum(positives.boxes[order].clamp(min=0), scale) / scale
    cxcywh = box_convert(xyxy, "xyxy", "cxcywh").clamp(min=1e-4, max=1.0)

    boxes = torch.tensor(PADDING_BOX, device=device, dtype=cxcywh.dtype).repeat(num_images, m, 1)
    boxes = boxes.index_put((batch, rank), cxcywh.detach())
    features = positives.features
    features = features.new_zeros(num_images, m, features.shape[-1]).index_put((batch, rank), features[order])
    padding_mask = torch.ones(num_images, m, dtype=torch.bool, device=device).index_put(
        (batch, rank), torch.zeros_like(batch, dtype=torch.bool)
    )
    return PackedPositives(boxes, features, padding_mask, Assignment(batch, rank, positives.gt_index[order]))


class PositiveQueryEmbedding(nn.Module):
    """Turns one head's packed positives into decoder queries (content, position, reference)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.position_proj = nn.Linear(2 * d_model, d_model)
        self.position_norm = nn.LayerNorm(d_model)
        self.content_proj = nn.Linear(d_model, d_model)
        self.content_norm = nn.LayerNorm(d_model)
        # Tells the shared decoder which head a query comes from (as the official head_pos_embed).
        self.head_embed = nn.Parameter(torch.empty(d_model).normal_())

    def forward(self, packed: PackedPositives, dtype=None):
        sine = box_sine_embedding(packed.boxes, self.d_model // 2)  # (N, M, 2C)
        dtype = dtype or packed.features.dtype
        position = self.position_norm(self.position_proj(sine.to(dtype))) + self.head_embed
        content = self.content_norm(self.content_proj(packed.features.to(dtype)))
        return content, position, packed.boxes.to(dtype)


def concat_groups(contents, positions, references, padding_masks) -> QueryGroup:
    """K query groups side by side along the query dim; a block-diagonal self-attention mask
    keeps every group to itself (True = blocked)."""
    sizes = [c.shape[1] for c in contents]
    group_id = torch.repeat_interleave(
        torch.arange(len(sizes), device=contents[0].device), torch.tensor(sizes, device=contents[0].device)
    )
    self_attn_mask = group_id[:, None] != group_id[None, :] if len(sizes) > 1 else None
    return QueryGroup(
        torch.cat(contents, 1),
        torch.cat(positions, 1),
        torch.cat(references, 1),
        self_attn_mask=self_attn_mask,
        padding_mask=torch.cat(padding_masks, 1),
    )


def split_decoder_output(output: DecoderOutput, sizes: Sequence[int]) -> List[DecoderOutput]:
    """The per-group outputs of a decoder pass over `concat_groups`."""
    return [
        DecoderOutput(logits, boxes, hidden)
        for logits, boxes, hidden in zip(
            output.logits.split(list(sizes), dim=2),
            output.boxes.split(list(sizes), dim=2),
            output.hidden.split(list(sizes), dim=2),
        )
    ]


def padded_focal_loss(alpha: float, gamma: float, padding_mask: torch.Tensor):
    """The criterion's focal loss with the padding queries left out (a `ClassificationLoss`)."""

    def loss(logits, onehot, assignment, pred_boxes, gt_boxes, normalizer):
        focal = sigmoid_focal_loss(logits, onehot, alpha, gamma, reduction="none")
        return ClassLoss((focal * (~padding_mask)[..., None]).sum() / normalizer)

    return loss
