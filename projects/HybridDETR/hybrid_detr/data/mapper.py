"""DETR's training augmentation on top of detectron2's DatasetMapper.

Training: random horizontal flip; with probability 0.5 (when INPUT.CROP.ENABLED) resize to a
shortest side drawn from INPUT.DETR_CROP_RESIZE and take a random crop (INPUT.CROP.TYPE/SIZE);
then the multi-scale ResizeShortestEdge(INPUT.MIN_SIZE_TRAIN, INPUT.MAX_SIZE_TRAIN).
Test: ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST).

Everything else is detectron2's DatasetMapper: image read in INPUT.FORMAT as a CHW uint8 tensor,
`instances` with gt_boxes/gt_classes (empty Instances for images without objects), boxes clipped
to the crop and those it made empty removed.
"""
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

__all__ = ["DetrDatasetMapper", "build_detr_augmentation"]


def build_detr_augmentation(cfg, is_train, crop_prob=0.5):
    """The list of detectron2 augmentations DETR uses (see the module docstring)."""
    if not is_train:
        return utils.build_augmentation(cfg, is_train=False)
    augs = []
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    if cfg.INPUT.CROP.ENABLED and crop_prob > 0:
        crop = T.AugmentationList(
            [
                T.ResizeShortestEdge(list(cfg.INPUT.DETR_CROP_RESIZE), sample_style="choice"),
                T.RandomCrop(cfg.INPUT.CROP.TYPE, list(cfg.INPUT.CROP.SIZE)),
            ]
        )
        augs.append(T.RandomApply(crop, prob=crop_prob))
    augs.append(
        T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    )
    return augs


class DetrDatasetMapper(DatasetMapper):
    """detectron2's DatasetMapper with DETR's augmentation.

    Use as `DetrDatasetMapper(cfg, is_train=True)`; `crop_prob` (default 0.5) sets how often the
    crop branch is taken. Boxes only (instance masks and keypoints are not supported).
    """

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, crop_prob: float = 0.5):
        return {
            "is_train": is_train,
            "augmentations": build_detr_augmentation(cfg, is_train, crop_prob),
            "image_format": cfg.INPUT.FORMAT,
            "use_instance_mask": False,
            "use_keypoint": False,
            "recompute_boxes": False,
        }

    def __call__(self, dataset_dict):
        try:
            return super().__call__(dataset_dict)
        except (OSError, SyntaxError) as e:  # PIL: unreadable / truncated file (after the up-front check)
            raise OSError(
                f"Cannot read image '{dataset_dict.get('file_name')}' (image_id {dataset_dict.get('image_id')!r}): {e}"
            ) from e
