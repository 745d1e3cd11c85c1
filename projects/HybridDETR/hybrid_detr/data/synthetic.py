"""The embedded datasets: synthetic shapes on cluttered backgrounds, in COCO format.

Two styles, each generated deterministically (a fixed seed per split, one random generator per
image) the first time a split is needed, and written under
``$DETECTRON2_DATASETS/<style folder>/<split>/`` (default ``datasets/``, relative to the working
directory, as detectron2's builtin datasets)::

    hybrid_synthetic/train/instances.json   COCO JSON: images, annotations (bbox XYWH), categories
    hybrid_synthetic/train/meta.json        the generator parameters the split was made with
    hybrid_synthetic/train/images/000001.jpg ...

- ``SHAPES`` (folder ``hybrid_synthetic``, the quickstart's): 6 classes of equal frequency, 0-5
  objects per image (2.6 on average), each 10%-45% of the image's shorter side, each keeping at least
  70% of its pixels visible.
- ``CROWDED`` (folder ``hybrid_crowded``), closer to COCO's statistics: 23 classes with unequal
  frequencies (weights 1/rank, so the commonest is about 8x the rarest, as COCO's person is to its
  median class), objects per image drawn log-normally (median ~4, mean ~7, a tail past 50 as
  COCO's; images without objects too), COCO's mix of small / medium / large objects (41 / 34 / 25 %,
  the area thresholds 32^2 and 96^2 of a 640x480 image scaled to the image), objects allowed to cover
  each other down to 50% visibility, and distractor clutter (unlabelled irregular blobs) under them.
  `dataset_statistics` measures what a split really holds (placement can fail in crowded images).

Classes differ by shape only: colours are drawn at random for every object and background, so
a detector has to look at the outline; the box is always the object's full extent.

A split is built in a temporary folder next to its final place and renamed into place, so two
processes racing to create it never see a half-written split; the loser discards its copy.
A split may also be made under another folder name (``folder``) from the same image stream: the
first N images of a larger val split are the N images of the smaller one.
"""
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

__all__ = [
    "SyntheticStyle",
    "SHAPES",
    "CROWDED",
    "STYLES",
    "SYNTHETIC_CLASSES",
    "CROWDED_CLASSES",
    "dataset_statistics",
    "GENERATOR_VERSION",
    "DEFAULT_SPLIT_SIZES",
    "generate_split",
    "ensure_split",
    "synthetic_split_paths",
    "default_datasets_root",
]

SYNTHETIC_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")
CROWDED_CLASSES = SYNTHETIC_CLASSES + (
    "pentagon", "hexagon", "diamond", "rectangle", "ellipse", "semicircle", "crescent", "arrow",
    "heart", "l_shape", "t_shape", "frame", "chevron", "hourglass", "star6", "trapezoid", "octagon",
)
# Bump when the drawing code changes: splits made by another version are regenerated.
GENERATOR_VERSION = 1
DEFAULT_SPLIT_SIZES = {"train": 2000, "val": 200}
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
DATASET_DIRNAME = "hybrid_synthetic"


@dataclass(frozen=True)
class SyntheticStyle:
    """What the images of a synthetic dataset hold.

    count_probs: probabilities of 0, 1, 2, ... objects (truncated to `max_objects`), or None to draw the
        count as round(lognormal(*count_lognormal)), capped at `max_objects`.
    class_weights: relative class frequencies, None for equal ones.
    size_buckets: ((low, high, probability), ...) of the object extent / the image's shorter side, drawn
        log-uniformly within the chosen bucket.
    min_visible: fraction of an object's pixels that must stay visible after occlusion.
    distractors: (low, high): how many unlabelled blobs to draw under the objects.
    """

    name: str
    folder: str
    classes: Tuple[str, ...]
    size_buckets: Tuple[Tuple[float, float, float], ...]
    count_probs: Optional[Tuple[float, ...]] = None
    count_lognormal: Tuple[float, float] = (0.0, 0.0)
    class_weights: Optional[Tuple[float, ...]] = None
    min_visible: float = 0.7
    distractors: Tuple[int, int] = (0, 0)
    max_objects: int = 5
    image_sides: Tuple[int, int] = (256, 320)
    split_sizes: Tuple[Tuple[str, int], ...] = (("train", 2000), ("val", 200))


SHAPES = SyntheticStyle(
    name="shapes",
    folder=DATASET_DIRNAME,
    classes=SYNTHETIC_CLASSES,
    size_buckets=((0.10, 0.45, 1.0),),
    count_probs=(0.06, 0.22, 0.24, 0.20, 0.16, 0.12),
    split_sizes=tuple(DEFAULT_SPLIT_SIZES.items()),
)
# COCO (instances_val2017): 7.3 objects per image, median 4, 1% of images without objects, 41% small /
# 34% medium / 25% large objects (area < 32^2, < 96^2, above, in images of about 640x480: extents of
# ~5.8% and ~17% of the shorter side).
CROWDED = SyntheticStyle(
    name="crowded",
    folder="hybrid_crowded",
    classes=CROWDED_CLASSES,
    size_buckets=((0.03, 0.06, 0.38), (0.06, 0.18, 0.30), (0.18, 0.55, 0.32)),
    count_lognormal=(1.5, 1.0),
    class_weights=tuple(1.0 / rank for rank in range(1, len(CROWDED_CLASSES) + 1)),
    min_visible=0.5,
    distractors=(2, 8),
    max_objects=80,
    image_sides=(160, 208),
    split_sizes=(("train", 3000), ("val", 1000)),
)
STYLES = {style.name: style for style in (SHAPES, CROWDED)}


def default_datasets_root():
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def synthetic_split_paths(root, split, style="shapes"):
    """(split_dir, json_file, image_root) of a split (folder name `split`) of a style under `root`."""
    split_dir = os.path.join(root, _style(style).folder, split)
    return split_dir, os.path.join(split_dir, "instances.json"), os.path.join(split_dir, "images")


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------
def _background(rng, w, h):
    """Random two-colour linear gradient + low-frequency texture + thin clutter lines.

    Both the gradient and the texture are smooth, so they are made on a coarse grid and upsampled
    bilinearly by PIL (fast, and exact for the linear gradient).
    """
    c0 = rng.uniform(0, 255, 3)
    c1 = rng.uniform(0, 255, 3)
    theta = rng.uniform(0, 2 * math.pi)
    g = int(rng.integers(4, 9))
    u = np.linspace(-0.5, 0.5, g)
    t = u[None, :] * math.cos(theta) + u[:, None] * math.sin(theta)  # (g, g), rows = y
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    grid = c0 * (1 - t[..., None]) + c1 * t[..., None]
    grid += rng.uniform(10, 35) * rng.uniform(-1, 1, (g, g, 3))
    small = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8))
    pil = small.resize((w, h), Image.BILINEAR)
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(2, 9))):
        _random_line(rng, draw, w, h, width=int(rng.integers(1, 4)))
    return pil


def _random_line(rng, draw, w, h, width):
    x0, x1 = rng.uniform(-0.1 * w, 1.1 * w, 2)
    y0, y1 = rng.uniform(-0.1 * h, 1.1 * h, 2)
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    draw.line([(x0, y0), (x1, y1)], fill=colour, width=width)


def _transform(points, sx, sy, angle, cx, cy):
    """Scale unit-shape points, rotate by `angle`, translate to (cx, cy)."""
    p = np.asarray(points, dtype=np.float64) * np.array([sx, sy])
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    p = p @ rot.T + np.array([cx, cy])
    return [tuple(v) for v in p]


def _regular(k, radius=1.0, start=-math.pi / 2):
    return [(radius * math.cos(start + 2 * math.pi * j / k), radius * math.sin(start + 2 * math.pi * j / k)) for j in range(k)]


def _star(points, inner):
    return [
        ((1.0 if j % 2 == 0 else inner) * math.cos(-math.pi / 2 + j * math.pi / points),
         (1.0 if j % 2 == 0 else inner) * math.sin(-math.pi / 2 + j * math.pi / points))
        for j in range(2 * points)
    ]


def _heart(n=40):
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3 / 17
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) / 17 + 0.15
    return list(zip(x, y))


# The CROWDED classes beyond the first six: (log-aspect range, rotation range or None for upright,
# outline). An outline maps the image's generator to polygons in the unit box [-1, 1]^2, each with its
# fill (0 cuts a hole), drawn in order.
_CROWDED_SHAPES = {
    "pentagon": ((-0.15, 0.15), (0, 2 * math.pi), lambda rng: [(_regular(5), 255)]),
    "hexagon": ((-0.15, 0.15), (0, 2 * math.pi), lambda rng: [(_regular(6), 255)]),
    "octagon": ((-0.15, 0.15), (0, 2 * math.pi), lambda rng: [(_regular(8), 255)]),
    "diamond": ((-0.6, -0.35), (-math.pi / 12, math.pi / 12), lambda rng: [([(0, -1), (1, 0), (0, 1), (-1, 0)], 255)]),
    "rectangle": ((0.7, 1.1), (-math.pi / 9, math.pi / 9), lambda rng: [([(-1, -1), (1, -1), (1, 1), (-1, 1)], 255)]),
    "ellipse": ((0.7, 1.0), (0, math.pi), lambda rng: [(_regular(32), 255)]),
    "semicircle": ((-0.1, 0.1), (0, 2 * math.pi),
                   lambda rng: [([(math.cos(a), 1 + 2 * math.sin(a)) for a in np.linspace(math.pi, 2 * math.pi, 17)], 255)]),
    "crescent": ((-0.1, 0.1), (0, 2 * math.pi),
                 lambda rng: [(_regular(32), 255), ([(x + rng.uniform(0.45, 0.7), y) for x, y in _regular(32, 0.9)], 0)]),
    "arrow": ((0.2, 0.5), (0, 2 * math.pi),
              lambda rng: [([(-1, -0.3), (0.2, -0.3), (0.2, -0.8), (1, 0), (0.2, 0.8), (0.2, 0.3), (-1, 0.3)], 255)]),
    "heart": ((-0.1, 0.1), (-math.pi / 6, math.pi / 6), lambda rng: [(_heart(), 255)]),
    "l_shape": ((-0.2, 0.2), (0, 2 * math.pi),
                lambda rng: [([(-1, -1), (-0.3, -1), (-0.3, 0.4), (1, 0.4), (1, 1), (-1, 1)], 255)]),
    "t_shape": ((-0.2, 0.2), (0, 2 * math.pi),
                lambda rng: [([(-1, -1), (1, -1), (1, -0.4), (0.3, -0.4), (0.3, 1), (-0.3, 1), (-0.3, -0.4), (-1, -0.4)], 255)]),
    "frame": ((-0.2, 0.2), (-math.pi / 9, math.pi / 9),
              lambda rng: [([(-1, -1), (1, -1), (1, 1), (-1, 1)], 255),
                           ([(x * r, y * r) for r in [rng.uniform(0.5, 0.7)] for x, y in [(-1, -1), (1, -1), (1, 1), (-1, 1)]], 0)]),
    "chevron": ((-0.2, 0.2), (0, 2 * math.pi),
                lambda rng: [([(-1, -1), (-0.45, -1), (0, 0.1), (0.45, -1), (1, -1), (0, 1)], 255)]),
    "hourglass": ((-0.2, 0.2), (-math.pi / 9, math.pi / 9),
                  lambda rng: [([(-1, -1), (1, -1), (0.12, 0), (1, 1), (-1, 1), (-0.12, 0)], 255)]),
    "star6": ((-0.15, 0.15), (0, 2 * math.pi), lambda rng: [(_star(6, rng.uniform(0.5, 0.6)), 255)]),
    "trapezoid": ((-0.3, 0.0), (0, 2 * math.pi), lambda rng: [([(-0.5, -1), (0.5, -1), (1, 1), (-1, 1)], 255)]),
}


def _shape_mask(rng, name, w, h, size):
    """Draw one object of class `name` with extent about `size` px.

    Returns (x0, y0, mask): a bool mask of the object's window whose top-left pixel is (x0, y0)
    in the image, or None if the object does not fit.
    """
    extra = _CROWDED_SHAPES.get(name)
    # Per-class aspect range: squares and circles stay roughly isotropic so they read as such.
    if extra is not None:
        aspect = math.exp(rng.uniform(*extra[0]))
    elif name in ("circle", "square", "ring"):
        aspect = math.exp(rng.uniform(-0.2, 0.2))
    else:
        aspect = math.exp(rng.uniform(-0.35, 0.35))
    sx, sy = size * math.sqrt(aspect) / 2, size / math.sqrt(aspect) / 2  # half extents
    if extra is not None:
        angle = rng.uniform(*extra[1])
    elif name in ("square", "cross"):
        angle = rng.uniform(-math.pi / 9, math.pi / 9)
    elif name in ("circle", "ring"):
        angle = 0.0
    else:
        angle = rng.uniform(0, 2 * math.pi)
    reach = math.hypot(sx, sy) if angle else max(sx, sy)
    if 2 * reach + 4 > min(w, h):
        return None
    cx = rng.uniform(reach + 1, w - reach - 1)
    cy = rng.uniform(reach + 1, h - reach - 1)
    # Draw in a local window around the object; (lx, ly) is the centre in window coordinates.
    wx0, wy0 = max(int(cx - reach) - 1, 0), max(int(cy - reach) - 1, 0)
    wx1, wy1 = min(int(math.ceil(cx + reach)) + 2, w), min(int(math.ceil(cy + reach)) + 2, h)
    lx, ly = cx - wx0, cy - wy0

    mask = Image.new("L", (wx1 - wx0, wy1 - wy0), 0)
    d = ImageDraw.Draw(mask)
    if name == "circle":
        d.ellipse([lx - sx, ly - sy, lx + sx, ly + sy], fill=255)
    elif name == "ring":
        d.ellipse([lx - sx, ly - sy, lx + sx, ly + sy], fill=255)
        r = rng.uniform(0.45, 0.65)
        d.ellipse([lx - r * sx, ly - r * sy, lx + r * sx, ly + r * sy], fill=0)
    elif name == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        d.polygon(_transform(pts, sx, sy, angle, lx, ly), fill=255)
    elif name == "triangle":
        pts = [
            (math.cos(a), math.sin(a))
            for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6) + rng.uniform(-0.25, 0.25, 3)
        ]
        d.polygon(_transform(pts, sx, sy, angle, lx, ly), fill=255)
    elif name == "star":
        inner = rng.uniform(0.38, 0.5)
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            r = 1.0 if k % 2 == 0 else inner
            pts.append((r * math.cos(a), r * math.sin(a)))
        d.polygon(_transform(pts, sx, sy, angle, lx, ly), fill=255)
    elif name == "cross":
        t = rng.uniform(0.28, 0.4)
        pts = [
            (-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t),
            (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t),
        ]
        d.polygon(_transform(pts, sx, sy, angle, lx, ly), fill=255)
    else:
        for points, fill in extra[2](rng):
            d.polygon(_transform(points, sx, sy, angle, lx, ly), fill=fill)
    m = np.asarray(mask) > 127
    return (wx0, wy0, m) if m.any() else None


def _contrasting_colour(rng, bg_mean):
    best, best_d = None, -1.0
    for _ in range(12):
        c = rng.integers(0, 256, 3)
        dist = float(np.abs(c - bg_mean).sum())
        if dist > 150:
            return c
        if dist > best_d:
            best, best_d = c, dist
    return best


def _noise_tile(seed):
    """A fixed 512x512x3 tile of Gaussian pixel noise (std 1, scaled per image by an int)."""
    rng = np.random.default_rng([seed, 7919])
    return np.round(rng.standard_normal((512, 512, 3), dtype=np.float32) * 2).astype(np.int16)


def _object_count(rng, style, max_objects):
    if style.count_probs is not None:
        probs = np.array(style.count_probs[: max_objects + 1], dtype=np.float64)
        return int(rng.choice(len(probs), p=probs / probs.sum()))
    return min(int(round(rng.lognormal(*style.count_lognormal))), max_objects)


def _object_class(rng, style):
    if style.class_weights is None:
        return int(rng.integers(len(style.classes)))
    weights = np.asarray(style.class_weights, dtype=np.float64)
    return int(rng.choice(len(weights), p=weights / weights.sum()))


def _object_extent(rng, style):
    """The object's extent as a fraction of the image's shorter side."""
    if len(style.size_buckets) == 1:
        low, high, _ = style.size_buckets[0]
    else:
        probs = np.array([p for _, _, p in style.size_buckets], dtype=np.float64)
        low, high, _ = style.size_buckets[int(rng.choice(len(probs), p=probs / probs.sum()))]
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _draw_distractors(rng, arr, style):
    """Unlabelled irregular blobs (random star-shaped polygons) drawn into `arr` under the objects."""
    h, w = arr.shape[:2]
    img = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(style.distractors[0], style.distractors[1] + 1))):
        k = int(rng.integers(7, 14))
        radius = min(w, h) * rng.uniform(0.03, 0.2) * rng.uniform(0.4, 1.0, k)
        angles = np.sort(rng.uniform(0, 2 * math.pi, k))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        points = [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radius, angles)]
        draw.polygon(points, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return np.asarray(img).astype(np.int16)


def _draw_image(rng, w, h, max_objects, noise_tile, style=None):
    """Return (PIL image, list of (class, x0, y0, x1, y1, area)) for one image."""
    style = SHAPES if style is None else style
    img = _background(rng, w, h)
    arr = np.asarray(img).astype(np.int16)
    if style.distractors[1] > 0:
        arr = _draw_distractors(rng, arr, style)
    n = _object_count(rng, style, max_objects)
    owner = np.full((h, w), -1, dtype=np.int16)
    objects = []  # (cls, x0, y0, local mask, full area)
    visible = []  # pixels of each object still visible
    side = min(w, h)
    for _ in range(n):
        for _attempt in range(20):
            cls = _object_class(rng, style)
            size = side * _object_extent(rng, style)
            drawn = _shape_mask(rng, style.classes[cls], w, h, size)
            if drawn is None:
                continue
            x0, y0, m = drawn
            win = (slice(y0, y0 + m.shape[0]), slice(x0, x0 + m.shape[1]))
            # Keep every earlier object mostly visible.
            under = owner[win][m]
            covered = np.bincount(under[under >= 0], minlength=len(objects)) if (under >= 0).any() else None
            if covered is not None and any(
                covered[k] and visible[k] - covered[k] < style.min_visible * area
                for k, (_, _, _, _, area) in enumerate(objects)
            ):
                continue
            region = arr[win]
            colour = _contrasting_colour(rng, region[m].mean(axis=0))
            region[m] = colour
            owner[win][m] = len(objects)
            if covered is not None:
                visible = [v - int(c) for v, c in zip(visible, covered)]
            objects.append((cls, x0, y0, m, int(np.count_nonzero(m))))
            visible.append(objects[-1][4])
            break
    img = Image.fromarray(arr.astype(np.uint8))
    # Moderate clutter on top: a few thin lines and pixel noise over everything.
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 3))):
        _random_line(rng, draw, w, h, width=1)
    ox = int(rng.integers(0, noise_tile.shape[1] - w + 1))
    oy = int(rng.integers(0, noise_tile.shape[0] - h + 1))
    scale = int(rng.integers(1, 5))  # noise std 2..8
    noisy = np.asarray(img).astype(np.int16) + scale * noise_tile[oy : oy + h, ox : ox + w]
    img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))

    annos = []
    for cls, x0, y0, m, area in objects:
        ys = np.flatnonzero(m.any(axis=1))
        xs = np.flatnonzero(m.any(axis=0))
        annos.append(
            (cls, x0 + int(xs[0]), y0 + int(ys[0]), x0 + int(xs[-1]) + 1, y0 + int(ys[-1]) + 1, area)
        )
    return img, annos


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------
def _style(style):
    if isinstance(style, SyntheticStyle):
        return style
    if style not in STYLES:
        raise ValueError(f"unknown synthetic dataset style {style!r}; known: {sorted(STYLES)}")
    return STYLES[style]


def _resolve(style, split, num_images, min_side, max_side, max_objects):
    """The split's generator parameters, the style's defaults filling the Nones (checked)."""
    style = _style(style)
    if num_images is None:
        sizes = dict(style.split_sizes)
        if split not in sizes:
            raise ValueError(f"split {split!r} of the {style.name} style has no default size: give num_images")
        num_images = sizes[split]
    min_side = style.image_sides[0] if min_side is None else min_side
    max_side = style.image_sides[1] if max_side is None else max_side
    max_objects = style.max_objects if max_objects is None else max_objects
    most = len(style.count_probs) - 1 if style.count_probs is not None else style.max_objects
    if not 1 <= max_objects <= most:
        raise ValueError(f"max_objects must be in [1, {most}], got {max_objects}")
    if min_side < 64 or max_side < min_side:
        raise ValueError(f"bad image side range [{min_side}, {max_side}]")
    if max_side > 512:
        raise ValueError(f"max_side must be at most 512, got {max_side}")
    return style, int(num_images), int(min_side), int(max_side), int(max_objects)


def _split_params(style, split, num_images, seed, min_side, max_side, max_objects):
    params = {
        "version": GENERATOR_VERSION,
        "split": split,
        "num_images": int(num_images),
        "seed": int(seed),
        "min_side": int(min_side),
        "max_side": int(max_side),
        "max_objects": int(max_objects),
    }
    if style is not SHAPES:  # the quickstart's splits keep the meta.json they were made with
        params["style"] = style.name
    return params


def generate_split(
    out_dir, split="train", num_images=None, seed=0, min_side=None, max_side=None, max_objects=None, style="shapes"
):
    """Write one split (images/ + instances.json + meta.json) into `out_dir` (no atomicity).

    Deterministic: the same arguments give the same JSON byte for byte. None takes the style's default.
    """
    style, num_images, min_side, max_side, max_objects = _resolve(style, split, num_images, min_side, max_side, max_objects)
    params = _split_params(style, split, num_images, seed, min_side, max_side, max_objects)
    split_id = _SPLIT_IDS.get(split, sum(split.encode()) + 16)
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)

    noise_tile = _noise_tile(seed)
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, split_id, i])
        w = int(rng.integers(min_side, max_side + 1))
        h = int(rng.integers(min_side, max_side + 1))
        img, annos = _draw_image(rng, w, h, max_objects, noise_tile, style)
        file_name = f"{i + 1:06d}.jpg"
        img.save(os.path.join(image_dir, file_name), quality=92)
        images.append({"id": i + 1, "file_name": file_name, "width": w, "height": h})
        for cls, x0, y0, x1, y1, area in annos:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": cls + 1,
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "area": float(area),
                    "iscrowd": 0,
                }
            )
    kind = "shapes" if style is SHAPES else f"{style.name} shapes"
    coco = {
        "info": {
            "description": f"HybridDETR synthetic {kind}, split {split}",
            "version": str(GENERATOR_VERSION),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(style.classes)
        ],
    }
    with open(os.path.join(out_dir, "instances.json"), "w") as f:
        json.dump(coco, f)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(params, f, sort_keys=True)
    return params


def _is_current(split_dir, params):
    try:
        with open(os.path.join(split_dir, "meta.json")) as f:
            return json.load(f) == params and os.path.isfile(
                os.path.join(split_dir, "instances.json")
            )
    except (OSError, ValueError):
        return False


def ensure_split(
    root=None,
    split="train",
    num_images=None,
    seed=0,
    min_side=None,
    max_side=None,
    max_objects=None,
    style="shapes",
    folder=None,
):
    """Generate the split under `root` unless an identical one is there; return its JSON path.

    `folder`: the split's folder name (default: `split`): a split drawn from the `split` image stream
    but of another size can live beside the default one.
    Safe when several processes race: each builds in its own temporary folder and renames it into
    place; a process that loses the race drops its copy. A split made with other parameters (or
    an older generator) is replaced.
    """
    root = default_datasets_root() if root is None else root
    style, num_images, min_side, max_side, max_objects = _resolve(style, split, num_images, min_side, max_side, max_objects)
    params = _split_params(style, split, num_images, seed, min_side, max_side, max_objects)
    split_dir, json_file, _ = synthetic_split_paths(root, folder or split, style)
    if _is_current(split_dir, params):
        return json_file
    parent = os.path.dirname(split_dir)
    os.makedirs(parent, exist_ok=True)
    for _ in range(3):
        tmp = tempfile.mkdtemp(prefix=f".{split}.tmp-", dir=parent)
        try:
            start = time.perf_counter()
            generate_split(tmp, split, num_images, seed, min_side, max_side, max_objects, style)
            logger.info(
                "Generated synthetic split '%s' (%d images) in %.1fs under %s",
                split, num_images, time.perf_counter() - start, split_dir,
            )
            if _is_current(split_dir, params):  # another process won meanwhile
                return json_file
            if os.path.exists(split_dir):  # stale: made by other parameters / generator version
                trash = tempfile.mkdtemp(prefix=f".{split}.old-", dir=parent)
                try:
                    os.rename(split_dir, os.path.join(trash, "old"))
                except OSError:
                    pass
                shutil.rmtree(trash, ignore_errors=True)
            try:
                os.rename(tmp, split_dir)
            except OSError:
                pass  # lost the race: someone else's split is in place
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if _is_current(split_dir, params):
            return json_file
    raise RuntimeError(f"Could not create the synthetic split '{split}' under {split_dir}")


def dataset_statistics(json_file):
    """What a COCO-format split holds: images, objects per image (mean, median, largest, share of images
    without objects and with more than 20), the small / medium / large shares of objects (COCO's
    thresholds scaled to each image: area below 32^2 / 96^2 of a 640x480 image's area) and the class
    frequencies."""
    with open(json_file) as f:
        coco = json.load(f)
    per_image = {img["id"]: 0 for img in coco["images"]}
    image_area = {img["id"]: img["width"] * img["height"] for img in coco["images"]}
    scale = {"small": 0, "medium": 0, "large": 0}
    per_class = {c["id"]: 0 for c in coco["categories"]}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]] += 1
        per_class[ann["category_id"]] += 1
        rel = ann["bbox"][2] * ann["bbox"][3] / image_area[ann["image_id"]]
        scale["small" if rel < 32**2 / (640 * 480) else "medium" if rel < 96**2 / (640 * 480) else "large"] += 1
    counts = np.array(list(per_image.values()))
    total = max(int(counts.sum()), 1)
    return {
        "images": len(counts),
        "objects": int(counts.sum()),
        "objects_per_image_mean": float(counts.mean()),
        "objects_per_image_median": float(np.median(counts)),
        "objects_per_image_max": int(counts.max()),
        "images_without_objects": float((counts == 0).mean()),
        "images_over_20_objects": float((counts > 20).mean()),
        "scale_shares": {k: v / total for k, v in scale.items()},
        "class_counts": [per_class[c["id"]] for c in coco["categories"]],
    }
