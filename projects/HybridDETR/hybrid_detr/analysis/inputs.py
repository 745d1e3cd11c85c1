"""What the tools feed the model: the trained model of a config, and one image as the model sees it
(a file, or a dataset record with its ground truth, through the config's test-time resize:
`DetrDatasetMapper(cfg, is_train=False)`'s augmentation)."""
import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from ..data import build_detr_augmentation, ensure_synthetic_dataset

__all__ = ["InputError", "build_trained_model", "load_input", "dataset_record", "resolve_input", "metadata_of"]


class InputError(ValueError):
    """An image that cannot be found (the tools print the message and exit)."""


def build_trained_model(cfg) -> torch.nn.Module:
    """The model of `cfg` with its MODEL.WEIGHTS, in eval mode."""
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


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


def resolve_input(cfg, image: Optional[str] = None, dataset: Optional[str] = None,
                  index: int = 0) -> Tuple[Dict, Optional[str]]:
    """The input dict of record `index` of `dataset` (with its ground truth), or of `image`: an image
    file, or an image id of DATASETS.TEST[0] (with its ground truth). Also returns the dataset the
    image belongs to (the file's: DATASETS.TEST[0], for the class names; None without one)."""
    if dataset is not None or (image is not None and not os.path.exists(image) and image.isdigit()):
        name = dataset or cfg.DATASETS.TEST[0]
        if dataset is None:
            ensure_synthetic_dataset(name)
            ids = [r["image_id"] for r in DatasetCatalog.get(name)]
            if int(image) not in ids:
                raise InputError(f"{image} is neither a file nor an image id of {name}")
            index = ids.index(int(image))
        return load_input(cfg, record=dataset_record(name, index)), name
    if image is None:
        raise InputError("give --input IMAGE (or an image id), or --dataset NAME --index I")
    return load_input(cfg, path=image), (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)


def metadata_of(dataset: Optional[str]):
    """The dataset's Metadata (its class names), or None."""
    return MetadataCatalog.get(dataset) if dataset else None
