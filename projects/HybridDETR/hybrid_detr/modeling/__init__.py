"""HybridDETR's models. Importing this package registers the `HybridDETR` meta-architecture and
every decoder mode: the baseline ("deformable", `deformable.py`), then each subpackage of this
package (one per paper: "dac", "smca" and "dense", "co_detr", ...) and the modules of the
`hybrid_detr.decoder_modes` entry point group, each registering itself through the contract in
`modes.py`. A new mode is a new subpackage: nothing here lists them."""
from . import deformable  # noqa: F401  (registers DECODER_MODE "deformable", the default cross-attention)
from .meta_arch import HybridDETR
from .modes import (
    DECODER_MODES,
    BranchInputs,
    ExtraQueries,
    MainPassHook,
    MainPassInputs,
    discover_decoder_modes,
    parse_decoder_mode,
    register_decoder_mode,
    unregister_decoder_mode,
)

discover_decoder_modes(__name__, __path__)

__all__ = [
    "HybridDETR",
    "BranchInputs",
    "MainPassInputs",
    "ExtraQueries",
    "MainPassHook",
    "DECODER_MODES",
    "parse_decoder_mode",
    "register_decoder_mode",
    "unregister_decoder_mode",
]
