"""Config keys of HybridDETR, added to a detectron2 config by `add_hybrid_detr_config`, and
`load_config` (a YAML file and command-line overrides, with clear errors for unknown keys).

Every key has a default here, so a typo in a YAML file or on the command line is rejected by
detectron2 ("Non-existent config key").
"""
import difflib

from detectron2.config import CfgNode, get_cfg
from detectron2.config import CfgNode as CN

from .modeling import modes  # noqa: F401  (importing the package registers every decoder mode)
from .modeling.modes import add_mode_configs

__all__ = ["add_hybrid_detr_config", "get_hybrid_detr_cfg", "load_config", "merge_overrides", "mode_spec_overrides"]


def add_hybrid_detr_config(cfg):
    cfg.MODEL.HYBRID_DETR = CN()
    model = cfg.MODEL.HYBRID_DETR
    # A registered mode ("deformable" baseline, "dac", "smca", "dense", "co_detr", ...), or several
    # joined by "+" ("smca+dac").
    model.DECODER_MODE = "deformable"
    model.NUM_CLASSES = 80
    model.IN_FEATURES = ["res3", "res4", "res5"]
    # Levels beyond IN_FEATURES are made by 3x3 stride-2 convs on the last one.
    model.NUM_FEATURE_LEVELS = 4
    model.HIDDEN_DIM = 256
    model.NHEADS = 8
    model.ENC_LAYERS = 6
    model.DEC_LAYERS = 6
    model.DIM_FEEDFORWARD = 1024
    model.DROPOUT = 0.1
    model.ENC_N_POINTS = 4
    model.DEC_N_POINTS = 4
    model.NUM_QUERIES = 300
    model.WITH_BOX_REFINE = False
    model.TWO_STAGE = False
    # Two-stage only: padding tokens and proposals outside (0.01, 0.99) are left out of the top-k
    # and of the encoder loss (ours). False: as the official code, they are ranked with the rest
    # (zeroed feature, box (1, 1, 1, 1)) and trained as background; what a converted official
    # checkpoint needs to give exactly the official outputs.
    model.TWO_STAGE_MASK_INVALID = True
    # Two-stage only: DINO's mixed query selection (as in H-DETR, DAC-DETR and Co-DETR's "++"
    # query head): reference boxes and positional queries from the selected encoder proposals,
    # content queries learned (an embedding of NUM_QUERIES x HIDDEN_DIM). Off: Deformable DETR's
    # two-stage, content from the proposals too.
    model.MIXED_SELECTION = False
    # Box refinement only: DINO's look-forward-twice. Layer i's box for the loss is its delta
    # added to layer i-1's box before the detach, so layer i's loss also trains layer i-1; the
    # reference layer i attends around stays detached (same forward values, other gradients).
    model.LOOK_FORWARD_TWICE = False
    # DINO's architecture (Zhang et al., ICLR 2023; IDEA-Research/DINO, file:line of models/dino/ and
    # config/DINO/ below), as options that are off here: configs/coco/dino_r50_*scale_12ep.yaml turn them on.
    # Each decoder layer's positional query is recomputed from its reference box: an MLP (Linear 2d->d,
    # ReLU, Linear d->d) of the box's sine embedding (deformable_transformer.py:609 `ref_point_head`,
    # :681-696; utils.py:138-164 order y, x, w, h, temperature 10000) of the box scaled by level 0's
    # valid ratios. QueryGroup.position is then unused. Needs TWO_STAGE (4-d reference boxes).
    model.QUERY_POSITION_FROM_REFERENCE = False
    # One LayerNorm on every decoder layer's output before the heads; the next layer and the next
    # reference (box head on the un-normed output) are as without it (deformable_transformer.py:135,
    # :731-755; dino.py:277-285).
    model.DECODER_FINAL_NORM = False
    # One class head and one box head shared by every decoder layer even with WITH_BOX_REFINE, and a
    # separate pair for the two-stage encoder (dino.py:141-169; DINO_4scale.py:94-95 dec_pred_*_embed_share
    # True, :66-67 two_stage_*_embed_share False). Off: a head per layer with refinement, else one for all.
    model.SHARE_DECODER_HEADS = False
    # Two-stage only: rank the encoder proposals by "objectness" (logit 0, Deformable DETR's
    # class-agnostic head) or "max_class" (the best class logit, deformable_transformer.py:342).
    model.TWO_STAGE_RANKING = "objectness"
    # Two-stage only: the encoder ("enc_") loss. "class_agnostic": every token, all targets labelled 0
    # (Deformable DETR). "class_aware_topk": the selected top-k proposals only, with the real labels
    # and the decoder's loss weights (DINO's "interm" loss: deformable_transformer.py:345-350,416-417,
    # dino.py:296-300,588-604, interm_loss_coef 1.0 DINO_4scale.py:85).
    model.TWO_STAGE_ENCODER_LOSS = "class_agnostic"
    # The clamp of inverse_sigmoid on the decoder's references (Deformable DETR 1e-5; DINO 1e-3,
    # util/misc.py:575).
    model.INVERSE_SIGMOID_EPS = 1e-5
    # The feature maps' sine position embedding: temperature, and the offset added to the cumulative
    # position before it is divided by the valid extent (Deformable DETR 10000 and -0.5; DINO 20 and 0:
    # position_encoding.py:62-108,142-147, DINO_4scale.py:30-31 pe_temperatureH/W = 20).
    model.POSITION_TEMPERATURE = 10000
    model.POSITION_OFFSET = -0.5
    model.AUX_LOSS = True
    # Loss weights (focal, L1, GIoU) and the Hungarian matcher's costs.
    model.FOCAL_ALPHA = 0.25
    model.FOCAL_GAMMA = 2.0
    model.CLASS_WEIGHT = 2.0
    model.L1_WEIGHT = 5.0
    model.GIOU_WEIGHT = 2.0
    # Added to the union and to the enclosing box's area in the GIoU loss: 0 as the official Deformable
    # DETR and DAC-DETR (util/box_ops.py `generalized_box_iou`); DINO adds 1e-6 (util/box_ops.py:37, :63),
    # which its configs set.
    model.GIOU_EPS = 0.0
    model.COST_CLASS = 2.0
    model.COST_BBOX = 5.0
    model.COST_GIOU = 2.0
    # Inference keeps the TEST.DETECTIONS_PER_IMAGE best (query, class) pairs (Deformable DETR: 100).
    # NMS_THRESH_TEST > 0 adds class-wise NMS first, over the NMS_PRE_TOPK_TEST best pairs: DAC-DETR's
    # release evaluates with 0.8, 10000 and 300 detections (for like-for-like AP with its numbers).
    model.NMS_THRESH_TEST = 0.0
    model.NMS_PRE_TOPK_TEST = 10000

    # Each mode's keys live next to its code and come with its registration.
    add_mode_configs(cfg)
    # MODEL.SWIN.* sits with the Swin backbone (modeling/backbones/swin.py).
    from .modeling.backbones import add_swin_config

    add_swin_config(cfg)
    _add_solver_and_input_config(cfg)


def _add_solver_and_input_config(cfg):
    # Exponential moving average of the weights, checkpointed, resumed and used for evaluation.
    cfg.MODEL_EMA = CN()
    cfg.MODEL_EMA.ENABLED = False
    cfg.MODEL_EMA.DECAY = 0.999
    # With SOLVER.AMP.ENABLED: "auto" (bfloat16 on the CPU, float16 with loss scaling on CUDA),
    # "float16" (CUDA only) or "bfloat16" (engine/mixed_precision.py).
    cfg.SOLVER.AMP.PRECISION = "auto"
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # Ours, off by default (the official code steps torch's per-tensor loop): the optimizer's fused
    # kernel (one pass over all parameters; CPU and CUDA), the same update up to float rounding and
    # about 3.5x faster on the CPU for the quickstart model (MODEL_ZOO.md).
    cfg.SOLVER.FUSED_OPTIMIZER = False
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Deformable DETR trains the offset and reference-point projections at lr * 0.1 too.
    cfg.SOLVER.LINEAR_PROJ_MULTIPLIER = 0.1
    cfg.SOLVER.LINEAR_PROJ_NAMES = ["sampling_offsets", "reference_points"]
    # DETR augmentation: with probability 0.5, resize to one of these shortest sides and crop
    # (INPUT.CROP) before the multi-scale resize.
    cfg.INPUT.DETR_CROP_RESIZE = [400, 500, 600]


def get_hybrid_detr_cfg() -> CfgNode:
    """detectron2's default config with HybridDETR's keys added."""
    cfg = get_cfg()
    add_hybrid_detr_config(cfg)
    return cfg


def _all_keys(node: CfgNode, prefix=""):
    for name, value in node.items():
        key = prefix + name
        yield key
        if isinstance(value, CfgNode):
            yield from _all_keys(value, key + ".")


def _unknown_key_error(cfg: CfgNode, key: str, where: str) -> KeyError:
    close = difflib.get_close_matches(key, list(_all_keys(cfg)), n=1, cutoff=0.8)
    hint = f"; did you mean {close[0]}?" if close else ""
    return KeyError(f"Non-existent config key {key} ({where}){hint}")


def _check_override_keys(cfg: CfgNode, opts):
    """yacs rejects an unknown key in `merge_from_list` with a bare AssertionError; we want a
    KeyError naming the key, as `merge_from_file` gives."""
    if len(opts) % 2:
        raise ValueError(f"Config overrides must be KEY VALUE pairs, got an odd number: {list(opts)}")
    for key in opts[0::2]:
        if cfg.key_is_deprecated(key) or cfg.key_is_renamed(key):
            continue  # yacs explains these itself
        node = cfg
        for part in key.split("."):
            if not isinstance(node, CfgNode) or part not in node:
                raise _unknown_key_error(cfg, key, "command-line override")
            node = node[part]


def load_config(config_file: str = "", opts=()) -> CfgNode:
    """`get_hybrid_detr_cfg()` merged with `config_file` (if given) then `opts` (KEY VALUE ...).

    An unknown key raises KeyError naming the key (and the closest existing key, if any).
    """
    cfg = get_hybrid_detr_cfg()
    if config_file:
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:
            message = e.args[0] if e.args else ""
            prefix = "Non-existent config key: "
            if isinstance(message, str) and message.startswith(prefix):
                raise _unknown_key_error(cfg, message[len(prefix):], f"in {config_file}") from None
            raise
    merge_overrides(cfg, opts)
    return cfg


def merge_overrides(cfg: CfgNode, opts) -> CfgNode:
    """`cfg.merge_from_list(opts)` (KEY VALUE ...), an unknown key raising KeyError naming it."""
    opts = list(opts or [])
    _check_override_keys(cfg, opts)
    cfg.merge_from_list(opts)
    return cfg


def mode_spec_overrides(spec: str):
    """KEY VALUE overrides for a decoder-mode spec "MODE" or "MODE@KEY=VALUE@KEY=VALUE" (the tools that
    run several modes side by side take these, so that variants of one mode can be compared)."""
    mode, *overrides = spec.split("@")
    opts = ["MODEL.HYBRID_DETR.DECODER_MODE", mode]
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ValueError(f"mode spec {spec!r}: overrides after '@' must be KEY=VALUE, got {override!r}")
        opts += [key, value]
    return opts

