"""Backbones beyond detectron2's own, registered in detectron2's BACKBONE_REGISTRY on import
(`hybrid_detr.modeling` imports every subpackage, so `MODEL.BACKBONE.NAME` finds them):

- `build_swin_backbone` (`swin.py`): Swin Transformer T / S / B / L (windows 7 and 12) from timm, with the
  detection Swin's padding (any image size), one LayerNorm per output stage, gradient checkpointing and
  frozen stages. Its config keys (`MODEL.SWIN.*`) come from `add_swin_config`.

R-101 needs nothing here: detectron2's ResNet with `MODEL.RESNETS.DEPTH: 101`.
"""
from .swin import SWIN_STAGE_NAMES, SwinBackbone, add_swin_config, build_swin_backbone

__all__ = ["SWIN_STAGE_NAMES", "SwinBackbone", "add_swin_config", "build_swin_backbone"]
