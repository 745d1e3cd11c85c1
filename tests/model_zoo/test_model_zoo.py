"""The model zoo serves every shipped config, and every shipped config loads."""
import os

import pytest

from hybrid_detr import model_zoo
from hybrid_detr.model_zoo import model_zoo as zoo_module

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(ROOT, "configs")

# What the training-tools issue promises; the modes' helpers add their own configs beside these.
REQUIRED = [
    "quickstart/deformable_detr_r18_synthetic.yaml",
    "coco/deformable_detr_r50_12ep.yaml",
    "coco/deformable_detr_r50_50ep.yaml",
    "coco/deformable_detr_r50_box_refine_50ep.yaml",
    "coco/deformable_detr_r50_two_stage_50ep.yaml",
]


def test_lists_model_configs_not_bases(monkeypatch, tmp_path):
    """Every .yaml below the config root, by its relative path, except the Base-* files."""
    for name in ["a.yaml", "Base-X.yaml", "coco/b.yaml", "coco/Base-Y.yaml", "quickstart/deep/c.yaml", "notes.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    monkeypatch.setattr(zoo_module, "_CONFIG_ROOTS", (str(tmp_path),))
    assert model_zoo.list_configs() == ["a.yaml", "coco/b.yaml", "quickstart/deep/c.yaml"]


def test_ships_the_required_configs():
    assert set(REQUIRED) <= set(model_zoo.list_configs())


@pytest.mark.parametrize("name", model_zoo.list_configs())
def test_every_config_file_exists_and_loads(name):
    path = model_zoo.get_config_file(name)
    assert os.path.isfile(path)
    assert os.path.samefile(path, os.path.join(CONFIG_DIR, name))
    assert os.path.samefile(model_zoo.get_config_file(name[: -len(".yaml")]), path)  # ".yaml" optional
    cfg = model_zoo.get_config(name)
    assert cfg.MODEL.META_ARCHITECTURE == "HybridDETR"
    assert cfg.SOLVER.OPTIMIZER == "ADAMW"
    # Every config names datasets the trainer can load.
    assert cfg.DATASETS.TRAIN and cfg.DATASETS.TEST


def test_coco_configs_follow_the_paper():
    for name in [n for n in REQUIRED if n.startswith("coco/")]:
        cfg = model_zoo.get_config(name)
        assert cfg.DATASETS.TRAIN == ("coco_2017_train",) and cfg.DATASETS.TEST == ("coco_2017_val",)
        assert cfg.MODEL.WEIGHTS.endswith("R-50.pkl") and cfg.MODEL.RESNETS.DEPTH == 50
        assert cfg.SOLVER.BASE_LR == 2e-4 and cfg.SOLVER.WEIGHT_DECAY == 1e-4
        assert cfg.SOLVER.BACKBONE_MULTIPLIER == 0.1 and cfg.SOLVER.LINEAR_PROJ_MULTIPLIER == 0.1
        clip = cfg.SOLVER.CLIP_GRADIENTS
        assert clip.ENABLED and clip.CLIP_TYPE == "full_model" and clip.CLIP_VALUE == 0.1
        assert cfg.SOLVER.IMS_PER_BATCH == 32
        assert not cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS  # the official code trains on the empty images too
        iters_per_epoch = 3696  # ceil(118,287 / 8) images per process, 4 at a time
        epochs = 12 if "12ep" in name else 50
        drop = 11 if epochs == 12 else 40
        assert cfg.SOLVER.MAX_ITER == epochs * iters_per_epoch
        assert cfg.SOLVER.STEPS == (drop * iters_per_epoch,)
        assert cfg.INPUT.MIN_SIZE_TRAIN == tuple(range(480, 801, 32)) and cfg.INPUT.MAX_SIZE_TRAIN == 1333
        assert cfg.INPUT.CROP.ENABLED
    refine = model_zoo.get_config("coco/deformable_detr_r50_box_refine_50ep")
    assert refine.MODEL.HYBRID_DETR.WITH_BOX_REFINE and not refine.MODEL.HYBRID_DETR.TWO_STAGE
    two_stage = model_zoo.get_config("coco/deformable_detr_r50_two_stage_50ep")
    assert two_stage.MODEL.HYBRID_DETR.WITH_BOX_REFINE and two_stage.MODEL.HYBRID_DETR.TWO_STAGE


def test_unknown_name_and_trained_weights_raise_clear_errors():
    with pytest.raises(RuntimeError, match="not in HybridDETR's model zoo.*deformable_detr_r50_50ep"):
        model_zoo.get_config_file("coco/no_such_config.yaml")
    with pytest.raises(RuntimeError, match="No trained weights are published"):
        model_zoo.get_config("coco/deformable_detr_r50_50ep.yaml", trained=True)
    with pytest.raises(RuntimeError, match="No trained weights are published"):
        model_zoo.get("quickstart/deformable_detr_r18_synthetic.yaml", trained=True)


def test_falls_back_to_the_repository_configs(monkeypatch, tmp_path):
    """A checkout used without `pip install` has no package link: configs/ of the repo is used."""
    monkeypatch.setattr(zoo_module, "_CONFIG_ROOTS", (str(tmp_path / "missing"), CONFIG_DIR))
    assert os.path.samefile(model_zoo.get_config_file(REQUIRED[0]), os.path.join(CONFIG_DIR, REQUIRED[0]))
    monkeypatch.setattr(zoo_module, "_CONFIG_ROOTS", (str(tmp_path / "missing"),))
    with pytest.raises(RuntimeError, match="configs are missing"):
        model_zoo.get_config_file(REQUIRED[0])


def test_get_builds_the_quickstart_model():
    model = model_zoo.get("quickstart/deformable_detr_r18_synthetic.yaml", device="cpu")
    assert type(model).__name__ == "HybridDETR" and model.training
    assert next(model.parameters()).device.type == "cpu"
