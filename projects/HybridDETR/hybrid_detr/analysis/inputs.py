"""One image as the model sees it: a file, or a dataset record with its ground truth, through the
config's test-time resize (`DetrDatasetMapper(cfg, is_train=False)`'s augmentation)."""
from typing import Dict, Optional

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from ..data import build_detr_augmentation, ensure_synthetic_dataset

__all__ = ["load_input", "dataset_record"]


def dataset_record(name: str, index: int) -> Dict:
    """Record `index` of dataset `name` (files generated first for the synthetic sets)."""
    ensure_synthetic_dataset(name)
    records = DatasetCatalog.get(name)
    if not 0 <= index < len(records):
        raise IndexError(f"{name} has {len(records)} images, asked for index {index}")
    return records[index]


def load_input(cfg, path: Optional[str] = None, record: Optional[Dict] = None) -> Dict:
    """A model input dict {"image" (3, h, w) float 0-255 in cfg.INPUT.FORMAT, "height", "width",
    "file_name", "instances" (ground truth in the resized image's pixels, when `record` has
    annotations), "original" (H, W, 3) uint8 RGB} from an image file or a dataset record."""
    if (path is None) == (record is None):
        raise ValueError("give an image path or a dataset record")
    file_name = path if path is not None else record["file_name"]
    image = utils.read_image(file_name, format=cfg.INPUT.FORMAT)
    original_rgb = utils.convert_image_to_rgb(image, cfg.INPUT.FORMAT)
    aug_input = T.AugInput(image)
    transforms = T.AugmentationList(build_detr_augmentation(cfg, is_train=False))(aug_input)
    resized = aug_input.image
    out = {
        "image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))).float(),
        "height": resized.shape[0],
        "width": resized.shape[1],
        "file_name": file_name,
        "original": original_rgb,
    }
    if record is not None and "annotations" in record:
        annotations = [
            utils.transform_instance_annotations(a, transforms, resized.shape[:2])
            for a in record["annotations"] if a.get("iscrowd", 0) == 0
        ]
        out["instances"] = utils.annotations_to_instances(annotations, resized.shape[:2])
    return out
