"""tools/compare_modes.py (hybrid_detr.analysis.mode_comparison): reading runs, mean ± std over seeds, paired
differences with their confidence interval, evaluation noise, time to accuracy, the table and the plot."""
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


def test_t_interval_is_students_t():
    mean, half = compare_modes.t_interval([1.0, 2.0, 3.0])
    # t(0.975, 2 dof) = 4.3027, std 1, n 3
    assert mean == 2.0 and half == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-5)
    assert compare_modes.t_interval([5.0]) == (5.0, float("inf"))


def _runs(finals_by_mode, curves=None):
    """{mode: {seed: run}} whose final evaluation (at 100) has the given AP, with an optional earlier one."""
    runs = {}
    for mode, finals in finals_by_mode.items():
        runs[mode] = {}
        for seed, ap in enumerate(finals):
            if ap is None:  # this seed has not finished
                runs[mode][seed] = {"evals": [{"iteration": 50, "AP": 1.0, "AP50": 2.0}]}
                continue
            halfway = (curves or {}).get(mode, [a and a / 2 for a in finals])[seed]
            evals = [{"iteration": 50, "AP": halfway, "AP50": 2 * halfway}]
            evals.append({"iteration": 100, "AP": ap, "AP50": 2 * ap})
            runs[mode][seed] = {"evals": evals}
    return runs


def test_paired_differences_pair_seeds_and_give_a_verdict():
    # The mode is 1 AP better on every seed while the seeds themselves spread by 10 AP: paired, the
    # interval is tight and excludes 0 (unpaired, the spread would swamp it).
    runs = _runs({"base": [10.0, 20.0, 30.0], "mode": [11.0, 21.0, 31.5], "noisy": [12.0, 18.0, 31.0]})
    paired = compare_modes.paired_differences(runs, "base", 100)
    assert set(paired) == {"mode", "noisy"} and paired["mode"]["seeds"] == [0, 1, 2]
    ap = paired["mode"]["AP"]
    assert ap["diffs"] == pytest.approx([1.0, 1.0, 1.5]) and ap["mean"] == pytest.approx(7 / 6)
    assert 0 < ap["ci_low"] < ap["mean"] < ap["ci_high"] and ap["mode_mean"] == pytest.approx(21.1666, abs=1e-3)
    assert compare_modes._verdict(ap) == "better (CI excludes 0)"
    assert compare_modes._verdict(paired["noisy"]["AP"]) == "not established (CI includes 0)"
    table = compare_modes.format_paired(paired, "base")
    assert "| mode | 3 | 21.2 / 20.0 | +1.2 [" in table and "not established" in table


def test_paired_differences_use_only_seeds_both_finished():
    runs = _runs({"base": [10.0, 20.0, None], "mode": [9.0, None, 25.0]})
    paired = compare_modes.paired_differences(runs, "base", 100)["mode"]
    assert paired["seeds"] == [0] and paired["AP"]["diffs"] == [-1.0]
    assert compare_modes._verdict(paired["AP"]) == "one seed: no interval"


def test_crossing_iteration_interpolates_between_evaluations():
    evals = [{"iteration": 100, "AP": 10.0}, {"iteration": 200, "AP": 20.0}, {"iteration": 300, "AP": 15.0}]
    assert compare_modes.crossing_iteration(evals, 5.0) == pytest.approx(50.0)  # from AP 0 at iteration 0
    assert compare_modes.crossing_iteration(evals, 15.0) == pytest.approx(150.0)
    assert compare_modes.crossing_iteration(evals, 20.0) == pytest.approx(200.0)
    assert compare_modes.crossing_iteration(evals, 20.5) is None


def test_time_to_accuracy_is_crossing_times_interleaved_step_time():
    # Baseline reaches 20 at 100 (its final); the mode reaches 20 at 50 on both seeds, with a step twice
    # as expensive: the same wall-clock time, a 1.0x speed-up.
    runs = _runs({"base": [20.0, 20.0], "mode": [40.0, 40.0]}, curves={"base": [10.0, 10.0], "mode": [20.0, 20.0]})
    tta = compare_modes.time_to_accuracy(runs, "base", 100, {"base": 0.6, "mode": 1.2})
    assert tta["target_AP"] == 20.0
    mode = tta["modes"]["mode"]
    assert mode["iterations"] == {0: 50.0, 1: 50.0} and mode["reached"] == 2
    assert mode["minutes_mean"] == pytest.approx(50 * 1.2 / 60) and mode["speedup"] == pytest.approx(1.0)
    assert tta["modes"]["base"]["minutes_mean"] == pytest.approx(100 * 0.6 / 60)
    assert "| mode | 1.200 | 2 of 2 | 1.0 ± 0.0 | 1.00x |" in compare_modes.format_time_to_accuracy(tta, "base")


def test_evaluation_noise_from_folds_of_the_test_images(tmp_path):
    # 40 images with one object each; detections are right on half of them: each fold's AP varies with
    # how many of its images are right, and the standard error is their spread / sqrt(folds).
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in range(40)]
    annotations = [{"id": i + 1, "image_id": i, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0}
                   for i in range(40)]
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}))
    detections = [{"image_id": i, "category_id": 1, "bbox": [10, 10, 30, 30] if i % 2 else [60, 60, 30, 30], "score": 0.9}
                  for i in range(40)]
    results = tmp_path / "results.json"
    results.write_text(json.dumps(detections))
    noise = compare_modes.evaluation_noise(str(gt), str(results), folds=4, seed=1)
    assert noise["images"] == 40 and len(noise["fold_ap"]) == 4
    assert all(0 < ap < 100 for ap in noise["fold_ap"])
    import statistics

    assert noise["standard_error"] == pytest.approx(statistics.stdev(noise["fold_ap"]) / 2)
    results.write_text(json.dumps([dict(d, bbox=[10, 10, 30, 30]) for d in detections]))  # all right: no noise
    perfect = compare_modes.evaluation_noise(str(gt), str(results), folds=4)
    assert perfect["fold_ap"] == pytest.approx([100.0] * 4) and perfect["standard_error"] == 0.0


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
    assert "| deformable | 40 | 2 | 12.0 ± 2.8 |" in table and "AP (mean ± std)" in table
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
    report = (tmp_path / "out" / "compare_modes.md").read_text()
    assert "baseline `deformable`" in report and "| deformable | 40 | 1 |" in report
    assert [r["AP"] for r in summary["deformable"]] == [10.0] and summary["dac"] == []
    assert (tmp_path / "out" / "compare_modes.png").is_file()


def test_labels_name_the_modes_in_the_report_while_folders_keep_the_spec(tmp_path, monkeypatch):
    spec = "co_detr@MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS=1"
    _write_run(tmp_path / "out" / "deformable" / "seed0", {40: 10.0}, 0.5)
    _write_run(tmp_path / "out" / os.path.basename(os.path.dirname(compare_modes.run_dir("", spec, 0))) / "seed0",
               {40: 12.0}, 0.5)
    monkeypatch.setattr(compare_modes, "train_run", lambda *a: pytest.fail("--report-only must not train"))
    summary = compare_modes.compare_modes("configs/quickstart/deformable_detr_r18_synthetic.yaml", [spec, "deformable"],
                                          seeds=[0], report_only=True, output=str(tmp_path / "out"),
                                          baseline="deformable", labels=["co_detr_k1", "baseline"])
    assert [r["AP"] for r in summary["co_detr_k1"]] == [12.0] and [r["AP"] for r in summary["baseline"]] == [10.0]
    report = (tmp_path / "out" / "compare_modes.md").read_text()
    assert "| co_detr_k1 | 40 | 1 |" in report and "baseline `baseline`" in report and "NUM_AUX_HEADS" not in report
    saved = json.loads((tmp_path / "out" / "compare_modes.json").read_text())
    assert saved["modes"] == {"co_detr_k1": spec, "baseline": "deformable"}
    with pytest.raises(ValueError, match="one per mode"):
        compare_modes.compare_modes("configs/quickstart/deformable_detr_r18_synthetic.yaml", [spec, "deformable"],
                                    seeds=[0], report_only=True, output=str(tmp_path / "out"), labels=["x"])


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
