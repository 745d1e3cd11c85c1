"""Several decoder modes trained side by side, several seeds each, their AP over training compared
(behind tools/compare_modes.py).

Each (mode, seed) is one `train_net.py` run in its own process and output folder (`OUTPUT/<mode>/seed<s>`,
`run_dir`), with `OMP_NUM_THREADS=threads`, at most `parallel` at a time, evaluating COCO AP on the
config's test set every `eval_period` iterations and at the end. A mode may carry config overrides after
"@" (KEY=VALUE pairs joined by "@"). A run already finished (its `metrics.json` has the final evaluation)
is not run again, so an interrupted comparison resumes.

Written to OUTPUT: `compare_modes.json` (every evaluation of every run), `compare_modes.md` (AP and AP50,
mean ± std over seeds at every evaluated iteration, and the training time), `compare_modes.png` (AP
against iteration and against training time, one line per mode, the band one std). A seed not started
yet is left out of its mode's rows (`report_only` writes the table and PNG of the runs so far without
training). Peak RSS: each finished run's peak resident memory (its training process's VmHWM, polled every
second), in `run_info.json` beside its metrics. Training time is the sum of the per-iteration times
detectron2 logs (`time` in metrics.json), evaluation excluded.
"""
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

from ..config import load_config, mode_spec_overrides
from .measurement import peak_rss_bytes

__all__ = ["run_dir", "read_run", "summarize", "format_table", "plot", "train_run", "compare_modes"]

_PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_NET = os.path.join(_PROJECT, "train_net.py")
ROOT = os.path.dirname(os.path.dirname(_PROJECT))  # the repository: config paths are reported relative to it


def run_dir(output: str, spec: str, seed: int) -> str:
    safe = spec.replace("@", "__").replace("=", "-").replace("/", "_")
    if len(safe) > 120:  # a file name has at most 255 bytes: keep a readable head and a digest of the rest
        safe = safe[:100] + "-" + hashlib.sha1(spec.encode()).hexdigest()[:12]
    return os.path.join(output, safe, f"seed{seed}")


def read_run(directory: str) -> Dict:
    """The evaluations of one run from its metrics.json: {"evals": [{iteration, train_time_s, AP, AP50}],
    "max_iter_logged": last training iteration logged}. `iteration` counts the steps done."""
    path = os.path.join(directory, "metrics.json")
    if not os.path.isfile(path):
        return {"evals": [], "max_iter_logged": -1}
    evals, train_time, last_step = [], 0.0, -1
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            row = json.loads(line)
            iteration = row.get("iteration", -1)
            if "time" in row and iteration > last_step:
                train_time += (iteration - last_step) * row["time"]  # time: seconds per iteration
                last_step = iteration
            if "bbox/AP" in row:
                evals.append({"iteration": iteration, "train_time_s": train_time, "AP": row["bbox/AP"], "AP50": row["bbox/AP50"]})
    # An evaluation during training is logged at the index of the step it follows (199 after 200
    # steps), the one after training at the step count (MAX_ITER): both become steps done.
    for e in evals:
        e["iteration"] = min(e["iteration"] + 1, last_step + 1)
    run = {"evals": evals, "max_iter_logged": last_step}
    info = os.path.join(directory, "run_info.json")
    if os.path.isfile(info):
        with open(info) as f:
            run["peak_rss_mib"] = json.load(f)["peak_rss_mib"]
    return run


def summarize(runs: Dict[str, Dict[int, Dict]]) -> Dict[str, List[Dict]]:
    """Per mode: for every iteration evaluated in all its seeds, mean and std of AP / AP50 / time."""
    summary = {}
    for spec, seeds in runs.items():
        seeds = {seed: run for seed, run in seeds.items() if run["evals"]}  # not started: left out
        by_iter: Dict[int, List[Dict]] = {}
        for run in seeds.values():
            for e in run["evals"]:
                by_iter.setdefault(e["iteration"], []).append(e)
        rows = []
        for iteration in sorted(by_iter):
            evals = by_iter[iteration]
            if len(evals) != len(seeds):
                continue  # a seed has not reached this evaluation yet
            row = {"iteration": iteration, "seeds": len(evals)}
            for key in ("AP", "AP50", "train_time_s"):
                values = [e[key] for e in evals]
                row[key] = statistics.fmean(values)
                row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            rows.append(row)
        rss = [run["peak_rss_mib"] for run in seeds.values() if "peak_rss_mib" in run]
        if rows and len(rss) == rows[-1]["seeds"]:
            rows[-1]["peak_rss_mib"] = statistics.fmean(rss)  # of the whole run, on its last row
        summary[spec] = rows
    return summary


def format_table(summary: Dict[str, List[Dict]], header: str = "") -> str:
    lines = [header] if header else []
    lines += [
        "| mode | iteration | seeds | AP | AP50 | training time (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec, rows in summary.items():
        for r in rows:
            rss = f"{r['peak_rss_mib']:.0f}" if "peak_rss_mib" in r else ""
            lines.append(
                f"| {spec} | {r['iteration']} | {r['seeds']} | {r['AP']:.1f} ± {r['AP_std']:.1f} | "
                f"{r['AP50']:.1f} ± {r['AP50_std']:.1f} | {r['train_time_s']:.0f} ± {r['train_time_s_std']:.0f} | {rss} |"
            )
    return "\n".join(lines)


def short_label(spec: str, width: int = 60) -> str:
    """A legend label: the spec without the MODEL.HYBRID_DETR. prefixes, cut to `width` characters."""
    label = spec.replace("MODEL.HYBRID_DETR.", "")
    return label if len(label) <= width else label[: width - 3] + "..."


def plot(summary: Dict[str, List[Dict]], path: str, title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows_of_legend = (len(summary) + 1) // 2
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5 + 0.3 * rows_of_legend))
    for spec, rows in summary.items():
        if not rows:
            continue
        ap = [r["AP"] for r in rows]
        std = [r["AP_std"] for r in rows]
        low = [a - s for a, s in zip(ap, std)]
        high = [a + s for a, s in zip(ap, std)]
        for ax, x in zip(axes, ([r["iteration"] for r in rows], [r["train_time_s"] / 60 for r in rows])):
            label = f"{short_label(spec)} ({rows[0]['seeds']} seed{'s' if rows[0]['seeds'] > 1 else ''})"
            (line,) = ax.plot(x, ap, marker="o", label=label)
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("training time (min, evaluation excluded)")
    for ax in axes:
        ax.set_ylabel("box AP (mean ± std over seeds)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.subplots_adjust(bottom=0.12 + 0.05 * rows_of_legend, top=0.9, wspace=0.25)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_run(config_file, spec, seed, directory, eval_period, threads, extra_opts, log):
    opts = mode_spec_overrides(spec) + ["SEED", str(seed), "OUTPUT_DIR", directory, "TEST.EVAL_PERIOD", str(eval_period)]
    cmd = [sys.executable, TRAIN_NET, "--config-file", config_file] + opts + list(extra_opts)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    os.makedirs(directory, exist_ok=True)
    start = time.time()
    with open(os.path.join(directory, "compare_modes.log"), "w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        # VmHWM of the training process itself, polled: wait4's ru_maxrss would also count the memory
        # of this (forking) process before the exec.
        peak_rss = 0
        while process.poll() is None:
            peak_rss = max(peak_rss, peak_rss_bytes(process.pid))
            time.sleep(1.0)
    wall = time.time() - start
    log(f"{spec} seed {seed}: exit {process.returncode} after {wall:.0f} s ({directory})")
    if process.returncode == 0:
        with open(os.path.join(directory, "run_info.json"), "w") as f:
            json.dump({"wall_s": wall, "peak_rss_mib": peak_rss / 2**20}, f)
    else:
        raise RuntimeError(f"training {spec} seed {seed} failed: see {directory}/compare_modes.log")


def _train_or_log(config_file, spec, seed, directory, eval_period, threads, extra_opts, log):
    """`train_run`, logging a failure when it happens (the pool raises it only after the runs before it)."""
    try:
        train_run(config_file, spec, seed, directory, eval_period, threads, extra_opts, log)
    except Exception as error:
        log(f"{spec} seed {seed}: FAILED: {error}")
        raise


def compare_modes(config_file, modes, seeds=(0, 1, 2), eval_period=200, parallel=2, threads=1,
                  output="output/compare_modes", report_only=False, opts=()):
    """Trains what is missing of every (mode, seed), then writes and prints the comparison (see the
    module docstring); returns the summary ({mode: rows})."""
    seeds, opts = list(seeds), list(opts)
    if len(set(modes)) != len(modes):
        raise ValueError(f"--modes must be distinct, got {modes}")
    for spec in modes:
        mode_spec_overrides(spec)  # fail on a malformed entry before any training
    max_iter = load_config(config_file, opts).SOLVER.MAX_ITER

    def log(message):
        print(f"[compare_modes] {message}", flush=True)

    jobs = []
    for seed in seeds:  # seeds outermost: the first results cover every mode
        for spec in modes:
            directory = run_dir(output, spec, seed)
            done = read_run(directory)
            if report_only:
                continue
            if done["evals"] and done["evals"][-1]["iteration"] == max_iter:
                log(f"{spec} seed {seed}: already done ({directory})")
                continue
            jobs.append((spec, seed, directory))
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = [
            pool.submit(_train_or_log, config_file, spec, seed, d, eval_period, threads, opts, log)
            for spec, seed, d in jobs
        ]
        for future in futures:
            future.result()

    runs = {spec: {seed: read_run(run_dir(output, spec, seed)) for seed in seeds} for spec in modes}
    summary = summarize(runs)
    header = (
        f"{os.path.relpath(config_file, ROOT) if os.path.isabs(config_file) else config_file}, "
        f"{max_iter} iterations, seeds {seeds}, {threads} thread(s) per run, {parallel} at a time"
    )
    table = format_table(summary, header)
    print(table)
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "compare_modes.json"), "w") as f:
        json.dump({"config_file": config_file, "max_iter": max_iter, "runs": runs, "summary": summary}, f, indent=2)
    with open(os.path.join(output, "compare_modes.md"), "w") as f:
        f.write(table + "\n")
    plot(summary, os.path.join(output, "compare_modes.png"), title=header)
    log(f"wrote {output}/compare_modes.{{json,md,png}}")
    return summary
