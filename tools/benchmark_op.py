"""Benchmark of the compiled MSDeformAttn op against the pure-PyTorch reference.

    python3 tools/benchmark_op.py [--device cpu|cuda] [--dtype float32|float16|bfloat16|float64|bfloat16-autocast|...]
                                  [--configs a,b,c] [--reps 7] [--threads N]

Configs (Deformable DETR, d_model 256 = M 8 x D 32, 4 levels, 4 points):
  a: one encoder layer at a 512x512 input: levels 64x64, 32x32, 16x16, 8x8; Lq = S = 5440; N = 2
  b: one decoder layer at 800x1333: levels 100x167, 50x84, 25x42, 13x21 (S = 22,223); Lq = 300; N = 2
  c: the same decoder layer with the many queries of DAC-DETR / Co-DETR training: Lq = 1800; N = 2
Both implementations are timed in the same run (median of --reps after a warm-up); "fwd+bwd" is one
forward plus the backward for value, sampling locations and attention weights.

Bandwidth: "copy GB/s" is a STREAM-style copy (dst.copy_(src) of --copy-mib MiB, bytes read + written
over the best time of 9) on the same device and threads, measured before and after the table. "GB/s" of
the op is its compulsory traffic over its time: every input read once and every output written
once (forward: value, locations, weights, output; backward adds grad_output and the three
gradients, grad_value counted as written in the accumulation type), where value counts only as
much as the corner rows it can reach when those are fewer (a decoder samples a small part of
value). The op also gathers 4 corner
rows of D channels per sample, mostly from the caches: "gather GB/s" is those bytes over the time
(forward: read; backward: value read + grad_value read and written).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

# Run from a clone without installing: the package lives in projects/HybridDETR.
_PROJECT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "HybridDETR")
if os.path.isdir(_PROJECT) and _PROJECT not in sys.path:
    sys.path.insert(0, _PROJECT)

CONFIGS = {
    "a": dict(name="encoder 512x512", shapes=[(64, 64), (32, 32), (16, 16), (8, 8)], Lq=None, N=2, M=8, D=32, P=4),
    "b": dict(name="decoder 800x1333", shapes=[(100, 167), (50, 84), (25, 42), (13, 21)], Lq=300, N=2, M=8, D=32,
              P=4),
    "c": dict(name="decoder 1800 queries", shapes=[(100, 167), (50, 84), (25, 42), (13, 21)], Lq=1800, N=2, M=8,
              D=32, P=4),
}
# --dtype: (value / output dtype, sampling-location / attention-weight dtype). "*-autocast" is what
# autocast hands the op: a half-type value with float32 locations and weights.
DTYPES = {
    "float32": (torch.float32, torch.float32),
    "float16": (torch.float16, torch.float16),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "float64": (torch.float64, torch.float64),
    "bfloat16-autocast": (torch.bfloat16, torch.float32),
    "float16-autocast": (torch.float16, torch.float32),
}


def make_inputs(cfg, device, dtype_name, requires_grad, seed=0):
    dtype, coords = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(cfg["shapes"], dtype=torch.int64)
    areas = ss.prod(1)
    lsi = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S = int(areas.sum())
    Lq = cfg["Lq"] or S
    N, M, D, P, L = cfg["N"], cfg["M"], cfg["D"], cfg["P"], len(cfg["shapes"])
    value = torch.randn(N, S, M, D, generator=g).to(device, dtype)
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g).mul_(1.2).sub_(0.1).to(device, coords)
    attn = torch.rand(N, Lq, M, L, P, generator=g).to(device, coords)
    attn /= attn.sum((-1, -2), keepdim=True)
    grad = torch.randn(N, Lq, M * D, generator=g).to(device, dtype)
    for t in (value, loc, attn):
        t.requires_grad_(requires_grad)
    return (value, ss.to(device), lsi.to(device), loc, attn), grad


def make_step(impl, mode):
    from hybrid_detr.layers import ms_deform_attn_reference

    def run(args, grad):
        value, ss, lsi, loc, attn = args
        if impl == "ours":
            out = torch.ops.hybrid_detr.ms_deform_attn(value, ss, lsi, loc, attn)
        else:
            out = ms_deform_attn_reference(value, ss, loc, attn)
        if mode == "fwd+bwd":
            torch.autograd.backward(out, grad)
            for t in (value, loc, attn):
                t.grad = None
        return out

    return run


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_case(cfg, impl, mode, device, dtype, reps, warmup):
    args, grad = make_inputs(cfg, device, dtype, requires_grad=(mode == "fwd+bwd"))
    step = make_step(impl, mode)
    ctx = torch.enable_grad() if mode == "fwd+bwd" else torch.no_grad()
    times = []
    with ctx:
        for i in range(warmup + reps):
            _sync(device)
            t0 = time.perf_counter()
            step(args, grad)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _proc_status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_rss_peak():
    """Reset VmHWM (peak RSS) to the current RSS (Linux >= 4.0); False when not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_case(cfg, impl, mode, device, dtype):
    """Extra peak memory of one call, beyond the inputs (bytes).

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus what was allocated
    before the call. CPU: run in a fresh subprocess; after building the inputs, reset the kernel's
    peak-RSS mark (VmHWM, via /proc/self/clear_refs) and take the RSS; after the call, VmHWM minus
    that RSS. It counts every page the call touched (torch's allocations and the allocator's
    overhead), not only live tensors. (ru_maxrss is no good here: Linux carries it across exec,
    so a child started by a big parent inherits the parent's peak.)
    """
    if device == "cuda":
        args, grad = make_inputs(cfg, device, dtype, requires_grad=(mode == "fwd+bwd"))
        step = make_step(impl, mode)
        with torch.enable_grad() if mode == "fwd+bwd" else torch.no_grad():
            step(args, grad)  # warm-up (lazy init, workspaces)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(args, grad)
            torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    job = dict(cfg=cfg, impl=impl, mode=mode, dtype=dtype, threads=torch.get_num_threads())
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--_memory_job", json.dumps(job)],
                         capture_output=True, text=True, env=os.environ.copy(), check=True)
    return int(res.stdout.strip().splitlines()[-1])


def _memory_job(spec):
    job = json.loads(spec)
    torch.set_num_threads(job["threads"])
    import hybrid_detr.layers  # noqa: F401  (loads the extension before the baseline)

    cfg = job["cfg"]
    args, grad = make_inputs(cfg, "cpu", job["dtype"], requires_grad=(job["mode"] == "fwd+bwd"))
    step = make_step(job["impl"], job["mode"])
    if _reset_rss_peak():
        base = _proc_status_bytes("VmRSS")
    else:  # peak so far (the inputs and the import) as the baseline: may under-count
        base = _proc_status_bytes("VmHWM")
    with torch.enable_grad() if job["mode"] == "fwd+bwd" else torch.no_grad():
        step(args, grad)
    print(max(0, _proc_status_bytes("VmHWM") - base))


def copy_bandwidth(device, mib, reps=9):
    """STREAM-style copy: bytes read + written per second, best of `reps` (as STREAM reports)."""
    n = mib * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 2):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / min(times)


def traffic_bytes(cfg, mode, dtype_name):
    """(compulsory bytes, gathered corner bytes) of one call: see the module docstring."""
    value_dtype, coords_dtype = DTYPES[dtype_name]
    elt = torch.tensor([], dtype=value_dtype).element_size()
    celt = torch.tensor([], dtype=coords_dtype).element_size()  # locations and weights
    acc = max(elt, 4)
    S = sum(h * w for h, w in cfg["shapes"])
    N, M, D, P, L = cfg["N"], cfg["M"], cfg["D"], cfg["P"], len(cfg["shapes"])
    Lq = cfg["Lq"] or S
    value, out, samples = N * S * M * D, N * Lq * M * D, N * Lq * M * L * P
    value_read = min(value, samples * 4 * D)
    fwd = (value_read + out) * elt + 3 * samples * celt
    gather = samples * 4 * D * elt
    if mode == "fwd":
        return fwd, gather
    bwd = (out + value_read) * elt + 3 * samples * celt + value * acc + 3 * samples * celt
    return fwd + bwd, gather + samples * 4 * D * (elt + 2 * acc)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--configs", default="a,b,c")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--copy-mib", type=int, default=256, help="size of the copy bandwidth test (MiB)")
    parser.add_argument("--_memory_job", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a._memory_job:
        return _memory_job(a._memory_job)
    if a.threads:
        torch.set_num_threads(a.threads)
    from hybrid_detr.layers import extension_available

    if not extension_available():
        sys.exit("hybrid_detr._C is not built: run `pip install --no-build-isolation --no-deps -e .` "
                 "(or `python setup.py build_ext --inplace`)")
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU available")
    dtype = a.dtype

    dev_name = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"MSDeformAttn benchmark: {dev_name}, {a.dtype}, torch {torch.__version__}")
    print(f"time: median of {a.reps} runs after {a.warmup} warm-up runs"
          + (" (torch.cuda.synchronize around each)" if a.device == "cuda" else ""))
    if a.no_memory:
        print("peak memory: not measured (--no-memory)")
    elif a.device == "cuda":
        print("peak memory: torch.cuda.max_memory_allocated() during one call minus memory allocated before it")
    else:
        print("peak memory: extra peak RSS of one call (first call, cold) over the inputs, each case in a fresh "
              "subprocess (/proc/self/status VmHWM after the call minus VmRSS before it, peak reset by "
              "/proc/self/clear_refs)")
    if a.device == "cpu":
        from hybrid_detr import _C

        print(f"CPU kernels: {_C.cpu_kernel_isa()} (torch CPU capability {torch.backends.cpu.get_cpu_capability()})")
    copy_before = copy_bandwidth(a.device, a.copy_mib)
    print(f"copy bandwidth (STREAM-style copy, {a.copy_mib} MiB): {copy_before / 1e9:.1f} GB/s")
    header = (f"{'config':<26}{'pass':<9}{'ours ms':>10}{'ref ms':>10}{'speed-up':>10}"
              f"{'GB/s':>8}{'% copy':>8}{'gather GB/s':>12}"
              f"{'ours MiB':>10}{'ref MiB':>10}{'mem ratio':>10}")
    print(header)
    print("-" * len(header))
    for key in a.configs.split(","):
        cfg = CONFIGS[key]
        S = sum(h * w for h, w in cfg["shapes"])
        label = f"({key}) {cfg['name']}"
        for mode in ("fwd", "fwd+bwd"):
            t_ours = time_case(cfg, "ours", mode, a.device, dtype, a.reps, a.warmup)
            t_ref = time_case(cfg, "ref", mode, a.device, dtype, a.reps, a.warmup)
            if a.no_memory:
                mem = ""
            else:
                m_ours = peak_memory_case(cfg, "ours", mode, a.device, dtype) / 2**20
                m_ref = peak_memory_case(cfg, "ref", mode, a.device, dtype) / 2**20
                mem = f"{m_ours:>10.1f}{m_ref:>10.1f}{m_ref / max(m_ours, 1e-9):>9.1f}x"
            compulsory, gathered = traffic_bytes(cfg, mode, dtype)
            bw = f"{compulsory / t_ours / 1e9:>8.1f}{100 * compulsory / t_ours / copy_before:>7.0f}%" \
                 f"{gathered / t_ours / 1e9:>12.1f}"
            print(f"{label:<26}{mode:<9}{t_ours * 1e3:>10.2f}{t_ref * 1e3:>10.2f}{t_ref / t_ours:>9.2f}x{bw}{mem}",
                  flush=True)
        print(f"{'':<26}S={S}, Lq={cfg['Lq'] or S}, N={cfg['N']}, M={cfg['M']}, D={cfg['D']}, "
              f"L={len(cfg['shapes'])}, P={cfg['P']}")
    copy_after = copy_bandwidth(a.device, a.copy_mib)
    print(f"copy bandwidth after the table: {copy_after / 1e9:.1f} GB/s (before: {copy_before / 1e9:.1f} GB/s; "
          "% copy uses the one before)")


if __name__ == "__main__":
    main()
