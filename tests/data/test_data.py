"""Tests of hybrid_detr.data: synthetic dataset, registration, validation, DETR mapper."""
import collections
import concurrent.futures
import json
import multiprocessing
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from hybrid_detr.config import add_hybrid_detr_config
from hybrid_detr.data import (
    CROWDED_CLASSES,
    SYNTHETIC_CLASSES,
    DetrDatasetMapper,
    build_detr_augmentation,
    ensure_split,
    dataset_statistics,
    ensure_synthetic_dataset,
    generate_split,
    register_synthetic_datasets,
    validate_dataset_dicts,
)

NUM_CLASSES = len(SYNTHETIC_CLASSES)


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    """40 small images; returns (split dir, parsed COCO JSON)."""
    out = tmp_path_factory.mktemp("synth") / "train"
    generate_split(str(out), "train", num_images=40, min_side=128, max_side=160)
    with open(out / "instances.json") as f:
        return out, json.load(f)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
def test_generation_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate_split(str(a), "val", num_images=12, min_side=128, max_side=160)
    generate_split(str(b), "val", num_images=12, min_side=128, max_side=160)
    assert (a / "instances.json").read_bytes() == (b / "instances.json").read_bytes()
    np.testing.assert_array_equal(
        np.asarray(Image.open(a / "images" / "000003.jpg")),
        np.asarray(Image.open(b / "images" / "000003.jpg")),
    )
    # Another seed or split gives other data.
    c = tmp_path / "c"
    generate_split(str(c), "val", num_images=12, min_side=128, max_side=160, seed=1)
    assert (a / "instances.json").read_bytes() != (c / "instances.json").read_bytes()


def test_variety_empty_images_and_boxes_inside(tiny_split):
    out, coco = tiny_split
    images = {im["id"]: im for im in coco["images"]}
    assert len(images) == 40
    assert [c["name"] for c in coco["categories"]] == list(SYNTHETIC_CLASSES)
    anns = coco["annotations"]
    classes = collections.Counter(a["category_id"] for a in anns)
    assert len(classes) == NUM_CLASSES, classes
    per_image = collections.Counter(a["image_id"] for a in anns)
    assert any(i not in per_image for i in images), "expected some images without objects"
    assert max(per_image.values()) >= 3
    assert len({(im["width"], im["height"]) for im in images.values()}) > 5
    rel_sizes = []
    for a in anns:
        im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert a["iscrowd"] == 0 and a["area"] > 0
        assert w > 0 and h > 0
        assert x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
        rel_sizes.append(max(w, h) / min(im["width"], im["height"]))
    assert min(rel_sizes) >= 0.07 and max(rel_sizes) <= 0.65
    assert max(rel_sizes) - min(rel_sizes) > 0.2
    im = Image.open(out / "images" / coco["images"][0]["file_name"])
    assert im.size == (coco["images"][0]["width"], coco["images"][0]["height"])
    assert im.mode == "RGB"


def test_coco_json_loads_with_pycocotools(tiny_split):
    from pycocotools.coco import COCO

    out, coco = tiny_split
    api = COCO(str(out / "instances.json"))
    assert len(api.getImgIds()) == 40
    assert len(api.getAnnIds()) == len(coco["annotations"])
    assert sorted(api.getCatIds()) == list(range(1, NUM_CLASSES + 1))


def test_ensure_split_regenerates_stale_and_is_cached(tmp_path):
    kw = dict(min_side=128, max_side=160)
    json_file = ensure_split(str(tmp_path), "val", num_images=3, **kw)
    assert len(json.load(open(json_file))["images"]) == 3
    mtime = os.path.getmtime(json_file)
    assert ensure_split(str(tmp_path), "val", num_images=3, **kw) == json_file
    assert os.path.getmtime(json_file) == mtime  # not regenerated
    ensure_split(str(tmp_path), "val", num_images=5, **kw)  # other parameters: replaced
    assert len(json.load(open(json_file))["images"]) == 5
    assert sorted(os.listdir(tmp_path / "hybrid_synthetic")) == ["val"]  # no temp dirs left


def _ensure_in_subprocess(root):
    return ensure_split(root, "train", num_images=25, min_side=128, max_side=160)


def test_concurrent_generation_is_safe(tmp_path):
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(3, mp_context=ctx) as pool:
        paths = list(pool.map(_ensure_in_subprocess, [str(tmp_path)] * 3))
    assert len(set(paths)) == 1
    coco = json.load(open(paths[0]))
    assert len(coco["images"]) == 25
    assert sorted(os.listdir(tmp_path / "hybrid_synthetic")) == ["train"]
    assert len(os.listdir(tmp_path / "hybrid_synthetic" / "train" / "images")) == 25


def test_crowded_style_is_deterministic_and_close_to_coco_statistics(tmp_path):
    # 150 images of the crowded style (the second embedded dataset): COCO-like counts (mean about 7, a
    # long tail, few empty images), all three scales well represented, the 23 classes in unequal numbers.
    a, b = tmp_path / "a", tmp_path / "b"
    generate_split(str(a), "val", num_images=150, style="crowded")
    generate_split(str(b), "val", num_images=6, style="crowded")
    first = json.loads((a / "instances.json").read_text())
    small = json.loads((b / "instances.json").read_text())
    assert small["annotations"] == [x for x in first["annotations"] if x["image_id"] <= 6]  # one image stream
    assert [c["name"] for c in first["categories"]] == list(CROWDED_CLASSES) and len(CROWDED_CLASSES) >= 20
    stats = dataset_statistics(str(a / "instances.json"))
    assert 5.0 <= stats["objects_per_image_mean"] <= 10.0
    assert stats["objects_per_image_max"] >= 25 and stats["images_over_20_objects"] > 0.02
    assert stats["images_without_objects"] < 0.1
    assert all(0.15 <= share <= 0.5 for share in stats["scale_shares"].values())
    counts = stats["class_counts"]
    assert counts[0] > 3 * counts[-1] > 0  # the first class is far more frequent than the last
    sides = [max(img["width"], img["height"]) for img in first["images"]]
    assert max(sides) <= 256  # trainable on 2 CPU cores
    # The quickstart's style is untouched by the crowded one.
    shapes = tmp_path / "shapes"
    generate_split(str(shapes), "val", num_images=20)
    assert dataset_statistics(str(shapes / "instances.json"))["objects_per_image_max"] <= 5


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
def test_default_datasets_registered_on_import():
    import hybrid_detr.data  # noqa: F401

    for name in ("hybrid_synthetic_train", "hybrid_synthetic_val"):
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == list(SYNTHETIC_CLASSES)
        assert meta.evaluator_type == "coco"
        assert meta.json_file.endswith(os.path.join("hybrid_synthetic", name.split("_")[-1], "instances.json"))
    assert ensure_synthetic_dataset("coco_2017_val") is None
    assert MetadataCatalog.get("hybrid_crowded_val").thing_classes == list(CROWDED_CLASSES)
    assert MetadataCatalog.get("hybrid_crowded_train").json_file.endswith(
        os.path.join("hybrid_crowded", "train", "instances.json"))
    assert MetadataCatalog.get("hybrid_synthetic_val1000").json_file.endswith(
        os.path.join("hybrid_synthetic", "val1000", "instances.json"))


def test_registration_generates_on_first_use(tmp_path):
    names = register_synthetic_datasets(
        root=str(tmp_path), num_train=6, num_val=4, prefix="test_tiny_synth", min_side=128, max_side=160
    )
    # Idempotent: registering again does not crash.
    names = register_synthetic_datasets(
        root=str(tmp_path), num_train=6, num_val=4, prefix="test_tiny_synth", min_side=128, max_side=160
    )
    assert names == ("test_tiny_synth_train", "test_tiny_synth_val")
    meta = MetadataCatalog.get("test_tiny_synth_train")
    assert not os.path.exists(meta.json_file)  # lazily generated
    dicts = DatasetCatalog.get("test_tiny_synth_train")
    assert os.path.isfile(meta.json_file)
    assert len(dicts) == 6
    for d in dicts:
        assert os.path.isfile(d["file_name"])
        assert {"height", "width", "image_id", "annotations"} <= set(d)
        for a in d["annotations"]:
            assert 0 <= a["category_id"] < NUM_CLASSES
            assert a["bbox_mode"] == BoxMode.XYWH_ABS
    assert meta.thing_dataset_id_to_contiguous_id == {k + 1: k for k in range(NUM_CLASSES)}
    # The evaluator path: ensure_synthetic_dataset creates the JSON without loading the dicts.
    val_json = MetadataCatalog.get("test_tiny_synth_val").json_file
    assert not os.path.exists(val_json)
    assert ensure_synthetic_dataset("test_tiny_synth_val") == val_json
    assert os.path.isfile(val_json)


def test_coco_evaluator_on_ground_truth(tmp_path):
    """Ground truth fed back as predictions scores AP 100 through detectron2's COCOEvaluator."""
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, Instances

    (name,) = [
        n
        for n in register_synthetic_datasets(
            root=str(tmp_path), num_train=2, num_val=8, prefix="test_eval_synth", min_side=128, max_side=160
        )
        if n.endswith("val")
    ]
    ensure_synthetic_dataset(name)
    dicts = DatasetCatalog.get(name)
    evaluator = COCOEvaluator(name, tasks=("bbox",), distributed=False, use_fast_impl=False)
    evaluator.reset()
    for d in dicts:
        inst = Instances((d["height"], d["width"]))
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in d["annotations"]]
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.ones(len(boxes))
        inst.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]], dtype=torch.int64)
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    res = evaluator.evaluate()
    assert res["bbox"]["AP50"] == pytest.approx(100.0)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def _record(bbox=(10, 10, 20, 20), category_id=1, **kw):
    rec = {
        "file_name": "/data/img_7.jpg",
        "image_id": 7,
        "height": 100,
        "width": 120,
        "annotations": [{"bbox": list(bbox), "bbox_mode": BoxMode.XYWH_ABS, "category_id": category_id}],
    }
    rec.update(kw)
    return rec


def test_validation_accepts_good_and_empty_records():
    validate_dataset_dicts(
        [_record(), _record(annotations=[], image_id=8), _record(bbox=(0, 0, 120, 100), image_id=9)], 3, "ok"
    )
    validate_dataset_dicts([{"file_name": "a.jpg", "height": 5, "width": 5}], 3, "ok")
    xyxy = _record()
    xyxy["annotations"][0].update(bbox=[10, 10, 30, 30], bbox_mode=BoxMode.XYXY_ABS)
    validate_dataset_dicts([xyxy], 3, "ok")


@pytest.mark.parametrize(
    "record, match",
    [
        (_record(bbox=(10, float("nan"), 20, 20)), "not finite"),
        (_record(bbox=(10, 10, float("inf"), 20)), "not finite"),
        (_record(bbox=(10, 10, -5, 20)), "negative size"),
        (_record(bbox=(10, 10, 20, -1)), "negative size"),
        (_record(bbox=(500, 10, 20, 20)), "far outside"),
        (_record(bbox=(-40, 10, 20, 20)), "far outside"),
        (_record(bbox=(10, 10, 20, 20, 3)), "not 4 numbers"),
        (_record(category_id=3), r"category_id 3 is out of range \[0, 3\)"),
        (_record(category_id=-1), "out of range"),
        (_record(height=None), "missing image size"),
        ({"file_name": "/data/img_7.jpg", "width": 10, "annotations": []}, "missing image size"),
        (_record(width=0), "invalid image size"),
        (_record(bbox=(10, 10, 0, 20)), "zero size"),
        (_record(), "duplicate image_id 7"),
    ],
)
def test_validation_errors(record, match):
    with pytest.raises(ValueError, match=match) as info:
        validate_dataset_dicts([_record(), record], 3, "my_broken_set")
    assert "my_broken_set" in str(info.value)
    assert "/data/img_7.jpg" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Mapper
# ---------------------------------------------------------------------------------------------
def _cfg(crop=False):
    cfg = get_cfg()
    add_hybrid_detr_config(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN = (256,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.MIN_SIZE_TEST = 200
    cfg.INPUT.MAX_SIZE_TEST = 1000
    cfg.INPUT.CROP.ENABLED = crop
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = [64, 64]
    cfg.INPUT.DETR_CROP_RESIZE = [256]
    return cfg


def _image_record(tmp_path, boxes_xyxy, size=256):
    path = tmp_path / f"img_{len(boxes_xyxy)}.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return {
        "file_name": str(path),
        "image_id": 1,
        "height": size,
        "width": size,
        "annotations": [
            {"bbox": list(b), "bbox_mode": BoxMode.XYXY_ABS, "category_id": k % NUM_CLASSES, "iscrowd": 0}
            for k, b in enumerate(boxes_xyxy)
        ],
    }


def test_augmentation_composition():
    augs = build_detr_augmentation(_cfg(crop=True), is_train=True)
    assert [type(a) for a in augs] == [T.RandomFlip, T.RandomApply, T.ResizeShortestEdge]
    assert [type(a) for a in build_detr_augmentation(_cfg(crop=False), is_train=True)] == [
        T.RandomFlip,
        T.ResizeShortestEdge,
    ]
    test_augs = build_detr_augmentation(_cfg(crop=True), is_train=False)
    assert [type(a) for a in test_augs] == [T.ResizeShortestEdge]


def test_mapper_with_and_without_annotations(tmp_path):
    mapper = DetrDatasetMapper(_cfg(crop=False), is_train=True)
    boxes = [[10, 20, 60, 90], [100, 100, 200, 250]]
    out = mapper(_image_record(tmp_path, boxes, size=128))
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 256, 256)
    inst = out["instances"]
    assert len(inst) == 2
    assert inst.gt_classes.tolist() == [0, 1]
    b = inst.gt_boxes.tensor
    assert (b >= 0).all() and (b[:, 2:] <= 256).all()
    # 128 -> 256 doubles everything; the second box is first clipped to the 128 px image.
    assert b.tolist() == [[20.0, 40.0, 120.0, 180.0], [200.0, 200.0, 256.0, 256.0]] or b.tolist() == [
        [136.0, 40.0, 236.0, 180.0],
        [0.0, 200.0, 56.0, 256.0],
    ]  # unflipped or flipped

    empty = mapper(_image_record(tmp_path, [], size=128))
    assert empty["image"].shape == (3, 256, 256)
    assert len(empty["instances"]) == 0
    assert empty["instances"].gt_boxes.tensor.shape == (0, 4)
    assert empty["instances"].gt_classes.shape == (0,)

    test_mapper = DetrDatasetMapper(_cfg(crop=False), is_train=False)
    out = test_mapper(_image_record(tmp_path, boxes, size=128))
    assert out["image"].shape == (3, 200, 200)
    assert "instances" not in out and "annotations" not in out


def test_crop_branch_drops_boxes_outside_the_crop(tmp_path):
    # Four 40 px boxes in the corners of a 256 px image: a 64 px crop can touch at most one.
    corners = [[0, 0, 40, 40], [216, 0, 256, 40], [0, 216, 40, 256], [216, 216, 256, 256]]
    record = _image_record(tmp_path, corners, size=256)
    mapper = DetrDatasetMapper(_cfg(crop=True), is_train=True, crop_prob=1.0)
    np.random.seed(0)
    counts = []
    for _ in range(20):
        out = mapper(record)
        assert out["image"].shape == (3, 256, 256)  # 64 px crop resized back to 256
        inst = out["instances"]
        counts.append(len(inst))
        assert len(inst) <= 1
        if len(inst):
            assert inst.gt_boxes.nonempty().all()
            b = inst.gt_boxes.tensor
            assert (b >= 0).all() and (b <= 256).all()
    assert 0 in counts  # crops between the corners keep empty Instances
    assert record["annotations"] and len(record["annotations"]) == 4  # input not modified
