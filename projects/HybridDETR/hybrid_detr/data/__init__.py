"""Data for HybridDETR: the embedded synthetic dataset, annotation checks, DETR's mapper.

Importing this package registers the embedded datasets (`SYNTHETIC_DATASET_NAMES`):
`hybrid_synthetic_train` / `hybrid_synthetic_val` (the quickstart's), `hybrid_synthetic_val1000` and the
crowded, COCO-like `hybrid_crowded_train` / `hybrid_crowded_val` (files generated on first use under
$DETECTRON2_DATASETS/hybrid_synthetic and /hybrid_crowded, default ./datasets).
"""
from .mapper import DetrDatasetMapper, build_detr_augmentation
from .registration import (
    SYNTHETIC_DATASET_NAMES,
    ensure_synthetic_dataset,
    register_builtin_synthetic_datasets,
    register_synthetic_dataset,
    register_synthetic_datasets,
)
from .synthetic import CROWDED_CLASSES, SYNTHETIC_CLASSES, dataset_statistics, ensure_split, generate_split
from .validation import validate_dataset_dicts

__all__ = [
    "DetrDatasetMapper",
    "build_detr_augmentation",
    "SYNTHETIC_DATASET_NAMES",
    "SYNTHETIC_CLASSES",
    "CROWDED_CLASSES",
    "dataset_statistics",
    "register_builtin_synthetic_datasets",
    "ensure_synthetic_dataset",
    "register_synthetic_dataset",
    "register_synthetic_datasets",
    "ensure_split",
    "generate_split",
    "validate_dataset_dicts",
]

register_builtin_synthetic_datasets()
