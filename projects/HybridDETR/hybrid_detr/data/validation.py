"""Checks of detectron2 dataset dicts, so broken annotations fail loudly before training."""
import math
import numbers

from detectron2.structures import BoxMode

__all__ = ["validate_dataset_dicts"]

# A box may stick out of the image by this fraction of the image side (rounding, loose labels).
_OUTSIDE_TOLERANCE = 0.1


def _fail(dataset_name, record, problem):
    file_name = record.get("file_name", f"<image_id {record.get('image_id', '?')}>")
    raise ValueError(f"Dataset '{dataset_name}', image '{file_name}': {problem}")


def validate_dataset_dicts(dataset_dicts, num_classes, dataset_name):
    """Raise ValueError naming the dataset, the image file and the problem for broken records.

    Checked: image height/width present and positive; every annotation's bbox has 4 finite
    numbers, non-negative width/height, lies within the image up to 10% of its side, and its
    category_id is an int in [0, num_classes). Images without annotations are valid.
    """
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
            if x0 < -tol_x or y0 < -tol_y or x1 > w + tol_x or y1 > h + tol_y:
                _fail(
                    dataset_name, record,
                    f"annotation {j}: bbox {bbox!r} (XYXY {x0:g},{y0:g},{x1:g},{y1:g}) is far "
                    f"outside the {w}x{h} image",
                )
            cat = anno.get("category_id")
            if isinstance(cat, bool) or not isinstance(cat, numbers.Integral) or not 0 <= cat < num_classes:
                _fail(
                    dataset_name, record,
                    f"annotation {j}: category_id {cat!r} is out of range [0, {num_classes})",
                )
