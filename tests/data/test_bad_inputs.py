"""The bad-input corpus: every bad dataset, config, training value and weights file gives an error
naming the problem (file, image id, key) before any training step, or at the step it happens,
never a deep traceback, a hang or a silently wrong result.

Datasets are registered the way users register theirs (detectron2's `register_coco_instances`
on a COCO JSON file) and go through `Trainer.build_train_loader`, what train_net.py calls.
"""
import copy
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

import train_net
from hybrid_detr.checkpoint import CheckpointError, HybridCheckpointer
from hybrid_detr.config import load_config
from hybrid_detr.data import validate_dataset_dicts
from hybrid_detr.data.custom import check_num_classes, register_coco_dataset
from hybrid_detr.engine.checks import check_config
from hybrid_detr.modeling.matcher import HungarianMatcher
from model_helpers import tiny_cfg

SIZE = 80


def _write_image(path, w=SIZE, h=SIZE, fmt="JPEG"):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)


def _coco(n_images=4):
    images = [{"id": i + 1, "file_name": f"{i + 1}.jpg", "width": SIZE, "height": SIZE} for i in range(n_images)]
    annotations = [
        {"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2, "bbox": [10.0, 12.0, 30.0, 25.0],
         "area": 750.0, "iscrowd": 0}
        for i in range(n_images)
    ]
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    return {"images": images, "annotations": annotations, "categories": categories}


class BadDataset:
    """A COCO dataset in a temporary folder, registered under a fresh name, with a tiny config."""

    count = 0

    def __init__(self, root, coco=None, json_text=None):
        BadDataset.count += 1
        self.name = f"bad_input_{BadDataset.count}"
        self.image_root = root / self.name
        self.image_root.mkdir()
        self.coco = _coco() if coco is None else coco
        for im in self.coco["images"]:
            _write_image(self.image_root / im["file_name"])
        self.json_file = root / f"{self.name}.json"
        self.json_file.write_text(json.dumps(self.coco) if json_text is None else json_text)
        register_coco_instances(self.name, {}, str(self.json_file), str(self.image_root))

    def cfg(self, *opts):
        cfg = tiny_cfg(NUM_CLASSES=2)
        cfg.DATASETS.TRAIN = (self.name,)
        cfg.DATASETS.TEST = ()
        cfg.SOLVER.IMS_PER_BATCH = 2
        cfg.SOLVER.MAX_ITER = 2
        cfg.SOLVER.STEPS = (1,)
        cfg.INPUT.MIN_SIZE_TRAIN = (64,)
        cfg.INPUT.MAX_SIZE_TRAIN = 96
        cfg.INPUT.CROP.ENABLED = False
        cfg.DATALOADER.NUM_WORKERS = 0
        cfg.merge_from_list([str(o) for o in opts])
        return cfg

    def remove(self):
        DatasetCatalog.remove(self.name)
        MetadataCatalog.remove(self.name)


@pytest.fixture
def dataset(tmp_path):
    made = []

    def make(coco=None, json_text=None, edit=None):
        coco = copy.deepcopy(_coco() if coco is None else coco)
        if edit:
            edit(coco)
        d = BadDataset(tmp_path, coco, json_text)
        made.append(d)
        return d

    yield make
    for d in made:
        d.remove()


def _build(d, *opts):
    return train_net.Trainer.build_train_loader(d.cfg(*opts))


# ------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------
def test_good_dataset_builds(dataset):
    loader = _build(dataset())
    batch = next(iter(loader))
    assert len(batch) == 2 and all(len(x["instances"]) == 1 for x in batch)


def test_missing_json(dataset):
    d = dataset()
    os.remove(d.json_file)
    with pytest.raises(ValueError, match=rf"{d.name}.*{d.json_file.name}.*file not found"):
        _build(d)


def test_broken_json(dataset):
    d = dataset(json_text='{"images": [ {"id": 1,, }')
    with pytest.raises(ValueError, match=rf"{d.json_file.name}.*not valid JSON \(line 1, column"):
        _build(d)


def test_json_without_annotations_key_is_not_trained_on(dataset):
    d = dataset(edit=lambda c: c.pop("annotations"))
    with pytest.raises(ValueError, match=rf"{d.json_file.name}': no 'annotations' key: a file of images only "
                                         r"\(like COCO test-dev\) can be evaluated .* but not trained on"):
        _build(d)


def test_non_list_annotations(dataset):
    d = dataset(edit=lambda c: c.update(annotations={"1": []}))
    with pytest.raises(ValueError, match=r"missing or non-list key 'annotations'"):
        _build(d)


def test_empty_dataset(dataset):
    d = dataset(coco={"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]})
    with pytest.raises(ValueError, match=rf"{d.name}.*empty dataset"):
        _build(d)


def test_duplicate_image_ids(dataset):
    d = dataset(edit=lambda c: c["images"][2].update(id=2))
    with pytest.raises(ValueError, match=r"duplicate image id 2 \('2\.jpg' and '3\.jpg'\)"):
        _build(d)


def test_category_not_in_categories(dataset):
    d = dataset(edit=lambda c: c["annotations"][1].update(category_id=99))
    with pytest.raises(ValueError, match=r"annotation 2 of image id 2 \('2\.jpg'\) has category_id 99, not in 'categories' \[1, 2\]"):
        _build(d)


def test_annotation_of_an_unknown_image(dataset):
    d = dataset(edit=lambda c: c["annotations"][0].update(image_id=42))
    with pytest.raises(ValueError, match=r"annotation 1 names image id 42, not in 'images'"):
        _build(d)


def test_image_missing_on_disk(dataset):
    d = dataset()
    os.remove(d.image_root / "3.jpg")
    with pytest.raises(ValueError, match=r"image '.*3\.jpg' \(image_id 3\): image file not found"):
        _build(d)


def test_unreadable_image(dataset):
    d = dataset()
    (d.image_root / "2.jpg").write_text("not an image")
    with pytest.raises(ValueError, match=r"2\.jpg' \(image_id 2\): unreadable or truncated image"):
        _build(d)


def test_truncated_image(dataset):
    d = dataset()
    data = (d.image_root / "4.jpg").read_bytes()
    (d.image_root / "4.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"4\.jpg' \(image_id 4\): unreadable or truncated image"):
        _build(d)


def test_truncated_png(dataset):
    d = dataset()
    path = d.image_root / "1.jpg"
    _write_image(path, fmt="PNG")  # the extension lies; the header tells
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"1\.jpg' \(image_id 1\): unreadable or truncated image"):
        _build(d)


def test_image_broken_after_the_check_is_named_by_the_mapper(dataset):
    d = dataset()
    loader = _build(d, "DATALOADER.FILTER_EMPTY_ANNOTATIONS", False)
    (d.image_root / "3.jpg").write_text("gone bad")
    record = next(r for r in DatasetCatalog.get(d.name) if r["image_id"] == 3)
    with pytest.raises(OSError, match=r"Cannot read image '.*3\.jpg' \(image_id 3\)"):
        loader.dataset.mapper(record)


def test_image_size_differs_from_json(dataset):
    d = dataset()
    _write_image(d.image_root / "2.jpg", w=SIZE + 16, h=SIZE)
    with pytest.raises(ValueError, match=r"2\.jpg' \(image_id 2\): image is 96x80 but the annotations say 80x80"):
        _build(d)


@pytest.mark.parametrize("bbox, problem", [
    ([10.0, 10.0, -4.0, 20.0], "negative size"),
    ([10.0, 10.0, 20.0, 0.0], "zero size"),
    ([70.0, 10.0, 40.0, 20.0], "far outside the 80x80 image"),
    ([10.0, float("nan"), 20.0, 20.0], None),  # NaN is not JSON; detectron2 reads NaN though
])
def test_bad_boxes(dataset, bbox, problem):
    d = dataset(edit=lambda c: c["annotations"][2].update(bbox=bbox))
    with pytest.raises(ValueError, match=rf"{d.name}.*3\.jpg.*annotation 0: bbox .*{problem or 'not finite'}"):
        _build(d)


def test_box_slightly_outside_is_clipped_with_a_warning(dataset, caplog):
    d = dataset(edit=lambda c: c["annotations"][0].update(bbox=[60.0, 10.0, 25.0, 20.0]))  # 5 px out of 80
    with caplog.at_level(logging.WARNING):
        loader = _build(d, "DATALOADER.FILTER_EMPTY_ANNOTATIONS", False, "INPUT.RANDOM_FLIP", "none")
    assert "1 boxes stick out of their image" in caplog.text and "1.jpg" in caplog.text
    mapper = loader.dataset.mapper
    record = next(r for r in DatasetCatalog.get(d.name) if r["image_id"] == 1)
    box = mapper(copy.deepcopy(record))["instances"].gt_boxes.tensor[0]
    # The box is clipped to the image (64 px after the resize of 80 -> 64).
    assert box.tolist() == pytest.approx([48.0, 8.0, 64.0, 24.0])


def test_unregistered_dataset(dataset):
    d = dataset()
    with pytest.raises(KeyError, match=r"Dataset 'no_such_set' is not registered"):
        train_net.Trainer.build_train_loader(d.cfg("DATASETS.TRAIN", "('no_such_set',)"))


def test_no_annotated_image_with_filter_empty(dataset):
    d = dataset(edit=lambda c: c.update(annotations=[]))
    with pytest.raises(ValueError, match=r"no image with \(non-crowd\) annotations.*FILTER_EMPTY_ANNOTATIONS False"):
        _build(d)


def test_images_without_objects_are_normal_data(dataset, tmp_path):
    """Without FILTER_EMPTY_ANNOTATIONS, a dataset whose images have no objects trains with finite,
    non-zero losses (the classification loss pushes every query to background)."""
    d = dataset(edit=lambda c: c.update(annotations=[]))
    cfg = d.cfg("DATALOADER.FILTER_EMPTY_ANNOTATIONS", False, "SOLVER.MAX_ITER", 1, "SOLVER.STEPS", "()",
                "OUTPUT_DIR", tmp_path / "out")
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    losses = trainer.model(next(iter(trainer.data_loader)))
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_class"] > 0 and losses["loss_bbox"] == 0


# ------------------------------------------------------------------------------------------------
# Categories and boxes in the JSON
# ------------------------------------------------------------------------------------------------
def test_category_id_listed_twice(dataset, tmp_path):
    """detectron2 would count 3 classes (advice: NUM_CLASSES 3), shift the labels and fail in evaluation."""
    d = dataset(edit=lambda c: c["categories"].append({"id": 2, "name": "b"}))
    match = r"category id 2 \('b'\) is listed twice in 'categories': remove the second entry"
    with pytest.raises(ValueError, match=match):
        _build(d)
    with pytest.raises(ValueError, match=match):  # --dataset refuses it when it registers it
        register_coco_dataset("bad_input_twice", str(d.json_file), str(d.image_root))
    assert "bad_input_twice" not in DatasetCatalog.list()


def test_two_categories_with_one_id(dataset):
    d = dataset(edit=lambda c: c["categories"].append({"id": 2, "name": "c"}))
    with pytest.raises(ValueError, match=r"category id 2 is given to two categories, 'b' and 'c': give each category its own id"):
        _build(d)


@pytest.mark.parametrize("bbox", ["10,12,30,25", ["10", "12", "30", "25"], [10.0, 12.0, 30.0, True]])
def test_box_that_is_not_4_numbers(dataset, bbox):
    d = dataset(edit=lambda c: c["annotations"][2].update(bbox=bbox))
    with pytest.raises(ValueError, match=r"annotation 3 of image id 3 \('3\.jpg'\) has bbox .*: a box must be a list "
                                         r"of 4 numbers \[x, y, width, height\]"):
        _build(d)


def test_box_that_is_not_4_numbers_in_dataset_dicts():
    """Datasets registered by a function of their own skip the JSON check: the dict check refuses it."""
    record = {"file_name": "x.jpg", "image_id": 1, "height": 80, "width": 80,
              "annotations": [{"bbox": ["1", "2", "30", "40"], "bbox_mode": 1, "category_id": 0}]}
    with pytest.raises(ValueError, match=r"Dataset 'own', image 'x\.jpg': annotation 0: bbox .* is not 4 numbers"):
        validate_dataset_dicts([record], 2, "own")


# ------------------------------------------------------------------------------------------------
# Image files
# ------------------------------------------------------------------------------------------------
def _grey_ramp():
    return (np.arange(SIZE * SIZE, dtype=np.uint32).reshape(SIZE, SIZE) * 255 // (SIZE * SIZE - 1)).astype(np.uint8)


def test_sixteen_bit_png_is_read_scaled_to_8_bit(dataset, caplog):
    """detectron2 would read it as all 255. The high byte is what PIL keeps of 16-bit colour PNGs
    and what OpenCV reads, so the 16-bit file trains exactly as its 8-bit version."""
    d = dataset()
    ramp = _grey_ramp()
    Image.fromarray(ramp.astype(np.uint16) * 257).save(d.image_root / "1.jpg", format="PNG")  # 16-bit grey
    Image.fromarray(ramp).save(d.image_root / "2.jpg", format="PNG")  # its 8-bit version
    assert Image.open(d.image_root / "1.jpg").mode == "I;16"
    with caplog.at_level(logging.WARNING):
        loader = _build(d, "INPUT.RANDOM_FLIP", "none", "DATALOADER.FILTER_EMPTY_ANNOTATIONS", False)
    assert "1 images have 16-bit grey pixels (e.g. '" in caplog.text and "1.jpg" in caplog.text
    records = {r["image_id"]: r for r in DatasetCatalog.get(d.name)}
    sixteen, eight = (loader.dataset.mapper(records[i])["image"] for i in (1, 2))
    assert torch.equal(sixteen, eight)
    assert sixteen.min() < 10 and sixteen.max() > 245  # the ramp, not a white image


def _damage_the_middle(path):
    """A photo-like JPEG (gradients and texture, not noise), then 300 random bytes over the middle of
    it; its start and end markers stay. PIL decodes it without a word. (Not every such damage can be
    detected: image_io's docstring says which.)"""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    texture = 128 + 60 * np.sin(x / 7.0) * np.cos(y / 5.0)
    noise = np.random.default_rng(0).integers(-20, 20, (SIZE, SIZE, 3))
    photo = np.stack([x * 255 / SIZE, y * 255 / SIZE, texture], -1) + noise
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(path, format="JPEG")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 300] = np.random.default_rng(2).integers(0, 256, 300, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
    Image.open(path).load()


def test_jpeg_damaged_in_the_middle(dataset):
    d = dataset()
    _damage_the_middle(d.image_root / "3.jpg")
    with pytest.raises(ValueError, match=r"3\.jpg' \(image_id 3\): unreadable or truncated image \(corrupt compressed "
                                         r"data \(damaged in the middle of the file\?\): the data ends before the last "
                                         r"pixel is decoded.*\): replace the file"):
        _build(d)


def test_large_dataset_damaged_jpeg_is_named_when_loaded(dataset, monkeypatch):
    """Above FULL_DECODE_MAX_IMAGES only the headers are read up front; the mapper's decode names the file."""
    d = dataset()
    _damage_the_middle(d.image_root / "3.jpg")
    monkeypatch.setenv("HYBRID_DETR_IMAGE_CHECK", "header")
    loader = _build(d)
    record = next(r for r in DatasetCatalog.get(d.name) if r["image_id"] == 3)
    with pytest.raises(OSError, match=r"Cannot read image '.*3\.jpg' \(image_id 3\): unreadable or truncated image "
                                      r"\(corrupt compressed data"):
        loader.dataset.mapper(record)


def test_extremely_elongated_image(dataset):
    """2000x2 under MAX_SIZE_TRAIN 96 would be resized to 96x0: refused before training."""
    def elongate(coco):
        coco["images"][3].update(width=2000, height=2)
        coco["annotations"][3].update(bbox=[100.0, 0.0, 50.0, 2.0])
    d = dataset(edit=elongate)
    _write_image(d.image_root / "4.jpg", w=2000, h=2)
    with pytest.raises(ValueError, match=r"Image '.*4\.jpg' \(image_id 4\): the image is 2000x2: resizing it to a "
                                         r"shortest side of 64 \(longest at most 96\) would make it 96x0, no pixel left "
                                         r"\(an image longer than 192 times its short side has none\)"):
        _build(d)


def test_decompression_bomb(dataset):
    d = dataset(edit=lambda c: c["images"][1].update(width=15000, height=15000))
    Image.new("1", (15000, 15000)).save(d.image_root / "2.jpg", format="PNG")  # 27 kB
    with pytest.raises(ValueError, match=r"2\.jpg' \(image_id 2\): Image size \(225000000 pixels\) exceeds limit .* "
                                         r"Downscale the image .*`PIL\.Image\.MAX_IMAGE_PIXELS = None`"):
        _build(d)


LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 12345\n"
)


def test_git_lfs_pointer_as_image(dataset):
    d = dataset()
    (d.image_root / "2.jpg").write_text(LFS_POINTER)
    with pytest.raises(ValueError, match=r"2\.jpg' \(image_id 2\): this is a git-LFS pointer file, .*run `git lfs pull`"):
        _build(d)


def test_git_lfs_pointer_as_annotation_json(dataset):
    d = dataset(json_text=LFS_POINTER)
    match = rf"{d.json_file.name}': this is a git-LFS pointer file, .*run `git lfs pull`"
    with pytest.raises(ValueError, match=match):
        _build(d)
    with pytest.raises(ValueError, match=match):
        register_coco_dataset("bad_input_lfs", str(d.json_file), str(d.image_root))


def _jpeg_rotated_by_exif(path, w, h):
    """A w x h JPEG whose EXIF orientation 6 turns it to h x w when read (as phones save portraits)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, exif=exif)


def test_image_size_is_checked_after_the_exif_orientation(dataset):
    """detectron2's mapper rotates the image by its EXIF orientation, then compares its size to the
    annotations: the same comparison is made before training."""
    d = dataset()
    _jpeg_rotated_by_exif(d.image_root / "2.jpg", w=SIZE + 16, h=SIZE)  # header 96x80, read as 80x96
    with pytest.raises(ValueError, match=r"2\.jpg' \(image_id 2\): image is 80x96 but the annotations say 80x80"):
        _build(d)
    d = dataset(edit=lambda c: c["images"][1].update(width=SIZE, height=SIZE + 16))
    _jpeg_rotated_by_exif(d.image_root / "2.jpg", w=SIZE + 16, h=SIZE)
    loader = _build(d)
    record = next(r for r in DatasetCatalog.get(d.name) if r["image_id"] == 2)
    assert loader.dataset.mapper(record)["image"].shape[1:] == (77, 64)  # 80x96 -> short side 64


# ------------------------------------------------------------------------------------------------
# Evaluation: test-dev files, class counts of the datasets used
# ------------------------------------------------------------------------------------------------
def _eval_only(cfg, tmp_path, *dataset_specs):
    """train_net.py --eval-only on `cfg` (written to a file), with weights of its model."""
    weights = tmp_path / "weights.pth"
    torch.save({"model": train_net.Trainer.build_model(cfg).state_dict()}, weights)
    config = tmp_path / "config.yaml"
    config.write_text(cfg.dump())
    specs = [arg for spec in dataset_specs for arg in ("--dataset", spec)]
    args = train_net.argument_parser().parse_args(
        ["--eval-only", "--config-file", str(config), *specs, "MODEL.WEIGHTS", str(weights)]
    )
    return train_net.main(args)


def test_test_dev_file_evaluates_by_writing_predictions(dataset, tmp_path):
    """A COCO test-dev style JSON (no 'annotations') registers and evaluates as in detectron2: images
    without objects, predictions written for submission, no AP. --eval-only checks the class count of
    the test set only: the training set here has 3 classes and is not used."""
    d = dataset()
    test_dev = {k: v for k, v in d.coco.items() if k != "annotations"}
    test_dev_json = tmp_path / "test_dev.json"
    test_dev_json.write_text(json.dumps(test_dev))
    three_classes = dataset(edit=lambda c: c["categories"].append({"id": 3, "name": "c"}))
    cfg = d.cfg("DATASETS.TRAIN", f"('{three_classes.name}',)", "DATASETS.TEST", "('bad_input_test_dev',)",
                "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 96, "OUTPUT_DIR", tmp_path / "out")
    try:
        results = _eval_only(cfg, tmp_path, f"bad_input_test_dev={test_dev_json}:{d.image_root}")
        assert "bbox" not in results  # no AP without ground truth
        predictions = json.loads((tmp_path / "out" / "inference" / "bad_input_test_dev" / "coco_instances_results.json").read_text())
        assert predictions and {p["image_id"] for p in predictions} <= {1, 2, 3, 4}
        assert {p["category_id"] for p in predictions} <= {1, 2}  # the JSON's category ids
        with pytest.raises(ValueError, match=r"no 'annotations' key"):  # but it is not trained on
            train_net.Trainer.build_train_loader(d.cfg("DATASETS.TRAIN", "('bad_input_test_dev',)"))
    finally:
        DatasetCatalog.remove("bad_input_test_dev")
        MetadataCatalog.remove("bad_input_test_dev")


def test_a_broken_test_set_stops_training_before_the_first_step(dataset, tmp_path):
    """The evaluation set is checked with the training set: a truncated val image is named when the
    trainer is built, not at the first evaluation after the training time. A test-dev style set (no
    'annotations') passes the same check."""
    train, val = dataset(), dataset()
    broken = val.image_root / "3.jpg"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated
    cfg = train.cfg("DATASETS.TEST", f"('{val.name}',)", "OUTPUT_DIR", tmp_path / "out")
    with pytest.raises(ValueError, match=rf"Dataset '{val.name}', image '.*3\.jpg' \(image_id 3\)"):
        train_net.Trainer(cfg)
    test_dev_json = tmp_path / "test_dev_ok.json"
    test_dev_json.write_text(json.dumps({k: v for k, v in train.coco.items() if k != "annotations"}))
    register_coco_instances("bad_input_test_dev_ok", {}, str(test_dev_json), str(train.image_root))
    try:
        trainer = train_net.Trainer(train.cfg("DATASETS.TEST", "('bad_input_test_dev_ok',)", "OUTPUT_DIR", tmp_path / "out2"))
        assert trainer.max_iter == 2
    finally:
        DatasetCatalog.remove("bad_input_test_dev_ok")
        MetadataCatalog.remove("bad_input_test_dev_ok")


def test_class_count_advice_comes_from_the_datasets_used(dataset):
    two, three = dataset(), dataset(edit=lambda c: c["categories"].append({"id": 3, "name": "c"}))
    MetadataCatalog.get(two.name).set(thing_classes=["a", "b"])
    MetadataCatalog.get(three.name).set(thing_classes=["a", "b", "c"])
    cfg = two.cfg("DATASETS.TRAIN", f"('{three.name}',)", "DATASETS.TEST", f"('{two.name}',)",
                  "MODEL.HYBRID_DETR.NUM_CLASSES", 5)
    with pytest.raises(ValueError, match=rf"Dataset '{two.name}' has 2 classes .* set MODEL\.HYBRID_DETR\.NUM_CLASSES 2"):
        check_num_classes(cfg, eval_only=True)
    with pytest.raises(ValueError, match=rf"different numbers of classes \('{three.name}' 3, '{two.name}' 2\)"):
        check_num_classes(cfg)
    cfg.MODEL.HYBRID_DETR.NUM_CLASSES = 2
    cfg.DATASETS.TRAIN = ("not_registered",)
    check_num_classes(cfg, eval_only=True)  # the training set is not used


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "configs", "quickstart", "deformable_detr_r18_synthetic.yaml")


def test_config_key_typo():
    with pytest.raises(KeyError, match=r"SOLVER\.MAX_ITR.*did you mean SOLVER\.MAX_ITER"):
        load_config(CONFIG, ["SOLVER.MAX_ITR", "10"])


def test_config_wrong_type_on_the_command_line():
    with pytest.raises(ValueError, match=r"Type mismatch.*SOLVER\.MAX_ITER"):
        load_config(CONFIG, ["SOLVER.MAX_ITER", "ten"])


def test_config_wrong_type_in_a_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{CONFIG}"\nMODEL:\n  HYBRID_DETR:\n    NUM_QUERIES: "many"\n')
    with pytest.raises(ValueError, match=r"Type mismatch.*MODEL\.HYBRID_DETR\.NUM_QUERIES"):
        load_config(str(bad))


def _train_cfg(**overrides):
    cfg = tiny_cfg(**overrides)
    cfg.DATASETS.TRAIN = ("hybrid_synthetic_train",)
    return cfg


def test_unknown_mode():
    cfg = _train_cfg(DECODER_MODE="dino")
    with pytest.raises(ValueError, match=r"Unknown MODEL\.HYBRID_DETR\.DECODER_MODE 'dino'"):
        check_config(cfg, 1)


def test_smca_levels_out_of_range():
    cfg = tiny_cfg(DECODER_MODE="smca")
    cfg.MODEL.HYBRID_DETR.SMCA.LEVELS = [0, 1, 5]
    with pytest.raises(ValueError, match=r"SMCA\.LEVELS must be distinct indices in \[0, 4\).*\[0, 1, 5\]"):
        train_net.Trainer.build_model(cfg)


def test_co_detr_aux_heads_out_of_range():
    cfg = tiny_cfg(DECODER_MODE="co_detr")
    cfg.MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS = 3
    with pytest.raises(ValueError, match=r"CO_DETR\.NUM_AUX_HEADS must be 0.*got 3"):
        train_net.Trainer.build_model(cfg)


def test_batch_not_divisible_by_the_workers():
    cfg = _train_cfg()
    cfg.SOLVER.IMS_PER_BATCH = 3
    with pytest.raises(ValueError, match=r"SOLVER\.IMS_PER_BATCH \(3\).*multiple of the number of workers \(2\)"):
        check_config(cfg, 2)
    check_config(cfg, 1)
    cfg.SOLVER.IMS_PER_BATCH = 4
    check_config(cfg, 2)


@pytest.mark.parametrize("key, value, match", [
    ("SOLVER.STEPS", (60, 20), r"SOLVER\.STEPS \(60, 20\) must be increasing iterations > 0"),
    ("SOLVER.CHECKPOINT_PERIOD", 0, r"SOLVER\.CHECKPOINT_PERIOD must be > 0"),
    ("DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler", r"SAMPLER_TRAIN 'RepeatFactorTrainingSampler' is not supported"),
    ("MODEL.HYBRID_DETR.NHEADS", 5, r"HIDDEN_DIM \(64\) must be divisible by MODEL\.HYBRID_DETR\.NHEADS \(5\)"),
    ("MODEL.HYBRID_DETR.NUM_FEATURE_LEVELS", 2, r"NUM_FEATURE_LEVELS \(2\) is smaller"),
    ("DATASETS.TRAIN", (), r"DATASETS\.TRAIN is empty"),
])
def test_contradicting_options(key, value, match):
    cfg = _train_cfg()
    cfg.SOLVER.MAX_ITER = 100
    cfg.SOLVER.STEPS = (50,)
    *path, leaf = key.split(".")
    node = cfg
    for part in path:
        node = node[part]
    node[leaf] = value
    with pytest.raises(ValueError, match=match):
        check_config(cfg, 1)


# ------------------------------------------------------------------------------------------------
# Training: non-finite values
# ------------------------------------------------------------------------------------------------
def test_matcher_refuses_non_finite_predictions():
    matcher = HungarianMatcher()
    logits, boxes = torch.zeros(2, 5, 3), torch.full((2, 5, 4), 0.3)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]])}] * 2
    assert len(matcher(logits, boxes, targets)) == 2
    logits[1, 3, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite predicted logits for 1 queries \(batch images \[1\], e\.g\. query 3"):
        matcher(logits, boxes, targets)
    logits[1, 3, 0] = 0.0
    boxes[0, 2, 1] = float("inf")
    with pytest.raises(FloatingPointError, match=r"non-finite predicted boxes"):
        matcher(logits, boxes, targets)
    no_objects = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    with pytest.raises(FloatingPointError):  # not an empty assignment
        matcher(logits, boxes, no_objects)


def _trainer(d, tmp_path, *opts):
    cfg = d.cfg("SOLVER.MAX_ITER", 4, "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", 1,
                "OUTPUT_DIR", tmp_path / "out", *opts)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer


def test_nan_loss_stops_training_naming_iteration_term_and_images(dataset, tmp_path):
    trainer = _trainer(dataset(), tmp_path)
    model = trainer.model.model  # the guard wraps the model
    forward = model.forward

    def nan_at_iteration_2(batch):
        losses = forward(batch)
        if trainer.iter == 2:
            losses["loss_giou_0"] = losses["loss_giou_0"] * float("nan")
        return losses

    model.forward = nan_at_iteration_2
    with pytest.raises(FloatingPointError, match=r"iteration 2.*\n.*worker 0, image ids \[\d, \d\]: loss_giou_0=nan"):
        trainer.train()
    out = tmp_path / "out"
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (out / "model_0000002.pth").exists() and not (out / "model_final.pth").exists()
    weights = torch.load(out / "model_0000001.pth", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_nan_prediction_stops_training_at_the_matcher(dataset, tmp_path):
    trainer = _trainer(dataset(), tmp_path)
    model = trainer.model.model
    with torch.no_grad():
        for head in model.decoder.heads.class_heads:
            head.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"(?s)iteration 0.*image ids \[\d, \d\]: HungarianMatcher: non-finite predicted logits"):
        trainer.train()
    assert not (tmp_path / "out" / "last_checkpoint").exists()


# ------------------------------------------------------------------------------------------------
# Checkpoints and weights
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return train_net.Trainer.build_model(tiny_cfg())


def _load(model, path):
    HybridCheckpointer(model).resume_or_load(str(path), resume=False)


def test_weights_missing_file(model, tmp_path):
    with pytest.raises(CheckpointError, match=r"MODEL\.WEIGHTS file not found: .*nothing\.pth"):
        _load(model, tmp_path / "nothing.pth")


def test_weights_truncated(model, tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": model.state_dict()}, good)
    _load(model, good)
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"truncated\.pth is truncated or not a PyTorch checkpoint"):
        _load(model, bad)


def test_weights_not_a_checkpoint(model, tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.pth is (truncated or )?not a PyTorch checkpoint"):
        _load(model, bad)


def test_weights_truncated_pkl(model, tmp_path):
    bad = tmp_path / "R-50.pkl"
    bad.write_bytes(b"\x80\x04\x95\x10\x00")
    with pytest.raises(CheckpointError, match=r"R-50\.pkl is truncated or not a PyTorch checkpoint"):
        _load(model, bad)


def test_weights_of_another_model(model, tmp_path):
    foreign = tmp_path / "classifier.pth"
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).state_dict(), foreign)
    with pytest.raises(CheckpointError, match=r"classifier\.pth: none of its 4 tensors \(e\.g\. 0\.weight.*another model"):
        _load(model, foreign)


class _Payload:
    pass


def test_weights_with_arbitrary_python_objects_are_not_unpickled(model, tmp_path):
    bad = tmp_path / "pickled.pth"
    torch.save({"model": model.state_dict(), "extra": _Payload()}, bad)
    with pytest.raises(CheckpointError, match=r"pickled\.pth holds Python objects.*weights_only=True"):
        _load(model, bad)


def test_unreachable_weights_url(model):
    url = "http://127.0.0.1:9/ImageNetPretrained/R-50.pkl"  # port 9: nothing listens
    with pytest.raises(CheckpointError, match=r"Could not download the weights 'http://127\.0\.0\.1:9/.*R-50\.pkl'.*MODEL\.WEIGHTS /path/to/R-50\.pkl"):
        _load(model, url)
