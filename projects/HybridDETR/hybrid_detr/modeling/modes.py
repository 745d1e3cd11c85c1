"""Decoder modes as composition: each paper contributes a cross-attention or a training branch.

`DECODER_MODE` names one mode or several joined by "+": "smca+dac" trains SMCA's co-attention
decoder with DAC's C-branch. Inference always runs the one-to-one queries alone.
"""
from dataclasses import dataclass
from typing import Dict, Tuple

from detectron2.utils.registry import Registry

CROSS_ATTENTION_REGISTRY = Registry("HYBRID_DETR_CROSS_ATTENTION")
CROSS_ATTENTION_REGISTRY.__doc__ = """Decoder cross-attention classes: `cls.from_config(cfg)` builds one decoder
layer's module, called as module(query, reference_points, memory: EncoderMemory, query_reference)."""

TRAINING_BRANCH_REGISTRY = Registry("HYBRID_DETR_TRAINING_BRANCH")
TRAINING_BRANCH_REGISTRY.__doc__ = """Extra training branches: cls(cfg, level_strides) -> nn.Module,
called as module(inputs: BranchInputs) -> dict of losses; never run at inference."""

# mode name -> (cross-attention class it sets, training-branch class it adds), by registry name
MODES: Dict[str, Tuple[str, str]] = {
    "deformable": ("DeformableCrossAttention", None),
    "dac": (None, "DACBranch"),
    "smca": ("SMCACrossAttention", None),
    "co_detr": (None, "CoDETRBranch"),
}


@dataclass(frozen=True)
class DecoderMode:
    cross_attention: str
    branches: Tuple[str, ...]


def parse_decoder_mode(spec: str) -> DecoderMode:
    key = "MODEL.HYBRID_DETR.DECODER_MODE"
    names = [name.strip() for name in str(spec).split("+")]
    unknown = [name for name in names if name not in MODES]
    if unknown:
        raise ValueError(
            f"Unknown {key} {unknown[0]!r} in {spec!r}: choose from {sorted(MODES)}, or several joined by '+'"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"{key} {spec!r} names a mode twice")
    cross_attentions = {MODES[n][0] for n in names} - {None}
    # "deformable" is the default cross-attention; another mode may replace it, two may not.
    cross_attentions.discard(MODES["deformable"][0])
    if len(cross_attentions) > 1:
        raise ValueError(f"{key} {spec!r} asks for two decoder cross-attentions {sorted(cross_attentions)}")
    cross_attention = cross_attentions.pop() if cross_attentions else MODES["deformable"][0]
    branches = tuple(MODES[n][1] for n in names if MODES[n][1])
    for name in names:
        attention, branch = MODES[name]
        if (attention and attention not in CROSS_ATTENTION_REGISTRY) or (branch and branch not in TRAINING_BRANCH_REGISTRY):
            raise ValueError(f"{key} {spec!r}: mode {name!r} is not available in this version of hybrid_detr")
    return DecoderMode(cross_attention, branches)
