"""Official Swin Transformer weights -> HybridDETR's Swin backbone (`modeling/backbones/swin.py`: timm's
layout under `backbone.body.*`, one LayerNorm per output stage under `backbone.output_norms.<stage>`).

Two official layouts, told apart by their keys (read from the model definitions; none of their code here):

- "swin_v1": Microsoft's Swin (ImageNet-1k / 22k classification checkpoints, `{"model": ...}`) and its
  detection copy (Swin-Transformer-Object-Detection; Co-DETR `projects/models/swin_transformer.py`
  SwinTransformerV1, which Co-DINO / Co-Deformable-DETR Swin configs use; DINO `models/dino/swin_transformer.py`;
  DAC-DETR `models/swin_transformer.py`): `patch_embed.proj`, `layers.i.blocks.j.{norm1, attn.qkv, attn.proj,
  attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2}`, `layers.i.downsample.{norm, reduction}` at the
  *end* of stage i (timm: the start of stage i + 1), `norm{i}` per output stage (detection) or `norm` + `head`
  (classification: dropped, a backbone has neither).
- "mmdet": MMDetection's `SwinTransformer` (mmdet 2.x / 3.x, e.g. MMDetection 3's Co-DINO / DINO Swin
  checkpoints): `patch_embed.projection`, `stages.i.blocks.j.attn.w_msa.*`, `ffn.layers.0.0` / `ffn.layers.1`,
  `stages.i.downsample.*` (end of stage i) and `norm{i}`. Its patch merging gathers each 2x2 cell with
  `nn.Unfold` (channel index c * 4 + 2 * dy + dx); Swin's concatenates x(0,0), x(1,0), x(0,1), x(1,1)
  (index (2 * dx + dy) * C + c): the merging's norm and reduction are permuted accordingly.

Buffers (`relative_position_index`, fixed-size `attn_mask`) are recomputed by the model and dropped; an
absolute position embedding (`ape=True`, used by none of the papers' models) is refused.

    python -m hybrid_detr.converters.swin swin_large_patch4_window12_384_22k.pth output/swin_l_22k_backbone.pth

writes the backbone alone as a detectron2 checkpoint (for MODEL.WEIGHTS: the other weights start afresh, as
with detectron2's ImageNet ResNets). The registered converter "co_dino_swin_l" converts the Co-DINO Swin-L
release (`co_dino_5scale_swin_large_1x_coco.pth`) into `configs/coco/co_dino_swin_l_12ep_query_head.yaml`;
"dino_swin_l" (`converters/dino.py`) the DINO Swin-L releases, whose Swin sits under `backbone.0.`, and
"dac_detr_swin_l" (`converters/dac_detr.py`) the DAC-DETR Swin-L release, under `backbone.0.body.` (both through
`converters/backbones.py`).
"""
import argparse
import re
import sys
from typing import Dict, List, Optional

import torch

from .common import Conversion, ConversionError, StateDictReader, load_official_checkpoint, register_converter
from .kinds import describe_kind

__all__ = [
    "SWIN_LAYOUTS",
    "swin_layout",
    "swin_output_stages",
    "convert_swin_backbone",
    "convert_detector_swin",
    "convert_co_dino_swin_l",
    "convert_swin_backbone_file",
]

SWIN_LAYOUTS = ("swin_v1", "mmdet")
_STAGE_NAMES = ("res2", "res3", "res4", "res5")
_BLOCK_V1 = {  # Swin v1 block module -> timm's
    "norm1": "norm1",
    "attn.qkv": "attn.qkv",
    "attn.proj": "attn.proj",
    "attn.relative_position_bias_table": "attn.relative_position_bias_table",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_BLOCK_MMDET = {  # mmdet SwinBlock module -> timm's
    "norm1": "norm1",
    "attn.w_msa.qkv": "attn.qkv",
    "attn.w_msa.proj": "attn.proj",
    "attn.w_msa.relative_position_bias_table": "attn.relative_position_bias_table",
    "norm2": "norm2",
    "ffn.layers.0.0": "mlp.fc1",
    "ffn.layers.1": "mlp.fc2",
}
_LAYOUT = {
    "swin_v1": dict(embed="patch_embed.proj", stage="layers", block=_BLOCK_V1, buffers=("attn.relative_position_index", "attn_mask")),
    "mmdet": dict(embed="patch_embed.projection", stage="stages", block=_BLOCK_MMDET, buffers=("attn.w_msa.relative_position_index",)),
}


def swin_layout(state_dict: Dict[str, torch.Tensor], prefix: str = "") -> Optional[str]:
    """"swin_v1" or "mmdet" when `state_dict` holds a Swin under `prefix`, else None."""
    if prefix + "patch_embed.projection.weight" in state_dict and any(
        k.startswith(prefix + "stages.") and ".attn.w_msa." in k for k in state_dict
    ):
        return "mmdet"
    if prefix + "patch_embed.proj.weight" in state_dict and any(
        k.startswith(prefix + "layers.") and ".blocks." in k for k in state_dict
    ):
        return "swin_v1"
    return None


def swin_output_stages(state_dict: Dict[str, torch.Tensor], prefix: str = "") -> List[int]:
    """The stages i, ascending, that have an output norm `norm{i}` under `prefix` (a detection Swin has one
    per output stage: its `out_indices`)."""
    pattern = re.compile(re.escape(prefix) + r"norm(\d+)\.(weight|bias)")
    return sorted({int(m.group(1)) for m in map(pattern.fullmatch, state_dict) if m})


def _unfold_to_concat_order(value: torch.Tensor) -> torch.Tensor:
    """Last dim 4C from mmdet's unfold order (c, dy, dx) to Swin's concatenation order (dx, dy, c)."""
    lead = value.shape[:-1]
    channels = value.shape[-1] // 4
    grouped = value.reshape(*lead, channels, 2, 2)  # (..., c, dy, dx)
    return grouped.movedim(-3, -1).transpose(-3, -2).reshape(*lead, 4 * channels)  # (..., dx, dy, c)


def convert_swin_backbone(
    reader: StateDictReader, prefix: str, out: Dict[str, torch.Tensor], target: str = "backbone."
) -> List[str]:
    """Every Swin tensor under `prefix` in `reader` -> `out[target + ...]` (our backbone's keys), marking
    them used. Returns notes on what was dropped. Raises ConversionError naming what does not fit."""
    layout = swin_layout(reader.state_dict, prefix)
    if layout is None:
        raise ConversionError(
            f"{reader.model} checkpoint: no Swin Transformer under {prefix!r} (expected {prefix}patch_embed.proj.* + "
            f"{prefix}layers.* (Swin v1) or {prefix}patch_embed.projection.* + {prefix}stages.* (mmdet)); found "
            f"{describe_kind(reader.state_dict)}"
        )
    spec = _LAYOUT[layout]
    notes = []
    body = target + "body."
    for key in reader.keys_with_prefix(prefix):
        name = key[len(prefix):]
        if name == "absolute_pos_embed":
            raise ConversionError(
                f"{reader.model} checkpoint: {key} is an absolute position embedding (ape=True), which the Swin "
                "backbone does not have (none of the papers' models uses it)"
            )
        if name.startswith(spec["embed"] + "."):
            out[body + "patch_embed.proj." + name[len(spec["embed"]) + 1:]] = reader.get(key)
        elif name.startswith("patch_embed.norm."):
            out[body + name] = reader.get(key)
        elif re.fullmatch(r"norm[0-3]\.(weight|bias)", name):
            out[f"{target}output_norms.{_STAGE_NAMES[int(name[4])]}.{name.split('.')[1]}"] = reader.get(key)
        elif re.fullmatch(r"(norm|head(\.fc)?)\.(weight|bias)", name):
            reader.mark_used([key])  # the classifier's final norm and head
        else:
            m = re.fullmatch(spec["stage"] + r"\.(\d+)\.(blocks\.\d+|downsample)\.(.+)", name)
            if m is None:
                raise ConversionError(f"{reader.model} checkpoint: {key!r} is not a Swin ({layout}) parameter")
            stage, part, rest = int(m.group(1)), m.group(2), m.group(3)
            if part == "downsample":
                value = reader.get(key)
                if layout == "mmdet" and rest in ("reduction.weight", "norm.weight", "norm.bias"):
                    value = _unfold_to_concat_order(value)
                if rest not in ("reduction.weight", "norm.weight", "norm.bias"):
                    raise ConversionError(f"{reader.model} checkpoint: {key!r} is not a patch-merging parameter")
                out[f"{body}layers.{stage + 1}.downsample.{rest}"] = value  # timm: start of the next stage
                continue
            if rest in spec["buffers"]:
                reader.mark_used([key])
                continue
            module, _, leaf = rest.rpartition(".")
            if rest == "attn.w_msa.relative_position_bias_table" or rest == "attn.relative_position_bias_table":
                module, leaf = rest, ""
            if module not in spec["block"]:
                raise ConversionError(f"{reader.model} checkpoint: {key!r} is not a Swin ({layout}) block parameter")
            new = spec["block"][module] + ("." + leaf if leaf else "")
            out[f"{body}layers.{stage}.{part}.{new}"] = reader.get(key)
    dropped = [k for k in (prefix + "norm.weight", prefix + "head.weight", prefix + "head.fc.weight") if k in reader]
    if dropped:
        notes.append("Swin classification checkpoint: its final norm and classifier head dropped (a backbone has neither)")
    notes.append(
        f"Swin backbone ({layout} layout) -> timm's layout: patch merging moved to the start of the next stage"
        + (", its 2x2 channels reordered from mmdet's unfold order" if layout == "mmdet" else "")
        + "; relative_position_index / attn_mask buffers recomputed by the model"
    )
    return notes


def convert_detector_swin(reader: StateDictReader, prefix: str, out: Dict[str, torch.Tensor], num_levels: int) -> List[str]:
    """A detector's Swin v1 under `prefix` (DINO: `backbone.0.`; DAC-DETR's release: `backbone.0.body.`, the same
    layout) whose last `num_levels` stages feed the neck -> `out["backbone.*"]`, as `convert_swin_backbone`.
    Such a Swin has one output norm per fed stage, `norm{4 - num_levels}`..`norm3`, and no classifier's final
    norm or head, which `convert_swin_backbone` would drop: here they would be another model's weights, refused."""
    classifier = [k for k in reader.keys_with_prefix(prefix) if k[len(prefix):].split(".")[0] in ("norm", "head")]
    if classifier:
        raise ConversionError(
            f"{reader.model} checkpoint: {', '.join(classifier[:3])} belong to a classification Swin's final norm / "
            "head, which a detector's Swin does not have"
        )
    stages = swin_output_stages(reader.state_dict, prefix)
    expected = list(range(4 - num_levels, 4))
    if stages != expected:
        raise ConversionError(
            f"{reader.model} checkpoint: its Swin has the output norms {[f'norm{i}' for i in stages]} for {num_levels} "
            f"backbone levels (1x1 input projections); it needs one norm per stage that feeds the neck, the last "
            f"{num_levels}: {[f'norm{i}' for i in expected]} (out_indices / return_interm_indices {expected})"
        )
    return convert_swin_backbone(reader, prefix, out)


# ---- Co-DINO Swin-L (Co-DETR release) ---------------------------------------------------------------

CO_DINO_SWIN_L_CONFIG = "coco/co_dino_swin_l_12ep_query_head.yaml"
CO_DINO_SWIN_L_DESCRIPTION = (
    "Co-DINO Swin-L 1x, 5 scales (Co-DETR release, co_dino_5scale_swin_large_1x_coco), query head only: the "
    "co_dino conversion with the Swin-L backbone (SwinTransformerV1) and its four output norms"
)


@register_converter("co_dino_swin_l")
def convert_co_dino_swin_l(official: Dict[str, torch.Tensor]) -> Conversion:
    """An official Co-DINO Swin-L (mmdet 2.x, SwinTransformerV1 backbone) state dict -> HybridDETR."""
    from .co_dino import convert_co_dino

    if swin_layout(official, "backbone.") is None:
        raise ConversionError(
            f"expected a Co-DINO checkpoint with a Swin backbone (backbone.patch_embed.*, backbone.layers.*), "
            f"found {describe_kind(official)}"
        )
    reader = StateDictReader(official, "co_dino_swin_l")
    out: Dict[str, torch.Tensor] = {}
    notes = convert_swin_backbone(reader, "backbone.", out)  # every backbone.* tensor, or an error
    # The rest is Co-DINO's query head and auxiliary heads, converted (and checked) as the R-50 release's.
    rest = {k: v for k, v in official.items() if not k.startswith("backbone.")}
    base = convert_co_dino(rest)
    if any(k.startswith("backbone.") for k in base.state_dict):
        raise ConversionError("co_dino_swin_l: the co_dino conversion produced backbone keys from a non-backbone tensor")
    state_dict = {**base.state_dict, **{k: v.detach().clone() for k, v in out.items()}}
    return Conversion(state_dict, CO_DINO_SWIN_L_CONFIG, CO_DINO_SWIN_L_DESCRIPTION, base.notes + notes)


# ---- backbone-only files (ImageNet checkpoints, for MODEL.WEIGHTS) --------------------------------------


def convert_swin_backbone_file(input_path: str, output_path: str) -> Conversion:
    """An official Swin checkpoint (classification, or a detector's `backbone.*`) -> a detectron2 checkpoint
    holding `backbone.*` alone. Every tensor of a bare Swin must be used; of a detector, only its backbone."""
    from .common import save_detectron2_checkpoint

    official = load_official_checkpoint(input_path, "swin")
    prefix = "backbone." if swin_layout(official, "backbone.") else ""
    reader = StateDictReader(official, "swin")
    out: Dict[str, torch.Tensor] = {}
    notes = convert_swin_backbone(reader, prefix, out)
    if prefix:
        notes.append("a detector checkpoint: its backbone.* converted, everything else left out")
    else:
        reader.check_all_used()
    conversion = Conversion(
        {k: v.detach().clone() for k, v in out.items()}, "", f"Swin backbone ({len(out)} tensors)", notes
    )
    save_detectron2_checkpoint(conversion, output_path, source=input_path)
    return conversion


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert an official Swin checkpoint (Swin v1 or mmdet layout) into a detectron2 checkpoint "
        "of the Swin backbone alone (backbone.*), for MODEL.WEIGHTS."
    )
    parser.add_argument("input", help="e.g. swin_large_patch4_window12_384_22k.pth")
    parser.add_argument("output", help="where to write the detectron2 checkpoint (.pth)")
    args = parser.parse_args(argv)
    try:
        conversion = convert_swin_backbone_file(args.input, args.output)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: {conversion.description}")
    for note in conversion.notes:
        print(f"  - {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
