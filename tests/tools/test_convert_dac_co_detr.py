"""The dac_detr and co_detr converters: every official key name and shape (official_keys_dac_co_detr.py,
written from the official model definitions), converted, loads strictly into the model of the shipped
config; a handful of tensors checked in place; a checkpoint of the other kind refused, naming what was
expected and what was found. No download, no official code."""
import argparse

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import META_ARCH_REGISTRY, build_model

from hybrid_detr.config import load_config
from hybrid_detr.converters import CONVERTERS, ConversionError, convert_file
from hybrid_detr.converters.common import COCO_THING_IDS
from hybrid_detr.model_zoo import get_config_file
from model_helpers import load_tool
from official_keys import deformable_detr_keys, seeded_state_dict
from official_keys_dac_co_detr import dac_detr_keys

IDS = torch.as_tensor(COCO_THING_IDS)


def _save(tmp_path, name, state, wrap="model"):
    path = str(tmp_path / name)
    if wrap == "model":  # as the release's main.py saves it
        torch.save({"model": state, "epoch": 11, "args": argparse.Namespace(two_stage=True)}, path)
    else:  # as mmcv saves it
        torch.save({"state_dict": state, "meta": {"epoch": 12}}, path)
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


# ---------------------------------------------------------------------------------------------- DAC-DETR


def test_dac_detr_release_converts_and_loads_strictly(tmp_path):
    official = seeded_state_dict(dac_detr_keys(), seed=1)
    output = str(tmp_path / "dac.pth")
    conversion = convert_file("dac_detr", _save(tmp_path, "checkpoint0011.pth", official), output)
    assert conversion.config_name == "coco/dac_deformable_detr_pp_r50_12ep_release.yaml"
    assert any("label_enc" in n and "without CDN" in n for n in conversion.notes)
    cfg, model = _load_converted(output, conversion.config_name)
    m = cfg.MODEL.HYBRID_DETR
    assert (m.DECODER_MODE, m.NUM_QUERIES, m.DIM_FEEDFORWARD, m.DROPOUT) == ("dac", 900, 2048, 0.0)
    assert m.TWO_STAGE and m.WITH_BOX_REFINE and m.MIXED_SELECTION and m.LOOK_FORWARD_TWICE

    sd = model.state_dict()
    assert torch.equal(sd["query_source.content.weight"], official["query_embed.weight"])
    assert torch.equal(sd["backbone.res4.5.conv3.norm.running_mean"], official["backbone.0.body.layer3.5.bn3.running_mean"])
    assert torch.equal(sd["neck.extra_proj.0.0.weight"], official["input_proj.3.0.weight"])
    assert torch.equal(sd["encoder.layers.5.ffn.linear1.weight"], official["transformer.encoder.layers.5.linear1.weight"])
    dec = "transformer.decoder.layers.2"
    assert torch.equal(sd["decoder.layers.2.ffn.linear2.weight"], official[f"{dec}.linear2.weight"])
    assert torch.equal(sd["decoder.layers.2.cross_attn.attn.value_proj.bias"], official[f"{dec}.cross_attn.value_proj.bias"])
    assert torch.equal(sd["decoder.layers.2.self_attn.out_proj.weight"], official[f"{dec}.self_attn.out_proj.weight"])
    assert torch.equal(sd["decoder.heads.class_heads.4.bias"], official["class_embed.4.bias"][IDS])
    assert torch.equal(sd["decoder.heads.box_heads.3.layers.1.weight"], official["bbox_embed.3.layers.1.weight"])
    enc = sd["query_source.heads.class_heads.6.weight"]  # the encoder head keeps its objectness slot 0
    assert torch.equal(enc[0], official["class_embed.6.weight"][0]) and torch.equal(enc[1:], official["class_embed.6.weight"][IDS[1:]])
    assert torch.equal(sd["query_source.position_norm.weight"], official["transformer.pos_trans_norm.weight"])
    assert not any("label_enc" in k or "dn" in k.split(".") for k in sd)
    # The C-decoder adds no parameter: the DAC model has the keys of its deformable baseline.
    cfg.defrost()
    cfg.MODEL.HYBRID_DETR.DECODER_MODE = "deformable"
    with torch.device("meta"):
        baseline = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    assert set(baseline.state_dict()) == set(sd)


def test_dac_detr_refuses_other_kinds(tmp_path):
    # A Deformable DETR ++ checkpoint (no mixed selection, no CDN) is not a DAC release.
    plain = seeded_state_dict(deformable_detr_keys("two_stage"))
    _assert_refused(tmp_path, "dac_detr", _save(tmp_path, "dd.pth", plain), r"expected a DAC-DETR.*found a Deformable DETR \(\+\+ two-stage\).*label_enc.weight")
    # A Co-DETR (mmdet) checkpoint.
    co = {"query_head.transformer.encoder.layers.0.attentions.0.value_proj.weight": torch.zeros(2, 2), "rpn_head.rpn_conv.weight": torch.zeros(1)}
    _assert_refused(tmp_path, "dac_detr", _save(tmp_path, "co.pth", co, wrap="mmdet"), r"expected a DAC-DETR.*found an mmdet Co-DETR checkpoint")
    # A DAC release of another size (FFN 1024, 300 queries) does not fit the release's config.
    small = seeded_state_dict(dac_detr_keys(ffn=1024, queries=300))
    _assert_refused(tmp_path, "dac_detr", _save(tmp_path, "small.pth", small), "does not fit.*")
    # A DAC file given to the Deformable DETR converter: its extra keys are named.
    dac = _save(tmp_path, "dac.pth", seeded_state_dict(dac_detr_keys()))
    _assert_refused(tmp_path, "deformable_detr", dac, "does not know: label_enc.weight, query_embed.weight")


def test_the_tool_converts_dac_detr(tmp_path, capsys):
    tool = load_tool("convert_official")
    assert "dac_detr" in CONVERTERS
    source = _save(tmp_path, "checkpoint0011.pth", seeded_state_dict(dac_detr_keys()))
    assert tool.main(["dac_detr", source, str(tmp_path / "out.pth")]) == 0
    out = capsys.readouterr().out
    assert "dac_deformable_detr_pp_r50_12ep_release.yaml" in out and "without CDN" in out
