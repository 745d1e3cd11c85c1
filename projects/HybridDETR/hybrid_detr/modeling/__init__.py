"""HybridDETR's models. Importing this package registers the `HybridDETR` meta-architecture and
every decoder mode: the baseline ("deformable") and one package per paper ("dac", "smca",
"co_detr"), each registering itself through the contract in `modes.py`."""
from . import deformable  # noqa: F401  (registers DECODER_MODE "deformable")
from . import co_detr, dac, smca  # noqa: F401  (register "co_detr", "dac", "smca")
from .meta_arch import HybridDETR
from .modes import DECODER_MODES, BranchInputs, parse_decoder_mode, register_decoder_mode

__all__ = ["HybridDETR", "BranchInputs", "DECODER_MODES", "parse_decoder_mode", "register_decoder_mode"]
