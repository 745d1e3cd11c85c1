#!/usr/bin/env python
"""Compare HybridDETR with an official model on the CPU: same (seeded, random) weights through our
converter, same images, max |difference| of the last decoder layer's logits and boxes.

    python tools/compare_official.py --official-src /path/to/Deformable-DETR deformable_detr --variant two_stage
    python tools/compare_official.py --official-src /path/to/DAC-DETR dac_detr
    python tools/compare_official.py --official-src /path/to/DAC-DETR dac_detr_swin_l [--inputs single batch]
    PYTHONPATH=/path/to/mmcv-1.7.0-python python tools/compare_official.py --official-src /path/to/Co-DETR co_detr
    PYTHONPATH=/path/to/mmcv-1.7.0-python python tools/compare_official.py --official-src /path/to/Co-DETR co_dino
    python tools/compare_official.py --official-src /path/to/DINO dino --scales 4 [--inputs single batch coco]
    python tools/compare_official.py --official-src /path/to/DINO dino_swin_l --scales 5 [--inputs single batch]

The official model is built from its own source tree (given by path, never copied here), with its
CUDA op replaced by its own pure-PyTorch `ms_deform_attn_core_pytorch`; small import-time shims
for a recent torch/torchvision are applied by `hybrid_detr.analysis.official_comparison`, not in
their files. Every parameter and buffer of the official model is drawn at random (seeded), so that
no zero-initialised path hides a difference; its state dict is converted with `hybrid_detr.converters` and loaded strictly into our
model built from the shipped config. Logits are compared after mapping the 91 COCO-id slots to
detectron2's 80 classes. Prints one line per compared tensor and exits 1 above --tolerance.

dac_detr: the DAC-DETR release's model (`configs/r50_deformplus_cdn_ice_ep12.sh`: two-stage + box
refinement, FFN 2048, dropout 0, 900 queries, mixed selection, look-forward-twice, CDN's label
embedding), in eval mode; its one-to-one `pred_logits` / `pred_boxes` against our DAC model's
`raw_predictions`. Its Swin module imports mmcv_custom's `load_checkpoint` and mmdet's `get_root_logger`
(for ImageNet weights only): both are stubbed at import time; the Swin takes its layers from the installed timm.

dac_detr_swin_l: the DAC-DETR Swin-L release (`configs/swin_deformplus_cdn_ice_ep12.sh`: the same model with
`--backbone swin_large_window12`), its official Swin built without ImageNet weights and with gradient
checkpointing off (it recomputes activations in the backward pass only), against
`configs/coco/dac_dino_swin_l_12ep_release.yaml`; by default on `single` and `batch` (`--inputs coco` adds the
COCO-sized image, slow on a CPU).

co_detr: Co-DETR's Co-Deformable-DETR R-50 (`projects/configs/co_deformable_detr/
co_deformable_detr_r50_1x_coco.py`), built with mmdet 2.x from `--official-src` (a full Co-DETR
checkout: its `mmdet/` and `projects/`) and mmcv 1.3.17-1.7.0's Python package, which must be
importable (e.g. PYTHONPATH with the unpacked `mmcv==1.7.0` sdist plus addict, yapf, platformdirs,
terminaltables). mmcv's compiled ops are not needed: `mmcv._ext` is stubbed at import time, and
mmcv's MultiScaleDeformableAttention runs its own pure-PyTorch core on the CPU; fairscale, timm,
einops and mmcv_custom (Swin / ViT backbones only) are stubbed too. Its query head's last-layer
`all_cls_scores` / `all_bbox_preds` (80 classes) against our `raw_predictions`; every weight of
the whole detector (aux heads included) drawn at random, the aux heads dropped by the converter.
dac_detr(_swin_l) and co_detr are compared on `--inputs` (default: `single`, two images one at a time; `batch`, the
same two as one padded batch; `coco`, one 800 x 1066 image), free-running and with our top-k ranked by the
official encoder scores.

co_dino: Co-DETR's Co-DINO R-50 (`projects/configs/co_dino/co_dino_5scale_r50_1x_coco.py`), built as co_detr
(same checkout and mmcv), against `configs/coco/co_dino_r50_12ep_query_head.yaml`: the query head's last-layer
outputs on `--inputs` (default all three), free-running and with our top-k ranked by the official encoder
scores (`hybrid_detr.analysis.co_dino_comparison`).

dino: DINO R-50 (IDEA-Research/DINO, `config/DINO/DINO_{4,5}scale.py` + the released script's options),
4 or 5 scales (`--scales`), against `configs/coco/dino_r50_{4,5}scale_12ep.yaml`; timm (its Swin /
ConvNeXt modules only) stubbed. Compared on two images one at a time (`single`), the same two as a
padded batch (`batch`) and one COCO-sized image, 800 x 1066 (`coco`); free-running and with our top-k
ranked by the official encoder scores, as for the mixed-selection models above. The 11 non-COCO slots
of the official encoder class head are set to never win its max over classes before the conversion
(`hybrid_detr.analysis.dino_comparison` says why).

dino_swin_l: DINO Swin-L (`config/DINO/DINO_4scale_swin.py`; 5 scales: with DINO_5scale.py's levels), the same
comparison with the official Swin (from the installed timm's layers) against `configs/coco/dino_swin_l_{4,5}scale_12ep.yaml`,
by default on `single` and `batch` only (Swin-L on an 800 x 1066 image is slow on a CPU; `--inputs coco` adds it).
"""
import argparse
import os
import sys

try:
    import hybrid_detr  # noqa: F401
except ImportError as error:
    sys.exit(f"cannot import hybrid_detr ({error}): run `bash tools/bootstrap.sh`")

import torch  # noqa: E402

from hybrid_detr.analysis.co_dino_comparison import co_dino_verdict, compare_co_dino  # noqa: E402
from hybrid_detr.analysis.dino_comparison import compare_dino, dino_verdict  # noqa: E402
from hybrid_detr.analysis.official_comparison import compare_official, verdict  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-src", required=True, help="a checkout of the official repository")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "model", choices=["deformable_detr", "dac_detr", "dac_detr_swin_l", "co_detr", "dino", "dino_swin_l", "co_dino"]
    )
    parser.add_argument(
        "--variant", choices=["plain", "refine", "two_stage"], default="plain", help="deformable_detr only (dac_detr, co_detr: their release)"
    )
    parser.add_argument("--scales", type=int, choices=[4, 5], default=4, help="dino, dino_swin_l: the 4- or 5-scale model")
    parser.add_argument(
        "--inputs", nargs="+", choices=["single", "batch", "coco"], default=None,
        help="dino, dino_swin_l, co_dino, dac_detr, dac_detr_swin_l, co_detr: images one at a time, as a padded batch, "
        "one 800 x 1066 image (default: all three for dino and co_dino, single and batch for dino_swin_l and "
        "dac_detr_swin_l, single for dac_detr and co_detr)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.model in ("dino", "dino_swin_l", "co_dino"):
        default = ("single", "batch") if args.model == "dino_swin_l" else ("single", "batch", "coco")
        inputs = tuple(args.inputs or default)
        if args.model in ("dino", "dino_swin_l"):
            backbone = "swin" if args.model == "dino_swin_l" else "resnet"
            result = compare_dino(args.official_src, args.scales, args.seed, inputs, backbone=backbone)
            lines, ok = dino_verdict(result, args.tolerance)
        else:
            lines, ok = co_dino_verdict(compare_co_dino(args.official_src, args.seed, inputs), args.tolerance)
        print("\n".join(lines))
        return 0 if ok else 1
    default = ("single", "batch") if args.model == "dac_detr_swin_l" else ("single",)
    result = compare_official(args.model, args.official_src, args.variant, args.seed, tuple(args.inputs or default))
    line, ok = verdict(args.model, args.variant, result, args.tolerance)
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
