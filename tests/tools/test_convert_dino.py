"""The dino converter (official DINO R-50, 4 and 5 scales): every official key name and shape (`dino_keys`,
written from IDEA-Research/DINO's model definition: models/dino/dino.py, deformable_transformer.py,
backbone.py, with config/DINO/DINO_{4,5}scale.py), converted, loads strictly into the model of the
shipped config; tensors checked in place; checkpoints of other kinds refused, naming what was expected
and what was found. No download, no official code."""
import argparse
from typing import Dict, List, Tuple

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from hybrid_detr.config import load_config
from hybrid_detr.converters import CONVERTERS, ConversionError, convert_file
from hybrid_detr.converters.common import COCO_THING_IDS
from hybrid_detr.converters.kinds import describe_kind
from hybrid_detr.converters.report import convert_and_report
from hybrid_detr.model_zoo import get_config_file
from official_keys import Shape, _linear, _mlp, _ms_deform_attn, _norm, deformable_detr_keys, seeded_state_dict, torchvision_resnet50
from official_keys_dac_co_detr import dac_detr_keys

IDS = torch.as_tensor(COCO_THING_IDS)


def dino_keys(
    scales=4, d=256, ffn=2048, layers=6, queries=900, classes=91, backbone=None, stage_channels=(256, 512, 1024, 2048)
) -> List[Tuple[str, Shape]]:
    """models/dino/dino.py DINO (+ deformable_transformer.py DeformableTransformer, backbone.py),
    R-50, two_stage_type 'standard', shared decoder heads, separate encoder heads, embed_init_tgt.
    Another backbone: its keys (`backbone`) and the channels of its four stages."""
    # IntermediateLayerGetter keeps layer1..layer4.
    keys = list(backbone) if backbone is not None else torchvision_resnet50("backbone.0.body.")
    channels = tuple(stage_channels)[4 - (scales - 1):]  # return_interm_indices [1,2,3] or [0,1,2,3]
    for i, c in enumerate(channels):
        keys += [(f"input_proj.{i}.0.weight", (d, c, 1, 1)), (f"input_proj.{i}.0.bias", (d,))] + _norm(f"input_proj.{i}.1", d)
    extra = len(channels)  # dino.py:106-110: one 3x3 stride-2 conv on the last stage
    keys += [(f"input_proj.{extra}.0.weight", (d, channels[-1], 3, 3)), (f"input_proj.{extra}.0.bias", (d,))] + _norm(f"input_proj.{extra}.1", d)
    # Heads first (the decoder's aliases below copy them): dino.py:141-152, one module per list.
    for i in range(layers):
        keys += _mlp(f"bbox_embed.{i}", d, 4)
    for i in range(layers):
        keys += _linear(f"class_embed.{i}", classes, d)
    keys += [("transformer.level_embed", (scales, d))]
    for i in range(layers):
        p = f"transformer.encoder.layers.{i}"
        keys += _ms_deform_attn(f"{p}.self_attn", levels=scales) + _norm(f"{p}.norm1", d)
        keys += _linear(f"{p}.linear1", ffn, d) + _linear(f"{p}.linear2", d, ffn) + _norm(f"{p}.norm2", d)
    for i in range(layers):
        p = f"transformer.decoder.layers.{i}"
        keys += _ms_deform_attn(f"{p}.cross_attn", levels=scales) + _norm(f"{p}.norm1", d)
        keys += [(f"{p}.self_attn.in_proj_weight", (3 * d, d)), (f"{p}.self_attn.in_proj_bias", (3 * d,))]
        keys += _linear(f"{p}.self_attn.out_proj", d, d) + _norm(f"{p}.norm2", d)
        keys += _linear(f"{p}.linear1", ffn, d) + _linear(f"{p}.linear2", d, ffn) + _norm(f"{p}.norm3", d)
    keys += _norm("transformer.decoder.norm", d)  # deformable_transformer.py:135
    keys += _linear("transformer.decoder.ref_point_head.layers.0", d, 2 * d) + _linear("transformer.decoder.ref_point_head.layers.1", d, d)
    for i in range(layers):  # dino.py:151-152: the decoder holds the same heads
        keys += [(f"transformer.decoder.{k}", s) for k, s in _mlp(f"bbox_embed.{i}", d, 4)]
    for i in range(layers):
        keys += [(f"transformer.decoder.{k}", s) for k, s in _linear(f"class_embed.{i}", classes, d)]
    keys += [("transformer.tgt_embed.weight", (queries, d))]  # :166-168 (embed_init_tgt)
    keys += _linear("transformer.enc_output", d, d) + _norm("transformer.enc_output_norm", d)  # :180-181
    keys += _mlp("transformer.enc_out_bbox_embed", d, 4) + _linear("transformer.enc_out_class_embed", classes, d)  # dino.py:158-169
    keys += [("label_enc.weight", (classes + 1, d))]  # dino.py:81, dn_labelbook_size 91
    return keys


def dino_state(scales=4, seed=0, **kwargs) -> Dict[str, torch.Tensor]:
    """Seeded values; the six decoder heads are one module (equal copies), their decoder aliases too."""
    state = seeded_state_dict(dino_keys(scales, **kwargs), seed=seed)
    for key in [k for k in state if k.startswith(("class_embed.", "bbox_embed.", "transformer.decoder.class_embed.", "transformer.decoder.bbox_embed."))]:
        prefix = "transformer.decoder." if key.startswith("transformer.decoder.") else ""
        group, _, rest = key[len(prefix):].split(".", 2)
        state[key] = state[f"{group}.0.{rest}"].clone()
    return state


def _save(tmp_path, name, state):
    path = str(tmp_path / name)
    # As DINO's main.py saves it: model, optimizer, scheduler, epoch and the args Namespace.
    torch.save({"model": state, "epoch": 11, "args": argparse.Namespace(num_feature_levels=4)}, path)
    return path


def _load_converted(output, config_name):
    cfg = load_config(get_config_file(config_name), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    model = build_model(cfg)
    data = torch.load(output, map_location="cpu", weights_only=True)
    incompatible = DetectionCheckpointer(model)._load_model({**data, "model": dict(data["model"])})
    assert not incompatible.missing_keys and not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    model.load_state_dict(data["model"], strict=True)
    return cfg, model


def _assert_refused(tmp_path, model, source, match):
    output = tmp_path / "out.pth"
    with pytest.raises(ConversionError, match=match):
        convert_file(model, str(source), str(output))
    assert not output.exists()


@pytest.mark.parametrize("scales", [4, 5])
def test_dino_converts_and_loads_strictly(tmp_path, scales):
    official = dino_state(scales, seed=scales)
    output = str(tmp_path / "dino.pth")
    conversion = convert_file("dino", _save(tmp_path, f"checkpoint0011_{scales}scale.pth", official), output)
    assert conversion.config_name == f"coco/dino_r50_{scales}scale_12ep.yaml"
    cfg, model = _load_converted(output, conversion.config_name)
    m = cfg.MODEL.HYBRID_DETR
    assert (m.DECODER_MODE, m.NUM_FEATURE_LEVELS, m.NUM_QUERIES, m.DIM_FEEDFORWARD, m.DROPOUT) == ("dn", scales, 900, 2048, 0.0)

    sd = model.state_dict()
    assert torch.equal(sd["backbone.res2.0.conv1.norm.running_var"], official["backbone.0.body.layer1.0.bn1.running_var"])
    assert torch.equal(sd["neck.input_proj.0.0.weight"], official["input_proj.0.0.weight"])
    assert torch.equal(sd["neck.extra_proj.0.0.weight"], official[f"input_proj.{scales - 1}.0.weight"])
    assert torch.equal(sd["neck.extra_proj.0.1.bias"], official[f"input_proj.{scales - 1}.1.bias"])
    assert torch.equal(sd["level_embed"], official["transformer.level_embed"])
    assert torch.equal(sd["encoder.layers.3.self_attn.sampling_offsets.weight"], official["transformer.encoder.layers.3.self_attn.sampling_offsets.weight"])
    dec = "transformer.decoder.layers.4"
    assert torch.equal(sd["decoder.layers.4.norm_cross.weight"], official[f"{dec}.norm1.weight"])
    assert torch.equal(sd["decoder.layers.4.norm_self.bias"], official[f"{dec}.norm2.bias"])
    assert torch.equal(sd["decoder.layers.4.ffn.norm.weight"], official[f"{dec}.norm3.weight"])
    assert torch.equal(sd["decoder.layers.4.self_attn.in_proj_weight"], official[f"{dec}.self_attn.in_proj_weight"])
    assert torch.equal(sd["decoder.norm.weight"], official["transformer.decoder.norm.weight"])
    assert torch.equal(sd["decoder.ref_point_head.layers.0.weight"], official["transformer.decoder.ref_point_head.layers.0.weight"])
    assert torch.equal(sd["decoder.ref_point_head.layers.1.bias"], official["transformer.decoder.ref_point_head.layers.1.bias"])
    # One head pair for the six decoder layers, the encoder's own (class-aware, 80 classes).
    heads = model.decoder.heads
    assert all(heads.class_heads[i] is heads.class_heads[0] and heads.box_heads[i] is heads.box_heads[0] for i in range(6))
    assert heads.class_heads[6] is not heads.class_heads[0] and model.query_source.heads is heads
    assert torch.equal(sd["decoder.heads.class_heads.3.weight"], official["class_embed.0.weight"][IDS])
    assert torch.equal(sd["decoder.heads.box_heads.5.layers.2.bias"], official["bbox_embed.0.layers.2.bias"])
    assert torch.equal(sd["query_source.heads.class_heads.6.bias"], official["transformer.enc_out_class_embed.bias"][IDS])
    assert torch.equal(sd["query_source.heads.box_heads.6.layers.0.weight"], official["transformer.enc_out_bbox_embed.layers.0.weight"])
    assert torch.equal(sd["query_source.memory_proj.weight"], official["transformer.enc_output.weight"])
    assert torch.equal(sd["query_source.memory_norm.bias"], official["transformer.enc_output_norm.bias"])
    assert torch.equal(sd["query_source.content.weight"], official["transformer.tgt_embed.weight"])
    assert not any(k.startswith("query_source.position_") for k in sd)  # no pos_trans in DINO
    # The denoising label embedding: 80 classes in detectron2's order, then the unused last row.
    label = sd["main_passes.dn.label_embedding.weight"]
    assert label.shape == (81, 256)
    assert torch.equal(label[:80], official["label_enc.weight"][IDS]) and torch.equal(label[80], official["label_enc.weight"][91])
    assert any("label_enc" in n for n in conversion.notes)


def test_dino_refuses_other_kinds(tmp_path):
    # A Deformable DETR ++ checkpoint and a DAC-DETR release are not DINO checkpoints.
    dd = _save(tmp_path, "dd.pth", seeded_state_dict(deformable_detr_keys("two_stage")))
    _assert_refused(tmp_path, "dino", dd, r"expected an official DINO checkpoint.*found a Deformable DETR \(\+\+ two-stage\).*ref_point_head")
    dac = _save(tmp_path, "dac.pth", seeded_state_dict(dac_detr_keys()))
    _assert_refused(tmp_path, "dino", dac, r"expected an official DINO checkpoint.*found a DAC-DETR")
    # A DINO file given to the other converters is named as what it is.
    dino = _save(tmp_path, "dino.pth", dino_state())
    _assert_refused(tmp_path, "dac_detr", dino, r"expected a DAC-DETR.*found a DINO checkpoint \(4 scales\)")
    _assert_refused(tmp_path, "deformable_detr", dino, "deformable_detr checkpoint")
    # Heads per decoder layer (dec_pred_*_embed_share False) are not the released model.
    per_layer = dino_state()
    per_layer["class_embed.3.bias"] = per_layer["class_embed.3.bias"] + 1
    per_layer["transformer.decoder.class_embed.3.bias"] = per_layer["class_embed.3.bias"].clone()
    _assert_refused(tmp_path, "dino", _save(tmp_path, "per_layer.pth", per_layer), r"different heads per decoder layer \(class_embed.3.bias")
    # An alias that differs from its head.
    alias = dino_state()
    alias["transformer.decoder.bbox_embed.2.layers.0.bias"] = alias["bbox_embed.2.layers.0.bias"] + 1
    _assert_refused(tmp_path, "dino", _save(tmp_path, "alias.pth", alias), "transformer.decoder.bbox_embed.2.layers.0.bias differs")
    # Another size (FFN 1024, 300 queries) does not fit the released config; an unknown key is named.
    small = _save(tmp_path, "small.pth", dino_state(ffn=1024, queries=300))
    _assert_refused(tmp_path, "dino", small, "does not fit configs/coco/dino_r50_4scale_12ep.yaml")
    extra = dino_state()
    extra["transformer.two_stage_wh_embedding.weight"] = torch.zeros(1, 2)
    _assert_refused(tmp_path, "dino", _save(tmp_path, "extra.pth", extra), "does not know: transformer.two_stage_wh_embedding.weight")
    # Neither a 4- nor a 5-scale model.
    three = {k: v for k, v in dino_state().items() if not k.startswith("input_proj.0.")}
    three = {(k.replace(f"input_proj.{i}.", f"input_proj.{i - 1}.", 1) if k.startswith("input_proj.") else k): v
             for k, v in three.items() for i in [int(k.split(".")[1]) if k.startswith("input_proj.") else 0]}
    _assert_refused(tmp_path, "dino", _save(tmp_path, "three.pth", three), "3 feature levels")


def test_describe_kind_names_dino():
    assert describe_kind(dino_state(5)) == "a DINO checkpoint (5 scales)"


def test_the_tool_converts_dino(tmp_path, capsys):
    assert "dino" in CONVERTERS
    source = _save(tmp_path, "checkpoint0011_4scale.pth", dino_state())
    assert convert_and_report("dino", source, str(tmp_path / "out.pth")) == 0
    out = capsys.readouterr().out
    assert "dino_r50_4scale_12ep.yaml" in out and "label_enc" in out
