"""Checks of datasets, so that broken data fails loudly, naming the dataset, file, image id and
problem, before the first training step (instead of a traceback from inside detectron2 or
pycocotools, a hang in a data-loader worker, or a silently wrong loss).

- `validate_coco_json`: the JSON file exists, parses, has images / annotations / categories,
  unique image ids, annotations pointing at existing images and categories;
- `validate_dataset_dicts`: image sizes, finite boxes of positive size inside the image (a box
  sticking out by at most 10% of the side is clipped by the mapper, with one warning per
  dataset; further out is refused), category ids in [0, num_classes), unique image ids;
- `check_image_files`: every image exists, is a readable image of the size the annotations say,
  and is not truncated (checked in parallel over the distributed workers).

`hybrid_detr.data.checked.load_checked_dataset_dicts` runs all of them on a registered dataset. This
module knows no registry (it is imported by `registration`, never the other way round).
"""
import json
import logging
import math
import numbers
import os

from PIL import Image

from detectron2.structures import BoxMode
from detectron2.utils import comm

__all__ = ["check_image_files", "validate_coco_json", "validate_dataset_dicts"]

logger = logging.getLogger(__name__)

# A box may stick out of the image by this fraction of the image side (rounding, loose labels).
_OUTSIDE_TOLERANCE = 0.1


def _fail(dataset_name, record, problem):
    file_name = record.get("file_name", f"<image_id {record.get('image_id', '?')}>")
    raise ValueError(f"Dataset '{dataset_name}', image '{file_name}': {problem}")


def validate_dataset_dicts(dataset_dicts, num_classes, dataset_name):
    """Raise ValueError naming the dataset, the image file and the problem for broken records.

    Checked: image height/width present and positive; every annotation's bbox has 4 finite
    numbers, non-negative width/height, lies within the image up to 10% of its side, and its
    category_id is an int in [0, num_classes), image ids are unique. Images without annotations
    are valid. Boxes sticking out of the image (within the tolerance) are counted in one warning.
    """
    seen_ids, clipped, clipped_example = {}, 0, None
    for record in dataset_dicts:
        h, w = record.get("height"), record.get("width")
        if h is None or w is None:
            _fail(dataset_name, record, "missing image size ('height'/'width')")
        if not (isinstance(h, (int, float)) and isinstance(w, (int, float)) and h > 0 and w > 0):
            _fail(dataset_name, record, f"invalid image size height={h!r} width={w!r}")
        tol_x, tol_y = _OUTSIDE_TOLERANCE * w, _OUTSIDE_TOLERANCE * h
        for j, anno in enumerate(record.get("annotations", ()) or ()):
            bbox = anno.get("bbox")
            if bbox is None or len(bbox) != 4:
                _fail(dataset_name, record, f"annotation {j}: bbox {bbox!r} is not 4 numbers")
            try:
                vals = [float(v) for v in bbox]
            except (TypeError, ValueError):
                _fail(dataset_name, record, f"annotation {j}: bbox {bbox!r} is not numeric")
            if not all(math.isfinite(v) for v in vals):
                _fail(dataset_name, record, f"annotation {j}: bbox {bbox!r} is not finite")
            mode = anno.get("bbox_mode", BoxMode.XYWH_ABS)
            if mode == BoxMode.XYWH_ABS:
                x0, y0, bw, bh = vals
                x1, y1 = x0 + bw, y0 + bh
            elif mode == BoxMode.XYXY_ABS:
                x0, y0, x1, y1 = vals
                bw, bh = x1 - x0, y1 - y0
            else:
                _fail(dataset_name, record, f"annotation {j}: unsupported bbox_mode {mode!r}")
            if bw < 0 or bh < 0:
                _fail(
                    dataset_name, record,
                    f"annotation {j}: bbox {bbox!r} has negative size ({bw:g} x {bh:g})",
                )
            if bw == 0 or bh == 0:
                _fail(dataset_name, record, f"annotation {j}: bbox {bbox!r} has zero size ({bw:g} x {bh:g})")
            if x0 < -tol_x or y0 < -tol_y or x1 > w + tol_x or y1 > h + tol_y:
                _fail(
                    dataset_name, record,
                    f"annotation {j}: bbox {bbox!r} (XYXY {x0:g},{y0:g},{x1:g},{y1:g}) is far "
                    f"outside the {w}x{h} image",
                )
            if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
                clipped += 1
                clipped_example = clipped_example or (record.get("file_name"), j, bbox)
            cat = anno.get("category_id")
            if isinstance(cat, bool) or not isinstance(cat, numbers.Integral) or not 0 <= cat < num_classes:
                _fail(
                    dataset_name, record,
                    f"annotation {j}: category_id {cat!r} is out of range [0, {num_classes})",
                )
        image_id = record.get("image_id")
        if image_id is not None:
            if image_id in seen_ids:
                _fail(dataset_name, record, f"duplicate image_id {image_id!r} (also used by '{seen_ids[image_id]}')")
            seen_ids[image_id] = record.get("file_name", "?")
    if clipped:
        logger.warning(
            f"Dataset '{dataset_name}': {clipped} boxes stick out of their image (by at most "
            f"{_OUTSIDE_TOLERANCE:.0%} of its side) and are clipped to it; e.g. '{clipped_example[0]}' "
            f"annotation {clipped_example[1]} bbox {clipped_example[2]}"
        )


def _json_fail(dataset_name, json_file, problem):
    raise ValueError(f"Dataset '{dataset_name}', annotation file '{json_file}': {problem}")


def validate_coco_json(json_file, dataset_name):
    """Check a COCO-format annotation file; return its parsed content."""
    if not os.path.isfile(json_file):
        _json_fail(dataset_name, json_file, "file not found")
    try:
        with open(json_file) as f:
            coco = json.load(f)
    except json.JSONDecodeError as e:
        _json_fail(dataset_name, json_file, f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})")
    except (OSError, UnicodeDecodeError) as e:
        _json_fail(dataset_name, json_file, f"cannot be read ({e})")
    if not isinstance(coco, dict):
        _json_fail(dataset_name, json_file, f"expected a JSON object, got {type(coco).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            _json_fail(dataset_name, json_file, f"missing or non-list key '{key}'")
    if not coco["images"]:
        _json_fail(dataset_name, json_file, "empty dataset: 'images' is empty")
    categories = set()
    for c in coco["categories"]:
        if not isinstance(c, dict) or "id" not in c:
            _json_fail(dataset_name, json_file, f"category {c!r} has no 'id'")
        categories.add(c["id"])
    images = {}
    for im in coco["images"]:
        if not isinstance(im, dict):
            _json_fail(dataset_name, json_file, f"image entry {im!r} is not an object")
        missing = [k for k in ("id", "file_name", "height", "width") if k not in im]
        if missing:
            _json_fail(dataset_name, json_file, f"image {im.get('id', im.get('file_name', '?'))!r} lacks {missing}")
        if im["id"] in images:
            _json_fail(
                dataset_name, json_file,
                f"duplicate image id {im['id']!r} ('{images[im['id']]}' and '{im['file_name']}')",
            )
        images[im["id"]] = im["file_name"]
    ann_ids = set()
    for a in coco["annotations"]:
        if not isinstance(a, dict):
            _json_fail(dataset_name, json_file, f"annotation entry {a!r} is not an object")
        missing = [k for k in ("image_id", "bbox", "category_id") if k not in a]
        if missing:
            _json_fail(dataset_name, json_file, f"annotation {a.get('id', '?')!r} lacks {missing}")
        if a["image_id"] not in images:
            _json_fail(
                dataset_name, json_file, f"annotation {a.get('id')!r} names image id {a['image_id']!r}, not in 'images'"
            )
        if a["category_id"] not in categories:
            _json_fail(
                dataset_name, json_file,
                f"annotation {a.get('id')!r} of image id {a['image_id']!r} ('{images[a['image_id']]}') has "
                f"category_id {a['category_id']!r}, not in 'categories' {sorted(categories)}",
            )
        if "id" in a:
            if a["id"] in ann_ids:
                _json_fail(dataset_name, json_file, f"duplicate annotation id {a['id']!r}")
            ann_ids.add(a["id"])
    return coco


def _image_problem(record):
    """None if the image of `record` is usable, else what is wrong with it."""
    path = record.get("file_name")
    if not path or not os.path.isfile(path):
        return "image file not found"
    try:
        with Image.open(path) as im:
            size = im.size  # (w, h) from the header
            fmt = im.format
            if not _complete(path, fmt):
                im.load()  # the marker check failed: decode to be sure
    except (OSError, SyntaxError, ValueError) as e:
        return f"unreadable or truncated image ({e})"
    w, h = record.get("width"), record.get("height")
    if w is not None and h is not None and size not in ((w, h), (h, w)):  # (h, w): EXIF rotation
        return f"image is {size[0]}x{size[1]} but the annotations say {w}x{h}"
    return None


def _complete(path, fmt):
    """Cheap end-of-file check: JPEG ends with EOI (FFD9), PNG with an IEND chunk."""
    if fmt not in ("JPEG", "PNG"):
        return True
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(f.tell() - 32, 0))
        tail = f.read()
    if fmt == "JPEG":
        return tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
    return b"IEND" in tail


def check_image_files(dataset_dicts, dataset_name):
    """Raise ValueError naming the first bad image (file, image id, problem), on every worker.

    Each of the distributed workers checks its share of the images."""
    rank, world = comm.get_rank(), comm.get_world_size()
    problem = None
    for record in dataset_dicts[rank::world]:
        what = _image_problem(record)
        if what:
            problem = (
                f"Dataset '{dataset_name}', image '{record.get('file_name')}' "
                f"(image_id {record.get('image_id')!r}): {what}"
            )
            break
    problems = comm.all_gather(problem) if world > 1 else [problem]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(problems[0])
