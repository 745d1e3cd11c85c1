"""fvcore FLOP-count handles for the ops fvcore cannot count by itself.

One "flop" is one multiply-add, as in fvcore and the DETR papers.
"""
import math

__all__ = ["ms_deform_attn_flop_jit", "sdpa_flop_jit", "flop_count_handles"]


def ms_deform_attn_flop_jit(inputs, outputs):
    """fvcore handle: multiply-adds of `hybrid_detr::ms_deform_attn`.

    Per sampling point and channel: 4 for the bilinear interpolation + 1 for the attention weight.
    """
    from fvcore.nn.jit_handles import get_shape

    loc_shape = get_shape(inputs[3])  # (N, Lq, M, L, P, 2)
    value_shape = get_shape(inputs[0])  # (N, S, M, D)
    if loc_shape is None or value_shape is None:
        return 0
    n, lq, m, lvl, p, _ = loc_shape
    d = value_shape[3]
    return n * lq * m * lvl * p * d * 5


def sdpa_flop_jit(inputs, outputs):
    """fvcore handle for `aten::scaled_dot_product_attention` (fvcore has none, so its FLOPs would be
    left out): q (..., Lq, E), k (..., S, E), v (..., S, Ev) -> (..., Lq, E) * S + (..., Lq, Ev) * S
    multiply-adds (Q K^T and the weighted sum of V; the softmax and the bias are not counted, as fvcore
    counts no elementwise ops). nn.MultiheadAttention (the decoder's self-attention) and SMCA's dense
    co-attention both trace to this op."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def flop_count_handles() -> dict:
    """Op handles to pass to fvcore's `FlopCountAnalysis.set_op_handle(**...)` (or detectron2's)."""
    return {
        "hybrid_detr::ms_deform_attn": ms_deform_attn_flop_jit,
        "aten::scaled_dot_product_attention": sdpa_flop_jit,
    }
