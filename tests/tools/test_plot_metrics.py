"""tools/plot_metrics.py (hybrid_detr.analysis.metrics): loss terms and AP over iterations from detectron2's
metrics.json."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from hybrid_detr.analysis.metrics import ap_keys, loss_terms, plot_metrics, read_metrics

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools", "plot_metrics.py")


def write_metrics(path, iterations=60, eval_every=20):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for it in range(4, iterations, 5):
            record = {"iteration": it, "lr": 4e-4, "time": 0.5, "data_time": 0.01}
            terms = {}
            for name in ("loss_class", "loss_bbox", "loss_giou", "enc_loss_class", "dac_loss_class"):
                terms[name] = float(2.0 * np.exp(-it / 40) + 0.1 * rng.random())
                terms[f"{name}_0"] = terms[name] * 1.1  # an intermediate layer: not plotted
            record.update(terms)
            record["total_loss"] = sum(terms.values())
            f.write(json.dumps(record) + "\n")
            if (it + 1) % eval_every == 0:
                f.write(json.dumps({"iteration": it, "bbox/AP": it / 3, "bbox/AP50": it / 2, "bbox/AP75": it / 4,
                                    "bbox/APs": 1.0}) + "\n")
        # a resumed run logs iteration 59 again; a run still writing leaves a truncated line
        f.write(json.dumps({"iteration": 59, "total_loss": 1.0, "loss_class": 0.5}) + "\n")
        f.write('{"iteration": 64, "total_lo')


def test_read_metrics_merges_and_skips_truncated(tmp_path):
    path = tmp_path / "metrics.json"
    write_metrics(path)
    records = read_metrics(str(path))
    assert [r["iteration"] for r in records] == list(range(4, 60, 5))
    assert records[-1]["total_loss"] == 1.0 and "bbox/AP" in records[-1]  # merged, later value wins
    assert "loss_class_0" not in loss_terms(records) and "dac_loss_class" in loss_terms(records)
    assert loss_terms(records)[0] == "total_loss"
    assert ap_keys(records) == ["bbox/AP", "bbox/AP50", "bbox/AP75"]


def test_plot_metrics_writes_png(tmp_path):
    # The tool itself, as a user runs it (the installed package, no path set up for it): it prints the PNG's path.
    write_metrics(tmp_path / "metrics.json")
    run = subprocess.run([sys.executable, TOOL, str(tmp_path)], capture_output=True, text=True, check=True)
    png = run.stdout.strip()
    assert png == str(tmp_path / "metrics.png")
    image = Image.open(png)
    assert image.format == "PNG" and image.size == (1600, 500)
    assert np.asarray(image.convert("L")).std() > 10  # something is drawn


def test_plot_metrics_without_evaluation(tmp_path):
    with open(tmp_path / "metrics.json", "w") as f:
        for it in range(3):
            f.write(json.dumps({"iteration": it, "total_loss": 3.0 - it, "loss_class": 1.0}) + "\n")
    png = plot_metrics(str(tmp_path / "metrics.json"), str(tmp_path / "c.png"))
    assert Image.open(png).size == (1600, 500)
