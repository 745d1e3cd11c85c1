"""Inference's selection of detections, shared by `HybridDETR.inference` and the exported graph."""
import torch

__all__ = ["top_k_detections"]


def top_k_detections(logits: torch.Tensor, boxes: torch.Tensor, k: int):
    """The `k` best (query, class) pairs of each image, by sigmoid score (Deformable DETR's
    post-process; a query may give several detections of different classes).

    logits (N, Q, K), boxes (N, Q, 4) -> scores (N, k'), labels (N, k'), their boxes (N, k', 4) and
    query indices (N, k'), k' = min(k, Q * K)."""
    n, q, num_classes = logits.shape
    scores, flat_index = logits.sigmoid().flatten(1).topk(min(k, q * num_classes), dim=1)
    query_index = torch.div(flat_index, num_classes, rounding_mode="floor")
    labels = flat_index % num_classes
    boxes = boxes.gather(1, query_index[..., None].expand(-1, -1, boxes.shape[-1]))
    return scores, labels, boxes, query_index
