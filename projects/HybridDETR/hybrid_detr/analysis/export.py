"""Export of HybridDETR's inference path (backbone to boxes, one image, any size) to ONNX and to
`torch.export`.

`InferenceGraph` wraps a built model: it takes the normalised, padded image (1, 3, H, W) and the
unpadded size (2,) int64 [h, w], and returns the top detections of the one-to-one decoder's last
layer: scores (K,), labels (K,) int64 and boxes (K, 4) xyxy in the input image's pixels, clipped to
it -- what `HybridDETR.inference` computes before `detector_postprocess` rescales to the original
image (and drops empty boxes). Inference never runs a training branch, so every decoder mode
exports: deformable, dac, co_detr (deformable cross-attention) and smca (dense attention: MatMul,
Softmax).

The model's own forward keeps the level shapes as host ints (`LevelLayout.of_maps`), which would
freeze the image size into an exported graph; `InferenceGraph` passes the model's `encode_levels` the
same layout with the shapes left symbolic (`LevelLayout.of_maps(maps, symbolic=True)`) and otherwise
calls the model's modules unchanged (tested equal to `HybridDETR.forward`).

Our op:
- ONNX (`backend="reference"`): every `MSDeformAttn` runs the pure-PyTorch reference
  (`ms_deform_attn_reference`: `grid_sample`, exported as ONNX GridSample, opset >= 16), fed the
  level shapes of the current image, so the file runs in onnxruntime with no custom library;
- `torch.export` (`backend="op"`): the compiled op stays as the registered custom op
  `torch.ops.hybrid_detr.ms_deform_attn` in the graph.
"""
import contextlib
from typing import Iterator, List, Optional

import torch
from torch import nn
from torchvision.ops import box_convert

from ..layers import MSDeformAttn
from ..layers.ms_deform_attn_func import ms_deform_attn_reference
from ..modeling.token_layout import EncoderMemory, LevelLayout

__all__ = ["InferenceGraph", "preprocess_for_export", "export_onnx", "export_torch",
           "ONNX_OUTPUTS", "ONNX_INPUTS"]

ONNX_INPUTS = ["image", "image_size"]
ONNX_OUTPUTS = ["scores", "labels", "boxes"]


@contextlib.contextmanager
def _reference_sampling(model: nn.Module, shapes_holder: List) -> Iterator[None]:
    """Every MSDeformAttn of `model` samples with the pure-PyTorch reference, given the level
    shapes of the current forward (`shapes_holder[0]`) rather than reading them from the device."""
    patched = []
    for module in model.modules():
        if isinstance(module, MSDeformAttn):

            def sample(value, spatial_shapes, level_start_index, locations, weights, _m=module):
                dtype = torch.promote_types(torch.promote_types(value.dtype, locations.dtype), weights.dtype)
                value, locations, weights = value.to(dtype), locations.to(dtype), weights.to(dtype)
                return ms_deform_attn_reference(value, shapes_holder[0], locations, weights)

            module.sample = sample
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.sample


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
        self._shapes: List = [None]

    def encode(self, maps, masks, positions) -> EncoderMemory:
        """`HybridDETR.encode_levels` with the level shapes kept symbolic (exported dynamic sizes)."""
        layout = LevelLayout.of_maps(maps, symbolic=True)
        self._shapes[0] = [list(s) for s in layout.shapes]  # for the reference sampling
        return self.model.encode_levels(maps, masks, positions, layout)

    def forward(self, image: torch.Tensor, image_size: torch.Tensor):
        m = self.model
        _, _, height, width = image.shape
        ys = torch.arange(height, device=image.device)
        xs = torch.arange(width, device=image.device)
        padding_mask = ((ys[:, None] >= image_size[0]) | (xs[None, :] >= image_size[1]))[None]
        context = _reference_sampling(m, self._shapes) if self.backend == "reference" else contextlib.nullcontext()
        with context:
            memory = self.encode(*m.features(image, padding_mask))
            queries, _ = m.query_source(memory)
            logits, boxes = m.decoder(queries, memory).layer(-1)
        logits, boxes = logits[0], boxes[0]
        q, k = logits.shape
        scores, flat_index = logits.sigmoid().flatten().topk(min(self.num_detections, q * k))
        query_index = torch.div(flat_index, k, rounding_mode="floor")
        labels = flat_index % k
        size = image_size.to(boxes.dtype)
        scale = torch.stack((size[1], size[0], size[1], size[0]))
        xyxy = box_convert(boxes[query_index], "cxcywh", "xyxy") * scale
        xyxy = torch.minimum(xyxy.clamp(min=0), scale)  # detector_postprocess clips to the image
        return scores, labels, xyxy


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
