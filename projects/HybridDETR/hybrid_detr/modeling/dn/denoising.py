"""DINO's contrastive denoising groups (Zhang et al., "DINO: DETR with Improved DeNoising Anchor
Boxes", ICLR 2023, Sec. 3.3), built as the official `prepare_for_cdn` builds them
(IDEA-Research/DINO, models/dino/dn_components.py lines 32-129); the line numbers below are that file's.

Per batch, with S = the most gt boxes of any image and G = max(1, NUMBER // S) groups (lines
35-47), the denoising queries are G groups of 2S slots: slot j of the first half of a group holds
image i's gt j with small noise (a *positive*, trained to reconstruct the gt), slot S + j the same gt
with large noise (a *negative*, trained as background). Slots of images with fewer than S boxes are
padding: zero content, box (0.5, 0.5, 0.5, 0.5), trained as background, not masked (lines 98-110).

Noise, drawn in the official order (so that seeding both codes alike gives the same noise):
- labels: each is replaced, with probability LABEL_NOISE_RATIO / 2, by a class drawn uniformly
  (lines 63-67);
- boxes: each corner of the xyxy box moves by u * (w/2, h/2) * BOX_NOISE_SCALE, u uniform in
  (-1, 1) for positives and in +-[1, 2) for negatives, then the box is clipped to the image (lines
  75-92). The reference the decoder starts from is sigmoid(inverse_sigmoid(box)), what the official
  decoder receives, with the model's INVERSE_SIGMOID_EPS: DINO's 1e-3 (util/misc.py:575), DAC-DETR's
  release 1e-5 (its util/misc.py); it matters for corners clipped to the image's border.

Attention (lines 112-124): the one-to-one queries never see the denoising queries, the groups never
see each other, a group sees itself and the one-to-one queries.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from ..matcher import Assignment

__all__ = ["DenoisingGroups", "DenoisingNoise", "draw_noise", "denoising_groups", "num_denoising_groups"]

def num_denoising_groups(dn_number: int, max_boxes: int) -> int:
    """G = max(1, 2 * dn_number // (2 * max_boxes)) (lines 35-47; 1 without boxes, or when
    an image has more boxes than dn_number)."""
    if max_boxes == 0:
        return 1
    doubled = 2 * dn_number
    groups = doubled // (2 * max_boxes) if doubled >= 100 else doubled
    return max(groups, 1)


@dataclass
class DenoisingNoise:
    """The random draws of one batch, in the official order (all flat over the K = 2 G B known
    boxes, repeat-major: entry r * B + b is the batch's box b in repeat r, even r positive)."""

    label_p: torch.Tensor  # (K,) uniform: the label is replaced where < LABEL_NOISE_RATIO / 2
    new_labels: torch.Tensor  # (number replaced,) uniform classes
    box_sign: torch.Tensor  # (K, 4) +-1
    box_part: torch.Tensor  # (K, 4) uniform [0, 1) (negatives get +1)


def draw_noise(num_known: int, num_classes: int, label_noise_ratio: float, box_noise_scale: float, device) -> DenoisingNoise:
    """Draws the batch's noise with torch's global generator, in the official order."""
    label_p = torch.rand(num_known, device=device) if label_noise_ratio > 0 else torch.ones(num_known, device=device)
    chosen = (label_p < label_noise_ratio * 0.5).sum() if label_noise_ratio > 0 else 0
    new_labels = torch.randint(0, num_classes, (int(chosen),), device=device)
    if box_noise_scale > 0:
        box_sign = torch.randint(0, 2, (num_known, 4), dtype=torch.float32, device=device) * 2.0 - 1.0
        box_part = torch.rand(num_known, 4, device=device)
    else:
        box_sign = box_part = torch.zeros(num_known, 4, device=device)
    return DenoisingNoise(label_p, new_labels, box_sign, box_part)


@dataclass
class DenoisingGroups:
    """The denoising queries of one batch, P = 2 G S per image."""

    labels: torch.Tensor  # (N, P) noised class of each slot, -1 on padding slots
    boxes: torch.Tensor  # (N, P, 4) cxcywh reference of each slot (padding: 0.5)
    self_attn_mask: torch.Tensor  # (P, P) True where slot i may not attend to slot j (other groups)
    assignment: Assignment  # the positives -> their gt, gt_index into `group_targets`
    group_targets: List[Dict[str, torch.Tensor]]  # per image, its targets repeated G times
    num_groups: int
    max_boxes: int  # S

    @property
    def num_queries(self) -> int:
        return self.labels.shape[1]


def _inverse_sigmoid(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def denoising_groups(
    targets: List[Dict[str, torch.Tensor]],
    dn_number: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    num_classes: int,
    noise: Optional[DenoisingNoise] = None,
    inverse_sigmoid_eps: float = 1e-3,
) -> Optional[DenoisingGroups]:
    """The batch's denoising queries (None when no image has a box: nothing to denoise).
    `noise`: the draws to use (default: drawn now, see `draw_noise`); `inverse_sigmoid_eps`: the
    clamp of the references' round trip (1e-3 DINO's)."""
    counts = [len(t["labels"]) for t in targets]
    max_boxes = max(counts, default=0)
    if max_boxes == 0:
        return None
    device = targets[0]["boxes"].device
    groups = num_denoising_groups(dn_number, max_boxes)
    repeats = 2 * groups
    labels = torch.cat([t["labels"] for t in targets])
    boxes = torch.cat([t["boxes"] for t in targets]).float()
    b = len(labels)
    image = torch.cat([torch.full((n,), i, dtype=torch.int64, device=device) for i, n in enumerate(counts)])
    index_in_image = torch.cat([torch.arange(n, device=device) for n in counts])
    if noise is None:
        noise = draw_noise(repeats * b, num_classes, label_noise_ratio, box_noise_scale, device)

    known_labels = labels.repeat(repeats)
    if label_noise_ratio > 0:
        chosen = (noise.label_p < label_noise_ratio * 0.5).nonzero().view(-1)
        known_labels = known_labels.scatter(0, chosen, noise.new_labels.to(known_labels.dtype))
    known_boxes = boxes.repeat(repeats, 1)
    if box_noise_scale > 0:
        xyxy = torch.cat((known_boxes[:, :2] - known_boxes[:, 2:] / 2, known_boxes[:, :2] + known_boxes[:, 2:] / 2), 1)
        half_size = torch.cat((known_boxes[:, 2:] / 2, known_boxes[:, 2:] / 2), 1)
        negative = (torch.arange(repeats, device=device) % 2 == 1).repeat_interleave(b)
        part = (noise.box_part + negative[:, None].float()) * noise.box_sign
        xyxy = (xyxy + part * half_size * box_noise_scale).clamp(min=0.0, max=1.0)
        known_boxes = torch.cat(((xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]), 1)
    reference = _inverse_sigmoid(known_boxes, inverse_sigmoid_eps).sigmoid()

    n, single = len(targets), max_boxes
    num_queries = repeats * single
    repeat = torch.arange(repeats, device=device).repeat_interleave(b)
    slot = repeat * single + index_in_image.repeat(repeats)
    batch = image.repeat(repeats)
    slot_labels = torch.full((n, num_queries), -1, dtype=torch.int64, device=device)
    slot_labels[batch, slot] = known_labels
    slot_boxes = torch.full((n, num_queries, 4), 0.5, device=device)
    slot_boxes[batch, slot] = reference

    group_of_slot = torch.arange(num_queries, device=device) // (2 * single)
    self_attn_mask = group_of_slot[:, None] != group_of_slot[None, :]

    # Positives: group g's first half; their gt is copy g of the image's targets, so that every
    # (group, gt) pair is its own gt (one-to-one within a group, as the official indices).
    positive = repeat % 2 == 0
    group = repeat[positive] // 2
    assignment = Assignment(
        batch[positive], slot[positive], group * torch.as_tensor(counts, device=device)[batch[positive]] + index_in_image.repeat(repeats)[positive]
    )
    group_targets = [{"labels": t["labels"].repeat(groups), "boxes": t["boxes"].repeat(groups, 1)} for t in targets]
    return DenoisingGroups(slot_labels, slot_boxes, self_attn_mask, assignment, group_targets, groups, max_boxes)
