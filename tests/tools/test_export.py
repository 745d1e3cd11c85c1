"""The export of tools/export.py (`hybrid_detr.analysis.export`): the inference model to ONNX (our op
as GridSample, run in onnxruntime) and with torch.export (our op as torch.ops.hybrid_detr.ms_deform_attn),
same detections as PyTorch."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes

from hybrid_detr.analysis.export import InferenceGraph, export_model, preprocess_for_export
from hybrid_detr.analysis.inputs import build_trained_model
from hybrid_detr.data import register_synthetic_dataset
from hybrid_detr.layers import MSDeformAttn, extension_available
from model_helpers import tiny_cfg

TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def val_name(tmp_path_factory):
    """Three synthetic val images of different sizes (the export must take any size)."""
    name = "toolbox_export_val"
    register_synthetic_dataset(name, "val", root=str(tmp_path_factory.mktemp("data")), num_images=3,
                               min_side=64, max_side=112)
    return name


def export_cfg(mode, val_name):
    cfg = tiny_cfg(DECODER_MODE=mode)
    cfg.DATASETS.TEST = (val_name,)
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 64, 112
    # the query sources and box refinement spread over the modes: each exports
    m = cfg.MODEL.HYBRID_DETR
    m.WITH_BOX_REFINE = mode in ("dac", "co_detr")
    m.TWO_STAGE = mode in ("co_detr", "smca")
    cfg.freeze()
    return cfg


def trained_like_model(cfg):
    """The config's model (as tools/export.py builds it), with weights in the box heads' last layers
    (untrained, they are zeros and the boxes would not depend on the image)."""
    model = build_trained_model(cfg)
    with torch.no_grad():
        for head in model.decoder.heads.box_heads:
            head.layers[-1].weight.normal_(std=0.05)
    return model


def model_detections(model, image):
    """HybridDETR.forward's detections, in the input image's pixels."""
    with torch.no_grad():
        out = model([{"image": image, "height": image.shape[1], "width": image.shape[2]}])[0]["instances"]
    return out.scores, out.pred_classes, out.pred_boxes.tensor


def test_inference_graph_equals_model_forward():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(TWO_STAGE=True, WITH_BOX_REFINE=True)).eval()
    with torch.no_grad():
        for head in model.decoder.heads.box_heads:
            head.layers[-1].weight.normal_(std=0.05)
    for h, w in ((96, 128), (70, 90)):
        image = torch.rand(3, h, w) * 255
        inputs = preprocess_for_export(model, image)
        with torch.no_grad():
            scores, labels, boxes = InferenceGraph(model, backend="op")(*inputs)
            reference = InferenceGraph(model, backend="reference")(*inputs)
        nonempty = Boxes(boxes).nonempty()  # detector_postprocess drops empty boxes
        expected = model_detections(model, image)
        assert torch.equal(scores[nonempty], expected[0])
        assert torch.equal(labels[nonempty], expected[1])
        assert torch.allclose(boxes[nonempty], expected[2], atol=1e-4)
        # the pure-PyTorch reference path (what ONNX exports) agrees with the op to float rounding
        assert torch.allclose(reference[0], scores, atol=1e-5) and torch.allclose(reference[2], boxes, atol=1e-3)
    # the reference backend switches the modules for its forward only
    attns = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    assert attns and not any(m.use_reference or m._reference_level_shapes is not None for m in attns)


@pytest.mark.parametrize("mode", ["deformable", "dac", "co_detr", "smca"])
def test_onnx_matches_pytorch(mode, val_name, tmp_path, capsys):
    # tools/bootstrap.sh installs these: a missing one is a failure, not a skip.
    import onnx
    import onnxruntime  # noqa: F401
    import onnxscript  # noqa: F401  (torch.onnx.export(dynamo=True) needs it)
    cfg = export_cfg(mode, val_name)
    path = str(tmp_path / f"{mode}.onnx")
    torch.manual_seed(0)
    result = export_model(cfg, trained_like_model(cfg), "onnx", path, check=3)
    with capsys.disabled():
        print(f"\n[onnx {mode}] max |difference| over 3 val images: {result}")
    assert result["scores"] <= TOLERANCE and result["boxes"] <= TOLERANCE and result["labels_equal"]
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert all(node.domain in ("", "ai.onnx") for node in onnx.load(path).graph.node)
    if mode == "smca":
        assert {"MatMul", "Softmax"} <= ops
    else:
        assert "GridSample" in ops


@pytest.mark.skipif(not extension_available(), reason="needs the compiled op (hybrid_detr._C)")
def test_torch_export_keeps_our_op(val_name, tmp_path):
    cfg = export_cfg("deformable", val_name)
    path = str(tmp_path / "model.pt2")
    result = export_model(cfg, trained_like_model(cfg), "torch_export", path, check=3)
    assert result["scores"] <= TOLERANCE and result["boxes"] <= TOLERANCE and result["labels_equal"]
    program = torch.export.load(path)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "hybrid_detr.ms_deform_attn.default" in targets
    assert not any("grid_sampler" in t for t in targets)


def detectron2_output(model, image, original_size):
    """The model's own detectron2 inference: Instances in the original image's pixels
    (HybridDETR.inference + detector_postprocess with "height" / "width" = the original size)."""
    with torch.no_grad():
        return model([{"image": image, "height": original_size[0], "width": original_size[1]}])[0]["instances"]


def test_original_size_graph_equals_detectron2_postprocess():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(TWO_STAGE=True, WITH_BOX_REFINE=True)).eval()
    with torch.no_grad():
        for head in model.decoder.heads.box_heads:
            head.layers[-1].weight.normal_(std=0.4)  # boxes reaching outside the image: clipped
        # widths whose sigmoid is below a float32 pixel for some queries: empty boxes, detector_postprocess drops them
        for head in model.decoder.heads.box_heads:
            head.layers[-1].weight[2].normal_(std=2000.0)
    graph = InferenceGraph(model, original_size=True).eval()
    dropped = kept = 0
    for (h, w), original in (((96, 128), (480, 640)), ((70, 90), (35, 45)), ((80, 80), (81, 160))):
        image = torch.rand(3, h, w) * 255
        inputs = preprocess_for_export(model, image)
        with torch.no_grad():
            scores, labels, boxes, keep = graph(*inputs, torch.tensor(original))
        expected = detectron2_output(model, image, original)
        assert keep.dtype == torch.bool and int(keep.sum()) == len(expected)
        dropped, kept = dropped + int((~keep).sum()), kept + int(keep.sum())
        assert torch.equal(scores[keep], expected.scores)
        assert torch.equal(labels[keep], expected.pred_classes)
        torch.testing.assert_close(boxes[keep], expected.pred_boxes.tensor, rtol=0, atol=1e-3)
        assert float(boxes[:, 2].max()) <= original[1] and float(boxes[:, 3].max()) <= original[0]
    assert dropped > 0 and kept > 0, f"{dropped} boxes dropped, {kept} kept: keep is untested"
    with pytest.raises(ValueError, match="original_size"):
        graph(*inputs)


def test_onnx_with_original_size_matches_detectron2_inference(val_name, tmp_path):
    """The exported post-process against the model's detectron2 output on test images that the
    test-time resize really resizes."""
    import onnxruntime  # noqa: F401

    from hybrid_detr.analysis.export import example_inputs, run_exported

    cfg = export_cfg("deformable", val_name)
    torch.manual_seed(0)
    model = trained_like_model(cfg)
    path = str(tmp_path / "original.onnx")
    result = export_model(cfg, model, "onnx", path, check=3, original_size=True)
    assert result["keep_equal"] and result["labels_equal"] and result["scores"] <= TOLERANCE
    resized = 0
    for x in example_inputs(cfg, 3):
        original = x["original"].shape[:2]
        resized += tuple(original) != tuple(x["image"].shape[1:])
        inputs = (*preprocess_for_export(model, x["image"]), torch.tensor(original, dtype=torch.int64))
        scores, labels, boxes, keep = run_exported("onnx", path, inputs)
        expected = detectron2_output(model, x["image"], original)
        keep = keep.bool()
        assert int(keep.sum()) == len(expected)
        torch.testing.assert_close(scores[keep], expected.scores, rtol=0, atol=TOLERANCE)
        assert torch.equal(labels[keep].long(), expected.pred_classes)
        torch.testing.assert_close(boxes[keep], expected.pred_boxes.tensor, rtol=0, atol=10 * TOLERANCE)
    assert resized > 0, "no test image was resized: the rescaling is untested"
