"""Distributed training on CPU (gloo): 2 processes x 2 images == 1 process x 4 images for every
decoder mode; train_net.py with --num-gpus 2, with two "machines" on localhost, and --eval-only
on 2 processes giving what 1 process gives."""
import os
import socket
import subprocess
import sys

import pytest
import torch

import distributed_helpers
from tiny_runs import TinySetup, bbox_results, metrics

HERE = os.path.dirname(os.path.abspath(__file__))


def _assert_same_step(one, two, mode):
    assert one["unused"] == [] and two["unused"] == [], "parameters without gradient break DDP"
    assert one["losses"].keys() == two["losses"].keys()
    for name, value in one["losses"].items():
        assert two["losses"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (mode, name)
    assert one["grad"].keys() == two["grad"].keys()
    # Summation order differs between 1 and 2 workers: tolerance relative to the tensor's largest
    # gradient, plus a floor for gradients that are zero up to rounding (SMCA's key bias).
    floor = 1e-6 * max(g.abs().max().item() for g in one["grad"].values())
    nonzero = 0
    for name, g1 in one["grad"].items():
        g2 = two["grad"][name]
        scale = g1.abs().max().item()
        nonzero += scale > floor
        assert (g1 - g2).abs().max().item() <= 1e-4 * scale + floor, (mode, name, scale)
        u1, u2 = one["update"][name], two["update"][name]  # SGD, lr 1: -grad, rounded into the weight
        assert torch.allclose(u1, u2, rtol=0, atol=1e-4 * scale + floor + 1e-6), (mode, name)
    assert nonzero > 0.9 * len(one["grad"])  # the comparison is not between zeros


def test_two_processes_of_two_images_equal_one_process_of_four(tmp_path):
    """Losses (averaged over workers, as logged) and gradients / SGD updates for deformable, dac,
    smca and co_detr (ATSS + Faster R-CNN); the workers hold 3 and 7 boxes, so the losses are only
    equal if the normalisers are averaged across workers."""
    out = tmp_path / "two.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "distributed_helpers.py"), "2", str(out)],
                          capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    two = torch.load(out, weights_only=False)
    one = distributed_helpers.one_step()
    assert set(one) == set(two) == {"deformable", "dac", "smca", "co_detr"}
    assert any(k.startswith("co_rcnn_") for k in one["co_detr"]["losses"])
    assert any(k.startswith("co_atss_") for k in one["co_detr"]["losses"])
    for mode in one:
        _assert_same_step(one[mode], two[mode], mode)


def test_equivalence_check_catches_per_worker_normalisation(monkeypatch):
    """The comparison above is sensitive: normalising by this worker's boxes instead of the
    workers' average (what a missing all-reduce does) changes the 2-process losses."""
    import hybrid_detr.modeling.meta_arch as meta_arch

    one = distributed_helpers.one_step(("deformable",))["deformable"]
    per_worker = {}
    for rank in (0, 1):  # the two halves of the batch, each normalised by its own boxes
        monkeypatch.setattr(distributed_helpers.comm, "get_rank", lambda r=rank: r)
        monkeypatch.setattr(distributed_helpers.comm, "get_world_size", lambda: 2)
        monkeypatch.setattr(distributed_helpers.comm, "all_gather", lambda v: [v, v])
        monkeypatch.setattr(meta_arch, "num_boxes_across_workers",
                            lambda targets, device: max(float(sum(len(t["labels"]) for t in targets)), 1.0))
        monkeypatch.setattr(distributed_helpers, "create_ddp_model", lambda m, **kw: m)
        per_worker[rank] = distributed_helpers.one_step(("deformable",))["deformable"]["losses"]
    mean = {k: (per_worker[0][k] + per_worker[1][k]) / 2 for k in one["losses"]}
    assert mean["loss_bbox"] != pytest.approx(one["losses"]["loss_bbox"], rel=1e-2)


def test_a_nan_on_one_worker_stops_every_worker(tmp_path):
    out = tmp_path / "nan"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "distributed_helpers.py"), "2", str(out), "nan"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    messages = [(tmp_path / f"nan.{rank}").read_text() for rank in (0, 1)]
    assert messages[0] == messages[1]
    assert "Non-finite training values at iteration 17" in messages[0]
    assert "worker 1, image ids [102, 103]: loss_bbox=nan" in messages[0]
    assert "worker 0" not in messages[0]


# ------------------------------------------------------------------------------------------------
# train_net.py end to end
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return TinySetup(tmp_path_factory.mktemp("distributed"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def two_process_run(tiny):
    out = os.path.join(tiny.root, "num_gpus_2")
    log = tiny.run("--num-gpus", 2, "--dist-url", "auto", "SOLVER.MAX_ITER", 2, "SOLVER.STEPS", "(1,)", "SOLVER.IMS_PER_BATCH", 4, "DATASETS.TEST", "()",
                   "OUTPUT_DIR", out)
    return out, log


@pytest.mark.slow
def test_num_gpus_2_on_a_cpu_trains_with_gloo(two_process_run):
    out, log = two_process_run
    assert "DistributedDataParallel over 2 processes (gloo, cpu)" in log
    records = [r for r in metrics(out) if "total_loss" in r]
    assert [r["iteration"] for r in records] == [1]
    assert torch.isfinite(torch.tensor(records[-1]["total_loss"]))
    assert os.path.isfile(os.path.join(out, "model_final.pth"))


@pytest.mark.slow
def test_two_machines_on_localhost_train_like_two_local_processes(tiny, two_process_run):
    """--num-machines 2 --machine-rank R --dist-url tcp://...: two "machines" of one process each
    make the same world of 2 as --num-gpus 2, so they end with the same weights."""
    out = os.path.join(tiny.root, "two_machines")
    url = f"tcp://127.0.0.1:{_free_port()}"
    common = ["--num-gpus", 1, "--num-machines", 2, "--dist-url", url, "SOLVER.MAX_ITER", 2,
              "SOLVER.STEPS", "(1,)", "SOLVER.IMS_PER_BATCH", 4, "DATASETS.TEST", "()", "OUTPUT_DIR", out]
    procs = [tiny.start("--machine-rank", r, *common) for r in (0, 1)]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [open(p.log_path).read() for p in procs]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    reference = _weights(os.path.join(two_process_run[0], "model_final.pth"))
    weights = _weights(os.path.join(out, "model_final.pth"))
    assert reference.keys() == weights.keys()
    for k in reference:
        assert torch.allclose(reference[k], weights[k], rtol=1e-5, atol=1e-7), k


@pytest.mark.slow
def test_eval_only_on_two_processes_gives_the_results_of_one(tiny, two_process_run):
    weights = os.path.join(two_process_run[0], "model_final.pth")
    results = {}
    for n in (1, 2):
        out = os.path.join(tiny.root, f"eval_{n}")
        log = tiny.run("--eval-only", "--num-gpus", n, "--dist-url", "auto", "MODEL.WEIGHTS", weights, "OUTPUT_DIR", out)
        assert "copypaste: AP,AP50,AP75" in log
        ap_line = log[log.index("copypaste: AP,AP50,AP75"):].splitlines()[1]
        results[n] = (ap_line.split("copypaste: ")[1], bbox_results(out))
    assert results[1][0] == results[2][0]  # the AP row
    dets1, dets2 = results[1][1], results[2][1]
    assert len(dets1) == len(dets2) > 0
    assert {d["image_id"] for d in dets1} == {d["image_id"] for d in dets2} == {1, 2, 3, 4}
    for a, b in zip(dets1, dets2):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)


@pytest.mark.slow
def test_batch_that_does_not_divide_among_two_processes_is_refused_by_both(tiny):
    proc = subprocess.run(tiny.command("--num-gpus", 2, "--dist-url", "auto", "SOLVER.IMS_PER_BATCH", 3, "OUTPUT_DIR",
                                       os.path.join(tiny.root, "odd_batch")),
                          capture_output=True, text=True, timeout=300, env=tiny.env())
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "SOLVER.IMS_PER_BATCH (3) is the total batch over all workers and must be a positive multiple of " \
           "the number of workers (2)" in out
    assert "Starting training from iteration" not in out
