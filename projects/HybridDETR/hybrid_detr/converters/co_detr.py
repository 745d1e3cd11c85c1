"""The official Co-DETR release's Co-Deformable-DETR R-50 (Sense-X/Co-DETR,
`projects/configs/co_deformable_detr/co_deformable_detr_r50_1x_coco.py`, mmdet 2.x) -> HybridDETR,
query head only: what the official model runs at inference (`eval_module='detr'`).

Key names as in the official model definitions (mmdet 2.x / mmcv 1.x modules, the release's
`projects/models/co_detr.py`, `co_deformable_detr_head.py`, `transformer.py`):

- `backbone.*`: mmdet's ResNet-50 (torchvision names; BatchNorm with `num_batches_tracked`)
  -> detectron2's ResNet (FrozenBN);
- `neck.convs.{0,1,2}.{conv,gn}` (ChannelMapper, 1x1 conv without bias, GroupNorm) and
  `neck.extra_convs.0.{conv,gn}` (3x3 stride-2 conv on C5) -> `neck.input_proj.*` / `neck.extra_proj.0`
  (conv bias 0);
- `query_head.transformer.{level_embeds, encoder.layers.*, decoder.layers.*, enc_output(_norm),
  pos_trans(_norm)}`: mmcv layers (`attentions.{0,1}`, `ffns.0.layers.{0.0,1}`, `norms.{0,1,2}`)
  -> our encoder / decoder layers and two-stage query source;
- `query_head.cls_branches.{0..6}` (80 classes, mmdet's contiguous COCO order = detectron2's; the
  encoder's branch 6 is class-agnostic, ranked and trained on output 0) and
  `query_head.reg_branches.{0..6}.{0,2,4}` -> the decoder's and the encoder's heads;
- `query_head.query_embedding` (300, 256): mixed selection's content queries.

Dropped (auxiliary, training only; the official model does not run them at inference):
`rpn_head.*`, `roi_head.*` (Faster R-CNN), `bbox_head.*` (ATSS), and the query head's
aux-only parts: `query_head.downsample.*` (the adapter's extra stride-2 level for the aux heads) and
`query_head.transformer.{head_pos_embed, aux_pos_trans*, aux_pos_trans_norm*, pos_feats_trans*,
pos_feats_norm*}` (the customized positive queries' projections).
"""
import re
from typing import Dict

import torch

from .common import Conversion, ConversionError, StateDictReader, register_converter, torchvision_resnet_to_detectron2
from .kinds import describe_kind

__all__ = ["convert_co_detr", "CONFIG"]

CONFIG = "coco/co_deformable_detr_r50_12ep_query_head.yaml"
DESCRIPTION = (
    "Co-Deformable-DETR R-50 1x (Co-DETR release), query head only: Deformable-DETR++ (two-stage + box refinement, "
    "mixed selection, look-forward-twice, 300 queries, FFN 2048)"
)
NUM_CLASSES = 80
# Auxiliary heads (RPN, Faster R-CNN box head, ATSS) and the query head's aux-only parts, dropped. Anything
# else (e.g. a mask head of the instance-segmentation variant) is refused as unknown.
_AUX = re.compile(
    r"(rpn_head\.|roi_head\.\d+\.bbox_head\.|bbox_head\.\d+\.|query_head\.downsample\."
    r"|query_head\.transformer\.(head_pos_embed|aux_pos_trans|aux_pos_trans_norm|pos_feats_trans|pos_feats_norm)\.)"
)
_ENCODER_LAYER = {  # mmcv BaseTransformerLayer (self_attn, norm, ffn, norm) -> ours
    "attentions.0": "self_attn",
    "norms.0": "norm",
    "ffns.0.layers.0.0": "ffn.linear1",
    "ffns.0.layers.1": "ffn.linear2",
    "norms.1": "ffn.norm",
}
_DECODER_LAYER = {  # mmcv DetrTransformerDecoderLayer (self_attn, norm, cross_attn, norm, ffn, norm) -> ours
    "attentions.0.attn": "self_attn",
    "norms.0": "norm_self",
    "attentions.1": "cross_attn.attn",
    "norms.1": "norm_cross",
    "ffns.0.layers.0.0": "ffn.linear1",
    "ffns.0.layers.1": "ffn.linear2",
    "norms.2": "ffn.norm",
}
_TWO_STAGE = {
    "query_head.transformer.enc_output": "query_source.memory_proj",
    "query_head.transformer.enc_output_norm": "query_source.memory_norm",
    "query_head.transformer.pos_trans": "query_source.position_proj",
    "query_head.transformer.pos_trans_norm": "query_source.position_norm",
}
_MARKERS = (
    "query_head.transformer.level_embeds",
    "query_head.transformer.encoder.layers.0.attentions.0.sampling_offsets.weight",
    "query_head.transformer.enc_output.weight",
    "query_head.cls_branches.0.weight",
    "query_head.query_embedding.weight",
    "neck.convs.0.conv.weight",
)


def _indices(reader: StateDictReader, prefix: str):
    found = {int(m.group(1)) for k in reader.state_dict for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    if not found or found != set(range(max(found) + 1)):
        raise ConversionError(f"co_detr checkpoint: no consecutive '{prefix}N.*' keys (found {sorted(found)})")
    return len(found)


def _rename(rest: str, table: Dict[str, str], where: str) -> str:
    for source in sorted(table, key=len, reverse=True):
        if rest.startswith(source + "."):
            return table[source] + rest[len(source):]
    raise ConversionError(f"co_detr checkpoint: unknown {where} parameter {rest!r}")


@register_converter("co_detr")
def convert_co_detr(official: Dict[str, torch.Tensor]) -> Conversion:
    """An official Co-Deformable-DETR R-50 (mmdet 2.x) state dict -> HybridDETR, query head only."""
    missing = [k for k in _MARKERS if k not in official]
    if missing:
        raise ConversionError(
            "expected an mmdet Co-Deformable-DETR checkpoint (query_head.transformer.*, query_head.cls_branches.*, "
            f"neck.convs.*; two-stage with mixed selection), found {describe_kind(official)}: {', '.join(missing)} missing"
        )
    reader = StateDictReader(official, "co_detr")
    out: Dict[str, torch.Tensor] = {}
    notes = []

    # Backbone: mmdet ResNet (torchvision names) -> detectron2 ResNet; num_batches_tracked dropped.
    for key in reader.keys_with_prefix("backbone."):
        name = key[len("backbone."):]
        if name.endswith("num_batches_tracked"):
            reader.mark_used([key])
            continue
        out["backbone." + torchvision_resnet_to_detectron2(name)] = reader.get(key)

    # Neck: ChannelMapper convs have no bias (GroupNorm follows): ours get a zero bias.
    num_inputs = _indices(reader, "neck.convs.")
    num_extra = _indices(reader, "neck.extra_convs.") if reader.keys_with_prefix("neck.extra_convs.") else 0
    for prefix, target, count in (("neck.convs", "neck.input_proj", num_inputs), ("neck.extra_convs", "neck.extra_proj", num_extra)):
        for i in range(count):
            weight = reader.get(f"{prefix}.{i}.conv.weight")
            out[f"{target}.{i}.0.weight"] = weight
            out[f"{target}.{i}.0.bias"] = (
                reader.get(f"{prefix}.{i}.conv.bias") if f"{prefix}.{i}.conv.bias" in reader else weight.new_zeros(weight.shape[0])
            )
            out[f"{target}.{i}.1.weight"] = reader.get(f"{prefix}.{i}.gn.weight")
            out[f"{target}.{i}.1.bias"] = reader.get(f"{prefix}.{i}.gn.bias")
    notes.append("neck: mmdet ChannelMapper (convs without bias) -> input projections with bias 0")

    t = "query_head.transformer."
    out["level_embed"] = reader.get(t + "level_embeds")
    for kind, table, target in (("encoder", _ENCODER_LAYER, "encoder"), ("decoder", _DECODER_LAYER, "decoder")):
        for key in reader.keys_with_prefix(f"{t}{kind}.layers."):
            index, rest = key[len(f"{t}{kind}.layers."):].split(".", 1)
            out[f"{target}.layers.{index}.{_rename(rest, table, kind + ' layer')}"] = reader.get(key)
    num_decoder_layers = _indices(reader, t + "decoder.layers.")
    for source, target in _TWO_STAGE.items():
        for key in reader.keys_with_prefix(source + "."):
            out[target + key[len(source):]] = reader.get(key)

    num_heads = _indices(reader, "query_head.cls_branches.")
    if num_heads != num_decoder_layers + 1 or _indices(reader, "query_head.reg_branches.") != num_heads:
        raise ConversionError(
            f"co_detr checkpoint: {num_heads} class branches for {num_decoder_layers} decoder layers; expected one per "
            "layer + the encoder's (two-stage with box refinement)"
        )
    for i in range(num_heads):
        heads = {
            f"class_heads.{i}.weight": reader.get(f"query_head.cls_branches.{i}.weight"),
            f"class_heads.{i}.bias": reader.get(f"query_head.cls_branches.{i}.bias"),
        }
        if heads[f"class_heads.{i}.weight"].shape[0] != NUM_CLASSES:
            raise ConversionError(
                f"co_detr checkpoint: query_head.cls_branches.{i} has {heads[f'class_heads.{i}.weight'].shape[0]} outputs, "
                f"expected {NUM_CLASSES} (COCO)"
            )
        for j, layer in enumerate((0, 2, 4)):
            heads[f"box_heads.{i}.layers.{j}.weight"] = reader.get(f"query_head.reg_branches.{i}.{layer}.weight")
            heads[f"box_heads.{i}.layers.{j}.bias"] = reader.get(f"query_head.reg_branches.{i}.{layer}.bias")
        for name, value in heads.items():
            out["decoder.heads." + name] = value
            out["query_source.heads." + name] = value
    out["query_source.content.weight"] = reader.get("query_head.query_embedding.weight")
    notes.append("class branches: mmdet's 80 contiguous COCO classes = detectron2's (no remapping); encoder branch ranks by output 0")
    notes.append("query_head.query_embedding -> mixed selection's learned content queries (query_source.content)")

    dropped = [k for k in reader.state_dict if _AUX.match(k)]
    reader.mark_used(dropped)
    groups = sorted({k.split(".")[0] if not k.startswith("query_head.") else ".".join(k.split(".")[:3 if k.startswith(t) else 2]) for k in dropped})
    if dropped:
        notes.append(
            f"dropped {len(dropped)} tensors of the auxiliary heads and their aux-only projections ({', '.join(groups)}): "
            "training only, not run at inference; fine-tuning with Co-DETR's aux heads here starts them afresh"
        )
    reader.check_all_used()
    return Conversion({k: v.detach().clone() for k, v in out.items()}, CONFIG, DESCRIPTION, notes)
