"""Layers of HybridDETR: multi-scale deformable attention (compiled op + pure-PyTorch reference)."""
from .ms_deform_attn import MSDeformAttn
from .flop_handles import flop_count_handles
from .ms_deform_attn_func import (
    extension_available,
    ms_deform_attn,
    ms_deform_attn_reference,
)

__all__ = [
    "MSDeformAttn",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "extension_available",
    "flop_count_handles",
]
