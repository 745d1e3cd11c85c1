"""Loading a registered dataset with every check of `validation`, before training starts.

Above both `registration` (which generates a synthetic split's files on first use) and `validation`
(the checks), so that those two form a one-way graph: registration -> validation.
"""
import logging

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils import comm

from .registration import ensure_synthetic_dataset
from .validation import check_image_files, validate_coco_json, validate_dataset_dicts

__all__ = ["load_checked_dataset_dicts"]

logger = logging.getLogger(__name__)


def load_checked_dataset_dicts(dataset_name, num_classes, filter_empty=True, check_images=True, for_training=True):
    """The dicts of a registered dataset after every check of `validation` (JSON file, records,
    image files); images without annotations are dropped when `filter_empty` (detectron2's
    DATALOADER.FILTER_EMPTY_ANNOTATIONS). A synthetic split's files are generated first if missing.
    `for_training` False: an evaluation set, which may be a JSON without 'annotations' (COCO test-dev)."""
    if dataset_name not in DatasetCatalog.list():
        registered = ", ".join(sorted(DatasetCatalog.list()))
        raise KeyError(f"Dataset '{dataset_name}' is not registered; registered: {registered}")
    ensure_synthetic_dataset(dataset_name)
    json_file = MetadataCatalog.get(dataset_name).get("json_file")
    if json_file:
        # Parsed once, by worker 0 (a COCO train JSON is ~0.5 GB); every worker raises its error.
        problem = None
        if comm.get_rank() == 0:
            try:
                validate_coco_json(json_file, dataset_name, require_annotations=for_training)
            except ValueError as e:
                problem = str(e)
        if comm.get_world_size() > 1:
            problem = next((p for p in comm.all_gather(problem) if p), None)
        if problem:
            raise ValueError(problem)
    try:
        dicts = DatasetCatalog.get(dataset_name)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"Dataset '{dataset_name}' could not be loaded: {type(e).__name__}: {e}") from e
    if not dicts:
        raise ValueError(f"Dataset '{dataset_name}' is empty")
    validate_dataset_dicts(dicts, num_classes, dataset_name)
    if filter_empty:
        kept = [d for d in dicts if any(not a.get("iscrowd", 0) for a in d.get("annotations", ()))]
        if not kept:
            raise ValueError(
                f"Dataset '{dataset_name}' has no image with (non-crowd) annotations; to train on images "
                f"without objects set DATALOADER.FILTER_EMPTY_ANNOTATIONS False"
            )
        if len(kept) < len(dicts):
            logger.info(f"Dataset '{dataset_name}': dropped {len(dicts) - len(kept)} images without annotations")
        dicts = kept
    if check_images:
        check_image_files(dicts, dataset_name)
    return dicts
