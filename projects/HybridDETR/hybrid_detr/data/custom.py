"""Your own COCO-format data, with no code: `train_net.py --dataset NAME=JSON:IMAGE_DIR`.

`register_coco_dataset` reads the JSON once (with `validate_coco_json`'s checks, so a broken file
is named before anything else happens), takes the classes from its `categories`, and registers the
dataset with detectron2's `register_coco_instances`. A file without annotations (COCO test-dev:
images and categories only) is registered too: detectron2 loads its images without objects and
COCOEvaluator, finding no ground truth, only writes the predictions (coco_instances_results.json,
to submit) and reports no AP; training on it is refused. `check_num_classes` refuses a config whose
NUM_CLASSES disagrees with the datasets the run uses.
"""
import logging
from typing import Iterable, List, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .validation import validate_coco_json

__all__ = ["parse_dataset_spec", "register_coco_dataset", "register_dataset_specs", "check_num_classes"]

logger = logging.getLogger(__name__)


def parse_dataset_spec(spec: str) -> Tuple[str, str, str]:
    """"NAME=JSON:IMAGE_DIR" -> (name, json_file, image_root). The last ':' splits JSON from the
    image folder, so a JSON path may contain ':'."""
    name, sep, paths = spec.partition("=")
    json_file, sep2, image_root = paths.rpartition(":")
    if not (sep and sep2 and name and json_file and image_root):
        raise ValueError(f"--dataset {spec!r}: expected NAME=ANNOTATIONS.json:IMAGE_DIR")
    return name.strip(), json_file, image_root


def register_coco_dataset(name: str, json_file: str, image_root: str) -> List[str]:
    """Register a COCO-format dataset under `name`; returns its class names (the JSON's categories,
    sorted by id, mapped to contiguous ids 0..K-1 as detectron2 does)."""
    coco = validate_coco_json(json_file, name, require_annotations=False)
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    classes = [str(c.get("name", c["id"])) for c in categories]
    if name in DatasetCatalog.list():
        if MetadataCatalog.get(name).get("json_file") == json_file:
            return classes  # the same registration again (every launched process registers)
        raise ValueError(f"--dataset {name}: the name is already registered for another dataset; choose another")
    register_coco_instances(name, {}, json_file, image_root)
    # Known before loading, so that NUM_CLASSES can be checked before the model is built.
    MetadataCatalog.get(name).set(thing_classes=classes)
    logger.info(f"Registered dataset '{name}': {len(coco['images'])} images, {len(classes)} classes, {json_file}")
    return classes


def register_dataset_specs(specs: Iterable[str]) -> None:
    for spec in specs or ():
        register_coco_dataset(*parse_dataset_spec(spec))


def check_num_classes(cfg, eval_only: bool = False) -> None:
    """Every dataset the run uses, with known classes, has MODEL.HYBRID_DETR.NUM_CLASSES classes:
    DATASETS.TRAIN and DATASETS.TEST when training, DATASETS.TEST alone with `eval_only` (the
    training sets need not even be registered then)."""
    num_classes = cfg.MODEL.HYBRID_DETR.NUM_CLASSES
    names = list(cfg.DATASETS.TEST) if eval_only else list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    counts = {}
    for name in names:
        if name not in DatasetCatalog.list():
            raise KeyError(
                f"Dataset '{name}' is not registered (register your own with --dataset {name}=ANNOTATIONS.json:IMAGE_DIR)"
            )
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None:
            counts[name] = len(classes)
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"'{name}' {count}" for name, count in counts.items())
        raise ValueError(
            f"The datasets of this run have different numbers of classes ({listed}); one model predicts one set of "
            f"classes: give the datasets the same 'categories'"
        )
    for name, count in counts.items():
        if count != num_classes:
            raise ValueError(
                f"Dataset '{name}' has {count} classes but MODEL.HYBRID_DETR.NUM_CLASSES is {num_classes}: "
                f"set MODEL.HYBRID_DETR.NUM_CLASSES {count}"
            )
