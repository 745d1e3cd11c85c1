"""`DECODER_MODE: "dense"`: the decoder's cross-attention is plain dense multi-head attention over
every memory token of the attended levels (SMCA.LEVELS, default all), i.e. SMCA's co-attention
(`SMCACrossAttention`) with the Gaussian prior switched off: the same module and code path, built
with `prior=False`, so "dense vs smca" differs in the prior alone.

Design choice: "dense" keeps SMCA's per-level softmax with scale selection (alpha =
softmax(FC(query)) over the levels, SMCA.SCALE_SELECTION_PER_HEAD as in smca) rather than one
softmax over all tokens of all levels. SMCA's claim is that the spatial prior speeds up
convergence, and the paper reports the prior alone (single-scale SMCA against DETR) apart from the
multi-scale parts (multi-scale SMCA). With one softmax over all tokens, "dense vs smca" would change two things (the prior and
the scale-selective multi-scale attention) and could not attribute a difference to the prior. On a
single level (SMCA.LEVELS: [l]) there is no scale selection and this is exactly DETR's decoder
co-attention (one softmax over all keys, keys = memory + position, values = memory). By
construction it equals SMCA with a flat prior (BETA -> infinity) and the same weights (tested).
"""
from .co_attention import SMCACrossAttention

__all__ = ["build_dense_cross_attention"]


def build_dense_cross_attention(cfg):
    """One decoder layer's cross-attention for DECODER_MODE "dense"."""
    return SMCACrossAttention(cfg, prior=False)
