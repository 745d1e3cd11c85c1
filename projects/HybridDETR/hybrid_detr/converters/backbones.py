"""The backbone step shared by the converters of Deformable-DETR-style checkpoints (Deformable DETR, DAC-DETR,
DINO): how many backbone levels the neck takes (`backbone_levels`) and the official backbone -> ours
(`convert_detector_backbone`), a torchvision ResNet or a Swin v1, with each model family's converters named
when a checkpoint holds the other backbone (`DetectorBackbones`)."""
from dataclasses import dataclass
from typing import Dict, List

import torch

from .common import ConversionError, StateDictReader, convert_torchvision_backbone
from .kinds import describe_kind
from .swin import convert_detector_swin, swin_layout

__all__ = ["BACKBONES", "RESNET_PREFIX", "DetectorBackbones", "backbone_levels", "convert_detector_backbone"]

BACKBONES = ("resnet", "swin")
RESNET_PREFIX = "backbone.0.body."  # every family: the Joiner's module 0, its IntermediateLayerGetter `body`


@dataclass(frozen=True)
class DetectorBackbones:
    """Where one family's official checkpoints keep their backbone, and which converter takes each backbone."""

    family: str  # e.g. "DINO", in messages
    swin_prefix: str  # where its Swin sits ("backbone.0." in DINO, "backbone.0.body." in DAC-DETR)
    converters: Dict[str, str]  # backbone ("resnet" / "swin") -> registered converter; absent: none has it
    swin_origin: str = ""  # the official config with the Swin, in messages
    resnet_hint: str = ""  # ends the error when a ResNet is expected and none is found


def backbone_levels(reader: StateDictReader, num_levels: int) -> int:
    """The number of backbone levels the neck takes: the 1x1 input projections `input_proj.{i}.0`, which
    come first; the 3x3 stride-2 ones that follow make the extra levels."""
    kernels = [tuple(reader.get(f"input_proj.{level}.0.weight").shape[-2:]) for level in range(num_levels)]
    count = sum(1 for k in kernels if k == (1, 1))
    if kernels != [(1, 1)] * count + [(3, 3)] * (num_levels - count):
        raise ConversionError(
            f"{reader.model} checkpoint: input projections with kernels {kernels}, expected 1x1 convs then 3x3 ones"
        )
    return count


def _has_resnet(state_dict: Dict[str, torch.Tensor]) -> bool:
    return any(k.startswith((RESNET_PREFIX + "conv1.", RESNET_PREFIX + "layer")) for k in state_dict)


def convert_detector_backbone(
    reader: StateDictReader, out: Dict[str, torch.Tensor], family: DetectorBackbones, backbone: str, num_levels: int
) -> List[str]:
    """The official backbone of `family` -> `out["backbone.*"]`, every tensor marked used; returns notes.
    `backbone` "resnet": torchvision's ResNet under `backbone.0.body.` -> detectron2's (FrozenBN buffers
    included); "swin": a detector's Swin v1 under `family.swin_prefix` whose last `num_levels` stages feed the
    neck (`convert_detector_swin`). A checkpoint with the other backbone is refused, naming its converter."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone {backbone!r}: choose from {BACKBONES}")
    official = reader.state_dict
    prefix = family.swin_prefix

    def other(kind: str) -> str:
        name = family.converters.get(kind)
        if name:
            return f"convert it with the {name} converter"
        return f"no {family.family} converter takes it (found {describe_kind(official)})"

    if backbone == "resnet":
        if swin_layout(official, prefix) is not None:
            origin = f": {family.swin_origin}" if family.swin_origin else ""
            raise ConversionError(
                f"{reader.model} checkpoint with a Swin backbone ({prefix}patch_embed.*, {prefix}layers.*{origin}): "
                f"{other('swin')}"
            )
        convert_torchvision_backbone(reader, out, family.resnet_hint)
        return []
    if swin_layout(official, prefix) != "swin_v1":
        if _has_resnet(official):
            found = f"a torchvision ResNet ({RESNET_PREFIX}*): {other('resnet')}"
        else:
            found = f"{describe_kind(official)}, backbone keys e.g. {sorted(k for k in official if k.startswith('backbone.'))[:3]}"
        raise ConversionError(
            f"{reader.model} checkpoint: expected {family.family}'s Swin under {prefix!r} ({prefix}patch_embed.proj.*, "
            f"{prefix}layers.*, {prefix}norm<i>.*), found {found}"
        )
    return convert_detector_swin(reader, prefix, out, num_levels)
