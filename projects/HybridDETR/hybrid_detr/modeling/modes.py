"""Decoder modes: the contract every mode plugs into, and their composition.

A mode is one package that registers itself with `register_decoder_mode` when it is imported
(`hybrid_detr.modeling` imports every subpackage of itself, and the modules named by the
`hybrid_detr.decoder_modes` entry point group). Its registration carries everything of the mode,
each part optional:
- `add_config(cfg)`: its config keys (called by `add_hybrid_detr_config` for every mode);
- `cross_attention(cfg)`: one decoder layer's cross-attention, called as
  `module(query, reference_points, memory, query_reference)` (see `CROSS_ATTENTION_SIGNATURE`);
- `training_branch(cfg, level_strides=...)`: a module called as `module(inputs: BranchInputs) ->
  dict of losses` after the one-to-one pass (its own decoder passes), never at inference;
- `main_pass(cfg)`: a `MainPassHook`, which adds query groups to the one-to-one decoder pass
  itself (with the attention mask they need) and computes their losses (training only);
- `one_to_one_classification(cfg)`: the decoder's classification loss (a
  `ClassificationLossSpec`, or None to keep the criterion's focal loss);
- `explain_view(model, captured, request)`: its picture for `tools/explain.py`.

`DECODER_MODE` names one mode or several joined by "+": "smca+dac" trains SMCA's co-attention
decoder with DAC's C-branch. Inference always runs the one-to-one queries alone.
"""
import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from detectron2.structures import ImageList, Instances

from .criterion import ClassificationLossSpec, DetectionCriterion
from .token_layout import EncoderMemory
from .transformer import DecoderOutput, DeformableDecoder, QueryGroup

__all__ = [
    "BranchInputs",
    "MainPassInputs",
    "ExtraQueries",
    "MainPassHook",
    "DecoderMode",
    "ModeParts",
    "DECODER_MODES",
    "DEFAULT_CROSS_ATTENTION_MODE",
    "register_decoder_mode",
    "unregister_decoder_mode",
    "parse_decoder_mode",
    "add_mode_configs",
    "discover_decoder_modes",
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
    # What the main-pass hooks added to the one-to-one pass this step: {name: (hook, its queries,
    # their output)}, and the inputs they were made from (for `hook.losses` of another pass).
    extras: Dict[str, Tuple["MainPassHook", "ExtraQueries", DecoderOutput]] = dataclasses.field(default_factory=dict)
    main_pass_inputs: Optional["MainPassInputs"] = None


@dataclass
class MainPassInputs:
    """What a main-pass hook may use to make its queries and losses (training only)."""

    queries: QueryGroup  # the one-to-one queries
    memory: EncoderMemory
    targets: List[Dict[str, torch.Tensor]]  # per image {"labels", "boxes" cxcywh in [0, 1]}
    num_boxes: float
    criterion: DetectionCriterion
    query_source: nn.Module  # its `embed_boxes(boxes, dtype) -> (position, content)` (two-stage)


@dataclass
class ExtraQueries:
    """Queries a hook adds to the one-to-one pass. They go before the one-to-one queries; the
    one-to-one queries never see them; they see the one-to-one queries when `sees_one_to_one`.
    Their own separation (e.g. groups that must not see each other) is `group.self_attn_mask`,
    their padding `group.padding_mask`. `state` is whatever the hook's loss needs back."""

    group: QueryGroup
    sees_one_to_one: bool = True
    state: Any = None


class MainPassHook(nn.Module):
    """A mode's queries in the one-to-one decoder pass (training only). `extra_queries` returns
    them, or None for a step without any (e.g. a batch without objects); `losses` gets them back
    with their decoder output, or (None, None) for such a step: it should then return the same
    names with zero values that keep its parameters in the graph (as DDP needs)."""

    def extra_queries(self, inputs: MainPassInputs) -> Optional[ExtraQueries]:
        raise NotImplementedError

    def losses(
        self, inputs: MainPassInputs, extra: Optional[ExtraQueries], output: Optional[DecoderOutput]
    ) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


@dataclass(frozen=True)
class ModeParts:
    """Everything one decoder mode brings (see the module docstring)."""

    add_config: Optional[Callable[[Any], None]] = None
    cross_attention: Optional[Callable[..., nn.Module]] = None
    training_branch: Optional[Callable[..., nn.Module]] = None
    main_pass: Optional[Callable[..., MainPassHook]] = None
    one_to_one_classification: Optional[Callable[..., Optional[ClassificationLossSpec]]] = None
    explain_view: Optional[Callable[..., Any]] = None


DECODER_MODES: Dict[str, ModeParts] = {}
# The cross-attention every mode keeps unless it brings its own.
DEFAULT_CROSS_ATTENTION_MODE = "deformable"


def register_decoder_mode(name: str, **parts) -> None:
    """Makes `name` a DECODER_MODE with the given `ModeParts` fields (keyword arguments)."""
    unknown = set(parts) - {f.name for f in dataclasses.fields(ModeParts)}
    if unknown:
        raise TypeError(f"register_decoder_mode({name!r}): unknown parts {sorted(unknown)}")
    mode = ModeParts(**parts)
    if not any(getattr(mode, f) is not None for f in ("cross_attention", "training_branch", "main_pass", "one_to_one_classification")):
        raise ValueError(f"decoder mode {name!r} brings nothing")
    if "+" in name or name in DECODER_MODES:
        raise ValueError(f"decoder mode {name!r} is registered twice or contains '+'")
    DECODER_MODES[name] = mode


def unregister_decoder_mode(name: str) -> None:
    """Removes a mode (for tests that register one of their own)."""
    DECODER_MODES.pop(name)


def add_mode_configs(cfg) -> None:
    """Every registered mode's config keys."""
    for mode in DECODER_MODES.values():
        if mode.add_config is not None:
            mode.add_config(cfg)


ENTRY_POINT_GROUP = "hybrid_detr.decoder_modes"


def discover_decoder_modes(package_name: str, package_path) -> None:
    """Imports every subpackage of `package_name` (each paper's mode registers itself on import)
    and every module named in the `hybrid_detr.decoder_modes` entry point group (modes living in
    other distributions)."""
    for info in pkgutil.iter_modules(package_path):
        if info.ispkg:
            importlib.import_module(f"{package_name}.{info.name}")
    from importlib.metadata import entry_points

    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        entry_point.load()


@dataclass(frozen=True)
class DecoderMode:
    names: Tuple[str, ...]
    cross_attention: str  # the mode whose cross-attention the decoder uses
    branches: Tuple[str, ...]  # the modes whose training branches run, in DECODER_MODE's order
    main_passes: Tuple[str, ...]  # the modes whose main-pass hooks run, in DECODER_MODE's order

    def build_cross_attention(self, cfg) -> nn.Module:
        return DECODER_MODES[self.cross_attention].cross_attention(cfg)

    def build_branches(self, cfg, level_strides) -> Dict[str, nn.Module]:
        return {name: DECODER_MODES[name].training_branch(cfg, level_strides=level_strides) for name in self.branches}

    def build_main_passes(self, cfg) -> Dict[str, MainPassHook]:
        return {name: DECODER_MODES[name].main_pass(cfg) for name in self.main_passes}

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

    def explain_views(self) -> Dict[str, Callable[..., Any]]:
        """{mode name: explain view} of the modes that have one, in DECODER_MODE's order."""
        return {n: DECODER_MODES[n].explain_view for n in self.names if DECODER_MODES[n].explain_view is not None}


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
    main_passes = tuple(n for n in names if DECODER_MODES[n].main_pass)
    return DecoderMode(tuple(names), cross_attention, branches, main_passes)
