"""What the model looks at, for one image: capture (forward hooks, never changing a number the model
computes) and the views of `tools/explain.py`.

Capture:
- `DeformableCapture`: every `MSDeformAttn` call's sampling locations, attention weights and output,
  recorded at the module's `sample` step (the op's inputs), plus each module's forward inputs;
- `InferenceCapture`: the one-to-one decoder pass (its query group, the encoder memory and its
  output), recorded by a forward hook on `model.decoder`.
Views (matplotlib PNGs), for the top detections of the image:
- `plot_decoder_sampling`: each detection's sampling points on every level for a decoder layer and
  head(s), coloured by attention weight (all modes whose decoder uses deformable attention);
- `plot_encoder_sampling`: the encoder's sampling points for the token under a chosen pixel;
- `plot_smca`: SMCA's Gaussian prior of each head over the image next to the attention it modulated
  (recomputed from the captured inputs of the cross-attention, checked equal to its output);
- `plot_dac`: DAC's O- vs C-decoder boxes of the queries near one object, and the count of queries
  above each matching-score threshold;
- `plot_co_detr`: the positive anchors / proposals of each Co-DETR auxiliary head for the ground truth.

Coordinates: sampling locations are in [0, 1] of each level's *padded* map; the model scales its
references from the valid (unpadded) image by the level's valid ratio, so a location maps back to
image pixels as x / valid_ratio_w * image_w (and likewise y), the inverse of what the model does.
"""
import contextlib
import dataclasses
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torchvision.ops import box_convert, box_iou

from ..layers import MSDeformAttn
from ..modeling.modes import BranchInputs

__all__ = [
    "DeformableCapture",
    "InferenceCapture",
    "run_and_capture",
    "top_detections",
    "locations_to_pixels",
    "encoder_token_at",
    "plot_decoder_sampling",
    "plot_encoder_sampling",
    "smca_maps",
    "plot_smca",
    "dac_comparison",
    "plot_dac",
    "co_detr_positives",
    "plot_co_detr",
    "display_image",
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


@dataclasses.dataclass
class Captured:
    instances: object  # the model's Instances for the image (input image pixels)
    images: object  # the preprocessed ImageList
    deformable: DeformableCapture
    inference: InferenceCapture
    image_size: tuple  # (h, w) of the input image
    attn_names: Dict[str, List[str]]  # "encoder" / "decoder" -> MSDeformAttn module names by layer


def _deform_attn_names(model) -> Dict[str, List[str]]:
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
                    _deform_attn_names(model))


def top_detections(output, k: int):
    """The `k` queries of the last decoder layer with the highest class score (image 0):
    (query indices (k,), scores, labels, boxes (k, 4) cxcywh normalised to the valid image)."""
    logits, boxes = output.layer(-1)
    scores, labels = logits[0].sigmoid().max(-1)
    order = scores.argsort(descending=True)[:k]
    return order, scores[order], labels[order], boxes[0, order]


def locations_to_pixels(locations: torch.Tensor, valid_ratios: torch.Tensor, image_size) -> torch.Tensor:
    """Sampling locations (..., L, P, 2) in [0, 1] of each level's padded map -> input image pixels
    (..., L, P, 2), with valid_ratios (L, 2) the image's valid (w, h) fraction of each level."""
    h, w = image_size
    scale = locations.new_tensor([w, h])
    return locations / valid_ratios[:, None, :] * scale


def encoder_token_at(memory, x: float, y: float, image_size, level: int = 0) -> int:
    """Index (in the flattened memory) of the `level` token whose cell holds input pixel (x, y)."""
    h, w = image_size
    lh, lw = memory.layout.shapes[level]
    ratio = memory.valid_ratios[0, level]
    col = min(int(x / w * float(ratio[0]) * lw), lw - 1)
    row = min(int(y / h * float(ratio[1]) * lh), lh - 1)
    return int(memory.layout.level_start_index[level]) + row * lw + col


# ------------------------------------------------------------------------------------------------
# drawing helpers
def display_image(image: torch.Tensor, image_format: str = "BGR") -> np.ndarray:
    """A model input image (3, h, w) float 0-255 -> (h, w, 3) uint8 RGB."""
    array = image.permute(1, 2, 0).clamp(0, 255).byte().numpy()
    return array[:, :, ::-1].copy() if image_format == "BGR" else array


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_box(ax, xyxy, color, linewidth=2.0, label=None, linestyle="-"):
    import matplotlib.patches as patches

    x0, y0, x1, y1 = [float(v) for v in xyxy]
    ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color,
                                   linewidth=linewidth, linestyle=linestyle))
    if label:
        ax.text(x0, y0 - 2, label, color="white", fontsize=8, va="bottom",
                bbox=dict(facecolor=color, alpha=0.8, pad=1, edgecolor="none"))


def _image_axes(ax, image, title):
    ax.imshow(image)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("x (px)", fontsize=8)
    ax.set_ylabel("y (px)", fontsize=8)
    ax.tick_params(labelsize=7)


def _pixel_boxes(boxes_cxcywh, image_size):
    h, w = image_size
    return box_convert(boxes_cxcywh, "cxcywh", "xyxy") * boxes_cxcywh.new_tensor([w, h, w, h])


def _class_name(metadata, label):
    names = getattr(metadata, "thing_classes", None) if metadata is not None else None
    return names[label] if names and label < len(names) else str(label)


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


# ------------------------------------------------------------------------------------------------
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
    plt = _plt()
    queries, scores, labels, boxes = top_detections(captured.inference.output, top_k)
    heads = None if head is None else [head]
    pixels, weights, reference = decoder_sampling(captured, layer, queries, heads)
    num_levels = pixels.shape[-3]
    xyxy = _pixel_boxes(boxes, captured.image_size)
    vmax = float(weights.max())
    fig, axes = plt.subplots(len(queries), num_levels, figsize=(4.2 * num_levels + 1.2, 3.8 * len(queries)),
                             squeeze=False, dpi=100)
    sc = None
    layer_index = layer % len(captured.attn_names["decoder"])
    for row, q in enumerate(queries.tolist()):
        for level in range(num_levels):
            ax = axes[row, level]
            name = _class_name(metadata, int(labels[row]))
            _image_axes(ax, image, f"query {q} ({name} {float(scores[row]):.2f}), level {level}")
            _draw_box(ax, xyxy[row], "lime", 1.5)
            sc = _scatter_points(ax, pixels[row], weights[row], [level], vmax)
            ax.plot(*reference[row].tolist(), marker="+", color="cyan", markersize=12, markeredgewidth=2)
            ax.set_xlim(0, image.shape[1]); ax.set_ylim(image.shape[0], 0)
    fig.suptitle(f"decoder layer {layer_index}, {'all heads' if head is None else f'head {head}'}: sampling points "
                 f"coloured by attention weight (+ reference point, green box: detection)", fontsize=11)
    _save_with_weight_colorbar(plt, fig, sc, path, top=0.97)
    return {"path": path, "queries": queries, "pixels": pixels, "weights": weights, "layer": layer_index}


def _save_with_weight_colorbar(plt, fig, scatter, path, top):
    """Lay the panels out left of an "attention weight" colourbar for `scatter`, save, close."""
    fig.tight_layout(rect=(0, 0, 0.93, top))
    cax = fig.add_axes([0.94, 0.15, 0.015, 0.7])
    fig.colorbar(scatter, cax=cax).set_label("attention weight", fontsize=9)
    fig.savefig(path)
    plt.close(fig)


def plot_encoder_sampling(captured: Captured, image: np.ndarray, path: str, pixel, layer: int = -1,
                          level: int = 0) -> Dict:
    """The encoder's sampling points (every head, every level, coloured by attention weight) for the
    `level` token under input pixel `pixel` = (x, y), encoder layer `layer`. One panel per head."""
    plt = _plt()
    names = captured.attn_names["encoder"]
    call = captured.deformable.calls[names[layer]][0]
    memory = captured.inference.memory
    token = encoder_token_at(memory, pixel[0], pixel[1], captured.image_size, level)
    pixels = locations_to_pixels(call["locations"][0, token], memory.valid_ratios[0], captured.image_size)
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
        _image_axes(ax, image, f"head {head}")
        sc = _scatter_points(ax, pixels[head], weights[head], range(num_levels), vmax)
        ax.plot(pixel[0], pixel[1], marker="*", color="cyan", markersize=14, markeredgecolor="black")
        ax.set_xlim(0, image.shape[1]); ax.set_ylim(image.shape[0], 0)
        if head == 0:
            ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"encoder layer {layer % len(names)}: where the level-{level} token at pixel "
                 f"({pixel[0]:.0f}, {pixel[1]:.0f}) (star) samples, coloured by attention weight", fontsize=11)
    _save_with_weight_colorbar(plt, fig, sc, path, top=0.96)
    return {"path": path, "token": token, "pixels": pixels, "weights": weights}


# ------------------------------------------------------------------------------------------------
# SMCA
class _SMCACapture(contextlib.AbstractContextManager):
    def __init__(self, module):
        self.module, self.args, self.output, self._handle = module, None, None, None

    def __enter__(self):
        def hook(_m, args, kwargs, output):
            if self.args is None:
                self.args, self.output = (args, kwargs), output

        self._handle = self.module.register_forward_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


@torch.no_grad()
def smca_maps(attn, query, memory, query_reference):
    """SMCA co-attention's maps for image 0 of the batch, from the module's own `attend` (the numbers
    the module computes): per level of `attn.levels`, the prior G = exp(log G) and the attention
    probabilities, both (M, Q, H, W); the scale-selection weights alpha (Q, M, levels) (None for one
    level); and the output, to check against the module's."""
    maps = {}
    output = attn.attend(query, memory, query_reference, maps=maps)
    m, q = attn.n_heads, query.shape[1]
    priors, attentions = {}, {}
    for level in attn.levels:
        h, w = memory.layout.shapes[level]
        attentions[level] = maps["attention"][level][0].view(m, q, h, w)
        if level in maps["prior"]:
            priors[level] = maps["prior"][level][0].expand(m, q, h * w).reshape(m, q, h, w)
    alpha = maps["alpha"]
    if alpha is not None:
        alpha = alpha[0].permute(1, 0, 2).expand(q, m, alpha.shape[-1])  # (Q, M, levels)
    return {"prior": priors, "attention": attentions, "alpha": alpha, "output": output}


def _valid_crop(map_hw: torch.Tensor, ratio) -> np.ndarray:
    h, w = map_hw.shape
    vh, vw = max(1, round(float(ratio[1]) * h)), max(1, round(float(ratio[0]) * w))
    return map_hw[:vh, :vw].numpy()


def plot_smca(model, captured: Captured, input_dict, image: np.ndarray, out_dir: str, layer: int = -1,
              top_k: int = 3, level: Optional[int] = None, metadata=None) -> List[Dict]:
    """Per top detection, one PNG: for every head, its Gaussian prior over the image (top row) next
    to the attention it modulated (bottom row), on `level` (default: the finest SMCA level);
    the scale-selection weight of each head on that level and its selected (argmax) level in the titles."""
    plt = _plt()
    attn = model.decoder.layers[layer].cross_attn
    with _SMCACapture(attn) as cap, torch.no_grad():
        model([{"image": input_dict["image"], "height": input_dict["height"], "width": input_dict["width"]}])
    (query, _reference_points, memory, query_reference), _ = cap.args
    maps = smca_maps(attn, query, memory, query_reference)
    level = attn.levels[0] if level is None else level
    queries, scores, labels, boxes = top_detections(captured.inference.output, top_k)
    xyxy = _pixel_boxes(boxes, captured.image_size)
    ratio = memory.valid_ratios[0, level]
    h_img, w_img = image.shape[:2]
    results = []
    for k, q in enumerate(queries.tolist()):
        m = attn.n_heads
        fig, axes = plt.subplots(2, m, figsize=(2.6 * m + 1, 5.8), squeeze=False, dpi=100)
        for head in range(m):
            prior = _valid_crop(maps["prior"][level][head, q], ratio)
            attention = _valid_crop(maps["attention"][level][head, q], ratio)
            title = f"head {head}"
            if maps["alpha"] is not None:
                a = maps["alpha"][q, head]
                title += f"\nα={float(a[attn.levels.index(level)]):.2f}, selects L{attn.levels[int(a.argmax())]}"
            for row, (heat, cmap) in enumerate(((prior, "viridis"), (attention, "inferno"))):
                ax = axes[row, head]
                ax.imshow(image)
                ax.imshow(heat, cmap=cmap, alpha=0.6, extent=(0, w_img, h_img, 0), interpolation="nearest")
                _draw_box(ax, xyxy[k], "lime", 1.2)
                ax.set_xticks([]); ax.set_yticks([])
                if row == 0:
                    ax.set_title(title, fontsize=8)
            axes[0, 0].set_ylabel("Gaussian prior G", fontsize=9)
            axes[1, 0].set_ylabel("attention", fontsize=9)
        name = _class_name(metadata, int(labels[k]))
        fig.suptitle(f"SMCA decoder layer {layer % len(model.decoder.layers)}, query {q} ({name} "
                     f"{float(scores[k]):.2f}), level {level}: prior (top) and the attention it modulated (bottom)",
                     fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        path = os.path.join(out_dir, f"smca_query{q}.png")
        fig.savefig(path)
        plt.close(fig)
        results.append({"path": path, "query": q})
    return results


# ------------------------------------------------------------------------------------------------
# DAC
@torch.no_grad()
def dac_comparison(model, captured: Captured, object_box: torch.Tensor, object_label: int,
                   thresholds=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)) -> Dict:
    """O-decoder (one-to-one pass) vs C-decoder (the same decoder with skip_self_attn=True, fed the
    DAC branch's C queries) for one object (box cxcywh normalised to the valid image, class):
    last-layer boxes, matching scores (DAC's: iou_weight * IoU + cls_weight * p(class)) and the
    count of queries at or above each threshold."""
    group, memory, o_out = captured.inference.group, captured.inference.memory, captured.inference.output
    branch = model.branches["dac"] if "dac" in model.branches else None
    if branch is not None:
        stub = BranchInputs(group, memory, o_out, None, None, None, None, model.decoder, None)
        c_group = branch.c_queries(stub)
        iou_w, cls_w = branch.matcher.iou_weight, branch.matcher.cls_weight
    else:
        c_group, iou_w, cls_w = group, 0.7, 0.3
    c_out = model.decoder(c_group, memory, skip_self_attn=True)
    result = {"thresholds": list(thresholds)}
    target = box_convert(object_box[None], "cxcywh", "xyxy")
    for key, out in (("O", o_out), ("C", c_out)):
        logits, boxes = out.layer(-1)
        iou = box_iou(box_convert(boxes[0], "cxcywh", "xyxy"), target)[:, 0]
        score = iou_w * iou + cls_w * logits[0, :, object_label].sigmoid()
        result[key] = {"boxes": boxes[0], "score": score,
                       "counts": [int((score >= t).sum()) for t in thresholds]}
    return result


def plot_dac(model, captured: Captured, image: np.ndarray, path: str, object_box=None, object_label=None,
             num_queries: int = 10, metadata=None) -> Dict:
    """DAC-DETR's motivating picture for one object (a ground-truth box if given, else the top
    detection): the `num_queries` queries with the highest matching score to it, their boxes after
    the O-decoder (left) and after the C-decoder (middle); right: queries at or above each
    matching-score threshold, O vs C."""
    plt = _plt()
    if object_box is None:
        _, _, labels, boxes = top_detections(captured.inference.output, 1)
        object_box, object_label, source = boxes[0], int(labels[0]), "top detection"
    else:
        source = "ground truth"
    result = dac_comparison(model, captured, object_box, int(object_label))
    fig, all_axes = plt.subplots(1, 4, figsize=(16, 5), dpi=100, gridspec_kw={"width_ratios": [1, 1, 0.05, 1]})
    axes = [all_axes[0], all_axes[1], all_axes[3]]
    target_xyxy = _pixel_boxes(object_box[None], captured.image_size)[0]
    cmap = plt.get_cmap("cool")
    for ax, key, title in ((axes[0], "O", "O-decoder (with self-attention)"),
                           (axes[1], "C", "C-decoder (self-attention skipped)")):
        data = result[key]
        order = data["score"].argsort(descending=True)[:num_queries]
        _image_axes(ax, image, f"{title}: {num_queries} best-matching queries")
        for q in order.tolist():
            box = _pixel_boxes(data["boxes"][q][None], captured.image_size)[0]
            _draw_box(ax, box, cmap(float(data["score"][q])), 1.2)
        _draw_box(ax, target_xyxy, "lime", 2.5, f"{source}: {_class_name(metadata, int(object_label))}")
        result[key]["shown"] = order
    x = np.arange(len(result["thresholds"]))
    bars_o = axes[2].bar(x - 0.2, result["O"]["counts"], 0.4, label="O-decoder", color="tab:blue")
    bars_c = axes[2].bar(x + 0.2, result["C"]["counts"], 0.4, label="C-decoder", color="tab:orange")
    axes[2].bar_label(bars_o, fontsize=8)
    axes[2].bar_label(bars_c, fontsize=8)
    top = max(result["O"]["counts"] + result["C"]["counts"] + [1])
    axes[2].set_ylim(0, top * 1.15 + 0.5)
    axes[2].yaxis.get_major_locator().set_params(integer=True)
    axes[2].set_xticks(x, [f"{t:.1f}" for t in result["thresholds"]], fontsize=8)
    axes[2].set_xlabel("matching-score threshold (0.7·IoU + 0.3·p(class))", fontsize=9)
    axes[2].set_ylabel("queries with score ≥ threshold", fontsize=9)
    axes[2].set_title("queries gathered around the object", fontsize=9)
    axes[2].legend(fontsize=8)
    axes[2].grid(True, axis="y", alpha=0.3)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(sm, cax=all_axes[2]).set_label("matching score (box colour)", fontsize=9)
    fig.suptitle("DAC: O- vs C-decoder queries near one object (last decoder layer)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path)
    plt.close(fig)
    result["path"] = path
    return result


# ------------------------------------------------------------------------------------------------
# Co-DETR
@torch.no_grad()
def co_detr_positives(model, captured: Captured, gt_instances) -> Dict:
    """Each Co-DETR auxiliary head's positives for the image's ground truth (`gt_instances`, in the
    input image's pixels): {head name: AuxPositives}. The heads run as in a training step (their
    assigners only exist there), without gradients, then the branch is put back in eval mode."""
    branch = model.branches["co_detr"] if "co_detr" in model.branches else None
    if branch is None or branch.num_aux_heads == 0:
        raise ValueError("the model has no Co-DETR auxiliary head (DECODER_MODE co_detr, NUM_AUX_HEADS > 0)")
    was_training = branch.training
    branch.train()
    try:
        torch.manual_seed(0)  # the Faster R-CNN head samples its proposals
        maps = branch.adapter(captured.inference.memory)
        gts = [gt_instances.to(maps[0].device)]
        return {name: head(maps, captured.images, gts)[1] for name, head in branch.heads.items()}
    finally:
        branch.train(was_training)


def plot_co_detr(model, captured: Captured, image: np.ndarray, gt_instances, path: str, metadata=None) -> Dict:
    """One panel per auxiliary head: the ground truth (thick) and the head's positive anchors /
    proposals (thin), coloured by the ground truth they are assigned to."""
    plt = _plt()
    positives = co_detr_positives(model, captured, gt_instances)
    fig, axes = plt.subplots(1, len(positives), figsize=(6.5 * len(positives), 5.5), squeeze=False, dpi=100)
    cmap = plt.get_cmap("tab10")
    labels = {"atss": "ATSS: positive anchors", "rcnn": "Faster R-CNN: positive proposals"}
    for ax, (name, pos) in zip(axes[0], positives.items()):
        counts = torch.bincount(pos.gt_index, minlength=len(gt_instances)).tolist()
        _image_axes(ax, image, f"{labels.get(name, name)} ({len(pos.gt_index)}; per gt: {counts})")
        for box, g in zip(pos.boxes, pos.gt_index.tolist()):
            _draw_box(ax, box, cmap(g % 10), 0.9, linestyle="--")
        for g, (box, cls) in enumerate(zip(gt_instances.gt_boxes.tensor, gt_instances.gt_classes.tolist())):
            _draw_box(ax, box, cmap(g % 10), 2.5, f"gt {g}: {_class_name(metadata, cls)}")
        ax.set_xlim(0, image.shape[1]); ax.set_ylim(image.shape[0], 0)
    # One line fits two panels; a single panel (K = 1) is too narrow for it.
    title = "Co-DETR auxiliary heads: positives (dashed) for each ground truth (solid, same colour)"
    fig.suptitle(title if len(positives) > 1 else title.replace(": ", ":\n", 1), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path)
    plt.close(fig)
    return {"path": path, "positives": positives}
