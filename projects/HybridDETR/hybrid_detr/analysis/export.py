"""Export of HybridDETR's inference path (backbone to boxes, one image, any size) to ONNX and to
`torch.export`.

`InferenceGraph` wraps a built model: it takes the normalised, padded image (1, 3, H, W) and the
unpadded size (2,) int64 [h, w], and returns the top detections of the one-to-one decoder's last
layer: scores (K,), labels (K,) int64 and boxes (K, 4) xyxy in the input image's pixels, clipped to
it -- what `HybridDETR.inference` computes before `detector_postprocess` rescales to the original
image (and drops empty boxes). With `original_size=True` the graph does that post-process too: a
third input `original_size` (2,) int64 [H, W] (the image before the test-time resize), boxes scaled
to it and clipped as `detector_postprocess` does, and a fourth output `keep` (K,) bool, False for the
boxes `detector_postprocess` drops (empty after clipping): `boxes[keep]` are detectron2's
`model([{"image", "height": H, "width": W}])` boxes. Inference never runs a training branch, so every
decoder mode exports: deformable, dac, co_detr (deformable cross-attention) and smca (dense
attention: MatMul, Softmax).

What stays outside the graph, as in detectron2 (`input_preparation` says it for a config): read the
image in cfg.INPUT.FORMAT's channel order (detectron2's default "BGR"), 0-255 float; resize it as the
test-time augmentation does (`ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)`); then
`preprocess_for_export`: subtract MODEL.PIXEL_MEAN, divide by MODEL.PIXEL_STD (in that channel order),
pad bottom / right with zeros to a multiple of the backbone's size divisibility.

The graph is the model's own inference path: `HybridDETR.features`, `HybridDETR.transformer` and the
top-k of `HybridDETR.inference` (`modeling.postprocess.top_k_detections`), with one difference: the
model's own forward keeps the level shapes as host ints (`LevelLayout.of_maps`), which would freeze
the image size into an exported graph, so `InferenceGraph` passes `transformer` the same layout with
the shapes left symbolic (`LevelLayout.of_maps(maps, symbolic=True)`; tested equal to
`HybridDETR.forward`).

Our op:
- ONNX (`backend="reference"`): every `MSDeformAttn` runs the pure-PyTorch reference
  (`ms_deform_attn_reference`: `grid_sample`, exported as ONNX GridSample, opset >= 16), fed the
  layout's level shapes (`MSDeformAttn.reference_sampling`), so the file runs in onnxruntime with no
  custom library;
- `torch.export` (`backend="op"`): the compiled op stays as the registered custom op
  `torch.ops.hybrid_detr.ms_deform_attn` in the graph.
"""
import contextlib
import os
from typing import Dict, List, Optional

import torch
from torch import nn
from torchvision.ops import box_convert

from ..layers import MSDeformAttn
from ..modeling.postprocess import top_k_detections
from ..modeling.token_layout import LevelLayout
from .inputs import dataset_record, load_input

__all__ = ["InferenceGraph", "preprocess_for_export", "input_preparation", "export_onnx", "export_torch",
           "export_model", "EXPORTERS", "example_images", "example_inputs", "run_exported", "check_exported",
           "ONNX_OUTPUTS", "ONNX_INPUTS"]

# With original_size=True: the third input and the fourth output.
ONNX_INPUTS = ["image", "image_size", "original_size"]
ONNX_OUTPUTS = ["scores", "labels", "boxes", "keep"]


class InferenceGraph(nn.Module):
    """(image (1, 3, H, W) normalised and padded, image_size (2,) int64 [h, w]) ->
    (scores (K,), labels (K,), boxes (K, 4) xyxy in pixels of the unpadded image).

    `original_size=True`: (image, image_size, original_size (2,) int64 [H, W]) -> (scores, labels,
    boxes (K, 4) xyxy in pixels of the original image, keep (K,) bool), `detector_postprocess`'s
    rescaling and clipping done in the graph; `keep` is False where it drops an empty box."""

    def __init__(self, model: nn.Module, backend: str = "op", num_detections: Optional[int] = None,
                 original_size: bool = False):
        super().__init__()
        if backend not in ("op", "reference"):
            raise ValueError(f"backend must be 'op' or 'reference', got {backend!r}")
        if getattr(model, "nms_thresh_test", 0) > 0:
            raise ValueError("export of the NMS post-process (MODEL.HYBRID_DETR.NMS_THRESH_TEST > 0) is not "
                             "supported: set it to 0")
        self.model = model
        self.backend = backend
        self.num_detections = num_detections or model.detections_per_image
        self.original_size = original_size

    def forward(self, image: torch.Tensor, image_size: torch.Tensor, original_size: Optional[torch.Tensor] = None):
        if self.original_size != (original_size is not None):
            raise ValueError("InferenceGraph(original_size=True) takes original_size (2,) int64 [H, W] as its "
                             "third input, and only then")
        m = self.model
        _, _, height, width = image.shape
        ys = torch.arange(height, device=image.device)
        xs = torch.arange(width, device=image.device)
        padding_mask = ((ys[:, None] >= image_size[0]) | (xs[None, :] >= image_size[1]))[None]
        maps, masks, positions = m.features(image, padding_mask)
        layout = LevelLayout.of_maps(maps, symbolic=True)  # the image size stays dynamic
        sampling = (MSDeformAttn.reference_sampling(m, layout.shapes) if self.backend == "reference"
                    else contextlib.nullcontext())
        with sampling:
            _, _, _, one_to_one = m.transformer(maps, masks, positions, layout)
        scores, labels, boxes, _ = top_k_detections(*one_to_one.layer(-1), self.num_detections)
        size = image_size.to(boxes.dtype)
        scale = torch.stack((size[1], size[0], size[1], size[0]))
        xyxy = box_convert(boxes[0], "cxcywh", "xyxy") * scale
        if original_size is None:
            xyxy = torch.minimum(xyxy.clamp(min=0), scale)  # detector_postprocess clips to the image
            return scores[0], labels[0], xyxy
        # detector_postprocess with (height, width) = original_size: scale by output / input size, clip
        # to the output, drop empty boxes (here: flagged by `keep`, the graph's outputs keep K rows).
        out = original_size.to(boxes.dtype)
        out_scale = torch.stack((out[1], out[0], out[1], out[0]))
        xyxy = xyxy * (out_scale / scale)
        xyxy = torch.minimum(xyxy.clamp(min=0), out_scale)
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])  # Boxes.nonempty()
        return scores[0], labels[0], xyxy, keep


def preprocess_for_export(model: nn.Module, image: torch.Tensor):
    """A mapper's image (3, h, w) float, 0-255 in the config's format -> the graph's inputs:
    (normalised, padded (1, 3, H, W), size (2,) int64), as `HybridDETR.preprocess_image` does."""
    images, _ = model.preprocess_image([{"image": image}])
    return images.tensor, torch.tensor(images.image_sizes[0], dtype=torch.int64)


def input_preparation(cfg, model: nn.Module) -> str:
    """What a caller of the exported graph does before it, for this config (the tool prints it)."""
    return (
        f"read the image as {cfg.INPUT.FORMAT} (channel order), float 0-255, (3, H, W); "
        f"resize: shortest edge to {cfg.INPUT.MIN_SIZE_TEST}, longest at most {cfg.INPUT.MAX_SIZE_TEST} "
        "(detectron2's ResizeShortestEdge, bilinear) -> (h, w); "
        f"normalise: (x - {[round(float(v), 3) for v in model.pixel_mean.flatten()]}) / "
        f"{[round(float(v), 3) for v in model.pixel_std.flatten()]} per channel; "
        f"pad bottom/right with 0 to a multiple of {model.backbone.size_divisibility or 1} -> image (1, 3, H', W'); "
        "image_size = [h, w]; with --original-size also original_size = [H, W]"
    )


def _dynamic_shapes(original_size: bool = False):
    # Dim.DYNAMIC: the exporter works out the range the graph holds for (the padded size must
    # exceed the largest stride, so that no level is a single cell).
    shapes = {"image": {2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}, "image_size": None}
    if original_size:
        shapes["original_size"] = None
    return shapes


def _example_inputs(model, example_image: torch.Tensor, original_size: bool):
    inputs = preprocess_for_export(model, example_image)
    if original_size:  # any size traces the same graph: an upscale of the input's
        inputs = (*inputs, inputs[1] * 2)
    return inputs


def export_torch(model: nn.Module, example_image: torch.Tensor, path: Optional[str] = None,
                 original_size: bool = False):
    """`torch.export` of the inference graph with our op as `torch.ops.hybrid_detr.ms_deform_attn`;
    saved to `path` (.pt2) when given. Returns the ExportedProgram."""
    graph = InferenceGraph(model.eval(), backend="op", original_size=original_size).eval()
    inputs = _example_inputs(model, example_image, original_size)
    with torch.no_grad():
        program = torch.export.export(graph, inputs, dynamic_shapes=_dynamic_shapes(original_size))
    if path:
        torch.export.save(program, path)
    return program


def export_onnx(model: nn.Module, example_image: torch.Tensor, path: str, opset: int = 18, optimize: bool = False,
                original_size: bool = False):
    """ONNX export of the inference graph, our op as standard operators (GridSample)."""
    graph = InferenceGraph(model.eval(), backend="reference", original_size=original_size).eval()
    inputs = _example_inputs(model, example_image, original_size)
    with torch.no_grad():
        program = torch.onnx.export(
            graph, inputs, path, dynamo=True, opset_version=opset, input_names=ONNX_INPUTS[:len(inputs)],
            output_names=ONNX_OUTPUTS[:4 if original_size else 3], dynamic_shapes=_dynamic_shapes(original_size),
            external_data=False, optimize=optimize,
        )
    return program


EXPORTERS = {"onnx": export_onnx, "torch_export": export_torch}


def example_inputs(cfg, count: int) -> List[Dict]:
    """The first `count` images of the config's first test set: `load_input`'s dicts (the model's
    input "image", its "height" / "width", the "original" image)."""
    name = cfg.DATASETS.TEST[0]
    return [load_input(cfg, record=dataset_record(name, i)) for i in range(count)]


def example_images(cfg, count: int) -> List[torch.Tensor]:
    """The first `count` images of the config's first test set, as the model sees them."""
    return [x["image"] for x in example_inputs(cfg, count)]


def run_exported(fmt: str, path: str, inputs):
    """The exported file's outputs (scores, labels, boxes[, keep]) as torch tensors, for the graph's inputs."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        outputs = session.run(None, {name: t.numpy() for name, t in zip(ONNX_INPUTS, inputs)})
        return [torch.as_tensor(o) for o in outputs]
    program = torch.export.load(path)
    with torch.no_grad():
        return list(program.module()(*inputs))


def check_exported(model: nn.Module, fmt: str, path: str, images, original_sizes=None) -> Dict:
    """Largest |difference| of scores and boxes (and label agreement) between the exported file and
    the PyTorch model (`InferenceGraph` with the compiled op), over `images` (mapper images); with
    `original_sizes` ((H, W) per image) the file is an `original_size=True` export, and `keep` is
    compared too."""
    graph = InferenceGraph(model, original_size=original_sizes is not None).eval()
    worst = {"scores": 0.0, "boxes": 0.0, "labels_equal": True}
    if original_sizes is not None:
        worst["keep_equal"] = True
    for i, image in enumerate(images):
        inputs = preprocess_for_export(model, image)
        if original_sizes is not None:
            inputs = (*inputs, torch.tensor(original_sizes[i], dtype=torch.int64))
        with torch.no_grad():
            expected = graph(*inputs)
        got = run_exported(fmt, path, inputs)
        worst["scores"] = max(worst["scores"], (got[0] - expected[0]).abs().max().item())
        worst["boxes"] = max(worst["boxes"], (got[2] - expected[2]).abs().max().item())
        worst["labels_equal"] &= bool(torch.equal(got[1].long(), expected[1]))
        if original_sizes is not None:
            worst["keep_equal"] &= bool(torch.equal(got[3].bool(), expected[3]))
    return worst


def export_model(cfg, model: nn.Module, fmt: str, path: str, check: int = 0,
                 original_size: bool = False) -> Optional[Dict]:
    """Exports `model` (built from `cfg`) to `path` in format `fmt` ("onnx" or "torch_export"), traced
    on the first image of the config's test set (`original_size`: see `InferenceGraph`); with `check`
    > 0, compares the file with PyTorch on the first `check` test images (`check_exported`'s result;
    None without)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    EXPORTERS[fmt](model.eval(), example_images(cfg, 1)[0], path, original_size=original_size)
    if not check:
        return None
    inputs = example_inputs(cfg, check)
    sizes = [x["original"].shape[:2] for x in inputs] if original_size else None
    return check_exported(model, fmt, path, [x["image"] for x in inputs], sizes)
