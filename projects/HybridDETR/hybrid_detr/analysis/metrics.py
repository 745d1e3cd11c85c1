"""Training curves from detectron2's `metrics.json` (one JSON object per line, written by its
JSONWriter): the loss terms and the evaluation's AP over iterations, as one PNG."""
import json
import math
import os
import re
from typing import Dict, List, Optional

__all__ = ["read_metrics", "loss_terms", "ap_keys", "plot_metrics"]

_AUX_LAYER = re.compile(r"_\d+$")  # loss_class_0 ...: the decoder's intermediate layers


def read_metrics(path: str) -> List[Dict]:
    """The records of a metrics.json, by iteration; a resumed run's later record of an iteration
    replaces the earlier one (training and evaluation records of one iteration are merged).
    A truncated last line (a run still writing) is skipped."""
    by_iteration: Dict[int, Dict] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "iteration" not in record:
                continue
            by_iteration.setdefault(int(record["iteration"]), {}).update(record)
    return [by_iteration[i] for i in sorted(by_iteration)]


def loss_terms(records: List[Dict]) -> List[str]:
    """Loss names to plot: total_loss and every last-layer term (per-layer `_<i>` terms left out)."""
    names = {k for r in records for k in r if k.startswith("loss") or "_loss" in k}
    names = sorted(n for n in names if not _AUX_LAYER.search(n) and n != "total_loss")
    return (["total_loss"] if any("total_loss" in r for r in records) else []) + names


def ap_keys(records: List[Dict]) -> List[str]:
    """bbox/AP, bbox/AP50, bbox/AP75 (whichever were logged), then any other */AP."""
    keys = {k for r in records for k in r if re.fullmatch(r"[^/]+/AP(50|75)?", k)}
    preferred = [k for k in ("bbox/AP", "bbox/AP50", "bbox/AP75") if k in keys]
    return preferred + sorted(keys - set(preferred))


def _series(records, key):
    points = [(r["iteration"], r[key]) for r in records if key in r and isinstance(r[key], (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_metrics(output_dir_or_file: str, png: Optional[str] = None, title: Optional[str] = None) -> str:
    """Writes the curves of `OUTPUT_DIR/metrics.json` (or the given file) to `png` (default:
    metrics.png next to it). Three panels: total loss, the loss terms, AP. Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = output_dir_or_file
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics.json at {path} (detectron2 writes it to OUTPUT_DIR while training)")
    records = read_metrics(path)
    if not records:
        raise ValueError(f"{path} holds no records with an iteration")
    png = png or os.path.join(os.path.dirname(os.path.abspath(path)), "metrics.png")

    terms = loss_terms(records)
    aps = ap_keys(records)
    fig, axes = plt.subplots(1, 3, figsize=(16, 5), dpi=100)
    ax_total, ax_terms, ax_ap = axes

    x, y = _series(records, "total_loss")
    if x:
        ax_total.plot(x, y, color="black", linewidth=1.5, label="total_loss")
        ax_total.legend(fontsize=9)
    else:
        ax_total.text(0.5, 0.5, "no total_loss logged", ha="center", va="center", transform=ax_total.transAxes)
    ax_total.set_title("total loss (sum of every weighted term)", fontsize=11)

    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(t for t in terms if t != "total_loss"):
        x, y = _series(records, name)
        if x:
            ax_terms.plot(x, y, color=cmap(i % 20), linewidth=1.2, label=name)
    positive = any(v > 0 for t in terms for v in _series(records, t)[1])
    if positive:
        ax_terms.set_yscale("log")
    ax_terms.set_title("loss terms (last decoder layer; per-layer aux terms omitted)", fontsize=11)
    if ax_terms.lines:
        ax_terms.legend(fontsize=8, ncol=2 if len(ax_terms.lines) > 6 else 1, loc="best")

    markers = ["o", "s", "^", "D", "v", "x"]
    for i, key in enumerate(aps):
        x, y = _series(records, key)
        y = [v if not (isinstance(v, float) and math.isnan(v)) else None for v in y]
        ax_ap.plot(x, y, marker=markers[i % len(markers)], linewidth=1.5, label=key)
    if aps:
        ax_ap.legend(fontsize=9)
        last = next(r for r in reversed(records) if aps[0] in r)
        ax_ap.set_title(f"evaluation AP (last: {aps[0]} = {last[aps[0]]:.1f} at iter {last['iteration']})", fontsize=11)
    else:
        ax_ap.text(0.5, 0.5, "no evaluation in metrics.json\n(TEST.EVAL_PERIOD or the final evaluation)",
                   ha="center", va="center", transform=ax_ap.transAxes, fontsize=10)
        ax_ap.set_title("evaluation AP", fontsize=11)

    for ax, ylabel in ((ax_total, "loss"), (ax_terms, "loss (log scale)" if positive else "loss"), (ax_ap, "AP (%)")):
        ax.set_xlabel("iteration", fontsize=10)
        ax.set_ylabel(ylabel, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=9)
    fig.suptitle(title or f"training curves: {path}", fontsize=12)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png
