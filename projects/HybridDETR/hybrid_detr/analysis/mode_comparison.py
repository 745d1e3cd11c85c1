"""Several decoder modes trained side by side, several seeds each, compared as paired experiments
(behind tools/compare_modes.py).

Each (mode, seed) is one `train_net.py` run in its own process and output folder (`OUTPUT/<mode>/seed<s>`,
`run_dir`), with `OMP_NUM_THREADS=threads`, at most `parallel` at a time, evaluating COCO AP on the
config's test set every `eval_period` iterations and at the end. A mode may carry config overrides after
"@" (KEY=VALUE pairs joined by "@"). A run already finished (its `metrics.json` has the final evaluation)
is not run again, so an interrupted comparison resumes.

The protocol: for a given seed every mode is a paired experiment against the baseline mode (the first
one unless named).
- Same data: the training loader is a pure function of (seed, sample position) (`data/loader.py`), so
  every mode sees the same images and augmentations; `pairing_check` confirms it on the first batches.
- Same initial weights for the shared parts: the baseline's model is built from the seed and saved
  (`OUTPUT/init/seed<s>.pth`); every run of that seed starts from it (`MODEL.WEIGHTS`), so the parts a mode
  shares with the baseline (same name and shape) start identical, and its own parts (a denoising label
  embedding, auxiliary heads) are initialised as usual. `pairing_check` counts the shared tensors.
- Reported: each mode's mean AP, and the mean paired difference to the baseline with its 95% confidence
  interval (Student t over the seeds). A difference is "reproduced" only when the interval excludes 0.
- Noise: the evaluation's own noise (the standard error of a run's final AP over the test images, from
  the AP of `eval_folds` random disjoint folds of them) next to the seed-to-seed noise.
- Time to accuracy: the training time each mode needs to reach the baseline's final mean AP: the
  iteration where its AP curve crosses it (linear between evaluations) times its step time measured
  interleaved with the others' in one process (`step_cost.compare_step_cost`, the same batches, rotating
  order), so that the machine's load does not enter.

Written to OUTPUT: `compare_modes.json` (every evaluation of every run, the pairing check, step costs,
noise, paired differences, time to accuracy), `compare_modes.md` (the tables) and `compare_modes.png` (AP
against iteration and against the interleaved-step-time estimate of training time; the band is the 95%
confidence interval of the mean where there are several seeds). A seed not started yet is left out
(`report_only` writes the tables and PNG of the runs so far without training). Peak RSS: each finished
run's peak resident memory (its training process's VmHWM, polled every second), in `run_info.json`.
Logged training time is the sum of the per-iteration times detectron2 logs (`time` in metrics.json),
evaluation excluded.
"""
import hashlib
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

from ..config import load_config, mode_spec_overrides
from .measurement import peak_rss_bytes

CONFIDENCE = 0.95

__all__ = [
    "run_dir",
    "read_run",
    "t_interval",
    "summarize",
    "format_table",
    "paired_differences",
    "format_paired",
    "evaluation_noise",
    "crossing_iteration",
    "time_to_accuracy",
    "format_time_to_accuracy",
    "plot",
    "write_shared_init",
    "pairing_check",
    "train_run",
    "compare_modes",
]

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


def t_interval(values, confidence=CONFIDENCE):
    """(mean, half-width of the `confidence` interval of the mean, Student t); the half-width is inf for
    fewer than two values."""
    from scipy import stats

    values = list(values)
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("inf")
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, float(half)


def summarize(runs: Dict[str, Dict[int, Dict]]) -> Dict[str, List[Dict]]:
    """Per mode: for every iteration evaluated in all its seeds, mean, std and the 95% CI half-width of
    the mean of AP / AP50 / logged training time."""
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
                row[key + "_ci"] = t_interval(values)[1]
            rows.append(row)
        rss = [run["peak_rss_mib"] for run in seeds.values() if "peak_rss_mib" in run]
        if rows and len(rss) == rows[-1]["seeds"]:
            rows[-1]["peak_rss_mib"] = statistics.fmean(rss)  # of the whole run, on its last row
        summary[spec] = rows
    return summary


def format_table(summary: Dict[str, List[Dict]], header: str = "") -> str:
    lines = [header] if header else []
    lines += [
        "| mode | iteration | seeds | AP (mean ± std) | AP50 (mean ± std) | logged training time (s) | peak RSS (MiB) |",
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


def _final(run, max_iter):
    """The evaluation after the last training step, or None."""
    return next((e for e in run["evals"] if e["iteration"] == max_iter), None)


def paired_differences(runs, baseline: str, max_iter: int, metrics=("AP", "AP50")) -> Dict[str, Dict]:
    """Per mode other than `baseline`: over the seeds where both finished, the mode's final metric minus
    the baseline's, with their mean and 95% CI; also each side's own mean."""
    result = {}
    for spec, seeds in runs.items():
        if spec == baseline:
            continue
        pairs = []
        for seed, run in sorted(seeds.items()):
            mine, theirs = _final(run, max_iter), _final(runs[baseline].get(seed, {"evals": []}), max_iter)
            if mine and theirs:
                pairs.append((seed, mine, theirs))
        entry = {"seeds": [seed for seed, _, _ in pairs]}
        for metric in metrics:
            diffs = [m[metric] - b[metric] for _, m, b in pairs]
            if diffs:
                mean, half = t_interval(diffs)
                entry[metric] = {
                    "diffs": diffs,
                    "mean": mean,
                    "ci_low": mean - half,
                    "ci_high": mean + half,
                    "mode_mean": statistics.fmean(m[metric] for _, m, _ in pairs),
                    "baseline_mean": statistics.fmean(b[metric] for _, _, b in pairs),
                }
        result[spec] = entry
    return result


def _verdict(entry):
    if len(entry["diffs"]) < 2:
        return "one seed: no interval"
    if entry["ci_low"] > 0:
        return "better (CI excludes 0)"
    if entry["ci_high"] < 0:
        return "worse (CI excludes 0)"
    return "not established (CI includes 0)"


def format_paired(paired, baseline: str, metrics=("AP", "AP50")) -> str:
    lines = [
        f"Paired against `{baseline}` (same seed: same data stream and shared initial weights), final evaluation, "
        f"mean difference and its {CONFIDENCE:.0%} CI (Student t over the seeds):",
        "",
        "| mode | seeds | " + " | ".join(f"{m} mode / baseline | Δ{m} [95% CI] | {m} verdict" for m in metrics) + " |",
        "|---|---|" + "|".join(["---|---|---"] * len(metrics)) + "|",
    ]
    for spec, entry in paired.items():
        cells = [spec, str(len(entry["seeds"]))]
        for metric in metrics:
            e = entry.get(metric)
            if e is None:
                cells += ["", "", ""]
                continue
            cells += [
                f"{e['mode_mean']:.1f} / {e['baseline_mean']:.1f}",
                f"{e['mean']:+.1f} [{e['ci_low']:+.1f}, {e['ci_high']:+.1f}]" if len(e["diffs"]) > 1 else f"{e['mean']:+.1f}",
                _verdict(e),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluation_noise(gt_json: str, results_json: str, folds: int = 5, seed: int = 0) -> Dict:
    """How much a final AP moves with the choice of test images: the AP of each of `folds` random disjoint
    folds of the images (pycocotools, the detections of one run), and the standard error of the AP over all
    of them estimated from it (std of the fold APs / sqrt(folds))."""
    import contextlib
    import io

    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_json)
        with open(results_json) as f:
            detections = json.load(f)
        dt = gt.loadRes(detections) if detections else None
    if dt is None:
        return {"fold_ap": [], "standard_error": float("nan")}
    image_ids = np.array(sorted(gt.getImgIds()))
    np.random.default_rng(seed).shuffle(image_ids)
    fold_ap = []
    for fold in np.array_split(image_ids, folds):
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.params.imgIds = [int(i) for i in fold]
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        fold_ap.append(100.0 * float(evaluator.stats[0]))
    return {"fold_ap": fold_ap, "standard_error": statistics.stdev(fold_ap) / folds**0.5, "images": len(image_ids)}


def _run_evaluation_noise(directory, config_file, opts, folds):
    """`evaluation_noise` of a finished run (its final detections), cached in the run's eval_noise.json."""
    cache = os.path.join(directory, "eval_noise.json")
    if os.path.isfile(cache):
        with open(cache) as f:
            return json.load(f)
    from detectron2.data import MetadataCatalog

    cfg = load_config(config_file, list(opts))
    dataset = cfg.DATASETS.TEST[0]
    results = os.path.join(directory, "inference", dataset, "coco_instances_results.json")
    if not os.path.isfile(results):
        return None
    noise = evaluation_noise(MetadataCatalog.get(dataset).json_file, results, folds)
    with open(cache, "w") as f:
        json.dump(noise, f)
    return noise


def crossing_iteration(evals: List[Dict], target: float):
    """The first iteration where the AP curve reaches `target`, linear between evaluations (and from AP 0
    at iteration 0); None if it never does."""
    previous_iter, previous_ap = 0, 0.0
    for e in evals:
        if e["AP"] >= target:
            if e["AP"] == previous_ap:
                return float(e["iteration"])
            fraction = (target - previous_ap) / (e["AP"] - previous_ap)
            return previous_iter + max(0.0, fraction) * (e["iteration"] - previous_iter)
        previous_iter, previous_ap = e["iteration"], e["AP"]
    return None


def time_to_accuracy(runs, baseline: str, max_iter: int, step_time_s: Dict[str, float]) -> Dict:
    """Per mode: the training time to reach the baseline's final mean AP (the target), seed by seed (None
    where a seed never reaches it), with the mean and 95% CI over the seeds that do; times are crossing
    iteration x the mode's interleaved step time. `speedup`: the baseline's whole schedule (max_iter x its
    step time) over the mode's mean time."""
    finals = [_final(run, max_iter) for run in runs[baseline].values()]
    finals = [f["AP"] for f in finals if f]
    if not finals:
        return {}
    target = statistics.fmean(finals)
    result = {"target_AP": target, "modes": {}}
    baseline_schedule = max_iter * step_time_s[baseline] if baseline in step_time_s else None
    for spec, seeds in runs.items():
        if spec not in step_time_s:
            continue
        done = {seed: run for seed, run in seeds.items() if _final(run, max_iter)}
        iters = {seed: crossing_iteration(run["evals"], target) for seed, run in done.items()}
        minutes = [i * step_time_s[spec] / 60 for i in iters.values() if i is not None]
        entry = {"iterations": iters, "reached": len(minutes), "seeds": len(done), "step_time_s": step_time_s[spec]}
        if minutes:
            mean, half = t_interval(minutes)
            entry.update(minutes_mean=mean, minutes_ci=half)
            if baseline_schedule:
                entry["speedup"] = baseline_schedule / 60 / mean
        result["modes"][spec] = entry
    return result


def format_time_to_accuracy(tta, baseline: str) -> str:
    if not tta:
        return ""
    lines = [
        f"Time to reach `{baseline}`'s final mean AP ({tta['target_AP']:.1f}): crossing iteration (linear between "
        "evaluations) x the mode's step time measured interleaved; mean and 95% CI over the seeds that reach it; "
        f"speed-up: `{baseline}`'s whole schedule over that time.",
        "",
        "| mode | step time (s, interleaved) | seeds reaching it | minutes [95% CI] | speed-up |",
        "|---|---|---|---|---|",
    ]
    for spec, e in tta["modes"].items():
        minutes = ""
        if "minutes_mean" in e:
            minutes = f"{e['minutes_mean']:.1f}" + (f" ± {e['minutes_ci']:.1f}" if e["reached"] > 1 else "")
        speedup = f"{e['speedup']:.2f}x" if "speedup" in e else ""
        lines.append(f"| {spec} | {e['step_time_s']:.3f} | {e['reached']} of {e['seeds']} | {minutes} | {speedup} |")
    return "\n".join(lines)


def short_label(spec: str, width: int = 60) -> str:
    """A legend label: the spec without the MODEL.HYBRID_DETR. prefixes, cut to `width` characters."""
    label = spec.replace("MODEL.HYBRID_DETR.", "")
    return label if len(label) <= width else label[: width - 3] + "..."


def plot(summary: Dict[str, List[Dict]], path: str, title: str = "", step_time_s=None, target=None):
    """AP against iteration (left) and against training time (right: iteration x the interleaved step time
    when `step_time_s` has the mode, else the logged time), the band the 95% CI of the mean where there are
    several seeds; `target`, a dashed line (the baseline's final AP). Axes start at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step_time_s = step_time_s or {}
    # constrained layout: the legend below the plots and the (wrapped) title take the room they need
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6 + 0.2 * len(summary)), layout="constrained")
    for spec, rows in summary.items():
        if not rows:
            continue
        ap = [r["AP"] for r in rows]
        seeds = rows[0]["seeds"]
        if spec in step_time_s:
            minutes = [r["iteration"] * step_time_s[spec] / 60 for r in rows]
        else:
            minutes = [r["train_time_s"] / 60 for r in rows]
        label = f"{short_label(spec)} ({seeds} seed{'s' if seeds > 1 else ''}" + (", mean ± 95% CI)" if seeds > 1 else ")")
        for ax, x in zip(axes, ([0] + [r["iteration"] for r in rows], [0] + minutes)):
            (line,) = ax.plot(x, [0.0] + ap, marker="o", label=label)
            if seeds > 1:
                half = [0.0] + [r["AP_ci"] for r in rows]
                ax.fill_between(x, [a - h for a, h in zip([0.0] + ap, half)], [a + h for a, h in zip([0.0] + ap, half)],
                                color=line.get_color(), alpha=0.15)
    axes[0].set_xlabel("iteration")
    timed = all(spec in step_time_s for spec in summary)
    axes[1].set_xlabel("training time (min): iteration x step time measured interleaved" if timed
                       else "training time (min, logged, evaluation excluded)")
    for ax in axes:
        ax.set_ylabel("box AP")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if target is not None:
            ax.axhline(target, color="0.4", linestyle="--", linewidth=1, label=None)
    handles, labels = axes[0].get_legend_handles_labels()
    if target is not None:
        handles.append(plt.Line2D([], [], color="0.4", linestyle="--"))
        labels.append(f"baseline's final mean AP ({target:.1f})")
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=8)
    if title:
        fig.suptitle(textwrap.fill(title, 140), fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_shared_init(cfg, baseline: str, seed: int, path: str) -> str:
    """The baseline's model as built from `seed`, saved at `path` (once): every run of that seed starts
    from it, so the parts the modes share start identical."""
    if os.path.isfile(path):
        return path
    import torch
    from detectron2.modeling import build_model

    from .step_cost import mode_config

    torch.manual_seed(seed)
    model = build_model(mode_config(cfg, baseline))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict()}, tmp)
    os.replace(tmp, path)
    return path


def pairing_check(cfg, modes: List[str], init_path, batches: int = 2) -> Dict[str, Dict]:
    """What a mode shares with the baseline for one seed: how many of its parameter tensors the shared
    initial weights give (same name and shape), and a digest of its first training batches (file names,
    image tensors, boxes, classes), which must be the same for every mode."""
    import torch
    from detectron2.modeling import build_model

    from .step_cost import mode_config
    from .training_step import training_batches

    init = torch.load(init_path, map_location="cpu", weights_only=True)["model"] if init_path else {}
    check = {}
    for spec in modes:
        mode_cfg = mode_config(cfg, spec)
        params = dict(build_model(mode_cfg).named_parameters())
        digest = hashlib.sha256()
        for batch, _ in training_batches(mode_cfg, batches):
            for item in batch:
                digest.update(item["file_name"].encode())
                digest.update(item["image"].numpy().tobytes())
                digest.update(item["instances"].gt_boxes.tensor.numpy().tobytes())
                digest.update(item["instances"].gt_classes.numpy().tobytes())
        check[spec] = {
            "parameter_tensors": len(params),
            "from_shared_init": sum(1 for k, v in params.items() if k in init and init[k].shape == v.shape),
            "first_batches_sha256": digest.hexdigest()[:16],
        }
    return check


def format_pairing(pairing: Dict[str, Dict], seeds) -> str:
    if not pairing:
        return ""
    digests = {p["first_batches_sha256"] for p in pairing.values()}
    lines = [
        f"Pairing (checked for seed {seeds[0]}): first training batches "
        + ("identical in every mode" if len(digests) == 1 else "DIFFER between modes: the comparison is not paired")
        + "; parameter tensors starting from the shared initial weights:",
        "",
        "| mode | parameter tensors | from the shared init |",
        "|---|---|---|",
    ]
    for spec, p in pairing.items():
        lines.append(f"| {spec} | {p['parameter_tensors']} | {p['from_shared_init']} |")
    return "\n".join(lines)


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


def _step_times(cfg, modes, iters, threads, output):
    """Each mode's median training-step time, measured interleaved (cached in OUTPUT/step_cost.json)."""
    path = os.path.join(output, "step_cost.json")
    if os.path.isfile(path):
        with open(path) as f:
            result = json.load(f)
        if set(result["modes"]) >= set(modes):
            return result
    if iters <= 0:
        return None
    import torch

    from .step_cost import compare_step_cost

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = compare_step_cost(cfg, modes, iters=iters, warmup=2)
    finally:
        torch.set_num_threads(previous)
    for entry in result["modes"].values():
        entry.pop("step_times_s", None)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return result


def compare_modes(config_file, modes, seeds=(0, 1, 2, 3, 4), eval_period=200, parallel=2, threads=1,
                  output="output/compare_modes", report_only=False, opts=(), baseline=None, shared_init=True,
                  step_cost_iters=10, eval_folds=5, labels=None):
    """Trains what is missing of every (mode, seed), then writes and prints the comparison (see the
    module docstring); returns the summary ({mode: rows}). `labels`: one display name per entry of
    `modes` (tables, plot, JSON keys; the run folders keep the spec's name), e.g. "co_dino" for a long
    "dn+co_detr@KEY=VALUE@..." spec."""
    seeds, opts, modes = list(seeds), list(opts), list(modes)
    if len(set(modes)) != len(modes):
        raise ValueError(f"--modes must be distinct, got {modes}")
    labels = list(modes) if labels is None else list(labels)
    if len(labels) != len(modes) or len(set(labels)) != len(labels):
        raise ValueError(f"--labels must be distinct and one per mode ({len(modes)}), got {labels}")
    name = dict(zip(modes, labels))
    baseline = modes[0] if baseline is None else baseline
    if baseline not in modes:
        raise ValueError(f"--baseline {baseline!r} is not one of --modes {modes}")
    modes = [baseline] + [m for m in modes if m != baseline]
    for spec in modes:
        mode_spec_overrides(spec)  # fail on a malformed entry before any training
    cfg = load_config(config_file, opts)
    max_iter = cfg.SOLVER.MAX_ITER

    def log(message):
        print(f"[compare_modes] {message}", flush=True)

    init_paths = {seed: os.path.join(output, "init", f"seed{seed}.pth") if shared_init else None for seed in seeds}
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
    pairing_path = os.path.join(output, "pairing.json")
    if jobs and shared_init:
        for seed in sorted({seed for _, seed, _ in jobs}):
            write_shared_init(cfg, baseline, seed, init_paths[seed])
    if jobs and not os.path.isfile(pairing_path):
        os.makedirs(output, exist_ok=True)
        with open(pairing_path, "w") as f:
            json.dump(pairing_check(cfg, modes, init_paths[seeds[0]]), f, indent=2)
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = [
            pool.submit(_train_or_log, config_file, spec, seed, d, eval_period, threads,
                        opts + (["MODEL.WEIGHTS", os.path.abspath(init_paths[seed])] if init_paths[seed] else []), log)
            for spec, seed, d in jobs
        ]
        for future in futures:
            future.result()

    # From here on every mode goes by its display name.
    runs = {name[spec]: {seed: read_run(run_dir(output, spec, seed)) for seed in seeds} for spec in modes}
    summary = summarize(runs)
    paired = paired_differences(runs, name[baseline], max_iter)
    noise = {}
    for spec in modes:
        for seed in seeds:
            if _final(runs[name[spec]][seed], max_iter):
                n = _run_evaluation_noise(run_dir(output, spec, seed), config_file, opts, eval_folds)
                if n:
                    noise[f"{name[spec]}/seed{seed}"] = n
    finished = all(_final(runs[name[spec]][seed], max_iter) for spec in modes for seed in seeds)
    step_cost = _step_times(cfg, modes, step_cost_iters if finished and not report_only else 0, threads, output)
    step_time_s = {name[m]: e["step_time_s_median"] for m, e in step_cost["modes"].items()} if step_cost else {}
    tta = time_to_accuracy(runs, name[baseline], max_iter, step_time_s) if step_time_s else {}
    pairing = {}
    if os.path.isfile(pairing_path):
        with open(pairing_path) as f:
            pairing = {name.get(spec, spec): entry for spec, entry in json.load(f).items()}
    modes, baseline = [name[spec] for spec in modes], name[baseline]

    test_set = cfg.DATASETS.TEST[0]
    header = (
        f"{os.path.relpath(config_file, ROOT) if os.path.isabs(config_file) else config_file}, "
        f"{max_iter} iterations, seeds {seeds}, evaluated on {test_set}, {threads} thread(s) per run, "
        f"{parallel} at a time, baseline `{baseline}`" + (", shared initial weights" if shared_init else "")
    )
    sections = [format_table(summary, header), format_pairing(pairing, seeds), format_paired(paired, baseline)]
    if noise:
        errors = sorted(n["standard_error"] for n in noise.values())
        base_final = [f["AP"] for f in (_final(r, max_iter) for r in runs[baseline].values()) if f]
        diff_sd = [statistics.stdev(e["AP"]["diffs"]) for e in paired.values() if "AP" in e and len(e["AP"]["diffs"]) > 1]
        sections.append(
            f"Noise: evaluation (standard error of a run's final AP over its {next(iter(noise.values()))['images']} "
            f"test images, from {eval_folds} folds): median {statistics.median(errors):.2f} AP over {len(errors)} runs; "
            f"seeds: std of `{baseline}`'s final AP "
            + (f"{statistics.stdev(base_final):.2f}" if len(base_final) > 1 else "n/a (one seed)")
            + (f", std of the paired differences {min(diff_sd):.2f}-{max(diff_sd):.2f}" if diff_sd else "")
            + "."
        )
    if tta:
        sections.append(format_time_to_accuracy(tta, baseline))
    report = "\n\n".join(s for s in sections if s)
    print(report)
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "compare_modes.json"), "w") as f:
        json.dump({"config_file": config_file, "max_iter": max_iter, "baseline": baseline, "shared_init": shared_init,
                   "modes": {label: spec for spec, label in name.items()},
                   "runs": runs, "summary": summary, "pairing": pairing, "paired": paired, "evaluation_noise": noise,
                   "step_cost": step_cost, "time_to_accuracy": tta}, f, indent=2)
    with open(os.path.join(output, "compare_modes.md"), "w") as f:
        f.write(report + "\n")
    plot(summary, os.path.join(output, "compare_modes.png"), title=header, step_time_s=step_time_s,
         target=tta.get("target_AP") if tta else None)
    log(f"wrote {output}/compare_modes.{{json,md,png}}")
    return summary
