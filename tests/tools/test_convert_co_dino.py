"""The co_dino converter (Co-DETR's Co-DINO R-50, mmdet 2.x): every official key name and shape
(`co_dino_keys`, written from the official model definitions and checked once against the state dict of
the model the official code builds from projects/configs/co_dino/co_dino_5scale_r50_1x_coco.py: 674 keys),
converted, loads strictly into the model of the shipped query-head config; tensors checked in place; the
auxiliary parts dropped with their reason; checkpoints of other kinds refused, naming what was expected and
what was found. No download, no official code."""
from typing import List, Tuple

import torch

from hybrid_detr.converters import CONVERTERS, convert_file
from hybrid_detr.converters.kinds import describe_kind
from hybrid_detr.converters.report import convert_and_report
from official_keys import Shape, seeded_state_dict
from official_keys_dac_co_detr import _linear, _mmcv_ffn, _mmcv_ms_deform_attn, _norm, co_deformable_detr_keys, mmdet_resnet50
from test_convert_dac_co_detr import _assert_refused, _load_converted, _save


def co_dino_keys(d=256, ffn=2048, layers=6, queries=900, classes=80, scales=5, num_co_heads=2) -> List[Tuple[str, Shape]]:
    """co_dino_5scale_r50_1x_coco.py: CoDETR with mmdet's ResNet-50 (out_indices 0-3), ChannelMapper
    (4 inputs, GN, one extra 3x3 stride-2 conv on C5), RPNHead, CoDINOHead (co_dino_head.py: per-layer
    cls / reg branches cloned + the encoder's, label_embedding (80, d), downsample) with CoDinoTransformer
    (transformer.py:562-592: level_embeds, enc_output(_norm), query_embed (900, d), aux_pos_trans Linear(2d, d)
    + LayerNorm(d) per co-head, no pos_trans, no head_pos_embed, with_coord_feat False) and DinoTransformerDecoder
    (:458-467: ref_point_head Sequential(Linear 2d->d, ReLU, Linear d->d), norm), CoStandardRoIHead
    (Shared2FCBBoxHead) and CoATSSHead (6 levels: 6 Scale modules)."""
    keys = mmdet_resnet50("backbone.")
    channels = (256, 512, 1024, 2048)[4 - (scales - 1):]
    for i, c in enumerate(channels):
        keys += [(f"neck.convs.{i}.conv.weight", (d, c, 1, 1))] + _norm(f"neck.convs.{i}.gn", d)
    keys += [("neck.extra_convs.0.conv.weight", (d, 2048, 3, 3))] + _norm("neck.extra_convs.0.gn", d)
    q = "query_head"
    t = f"{q}.transformer"
    keys += [(f"{t}.level_embeds", (scales, d))]
    for i in range(layers):
        p = f"{t}.encoder.layers.{i}"
        keys += _mmcv_ms_deform_attn(f"{p}.attentions.0", levels=scales) + _mmcv_ffn(f"{p}.ffns.0", d, ffn)
        keys += _norm(f"{p}.norms.0", d) + _norm(f"{p}.norms.1", d)
    for i in range(layers):
        p = f"{t}.decoder.layers.{i}"
        keys += [(f"{p}.attentions.0.attn.in_proj_weight", (3 * d, d)), (f"{p}.attentions.0.attn.in_proj_bias", (3 * d,))]
        keys += _linear(f"{p}.attentions.0.attn.out_proj", d, d) + _mmcv_ms_deform_attn(f"{p}.attentions.1", levels=scales)
        keys += _mmcv_ffn(f"{p}.ffns.0", d, ffn) + _norm(f"{p}.norms.0", d) + _norm(f"{p}.norms.1", d) + _norm(f"{p}.norms.2", d)
    keys += _linear(f"{t}.decoder.ref_point_head.0", d, 2 * d) + _linear(f"{t}.decoder.ref_point_head.2", d, d)
    keys += _norm(f"{t}.decoder.norm", d)
    keys += _linear(f"{t}.enc_output", d, d) + _norm(f"{t}.enc_output_norm", d)
    keys += [(f"{t}.query_embed.weight", (queries, d))]
    for i in range(num_co_heads):
        keys += _linear(f"{t}.aux_pos_trans.{i}", d, 2 * d)
    for i in range(num_co_heads):
        keys += _norm(f"{t}.aux_pos_trans_norm.{i}", d)
    keys += [(f"{q}.downsample.0.weight", (d, d, 3, 3)), (f"{q}.downsample.0.bias", (d,))] + _norm(f"{q}.downsample.1", d)
    for i in range(layers + 1):
        keys += _linear(f"{q}.cls_branches.{i}", classes, d)
    for i in range(layers + 1):
        keys += _linear(f"{q}.reg_branches.{i}.0", d, d) + _linear(f"{q}.reg_branches.{i}.2", d, d) + _linear(f"{q}.reg_branches.{i}.4", 4, d)
    keys += [(f"{q}.label_embedding.weight", (classes, d))]
    # The auxiliary heads: the same modules as Co-Deformable-DETR's, ATSS with one Scale per level (6 here).
    aux = [(k, s) for k, s in co_deformable_detr_keys(d=d, ffn=ffn, classes=classes) if k.startswith(("rpn_head.", "roi_head.", "bbox_head."))]
    keys += [(k, s) for k, s in aux if ".scales." not in k] + [(f"bbox_head.0.scales.{i}.scale", ()) for i in range(scales + 1)]
    return keys


def co_dino_state(seed=3, **kwargs):
    state = seeded_state_dict(co_dino_keys(**kwargs), seed=seed)
    for key in [k for k in state if k.endswith("num_batches_tracked")]:
        state[key] = torch.tensor(7, dtype=torch.long)
    return state


def test_the_key_list_has_the_official_count():
    # 674 keys in the state dict of the model the official code builds (mmcv 1.7.0, Co-DETR's mmdet).
    keys = co_dino_keys()
    assert len(keys) == 674 and len({k for k, _ in keys}) == 674


def test_co_dino_query_head_converts_and_loads_strictly(tmp_path):
    official = co_dino_state()
    output = str(tmp_path / "co_dino.pth")
    conversion = convert_file("co_dino", _save(tmp_path, "co_dino_5scale_r50_1x_coco.pth", official, wrap="mmdet"), output)
    assert conversion.config_name == "coco/co_dino_r50_12ep_query_head.yaml"
    dropped = next(n for n in conversion.notes if n.startswith("dropped"))
    for group in ("rpn_head", "roi_head", "bbox_head", "query_head.downsample", "query_head.transformer.aux_pos_trans",
                  "query_head.transformer.aux_pos_trans_norm"):
        assert group in dropped
    cfg, model = _load_converted(output, conversion.config_name)
    m = cfg.MODEL.HYBRID_DETR
    assert (m.DECODER_MODE, m.NUM_FEATURE_LEVELS, m.NUM_QUERIES, m.DIM_FEEDFORWARD, m.DROPOUT, m.NUM_CLASSES) == ("dn", 5, 900, 2048, 0.0, 80)
    assert m.TWO_STAGE and m.WITH_BOX_REFINE and m.MIXED_SELECTION and m.LOOK_FORWARD_TWICE
    assert m.QUERY_POSITION_FROM_REFERENCE and m.DECODER_FINAL_NORM and not m.SHARE_DECODER_HEADS
    assert (m.TWO_STAGE_RANKING, m.TWO_STAGE_ENCODER_LOSS, m.INVERSE_SIGMOID_EPS) == ("max_class", "class_aware_topk", 1e-3)
    assert (m.POSITION_TEMPERATURE, m.POSITION_OFFSET, m.TWO_STAGE_MASK_INVALID) == (20, 0.0, False)

    sd = model.state_dict()
    assert torch.equal(sd["backbone.res2.0.conv1.norm.running_var"], official["backbone.layer1.0.bn1.running_var"])
    for i in range(4):  # C2-C5, convs without bias
        assert torch.equal(sd[f"neck.input_proj.{i}.0.weight"], official[f"neck.convs.{i}.conv.weight"])
        assert torch.equal(sd[f"neck.input_proj.{i}.0.bias"], torch.zeros(256))
    assert torch.equal(sd["neck.extra_proj.0.1.weight"], official["neck.extra_convs.0.gn.weight"])
    t = "query_head.transformer"
    assert torch.equal(sd["level_embed"], official[f"{t}.level_embeds"])
    assert torch.equal(sd["encoder.layers.2.self_attn.attention_weights.weight"], official[f"{t}.encoder.layers.2.attentions.0.attention_weights.weight"])
    dec = f"{t}.decoder.layers.5"
    assert torch.equal(sd["decoder.layers.5.self_attn.out_proj.bias"], official[f"{dec}.attentions.0.attn.out_proj.bias"])
    assert torch.equal(sd["decoder.layers.5.cross_attn.attn.sampling_offsets.weight"], official[f"{dec}.attentions.1.sampling_offsets.weight"])
    assert torch.equal(sd["decoder.layers.5.ffn.norm.bias"], official[f"{dec}.norms.2.bias"])
    assert torch.equal(sd["decoder.ref_point_head.layers.0.weight"], official[f"{t}.decoder.ref_point_head.0.weight"])
    assert torch.equal(sd["decoder.ref_point_head.layers.1.bias"], official[f"{t}.decoder.ref_point_head.2.bias"])
    assert torch.equal(sd["decoder.norm.weight"], official[f"{t}.decoder.norm.weight"])
    assert torch.equal(sd["query_source.memory_norm.weight"], official[f"{t}.enc_output_norm.weight"])
    assert torch.equal(sd["query_source.content.weight"], official[f"{t}.query_embed.weight"])
    assert not any(k.startswith("query_source.position_") for k in sd)  # no pos_trans
    # One head per decoder layer (clones), the encoder's as head 6; 80 classes as they are.
    heads = model.decoder.heads
    assert heads.class_heads[0] is not heads.class_heads[1] and model.query_source.heads is heads
    for i in (0, 3, 6):
        assert torch.equal(sd[f"decoder.heads.class_heads.{i}.weight"], official[f"query_head.cls_branches.{i}.weight"])
        assert torch.equal(sd[f"decoder.heads.box_heads.{i}.layers.1.bias"], official[f"query_head.reg_branches.{i}.2.bias"])
    # The denoising label embedding: 80 rows as they are, then a zero row (never looked up).
    label = sd["main_passes.dn.label_embedding.weight"]
    assert label.shape == (81, 256)
    assert torch.equal(label[:80], official["query_head.label_embedding.weight"]) and not label[80].any()


def test_every_official_key_is_used_or_dropped_with_its_reason():
    """Strict: each official tensor is either in the converted state dict (as it is) or dropped as auxiliary
    (named in the notes); the backbone's num_batches_tracked counters and the 80-row label embedding (81 rows
    here) aside."""
    official = co_dino_state()
    conversion = CONVERTERS["co_dino"](official)
    aux = ("rpn_head.", "roi_head.", "bbox_head.", "query_head.downsample.", "query_head.transformer.aux_pos_trans")
    dropped = [k for k in official if k.startswith(aux)]
    assert len(dropped) == 6 + 8 + 18 + 4 + 8  # RPN, RoI box head, ATSS (6 scales), downsample, aux_pos_trans(_norm)
    assert f"dropped {len(dropped)} tensors" in " ".join(conversion.notes)

    def fingerprint(t):
        return tuple(t.shape), float(t.double().sum()), float(t.flatten()[0]) if t.numel() else 0.0

    converted = {fingerprint(v) for v in conversion.state_dict.values()}
    rest = [k for k in official if k not in dropped and not k.endswith("num_batches_tracked") and k != "query_head.label_embedding.weight"]
    assert [k for k in rest if fingerprint(official[k]) not in converted] == []


def test_co_dino_refuses_other_kinds(tmp_path):
    # A Co-Deformable-DETR checkpoint given as co_dino, and a Co-DINO one given as co_detr: named as what they are.
    co = _save(tmp_path, "co.pth", seeded_state_dict(co_deformable_detr_keys()), wrap="mmdet")
    _assert_refused(tmp_path, "co_dino", co, r"expected an mmdet Co-DINO checkpoint.*found an mmdet Co-DETR checkpoint.*query_embed.weight")
    codino = _save(tmp_path, "codino.pth", co_dino_state(), wrap="mmdet")
    _assert_refused(tmp_path, "co_detr", codino, r"expected an mmdet Co-Deformable-DETR.*found an mmdet Co-DINO checkpoint \(query_head.\*, bbox_head.\*, roi_head.\*, rpn_head.\*\)")
    _assert_refused(tmp_path, "dino", codino, r"expected an official DINO checkpoint.*found an mmdet Co-DINO checkpoint")
    # A variant with more (a mask head), another size (4 scales) or a 91-slot label book.
    extra = co_dino_state()
    extra["roi_head.0.mask_head.conv_logits.weight"] = torch.zeros(80, 256, 1, 1)
    _assert_refused(tmp_path, "co_dino", _save(tmp_path, "mask.pth", extra, wrap="mmdet"), "does not know: roi_head.0.mask_head")
    four = _save(tmp_path, "four.pth", co_dino_state(scales=4), wrap="mmdet")
    _assert_refused(tmp_path, "co_dino", four, "does not fit configs/coco/co_dino_r50_12ep_query_head.yaml")
    book = co_dino_state()
    book["query_head.label_embedding.weight"] = torch.zeros(92, 256)
    _assert_refused(tmp_path, "co_dino", _save(tmp_path, "book.pth", book, wrap="mmdet"), r"label_embedding.weight has shape \(92, 256\), expected \(80, 256\)")


def test_describe_kind_names_co_dino():
    assert describe_kind(co_dino_state()).startswith("an mmdet Co-DINO checkpoint")
    assert describe_kind(seeded_state_dict(co_deformable_detr_keys())).startswith("an mmdet Co-DETR checkpoint")


def test_the_tool_converts_co_dino(tmp_path, capsys):
    assert "co_dino" in CONVERTERS
    source = _save(tmp_path, "co_dino.pth", co_dino_state(), wrap="mmdet")
    assert convert_and_report("co_dino", source, str(tmp_path / "out.pth")) == 0
    out = capsys.readouterr().out
    assert "co_dino_r50_12ep_query_head.yaml" in out and "label_embedding" in out and "aux_pos_trans" in out
