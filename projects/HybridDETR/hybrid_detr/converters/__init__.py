"""Converters of official checkpoints (Deformable DETR, and the papers' releases) into detectron2
checkpoints of HybridDETR: one converter per model, registered by name in `CONVERTERS`, sharing
the loading / backbone / class-mapping / saving helpers of `common.py`.

    python tools/convert_official.py deformable_detr r50_deformable_detr-checkpoint.pth out.pth

A converter is a function `(official_state_dict) -> Conversion`; `convert_file` loads the input
safely, runs it and writes the output atomically. Add a model with `@register_converter("name")`
in a module imported below.
"""
from .common import (
    CONVERTERS,
    Conversion,
    ConversionError,
    convert_file,
    load_official_checkpoint,
    register_converter,
    save_detectron2_checkpoint,
)
from . import deformable_detr  # noqa: F401  (registers "deformable_detr")
from . import dac_detr  # noqa: F401  (registers "dac_detr")
from . import co_detr  # noqa: F401  (registers "co_detr")
from . import dino  # noqa: F401  (registers "dino")
from . import co_dino  # noqa: F401  (registers "co_dino")
from . import swin  # noqa: F401  (registers "co_dino_swin_l"; Swin backbone weights)

__all__ = [
    "CONVERTERS",
    "Conversion",
    "ConversionError",
    "convert_file",
    "load_official_checkpoint",
    "register_converter",
    "save_detectron2_checkpoint",
]
