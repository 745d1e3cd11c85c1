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
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from ..layers import ms_deform_attn_reference
from .measurement import PeakMemory, synchronize

__all__ = ["CONFIGS", "DTYPES", "make_inputs", "time_case", "peak_memory_case", "copy_bandwidth", "traffic_bytes",
           "run_benchmark"]

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


def time_case(cfg, impl, mode, device, dtype, reps, warmup):
    args, grad = make_inputs(cfg, device, dtype, requires_grad=(mode == "fwd+bwd"))
    step = make_step(impl, mode)
    ctx = torch.enable_grad() if mode == "fwd+bwd" else torch.no_grad()
    times = []
    with ctx:
        for i in range(warmup + reps):
            synchronize(device)
            t0 = time.perf_counter()
            step(args, grad)
            synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory_case(cfg, impl, mode, device, dtype):
    """Extra peak memory of one call, beyond the inputs (bytes), measured by `PeakMemory`.

    CUDA: the allocator's peak during the call (after a warm-up call) minus what was allocated before
    it. CPU: run in a fresh subprocess (`memory_job`): the peak resident memory of the call (first call,
    cold) over the resident memory after building the inputs; it counts every page the call touched.
    """
    if device == "cuda":
        args, grad = make_inputs(cfg, device, dtype, requires_grad=(mode == "fwd+bwd"))
        step = make_step(impl, mode)
        with torch.enable_grad() if mode == "fwd+bwd" else torch.no_grad():
            step(args, grad)  # warm-up (lazy init, workspaces)
            with PeakMemory(device) as memory:
                step(args, grad)
        return memory.bytes
    job = dict(cfg=cfg, impl=impl, mode=mode, dtype=dtype, threads=torch.get_num_threads())
    code = "import sys; from hybrid_detr.analysis.op_benchmark import memory_job; memory_job(sys.argv[1])"
    res = subprocess.run([sys.executable, "-c", code, json.dumps(job)],
                         capture_output=True, text=True, env=os.environ.copy(), check=True)
    return int(res.stdout.strip().splitlines()[-1])


def memory_job(spec):
    """One CPU case of `peak_memory_case` in this (fresh) process: prints its extra peak memory in bytes."""
    job = json.loads(spec)
    torch.set_num_threads(job["threads"])
    cfg = job["cfg"]
    args, grad = make_inputs(cfg, "cpu", job["dtype"], requires_grad=(job["mode"] == "fwd+bwd"))
    step = make_step(job["impl"], job["mode"])
    with PeakMemory("cpu") as memory, torch.enable_grad() if job["mode"] == "fwd+bwd" else torch.no_grad():
        step(args, grad)
    print(memory.bytes)


def copy_bandwidth(device, mib, reps=9):
    """STREAM-style copy: bytes read + written per second, best of `reps` (as STREAM reports)."""
    n = mib * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 2):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
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


def run_benchmark(device="cpu", dtype="float32", configs="a,b,c", reps=7, warmup=2, no_memory=False, copy_mib=256):
    """Prints the benchmark's table (see the module docstring), one row as each case is measured."""
    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"MSDeformAttn benchmark: {dev_name}, {dtype}, torch {torch.__version__}")
    print(f"time: median of {reps} runs after {warmup} warm-up runs"
          + (" (torch.cuda.synchronize around each)" if device == "cuda" else ""))
    if no_memory:
        print("peak memory: not measured (--no-memory)")
    elif device == "cuda":
        print("peak memory: torch.cuda.max_memory_allocated() during one call minus memory allocated before it")
    else:
        print("peak memory: extra peak RSS of one call (first call, cold) over the inputs, each case in a fresh "
              "subprocess (/proc/self/status VmHWM after the call minus VmRSS before it, peak reset by "
              "/proc/self/clear_refs)")
    if device == "cpu":
        from ..layers import _C

        print(f"CPU kernels: {_C.cpu_kernel_isa()} (torch CPU capability {torch.backends.cpu.get_cpu_capability()})")
    copy_before = copy_bandwidth(device, copy_mib)
    print(f"copy bandwidth (STREAM-style copy, {copy_mib} MiB): {copy_before / 1e9:.1f} GB/s")
    header = (f"{'config':<26}{'pass':<9}{'ours ms':>10}{'ref ms':>10}{'speed-up':>10}"
              f"{'GB/s':>8}{'% copy':>8}{'gather GB/s':>12}"
              f"{'ours MiB':>10}{'ref MiB':>10}{'mem ratio':>10}")
    print(header)
    print("-" * len(header))
    for key in configs.split(","):
        cfg = CONFIGS[key]
        S = sum(h * w for h, w in cfg["shapes"])
        label = f"({key}) {cfg['name']}"
        for mode in ("fwd", "fwd+bwd"):
            t_ours = time_case(cfg, "ours", mode, device, dtype, reps, warmup)
            t_ref = time_case(cfg, "ref", mode, device, dtype, reps, warmup)
            if no_memory:
                mem = ""
            else:
                m_ours = peak_memory_case(cfg, "ours", mode, device, dtype) / 2**20
                m_ref = peak_memory_case(cfg, "ref", mode, device, dtype) / 2**20
                mem = f"{m_ours:>10.1f}{m_ref:>10.1f}{m_ref / max(m_ours, 1e-9):>9.1f}x"
            compulsory, gathered = traffic_bytes(cfg, mode, dtype)
            bw = f"{compulsory / t_ours / 1e9:>8.1f}{100 * compulsory / t_ours / copy_before:>7.0f}%" \
                 f"{gathered / t_ours / 1e9:>12.1f}"
            print(f"{label:<26}{mode:<9}{t_ours * 1e3:>10.2f}{t_ref * 1e3:>10.2f}{t_ref / t_ours:>9.2f}x{bw}{mem}",
                  flush=True)
        print(f"{'':<26}S={S}, Lq={cfg['Lq'] or S}, N={cfg['N']}, M={cfg['M']}, D={cfg['D']}, "
              f"L={len(cfg['shapes'])}, P={cfg['P']}")
    copy_after = copy_bandwidth(device, copy_mib)
    print(f"copy bandwidth after the table: {copy_after / 1e9:.1f} GB/s (before: {copy_before / 1e9:.1f} GB/s; "
          "% copy uses the one before)")

