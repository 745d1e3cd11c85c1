"""What the model looks at, for one image: the capture of a forward pass (forward hooks, never
changing a number the model computes), the generic views, and `explain`, which runs the views of a
model (those of `tools/explain.py`).

Capture:
- `DeformableCapture`: every `MSDeformAttn` call's sampling locations, attention weights and output,
  recorded at the module's `sample` step (the op's inputs), plus each module's forward inputs;
- `InferenceCapture`: the one-to-one decoder pass (its query group, the encoder memory and its
  output), recorded by a forward hook on `model.decoder`.
Generic views (matplotlib PNGs), for the top detections of the image, any decoder mode:
- `plot_decoder_sampling`: each detection's sampling points on every level for a decoder layer and
  head(s), coloured by attention weight (decoders with deformable cross-attention);
- `plot_encoder_sampling`: the encoder's sampling points for the token under a chosen pixel (of the
  original image: `explain(pixel=...)`, tools/explain.py --pixel).
Each decoder mode brings its own view, registered with the mode (`register_decoder_mode(...,
explain_view=...)`, the contract in `modeling/explain_support.py`): SMCA's prior next to the
attention it modulated (`modeling/smca/explain.py`), DAC's O- vs C-decoder queries around one object
(`modeling/dac/explain.py`), Co-DETR's auxiliary heads' positives (`modeling/co_detr/explain.py`).

Coordinates: see `modeling/explain_support.py`.
"""
import contextlib
import math
import os
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..layers import MSDeformAttn
from ..modeling.explain_support import (
    Captured,
    ExplainRequest,
    class_name,
    draw_box,
    image_axes,
    locations_to_pixels,
    pixel_boxes,
    pyplot,
    save_figure,
    top_detections,
)
from ..modeling.modes import DECODER_MODES
from .inputs import InputError, build_trained_model, metadata_of, resolve_input

__all__ = [
    "DeformableCapture",
    "InferenceCapture",
    "run_and_capture",
    "deform_attn_names",
    "encoder_token_at",
    "display_image",
    "plot_decoder_sampling",
    "plot_encoder_sampling",
    "GENERIC_VIEWS",
    "view_names",
    "default_views",
    "explain",
    "explain_image",
    "paths",
]

LEVEL_MARKERS = ["o", "s", "^", "D", "v", "P"]


# ------------------------------------------------------------------------------------------------
# capture
class DeformableCapture(contextlib.AbstractContextManager):
    """Records every `MSDeformAttn` call of `model` while active.

    `calls[name]` (module name) is a list of dicts per call: `locations` (N, Lq, M, L, P, 2),
    `weights` (N, Lq, M, L, P), `value`, `spatial_shapes`, `level_start_index`, `output` (the op's
    output (N, Lq, M*D)) as the
    `sample` step received / returned them, and `query`, `reference_points` as the module's forward
    received them. The step is wrapped on the instance and called unchanged."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.calls: Dict[str, List[Dict]] = {}
        self._handles, self._patched = [], []

    def __enter__(self):
        for name, module in self.model.named_modules():
            if not isinstance(module, MSDeformAttn):
                continue
            self.calls[name] = []

            def pre_hook(_module, args, _name=name):
                query, reference_points = args[0], args[1]
                self.calls[_name].append({"query": query.detach().clone(),
                                          "reference_points": reference_points.detach().clone()})

            def sample(value, spatial_shapes, level_start_index, locations, weights, _module=module, _name=name):
                out = type(_module).sample(_module, value, spatial_shapes, level_start_index, locations, weights)
                record = self.calls[_name][-1] if self.calls[_name] and "locations" not in self.calls[_name][-1] else {}
                if not record:
                    self.calls[_name].append(record)
                record.update(value=value.detach().clone(), level_start_index=level_start_index.detach().clone(),
                              locations=locations.detach().clone(), weights=weights.detach().clone(),
                              spatial_shapes=spatial_shapes.detach().clone(), output=out.detach().clone())
                return out

            self._handles.append(module.register_forward_pre_hook(pre_hook))
            module.sample = sample
            self._patched.append(module)
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        for module in self._patched:
            del module.sample
        self._handles, self._patched = [], []
        return False


class InferenceCapture(contextlib.AbstractContextManager):
    """Records the decoder's first call while active: `group` (QueryGroup), `memory`
    (EncoderMemory) and `output` (DecoderOutput) of the one-to-one pass."""

    def __init__(self, model):
        self.model = model
        self.group = self.memory = self.output = None
        self._handle = None

    def __enter__(self):
        def hook(_module, args, kwargs, output):
            if self.output is None:
                self.group, self.memory, self.output = args[0], args[1], output

        self._handle = self.model.decoder.register_forward_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


def deform_attn_names(model) -> Dict[str, List[str]]:
    """"encoder" / "decoder" -> the names of their MSDeformAttn modules, by layer."""
    names = {"encoder": [], "decoder": []}
    for name, module in model.named_modules():
        if isinstance(module, MSDeformAttn):
            if name.startswith("encoder.layers."):
                names["encoder"].append(name)
            elif name.startswith("decoder.layers."):
                names["decoder"].append(name)
    return names


@torch.no_grad()
def run_and_capture(model, input_dict) -> Captured:
    """Runs `model` (eval) on one input dict with the captures on."""
    model.eval()
    inputs = {"image": input_dict["image"], "height": input_dict["height"], "width": input_dict["width"]}
    with DeformableCapture(model) as deformable, InferenceCapture(model) as inference:
        instances = model([inputs])[0]["instances"]
    images, _ = model.preprocess_image([inputs])
    return Captured(instances, images, deformable, inference, (input_dict["height"], input_dict["width"]),
                    deform_attn_names(model))


def encoder_token_at(memory, x: float, y: float, image_size, level: int = 0) -> int:
    """Index (in the flattened memory) of the `level` token whose cell holds input pixel (x, y)."""
    h, w = image_size
    lh, lw = memory.layout.shapes[level]
    ratio = memory.valid_ratios[0, level]
    col = min(int(x / w * float(ratio[0]) * lw), lw - 1)
    row = min(int(y / h * float(ratio[1]) * lh), lh - 1)
    return int(memory.layout.level_start_index[level]) + row * lw + col


def display_image(image: torch.Tensor, image_format: str = "BGR") -> np.ndarray:
    """A model input image (3, h, w) float 0-255 -> (h, w, 3) uint8 RGB."""
    array = image.permute(1, 2, 0).clamp(0, 255).byte().numpy()
    return array[:, :, ::-1].copy() if image_format == "BGR" else array


# ------------------------------------------------------------------------------------------------
# generic views: deformable attention
def _scatter_points(ax, pixels, weights, levels, vmax, cmap="plasma"):
    """pixels (L, P, 2) or (M, L, P, 2); weights matching; one marker per level."""
    sc = None
    for level in levels:
        xy = pixels[..., level, :, :].reshape(-1, 2).numpy()
        wt = weights[..., level, :].reshape(-1).numpy()
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=wt, cmap=cmap, vmin=0, vmax=vmax, s=22,
                        marker=LEVEL_MARKERS[level % len(LEVEL_MARKERS)], edgecolors="white", linewidths=0.4,
                        label=f"level {level}")
    return sc



# deformable attention views
def decoder_sampling(captured: Captured, layer: int, queries: torch.Tensor, heads: Optional[Sequence[int]]):
    """(pixels (K, M', L, P, 2), weights (K, M', L, P), reference (K, 2) px) of the chosen
    decoder layer's MSDeformAttn for the given queries and heads (None: all)."""
    names = captured.attn_names["decoder"]
    if not names:
        raise ValueError("this model's decoder has no deformable attention (SMCA's dense co-attention?)")
    call = captured.deformable.calls[names[layer]][0]
    memory = captured.inference.memory
    locations = call["locations"][0, queries]  # (K, M, L, P, 2)
    weights = call["weights"][0, queries]
    if heads is not None:
        locations, weights = locations[:, list(heads)], weights[:, list(heads)]
    pixels = locations_to_pixels(locations, memory.valid_ratios[0], captured.image_size)
    reference = call["reference_points"][0, queries, 0, :2] / memory.valid_ratios[0, 0]
    h, w = captured.image_size
    return pixels, weights, reference * reference.new_tensor([w, h])


def plot_decoder_sampling(captured: Captured, image: np.ndarray, path: str, layer: int = -1,
                          head: Optional[int] = None, top_k: int = 3, metadata=None) -> Dict:
    """One row per top detection, one column per level: the sampling points of decoder layer
    `layer` (head `head`, or all heads), coloured by attention weight. Returns the plotted data."""
    plt = pyplot()
    queries, scores, labels, boxes = top_detections(captured.inference.output, top_k)
    heads = None if head is None else [head]
    pixels, weights, reference = decoder_sampling(captured, layer, queries, heads)
    num_levels = pixels.shape[-3]
    xyxy = pixel_boxes(boxes, captured.image_size)
    vmax = float(weights.max())
    fig, axes = plt.subplots(len(queries), num_levels, figsize=(4.2 * num_levels + 1.2, 3.8 * len(queries)),
                             squeeze=False, dpi=100)
    sc = None
    layer_index = layer % len(captured.attn_names["decoder"])
    for row, q in enumerate(queries.tolist()):
        for level in range(num_levels):
            ax = axes[row, level]
            name = class_name(metadata, int(labels[row]))
            image_axes(ax, image, f"query {q} ({name} {float(scores[row]):.2f}), level {level}")
            draw_box(ax, xyxy[row], "lime", 1.5)
            sc = _scatter_points(ax, pixels[row], weights[row], [level], vmax)
            ax.plot(*reference[row].tolist(), marker="+", color="cyan", markersize=12, markeredgewidth=2)
            ax.set_xlim(0, image.shape[1]); ax.set_ylim(image.shape[0], 0)
    fig.suptitle(f"decoder layer {layer_index}, {'all heads' if head is None else f'head {head}'}: sampling points "
                 f"coloured by attention weight (+ reference point, green box: detection)", fontsize=11)
    _save_with_weight_colorbar(fig, sc, path, top=0.97)
    return {"path": path, "queries": queries, "pixels": pixels, "weights": weights, "layer": layer_index}


def _save_with_weight_colorbar(fig, scatter, path, top):
    """Lay the panels out left of an "attention weight" colourbar for `scatter`, save, close."""
    fig.tight_layout(rect=(0, 0, 0.93, top))
    cax = fig.add_axes([0.94, 0.15, 0.015, 0.7])
    fig.colorbar(scatter, cax=cax).set_label("attention weight", fontsize=9)
    save_figure(fig, path)


def plot_encoder_sampling(captured: Captured, image: np.ndarray, path: str, pixel, layer: int = -1,
                          level: int = 0, frame: str = "image") -> Dict:
    """The encoder's sampling points (every head, every level, coloured by attention weight) for the
    `level` token under `pixel` = (x, y), encoder layer `layer`. One panel per head.

    One frame throughout: `pixel`, the star and the returned "pixels" are in the pixels of `image`, the
    picture drawn on: the model's input image or the original one (the test-time resize scales the
    whole image, so the valid image's normalised coordinates are the same in both). `frame` names it
    in the title."""
    plt = pyplot()
    names = captured.attn_names["encoder"]
    call = captured.deformable.calls[names[layer]][0]
    memory = captured.inference.memory
    frame_size = image.shape[:2]
    if not (0 <= pixel[0] < frame_size[1] and 0 <= pixel[1] < frame_size[0]):
        raise InputError(f"pixel ({pixel[0]:g}, {pixel[1]:g}) is outside the {frame} "
                         f"({frame_size[1]} x {frame_size[0]} pixels, x then y)")
    token = encoder_token_at(memory, pixel[0], pixel[1], frame_size, level)
    pixels = locations_to_pixels(call["locations"][0, token], memory.valid_ratios[0], frame_size)
    weights = call["weights"][0, token]  # (M, L, P)
    m, num_levels = weights.shape[0], weights.shape[1]
    cols = min(m, 4)
    rows = math.ceil(m / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 1.2, 3.8 * rows), squeeze=False, dpi=100)
    vmax = float(weights.max())
    sc = None
    for head in range(rows * cols):
        ax = axes[head // cols, head % cols]
        if head >= m:
            ax.axis("off")
            continue
        image_axes(ax, image, f"head {head}")
        sc = _scatter_points(ax, pixels[head], weights[head], range(num_levels), vmax)
        ax.plot(pixel[0], pixel[1], marker="*", color="cyan", markersize=14, markeredgecolor="black")
        ax.set_xlim(0, image.shape[1]); ax.set_ylim(image.shape[0], 0)
        if head == 0:
            ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"encoder layer {layer % len(names)}: where the level-{level} token at pixel "
                 f"({pixel[0]:.0f}, {pixel[1]:.0f}) of the {frame} (star) samples, coloured by attention weight",
                 fontsize=11)
    _save_with_weight_colorbar(fig, sc, path, top=0.96)
    return {"path": path, "token": token, "pixel": tuple(pixel), "pixels": pixels, "weights": weights}


def decoder_sampling_view(model, captured: Captured, request: ExplainRequest) -> Optional[Dict]:
    """The view "decoder_sampling" (decoder_sampling.png); None when the decoder's cross-attention is
    not deformable (SMCA's dense co-attention)."""
    if not captured.attn_names["decoder"]:
        return None
    return plot_decoder_sampling(captured, request.image, request.path("decoder_sampling.png"), request.layer,
                                 request.head, request.top_k, request.metadata)


def encoder_sampling_view(model, captured: Captured, request: ExplainRequest) -> Dict:
    """The view "encoder_sampling" (encoder_sampling.png), for the token under `request.pixel` (by
    default the top detection's centre), drawn on the original image (`input_dict["original"]`; the
    model's input image when there is none), in whose pixels `request.pixel` is given."""
    original = request.input_dict.get("original")
    image, frame = (request.image, "model input image") if original is None else (original, "original image")
    pixel = request.pixel
    if pixel is None:  # the top detection's centre (normalised to the valid image)
        _, _, _, boxes = top_detections(captured.inference.output, 1)
        h, w = image.shape[:2]
        pixel = (float(boxes[0, 0]) * w, float(boxes[0, 1]) * h)
    return plot_encoder_sampling(captured, image, request.path("encoder_sampling.png"), pixel, request.layer,
                                 frame=frame)


# ------------------------------------------------------------------------------------------------
# running the views of a model
# The views of every model; each decoder mode adds its own (`DecoderMode.explain_views`).
GENERIC_VIEWS: Dict[str, Callable] = {
    "decoder_sampling": decoder_sampling_view,
    "encoder_sampling": encoder_sampling_view,
}


def view_names() -> List[str]:
    """Every view that can be asked for: the generic ones, then each registered decoder mode with a
    view (the view is named after its mode)."""
    return list(GENERIC_VIEWS) + sorted(name for name, mode in DECODER_MODES.items() if mode.explain_view is not None)


def default_views(model) -> List[str]:
    """The views of the model: the generic ones (decoder_sampling when the decoder's cross-attention
    is deformable), then those of the modes in its DECODER_MODE."""
    generic = ["decoder_sampling", "encoder_sampling"] if deform_attn_names(model)["decoder"] else ["encoder_sampling"]
    return generic + list(model.mode.explain_views())


def _view(name: str) -> Callable:
    return GENERIC_VIEWS[name] if name in GENERIC_VIEWS else DECODER_MODES[name].explain_view


def explain(model, input_dict, out_dir: str, *, image_format: str = "BGR", layer: int = -1,
            head: Optional[int] = None, pixel=None, top_k: int = 3, views: Optional[Sequence[str]] = None,
            metadata=None) -> Dict[str, Optional[object]]:
    """Writes the chosen views (default: `default_views(model)`) of one input dict (`load_input`'s)
    to `out_dir`. `pixel`: the encoder view's (x, y) in the pixels of the *original* image
    (`input_dict["original"]`, before the test-time resize; the view is drawn on it; default: the top
    detection's centre). Returns {view: its result (a dict with "path", or a list of them), or None
    when the view does not apply to this model or image (nothing written)}."""
    os.makedirs(out_dir, exist_ok=True)
    chosen = list(views or default_views(model))
    unknown = [name for name in chosen if name not in view_names()]
    if unknown:
        raise ValueError(f"unknown views {unknown}: choose from {view_names()}")
    captured = run_and_capture(model, input_dict)
    request = ExplainRequest(out_dir, display_image(input_dict["image"], image_format), input_dict, layer, head,
                             top_k, pixel, metadata)
    return {name: _view(name)(model, captured, request) for name in chosen}


def explain_image(cfg, out_dir: str, *, image: Optional[str] = None, dataset: Optional[str] = None,
                  index: int = 0, **options) -> Dict[str, Optional[object]]:
    """`explain` for the trained model of `cfg` (MODEL.WEIGHTS) on one image: `image` (a file, or an
    image id of DATASETS.TEST[0]) or record `index` of `dataset` (with its ground truth); the
    dataset's class names label the views. `options`: those of `explain`."""
    model = build_trained_model(cfg)
    input_dict, dataset_name = resolve_input(cfg, image, dataset, index)
    return explain(model, input_dict, out_dir, image_format=cfg.INPUT.FORMAT, metadata=metadata_of(dataset_name),
                   **options)


def paths(results) -> List[str]:
    """The files `explain` wrote, in the order of its results."""
    out = []
    for value in results.values():
        if value is not None:
            out += [v["path"] for v in value] if isinstance(value, list) else [value["path"]]
    return out
