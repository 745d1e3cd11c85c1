"""One training step of the tiny model per decoder mode, on 1 or on N processes (run as a script
under detectron2's `launch`: `python distributed_helpers.py WORLD OUT.pt`).

The global batch is 4 images of one size (no padding differences between 1 x 4 and 2 x 2) with
3, 0, 2 and 5 objects, so the two workers of a 2-process run see different numbers of boxes.
Plain SGD (lr 1, no clipping) makes the parameter update the negated gradient.
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path.insert(0, TESTS)
sys.path.insert(0, os.path.join(os.path.dirname(TESTS), "projects", "HybridDETR"))

from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import hybrid_detr  # noqa: E402,F401
from hybrid_detr.engine.launch import create_ddp_model, shut_down_workers  # noqa: E402
from model_helpers import synthetic_input, tiny_cfg  # noqa: E402

MODES = {
    "deformable": {},
    "dac": {"DECODER_MODE": "dac"},
    "smca": {"DECODER_MODE": "smca"},
    "co_detr": {"DECODER_MODE": "co_detr"},
}
OBJECTS = (3, 0, 2, 5)
SIZE = 96


def mode_cfg(mode):
    cfg = tiny_cfg(**MODES[mode])
    cfg.MODEL.HYBRID_DETR.DAC.CAP_SAMPLING = "score"  # the random cap would differ by process
    cfg.MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS = 2
    # The official padding of the positive queries (random negatives trained as background, up to
    # the most positives of an image *in the worker's batch*) depends on how the batch is split:
    # as in the official code, 2 x 2 images and 1 x 4 differ there by design. Masked padding
    # leaves only the cross-worker normalisation, which is what this comparison checks.
    cfg.MODEL.HYBRID_DETR.CO_DETR.ZERO_PADDING = True
    return cfg


def global_batch():
    return [synthetic_input(SIZE, SIZE, n, seed=10 + i) for i, n in enumerate(OBJECTS)]


def _first_k_subsample(labels, num_samples, positive_fraction, bg_label):
    """detectron2's subsample_labels without the random permutation (first indices kept)."""
    positive = torch.nonzero((labels != -1) & (labels != bg_label)).squeeze(1)
    negative = torch.nonzero(labels == bg_label).squeeze(1)
    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)
    return positive[:num_pos], negative[:num_neg]


def deterministic_rcnn_sampling():
    """Co-DETR's Faster R-CNN head samples anchors and proposals at random; the same random draw
    cannot be had on 1 and on 2 processes, so take the first ones instead."""
    import detectron2.modeling.proposal_generator.rpn as rpn
    import detectron2.modeling.roi_heads.roi_heads as roi_heads

    rpn.subsample_labels = _first_k_subsample
    roi_heads.subsample_labels = _first_k_subsample


def one_step(modes=tuple(MODES)):
    """{mode: {"losses": {name: mean over workers}, "update"/"grad": {param: tensor}, "unused":
    [params without gradient]}}, the same on every rank."""
    torch.set_num_threads(1)
    deterministic_rcnn_sampling()
    rank, world = comm.get_rank(), comm.get_world_size()
    per_worker = len(OBJECTS) // world
    results = {}
    for mode in modes:
        torch.manual_seed(0)
        model = build_model(mode_cfg(mode))
        model.train()
        ddp = create_ddp_model(model, broadcast_buffers=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        batch = global_batch()[rank * per_worker : (rank + 1) * per_worker]
        with EventStorage():
            loss_dict = ddp(batch)
        optimizer.zero_grad()
        sum(loss_dict.values()).backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
        update = {n: p.detach() - before[n] for n, p in model.named_parameters()}
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        values = {k: v.detach().item() for k, v in loss_dict.items()}
        # As detectron2 logs them: each loss averaged over the workers.
        gathered = comm.all_gather(values)
        losses = {k: sum(g[k] for g in gathered) / world for k in values}
        unused = [n for n, p in model.named_parameters() if p.grad is None]
        results[mode] = {"losses": losses, "update": update, "grad": grads, "unused": unused}
    return results


def nan_on_last_worker(out):
    """A training step where only the last worker's loss is NaN: every worker must stop (no
    worker left waiting in an all-reduce) with the same error; each writes it to out.<rank>."""
    from hybrid_detr.engine.hooks import NonFiniteLossGuard

    torch.set_num_threads(1)
    rank, world = comm.get_rank(), comm.get_world_size()
    torch.manual_seed(0)
    model = build_model(mode_cfg("deformable"))
    model.train()
    guard = NonFiniteLossGuard(create_ddp_model(model, broadcast_buffers=False), lambda: 17)
    forward = model.forward

    def nan_forward(batch):
        losses = forward(batch)
        if rank == world - 1:
            losses["loss_bbox"] = losses["loss_bbox"] * float("nan")
        return losses

    model.forward = nan_forward
    batch = global_batch()[rank * 2 : rank * 2 + 2]
    for i, x in enumerate(batch):
        x["image_id"] = 100 + rank * 2 + i
    try:
        with EventStorage():
            guard(batch)
        message = "no error"
    except FloatingPointError as e:
        message = str(e)
    with open(f"{out}.{rank}", "w") as f:
        f.write(message)
    shut_down_workers()


def _worker(out):
    results = one_step()
    if comm.is_main_process():
        torch.save(results, out)
    shut_down_workers()


if __name__ == "__main__":
    from detectron2.engine import launch

    world, out = int(sys.argv[1]), sys.argv[2]
    func = nan_on_last_worker if len(sys.argv) > 3 and sys.argv[3] == "nan" else _worker
    launch(func, world, dist_url="auto", args=(out,))
