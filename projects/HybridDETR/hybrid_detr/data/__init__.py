"""Data for HybridDETR: the embedded synthetic dataset, annotation checks, DETR's mapper.

Importing this package registers `hybrid_synthetic_train` and `hybrid_synthetic_val` (files
generated on first use under $DETECTRON2_DATASETS/hybrid_synthetic, default ./datasets).
"""
from .mapper import DetrDatasetMapper, build_detr_augmentation
from .registration import (
    SYNTHETIC_DATASET_NAMES,
    ensure_synthetic_dataset,
    register_synthetic_dataset,
    register_synthetic_datasets,
)
from .synthetic import SYNTHETIC_CLASSES, ensure_split, generate_split
from .validation import validate_dataset_dicts

__all__ = [
    "DetrDatasetMapper",
    "build_detr_augmentation",
    "SYNTHETIC_DATASET_NAMES",
    "SYNTHETIC_CLASSES",
    "ensure_synthetic_dataset",
    "register_synthetic_dataset",
    "register_synthetic_datasets",
    "ensure_split",
    "generate_split",
    "validate_dataset_dicts",
]

register_synthetic_datasets()
