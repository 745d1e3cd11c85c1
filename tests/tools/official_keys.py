"""Every key name and shape of the official checkpoints, written from the official model
definitions (no official code and no download at test time), for the converter tests."""
from typing import Dict, List, Tuple

import torch

Shape = Tuple[int, ...]


def _linear(prefix, out_dim, in_dim) -> List[Tuple[str, Shape]]:
    return [(f"{prefix}.weight", (out_dim, in_dim)), (f"{prefix}.bias", (out_dim,))]


def _norm(prefix, dim) -> List[Tuple[str, Shape]]:
    return [(f"{prefix}.weight", (dim,)), (f"{prefix}.bias", (dim,))]


def _frozen_bn(prefix, dim) -> List[Tuple[str, Shape]]:
    # models/backbone.py FrozenBatchNorm2d: four buffers, no num_batches_tracked.
    return [(f"{prefix}.{leaf}", (dim,)) for leaf in ("weight", "bias", "running_mean", "running_var")]


def torchvision_resnet50(prefix) -> List[Tuple[str, Shape]]:
    """torchvision's ResNet-50 up to layer4 (IntermediateLayerGetter drops avgpool and fc)."""
    keys = [(f"{prefix}conv1.weight", (64, 3, 7, 7))] + _frozen_bn(f"{prefix}bn1", 64)
    in_ch = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        out_ch = width * 4
        for b in range(blocks):
            p = f"{prefix}layer{stage}.{b}"
            keys += [(f"{p}.conv1.weight", (width, in_ch, 1, 1))] + _frozen_bn(f"{p}.bn1", width)
            keys += [(f"{p}.conv2.weight", (width, width, 3, 3))] + _frozen_bn(f"{p}.bn2", width)
            keys += [(f"{p}.conv3.weight", (out_ch, width, 1, 1))] + _frozen_bn(f"{p}.bn3", out_ch)
            if b == 0:
                keys += [(f"{p}.downsample.0.weight", (out_ch, in_ch, 1, 1))] + _frozen_bn(f"{p}.downsample.1", out_ch)
            in_ch = out_ch
    return keys


def _ms_deform_attn(prefix, d=256, heads=8, levels=4, points=4):
    return (
        _linear(f"{prefix}.sampling_offsets", heads * levels * points * 2, d)
        + _linear(f"{prefix}.attention_weights", heads * levels * points, d)
        + _linear(f"{prefix}.value_proj", d, d)
        + _linear(f"{prefix}.output_proj", d, d)
    )


def _mlp(prefix, d, out):
    return _linear(f"{prefix}.layers.0", d, d) + _linear(f"{prefix}.layers.1", d, d) + _linear(f"{prefix}.layers.2", out, d)


def deformable_detr_keys(
    variant: str, d=256, ffn=1024, layers=6, queries=300, classes=91, backbone=None, channels=(512, 1024, 2048)
) -> List[Tuple[str, Shape]]:
    """models/deformable_detr.py DeformableDETR + deformable_transformer.py, R-50, 4 levels. Another backbone:
    its keys (`backbone`) and the channels of the three levels it gives the neck."""
    refine = variant in ("refine", "two_stage")
    two_stage = variant == "two_stage"
    keys = list(backbone) if backbone is not None else torchvision_resnet50("backbone.0.body.")
    for i, c in enumerate(channels):
        keys += [(f"input_proj.{i}.0.weight", (d, c, 1, 1)), (f"input_proj.{i}.0.bias", (d,))] + _norm(f"input_proj.{i}.1", d)
    keys += [("input_proj.3.0.weight", (d, channels[-1], 3, 3)), ("input_proj.3.0.bias", (d,))] + _norm("input_proj.3.1", d)
    keys += [("transformer.level_embed", (4, d))]
    for i in range(layers):
        p = f"transformer.encoder.layers.{i}"
        keys += _ms_deform_attn(f"{p}.self_attn") + _norm(f"{p}.norm1", d)
        keys += _linear(f"{p}.linear1", ffn, d) + _linear(f"{p}.linear2", d, ffn) + _norm(f"{p}.norm2", d)
    for i in range(layers):
        p = f"transformer.decoder.layers.{i}"
        keys += _ms_deform_attn(f"{p}.cross_attn") + _norm(f"{p}.norm1", d)
        keys += [(f"{p}.self_attn.in_proj_weight", (3 * d, d)), (f"{p}.self_attn.in_proj_bias", (3 * d,))]
        keys += _linear(f"{p}.self_attn.out_proj", d, d) + _norm(f"{p}.norm2", d)
        keys += _linear(f"{p}.linear1", ffn, d) + _linear(f"{p}.linear2", d, ffn) + _norm(f"{p}.norm3", d)
    num_pred = layers + (1 if two_stage else 0)
    heads = []
    for i in range(num_pred):
        heads += _linear(f"class_embed.{i}", classes, d) + _mlp(f"bbox_embed.{i}", d, 4)
    keys += heads
    if refine:  # the decoder holds the box heads for refinement
        keys += [("transformer.decoder." + k, s) for k, s in heads if k.startswith("bbox_embed")]
    if two_stage:  # ... and the class heads for the encoder proposals
        keys += [("transformer.decoder." + k, s) for k, s in heads if k.startswith("class_embed")]
        keys += _linear("transformer.enc_output", d, d) + _norm("transformer.enc_output_norm", d)
        keys += _linear("transformer.pos_trans", 2 * d, 2 * d) + _norm("transformer.pos_trans_norm", 2 * d)
    else:
        keys += [("query_embed.weight", (queries, 2 * d))] + _linear("transformer.reference_points", 2, d)
    return keys


def seeded_state_dict(keys: List[Tuple[str, Shape]], seed=0) -> Dict[str, torch.Tensor]:
    """Seeded values for every key; tensors the official model shares (heads and their decoder
    aliases; the one shared head without refinement) share values here too."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in keys:
        alias = key[len("transformer.decoder."):] if key.startswith("transformer.decoder.") and "_embed." in key else None
        if alias is not None and alias in state:
            state[key] = state[alias].clone()
            continue
        state[key] = torch.randn(shape, generator=g)
    if "transformer.decoder.bbox_embed.0.layers.0.weight" not in state:  # no refinement: one shared head
        for key in [k for k in state if k.startswith(("class_embed.", "bbox_embed."))]:
            index, rest = key.split(".", 2)[1:]
            state[key] = state[f"{key.split('.')[0]}.0.{rest}"].clone()
    return state
