"""Official Deformable DETR checkpoints (fundamentalvision/Deformable-DETR, R-50: plain, + iterative
box refinement, ++ two-stage) -> HybridDETR.

Key names as in the official model definition (`models/deformable_detr.py`, `backbone.py`,
`deformable_transformer.py`): `backbone.0.body.*` (torchvision ResNet-50), `input_proj.{0..3}`,
`transformer.{level_embed, encoder.layers.*, decoder.layers.*, reference_points | enc_output,
enc_output_norm, pos_trans, pos_trans_norm}`, `class_embed.*`, `bbox_embed.*`, `query_embed`; with
refinement / two-stage the decoder also holds the heads as `transformer.decoder.bbox_embed.*` /
`class_embed.*` (the same tensors, checked and dropped here).

`convert_deformable_detr(official, backbone, family)` also converts that layout for a family built on it
with a backbone of its own (DAC-DETR's Swin-L release, `converters/dac_detr.py`): only the backbone step
(`converters/backbones.py`) differs.
"""
import re
from typing import Dict

import torch

from .backbones import RESNET_PREFIX, DetectorBackbones, backbone_levels, convert_detector_backbone
from .common import Conversion, ConversionError, StateDictReader, coco91_to_80, register_converter

__all__ = ["convert_deformable_detr", "DEFORMABLE_DETR_BACKBONES"]

_ENCODER_LAYER = {  # official encoder-layer name -> ours
    "norm1": "norm",
    "linear1": "ffn.linear1",
    "linear2": "ffn.linear2",
    "norm2": "ffn.norm",
}
_DECODER_LAYER = {  # official decoder-layer name -> ours
    "cross_attn": "cross_attn.attn",
    "norm1": "norm_cross",
    "self_attn": "self_attn",
    "norm2": "norm_self",
    "linear1": "ffn.linear1",
    "linear2": "ffn.linear2",
    "norm3": "ffn.norm",
}
_TWO_STAGE = {  # official two-stage transformer modules -> ours
    "transformer.enc_output": "query_source.memory_proj",
    "transformer.enc_output_norm": "query_source.memory_norm",
    "transformer.pos_trans": "query_source.position_proj",
    "transformer.pos_trans_norm": "query_source.position_norm",
}

# The official Deformable DETR is R-50 only; a Swin where its ResNet would be (DAC-DETR's Swin-L) is refused.
DEFORMABLE_DETR_BACKBONES = DetectorBackbones(
    family="Deformable DETR", swin_prefix=RESNET_PREFIX, converters={"resnet": "deformable_detr"}
)
CONFIGS = {
    "plain": ("coco/deformable_detr_r50_50ep.yaml", "Deformable DETR, R-50"),
    "refine": ("coco/deformable_detr_r50_box_refine_50ep.yaml", "Deformable DETR, R-50, + iterative box refinement"),
    "two_stage": (
        "coco/deformable_detr_r50_two_stage_50ep.yaml",
        "Deformable DETR, R-50, ++ two-stage (box refinement + two-stage)",
    ),
}


def _layer_count(reader: StateDictReader, prefix: str) -> int:
    indices = {int(m.group(1)) for k in reader.state_dict for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    if not indices or indices != set(range(max(indices) + 1)):
        raise ConversionError(f"{reader.model} checkpoint: no consecutive '{prefix}N.*' keys (found {sorted(indices)})")
    return len(indices)


def _rename_layer(rest: str, table: Dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    return table.get(head, head) + "." + tail


def convert_neck_and_transformer_layers(reader, out: Dict[str, torch.Tensor], num_levels: int, num_backbone_levels: int):
    """The official `input_proj.{level}` (the backbone levels, then the extra stride-2 levels),
    `transformer.level_embed` and the encoder / decoder layers -> ours (Deformable DETR's layout,
    shared by DINO)."""
    for level in range(num_levels):
        target = f"neck.input_proj.{level}" if level < num_backbone_levels else f"neck.extra_proj.{level - num_backbone_levels}"
        for key in reader.keys_with_prefix(f"input_proj.{level}."):
            out[target + key[len(f"input_proj.{level}"):]] = reader.get(key)
    out["level_embed"] = reader.get("transformer.level_embed")
    for key in reader.keys_with_prefix("transformer.encoder.layers."):
        index, rest = key[len("transformer.encoder.layers."):].split(".", 1)
        out[f"encoder.layers.{index}.{_rename_layer(rest, _ENCODER_LAYER)}"] = reader.get(key)
    for key in reader.keys_with_prefix("transformer.decoder.layers."):
        index, rest = key[len("transformer.decoder.layers."):].split(".", 1)
        out[f"decoder.layers.{index}.{_rename_layer(rest, _DECODER_LAYER)}"] = reader.get(key)


@register_converter("deformable_detr")
def convert_deformable_detr(
    official: Dict[str, torch.Tensor], backbone: str = "resnet", family: DetectorBackbones = DEFORMABLE_DETR_BACKBONES
) -> Conversion:
    """An official Deformable DETR state dict -> HybridDETR's (detectron2 ResNet, 80 classes), with the
    config of its variant. `family`, `backbone`: a family built on this layout and its backbone (errors then
    name `family.converters[backbone]`; the config returned is still the R-50 Deformable DETR's, which such a
    family's converter replaces by its own)."""
    if backbone not in family.converters:
        raise ValueError(f"backbone {backbone!r}: {family.family} comes with {sorted(family.converters)}")
    reader = StateDictReader(official, family.converters[backbone])
    for marker in ("transformer.encoder.layers.0.self_attn.sampling_offsets.weight", "class_embed.0.weight"):
        reader.get(marker)  # a clear error for a checkpoint of another kind
    out: Dict[str, torch.Tensor] = {}

    # Input projections: 1x1 convs on the backbone levels, then 3x3 stride-2 convs (extra levels); the
    # backbone after them, which tell how many of its levels the neck takes.
    num_levels = _layer_count(reader, "input_proj.")
    num_backbone_levels = backbone_levels(reader, num_levels)
    notes = convert_detector_backbone(reader, out, family, backbone, num_backbone_levels)
    convert_neck_and_transformer_layers(reader, out, num_levels, num_backbone_levels)
    num_decoder_layers = _layer_count(reader, "transformer.decoder.layers.")

    two_stage = "transformer.enc_output.weight" in reader
    refine = "transformer.decoder.bbox_embed.0.layers.0.weight" in reader
    if two_stage and not refine:
        raise ConversionError(
            f"{reader.model} checkpoint is two-stage without box refinement: its shared class head ranks "
            "proposals by COCO slot 0, which has no place among detectron2's 80 classes; not an official "
            "release and not supported"
        )
    variant = "two_stage" if two_stage else ("refine" if refine else "plain")

    # Prediction heads: one per decoder layer (+ the encoder's in two-stage), shared without refinement.
    num_heads = _layer_count(reader, "class_embed.")
    if num_heads != num_decoder_layers + (1 if two_stage else 0):
        raise ConversionError(
            f"{reader.model} checkpoint: {num_heads} class heads for {num_decoder_layers} decoder layers"
            f"{' + two-stage' if two_stage else ''}"
        )
    if not refine:  # one head shared by every layer: its copies in the checkpoint must agree
        for key in reader.keys_with_prefix("class_embed.") + reader.keys_with_prefix("bbox_embed."):
            first = key.split(".", 1)[0] + ".0." + key.split(".", 2)[2]
            if not torch.equal(official[key], official[first]):
                raise ConversionError(
                    f"{reader.model} checkpoint without box refinement (no transformer.decoder.bbox_embed) has "
                    f"different per-layer heads ({key} != {first}): not an official Deformable DETR model"
                )
    heads = {}
    for i in range(num_heads):
        encoder_head = two_stage and i == num_decoder_layers
        # The encoder head is class-agnostic (trained on slot 0, ranked by logit 0): keep slot 0 in front.
        first = 0 if encoder_head else None
        heads[f"class_heads.{i}.weight"] = coco91_to_80(reader.get(f"class_embed.{i}.weight"), first)
        heads[f"class_heads.{i}.bias"] = coco91_to_80(reader.get(f"class_embed.{i}.bias"), first)
        for key in reader.keys_with_prefix(f"bbox_embed.{i}."):
            heads[f"box_heads.{key[len('bbox_embed.'):]}"] = reader.get(key)
    notes.append("class heads: 91 COCO-id slots -> detectron2's 80 classes")
    if two_stage:
        notes.append("encoder (proposal) class head: slot 0 (its class-agnostic objectness) kept as output 0")
    for name, value in heads.items():
        out["decoder.heads." + name] = value
        if two_stage:
            out["query_source.heads." + name] = value
    # The decoder's references to the same heads (refinement / two-stage "hack" in the official code).
    for alias, source in (("transformer.decoder.bbox_embed.", "bbox_embed."), ("transformer.decoder.class_embed.", "class_embed.")):
        for key in reader.keys_with_prefix(alias):
            if not torch.equal(reader.get(key), official[source + key[len(alias):]]):
                raise ConversionError(f"{reader.model} checkpoint: {key} differs from {source + key[len(alias):]}")

    if two_stage:
        for source, target in _TWO_STAGE.items():
            for key in reader.keys_with_prefix(source + "."):
                out[target + key[len(source):]] = reader.get(key)
    else:
        out["query_source.embedding.weight"] = reader.get("query_embed.weight")
        out["query_source.reference_points.weight"] = reader.get("transformer.reference_points.weight")
        out["query_source.reference_points.bias"] = reader.get("transformer.reference_points.bias")

    reader.check_all_used()
    config_file, description = CONFIGS[variant]
    return Conversion({k: v.detach().clone() for k, v in out.items()}, config_file, description, notes)
