"""tools/compare_modes.py (hybrid_detr.analysis.mode_comparison): reading runs, mean ± std over seeds, the table and the plot."""
import json
import os

import pytest

from hybrid_detr.analysis import mode_comparison as compare_modes


def _write_run(directory, evals, seconds_per_iter):
    """A metrics.json as detectron2 writes it: a row every 20 iterations, AP rows at evaluations."""
    directory.mkdir(parents=True)
    rows = []
    for it in range(19, 100, 20):
        rows.append({"iteration": it, "time": seconds_per_iter, "total_loss": 1.0})
        if it + 1 in evals and it + 1 < 100:
            rows.append({"iteration": it, "bbox/AP": evals[it + 1], "bbox/AP50": 2 * evals[it + 1]})
    if 100 in evals:  # the evaluation after training is logged at the step count
        rows.append({"iteration": 100, "bbox/AP": evals[100], "bbox/AP50": 2 * evals[100]})
    (directory / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_reads_evaluations_with_training_time(tmp_path):
    _write_run(tmp_path / "run", {40: 10.0, 100: 20.0}, 0.5)
    run = compare_modes.read_run(str(tmp_path / "run"))
    assert [e["iteration"] for e in run["evals"]] == [40, 100]
    assert run["evals"][0]["train_time_s"] == pytest.approx(40 * 0.5)
    assert run["evals"][1]["train_time_s"] == pytest.approx(100 * 0.5)
    assert run["evals"][1]["AP50"] == 40.0
    assert compare_modes.read_run(str(tmp_path / "missing"))["evals"] == []


def test_mean_and_std_over_seeds_only_where_every_seed_evaluated(tmp_path):
    _write_run(tmp_path / "a0", {40: 10.0, 100: 20.0}, 0.5)
    _write_run(tmp_path / "a1", {40: 14.0}, 0.5)  # still running: no evaluation at 100 yet
    _write_run(tmp_path / "b0", {40: 5.0, 100: 7.0}, 1.0)
    runs = {
        "deformable": {0: compare_modes.read_run(str(tmp_path / "a0")), 1: compare_modes.read_run(str(tmp_path / "a1"))},
        "dac": {0: compare_modes.read_run(str(tmp_path / "b0"))},
    }
    summary = compare_modes.summarize(runs)
    assert [r["iteration"] for r in summary["deformable"]] == [40]
    row = summary["deformable"][0]
    assert row["AP"] == pytest.approx(12.0) and row["AP_std"] == pytest.approx(2 ** 0.5 * 2)
    assert [r["AP"] for r in summary["dac"]] == [5.0, 7.0] and summary["dac"][0]["AP_std"] == 0.0
    table = compare_modes.format_table(summary, "header")
    assert "| deformable | 40 | 2 | 12.0 ± 2.8 |" in table
    png = tmp_path / "plot.png"
    compare_modes.plot(summary, str(png), title="test")
    assert png.stat().st_size > 10_000


def test_seeds_not_started_are_left_out_and_peak_rss_is_reported(tmp_path):
    _write_run(tmp_path / "a0", {40: 10.0, 100: 20.0}, 0.5)
    (tmp_path / "a0" / "run_info.json").write_text(json.dumps({"wall_s": 60.0, "peak_rss_mib": 512.0}))
    runs = {"deformable": {0: compare_modes.read_run(str(tmp_path / "a0")), 1: compare_modes.read_run(str(tmp_path / "none"))}}
    rows = compare_modes.summarize(runs)["deformable"]
    assert [(r["iteration"], r["seeds"]) for r in rows] == [(40, 1), (100, 1)]
    assert "peak_rss_mib" not in rows[0] and rows[-1]["peak_rss_mib"] == 512.0
    assert "| deformable | 100 | 1 | 20.0 ± 0.0 | 40.0 ± 0.0 | 50 ± 0 | 512 |" in compare_modes.format_table({"deformable": rows})


def test_a_run_records_its_own_peak_memory(tmp_path, monkeypatch):
    # A stand-in for train_net.py that holds ~200 MiB: the run's peak RSS is its own (not this
    # process's, which is larger), measured.
    script = tmp_path / "fake_train_net.py"
    script.write_text("import time\nblock = b'x' * (200 * 2**20)\ntime.sleep(3)\n")
    monkeypatch.setattr(compare_modes, "TRAIN_NET", str(script))
    compare_modes.train_run("unused.yaml", "deformable", 0, str(tmp_path / "run"), 200, 1, [], lambda m: None)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert 200 <= info["peak_rss_mib"] < 400


def test_report_only_trains_nothing(tmp_path, monkeypatch):
    _write_run(tmp_path / "out" / "deformable" / "seed0", {40: 10.0}, 0.5)
    monkeypatch.setattr(compare_modes, "train_run", lambda *a: pytest.fail("--report-only must not train"))
    summary = compare_modes.compare_modes("configs/quickstart/deformable_detr_r18_synthetic.yaml", ["deformable", "dac"],
                                          seeds=[0, 1], report_only=True, output=str(tmp_path / "out"))
    assert [r["AP"] for r in summary["deformable"]] == [10.0] and summary["dac"] == []
    assert (tmp_path / "out" / "compare_modes.png").is_file()


def test_long_mode_specs_get_distinct_short_folders(tmp_path):
    spec = "co_detr" + "".join(f"@MODEL.HYBRID_DETR.CO_DETR.ROI_FC_DIM={d}" for d in range(8))
    a, b = compare_modes.run_dir(str(tmp_path), spec, 0), compare_modes.run_dir(str(tmp_path), spec + "0", 0)
    assert a != b and all(len(os.path.basename(os.path.dirname(d))) <= 120 for d in (a, b))
    os.makedirs(a)  # a valid file name
    assert compare_modes.run_dir(str(tmp_path), "dac@MODEL.HYBRID_DETR.DAC.TOPK_PER_GT=4", 1).endswith(
        "dac__MODEL.HYBRID_DETR.DAC.TOPK_PER_GT-4/seed1")


def test_malformed_mode_spec_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="KEY=VALUE"):
        compare_modes.compare_modes("configs/quickstart/deformable_detr_r18_synthetic.yaml",
                                    ["co_detr@MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS"], output=str(tmp_path))
