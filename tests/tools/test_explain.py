"""The explain views (tools/explain.py, `hybrid_detr.analysis.explain` and each mode's own view) are
drawn from what the model really computed (hooks that change nothing), for every mode."""
import os

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image
from torchvision.ops import box_convert, box_iou

from hybrid_detr.analysis import explain as views
from hybrid_detr.analysis.inputs import InputError
from hybrid_detr.data import register_synthetic_dataset
from hybrid_detr.layers import ms_deform_attn
from hybrid_detr.modeling.co_detr.explain import plot_co_detr
from hybrid_detr.modeling.dac.explain import plot_dac
from hybrid_detr.modeling.explain_support import top_detections
from hybrid_detr.modeling.smca.explain import CrossAttentionInputs, plot_smca, smca_maps
from model_helpers import synthetic_input, tiny_cfg


def tiny_model(mode="deformable", **overrides):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(DECODER_MODE=mode, **overrides)).eval()
    # Untrained box heads end in zeros (boxes = references): give them some weight so that
    # layers and branches differ, as after training.
    with torch.no_grad():
        for head in model.decoder.heads.box_heads:
            head.layers[-1].weight.normal_(std=0.05)
    return model


def one_image(seed=1):
    x = synthetic_input(96, 128, 3, seed=seed)
    return {"image": x["image"], "height": 96, "width": 128, "instances": x["instances"],
            "original": x["image"].permute(1, 2, 0).byte().numpy()}


def assert_png(path, min_side=300):
    image = Image.open(path)
    assert image.format == "PNG" and min(image.size) >= min_side


def test_captures_change_nothing_and_locations_are_the_ops_inputs(tmp_path):
    model, x = tiny_model(), one_image()
    inputs = [{"image": x["image"], "height": 96, "width": 128}]
    with torch.no_grad():
        plain = model(inputs)[0]["instances"]
    captured = views.run_and_capture(model, x)
    assert torch.equal(captured.instances.scores, plain.scores)
    assert torch.equal(captured.instances.pred_boxes.tensor, plain.pred_boxes.tensor)

    names = captured.attn_names
    assert len(names["encoder"]) == 1 and len(names["decoder"]) == 2
    for name in names["encoder"] + names["decoder"]:
        call = captured.deformable.calls[name][0]
        module = model.get_submodule(name)
        # a direct call of the module's steps on the captured forward inputs gives the op's inputs
        locations, logits = module.sampling_locations_and_logits(
            call["query"], call["reference_points"], call["spatial_shapes"])
        assert torch.equal(call["locations"], locations)
        assert torch.equal(call["weights"], module.attention_weights_from_logits(logits))
        # and the op on those inputs gives what the model got
        out = ms_deform_attn(call["value"], call["spatial_shapes"], call["level_start_index"],
                             call["locations"], call["weights"])
        assert torch.equal(out, call["output"])

    # what the decoder view plots is exactly those locations, mapped to the image's pixels
    image = views.display_image(x["image"])
    result = views.plot_decoder_sampling(captured, image, str(tmp_path / "dec.png"), layer=1, head=None, top_k=2)
    assert_png(result["path"])
    call = captured.deformable.calls[names["decoder"][1]][0]
    ratios = captured.inference.memory.valid_ratios[0]
    expected = call["locations"][0, result["queries"]]
    back = result["pixels"] / torch.tensor([128.0, 96.0]) * ratios[:, None, :]
    assert torch.allclose(back, expected, atol=1e-6)
    assert torch.equal(result["weights"], call["weights"][0, result["queries"]])
    # top queries: the best class scores of the last layer
    scores = captured.inference.output.logits[-1, 0].sigmoid().max(-1).values
    assert result["queries"].tolist() == scores.argsort(descending=True)[:2].tolist()

    one_head = views.plot_decoder_sampling(captured, image, str(tmp_path / "h.png"), layer=0, head=2, top_k=1)
    assert torch.equal(one_head["weights"], captured.deformable.calls[names["decoder"][0]][0]["weights"][
        0, one_head["queries"], 2:3])

    enc = views.plot_encoder_sampling(captured, image, str(tmp_path / "enc.png"), (70.0, 30.0))
    assert_png(enc["path"], 200)
    memory = captured.inference.memory
    h0, w0 = memory.layout.shapes[0]
    row, col = divmod(enc["token"], w0)
    # the token under the pixel: its cell holds (70, 30) in valid-image coordinates
    assert col == int(70 / 128 * float(memory.valid_ratios[0, 0, 0]) * w0)
    assert row == int(30 / 96 * float(memory.valid_ratios[0, 0, 1]) * h0)
    enc_call = captured.deformable.calls[names["encoder"][0]][0]
    assert torch.equal(enc["weights"], enc_call["weights"][0, enc["token"]])


def test_pixel_is_in_the_original_images_frame(tmp_path):
    """`explain(pixel=...)` / tools/explain.py --pixel: (x, y) of the original image (before the test-time
    resize); the encoder view is drawn on it and reports its points in it."""
    model, x = tiny_model(), one_image()
    x["original"] = np.repeat(np.repeat(x["original"], 2, axis=0), 2, axis=1)  # the input is a 1/2 resize of it
    captured = views.run_and_capture(model, x)
    on_input = views.plot_encoder_sampling(captured, views.display_image(x["image"]), str(tmp_path / "in.png"),
                                           (70.0, 30.0))
    result = views.explain(model, x, str(tmp_path / "out"), pixel=(140.0, 60.0), views=["encoder_sampling"])
    enc = result["encoder_sampling"]
    assert enc["pixel"] == (140.0, 60.0)
    assert enc["token"] == on_input["token"]  # the same place of the picture
    # a pixel read in the input's frame instead would be another token
    assert views.encoder_token_at(captured.inference.memory, 140.0, 60.0, (96, 128)) != enc["token"]
    torch.testing.assert_close(enc["pixels"], on_input["pixels"] * 2)
    with Image.open(enc["path"]) as drawn:
        assert drawn.format == "PNG"
    # default: the top detection's centre, in the same frame
    default = views.explain(model, x, str(tmp_path / "d"), views=["encoder_sampling"])["encoder_sampling"]
    _, _, _, boxes = top_detections(captured.inference.output, 1)
    torch.testing.assert_close(torch.tensor(default["pixel"]), boxes[0, :2] * torch.tensor([256.0, 192.0]))
    with pytest.raises(InputError, match=r"pixel \(300, 10\) is outside the original image \(256 x 192 pixels"):
        views.explain(model, x, str(tmp_path / "bad"), pixel=(300.0, 10.0), views=["encoder_sampling"])


def test_smca_view_recomputes_the_modules_attention(tmp_path):
    model, x = tiny_model("smca"), one_image()
    captured = views.run_and_capture(model, x)
    attn = model.decoder.layers[-1].cross_attn
    with CrossAttentionInputs(attn) as cap, torch.no_grad():
        model([{"image": x["image"], "height": 96, "width": 128}])
    (query, _, memory, query_reference), _ = cap.args
    maps = smca_maps(attn, query, memory, query_reference)
    assert torch.allclose(maps["output"], cap.output, atol=1e-5)
    level = attn.levels[0]
    assert torch.allclose(maps["attention"][level].sum((-1, -2)), torch.ones(()), atol=1e-5)
    assert maps["prior"][level].max() <= 1.0
    results = plot_smca(model, captured, x, views.display_image(x["image"]), str(tmp_path), top_k=2)
    assert len(results) == 2
    for r in results:
        assert_png(r["path"])


def test_dac_view_compares_o_and_c_decoders(tmp_path):
    model, x = tiny_model("dac"), one_image()
    captured = views.run_and_capture(model, x)
    gt = x["instances"]
    box = torch.tensor([0.5, 0.5, 0.3, 0.3])
    result = plot_dac(model, captured, views.display_image(x["image"]), str(tmp_path / "dac.png"),
                      box, int(gt.gt_classes[0]))
    assert_png(result["path"])
    assert torch.equal(result["O"]["boxes"], captured.inference.output.boxes[-1, 0])
    # the C pass is the DAC branch's: its C queries through the decoder without self-attention
    branch = model.branches["dac"]
    with torch.no_grad():
        c_queries = branch.c_queries(captured.inference.group, captured.inference.output)
        c_out = model.decoder(c_queries, captured.inference.memory, skip_self_attn=True)
    assert torch.equal(result["C"]["boxes"], c_out.boxes[-1, 0])
    assert not torch.equal(result["C"]["boxes"], result["O"]["boxes"])
    # the scores are the matcher's: iou_weight * IoU + cls_weight * p(class of the object)
    logits = c_out.logits[-1, 0]
    iou = box_iou(box_convert(c_out.boxes[-1, 0], "cxcywh", "xyxy"), box_convert(box[None], "cxcywh", "xyxy"))[:, 0]
    expected = branch.matcher.iou_weight * iou + branch.matcher.cls_weight * logits[:, int(gt.gt_classes[0])].sigmoid()
    assert torch.allclose(result["C"]["score"], expected, atol=1e-6)
    # the bars count the queries at or above each threshold, from scores computed here independently
    o_logits, o_boxes = captured.inference.output.layer(-1)
    o_iou = box_iou(box_convert(o_boxes[0], "cxcywh", "xyxy"), box_convert(box[None], "cxcywh", "xyxy"))[:, 0]
    o_score = branch.matcher.iou_weight * o_iou + branch.matcher.cls_weight * o_logits[0, :, int(gt.gt_classes[0])].sigmoid()
    assert torch.allclose(result["O"]["score"], o_score, atol=1e-6)
    for key, score in (("O", o_score), ("C", expected)):
        assert result[key]["counts"] == [int((score >= t).sum()) for t in result["thresholds"]]
    # a box the queries overlap gives some counts that are neither 0 nor every query
    assert any(0 < c < len(expected) for c in result["O"]["counts"] + result["C"]["counts"])


def test_co_detr_view_draws_each_heads_positives(tmp_path):
    model, x = tiny_model("co_detr"), one_image()
    model.branches["co_detr"].eval()
    captured = views.run_and_capture(model, x)
    result = plot_co_detr(model, captured, views.display_image(x["image"]), x["instances"], str(tmp_path / "co.png"))
    assert_png(result["path"])
    assert set(result["positives"]) == set(model.branches["co_detr"].head_names)
    atss = result["positives"]["atss"]
    assert len(atss.gt_index) > 0 and int(atss.gt_index.max()) < len(x["instances"])
    assert not model.branches["co_detr"].training and not model.training


@pytest.mark.parametrize("mode", ["deformable+dac", "co_detr"])
def test_explain_on_a_dataset_image(mode, tmp_path):
    name = "toolbox_explain_val"
    register_synthetic_dataset(name, "val", root=str(tmp_path / "data"), num_images=2, min_side=96, max_side=128)
    cfg = tiny_cfg(DECODER_MODE=mode, NUM_CLASSES=6)  # the synthetic set's classes
    cfg.DATASETS.TEST = (name,)
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 128
    results = views.explain_image(cfg, str(tmp_path / "out"), dataset=name, index=1, top_k=2, pixel=(40, 50))
    # the generic views, then the view each mode of DECODER_MODE registered ("deformable" has none)
    expected = ["decoder_sampling", "encoder_sampling"] + (["dac"] if "dac" in mode else ["co_detr"])
    assert list(results) == expected and all(r is not None for r in results.values())
    for path in views.paths(results):
        assert os.path.isfile(path)
        assert_png(path, 200)


def test_views_come_from_the_modes_and_say_when_they_do_not_apply(tmp_path):
    assert {"decoder_sampling", "encoder_sampling", "smca", "dac", "co_detr"} <= set(views.view_names())
    # deformable SMCA: the generic deformable views show its decoder, SMCA's dense-attention view does not apply
    cfg = tiny_cfg(DECODER_MODE="smca")
    cfg.MODEL.HYBRID_DETR.SMCA.DEFORMABLE = True
    torch.manual_seed(0)
    model, x = build_model(cfg).eval(), one_image()
    results = views.explain(model, x, str(tmp_path / "smca"), top_k=1)
    assert list(results) == ["decoder_sampling", "encoder_sampling", "smca"] and results["smca"] is None
    # Co-DETR's view needs ground truth
    model = tiny_model("co_detr")
    no_gt = {k: v for k, v in x.items() if k != "instances"}
    results = views.explain(model, no_gt, str(tmp_path / "co"), views=["co_detr"])
    assert results == {"co_detr": None} and views.paths(results) == []
    assert not os.listdir(tmp_path / "co")
