"""Checks of datasets, so that broken data fails loudly, naming the dataset, file, image id and
problem, before the first training step (instead of a traceback from inside detectron2 or
pycocotools, a hang in a data-loader worker, or a silently wrong loss).

- `validate_coco_json`: the JSON file exists (and is not a git-LFS pointer), parses, has images /
  categories (and annotations, unless `require_annotations=False`: a test-dev style file of images
  only, which detectron2 loads without objects and COCOEvaluator evaluates by writing the
  predictions only), unique image and category ids, annotations pointing at existing images and
  categories, boxes that are 4 numbers;
- `validate_dataset_dicts`: image sizes, finite boxes of positive size inside the image (a box
  sticking out by at most 10% of the side is clipped by the mapper, with one warning per
  dataset; further out is refused), category ids in [0, num_classes), unique image ids;
- `check_image_files`: every image exists, is a readable image of the size the annotations say
  (after its EXIF orientation, as detectron2's mapper reads it), not a decompression bomb, with
  pixels the mapper can read (`image_io`). Small datasets are decoded in full (truncated and
  corrupt files found here), large ones only have their headers read (the mapper then checks
  each file as it decodes it). Several threads, and the distributed workers, share the files.

`hybrid_detr.data.checked.load_checked_dataset_dicts` runs all of them on a registered dataset. This
module knows no registry (it is imported by `registration`, never the other way round).
"""
import concurrent.futures
import json
import logging
import math
import numbers
import os
import time

from detectron2.structures import BoxMode
from detectron2.utils import comm

from .image_io import LFS_POINTER_PREFIX, image_file_problem, lfs_pointer_problem

__all__ = ["check_image_files", "validate_coco_json", "validate_dataset_dicts", "FULL_DECODE_MAX_IMAGES"]

logger = logging.getLogger(__name__)

# A box may stick out of the image by this fraction of the image side (rounding, loose labels).
_OUTSIDE_TOLERANCE = 0.1


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_four_numbers(bbox):
    """A list, tuple or array of 4 numbers (not a string like "1,2,3,4", nor numbers as strings)."""
    return (
        not isinstance(bbox, (str, bytes)) and hasattr(bbox, "__len__") and len(bbox) == 4
        and all(_is_number(v) for v in bbox)
    )


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
            if not _is_four_numbers(bbox):
                _fail(dataset_name, record, f"annotation {j}: bbox {bbox!r} is not 4 numbers")
            vals = [float(v) for v in bbox]
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


def _annotation_name(annotation, images):
    """'annotation 7 of image id 3 ('3.jpg')', how errors name an annotation."""
    image_id = annotation.get("image_id")
    file_name = images.get(image_id) if _is_id(image_id) else None
    where = f" ('{file_name}')" if file_name is not None else ""
    return f"annotation {annotation.get('id', '?')!r} of image id {image_id!r}{where}"


def _is_id(value):
    """An image / category / annotation id: a number or a string (what can key a dict, as ids do)."""
    return isinstance(value, (numbers.Number, str))


def _check_categories(categories, fail):
    """The category ids; two entries with one id are refused (detectron2 would count both as
    classes, shifting every label after them)."""
    names = {}
    for c in categories:
        if not isinstance(c, dict) or "id" not in c:
            fail(f"category {c!r} has no 'id'")
        cid = c["id"]
        if isinstance(cid, bool) or not isinstance(cid, (numbers.Integral, str)):
            fail(f"category {c!r}: its id must be an integer")
        name = c.get("name")
        if cid in names:
            if names[cid] == name:
                fail(f"category id {cid!r} ({name!r}) is listed twice in 'categories': remove the second entry")
            fail(
                f"category id {cid!r} is given to two categories, {names[cid]!r} and {name!r}: give each "
                f"category its own id (and each annotation the category_id of its class)"
            )
        names[cid] = name
    return set(names)


def validate_coco_json(json_file, dataset_name, require_annotations=True):
    """Check a COCO-format annotation file; return its parsed content.

    `require_annotations=False` accepts a file without an 'annotations' key (COCO test-dev: images
    and categories only), as detectron2's `load_coco_json` does; its images then have no objects,
    and the returned dict has `annotations: []`."""
    def fail(problem):
        _json_fail(dataset_name, json_file, problem)

    if not os.path.isfile(json_file):
        fail("file not found")
    try:
        with open(json_file, "rb") as f:
            lfs = lfs_pointer_problem(f.read(len(LFS_POINTER_PREFIX)))
        if lfs:
            fail(lfs)
        with open(json_file) as f:
            coco = json.load(f)
    except json.JSONDecodeError as e:
        fail(f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot be read ({e})")
    if not isinstance(coco, dict):
        fail(f"expected a JSON object, got {type(coco).__name__}")
    if "annotations" not in coco:
        if require_annotations:
            fail(
                "no 'annotations' key: a file of images only (like COCO test-dev) can be evaluated (the "
                "predictions are written, no AP) but not trained on"
            )
        coco["annotations"] = []
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            fail(f"missing or non-list key '{key}'")
    if not coco["images"]:
        fail("empty dataset: 'images' is empty")
    categories = _check_categories(coco["categories"], fail)
    images = {}
    for im in coco["images"]:
        if not isinstance(im, dict):
            fail(f"image entry {im!r} is not an object")
        missing = [k for k in ("id", "file_name", "height", "width") if k not in im]
        if missing:
            fail(f"image {im.get('id', im.get('file_name', '?'))!r} lacks {missing}")
        if not _is_id(im["id"]):
            fail(f"image {im['file_name']!r} has id {im['id']!r}: an image id must be a number")
        if im["id"] in images:
            fail(f"duplicate image id {im['id']!r} ('{images[im['id']]}' and '{im['file_name']}')")
        images[im["id"]] = im["file_name"]
    ann_ids = set()
    for a in coco["annotations"]:
        if not isinstance(a, dict):
            fail(f"annotation entry {a!r} is not an object")
        missing = [k for k in ("image_id", "bbox", "category_id") if k not in a]
        if missing:
            fail(f"annotation {a.get('id', '?')!r} lacks {missing}")
        if not _is_id(a["image_id"]) or a["image_id"] not in images:
            fail(f"annotation {a.get('id')!r} names image id {a['image_id']!r}, not in 'images'")
        if not _is_id(a["category_id"]) or a["category_id"] not in categories:
            fail(
                f"{_annotation_name(a, images)} has category_id {a['category_id']!r}, not in 'categories' "
                f"{sorted(categories, key=lambda c: (isinstance(c, str), c))}"
            )
        bbox = a["bbox"]
        if not isinstance(bbox, list) or not _is_four_numbers(bbox):
            fail(
                f"{_annotation_name(a, images)} has bbox {bbox!r}: a box must be a list of 4 numbers "
                f"[x, y, width, height]"
            )
        if "id" in a:
            if not _is_id(a["id"]):
                fail(f"{_annotation_name(a, images)}: an annotation id must be a number")
            if a["id"] in ann_ids:
                fail(f"duplicate annotation id {a['id']!r}")
            ann_ids.add(a["id"])
    return coco


# Datasets of at most this many images (per distributed worker) have every image decoded when they
# are checked (a few ms an image); larger ones only have their headers read, and the mapper checks
# each image as it decodes it. HYBRID_DETR_IMAGE_CHECK=full|header overrides the choice.
FULL_DECODE_MAX_IMAGES = 5000
_IMAGE_CHECK_ENV = "HYBRID_DETR_IMAGE_CHECK"


def _full_decode_wanted(num_images):
    choice = os.environ.get(_IMAGE_CHECK_ENV, "").strip().lower()
    if choice in ("full", "header"):
        return choice == "full"
    if choice:
        raise ValueError(f"{_IMAGE_CHECK_ENV}={choice!r}: expected 'full', 'header' or nothing")
    return num_images <= FULL_DECODE_MAX_IMAGES


def _check_one(record, full_decode):
    w, h = record.get("width"), record.get("height")
    return image_file_problem(
        record.get("file_name"), None if w is None or h is None else (w, h), full_decode=full_decode
    )


def check_image_files(dataset_dicts, dataset_name, full_decode=None):
    """Raise ValueError naming the first bad image (file, image id, problem), on every worker.

    Each of the distributed workers checks its share of the images, with a few threads (reading
    and decoding release the GIL). `full_decode`: decode every image (True), read headers only
    (False), or decide by the number of images (None, see FULL_DECODE_MAX_IMAGES)."""
    rank, world = comm.get_rank(), comm.get_world_size()
    share = dataset_dicts[rank::world]
    if full_decode is None:
        full_decode = _full_decode_wanted(len(share))
    start = time.perf_counter()
    problem, sixteen_bit = None, []
    threads = max(1, min(8, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for record, (what, info) in zip(share, pool.map(lambda r: _check_one(r, full_decode), share)):
            if what:
                problem = (
                    f"Dataset '{dataset_name}', image '{record.get('file_name')}' "
                    f"(image_id {record.get('image_id')!r}): {what}"
                )
                pool.shutdown(cancel_futures=True)  # the images after it need not be checked
                break
            if info["sixteen_bit"]:
                sixteen_bit.append(record.get("file_name"))
    problems = comm.all_gather(problem) if world > 1 else [problem]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(problems[0])
    logger.info(
        f"Dataset '{dataset_name}': {len(share)} image files checked ("
        f"{'decoded in full' if full_decode else 'headers only; each is checked in full when it is loaded'}) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    if sixteen_bit:
        logger.warning(
            f"Dataset '{dataset_name}': {len(sixteen_bit)} images have 16-bit grey pixels (e.g. '{sixteen_bit[0]}'); "
            f"they are read scaled to 8 bit by their high byte (value >> 8), as OpenCV and PIL's 16-bit colour "
            f"reading do. If their values use fewer bits (a 12-bit sensor), rescale them to 8 bit yourself"
        )
