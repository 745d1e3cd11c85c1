"""tools/compare_modes.py: reading runs, mean ± std over seeds, the table and the plot."""
import json

import pytest

from model_helpers import load_tool

compare_modes = load_tool("compare_modes")


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


def test_malformed_mode_spec_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="KEY=VALUE"):
        compare_modes.main(["--config-file", "configs/quickstart/deformable_detr_r18_synthetic.yaml",
                            "--modes", "co_detr@MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS", "--output", str(tmp_path)])
