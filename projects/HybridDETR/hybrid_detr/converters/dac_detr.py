"""The official DAC-DETR release (huzhengdongcs/DAC-DETR, "dac_cdn_ice") -> HybridDETR with DECODER_MODE
"dn+dac", two converters:

- "dac_detr": R-50, `configs/r50_deformplus_cdn_ice_ep12.sh` (12 epochs; the 24-epoch script differs in
  its schedule only) -> `configs/coco/dac_dino_r50_12ep_release.yaml`;
- "dac_detr_swin_l": Swin-L, `configs/swin_deformplus_cdn_ice_ep12.sh` (`--backbone swin_large_window12`;
  12 or 24 epochs, the same model: `swin_deformplus_cdn_ice_ep24.sh` adds drop path 0.5 and weight decay 0.05,
  training only) -> `configs/coco/dac_dino_swin_l_12ep_release.yaml`.

Both run `convert_dac_detr(official, backbone)`: only the backbone differs. The R-50 is torchvision's under
`backbone.0.body.`; the Swin-L (models/backbone.py:197-211 `TransformerBackbone`, held as the Joiner's
module 0 with the Swin as its `body`, :232) sits under `backbone.0.body.` too: Swin v1's layout
(`patch_embed.*`, `layers.i.blocks.j.*` with their `relative_position_index` buffers, `layers.i.downsample.*`
for i < 3) plus `norm1`-`norm3` (out_indices (1, 2, 3), :154, one LayerNorm per output stage,
models/swin_transformer.py:657-660), no final norm, no head -> our Swin backbone
(`converters/swin.py` `convert_detector_swin`); its three stages feed the three 1x1 input projections.

Key names as in the release's model definition (`models/deformable_detr.py`,
`deformable_transformer.py`, `dn_components.py`): H-DETR's Deformable DETR with two-stage + box
refinement, i.e. the layout of an official Deformable DETR "++ two-stage" checkpoint (`backbone.0.body.*`,
`input_proj.*`, `transformer.{level_embed, encoder.*, decoder.*, enc_output(_norm), pos_trans(_norm)}`,
`class_embed.{0..6}`, `bbox_embed.{0..6}` and their `transformer.decoder.*` aliases), plus:

- `query_embed.weight` (900, 256): the learned content queries of mixed query selection
  -> `query_source.content.weight`;
- `label_enc.weight` (92, 256): CDN's label embedding of the denoising queries (training only; at
  inference it enters the output as `0.0 * label_enc.weight[0, 0]`), rows indexed by COCO category id
  (91 slots + 1 never used) -> the dn mode's `main_passes.dn.label_embedding.weight` (81, 256): the 80
  thing classes' rows in detectron2's order, then the unused last row. Fine-tuning a converted model
  trains with denoising, as the release did.

The C-decoder reuses the O-decoder's cross-attention, FFN, norms and heads (no parameter of its
own), and look-forward-twice changes gradients only, so nothing else is needed. The shared part is
converted by the Deformable DETR converter, with the backbone step of `converters/backbones.py`.
"""
from typing import Dict

import torch

from .backbones import RESNET_PREFIX, DetectorBackbones
from .common import Conversion, ConversionError, coco91_to_80, register_converter
from .deformable_detr import convert_deformable_detr
from .kinds import describe_kind

__all__ = ["convert_dac_detr", "convert_dac_detr_swin_l", "CONFIG", "CONFIGS", "CONVERTER_BY_BACKBONE"]

CONFIGS = {  # backbone -> (config, description)
    "resnet": (
        "coco/dac_dino_r50_12ep_release.yaml",
        "DAC-DETR release (dac_cdn_ice), R-50, 12 epochs: Deformable-DETR++ (two-stage + box refinement, mixed "
        "selection, look-forward-twice, 900 queries, FFN 2048) with the DAC C-decoder and CDN denoising",
    ),
    "swin": (
        "coco/dac_dino_swin_l_12ep_release.yaml",
        "DAC-DETR release (dac_cdn_ice), Swin-L (swin_large_window12, stages 1-3 out): Deformable-DETR++ (two-stage "
        "+ box refinement, mixed selection, look-forward-twice, 900 queries, FFN 2048) with the DAC C-decoder and "
        "CDN denoising",
    ),
}
CONFIG = CONFIGS["resnet"][0]
CONVERTER_BY_BACKBONE = {"resnet": "dac_detr", "swin": "dac_detr_swin_l"}
BACKBONES = DetectorBackbones(
    family="DAC-DETR",
    swin_prefix=RESNET_PREFIX,  # TransformerBackbone keeps its Swin as `body` too
    converters=CONVERTER_BY_BACKBONE,
    swin_origin="configs/swin_deformplus_cdn_ice_ep12.sh",
)
# Keys only a DAC-DETR release has, or that it must have (two-stage + refinement).
_MARKERS = (
    "label_enc.weight",
    "query_embed.weight",
    "transformer.enc_output.weight",
    "transformer.decoder.bbox_embed.0.layers.0.weight",
)


@register_converter("dac_detr")
def convert_dac_detr(official: Dict[str, torch.Tensor], backbone: str = "resnet") -> Conversion:
    """An official DAC-DETR (R-50 release) state dict -> HybridDETR's DAC mode (detectron2 ResNet, 80 classes).
    `backbone` "swin": the Swin-L release (what the dac_detr_swin_l converter runs)."""
    if backbone not in CONFIGS:
        raise ValueError(f"backbone {backbone!r}: choose from {sorted(CONFIGS)}")
    name = CONVERTER_BY_BACKBONE[backbone]
    missing = [k for k in _MARKERS if k not in official]
    if missing:
        raise ConversionError(
            "expected a DAC-DETR release checkpoint (Deformable-DETR++ with mixed selection and CDN: "
            f"{', '.join(_MARKERS)}), found {describe_kind(official)}: {', '.join(missing)} missing"
        )
    d_model = official["transformer.level_embed"].shape[-1] if "transformer.level_embed" in official else None
    label_enc, content = official["label_enc.weight"], official["query_embed.weight"]
    if label_enc.dim() != 2 or tuple(label_enc.shape) != (92, d_model):
        raise ConversionError(
            f"{name} checkpoint: label_enc.weight has shape {tuple(label_enc.shape)}, expected (92, {d_model}) "
            "(CDN's label book of 91 COCO slots + 1)"
        )
    if content.dim() != 2 or content.shape[1] != d_model:
        raise ConversionError(
            f"{name} checkpoint: query_embed.weight has shape {tuple(content.shape)}, expected (num_queries, "
            f"{d_model}): mixed selection's content queries (a (Q, {2 * d_model}) embedding is a model without "
            "mixed selection)"
        )
    shared = {k: v for k, v in official.items() if k not in ("label_enc.weight", "query_embed.weight")}
    base = convert_deformable_detr(shared, backbone, BACKBONES)  # its errors name this converter
    state_dict = dict(base.state_dict)
    state_dict["query_source.content.weight"] = content.detach().clone()
    # COCO-id rows -> detectron2's 80 classes, then the label book's last (unused) row.
    state_dict["main_passes.dn.label_embedding.weight"] = torch.cat((coco91_to_80(label_enc[:91]), label_enc[91:]))
    notes = list(base.notes) + [
        "query_embed -> mixed selection's learned content queries (query_source.content)",
        "label_enc (CDN's label embedding, 91 COCO-id slots + 1) -> the dn mode's label embedding (80 classes + 1)",
        "C-decoder: shares every weight of the decoder (no parameter of its own); not run at inference",
    ]
    config_file, description = CONFIGS[backbone]
    return Conversion(state_dict, config_file, description, notes)


@register_converter("dac_detr_swin_l")
def convert_dac_detr_swin_l(official: Dict[str, torch.Tensor]) -> Conversion:
    """An official DAC-DETR Swin-L release state dict -> HybridDETR's DAC mode with the Swin-L backbone (80 classes)."""
    return convert_dac_detr(official, backbone="swin")
