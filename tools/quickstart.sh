#!/usr/bin/env bash
# The main job: installs what is missing (tools/bootstrap.sh), trains the quickstart model on the CPU
# (Deformable DETR, ResNet-18 from scratch, on the embedded synthetic shapes dataset, generated on
# first use under $DETECTRON2_DATASETS, default ./datasets), then evaluates it: the COCO AP table,
# inference speed (images/s) and GFLOPs; last, draws the training curves and detections on a few
# val images (PNGs, paths printed).
#   bash tools/quickstart.sh                       # as configured (~10 min of training on 2 free cores)
#   bash tools/quickstart.sh SOLVER.MAX_ITER 200 SOLVER.STEPS "(150,)"   # KEY VALUE pairs override the config (both steps)
#   OUTPUT_DIR=/tmp/qs bash tools/quickstart.sh    # where checkpoints, logs and metrics go
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
CONFIG=configs/quickstart/deformable_detr_r18_synthetic.yaml
OUT=${OUTPUT_DIR:-output/quickstart/deformable_detr_r18_synthetic}

bash "$ROOT/tools/bootstrap.sh"
cd "$ROOT"

start=$(date +%s)
echo "[quickstart] training $CONFIG -> $OUT"
"$PY" projects/HybridDETR/train_net.py --config-file "$CONFIG" OUTPUT_DIR "$OUT" "$@"
trained=$(date +%s)

echo "[quickstart] evaluating $OUT/model_final.pth"
"$PY" projects/HybridDETR/train_net.py --config-file "$CONFIG" --eval-only \
    MODEL.WEIGHTS "$OUT/model_final.pth" OUTPUT_DIR "$OUT" "$@"
done_at=$(date +%s)

echo "[quickstart] done: training (with its final evaluation) $(( (trained - start) / 60 )) min $(( (trained - start) % 60 )) s," \
     "evaluation + benchmark $(( done_at - trained )) s. Logs, metrics.json, TensorBoard events and checkpoints: $OUT"

# Pictures: the training curves (loss terms and AP over iterations, from metrics.json) and the
# trained model's detections on the first val images.
echo "[quickstart] pictures"
curves=$("$PY" tools/plot_metrics.py "$OUT")
val_images="${DETECTRON2_DATASETS:-datasets}/hybrid_synthetic/val/images"
demos=()
for image in $(ls "$val_images" | sort | head -n 3); do
    demo="$OUT/demo/${image%.*}.png"
    "$PY" projects/HybridDETR/demo.py --config-file "$CONFIG" --input "$val_images/$image" --output "$demo" \
        --confidence-threshold 0.3 --opts MODEL.WEIGHTS "$OUT/model_final.pth" "$@" > /dev/null
    demos+=("$demo")
done
echo "[quickstart] training curves: $curves"
echo "[quickstart] detections (score >= 0.3) on val images: ${demos[*]}"
