"""Each mode's config is its baseline config plus the mode: a comparison of the two measures the
paper's idea and nothing else. Only the keys named here may differ."""
import os

import pytest

from hybrid_detr.config import load_config
from model_helpers import flatten_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
MODE = "MODEL.HYBRID_DETR.DECODER_MODE"
PLUS_PLUS = {"MODEL.HYBRID_DETR.TWO_STAGE": True, "MODEL.HYBRID_DETR.WITH_BOX_REFINE": True}




@pytest.mark.parametrize(
    "config, baseline, expected",
    [
        ("quickstart/dac_detr_r18_synthetic.yaml", "quickstart/deformable_detr_r18_synthetic.yaml", {MODE: "dac"}),
        ("quickstart/smca_detr_r18_synthetic.yaml", "quickstart/deformable_detr_r18_synthetic.yaml", {MODE: "smca"}),
        ("quickstart/dense_detr_r18_synthetic.yaml", "quickstart/deformable_detr_r18_synthetic.yaml", {MODE: "dense"}),
        # dense vs smca: the Gaussian prior is the only difference
        ("quickstart/smca_detr_r18_synthetic.yaml", "quickstart/dense_detr_r18_synthetic.yaml", {MODE: "smca"}),
        # Co-DETR's own Faster R-CNN sizes, scaled to the quickstart's ~128 px images (read by co_detr only).
        ("quickstart/co_detr_r18_synthetic.yaml", "quickstart/deformable_detr_r18_synthetic.yaml", {MODE: "co_detr", **{
            f"MODEL.HYBRID_DETR.CO_DETR.{k}": v for k, v in {
                "RPN_PRE_NMS_TOPK_TRAIN": 300, "RPN_POST_NMS_TOPK_TRAIN": 100, "ROI_BATCH_SIZE_PER_IMAGE": 32,
                "ROI_FC_DIM": 256, "ROI_POOLER_SAMPLING_RATIO": 1,
            }.items()
        }}),
        # the papers' "Deformable-DETR" rows are two-stage + box refinement ("++")
        ("coco/dac_deformable_detr_r50_12ep.yaml", "coco/deformable_detr_r50_two_stage_ffn2048_12ep.yaml", {MODE: "dac"}),
        (
            "coco/deformable_detr_r50_two_stage_ffn2048_12ep.yaml",
            "coco/deformable_detr_r50_12ep.yaml",
            {**PLUS_PLUS, "MODEL.HYBRID_DETR.DIM_FEEDFORWARD": 2048},
        ),
        # Co-DETR's baseline is its release's query head (mixed selection, look-forward-twice, dropout 0)
        ("coco/co_deformable_detr_r50_12ep.yaml", "coco/co_deformable_detr_r50_12ep_query_head.yaml", {MODE: "co_detr"}),
        (
            "coco/co_deformable_detr_r50_12ep_query_head.yaml",
            "coco/deformable_detr_r50_two_stage_ffn2048_12ep.yaml",
            {f"MODEL.HYBRID_DETR.{k}": v for k, v in {
                "DROPOUT": 0.0, "MIXED_SELECTION": True, "LOOK_FORWARD_TWICE": True, "TWO_STAGE_MASK_INVALID": False,
            }.items()},
        ),
        ("coco/smca_deformable_detr_r50_50ep.yaml", "coco/deformable_detr_r50_50ep.yaml", {MODE: "smca"}),
        # the denoising quickstarts: their base plus the mode
        ("quickstart/dn_detr_r18_synthetic.yaml", "quickstart/deformable_detr_r18_synthetic.yaml", {MODE: "dn"}),
        ("quickstart/dn_dac_detr_r18_synthetic.yaml", "quickstart/dac_detr_r18_synthetic.yaml", {MODE: "dn+dac"}),
        ("quickstart/co_dino_r18_synthetic.yaml", "quickstart/co_detr_r18_synthetic.yaml", {MODE: "dn+co_detr"}),
        # Co-DINO R-50: its query head is DINO 5-scale's with a head per decoder layer and the release's solver;
        # the training config adds the Co-DETR branch only
        ("coco/co_dino_r50_12ep.yaml", "coco/co_dino_r50_12ep_query_head.yaml", {MODE: "dn+co_detr", "MODEL.HYBRID_DETR.CO_DETR.HEAD_EMBED": "none"}),
        (
            "coco/co_dino_r50_12ep_query_head.yaml",
            "coco/dino_r50_5scale_12ep.yaml",
            # Both train on all 118,287 images with a batch of 16 (7,393 iterations per epoch).
            {"MODEL.HYBRID_DETR.SHARE_DECODER_HEADS": False, "MODEL.HYBRID_DETR.GIOU_EPS": 0.0, "SOLVER.BASE_LR": 0.0002},
        ),
    ],
)
def test_mode_config_is_its_baseline_plus_the_mode(config, baseline, expected):
    mode_keys = flatten_config(load_config(os.path.join(CONFIGS, config)))
    base_keys = flatten_config(load_config(os.path.join(CONFIGS, baseline)))
    differ = {k: mode_keys[k] for k in mode_keys if mode_keys[k] != base_keys[k] and k != "OUTPUT_DIR"}
    assert differ == expected
