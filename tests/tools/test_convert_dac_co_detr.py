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
from hybrid_detr.analysis.official_comparison import pinned_ranking
from hybrid_detr.converters.report import convert_and_report
from model_helpers import flatten_config
from official_keys import deformable_detr_keys, seeded_state_dict
from official_keys_dac_co_detr import co_deformable_detr_keys, dac_detr_keys

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
    assert conversion.config_name == "coco/dac_dino_r50_12ep_release.yaml"
    assert any("label_enc" in n and "dn mode's label embedding" in n for n in conversion.notes)
    cfg, model = _load_converted(output, conversion.config_name)
    m = cfg.MODEL.HYBRID_DETR
    assert (m.DECODER_MODE, m.NUM_QUERIES, m.DIM_FEEDFORWARD, m.DROPOUT) == ("dn+dac", 900, 2048, 0.0)
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
    # CDN's label book: COCO-id rows -> the 80 classes, then its last (unused) row.
    label_enc = official["label_enc.weight"]
    assert torch.equal(sd["main_passes.dn.label_embedding.weight"][:80], label_enc[IDS])
    assert torch.equal(sd["main_passes.dn.label_embedding.weight"][80], label_enc[91])
    # The C-decoder adds no parameter: the DAC model has the keys of its dn baseline.
    cfg.defrost()
    cfg.MODEL.HYBRID_DETR.DECODER_MODE = "dn"
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
    assert "dac_detr" in CONVERTERS
    source = _save(tmp_path, "checkpoint0011.pth", seeded_state_dict(dac_detr_keys()))
    assert convert_and_report("dac_detr", source, str(tmp_path / "out.pth")) == 0
    out = capsys.readouterr().out
    assert "dac_dino_r50_12ep_release.yaml" in out and "dn mode's label embedding" in out


# ---------------------------------------------------------------------------------------------- Co-DETR


def _co_state(seed=2, **kwargs):
    state = seeded_state_dict(co_deformable_detr_keys(**kwargs), seed=seed)
    for key in [k for k in state if k.endswith("num_batches_tracked")]:
        state[key] = torch.tensor(7, dtype=torch.long)
    return state


def test_co_detr_query_head_converts_and_loads_strictly(tmp_path):
    official = _co_state()
    output = str(tmp_path / "co.pth")
    conversion = convert_file("co_detr", _save(tmp_path, "co_deformable_detr_r50_1x_coco.pth", official, wrap="mmdet"), output)
    assert conversion.config_name == "coco/co_deformable_detr_r50_12ep_query_head.yaml"
    dropped = next(n for n in conversion.notes if n.startswith("dropped"))
    for group in ("rpn_head", "roi_head", "bbox_head", "query_head.downsample", "query_head.transformer.aux_pos_trans"):
        assert group in dropped
    cfg, model = _load_converted(output, conversion.config_name)
    m = cfg.MODEL.HYBRID_DETR
    assert (m.NUM_QUERIES, m.DIM_FEEDFORWARD, m.DROPOUT, m.NUM_CLASSES) == (300, 2048, 0.0, 80)
    assert m.TWO_STAGE and m.WITH_BOX_REFINE and m.MIXED_SELECTION and m.LOOK_FORWARD_TWICE

    sd = model.state_dict()
    assert torch.equal(sd["backbone.stem.conv1.norm.running_var"], official["backbone.bn1.running_var"])
    assert torch.equal(sd["backbone.res5.0.shortcut.norm.weight"], official["backbone.layer4.0.downsample.1.weight"])
    assert torch.equal(sd["neck.input_proj.1.0.weight"], official["neck.convs.1.conv.weight"])
    assert torch.equal(sd["neck.input_proj.1.0.bias"], torch.zeros(256))  # ChannelMapper convs have no bias
    assert torch.equal(sd["neck.input_proj.2.1.bias"], official["neck.convs.2.gn.bias"])
    assert torch.equal(sd["neck.extra_proj.0.0.weight"], official["neck.extra_convs.0.conv.weight"])
    t = "query_head.transformer"
    assert torch.equal(sd["level_embed"], official[f"{t}.level_embeds"])
    assert torch.equal(sd["encoder.layers.4.self_attn.sampling_offsets.weight"], official[f"{t}.encoder.layers.4.attentions.0.sampling_offsets.weight"])
    assert torch.equal(sd["encoder.layers.4.norm.bias"], official[f"{t}.encoder.layers.4.norms.0.bias"])
    assert torch.equal(sd["encoder.layers.4.ffn.linear1.weight"], official[f"{t}.encoder.layers.4.ffns.0.layers.0.0.weight"])
    assert torch.equal(sd["encoder.layers.4.ffn.norm.weight"], official[f"{t}.encoder.layers.4.norms.1.weight"])
    dec = f"{t}.decoder.layers.3"
    assert torch.equal(sd["decoder.layers.3.self_attn.in_proj_weight"], official[f"{dec}.attentions.0.attn.in_proj_weight"])
    assert torch.equal(sd["decoder.layers.3.norm_self.weight"], official[f"{dec}.norms.0.weight"])
    assert torch.equal(sd["decoder.layers.3.cross_attn.attn.attention_weights.bias"], official[f"{dec}.attentions.1.attention_weights.bias"])
    assert torch.equal(sd["decoder.layers.3.norm_cross.bias"], official[f"{dec}.norms.1.bias"])
    assert torch.equal(sd["decoder.layers.3.ffn.linear2.weight"], official[f"{dec}.ffns.0.layers.1.weight"])
    assert torch.equal(sd["decoder.layers.3.ffn.norm.weight"], official[f"{dec}.norms.2.weight"])
    assert torch.equal(sd["query_source.memory_proj.weight"], official[f"{t}.enc_output.weight"])
    assert torch.equal(sd["query_source.position_proj.bias"], official[f"{t}.pos_trans.bias"])
    assert torch.equal(sd["query_source.content.weight"], official["query_head.query_embedding.weight"])
    for i in (0, 5, 6):  # 80 classes as they are; reg_branches' Linear layers 0, 2, 4 -> MLP layers 0, 1, 2
        assert torch.equal(sd[f"decoder.heads.class_heads.{i}.weight"], official[f"query_head.cls_branches.{i}.weight"])
        assert torch.equal(sd[f"decoder.heads.box_heads.{i}.layers.2.bias"], official[f"query_head.reg_branches.{i}.4.bias"])
        assert torch.equal(sd[f"decoder.heads.box_heads.{i}.layers.1.weight"], official[f"query_head.reg_branches.{i}.2.weight"])
    assert torch.equal(sd["query_source.heads.class_heads.6.bias"], official["query_head.cls_branches.6.bias"])


def test_co_detr_query_head_has_the_official_sizes():
    """The converted model's query head, built from the shipped config, has the official architecture's
    module sizes (co_deformable_detr_r50_1x_coco.py): 6 + 6 layers, FFN 2048, 8 heads x 4 levels x 4 points,
    300 queries, 80 classes, per-layer heads + the encoder's, and no dropout."""
    cfg = load_config(get_config_file("coco/co_deformable_detr_r50_12ep_query_head.yaml"), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    with torch.device("meta"):
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    assert len(model.encoder.layers) == 6 and len(model.decoder.layers) == 6
    layer = model.decoder.layers[0]
    assert (layer.ffn.linear1.in_features, layer.ffn.linear1.out_features) == (256, 2048)
    attn = layer.cross_attn.attn
    assert (attn.n_heads, attn.n_levels, attn.n_points) == (8, 4, 4)
    assert layer.self_attn.num_heads == 8 and layer.self_attn.dropout == 0.0
    assert model.query_source.num_queries == 300 and model.query_source.mixed_selection
    assert tuple(model.query_source.content.weight.shape) == (300, 256)
    assert len(model.decoder.heads.class_heads) == 7 and model.decoder.heads.class_heads[0].out_features == 80
    assert model.decoder.heads.class_heads[0] is not model.decoder.heads.class_heads[1]  # box refinement: one per layer
    assert model.decoder.refine_boxes and model.decoder.look_forward_twice
    assert tuple(model.level_embed.shape) == (4, 256)
    assert all(not isinstance(mod, torch.nn.Dropout) or mod.p == 0.0 for mod in model.modules())
    # The official key list, converted, has exactly this model's keys and shapes (aux heads dropped).
    converted = CONVERTERS["co_detr"](_co_state())
    assert {k: tuple(v.shape) for k, v in converted.state_dict.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_co_detr_refuses_other_kinds(tmp_path):
    # A DAC-DETR release given as co_detr.
    dac = _save(tmp_path, "dac.pth", seeded_state_dict(dac_detr_keys()))
    _assert_refused(tmp_path, "co_detr", dac, r"expected an mmdet Co-Deformable-DETR.*found a DAC-DETR .*checkpoint.*missing")
    # A Co-DETR checkpoint given as dac_detr (with its aux heads) or as deformable_detr.
    co = _save(tmp_path, "co.pth", _co_state(), wrap="mmdet")
    _assert_refused(tmp_path, "dac_detr", co, r"expected a DAC-DETR.*found an mmdet Co-DETR checkpoint \(query_head.\*, bbox_head.\*, roi_head.\*, rpn_head.\*\)")
    _assert_refused(tmp_path, "deformable_detr", co, "missing.*is this a deformable_detr checkpoint")
    # A Co-DETR variant with more (a mask head) or another size.
    extra = _co_state()
    extra["roi_head.0.mask_head.conv_logits.weight"] = torch.zeros(80, 256, 1, 1)
    _assert_refused(tmp_path, "co_detr", _save(tmp_path, "mask.pth", extra, wrap="mmdet"), "does not know: roi_head.0.mask_head")
    wide = _save(tmp_path, "wide.pth", _co_state(queries=900), wrap="mmdet")
    _assert_refused(tmp_path, "co_detr", wide, "does not fit.*query_source.content.weight")


def test_the_tool_converts_co_detr(tmp_path, capsys):
    source = _save(tmp_path, "co.pth", _co_state(), wrap="mmdet")
    assert convert_and_report("co_detr", source, str(tmp_path / "out.pth")) == 0
    out = capsys.readouterr().out
    assert "co_deformable_detr_r50_12ep_query_head.yaml" in out and "rpn_head" in out


def test_compare_official_pins_the_top_k_order_without_changing_anything_else():
    """tools/compare_official.py (hybrid_detr.analysis.official_comparison) ranks our two-stage proposals by given scores (the official
    model's) for its mixed-selection comparisons: given our own scores, the outputs are unchanged;
    given other scores, the selected proposals follow them."""
    cfg = load_config(get_config_file("coco/co_deformable_detr_r50_12ep_query_head.yaml"), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    cfg.MODEL.HYBRID_DETR.NUM_QUERIES = 20
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0)) * 255
    inputs = [{"image": image}]
    with torch.no_grad():
        plain = model.raw_predictions(inputs)
        images, padding_mask = model.preprocess_image(inputs)
        memory = model.encode(images.tensor, padding_mask)
        own = model.query_source(memory)[1][0][..., 0]
        with pinned_ranking(model, own):
            pinned = model.raw_predictions(inputs)
        reversed_scores = -own
        with pinned_ranking(model, reversed_scores):
            queries = model.query_source(memory)[0]
    assert torch.equal(plain["pred_logits"], pinned["pred_logits"]) and torch.equal(plain["pred_boxes"], pinned["pred_boxes"])
    assert "predict" not in vars(model.query_source.heads)  # the hook is removed afterwards
    proposals, _ = model.query_source.token_proposals(memory)
    lowest = own.topk(20, dim=1, largest=False).indices  # the selection follows the given scores
    _, boxes = model.query_source.heads.predict(model.query_source.encoder_head_index, model.query_source.memory_norm(model.query_source.memory_proj(memory.memory)), proposals)
    assert torch.allclose(queries.reference, boxes.gather(1, lowest[..., None].expand(-1, -1, 4)), atol=1e-6)




def _config_difference(config, baseline):
    a, b = (flatten_config(load_config(get_config_file(c))) for c in (config, baseline))
    assert set(a) == set(b)
    return {k: a[k] for k in a if a[k] != b[k] and k != "OUTPUT_DIR"}


def test_the_release_configs_are_their_training_configs_plus_the_release_architecture():
    m = "MODEL.HYBRID_DETR."
    release = {f"{m}MIXED_SELECTION": True, f"{m}LOOK_FORWARD_TWICE": True, f"{m}DROPOUT": 0.0}
    assert _config_difference("coco/dac_dino_r50_12ep_release.yaml", "coco/dac_deformable_detr_r50_12ep.yaml") == {
        **release,
        f"{m}DECODER_MODE": "dn+dac",
        f"{m}TWO_STAGE_MASK_INVALID": False,
        f"{m}NUM_QUERIES": 900,
        f"{m}NMS_THRESH_TEST": 0.8,
        f"{m}DAC.CLS_LOSS": "iou_aware_bce",
        "TEST.DETECTIONS_PER_IMAGE": 300,
        # The release's batch: 2 images per GPU x 8 GPUs, 12 epochs of 7,393 iterations.
        "SOLVER.IMS_PER_BATCH": 16,
        "SOLVER.MAX_ITER": 88716,
        "SOLVER.STEPS": (81323,),
        "SOLVER.CHECKPOINT_PERIOD": 7393,
    }
    # The Co-DETR query head is the co_detr training config (the release's architecture: FFN 2048, dropout 0,
    # "++", mixed selection, look-forward-twice) in deformable mode: no aux heads.
    difference = _config_difference("coco/co_deformable_detr_r50_12ep_query_head.yaml", "coco/co_deformable_detr_r50_12ep.yaml")
    assert {k: v for k, v in difference.items() if not k.startswith(f"{m}CO_DETR.")} == {f"{m}DECODER_MODE": "deformable"}
