"""Distributed pieces: DistributedDataParallel on CPU (gloo) or one GPU per process (NCCL).

detectron2's `launch` already picks gloo when there is no GPU; its `create_ddp_model` however
always passes `device_ids=[local_rank]`, which DDP refuses for a CPU module. Here `device_ids`
is given only when the model lives on a GPU.
"""
import logging

import torch
from torch.nn.parallel import DistributedDataParallel

from detectron2.utils import comm

__all__ = ["create_ddp_model", "all_ranks_any", "shut_down_workers"]

logger = logging.getLogger(__name__)


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """`model` wrapped in DDP when there are several processes, else `model` itself.

    CPU model: no `device_ids` (gradients are all-reduced over gloo). CUDA model: the process's
    local GPU, as detectron2 does. Other keyword arguments go to DDP.
    """
    if comm.get_world_size() == 1:
        return model
    device = _model_device(model)
    if device.type == "cuda":
        kwargs.setdefault("device_ids", [comm.get_local_rank()])
    else:
        kwargs.pop("device_ids", None)
        kwargs.pop("output_device", None)
    backend = torch.distributed.get_backend()
    logger.info(f"DistributedDataParallel over {comm.get_world_size()} processes ({backend}, {device.type})")
    return DistributedDataParallel(model, **kwargs)


def all_ranks_any(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (one tiny all-reduce)."""
    if comm.get_world_size() == 1:
        return bool(flag)
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value)
    return bool(value.item() > 0)


def shut_down_workers() -> None:
    """Ends a multi-process run cleanly: all ranks meet, then the process group is destroyed.

    detectron2's `launch` leaves the group to interpreter exit, where gloo's threads can be torn
    down while a peer still talks to them (seen as "terminate called without an active
    exception" and SIGABRT of one worker after a run that itself succeeded). Call it at the end
    of a worker function that returns normally; a single process does nothing.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    comm.synchronize()
    torch.distributed.destroy_process_group()
