"""A training data loader that can be resumed at any iteration, bit for bit.

detectron2's `TrainingSampler` restarts its random stream when a job is restarted, and the
augmentations draw from whatever global RNG state the worker process happens to have. Here every
training sample is a pure function of (seed, position in the global sample stream):

- position p of the stream is image `perm_e[p % N]` where `perm_e` is the permutation of epoch
  e = p // N drawn from a generator seeded with (seed, e);
- iteration i uses positions [i * B, (i + 1) * B) of the stream (B = SOLVER.IMS_PER_BATCH, the
  total batch); worker rank r takes its contiguous slice of B / world_size of them;
- before a sample is mapped, python's, numpy's and torch's RNGs are seeded with (seed, p), so
  its augmentation does not depend on the data-loader worker or on what ran before.

So `start_iter` is all a restarted job needs to see exactly the batches (and augmentations) an
uninterrupted job would have seen, with any number of data-loader workers. Batches are formed in
stream order (no aspect-ratio grouping; DETR pads each batch anyway).
"""
import logging
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from detectron2.data.build import trivial_batch_collator
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm

__all__ = ["ResumableBatchSampler", "SeededMapDataset", "build_resumable_train_loader", "sample_seed"]

logger = logging.getLogger(__name__)


def sample_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed derived from (seed, *keys), well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(seed) % 2**63, *[int(k) for k in keys]]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class ResumableBatchSampler(Sampler):
    """Infinite batches of (stream position, dataset index) for one worker rank.

    Args:
        size: number of images in the dataset.
        total_batch_size: images per iteration over all ranks (SOLVER.IMS_PER_BATCH).
        seed: the base seed (the same on every rank).
        rank, world_size: this worker and how many there are (default: torch.distributed's).
        shuffle: a new permutation every epoch (True) or dataset order.
        start_iter: the first iteration to produce; set it before iterating to resume.
    """

    def __init__(self, size, total_batch_size, seed, rank=None, world_size=None, shuffle=True, start_iter=0):
        if size <= 0:
            raise ValueError("ResumableBatchSampler: the dataset is empty")
        self.world_size = comm.get_world_size() if world_size is None else world_size
        self.rank = comm.get_rank() if rank is None else rank
        if total_batch_size <= 0 or total_batch_size % self.world_size:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH ({total_batch_size}) must be a positive multiple of the number of "
                f"workers ({self.world_size})"
            )
        self.size = size
        self.total_batch_size = total_batch_size
        self.batch_size = total_batch_size // self.world_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.start_iter = start_iter
        self._epoch, self._perm = None, None

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(sample_seed(self.seed, 0x5A3, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=g).tolist()
        return self._perm[offset]

    def batch_at(self, iteration: int):
        first = iteration * self.total_batch_size + self.rank * self.batch_size
        return [(p, self.index_at(p)) for p in range(first, first + self.batch_size)]

    def __iter__(self):
        iteration = self.start_iter
        while True:
            yield self.batch_at(iteration)
            iteration += 1


class SeededMapDataset(Dataset):
    """`mapper(dataset[index])` for an item (position, index), every RNG seeded with (seed, position)."""

    def __init__(self, dataset, mapper, seed):
        self.dataset = dataset
        self.mapper = mapper
        self.seed = int(seed)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        position, index = item
        seed_all(sample_seed(self.seed, 0xA06, position))
        record = self.dataset[index]
        out = self.mapper(record)
        if out is None:  # detectron2 mappers may drop a sample; ours never should
            raise RuntimeError(
                f"The mapper returned None for image {record.get('file_name')!r} (image_id "
                f"{record.get('image_id')!r}): the resumable loader cannot skip samples"
            )
        return out


def build_resumable_train_loader(dataset_dicts, mapper, total_batch_size, seed, num_workers=0, shuffle=True):
    """A torch DataLoader of lists of mapped dicts (this rank's share of each iteration's batch).

    Resume by setting `loader.batch_sampler.start_iter` before the first `iter(loader)`. A mapper
    with a `check_dataset_dicts` method (DetrDatasetMapper) checks the records first, so that what
    it would refuse at some step stops the run before the first one.
    """
    check = getattr(mapper, "check_dataset_dicts", None)
    if check is not None:
        check(dataset_dicts)
    sampler = ResumableBatchSampler(len(dataset_dicts), total_batch_size, seed, shuffle=shuffle)
    dataset = SeededMapDataset(DatasetFromList(dataset_dicts, copy=False), mapper, seed)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=trivial_batch_collator,
        # Each worker would otherwise start from a copy of the parent's RNG; samples are seeded anyway.
        worker_init_fn=None,
        persistent_workers=False,
        # `iter(loader)` draws its workers' base seed from this generator instead of torch's global
        # RNG, so creating the iterator (lazily, inside a training step) leaves the model-side
        # randomness the trainer seeds per iteration untouched.
        generator=torch.Generator().manual_seed(sample_seed(seed, 0x17E4)),
    )
