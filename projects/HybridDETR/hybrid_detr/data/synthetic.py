"""The embedded default dataset: synthetic shapes on cluttered backgrounds, in COCO format.

Images are generated deterministically (a fixed seed per split, one random generator per image)
the first time a split is needed, and written under
``$DETECTRON2_DATASETS/hybrid_synthetic/<split>/`` (default ``datasets/``, relative to the
working directory, as detectron2's builtin datasets)::

    hybrid_synthetic/train/instances.json   COCO JSON: images, annotations (bbox XYWH), categories
    hybrid_synthetic/train/meta.json        the generator parameters the split was made with
    hybrid_synthetic/train/images/000001.jpg ...

A split is built in a temporary folder next to its final place and renamed into place, so two
processes racing to create it never see a half-written split; the loser discards its copy.

Classes differ by shape only: colours are drawn at random for every object and background, so
a detector has to look at the outline. Objects span 10%-45% of the image's shorter side, may
partly cover each other (each keeps at least 70% of its pixels visible), and the box is always
the object's full extent.
"""
import json
import logging
import math
import os
import shutil
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

__all__ = [
    "SYNTHETIC_CLASSES",
    "GENERATOR_VERSION",
    "DEFAULT_SPLIT_SIZES",
    "generate_split",
    "ensure_split",
    "synthetic_split_paths",
    "default_datasets_root",
]

SYNTHETIC_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")
# Bump when the drawing code changes: splits made by another version are regenerated.
GENERATOR_VERSION = 1
DEFAULT_SPLIT_SIZES = {"train": 2000, "val": 200}
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
DATASET_DIRNAME = "hybrid_synthetic"

# Probability of 0, 1, 2, ... objects in an image (truncated to max_objects).
_COUNT_PROBS = (0.06, 0.22, 0.24, 0.20, 0.16, 0.12)
_MIN_VISIBLE = 0.7  # fraction of an object's pixels that must stay visible after occlusion
_MIN_REL_SIZE, _MAX_REL_SIZE = 0.10, 0.45  # object extent / image shorter side


def default_datasets_root():
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def synthetic_split_paths(root, split):
    """(split_dir, json_file, image_root) of a split under `root`."""
    split_dir = os.path.join(root, DATASET_DIRNAME, split)
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


def _shape_mask(rng, cls, w, h, size):
    """Draw one object of class `cls` with extent about `size` px.

    Returns (x0, y0, mask): a bool mask of the object's window whose top-left pixel is (x0, y0)
    in the image, or None if the object does not fit.
    """
    name = SYNTHETIC_CLASSES[cls]
    # Per-class aspect range: squares and circles stay roughly isotropic so they read as such.
    if name in ("circle", "square", "ring"):
        aspect = math.exp(rng.uniform(-0.2, 0.2))
    else:
        aspect = math.exp(rng.uniform(-0.35, 0.35))
    sx, sy = size * math.sqrt(aspect) / 2, size / math.sqrt(aspect) / 2  # half extents
    if name in ("square", "cross"):
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


def _draw_image(rng, w, h, max_objects, noise_tile):
    """Return (PIL image, list of (class, x0, y0, x1, y1, area)) for one image."""
    img = _background(rng, w, h)
    arr = np.asarray(img).astype(np.int16)
    probs = np.array(_COUNT_PROBS[: max_objects + 1], dtype=np.float64)
    n = int(rng.choice(len(probs), p=probs / probs.sum()))
    owner = np.full((h, w), -1, dtype=np.int16)
    objects = []  # (cls, x0, y0, local mask, full area)
    side = min(w, h)
    for _ in range(n):
        for _attempt in range(20):
            cls = int(rng.integers(len(SYNTHETIC_CLASSES)))
            size = side * math.exp(rng.uniform(math.log(_MIN_REL_SIZE), math.log(_MAX_REL_SIZE)))
            drawn = _shape_mask(rng, cls, w, h, size)
            if drawn is None:
                continue
            x0, y0, m = drawn
            win = (slice(y0, y0 + m.shape[0]), slice(x0, x0 + m.shape[1]))
            # Keep every earlier object mostly visible.
            under = owner[win][m]
            ok = True
            if (under >= 0).any():
                covered = np.bincount(under[under >= 0], minlength=len(objects))
                for k, (_, _, _, _, area) in enumerate(objects):
                    if covered[k] and np.count_nonzero(owner == k) - covered[k] < _MIN_VISIBLE * area:
                        ok = False
                        break
            if not ok:
                continue
            region = arr[win]
            colour = _contrasting_colour(rng, region[m].mean(axis=0))
            region[m] = colour
            owner[win][m] = len(objects)
            objects.append((cls, x0, y0, m, int(np.count_nonzero(m))))
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
def _split_params(split, num_images, seed, min_side, max_side, max_objects):
    return {
        "version": GENERATOR_VERSION,
        "split": split,
        "num_images": int(num_images),
        "seed": int(seed),
        "min_side": int(min_side),
        "max_side": int(max_side),
        "max_objects": int(max_objects),
    }


def generate_split(
    out_dir, split="train", num_images=None, seed=0, min_side=256, max_side=320, max_objects=5
):
    """Write one split (images/ + instances.json + meta.json) into `out_dir` (no atomicity).

    Deterministic: the same arguments give the same JSON byte for byte.
    """
    if num_images is None:
        num_images = DEFAULT_SPLIT_SIZES[split]
    if not 1 <= max_objects <= len(_COUNT_PROBS) - 1:
        raise ValueError(f"max_objects must be in [1, {len(_COUNT_PROBS) - 1}], got {max_objects}")
    if min_side < 64 or max_side < min_side:
        raise ValueError(f"bad image side range [{min_side}, {max_side}]")
    params = _split_params(split, num_images, seed, min_side, max_side, max_objects)
    split_id = _SPLIT_IDS.get(split, sum(split.encode()) + 16)
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)

    if max_side > 512:
        raise ValueError(f"max_side must be at most 512, got {max_side}")
    noise_tile = _noise_tile(seed)
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, split_id, i])
        w = int(rng.integers(min_side, max_side + 1))
        h = int(rng.integers(min_side, max_side + 1))
        img, annos = _draw_image(rng, w, h, max_objects, noise_tile)
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
    coco = {
        "info": {
            "description": f"HybridDETR synthetic shapes, split {split}",
            "version": str(GENERATOR_VERSION),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(SYNTHETIC_CLASSES)
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
    min_side=256,
    max_side=320,
    max_objects=5,
):
    """Generate the split under `root` unless an identical one is there; return its JSON path.

    Safe when several processes race: each builds in its own temporary folder and renames it into
    place; a process that loses the race drops its copy. A split made with other parameters (or
    an older generator) is replaced.
    """
    root = default_datasets_root() if root is None else root
    if num_images is None:
        num_images = DEFAULT_SPLIT_SIZES[split]
    params = _split_params(split, num_images, seed, min_side, max_side, max_objects)
    split_dir, json_file, _ = synthetic_split_paths(root, split)
    if _is_current(split_dir, params):
        return json_file
    parent = os.path.dirname(split_dir)
    os.makedirs(parent, exist_ok=True)
    for _ in range(3):
        tmp = tempfile.mkdtemp(prefix=f".{split}.tmp-", dir=parent)
        try:
            start = time.perf_counter()
            generate_split(tmp, split, num_images, seed, min_side, max_side, max_objects)
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
