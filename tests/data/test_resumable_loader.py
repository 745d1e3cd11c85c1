"""The resumable training loader: batch i (and its augmentation) is a function of (seed, i)."""
import json

import numpy as np
import pytest
import torch

from hybrid_detr.data.loader import ResumableBatchSampler, SeededMapDataset, build_resumable_train_loader
from hybrid_detr.engine.hooks import truncate_metrics_json


def _batches(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_starting_at_an_iteration_gives_the_batches_of_an_uninterrupted_run():
    full = _batches(ResumableBatchSampler(10, 4, seed=3, rank=0, world_size=1), 12)
    resumed = _batches(ResumableBatchSampler(10, 4, seed=3, rank=0, world_size=1, start_iter=7), 5)
    assert resumed == full[7:]
    # Each epoch is a permutation of the dataset; epochs differ.
    stream = [index for batch in full for _, index in batch]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]
    assert [p for batch in full for p, _ in batch] == list(range(48))  # positions, in order
    other_seed = _batches(ResumableBatchSampler(10, 4, seed=4, rank=0, world_size=1), 12)
    assert other_seed != full


def test_workers_split_each_global_batch():
    one = _batches(ResumableBatchSampler(10, 4, seed=3, rank=0, world_size=1), 6)
    ranks = [_batches(ResumableBatchSampler(10, 4, seed=3, rank=r, world_size=2), 6) for r in (0, 1)]
    for i in range(6):
        assert ranks[0][i] + ranks[1][i] == one[i]


def test_batch_must_divide_among_workers():
    with pytest.raises(ValueError, match=r"IMS_PER_BATCH \(3\).*workers \(2\)"):
        ResumableBatchSampler(10, 3, seed=0, rank=0, world_size=2)
    with pytest.raises(ValueError, match="empty"):
        ResumableBatchSampler(0, 2, seed=0, rank=0, world_size=1)


def _random_mapper(record):
    # Stands for an augmentation: draws from the global numpy, python and torch RNGs.
    import random

    return (record["id"], float(np.random.rand()), random.random(), float(torch.rand(())))


def test_a_sample_is_augmented_the_same_whenever_and_wherever_it_is_loaded():
    dataset = SeededMapDataset([{"id": i} for i in range(5)], _random_mapper, seed=11)
    first = dataset[(7, 2)]
    np.random.seed(123)
    torch.manual_seed(5)
    assert dataset[(7, 2)] == first  # other global RNG state: same result
    assert dataset[(8, 2)] != first  # same image at another stream position: new augmentation
    assert first[0] == 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_with_any_number_of_workers(num_workers):
    dicts = [{"id": i} for i in range(7)]
    reference = build_resumable_train_loader(dicts, _random_mapper, 2, seed=5, num_workers=0)
    expected = [b for b, _ in zip(reference, range(9))]
    loader = build_resumable_train_loader(dicts, _random_mapper, 2, seed=5, num_workers=num_workers)
    loader.batch_sampler.start_iter = 4
    assert [b for b, _ in zip(loader, range(5))] == expected[4:]


def test_truncate_metrics_json_drops_what_a_killed_run_wrote_after_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.json"
    lines = [json.dumps({"iteration": i, "total_loss": 1.0 / (i + 1)}) for i in range(6)]
    path.write_text("\n".join(lines) + '\n{"iteration": 6, "total_lo')  # killed mid-line
    with open(path, "a") as handle:  # a writer holding the file open keeps appending after the cut
        assert truncate_metrics_json(str(path), 3) == 3
        handle.write(json.dumps({"iteration": 4}) + "\n")
    assert [json.loads(x)["iteration"] for x in path.read_text().splitlines()] == [0, 1, 2, 3, 4]
    assert truncate_metrics_json(str(tmp_path / "none.json"), 3) == 0
