#!/usr/bin/env bash
# What only a GPU machine can check, in one go (under 8 minutes on one recent GPU), then one summary:
#   1. build:     our extension with CUDA kernels (only when the importable one has none or fails
#                 tools/check_extension.py), in place (setup.py build_ext --inplace: no pip, no build
#                 isolation, so nothing is downloaded), for this GPU's architecture alone;
#   2. op tests:  tests/layers/test_ms_deform_attn_cuda.py (fp32 / fp16 / bf16 against the reference);
#   3. benchmark: tools/benchmark_op.py --device cuda (ours vs the pure-PyTorch reference);
#   4. train:     the quickstart config on the GPU with fp16 AMP (SOLVER.AMP.ENABLED True: float16 autocast
#                 and detectron2's GradScaler), a short schedule;
#   5. evaluate:  --eval-only of that checkpoint: COCO AP, inference speed.
#   bash tools/gpu_check.sh                          # GPU_CHECK_ITERS=300 training iterations by default
#   GPU_CHECK_ITERS=600 OUTPUT_DIR=/tmp/gc bash tools/gpu_check.sh
# Needs torch with CUDA and detectron2 installed (tools/bootstrap.sh); downloads nothing. Logs of each
# step: $OUTPUT_DIR/<step>.log (default output/gpu_check). Exit status: 0 when every step passed, 1 when
# one failed, 2 when the machine cannot run the check at all (no GPU, no CUDA torch: one line says why).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
OUT=${OUTPUT_DIR:-output/gpu_check}
ITERS=${GPU_CHECK_ITERS:-300}
CONFIG=configs/quickstart/deformable_detr_r18_synthetic.yaml
cd "$ROOT"
# This checkout's package first, whether or not it was pip-installed (the in-place build lands here).
export PYTHONPATH="$ROOT/projects/HybridDETR${PYTHONPATH:+:$PYTHONPATH}"

refuse() { echo "gpu_check: cannot run: $*" >&2; exit 2; }
# detectron2 logs the loss every 20 iterations: the "loss decreased" check needs several records.
[[ "$ITERS" =~ ^[0-9]+$ ]] && [ "$ITERS" -ge 100 ] || refuse "GPU_CHECK_ITERS must be an integer >= 100, got '$ITERS'"

# -- 0. can this machine run it at all? ---------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q "^GPU "; then
    refuse "no NVIDIA GPU on this machine (nvidia-smi is missing or lists none); run it on a machine with a GPU"
fi
"$PY" -c "import torch" 2>/dev/null || refuse "$PY cannot import torch; run bash tools/bootstrap.sh first (or set PYTHON=...)"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    refuse "$("$PY" -c "import torch; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU')"); install a CUDA build of torch"
fi
"$PY" -c "import detectron2.engine" 2>/dev/null || refuse "$PY cannot import detectron2; run bash tools/bootstrap.sh first"

mkdir -p "$OUT"
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name())")
ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
SUMMARY=()
FAILED=0
record() {  # STEP OK|FAIL SECONDS FIGURES
    SUMMARY+=("$(printf '%-10s %-5s %5ss  %s' "$1" "$2" "$3" "$4")")
    [ "$2" = OK ] || FAILED=1
}
summary_and_exit() {
    echo
    echo "=== gpu_check summary: $GPU (sm $ARCH), torch $("$PY" -c "import torch; print(torch.__version__)"), logs in $OUT ==="
    printf '%s\n' "${SUMMARY[@]}"
    if [ "$FAILED" = 0 ]; then echo "gpu_check: PASS"; else echo "gpu_check: FAIL"; fi
    exit "$FAILED"
}
# Runs "$@" under a time limit with its output in $OUT/<name>.log; sets RC and SECONDS_TAKEN.
run_step() {
    local name=$1 limit=$2
    shift 2
    echo "[gpu_check] $name: $*"
    local start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    RC=$?
    SECONDS_TAKEN=$(( $(date +%s) - start ))
    [ "$RC" = 124 ] && echo "timed out after ${limit}s" >> "$OUT/$name.log"
}
last_lines() { tail -n "${2:-3}" "$OUT/$1.log" | tr '\n' ' ' | cut -c1-200; }

# -- 1. build (only when the importable extension has no CUDA kernels or fails its check) -------------
HAS_CUDA_OP='import sys, hybrid_detr.layers as l; sys.exit(0 if l._C is not None and l._C.with_cuda() else 1)'
build() {  # extra environment for the compiler, e.g. CXX=...; sets RC and SECONDS_TAKEN
    run_step build 420 env "$@" FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
        "$PY" setup.py build_ext --inplace --force
}
# The op's error path too (tools/check_extension.py): a compiler that links its own libstdc++ builds an
# extension that crashes on its first error message; then one rebuild with the system's g++.
extension_works() { "$PY" tools/check_extension.py > "$OUT/check_extension.log" 2>&1; }
if "$PY" -c "$HAS_CUDA_OP" 2>/dev/null && extension_works; then
    record build OK 0 "already built with CUDA kernels"
else
    build
    note="CUDA kernels for sm $ARCH"
    if [ "$RC" = 0 ] && ! extension_works && [ -x /usr/bin/g++ ] && [ "${CXX:-}" != /usr/bin/g++ ]; then
        note="$note, rebuilt with /usr/bin/g++: the build with CXX=${CXX:-c++} failed tools/check_extension.py"
        build CXX=/usr/bin/g++ CC=/usr/bin/gcc
    fi
    if [ "$RC" = 0 ] && "$PY" -c "$HAS_CUDA_OP" 2>/dev/null && extension_works; then
        record build OK "$SECONDS_TAKEN" "$note"
    else
        record build FAIL "$SECONDS_TAKEN" "exit $RC: $(last_lines build) $(last_lines check_extension 1)"
        summary_and_exit  # nothing else can run on the GPU without working kernels
    fi
fi

# -- 2. the CUDA op tests ---------------------------------------------------------------------------------
run_step op_tests 240 "$PY" -m pytest -q -p no:cacheprovider tests/layers/test_ms_deform_attn_cuda.py
result=$(grep -E "[0-9]+ (passed|failed|error)" "$OUT/op_tests.log" | tail -n 1)
if [ "$RC" = 0 ] && ! grep -q "skipped" <<< "$result"; then
    record op_tests OK "$SECONDS_TAKEN" "$result"
else
    record op_tests FAIL "$SECONDS_TAKEN" "exit $RC: ${result:-$(last_lines op_tests)} (a skip counts as a failure here)"
fi

# -- 3. the op benchmark --------------------------------------------------------------------------------
run_step benchmark 150 "$PY" tools/benchmark_op.py --device cuda --reps 5
if [ "$RC" = 0 ]; then
    # speed-ups of ours over the reference, forward and forward + backward, per configuration (the table's
    # rows: label in columns 0-25, pass in 26-34, then ours ms, ref ms, speed-up)
    figures=$("$PY" - "$OUT/benchmark.log" <<'EOF' 2>/dev/null
import sys
rows = []
for line in open(sys.argv[1]):
    if line[26:35].strip() in ("fwd", "fwd+bwd"):
        ours_ms, _, speed_up = line[35:].split()[:3]
        rows.append(f"{line[:26].split(')')[0]}) {line[26:35].strip()} {speed_up} ({ours_ms} ms)")
print("; ".join(rows))
EOF
)
    record benchmark OK "$SECONDS_TAKEN" "speed-up over the reference: ${figures:-see log}"
else
    record benchmark FAIL "$SECONDS_TAKEN" "exit $RC: $(last_lines benchmark)"
fi

# -- 4. a short fp16-AMP training of the quickstart on the GPU ----------------------------------------------
TRAIN_DIR="$OUT/quickstart_amp"
rm -rf "$TRAIN_DIR"
run_step train 240 "$PY" projects/HybridDETR/train_net.py --config-file "$CONFIG" \
    MODEL.DEVICE cuda SOLVER.AMP.ENABLED True SOLVER.MAX_ITER "$ITERS" SOLVER.STEPS "($(( ITERS * 5 / 6 )),)" \
    SOLVER.CHECKPOINT_PERIOD 100000 DATALOADER.NUM_WORKERS 4 OUTPUT_DIR "$TRAIN_DIR"
# first and last logged total_loss, and whether every logged loss is finite
losses=$("$PY" - "$TRAIN_DIR/metrics.json" <<'EOF' 2>/dev/null
import json, math, sys
values = []
for line in open(sys.argv[1]):
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        continue
    if "total_loss" in record:
        values.append(record["total_loss"])
finite = all(math.isfinite(v) for v in values)
print(f"{values[0]:.3f} {values[-1]:.3f} {int(finite and values[-1] < values[0])}")
EOF
)
speed=$(grep -o "Overall training speed: .*" "$OUT/train.log" | tail -n 1)
if [ "$RC" = 0 ] && [ -f "$TRAIN_DIR/model_final.pth" ] && [ "${losses##* }" = 1 ]; then
    read -r first_loss last_loss _ <<< "$losses"
    record train OK "$SECONDS_TAKEN" "$ITERS it fp16 AMP, total_loss $first_loss -> $last_loss; ${speed:-speed not logged}"
else
    record train FAIL "$SECONDS_TAKEN" "exit $RC, losses (first last decreasing) '${losses:-none}': $(last_lines train)"
fi

# -- 5. evaluation of that checkpoint ---------------------------------------------------------------------
if [ -f "$TRAIN_DIR/model_final.pth" ]; then
    run_step evaluate 150 "$PY" projects/HybridDETR/train_net.py --config-file "$CONFIG" --eval-only \
        MODEL.DEVICE cuda MODEL.WEIGHTS "$TRAIN_DIR/model_final.pth" OUTPUT_DIR "$TRAIN_DIR"
    ap=$(grep -A2 "copypaste: Task: bbox" "$OUT/evaluate.log" | tail -n 1 | sed 's/.*copypaste: //')
    images_per_s=$(grep -o "Inference speed[^:]*: [0-9.]* images/s" "$OUT/evaluate.log" | tail -n 1 | sed 's/.*: //')
    if [ "$RC" = 0 ] && [ -n "$ap" ]; then
        record evaluate OK "$SECONDS_TAKEN" "AP,AP50,AP75,APs,APm,APl = $ap; ${images_per_s:-?} (batch 1)"
    else
        record evaluate FAIL "$SECONDS_TAKEN" "exit $RC: $(last_lines evaluate)"
    fi
else
    record evaluate FAIL 0 "no checkpoint: training failed"
fi

summary_and_exit
