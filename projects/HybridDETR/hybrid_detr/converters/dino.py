"""Official DINO checkpoints (IDEA-Research/DINO) -> HybridDETR with DECODER_MODE "dn", two converters:

- "dino": R-50, `config/DINO/DINO_4scale.py` and `DINO_5scale.py` (12 / 24 / 36 epochs)
  -> `configs/coco/dino_r50_{4,5}scale_12ep.yaml`;
- "dino_swin_l": Swin-L (`backbone = 'swin_L_384_22k'`), `config/DINO/DINO_4scale_swin.py`, and the 5-scale
  Swin-L of the README's tables, for which the repository has no config file: DINO_4scale_swin.py with the
  two lines by which DINO_5scale.py differs from DINO_4scale.py besides the batch (return_interm_indices
  [0, 1, 2, 3], num_feature_levels 5) -> `configs/coco/dino_swin_l_{4,5}scale_12ep.yaml`.

Both run `convert_dino(official, backbone)`: only the backbone differs; the input projections, the
transformer, the heads and the denoising label book are converted the same way.

Key names as in the official model definition (`models/dino/dino.py` `DINO`,
`deformable_transformer.py`, `backbone.py`, `swin_transformer.py`), read from a model built from it:

- R-50: `backbone.0.body.*`: torchvision's ResNet-50 (FrozenBatchNorm2d, no num_batches_tracked) -> detectron2's;
- Swin-L: `backbone.0.*` is the Swin itself (backbone.py:174-177 builds `SwinTransformer`, :216 the Joiner
  holds it as its module 0, no `body`): Swin v1's layout (`patch_embed.proj` / `norm`, `layers.i.blocks.j.*`
  with their `relative_position_index` buffers, `layers.i.downsample.*` for i < 3: all four stages are built
  whatever the outputs) plus one LayerNorm `norm{i}` per output stage i in `return_interm_indices`
  (swin_transformer.py:549-553: norm1-norm3 for 4 scales, norm0-norm3 for 5), no final norm, no head
  -> our Swin backbone (`converters/swin.py` `convert_detector_swin`). The stages with a `norm{i}` must be the
  last ones, one per 1x1 input projection (the levels the neck takes from the backbone);
- `input_proj.{0..L-1}`: 1x1 conv + GN per backbone level (C3-C5, or C2-C5 for 5 scales), then one
  3x3 stride-2 conv + GN on C5 -> `neck.input_proj.*` / `neck.extra_proj.0`;
- `transformer.level_embed`, `transformer.encoder.layers.*`, `transformer.decoder.layers.*`: the
  Deformable DETR layout (same names, renamed as by the Deformable DETR converter);
- `transformer.decoder.ref_point_head.layers.{0,1}` -> `decoder.ref_point_head.*`
  (QUERY_POSITION_FROM_REFERENCE), `transformer.decoder.norm` -> `decoder.norm` (DECODER_FINAL_NORM);
- `class_embed.{0..5}` / `bbox_embed.{0..5}`: one head shared by the six layers (dino.py:141-152,
  `dec_pred_*_embed_share = True`; the six copies must be equal) -> `decoder.heads.{class,box}_heads.*`
  (SHARE_DECODER_HEADS); their aliases `transformer.decoder.{class,bbox}_embed.*` are checked equal and dropped;
- `transformer.enc_out_class_embed` / `enc_out_bbox_embed`: the encoder's own heads
  (`two_stage_*_embed_share = False`) -> head 6 (`query_source.heads.*.6`), class-aware;
- `transformer.enc_output(_norm)` -> `query_source.memory_proj` / `memory_norm`;
- `transformer.tgt_embed.weight` (900, 256): the learned content queries (`embed_init_tgt`) ->
  `query_source.content.weight` (MIXED_SELECTION);
- `label_enc.weight` (92, 256): the denoising queries' label embedding, rows indexed by COCO
  category id (`dn_labelbook_size = 91` + 1, DINO_4scale.py:103; row 91 is never looked up: noised
  labels are drawn in [0, 91), dn_components.py:66) -> `main_passes.dn.label_embedding.weight`,
  rows in detectron2's 80-class order then row 91 (81 rows: DN.LABELBOOK_SIZE 0 = NUM_CLASSES, + 1).

Every class head (91 COCO-id slots) keeps detectron2's 80 classes. The official two-stage ranks
proposals by the max over all 91 slots (deformable_transformer.py:342); the 11 slots that are no
COCO class are dropped here, so ours ranks by the max over the 80 (the same ranking wherever the
dropped slots, never a positive target in training, score below the best real class).
"""
from typing import Dict

import torch

from .backbones import DetectorBackbones, backbone_levels, convert_detector_backbone
from .common import Conversion, ConversionError, StateDictReader, coco91_to_80, register_converter
from .deformable_detr import _layer_count, convert_neck_and_transformer_layers
from .kinds import describe_kind

__all__ = ["convert_dino", "convert_dino_swin_l", "CONFIGS", "CONVERTER_BY_BACKBONE"]

CONFIGS = {  # backbone -> number of feature levels -> (config, description)
    "resnet": {
        4: ("coco/dino_r50_4scale_12ep.yaml", "DINO R-50, 4 scales (config/DINO/DINO_4scale.py)"),
        5: ("coco/dino_r50_5scale_12ep.yaml", "DINO R-50, 5 scales (config/DINO/DINO_5scale.py)"),
    },
    "swin": {
        4: ("coco/dino_swin_l_4scale_12ep.yaml", "DINO Swin-L, 4 scales (config/DINO/DINO_4scale_swin.py)"),
        5: (
            "coco/dino_swin_l_5scale_12ep.yaml",
            "DINO Swin-L, 5 scales (config/DINO/DINO_4scale_swin.py with return_interm_indices [0, 1, 2, 3])",
        ),
    },
}
CONVERTER_BY_BACKBONE = {"resnet": "dino", "swin": "dino_swin_l"}
_BACKBONE_NAME = {"resnet": "R-50", "swin": "Swin-L"}
BACKBONES = DetectorBackbones(
    family="DINO",
    swin_prefix="backbone.0.",  # DINO's Swin is the Joiner's module 0 itself
    converters=CONVERTER_BY_BACKBONE,
    swin_origin="DINO_4scale_swin.py",
    resnet_hint=" (a ConvNeXt DINO is not supported)",
)
# Keys only a DINO checkpoint has (with a two-stage "standard" DINO's encoder heads).
_MARKERS = (
    "transformer.decoder.ref_point_head.layers.0.weight",
    "transformer.decoder.norm.weight",
    "transformer.tgt_embed.weight",
    "transformer.enc_out_class_embed.weight",
    "label_enc.weight",
)
_ENCODER_PROPOSALS = {  # official two-stage modules -> ours
    "transformer.enc_output": "query_source.memory_proj",
    "transformer.enc_output_norm": "query_source.memory_norm",
}
_DECODER_EXTRAS = {
    "transformer.decoder.ref_point_head": "decoder.ref_point_head",
    "transformer.decoder.norm": "decoder.norm",
}


@register_converter("dino")
def convert_dino(official: Dict[str, torch.Tensor], backbone: str = "resnet") -> Conversion:
    """An official DINO R-50 (4 or 5 scales) state dict -> HybridDETR's DINO (detectron2 ResNet, 80 classes).
    `backbone` "swin": an official DINO Swin-L (what the dino_swin_l converter runs)."""
    if backbone not in CONFIGS:
        raise ValueError(f"backbone {backbone!r}: choose from {sorted(CONFIGS)}")
    missing = [k for k in _MARKERS if k not in official]
    if missing:
        raise ConversionError(
            f"expected an official DINO checkpoint (IDEA-Research/DINO: {', '.join(_MARKERS)}), found "
            f"{describe_kind(official)}: {', '.join(missing)} missing"
        )
    reader = StateDictReader(official, CONVERTER_BY_BACKBONE[backbone])
    out: Dict[str, torch.Tensor] = {}

    # Input projections: 1x1 convs on the backbone levels, then 3x3 stride-2 convs (extra levels).
    num_levels = _layer_count(reader, "input_proj.")
    num_backbone_levels = backbone_levels(reader, num_levels)
    configs = CONFIGS[backbone]
    if num_levels not in configs:
        raise ConversionError(
            f"{reader.model} checkpoint with {num_levels} feature levels: the released {_BACKBONE_NAME[backbone]} "
            "models have 4 or 5"
        )
    # Backbone: after the projections, which tell how many of its levels the neck takes.
    notes = convert_detector_backbone(reader, out, BACKBONES, backbone, num_backbone_levels)
    convert_neck_and_transformer_layers(reader, out, num_levels, num_backbone_levels)
    num_decoder_layers = _layer_count(reader, "transformer.decoder.layers.")
    for source, target in {**_DECODER_EXTRAS, **_ENCODER_PROPOSALS}.items():
        for key in reader.keys_with_prefix(source + "."):
            out[target + key[len(source):]] = reader.get(key)

    # Decoder heads: one class / box head shared by every layer; the checkpoint stores each copy.
    if _layer_count(reader, "class_embed.") != num_decoder_layers or _layer_count(reader, "bbox_embed.") != num_decoder_layers:
        raise ConversionError(f"dino checkpoint: expected {num_decoder_layers} class_embed.* and bbox_embed.* (one per decoder layer)")
    for key in reader.keys_with_prefix("class_embed.") + reader.keys_with_prefix("bbox_embed."):
        group, _, rest = key.split(".", 2)
        first = f"{group}.0.{rest}"
        if not torch.equal(reader.get(key), official[first]):
            raise ConversionError(
                f"dino checkpoint has different heads per decoder layer ({key} != {first}): the released models "
                "share one (dec_pred_class_embed_share / dec_pred_bbox_embed_share True)"
            )
    for alias, source in (("transformer.decoder.bbox_embed.", "bbox_embed."), ("transformer.decoder.class_embed.", "class_embed.")):
        for key in reader.keys_with_prefix(alias):
            if source + key[len(alias):] not in official:
                raise ConversionError(f"dino checkpoint: {key} has no counterpart {source + key[len(alias):]}")
            if not torch.equal(reader.get(key), official[source + key[len(alias):]]):
                raise ConversionError(f"dino checkpoint: {key} differs from {source + key[len(alias):]}")
    decoder_class = {leaf: coco91_to_80(reader.get(f"class_embed.0.{leaf}")) for leaf in ("weight", "bias")}
    decoder_box = {key[len("bbox_embed.0."):]: reader.get(key) for key in reader.keys_with_prefix("bbox_embed.0.")}
    encoder_class = {leaf: coco91_to_80(reader.get(f"transformer.enc_out_class_embed.{leaf}")) for leaf in ("weight", "bias")}
    encoder_box = {
        key[len("transformer.enc_out_bbox_embed."):]: reader.get(key)
        for key in reader.keys_with_prefix("transformer.enc_out_bbox_embed.")
    }
    if set(encoder_box) != set(decoder_box):
        raise ConversionError(f"dino checkpoint: encoder box head {sorted(encoder_box)} differs in shape from the decoder's")
    heads = {}
    for i in range(num_decoder_layers + 1):
        classes, boxes = (decoder_class, decoder_box) if i < num_decoder_layers else (encoder_class, encoder_box)
        heads.update({f"class_heads.{i}.{leaf}": value for leaf, value in classes.items()})
        heads.update({f"box_heads.{i}.{leaf}": value for leaf, value in boxes.items()})
    for name, value in heads.items():
        out["decoder.heads." + name] = value
        out["query_source.heads." + name] = value
    notes.append("class heads (decoder and encoder): 91 COCO-id slots -> detectron2's 80 classes")
    notes.append("the encoder proposals are ranked by the max over those 80 (the official: over all 91 slots)")

    out["query_source.content.weight"] = reader.get("transformer.tgt_embed.weight")
    label_enc = reader.get("label_enc.weight")
    if label_enc.dim() != 2 or label_enc.shape[0] != 92:
        raise ConversionError(
            f"dino checkpoint: label_enc.weight has shape {tuple(label_enc.shape)}, expected (92, d): the COCO "
            "label book of 91 category-id slots + 1 (dn_labelbook_size 91)"
        )
    out["main_passes.dn.label_embedding.weight"] = torch.cat((coco91_to_80(label_enc[:91]), label_enc[91:]))
    notes.append("label_enc (denoising label embedding) -> main_passes.dn.label_embedding: 80 classes + the unused last row")

    reader.check_all_used()
    config_file, description = configs[num_levels]
    return Conversion({k: v.detach().clone() for k, v in out.items()}, config_file, description, notes)


@register_converter("dino_swin_l")
def convert_dino_swin_l(official: Dict[str, torch.Tensor]) -> Conversion:
    """An official DINO Swin-L (4 or 5 scales) state dict -> HybridDETR's DINO with the Swin-L backbone (80 classes)."""
    return convert_dino(official, backbone="swin")
