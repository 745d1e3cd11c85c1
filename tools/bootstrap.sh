#!/usr/bin/env bash
# Installs, once, what HybridDETR needs into the current Python, then builds our extension.
# Safe to run again: each step checks first and does nothing when it is already done.
#   PYTHON=python3.11 bash tools/bootstrap.sh   # choose the interpreter (default: python3)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
TORCH_PIN="torch==2.14.1 torchvision==0.29.1"
D2_PIN="sal-detectron2==0.7.2"
# The Swin backbones (hybrid_detr/modeling/backbones/swin.py) are built from timm's Swin; tested with this version.
TIMM_PIN="timm==1.0.31"
PY_DEPS="scipy fvcore iopath pycocotools omegaconf hydra-core yacs tabulate termcolor cloudpickle tqdm tensorboard matplotlib Pillow opencv-python-headless ninja pytest onnx onnxruntime onnxscript"

say() { echo "[bootstrap] $*"; }
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch, torchvision.ops; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)" 2>/dev/null; then
    say "installing $TORCH_PIN (several GB, first time only)"
    pip_install $TORCH_PIN
fi

if ! "$PY" -c "import fvcore, iopath, pycocotools, omegaconf, yacs, tabulate, termcolor, cloudpickle, tqdm, tensorboard, matplotlib, PIL, cv2, scipy, ninja, pytest, onnx, onnxruntime, onnxscript, timm" 2>/dev/null; then
    say "installing Python dependencies"
    pip_install $PY_DEPS $TIMM_PIN
fi

if ! "$PY" -c "import detectron2.modeling, detectron2.engine" 2>/dev/null; then
    # detectron2's authors publish no wheel; sal-detectron2 holds a snapshot of its Python code,
    # built for 3.10 (its compiled _C is simply not loaded on other versions; we do not need it).
    say "installing detectron2 from $D2_PIN"
    tmp=$(mktemp -d)
    pip_install --no-deps --python-version 3.10 --only-binary=:all: --target "$tmp" "$D2_PIN"
    site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    cp -r "$tmp"/detectron2 "$tmp"/sal_detectron2-*.dist-info "$site"/
    rm -rf "$tmp"
fi

# Rebuild our extension when its sources changed or this clone is not the installed one.
stamp_dir="$ROOT/build"
stamp="$stamp_dir/hybrid_detr_ext.stamp"
want=$(cd "$ROOT" && cat setup.py $(find csrc -type f | sort) | sha1sum | cut -d' ' -f1)
have=$(cat "$stamp" 2>/dev/null || true)
installed=$(cd / && "$PY" -c "import hybrid_detr._C, hybrid_detr, os; print(os.path.dirname(os.path.dirname(hybrid_detr.__file__)))" 2>/dev/null || true)
if [ "$want" != "$have" ] || [ "$installed" != "$ROOT/projects/HybridDETR" ]; then
    say "building the hybrid_detr extension (CUDA kernels take a few minutes on 2 cores)"
    (cd "$ROOT" && MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install --quiet --no-build-isolation --no-deps -e .)
    # Its error path too: a compiler that links its own libstdc++ builds an extension that crashes on the
    # op's first error message (tools/check_extension.py says more).
    check_rc=0
    (cd "$ROOT" && "$PY" tools/check_extension.py) || check_rc=$?
    if [ "$check_rc" != 0 ]; then
        say "the extension built with CXX=${CXX:-c++} fails tools/check_extension.py (exit status $check_rc;" \
            "above 128: it crashed); rebuild with the system compiler: CXX=/usr/bin/g++ CC=/usr/bin/gcc bash tools/bootstrap.sh"
        exit 1
    fi
    mkdir -p "$stamp_dir" && echo "$want" > "$stamp"
fi
say "ready: $("$PY" -c "import torch, detectron2, hybrid_detr; print('torch', torch.__version__, '| detectron2', detectron2.__version__, '| hybrid_detr', hybrid_detr.__version__)")"
