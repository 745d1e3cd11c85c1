"""Layers of HybridDETR: multi-scale deformable attention (compiled op + pure-PyTorch reference)."""
from .ms_deform_attn import MSDeformAttn
from .ms_deform_attn_func import (
    extension_available,
    flop_count_handles,
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
