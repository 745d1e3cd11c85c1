"""Smoke check of the built extension: the op runs and its error messages can be formatted.

A compiler that links its own libstdc++ into `_C` (seen on a GPU image whose `CXX` was a wrapper
around g++ 13 in /opt/gcc) builds an extension that runs the op but crashes (SIGSEGV) as soon as a
`TORCH_CHECK` message formats an integer, i.e. on the first bad input. Unit tests would find it only
by crashing mid-run, so tools/bootstrap.sh and tools/gpu_check.sh run this right after building, in
a subprocess, and read a crash from its exit status.

    python tools/check_extension.py            # CPU, and the GPU when there is one
Exit status: 0 when every check passed, 1 when one failed (one line says which); a crash gives the
signal's status (139 for SIGSEGV), which the callers turn into a hint to rebuild with the system g++.
"""
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "projects", "HybridDETR"))
with warnings.catch_warnings():  # import-time deprecation notices of dependencies: not this check's
    warnings.simplefilter("ignore")
    from hybrid_detr import layers  # noqa: E402


def _inputs(device):
    shapes = torch.tensor([[4, 3], [2, 2]], device=device)
    value = torch.randn(1, 16, 2, 8, device=device)
    locations = torch.rand(1, 4, 2, 2, 2, 2, device=device)
    weights = torch.rand(1, 4, 2, 2, 2, device=device)
    return value, shapes, torch.tensor([0, 12], device=device), locations, weights


def check(device, op=None):
    """None when the op (default: the extension's) computes and refuses a wrong layout by name, else why not."""
    op = op or torch.ops.hybrid_detr.ms_deform_attn
    value, shapes, starts, locations, weights = _inputs(device)
    out = op(value, shapes, starts, locations, weights)
    if out.shape != (1, 4, 16) or not torch.isfinite(out).all():
        return f"{device}: the op returned {tuple(out.shape)} (finite: {bool(torch.isfinite(out).all())})"
    try:  # a wrong level start: the message formats integers (this is what crashed)
        op(value, shapes, starts + torch.tensor([0, 1], device=device), locations, weights)
    except RuntimeError as error:
        if "level_start_index[1] = 13 is inconsistent" not in str(error):
            return f"{device}: unexpected error message: {str(error).splitlines()[0]}"
        return None
    return f"{device}: a wrong level_start_index was accepted"


def main():
    if layers._C is None:
        print("check_extension: hybrid_detr.layers._C is not built (run bash tools/bootstrap.sh)")
        return 1
    devices = ["cpu"]
    if torch.cuda.is_available() and layers._C.with_cuda():
        os.environ["HYBRID_DETR_SYNC_CHECKS"] = "1"  # the host-side check, which formats the message
        devices.append("cuda")
    failures = [f for f in (check(d) for d in devices) if f]
    for failure in failures:
        print("check_extension: " + failure)
    if not failures:
        print("check_extension: OK on " + ", ".join(devices))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
