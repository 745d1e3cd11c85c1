"""DAC-DETR's one-to-many assignment of the C-branch, batched over images."""
import torch
from torch import nn

from ..box_ops import batched_box_iou, pad_targets
from ..matcher import Assignment, check_finite_predictions

__all__ = ["DACMatcher"]


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
        gt_labels, gt_boxes, gt_valid = pad_targets(
            [t["labels"] for t in targets], [t["boxes"] for t in targets], pad_box=0.5
        )
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
        check_finite_predictions("DACMatcher", logits, boxes)
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
