"""Export of HybridDETR's inference path (backbone to boxes, one image, any size) to ONNX and to
`torch.export`.

`InferenceGraph` wraps a built model: it takes the normalised, padded image (1, 3, H, W) and the
unpadded size (2,) int64 [h, w], and returns the top detections of the one-to-one decoder's last
layer: scores (K,), labels (K,) int64 and boxes (K, 4) xyxy in the input image's pixels, clipped to
it -- what `HybridDETR.inference` computes before `detector_postprocess` rescales to the original
image (and drops empty boxes). Inference never runs a training branch, so every decoder mode
exports: deformable, dac, co_detr (deformable cross-attention) and smca (dense attention: MatMul,
Softmax).

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

__all__ = ["InferenceGraph", "preprocess_for_export", "export_onnx", "export_torch", "export_model",
           "EXPORTERS", "example_images", "run_exported", "check_exported", "ONNX_OUTPUTS", "ONNX_INPUTS"]

ONNX_INPUTS = ["image", "image_size"]
ONNX_OUTPUTS = ["scores", "labels", "boxes"]


class InferenceGraph(nn.Module):
    """(image (1, 3, H, W) normalised and padded, image_size (2,) int64 [h, w]) ->
    (scores (K,), labels (K,), boxes (K, 4) xyxy in pixels of the unpadded image)."""

    def __init__(self, model: nn.Module, backend: str = "op", num_detections: Optional[int] = None):
        super().__init__()
        if backend not in ("op", "reference"):
            raise ValueError(f"backend must be 'op' or 'reference', got {backend!r}")
        if getattr(model, "nms_thresh_test", 0) > 0:
            raise ValueError("export of the NMS post-process (MODEL.HYBRID_DETR.NMS_THRESH_TEST > 0) is not "
                             "supported: set it to 0")
        self.model = model
        self.backend = backend
        self.num_detections = num_detections or model.detections_per_image

    def forward(self, image: torch.Tensor, image_size: torch.Tensor):
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
        xyxy = torch.minimum(xyxy.clamp(min=0), scale)  # detector_postprocess clips to the image
        return scores[0], labels[0], xyxy


def preprocess_for_export(model: nn.Module, image: torch.Tensor):
    """A mapper's image (3, h, w) float, 0-255 in the config's format -> the graph's inputs:
    (normalised, padded (1, 3, H, W), size (2,) int64), as `HybridDETR.preprocess_image` does."""
    images, _ = model.preprocess_image([{"image": image}])
    return images.tensor, torch.tensor(images.image_sizes[0], dtype=torch.int64)


def _dynamic_shapes():
    # Dim.DYNAMIC: the exporter works out the range the graph holds for (the padded size must
    # exceed the largest stride, so that no level is a single cell).
    return {"image": {2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}, "image_size": None}


def export_torch(model: nn.Module, example_image: torch.Tensor, path: Optional[str] = None):
    """`torch.export` of the inference graph with our op as `torch.ops.hybrid_detr.ms_deform_attn`;
    saved to `path` (.pt2) when given. Returns the ExportedProgram."""
    graph = InferenceGraph(model.eval(), backend="op").eval()
    inputs = preprocess_for_export(model, example_image)
    with torch.no_grad():
        program = torch.export.export(graph, inputs, dynamic_shapes=_dynamic_shapes())
    if path:
        torch.export.save(program, path)
    return program


def export_onnx(model: nn.Module, example_image: torch.Tensor, path: str, opset: int = 18, optimize: bool = False):
    """ONNX export of the inference graph, our op as standard operators (GridSample)."""
    graph = InferenceGraph(model.eval(), backend="reference").eval()
    inputs = preprocess_for_export(model, example_image)
    with torch.no_grad():
        program = torch.onnx.export(
            graph, inputs, path, dynamo=True, opset_version=opset, input_names=ONNX_INPUTS,
            output_names=ONNX_OUTPUTS, dynamic_shapes=_dynamic_shapes(), external_data=False, optimize=optimize,
        )
    return program


EXPORTERS = {"onnx": export_onnx, "torch_export": export_torch}


def example_images(cfg, count: int) -> List[torch.Tensor]:
    """The first `count` images of the config's first test set, as the model sees them."""
    name = cfg.DATASETS.TEST[0]
    return [load_input(cfg, record=dataset_record(name, i))["image"] for i in range(count)]


def run_exported(fmt: str, path: str, inputs):
    """The exported file's outputs (scores, labels, boxes) as torch tensors, for the graph's inputs."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        outputs = session.run(None, {"image": inputs[0].numpy(), "image_size": inputs[1].numpy()})
        return [torch.as_tensor(o) for o in outputs]
    program = torch.export.load(path)
    with torch.no_grad():
        return list(program.module()(*inputs))


def check_exported(model: nn.Module, fmt: str, path: str, images) -> Dict:
    """Largest |difference| of scores and boxes (and label agreement) between the exported file and
    the PyTorch model (`InferenceGraph` with the compiled op), over `images` (mapper images)."""
    graph = InferenceGraph(model).eval()
    worst = {"scores": 0.0, "boxes": 0.0, "labels_equal": True}
    for image in images:
        inputs = preprocess_for_export(model, image)
        with torch.no_grad():
            expected = graph(*inputs)
        got = run_exported(fmt, path, inputs)
        worst["scores"] = max(worst["scores"], (got[0] - expected[0]).abs().max().item())
        worst["boxes"] = max(worst["boxes"], (got[2] - expected[2]).abs().max().item())
        worst["labels_equal"] &= bool(torch.equal(got[1].long(), expected[1]))
    return worst


def export_model(cfg, model: nn.Module, fmt: str, path: str, check: int = 0) -> Optional[Dict]:
    """Exports `model` (built from `cfg`) to `path` in format `fmt` ("onnx" or "torch_export"), traced
    on the first image of the config's test set; with `check` > 0, compares the file with PyTorch on
    the first `check` test images (`check_exported`'s result; None without)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    EXPORTERS[fmt](model.eval(), example_images(cfg, 1)[0], path)
    return check_exported(model, fmt, path, example_images(cfg, check)) if check else None
