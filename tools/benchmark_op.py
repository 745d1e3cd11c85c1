"""Benchmark of the compiled MSDeformAttn op against the pure-PyTorch reference.

    python3 tools/benchmark_op.py [--device cpu|cuda] [--dtype float32|float16|bfloat16|float64|bfloat16-autocast|...]
                                  [--configs a,b,c] [--reps 7] [--threads N]

The configs, the columns and how each is measured: `--help` (`hybrid_detr.analysis.op_benchmark`).
"""
import argparse
import sys

try:
    import hybrid_detr  # noqa: F401
except ImportError as error:
    sys.exit(f"cannot import hybrid_detr ({error}): run `bash tools/bootstrap.sh`")

import torch  # noqa: E402

from hybrid_detr.analysis import op_benchmark  # noqa: E402
from hybrid_detr.layers import extension_available  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=op_benchmark.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=list(op_benchmark.DTYPES))
    parser.add_argument("--configs", default="a,b,c")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--copy-mib", type=int, default=256, help="size of the copy bandwidth test (MiB)")
    a = parser.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not extension_available():
        sys.exit("hybrid_detr._C is not built: run `pip install --no-build-isolation --no-deps -e .` "
                 "(or `python setup.py build_ext --inplace`)")
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU available")
    op_benchmark.run_benchmark(a.device, a.dtype, a.configs, a.reps, a.warmup, a.no_memory, a.copy_mib)


if __name__ == "__main__":
    main()
