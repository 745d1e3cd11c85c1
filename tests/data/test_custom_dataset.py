"""Your own COCO-format data from the command line (`train_net.py --dataset NAME=JSON:IMAGE_DIR`),
and fine-tuning from a checkpoint with another class count."""
import json
import os

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from PIL import Image, ImageDraw

import train_net
from hybrid_detr.checkpoint import HybridCheckpointer
from hybrid_detr.config import load_config
from hybrid_detr.data.custom import parse_dataset_spec, register_coco_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = os.path.join(ROOT, "configs", "Base-HybridDETR.yaml")
CONFIG = """\
_BASE_: "{base}"
MODEL:
  DEVICE: "cpu"
  WEIGHTS: ""
  BACKBONE: {{FREEZE_AT: 0}}
  RESNETS: {{DEPTH: 18, RES2_OUT_CHANNELS: 64, NORM: "GN"}}
  HYBRID_DETR: {{NUM_CLASSES: 2, HIDDEN_DIM: 32, NHEADS: 2, ENC_LAYERS: 1, DEC_LAYERS: 2, DIM_FEEDFORWARD: 64, NUM_QUERIES: 10, DROPOUT: 0.0}}
DATASETS:
  TRAIN: ("mine_train",)
  TEST: ("mine_val",)
SOLVER:
  IMS_PER_BATCH: 2
  MAX_ITER: 2
  STEPS: (1,)
  CHECKPOINT_PERIOD: 100
INPUT:
  MIN_SIZE_TRAIN: (64,)
  MAX_SIZE_TRAIN: 96
  MIN_SIZE_TEST: 64
  MAX_SIZE_TEST: 96
  CROP: {{ENABLED: False}}
  DETR_CROP_RESIZE: [64]
DATALOADER: {{NUM_WORKERS: 0}}
SEED: 0
"""


def write_coco(folder, num_images=4):
    """A tiny COCO-format set: rectangles ("box", id 3) and ellipses ("disc", id 7) on noise."""
    images_dir = folder / "images"
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    g = torch.Generator().manual_seed(0)
    for i in range(num_images):
        w, h = 96, 80
        image = Image.fromarray((torch.rand(h, w, 3, generator=g) * 60).byte().numpy())
        draw = ImageDraw.Draw(image)
        draw.rectangle([10, 10, 40, 50], fill=(200, 40, 40))
        draw.ellipse([50, 20, 85, 60], fill=(40, 200, 40))
        name = f"im{i}.png"
        image.save(images_dir / name)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        annotations.append({"id": 2 * i + 1, "image_id": i + 1, "category_id": 3, "bbox": [10, 10, 31, 41], "area": 31 * 41, "iscrowd": 0})
        annotations.append({"id": 2 * i + 2, "image_id": i + 1, "category_id": 7, "bbox": [50, 20, 36, 41], "area": 36 * 41, "iscrowd": 0})
    categories = [{"id": 3, "name": "box"}, {"id": 7, "name": "disc"}]
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(path), str(images_dir)


@pytest.fixture()
def mine(tmp_path):
    json_file, image_root = write_coco(tmp_path / "mine")
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(base=BASE))
    yield json_file, image_root, str(config), tmp_path
    for name in ("mine_train", "mine_val"):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_spec_parsing():
    assert parse_dataset_spec("a=/x/y.json:/imgs") == ("a", "/x/y.json", "/imgs")
    assert parse_dataset_spec("a=C:/x.json:/imgs") == ("a", "C:/x.json", "/imgs")
    with pytest.raises(ValueError, match="NAME=ANNOTATIONS.json:IMAGE_DIR"):
        parse_dataset_spec("a=/x/y.json")


def test_train_and_evaluate_on_a_dataset_named_on_the_command_line(mine):
    json_file, image_root, config, tmp = mine
    spec = f"{json_file}:{image_root}"
    args = train_net.argument_parser().parse_args(
        ["--config-file", config, "--dataset", f"mine_train={spec}", "--dataset", f"mine_val={spec}",
         "OUTPUT_DIR", str(tmp / "out")]
    )
    train_net.main(args)
    assert MetadataCatalog.get("mine_train").thing_classes == ["box", "disc"]
    assert os.path.isfile(tmp / "out" / "model_final.pth")
    rows = [json.loads(line) for line in open(tmp / "out" / "metrics.json")]
    assert any("bbox/AP" in row for row in rows)  # COCO evaluation on the custom val set ran


def test_class_count_must_match_the_json(mine):
    json_file, image_root, config, tmp = mine
    args = train_net.argument_parser().parse_args(
        ["--config-file", config, "--dataset", f"mine_train={json_file}:{image_root}",
         "--dataset", f"mine_val={json_file}:{image_root}", "MODEL.HYBRID_DETR.NUM_CLASSES", "5",
         "OUTPUT_DIR", str(tmp / "out")]
    )
    with pytest.raises(ValueError, match="'mine_train' has 2 classes but MODEL.HYBRID_DETR.NUM_CLASSES is 5"):
        train_net.main(args)


def test_broken_json_is_named_at_registration(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="'mine_broken', annotation file .*bad.json.*not valid JSON"):
        register_coco_dataset("mine_broken", str(bad), str(tmp_path))


def test_finetuning_loads_everything_but_the_class_heads(mine):
    _, _, config, tmp = mine
    coco_cfg = load_config(config, ["MODEL.HYBRID_DETR.NUM_CLASSES", "6"])
    torch.manual_seed(0)
    source = build_model(coco_cfg)
    path = tmp / "six_classes.pth"
    torch.save({"model": source.state_dict()}, path)
    torch.manual_seed(1)
    target = build_model(load_config(config))
    HybridCheckpointer(target).load(str(path))
    src, dst = source.state_dict(), target.state_dict()
    heads = [k for k in dst if "class_heads" in k]
    assert heads and all(dst[k].shape != src[k].shape for k in heads)  # new 2-class heads
    loaded = [k for k in dst if k not in heads]
    assert all(torch.equal(dst[k], src[k]) for k in loaded)
