#!/usr/bin/env python
"""Installs the `hybrid_detr` package and builds its C++/CUDA extension `hybrid_detr.layers._C`.

The extension belongs to the op layer (`hybrid_detr.layers`), which imports it as `from . import _C`
and so needs neither the rest of the package nor detectron2; `hybrid_detr._C` is an alias of it.

CPU kernels are always built. CUDA kernels are built when PyTorch has CUDA and a CUDA toolkit is
found; `FORCE_CUDA=1` makes a missing toolkit an error, `HYBRID_DETR_NO_CUDA=1` skips CUDA.
Build with `pip install -e . --no-build-isolation` (an isolated build would pull a second torch).
"""
import glob
import os
import platform
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0+PTX"
PACKAGE_DIR = os.path.join("projects", "HybridDETR")


def _find_cuda_home():
    """The toolkit root: CUDA_HOME/CUDA_PATH, else the root behind `nvcc`, else /usr/local/cuda.

    torch's own guess takes the parent of the first `nvcc` on PATH, which is wrong when that `nvcc`
    is a wrapper script in /usr/local/bin; so we accept a root only if it holds `cuda_runtime.h`.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def _want_cuda(torch_has_cuda, cuda_home):
    if os.environ.get("HYBRID_DETR_NO_CUDA", "0") == "1":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if not (torch_has_cuda and cuda_home):
            raise RuntimeError(
                "FORCE_CUDA=1 but CUDA cannot be built: "
                f"torch.version.cuda={torch_has_cuda!r}, CUDA toolkit root={cuda_home!r}. "
                "Install a CUDA build of torch and set CUDA_HOME to the toolkit."
            )
        return True
    return bool(torch_has_cuda and cuda_home)


# The CPU kernels: one source compiled once per instruction set (see its header comment).
CPU_ISA_SOURCE = os.path.join("csrc", "cpu", "isa", "ms_deform_attn_cpu_isa.cpp")


def _cpu_isa_variants():
    """(name, HYBRID_DETR_CPU_ISA, compiler flags) of each build of the CPU kernels.

    The baseline always; AVX2 and AVX-512 on x86-64 with GCC/Clang (the flags of ATen's own
    AVX2/AVX512 kernels), chosen at run time. HYBRID_DETR_CPU_BASELINE_ONLY=1 builds the baseline only.
    """
    variants = [("baseline", 0, [])]
    if platform.machine().lower() in ("x86_64", "amd64") and os.environ.get("HYBRID_DETR_CPU_BASELINE_ONLY") != "1":
        variants.append(("avx2", 1, ["-mavx2", "-mfma", "-mf16c"]))
        variants.append(("avx512", 2, ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
                                       "-mf16c"]))
    return variants


def _openmp_flags(torch):
    """-fopenmp when torch runs its intra-op threads on OpenMP (Linux wheels) and the compiler is GCC/Clang.

    at::parallel_for is a header template: compiled without -fopenmp it runs every loop on the calling
    thread, whatever torch.set_num_threads says. Linking libgomp by its soname reuses the copy torch
    has already loaded (one OpenMP runtime, one thread pool). HYBRID_DETR_NO_OPENMP=1 builds without.
    """
    if os.environ.get("HYBRID_DETR_NO_OPENMP") == "1" or sys.platform != "linux":
        return []
    if not torch.backends.openmp.is_available():
        return []
    return ["-fopenmp"]


def _build_ext_class():
    """torch's BuildExtension, plus the per-ISA objects of the CPU kernels (each with its own flags)."""
    from torch.utils.cpp_extension import BuildExtension

    class BuildExtensionWithISA(BuildExtension):
        def build_extension(self, ext):
            variants = getattr(ext, "cpu_isa_variants", ())
            cxx = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args
            objects = []
            for name, level, flags in variants:
                objects += self.compiler.compile(
                    [CPU_ISA_SOURCE],
                    output_dir=os.path.join(self.build_temp, "cpu_" + name),
                    macros=list(ext.define_macros) + [("HYBRID_DETR_CPU_ISA", str(level))],
                    include_dirs=ext.include_dirs,
                    extra_postargs={"cxx": list(cxx) + flags} if self.use_ninja else list(cxx) + flags,
                    depends=ext.depends,
                )
            ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

    return BuildExtensionWithISA.with_options(use_ninja=True)


def get_extensions(cuda_home):
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    isa_variants = _cpu_isa_variants()
    define_macros = [("HYBRID_DETR_CPU_" + name.upper(), None) for name, _, _ in isa_variants if name != "baseline"]
    openmp = _openmp_flags(torch)
    extra_compile_args = {"cxx": ["-O3"] + openmp}
    extension = CppExtension
    if _want_cuda(torch.version.cuda, cuda_home):
        extension = CUDAExtension
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to ask: every architecture CUDA 13 supports that users have (Turing T4/RTX 20xx,
            # Ampere, Ada, Hopper), plus PTX for newer GPUs.
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        print(f"hybrid_detr: building CPU + CUDA kernels (CUDA_HOME={cuda_home}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'auto')})")
    else:
        print("hybrid_detr: building CPU kernels only")
    print("hybrid_detr: CPU kernels for " + ", ".join(name for name, _, _ in isa_variants)
          + (", multi-threaded (OpenMP)" if openmp else ", single-threaded (no OpenMP)"))
    ext = extension(
        "hybrid_detr.layers._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=openmp,
        depends=[CPU_ISA_SOURCE] + sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True)),
    )
    ext.cpu_isa_variants = isa_variants
    return [ext]


def _link_configs():
    """Ship configs/ as package data under hybrid_detr/model_zoo/configs (as detectron2 does)."""
    source = os.path.join(ROOT, "configs")
    target = os.path.join(ROOT, PACKAGE_DIR, "hybrid_detr", "model_zoo", "configs")
    if os.path.islink(target) or os.path.exists(target):
        return
    try:
        os.symlink(source, target)
    except OSError:  # filesystems without symlinks
        shutil.copytree(source, target)


if __name__ == "__main__":
    CUDA_HOME = _find_cuda_home()
    if CUDA_HOME:
        # Before anything imports torch.utils.cpp_extension: it reads CUDA_HOME once, at import.
        os.environ["CUDA_HOME"] = CUDA_HOME
    _link_configs()
    setup(
        name="hybrid_detr",
        version="0.1.0",
        description="DAC-DETR, SMCA and Co-DETR decoders on Deformable-DETR, as a detectron2 project",
        package_dir={"": PACKAGE_DIR},
        packages=find_packages(PACKAGE_DIR),
        package_data={"hybrid_detr.model_zoo": ["configs/*.yaml", "configs/**/*.yaml"]},
        python_requires=">=3.9",
        install_requires=["scipy", "fvcore", "pycocotools"],  # detectron2 and torch: see README
        ext_modules=get_extensions(CUDA_HOME),
        cmdclass={"build_ext": _build_ext_class()},
        zip_safe=False,
    )
