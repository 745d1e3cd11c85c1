"""DETR's training augmentation on top of detectron2's DatasetMapper.

Training: random horizontal flip; with probability 0.5 (when INPUT.CROP.ENABLED) resize to a
shortest side drawn from INPUT.DETR_CROP_RESIZE and take a random crop (INPUT.CROP.TYPE/SIZE);
then the multi-scale ResizeShortestEdge(INPUT.MIN_SIZE_TRAIN, INPUT.MAX_SIZE_TRAIN).
Test: ResizeShortestEdge(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST).

Everything else is detectron2's DatasetMapper: image read in INPUT.FORMAT as a CHW uint8 tensor,
`instances` with gt_boxes/gt_classes (empty Instances for images without objects), boxes clipped
to the crop and those it made empty removed. The image is read by `image_io.read_image` (16-bit
grey scaled to 8 bit, corrupt files refused), and every problem of an image is raised naming its
file and image id.

`DetrDatasetMapper.check_dataset_dicts` refuses, before training, the images its resizes cannot
handle: so elongated that a side would shrink below one pixel (a 2000x2 image under a 192-pixel
maximum size), or would grow past PIL.Image.MAX_IMAGE_PIXELS (the crop branch's resize has no
maximum size: a 2000x2 image at a shortest side of 600 would be 600000x600).
"""
import copy

import numpy as np
import torch
from PIL import Image

from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .image_io import read_image

__all__ = ["DetrDatasetMapper", "build_detr_augmentation", "resize_problem"]


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


def _resizes(augmentations):
    """Every ResizeShortestEdge among `augmentations`, also inside AugmentationList / RandomApply."""
    for aug in augmentations:
        if isinstance(aug, T.ResizeShortestEdge):
            yield aug
        elif isinstance(aug, T.AugmentationList):
            yield from _resizes(aug.augs)
        elif isinstance(aug, T.RandomApply):
            yield from _resizes([aug.aug])


def resize_problem(height, width, augmentations):
    """None if every resize among `augmentations` turns a `width` x `height` image into one of at
    least 1 pixel a side and at most PIL.Image.MAX_IMAGE_PIXELS pixels, whichever shortest side
    it draws; else what goes wrong and what to do."""
    for resize in _resizes(augmentations):
        sides = resize.short_edge_length
        limit = "no maximum" if resize.max_size >= 2**31 else f"longest at most {resize.max_size}"
        for short in (min(sides), max(sides)):
            new_h, new_w = T.ResizeShortestEdge.get_output_shape(height, width, short, resize.max_size)
            what = f"resizing it to a shortest side of {short} ({limit}) would make it {new_w}x{new_h}"
            if min(new_h, new_w) < 1:
                return (
                    f"the image is {width}x{height}: {what}, no pixel left (an image longer than "
                    f"{2 * resize.max_size} times its short side has none). Crop or pad it to a less "
                    f"elongated shape, or remove it from the dataset"
                )
            if Image.MAX_IMAGE_PIXELS and new_h * new_w > Image.MAX_IMAGE_PIXELS:
                return (
                    f"the image is {width}x{height}: {what}, more than PIL.Image.MAX_IMAGE_PIXELS "
                    f"({Image.MAX_IMAGE_PIXELS}) pixels. Crop or pad it to a less elongated shape, or remove "
                    f"it from the dataset"
                )
    return None


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

    def check_dataset_dicts(self, dataset_dicts):
        """Raise ValueError naming the first image (file, image id) that this mapper's resizes cannot
        handle (`resize_problem`); run before training so that it does not stop at that image's step."""
        for record in dataset_dicts:
            if record.get("height") is None or record.get("width") is None:
                continue  # its size is known only once it is read: checked then
            problem = resize_problem(record["height"], record["width"], self.augmentations.augs)
            if problem:
                raise ValueError(f"Image {self._image_name(record)}: {problem}")

    @staticmethod
    def _image_name(record):
        return f"'{record.get('file_name')}' (image_id {record.get('image_id')!r})"

    def __call__(self, dataset_dict):
        """detectron2's DatasetMapper.__call__ for boxes only, with `image_io.read_image` and errors
        that name the image."""
        dataset_dict = copy.deepcopy(dataset_dict)
        try:
            image = read_image(dataset_dict["file_name"], format=self.image_format)
        except OSError as e:
            raise OSError(f"Cannot read image {self._image_name(dataset_dict)}: {e}") from e
        utils.check_image_size(dataset_dict, image)
        problem = resize_problem(image.shape[0], image.shape[1], self.augmentations.augs)
        if problem:  # a record the up-front check did not see (a test set, a hand-made record)
            raise ValueError(f"Image {self._image_name(dataset_dict)}: {problem}")
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        # A tensor, not a numpy array: it crosses the data-loader workers' shared memory cheaply.
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict
