"""tools/convert_official.py and hybrid_detr.converters: official checkpoints -> detectron2
checkpoints that load strictly into the shipped configs. Official key names and shapes come from
`official_keys.py` (written from the official model definitions); no download, no official code."""
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from hybrid_detr.config import load_config
from hybrid_detr.converters import CONVERTERS, ConversionError, convert_file
from hybrid_detr.model_zoo import get_config_file
from hybrid_detr.converters.common import COCO_THING_IDS, torchvision_resnet_to_detectron2
from hybrid_detr.converters.report import convert_and_report
from official_keys import deformable_detr_keys, seeded_state_dict


class NotATensor:
    """A custom object inside a checkpoint: unpickling it would need arbitrary code."""


def _official_checkpoint(tmp_path, variant, **extra):
    state = seeded_state_dict(deformable_detr_keys(variant), seed=0)
    state.update(extra)
    path = str(tmp_path / f"official_{variant}.pth")
    # As main.py saves it: model, optimizer, scheduler, epoch and the argparse args.
    import argparse

    torch.save({"model": state, "epoch": 49, "args": argparse.Namespace(two_stage=variant == "two_stage")}, path)
    return path, state


def test_coco_ids_and_backbone_names():
    assert len(COCO_THING_IDS) == 80 and COCO_THING_IDS[:3] == [1, 2, 3] and COCO_THING_IDS[-1] == 90
    assert 12 not in COCO_THING_IDS and 83 not in COCO_THING_IDS
    assert torchvision_resnet_to_detectron2("bn1.running_var") == "stem.conv1.norm.running_var"
    assert torchvision_resnet_to_detectron2("layer3.5.bn2.weight") == "res4.5.conv2.norm.weight"
    assert torchvision_resnet_to_detectron2("layer1.0.downsample.1.bias") == "res2.0.shortcut.norm.bias"
    with pytest.raises(ConversionError):
        torchvision_resnet_to_detectron2("fc.weight")


@pytest.mark.parametrize("variant", ["plain", "refine", "two_stage"])
def test_deformable_detr_converts_and_loads_strictly(tmp_path, variant):
    source, official = _official_checkpoint(tmp_path, variant)
    output = str(tmp_path / "converted.pth")
    conversion = convert_file("deformable_detr", source, output)
    assert conversion.config_name.endswith(
        {"plain": "r50_50ep.yaml", "refine": "box_refine_50ep.yaml", "two_stage": "two_stage_50ep.yaml"}[variant]
    )
    cfg = load_config(get_config_file(conversion.config_name), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    model = build_model(cfg)
    # As train_net.py --eval-only MODEL.WEIGHTS does: detectron2's checkpointer, no key left over.
    data = torch.load(output, map_location="cpu", weights_only=True)
    assert data["matching_heuristics"] is False and "__author__" in data
    incompatible = DetectionCheckpointer(model)._load_model({**data, "model": dict(data["model"])})
    assert not incompatible.missing_keys and not incompatible.unexpected_keys and not incompatible.incorrect_shapes
    model.load_state_dict(data["model"], strict=True)

    sd = model.state_dict()
    ids = torch.as_tensor(COCO_THING_IDS)
    assert torch.equal(sd["backbone.stem.conv1.weight"], official["backbone.0.body.conv1.weight"])
    assert torch.equal(sd["backbone.res3.0.conv2.norm.running_var"], official["backbone.0.body.layer2.0.bn2.running_var"])
    assert torch.equal(sd["backbone.res5.0.shortcut.weight"], official["backbone.0.body.layer4.0.downsample.0.weight"])
    assert torch.equal(sd["neck.input_proj.2.0.weight"], official["input_proj.2.0.weight"])
    assert torch.equal(sd["neck.extra_proj.0.1.bias"], official["input_proj.3.1.bias"])
    assert torch.equal(sd["level_embed"], official["transformer.level_embed"])
    assert torch.equal(sd["encoder.layers.3.ffn.norm.weight"], official["transformer.encoder.layers.3.norm2.weight"])
    assert torch.equal(sd["encoder.layers.0.norm.bias"], official["transformer.encoder.layers.0.norm1.bias"])
    dec = "transformer.decoder.layers.5"
    assert torch.equal(sd["decoder.layers.5.cross_attn.attn.sampling_offsets.bias"], official[f"{dec}.cross_attn.sampling_offsets.bias"])
    assert torch.equal(sd["decoder.layers.5.norm_cross.weight"], official[f"{dec}.norm1.weight"])
    assert torch.equal(sd["decoder.layers.5.norm_self.weight"], official[f"{dec}.norm2.weight"])
    assert torch.equal(sd["decoder.layers.5.self_attn.in_proj_weight"], official[f"{dec}.self_attn.in_proj_weight"])
    assert torch.equal(sd["decoder.layers.5.ffn.linear1.weight"], official[f"{dec}.linear1.weight"])
    for i in (0, 5):  # 91 COCO-id slots -> 80 classes
        assert torch.equal(sd[f"decoder.heads.class_heads.{i}.weight"], official[f"class_embed.{i}.weight"][ids])
        assert torch.equal(sd[f"decoder.heads.class_heads.{i}.bias"], official[f"class_embed.{i}.bias"][ids])
        assert torch.equal(sd[f"decoder.heads.box_heads.{i}.layers.2.bias"], official[f"bbox_embed.{i}.layers.2.bias"])
    if variant == "two_stage":
        enc = sd["query_source.heads.class_heads.6.weight"]
        assert torch.equal(enc[0], official["class_embed.6.weight"][0])  # the objectness slot, ranked by
        assert torch.equal(enc[1:], official["class_embed.6.weight"][ids[1:]])
        assert torch.equal(sd["query_source.position_proj.weight"], official["transformer.pos_trans.weight"])
        assert torch.equal(sd["query_source.memory_norm.bias"], official["transformer.enc_output_norm.bias"])
    else:
        assert torch.equal(sd["query_source.embedding.weight"], official["query_embed.weight"])
        assert torch.equal(sd["query_source.reference_points.weight"], official["transformer.reference_points.weight"])
    if variant == "plain":  # one shared head
        assert model.decoder.heads.class_heads[0] is model.decoder.heads.class_heads[5]


def _assert_refused(tmp_path, source, match):
    output = tmp_path / "out.pth"
    with pytest.raises(ConversionError, match=match):
        convert_file("deformable_detr", str(source), str(output))
    assert not output.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".converting")]


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    source = tmp_path / "notes.pth"
    source.write_text("not a checkpoint")
    _assert_refused(tmp_path, source, "not a PyTorch checkpoint")


def test_a_truncated_checkpoint_is_refused(tmp_path):
    source, _ = _official_checkpoint(tmp_path, "plain")
    data = open(source, "rb").read()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    _assert_refused(tmp_path, truncated, "damaged or truncated")
    # The legacy (non-zip) format of torch < 1.6, which the official release may use.
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": {"a": torch.zeros(10000)}}, str(legacy), _use_new_zipfile_serialization=False)
    data = legacy.read_bytes()
    legacy.write_bytes(data[: len(data) // 2])
    _assert_refused(tmp_path, legacy, "damaged or truncated")


def test_a_pickle_that_needs_code_is_refused(tmp_path):
    source = tmp_path / "unsafe.pth"
    state = seeded_state_dict(deformable_detr_keys("plain"))
    torch.save({"model": state, "extra": NotATensor()}, str(source))
    _assert_refused(tmp_path, source, "refusing to load it.*NotATensor")


def test_a_checkpoint_of_another_kind_is_refused(tmp_path):
    # An mmdet-style (Co-DETR) state dict given to the deformable_detr converter.
    source = tmp_path / "co_detr.pth"
    torch.save({"state_dict": {"query_head.transformer.encoder.layers.0.attentions.0.value_proj.weight": torch.zeros(2, 2)}}, str(source))
    _assert_refused(tmp_path, source, "missing.*is this a deformable_detr checkpoint")
    # A Deformable-DETR-like checkpoint with extra modules (e.g. a DAC-DETR release's label encoder).
    source, _ = _official_checkpoint(tmp_path, "two_stage", **{"label_enc.weight": torch.zeros(92, 256)})
    _assert_refused(tmp_path, source, "does not know: label_enc.weight")
    # Per-layer heads without the decoder's refinement aliases: not one of the official variants.
    state = seeded_state_dict(deformable_detr_keys("plain"))
    state["class_embed.3.bias"] = state["class_embed.3.bias"] + 1
    source = tmp_path / "odd_heads.pth"
    torch.save({"model": state}, str(source))
    _assert_refused(tmp_path, source, "different per-layer heads")
    # A model of another size.
    source, _ = _official_checkpoint(tmp_path, "plain", **{"transformer.encoder.layers.0.linear1.weight": torch.zeros(2048, 256)})
    _assert_refused(tmp_path, source, "does not fit.*ffn.linear1.weight")


def test_the_tool_has_a_subcommand_per_converter_and_reports_errors(tmp_path, capsys):
    assert "deformable_detr" in CONVERTERS
    source, _ = _official_checkpoint(tmp_path, "refine")
    output = tmp_path / "model.pth"
    assert convert_and_report("deformable_detr", source, str(output)) == 0
    assert output.exists() and "box_refine_50ep.yaml" in capsys.readouterr().out
    bad = tmp_path / "bad.pth"
    bad.write_text("x")
    assert convert_and_report("deformable_detr", str(bad), str(tmp_path / "other.pth")) == 1
    assert "not a PyTorch checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "other.pth").exists()

