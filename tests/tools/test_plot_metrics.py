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


def _plotted_figure(monkeypatch, *args, **kwargs):
    """plot_metrics(*args, **kwargs) and the figure it drew (kept when it closes it)."""
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    png = plot_metrics(*args, **kwargs)
    assert len(figures) == 1
    return png, figures[0]


def _lines(ax):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}


def test_the_panels_show_the_logged_values(tmp_path, monkeypatch):
    write_metrics(tmp_path / "metrics.json")
    records = read_metrics(str(tmp_path / "metrics.json"))
    png, fig = _plotted_figure(monkeypatch, str(tmp_path))
    assert png == str(tmp_path / "metrics.png") and Image.open(png).size == (1600, 500)
    total, terms, ap = fig.axes
    iterations = [r["iteration"] for r in records]
    assert _lines(total) == {"total_loss": (iterations, [r["total_loss"] for r in records])}
    # every last-layer term, none of the per-layer ones; the resumed run's later values win
    shown = _lines(terms)
    assert sorted(shown) == ["dac_loss_class", "enc_loss_class", "loss_bbox", "loss_class", "loss_giou"]
    assert shown["loss_class"] == (iterations, [r["loss_class"] for r in records]) and shown["loss_class"][1][-1] == 0.5
    assert terms.get_yscale() == "log"
    evaluated = [r for r in records if "bbox/AP" in r]
    assert len(evaluated) == 3
    assert _lines(ap) == {key: ([r["iteration"] for r in evaluated], [r[key] for r in evaluated])
                          for key in ("bbox/AP", "bbox/AP50", "bbox/AP75")}
    assert "last: bbox/AP = 19.7 at iter 59" in ap.get_title()


def test_plot_metrics_tool_writes_the_same_png(tmp_path):
    # The tool itself, as a user runs it (the installed package, no path set up for it): it prints the PNG's
    # path, and the PNG is the library's drawing of the same file.
    write_metrics(tmp_path / "metrics.json")
    run = subprocess.run([sys.executable, TOOL, str(tmp_path)], capture_output=True, text=True, check=True)
    png = run.stdout.strip()
    assert png == str(tmp_path / "metrics.png")
    tool_pixels = np.asarray(Image.open(png).convert("RGB"))
    plot_metrics(str(tmp_path), str(tmp_path / "library.png"), title=f"training curves: {tmp_path / 'metrics.json'}")
    assert np.array_equal(tool_pixels, np.asarray(Image.open(tmp_path / "library.png").convert("RGB")))


def test_plot_metrics_without_evaluation(tmp_path, monkeypatch):
    with open(tmp_path / "metrics.json", "w") as f:
        for it in range(3):
            f.write(json.dumps({"iteration": it, "total_loss": 3.0 - it, "loss_class": 1.0}) + "\n")
    png, fig = _plotted_figure(monkeypatch, str(tmp_path / "metrics.json"), str(tmp_path / "c.png"))
    assert Image.open(png).size == (1600, 500)
    total, terms, ap = fig.axes
    assert _lines(total) == {"total_loss": ([0, 1, 2], [3.0, 2.0, 1.0])}
    assert _lines(terms) == {"loss_class": ([0, 1, 2], [1.0, 1.0, 1.0])}
    assert len(ap.lines) == 0 and "no evaluation in metrics.json" in ap.texts[0].get_text()
