"""Resume that loses nothing: a train_net.py run killed with SIGKILL and restarted with --resume
ends with the weights of an uninterrupted run (bit for bit, CPU, one thread), and its metrics.json
and TensorBoard events hold every iteration exactly once. Checkpoint writes are atomic."""
import json
import os
import signal
import time

import pytest
import torch

from hybrid_detr.checkpoint import HybridCheckpointer
from tiny_runs import TinySetup, metrics

# 9 iterations, a checkpoint every 3 (iterations 2, 5, 8); the data loader in a worker process,
# DETR's random flip / crop / multi-scale resize on (the base config), batches of 2; dropout on,
# so the model's own randomness has to be restored too.
RUN = ["SOLVER.MAX_ITER", 9, "SOLVER.STEPS", "(6,)", "SOLVER.CHECKPOINT_PERIOD", 3, "DATALOADER.NUM_WORKERS", 1,
       "DATASETS.TEST", "()", "SEED", 7, "MODEL.HYBRID_DETR.DROPOUT", 0.1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return TinySetup(tmp_path_factory.mktemp("resume"))


def _train_iterations(output_dir):
    return [r["iteration"] for r in metrics(output_dir) if "total_loss" in r]


def _tensorboard_steps(output_dir, tag="total_loss"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(output_dir), purge_orphaned_data=True)
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def _wait_for_iteration(output_dir, iteration, proc, timeout=240):
    path = os.path.join(output_dir, "metrics.json")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, open(proc.log_path).read()[-4000:]
        if os.path.isfile(path):
            with open(path) as f:
                if any(json.loads(line).get("iteration", -1) >= iteration for line in f if line.strip()):
                    return
        time.sleep(0.05)
    raise AssertionError(f"iteration {iteration} not reached in {timeout}s")


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigkill_then_resume_gives_bit_identical_weights_and_clean_metrics(tiny, processes):
    """With 2 processes (gloo) each worker takes 1 image of the batch of 2; the whole process
    group (launcher and workers) is killed, as a scheduler would."""
    straight = os.path.join(tiny.root, f"straight{processes}")
    killed = os.path.join(tiny.root, f"killed{processes}")
    run = ["--num-gpus", processes, *RUN]
    env = tiny.env(TINY_WRITER_PERIOD=1)
    tiny.run(*run, "OUTPUT_DIR", straight, env=env)

    # Killed after iteration 6, i.e. after the checkpoint of iteration 5 and one more step.
    victim = tiny.start(*run, "OUTPUT_DIR", killed, env=tiny.env(TINY_WRITER_PERIOD=1, TINY_STEP_SLEEP=0.5))
    try:
        _wait_for_iteration(killed, 6, victim)
        os.killpg(victim.pid, signal.SIGKILL)
        assert victim.wait(timeout=60) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
    with open(os.path.join(killed, "last_checkpoint")) as f:
        assert f.read() == "model_0000005.pth"
    assert not os.path.exists(os.path.join(killed, "model_final.pth"))
    assert max(_train_iterations(killed)) >= 6  # records past the checkpoint, to be dropped

    log = tiny.run("--resume", *run, "OUTPUT_DIR", killed, env=env)
    assert "Resume: dropped" in log

    a = torch.load(os.path.join(straight, "model_final.pth"), weights_only=True)
    b = torch.load(os.path.join(killed, "model_final.pth"), weights_only=True)
    assert a["iteration"] == b["iteration"] == 8
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # Not equal by accident: the weights moved during training.
    initial = torch.load(os.path.join(straight, "model_0000002.pth"), weights_only=True)["model"]
    assert not all(torch.equal(initial[k], a["model"][k]) for k in a["model"])

    assert _train_iterations(killed) == _train_iterations(straight) == list(range(9))
    losses = {r["iteration"]: r["total_loss"] for r in metrics(straight) if "total_loss" in r}
    resumed = {r["iteration"]: r["total_loss"] for r in metrics(killed) if "total_loss" in r}
    # The records kept from before the kill are those of the uninterrupted run. (After the resume
    # the logged values are medians over a shorter history, so they are not compared.)
    assert all(resumed[i] == losses[i] for i in range(6))
    assert _tensorboard_steps(killed) == _tensorboard_steps(straight) == list(range(9))


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    checkpointer = HybridCheckpointer(model, str(tmp_path), save_to_disk=True)
    checkpointer.save("model_0000001")
    good = {k: v.clone() for k, v in model.state_dict().items()}

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # stands for the process being killed mid-write

    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000002")
    monkeypatch.undo()

    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (tmp_path / "model_0000002.pth").exists()
    fresh = torch.nn.Linear(3, 2)
    HybridCheckpointer(fresh, str(tmp_path)).resume_or_load("", resume=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, good[k])


def test_last_checkpoint_naming_a_missing_file_is_a_clear_error(tmp_path):
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    checkpointer = HybridCheckpointer(torch.nn.Linear(3, 2), str(tmp_path))
    with pytest.raises(RuntimeError, match=r"last_checkpoint names model_0000009\.pth, which does not exist"):
        checkpointer.resume_or_load("", resume=True)


def test_a_random_seed_is_taken_back_from_the_checkpoint(tiny, tmp_path):
    """SEED -1 draws a seed at the first start; --resume must reuse it (not draw another), or the
    data order and augmentations after the resume would differ."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    import train_net
    from hybrid_detr.config import load_config
    from hybrid_detr.data import register_synthetic_datasets
    from tiny_runs import PREFIX, SPLITS

    names = register_synthetic_datasets(root=tiny.datasets, prefix=PREFIX, **SPLITS)
    try:
        cfg = load_config(tiny.config, ["SEED", "-1", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path)])
        first, second = train_net.Trainer(cfg), train_net.Trainer(cfg)
        assert first.seed != second.seed
        first.iter = 0
        first.checkpointer.save("model_0000000")
        second.resume_or_load(resume=True)
        assert second.start_iter == 1 and second.seed == first.seed
        first.data_loader.batch_sampler.start_iter = 1
        a, b = next(iter(first.data_loader)), next(iter(second.data_loader))
        assert [x["image_id"] for x in a] == [x["image_id"] for x in b]
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
