"""DAC-DETR (Hu et al., "DAC-DETR: Divide the Attention Layers and Conquer", NeurIPS 2023).

The decoder's self-attention (which pushes queries apart, suiting one-to-one matching) and its
cross-attention (which gathers queries on objects) pull training in opposite directions. DAC-DETR
adds a *C-decoder* during training: the same decoder layers and prediction heads with every
self-attention removed, fed the same queries, trained with a one-to-many assignment. Inference runs
the ordinary decoder (the "O-decoder") alone.

This module holds the whole idea:
- `DACMatcher`: the one-to-many assignment of the C-branch, batched over images;
- `IoUAwareBCELoss`: Align-DETR's IoU-aware classification loss used by the official release
  (the paper's "*" rows), an optional classification loss of the C-branch;
- `DACBranch`: the training branch ("dac" in DECODER_MODE) that runs the C-decoder through the
  shared `DeformableDecoder` (`skip_self_attn=True`) and returns its "dac_"-prefixed losses.

It adds no parameters: the C-decoder *is* the decoder, called without self-attention.
"""
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .criterion import DetectionCriterion
from .matcher import Assignment
from .meta_arch import BranchInputs
from .modes import TRAINING_BRANCH_REGISTRY
from .transformer import QueryGroup

__all__ = ["DACMatcher", "IoUAwareBCELoss", "DACBranch", "batched_box_iou", "pad_targets"]


def batched_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """IoU of every pair of cxcywh boxes within each image: (N, Q, 4) x (N, G, 4) -> (N, Q, G)."""

    def corners(b):
        return torch.cat((b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2), -1)

    a, b = corners(boxes1)[:, :, None], corners(boxes2)[:, None]
    wh = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / (area_a + area_b - inter).clamp(min=eps)


def pad_targets(targets):
    """Per-image targets as batch tensors: labels (N, G), cxcywh boxes (N, G, 4) and a validity mask
    (N, G); G is the largest number of objects in an image. Padding boxes are unit boxes."""
    labels = pad_sequence([t["labels"] for t in targets], batch_first=True, padding_value=0)
    boxes = pad_sequence([t["boxes"] for t in targets], batch_first=True, padding_value=0.5)
    sizes = torch.as_tensor([len(t["labels"]) for t in targets], device=labels.device)
    valid = torch.arange(labels.shape[1], device=labels.device)[None] < sizes[:, None]
    return labels, boxes, valid


class DACMatcher(nn.Module):
    """The C-branch's one-to-many assignment, the same on every decoder layer.

    Score of (query q, gt g) = `iou_weight` * IoU(box_q, box_g) + `cls_weight` * p_q(class of g).
    In the order of the official code:
      1. each query goes to its highest-scoring gt;
      2. it is positive if that score is >= `score_threshold`;
      3. each gt's highest-scoring query is made positive too (it keeps its own best gt);
      4. at most `max_positives` positives per image are kept (chosen at random as the official
         code does, or the highest-scoring ones with `cap_sampling="score"`);
      5. a gt that received c positives is assigned its min(c, `topk_per_gt`) highest-scoring
         queries (among all queries, so a query may serve two gts).
    Every other query is background. All steps are batched over images (gts padded).
    """

    def __init__(
        self,
        iou_weight=0.7,
        cls_weight=0.3,
        score_threshold=0.4,
        topk_per_gt=6,
        max_positives=75,
        cap_sampling="random",
    ):
        super().__init__()
        if cap_sampling not in ("random", "score"):
            raise ValueError(f"DACMatcher: cap_sampling must be 'random' or 'score', got {cap_sampling!r}")
        if topk_per_gt < 1 or max_positives < 1:
            raise ValueError("DACMatcher: topk_per_gt and max_positives must be >= 1")
        self.iou_weight = iou_weight
        self.cls_weight = cls_weight
        self.score_threshold = score_threshold
        self.topk_per_gt = topk_per_gt
        self.max_positives = max_positives
        self.cap_sampling = cap_sampling

    @torch.no_grad()
    def scores(self, logits, boxes, targets):
        """Matching scores (N, Q, G) and the gt validity mask (N, G); padding gts score -1."""
        gt_labels, gt_boxes, gt_valid = pad_targets(targets)
        n, q, _ = logits.shape
        prob = logits.detach().float().sigmoid()
        class_score = prob.gather(2, gt_labels[:, None, :].expand(n, q, -1))
        iou = batched_box_iou(boxes.detach().float(), gt_boxes.float())
        score = self.iou_weight * iou + self.cls_weight * class_score
        return score.masked_fill(~gt_valid[:, None, :], -1.0), gt_valid

    @torch.no_grad()
    def forward(self, logits, boxes, targets) -> Assignment:
        """logits (N, Q, K); boxes (N, Q, 4) cxcywh, the boxes the scores use; targets: per image
        {"labels", "boxes"}."""
        if sum(len(t["labels"]) for t in targets) == 0:
            return Assignment.empty(logits.device)
        score, gt_valid = self.scores(logits, boxes, targets)
        return self.assign(score, gt_valid)

    @torch.no_grad()
    def assign(self, score: torch.Tensor, gt_valid: torch.Tensor) -> Assignment:
        """The assignment from matching scores (N, Q, G) and a gt validity mask (N, G)."""
        n, q, g = score.shape
        if g == 0:
            return Assignment.empty(score.device)
        score = score.masked_fill(~gt_valid[:, None, :], -1.0)
        batch = torch.arange(n, device=score.device)
        # 1-2. each query to its best gt; positive above the threshold
        best_score, best_gt = score.max(dim=2)
        positive = (best_score >= self.score_threshold) & gt_valid.gather(1, best_gt)
        # 3. every gt's top-1 query is positive (matched to its own best gt, as in the official code)
        top1 = score.argmax(dim=1)  # (N, G)
        positive[batch[:, None].expand(n, g)[gt_valid], top1[gt_valid]] = True
        # 4. cap the positives of each image
        if self.max_positives < q:
            key = torch.rand_like(best_score) if self.cap_sampling == "random" else best_score
            order = key.masked_fill(~positive, float("-inf")).argsort(dim=1, descending=True)
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(q, device=score.device).expand(n, q))
            positive &= rank < self.max_positives
        # 5. a gt with c positives takes its min(c, k) highest-scoring queries
        count = torch.zeros(n, g, dtype=torch.int64, device=score.device).scatter_add_(1, best_gt, positive.long())
        k = min(self.topk_per_gt, q)
        top_queries = score.topk(k, dim=1).indices.transpose(1, 2)  # (N, G, k)
        keep = (torch.arange(k, device=score.device) < count[..., None]) & gt_valid[..., None]
        batch_index, gt_index, slot = keep.nonzero(as_tuple=True)
        return Assignment(batch_index, top_queries[batch_index, gt_index, slot], gt_index)


def rank_within_groups(quality: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Rank (0 = best) of each element's `quality` among the elements of the same `group` id."""
    if quality.numel() == 0:
        return torch.zeros_like(group)
    by_quality = quality.argsort(descending=True, stable=True)
    order = by_quality[group[by_quality].argsort(stable=True)]  # grouped, best first in each group
    sorted_group = group[order]
    position = torch.arange(order.numel(), device=order.device)
    first = torch.ones_like(sorted_group, dtype=torch.bool)
    first[1:] = sorted_group[1:] != sorted_group[:-1]
    group_start = torch.cummax(torch.where(first, position, torch.zeros_like(position)), 0).values
    return torch.empty_like(order).scatter_(0, order, position - group_start)


class IoUAwareBCELoss:
    """Align-DETR's IoU-aware BCE, as the official DAC-DETR release trains its C-branch.

    For each assigned (query, gt) pair with predicted probability p of the gt class and IoU u of
    its box, the target is t = p^alpha * u^(1 - alpha) (detached, at least 0.01) times the rank
    weight exp(-r / tau), r the pair's rank by t among the pairs of the same gt. The loss is
    -t log p - (1 - t) log(1 - p) on those (query, class) entries and -p^gamma log(1 - p)
    everywhere else, summed and divided by the normaliser. The official code also weights each
    pair's L1 and GIoU losses by its rank weight: returned as the second element, which
    `DetectionCriterion` applies to the box losses.

    `targets` (the branch's per-image targets) gives the class of each pair.
    """

    def __init__(self, targets, alpha=0.25, gamma=2.0, tau=1.5):
        self.targets = targets
        self.alpha = alpha
        self.gamma = gamma
        self.tau = tau

    def __call__(self, logits, onehot, assignment: Assignment, pred_boxes, gt_boxes, normalizer):
        gt_labels, _ = DetectionCriterion.matched_targets(self.targets, assignment)
        prob = logits.sigmoid()
        n, q, k = logits.shape
        flat = (assignment.batch_index * q + assignment.query_index) * k + gt_labels
        with torch.no_grad():
            iou = batched_box_iou(pred_boxes[:, None].float(), gt_boxes[:, None].float())[:, 0, 0]
            quality = (prob.flatten()[flat].float() ** self.alpha * iou ** (1 - self.alpha)).clamp(min=0.01)
            offsets = torch.tensor([0] + [len(t["labels"]) for t in self.targets], device=flat.device).cumsum(0)
            rank = rank_within_groups(quality, offsets[assignment.batch_index] + assignment.gt_index)
            rank_weight = torch.exp(-rank.float() / self.tau)
            # A (query, class) entry assigned twice keeps its larger target.
            target = torch.zeros(n * q * k, device=logits.device).scatter_reduce(
                0, flat, quality * rank_weight, "amax", include_self=True
            )
            positive = torch.zeros(n * q * k, dtype=torch.bool, device=logits.device)
            positive[flat] = True
        target = target.view_as(logits).to(logits.dtype)
        positive = positive.view_as(logits)
        negative_weight = torch.where(positive, 1 - target, prob**self.gamma)
        positive_weight = torch.where(positive, target, torch.zeros_like(target))
        loss = -positive_weight * F.logsigmoid(logits) - negative_weight * F.logsigmoid(-logits)
        return loss.sum() / normalizer, rank_weight.to(pred_boxes.dtype)


@TRAINING_BRANCH_REGISTRY.register()
class DACBranch(nn.Module):
    """DAC-DETR's C-branch: the decoder without self-attention, trained one-to-many.

    Same initial queries (content, position, reference points) as the one-to-one O-branch, or, with
    C_INPUT_FROM_O_SELF_ATTN (the official code), the O-branch's layer-0 self-attention output as the
    content. Each branch refines its own boxes. Losses of every decoder layer (AUX_LOSS) are
    normalised by num_boxes * LOSS_NORM_FACTOR and named "dac_loss_*".
    """

    def __init__(self, cfg, level_strides=None):
        super().__init__()
        m = cfg.MODEL.HYBRID_DETR
        dac = m.DAC
        self.matcher = DACMatcher(
            dac.MATCH_IOU_WEIGHT,
            dac.MATCH_CLS_WEIGHT,
            dac.SCORE_THRESHOLD,
            dac.TOPK_PER_GT,
            dac.MAX_POSITIVES,
            dac.CAP_SAMPLING,
        )
        self.aux_loss = m.AUX_LOSS
        self.loss_norm_factor = dac.LOSS_NORM_FACTOR
        self.match_against_o_boxes = dac.MATCH_AGAINST_O_BOXES
        self.c_input_from_o_self_attn = dac.C_INPUT_FROM_O_SELF_ATTN
        if dac.CLS_LOSS not in ("focal", "iou_aware_bce"):
            raise ValueError(
                f"MODEL.HYBRID_DETR.DAC.CLS_LOSS must be 'focal' or 'iou_aware_bce', got {dac.CLS_LOSS!r}"
            )
        self.cls_loss = dac.CLS_LOSS
        self.focal_gamma = m.FOCAL_GAMMA

    def c_queries(self, inputs: BranchInputs) -> QueryGroup:
        """The C-branch's queries: the O-branch's initial queries (optionally with the O-branch's
        layer-0 self-attention output as content)."""
        if not self.c_input_from_o_self_attn:
            return inputs.queries
        content = inputs.one_to_one.first_self_attn_output
        if content is None:
            raise ValueError("DAC C_INPUT_FROM_O_SELF_ATTN needs the O-branch's layer-0 self-attention output")
        return dataclasses.replace(inputs.queries, content=content)

    def forward(self, inputs: BranchInputs):
        c_out = inputs.decoder(self.c_queries(inputs), inputs.memory, skip_self_attn=True)
        o_boxes = inputs.one_to_one.boxes
        targets = inputs.targets

        def assign(layer, logits, boxes):
            return self.matcher(logits, o_boxes[layer] if self.match_against_o_boxes else boxes, targets)

        classification_loss = None
        if self.cls_loss == "iou_aware_bce":
            classification_loss = IoUAwareBCELoss(targets, gamma=self.focal_gamma)
        return inputs.criterion.decoder_losses(
            c_out,
            targets,
            assign,
            inputs.num_boxes * self.loss_norm_factor,
            prefix="dac_",
            aux_loss=self.aux_loss,
            classification_loss=classification_loss,
        )
