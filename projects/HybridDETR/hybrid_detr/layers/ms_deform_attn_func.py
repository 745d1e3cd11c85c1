"""Multi-scale deformable attention: the op, its pure-PyTorch reference and its registrations.

The compiled op lives in `hybrid_detr.layers._C` (sources in `csrc/`; `hybrid_detr._C` names the same
module), registered with the dispatcher as
`torch.ops.hybrid_detr.ms_deform_attn` (forward) and `torch.ops.hybrid_detr._ms_deform_attn_backward`.
Its autograd kernel is registered in C++ (so autograd works from C++ and TorchScript too); this file
adds the fake (meta) kernels that `torch.compile` and `torch.library.opcheck` need, and fvcore handles.

Tensor layout (as in Deformable DETR):
    value                (N, S, M, D)           S = sum over levels of H_l * W_l
    spatial_shapes       (L, 2) int64           (H_l, W_l)
    level_start_index    (L,) int64             offset of each level in S
    sampling_locations   (N, Lq, M, L, P, 2)    (x, y) normalised to [0, 1]; may lie outside
    attention_weights    (N, Lq, M, L, P)
    output               (N, Lq, M * D)
Sampling is bilinear with zero padding and `align_corners=False`: exactly
`grid_sample(value_l, 2 * loc - 1, mode="bilinear", padding_mode="zeros", align_corners=False)`.
"""
import logging
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "extension_available",
    "BUILD_HINT",
]

BUILD_HINT = (
    "build it from the repository root with "
    "`pip install --no-build-isolation --no-deps -e .` (add FORCE_CUDA=1 CUDA_HOME=/path/to/cuda for GPU kernels)"
)

try:  # loading the library registers torch.ops.hybrid_detr.*
    from . import _C  # noqa: F401  (this package's own extension: the op layer needs torch alone)

    _IMPORT_ERROR: Optional[BaseException] = None
except (ImportError, OSError) as e:  # pragma: no cover - depends on the build
    _C = None
    _IMPORT_ERROR = e

# dtypes each compiled device kernel handles.
_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def extension_available() -> bool:
    """True when `hybrid_detr.layers._C` (the compiled MSDeformAttn op) is loaded."""
    return _C is not None


def _cuda_kernels_built() -> bool:
    return _C is not None and bool(_C.with_cuda())


def _extension_supports(value: torch.Tensor) -> bool:
    if _C is None:
        return False
    if value.device.type == "cpu":
        return value.dtype in _CPU_DTYPES
    if value.device.type == "cuda":
        return _cuda_kernels_built() and value.dtype in _CUDA_DTYPES
    return False


_warned = set()


def _warn_fallback(value: torch.Tensor) -> None:
    key = (value.device.type, value.dtype)
    if key in _warned:
        return
    _warned.add(key)
    if _C is None:
        reason = f"the compiled extension hybrid_detr.layers._C is missing ({_IMPORT_ERROR}); {BUILD_HINT}"
    elif value.device.type == "cuda" and not _cuda_kernels_built():
        reason = f"hybrid_detr.layers._C was built without CUDA kernels; {BUILD_HINT}"
    else:
        reason = f"the compiled op has no kernel for device={value.device.type}, dtype={value.dtype}"
    msg = f"MSDeformAttn falls back to the slow pure-PyTorch reference: {reason}"
    logger.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention; returns (N, Lq, M*D).

    Uses the compiled op when it is built for the input's device and dtype, else the reference
    (warning once per device/dtype), which checks its inputs as the op does: a non-floating
    tensor or an inconsistent `spatial_shapes` / `level_start_index` / value is refused either way.
    """
    if _extension_supports(value):
        return torch.ops.hybrid_detr.ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    # Checked before warning: an input neither path accepts is an error, not a slow fallback.
    _check_reference_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    _warn_fallback(value)
    return ms_deform_attn_reference(
        value, spatial_shapes, sampling_locations, attention_weights, level_start_index=level_start_index
    )


def _check_reference_inputs(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
) -> List[List[int]]:
    """The compiled op's input checks (csrc/ms_deform_attn.cpp), with its messages, for the reference.

    Returns the level shapes as a list of [H, W]. `spatial_shapes` may be a tensor or (H, W) pairs;
    `level_start_index` may be None (the reference does not need it), else it is checked too.
    """
    op = "ms_deform_attn"
    for name, t in (("value", value), ("sampling_locations", sampling_locations),
                    ("attention_weights", attention_weights)):
        if not t.is_floating_point():
            raise RuntimeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}; convert it with .float()")
    if value.dim() != 4:
        raise RuntimeError(f"{op}: value must be (N, S, M, D), got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise RuntimeError(
            f"{op}: sampling_locations must be (N, Lq, M, L, P, 2), got shape {tuple(sampling_locations.shape)}")
    if tuple(attention_weights.shape) != tuple(sampling_locations.shape[:-1]):
        raise RuntimeError(f"{op}: attention_weights must be (N, Lq, M, L, P) = {tuple(sampling_locations.shape[:-1])}"
                           f", got {tuple(attention_weights.shape)}")
    N, S, M, _ = value.shape
    if sampling_locations.shape[0] != N or sampling_locations.shape[2] != M:
        raise RuntimeError(f"{op}: sampling_locations (N, Lq, M, L, P, 2) = {tuple(sampling_locations.shape)} "
                           f"does not match value (N, S, M, D) = {tuple(value.shape)} in N or M")
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise RuntimeError(f"{op}: spatial_shapes must be (L, 2) holding (H, W) per level, got shape "
                               f"{tuple(spatial_shapes.shape)}")
        if spatial_shapes.is_floating_point():
            raise RuntimeError(f"{op}: spatial_shapes must be int64 (torch.long), got {spatial_shapes.dtype}; "
                               "convert it with .long()")
        shapes = spatial_shapes.tolist()
    else:
        shapes = [list(s) for s in spatial_shapes]
        if any(len(s) != 2 for s in shapes):
            raise RuntimeError(f"{op}: spatial_shapes must hold (H, W) per level, got {shapes}")
    L = sampling_locations.shape[3]
    if len(shapes) != L:
        raise RuntimeError(f"{op}: spatial_shapes has {len(shapes)} levels but sampling_locations has L = {L}")
    starts = None
    if level_start_index is not None:
        if level_start_index.dim() != 1:
            raise RuntimeError(f"{op}: level_start_index must be (L,), got shape {tuple(level_start_index.shape)}")
        if level_start_index.is_floating_point():
            raise RuntimeError(f"{op}: level_start_index must be int64 (torch.long), got {level_start_index.dtype}; "
                               "convert it with .long()")
        if level_start_index.shape[0] != L:
            raise RuntimeError(f"{op}: level_start_index has {level_start_index.shape[0]} entries but there are "
                               f"L = {L} levels")
        starts = level_start_index.tolist()
    if torch.compiler.is_compiling():
        # Traced, the level sizes are symbolic: comparing them would break the graph. The eager
        # call (and the compiled op's own checks) cover them.
        return shapes
    total = 0
    for lvl, (h, w) in enumerate(shapes):
        if h < 0 or w < 0:
            raise RuntimeError(f"{op}: spatial_shapes[{lvl}] = ({h}, {w}) must not be negative")
        if starts is not None and starts[lvl] != total:
            raise RuntimeError(f"{op}: level_start_index[{lvl}] = {starts[lvl]} is inconsistent with spatial_shapes "
                               f"(expected {total}, the sum of H*W of the levels before)")
        total += h * w
    if total != S:
        raise RuntimeError(f"{op}: the sum over levels of H*W from spatial_shapes is {total} but value has S = {S} keys")
    return shapes


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    level_start_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pure-PyTorch multi-scale deformable attention with `F.grid_sample` (slow, memory hungry).

    `spatial_shapes` is an (L, 2) tensor or a list of (H, W) pairs. Mixed dtypes (a half-type
    value with float32 locations and weights, as the op takes them) are computed in the widest
    one; the output has the value's dtype, as the op's. The inputs are checked as the op checks
    them (floating dtypes, shapes, levels summing to S; `level_start_index` too when given), with
    the op's messages.
    """
    shapes = _check_reference_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    out_dtype = value.dtype
    dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)
    value, sampling_locations, attention_weights = (
        value.to(dtype), sampling_locations.to(dtype), attention_weights.to(dtype))
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    if N * Lq * M == 0 or D == 0:
        return value.new_zeros(N, Lq, M * D, dtype=out_dtype)
    grids = sampling_locations * 2 - 1  # grid_sample wants [-1, 1]
    per_level = value.split([h * w for h, w in shapes], dim=1)
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = per_level[lvl].permute(0, 2, 3, 1).reshape(N * M, D, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        g = grids[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(N * M, Lq, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N*M, D, Lq, L*P) weighted by (N*M, 1, Lq, L*P), summed over L*P.
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.permute(0, 2, 1, 3, 4).reshape(N * M, 1, Lq, L * P)
    out = (stacked * weights).sum(-1)  # (N*M, D, Lq)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous().to(out_dtype)


# ----------------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes only, for torch.compile / FakeTensor / opcheck.
def _check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    torch._check(value.dim() == 4, lambda: f"value must be (N, S, M, D), got shape {tuple(value.shape)}")
    torch._check(
        sampling_locations.dim() == 6 and sampling_locations.shape[-1] == 2,
        lambda: f"sampling_locations must be (N, Lq, M, L, P, 2), got shape {tuple(sampling_locations.shape)}",
    )
    torch._check(
        attention_weights.shape == sampling_locations.shape[:-1],
        lambda: "attention_weights must be (N, Lq, M, L, P) matching sampling_locations, got "
        f"{tuple(attention_weights.shape)} vs {tuple(sampling_locations.shape)}",
    )
    torch._check(
        spatial_shapes.dim() == 2 and spatial_shapes.shape[1] == 2,
        lambda: f"spatial_shapes must be (L, 2), got shape {tuple(spatial_shapes.shape)}",
    )
    torch._check(
        spatial_shapes.dtype == torch.int64 and level_start_index.dtype == torch.int64,
        lambda: "spatial_shapes and level_start_index must be int64",
    )


if _C is not None:

    @torch.library.register_fake("hybrid_detr::ms_deform_attn")
    def _ms_deform_attn_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        _check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        N, _, M, D = value.shape
        Lq = sampling_locations.shape[1]
        return value.new_empty((N, Lq, M * D))

    @torch.library.register_fake("hybrid_detr::_ms_deform_attn_backward")
    def _ms_deform_attn_backward_fake(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    ):
        _check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return (
            value.new_empty(value.shape),
            sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape),
        )
