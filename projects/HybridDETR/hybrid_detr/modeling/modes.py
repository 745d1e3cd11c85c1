"""Decoder modes: the contract every mode plugs into, and their composition.

A mode contributes one or more of
- a decoder **cross-attention** (built per decoder layer by `cross_attention(cfg)`, called as
  `module(query, reference_points, memory, query_reference)`, see `CROSS_ATTENTION_SIGNATURE`);
- a **training branch** (built once by `training_branch(cfg, level_strides=...)`, called as
  `module(inputs: BranchInputs) -> dict of losses`, never at inference);
- the **one-to-one classification loss** (`one_to_one_classification(cfg)` -> a
  `ClassificationLossSpec`, or None to keep the criterion's focal loss).
Each mode registers itself where it is defined, with `register_decoder_mode`: the baseline in
`deformable.py`, the papers in their packages (`dac/`, `smca/`, `co_detr/`).

`DECODER_MODE` names one mode or several joined by "+": "smca+dac" trains SMCA's co-attention
decoder with DAC's C-branch. Inference always runs the one-to-one queries alone.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from detectron2.structures import ImageList, Instances

from .criterion import ClassificationLossSpec, DetectionCriterion
from .token_layout import EncoderMemory
from .transformer import DecoderOutput, DeformableDecoder, QueryGroup

__all__ = [
    "BranchInputs",
    "DecoderMode",
    "DECODER_MODES",
    "DEFAULT_CROSS_ATTENTION_MODE",
    "register_decoder_mode",
    "parse_decoder_mode",
]

CROSS_ATTENTION_SIGNATURE = """module(query (N, Q, C) content + position, reference_points (N, Q, L, 2|4) in each
level's padded frame, memory: EncoderMemory, query_reference (N, Q, 2|4) normalised to the valid image)
-> (N, Q, C)"""


@dataclass
class BranchInputs:
    """What a training branch may use; built once per training step by the meta-architecture."""

    queries: QueryGroup  # the one-to-one queries, as they entered the decoder
    memory: EncoderMemory
    one_to_one: DecoderOutput
    targets: List[Dict[str, torch.Tensor]]  # per image {"labels", "boxes" cxcywh in [0, 1]}
    num_boxes: float  # loss normaliser (gt boxes per worker)
    images: ImageList  # the padded batch (sizes for detectron2 heads)
    gt_instances: List[Instances]  # absolute-coordinate targets (detectron2 heads)
    decoder: DeformableDecoder
    criterion: DetectionCriterion


@dataclass(frozen=True)
class _ModeParts:
    cross_attention: Optional[Callable[..., nn.Module]]
    training_branch: Optional[Callable[..., nn.Module]]
    one_to_one_classification: Optional[Callable[..., Optional[ClassificationLossSpec]]] = None


DECODER_MODES: Dict[str, _ModeParts] = {}
# The cross-attention every mode keeps unless it brings its own.
DEFAULT_CROSS_ATTENTION_MODE = "deformable"


def register_decoder_mode(
    name: str,
    *,
    cross_attention: Optional[Callable[..., nn.Module]] = None,
    training_branch: Optional[Callable[..., nn.Module]] = None,
    one_to_one_classification: Optional[Callable[..., Optional[ClassificationLossSpec]]] = None,
) -> None:
    """Makes `name` a DECODER_MODE. `cross_attention(cfg)` builds one decoder layer's
    cross-attention; `training_branch(cfg, level_strides=...)` builds the mode's training branch;
    `one_to_one_classification(cfg)` gives the one-to-one queries' classification loss (or None)."""
    if cross_attention is None and training_branch is None and one_to_one_classification is None:
        raise ValueError(f"decoder mode {name!r} brings nothing")
    if "+" in name or name in DECODER_MODES:
        raise ValueError(f"decoder mode {name!r} is registered twice or contains '+'")
    DECODER_MODES[name] = _ModeParts(cross_attention, training_branch, one_to_one_classification)


@dataclass(frozen=True)
class DecoderMode:
    names: Tuple[str, ...]
    cross_attention: str  # the mode whose cross-attention the decoder uses
    branches: Tuple[str, ...]  # the modes whose training branches run, in DECODER_MODE's order

    def build_cross_attention(self, cfg) -> nn.Module:
        return DECODER_MODES[self.cross_attention].cross_attention(cfg)

    def build_branches(self, cfg, level_strides) -> Dict[str, nn.Module]:
        return {name: DECODER_MODES[name].training_branch(cfg, level_strides=level_strides) for name in self.branches}

    def build_one_to_one_classification(self, cfg) -> Optional[ClassificationLossSpec]:
        """The one classification loss a mode asks for the one-to-one queries (None: focal)."""
        specs = {}
        for name in self.names:
            make = DECODER_MODES[name].one_to_one_classification
            spec = make(cfg) if make is not None else None
            if spec is not None:
                specs[name] = spec
        if len(specs) > 1:
            raise ValueError(f"DECODER_MODE modes {sorted(specs)} each replace the one-to-one classification loss")
        return next(iter(specs.values()), None)


def parse_decoder_mode(spec: str) -> DecoderMode:
    key = "MODEL.HYBRID_DETR.DECODER_MODE"
    names = [name.strip() for name in str(spec).split("+")]
    unknown = [name for name in names if name not in DECODER_MODES]
    if unknown:
        raise ValueError(
            f"Unknown {key} {unknown[0]!r} in {spec!r}: choose from {sorted(DECODER_MODES)}, or several joined by '+'"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"{key} {spec!r} names a mode twice")
    # The default cross-attention may be replaced by another mode's; two others may not both apply.
    attentions = [n for n in names if DECODER_MODES[n].cross_attention and n != DEFAULT_CROSS_ATTENTION_MODE]
    if len(attentions) > 1:
        raise ValueError(f"{key} {spec!r} asks for two decoder cross-attentions {attentions}")
    cross_attention = attentions[0] if attentions else DEFAULT_CROSS_ATTENTION_MODE
    branches = tuple(n for n in names if DECODER_MODES[n].training_branch)
    return DecoderMode(tuple(names), cross_attention, branches)
