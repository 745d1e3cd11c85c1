"""train_net.py end to end on a tiny model and a tiny synthetic dataset (CPU).

The dataset (a dozen 96-128 px images) is generated in a temporary folder; the model has one
encoder and two decoder layers of width 32 on a ResNet-18.
"""
import json
import os
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser

import train_net
from tiny_runs import BASE_CONFIG, TINY_CONFIG  # the tiny model and dataset config the engine tests share
from hybrid_detr.data import SYNTHETIC_CLASSES, register_synthetic_datasets
from hybrid_detr.config import load_config
from hybrid_detr.engine import build_optimizer, get_param_groups

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROJECT_DIR = os.path.join(ROOT, "projects", "HybridDETR")
PREFIX = "tiny_synthetic"
SPLITS = dict(num_train=12, num_val=4, min_side=96, max_side=128)



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny synthetic dataset (registered as tiny_synthetic_train/val) and a tiny config file."""
    root = tmp_path_factory.mktemp("train_net")
    datasets = root / "datasets"
    patch = pytest.MonkeyPatch()
    patch.setenv("DETECTRON2_DATASETS", str(datasets))
    names = register_synthetic_datasets(root=str(datasets), prefix=PREFIX, **SPLITS)
    config = root / "tiny.yaml"
    config.write_text(TINY_CONFIG.format(base=BASE_CONFIG, num_classes=len(SYNTHETIC_CLASSES), prefix=PREFIX))
    yield SimpleNamespace(root=root, datasets=datasets, config=str(config))
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    patch.undo()


def parse_args(*argv):
    return default_argument_parser().parse_args([str(a) for a in argv])


def tiny_cfg(tiny, *opts):
    return load_config(tiny.config, [str(o) for o in opts])


# ------------------------------------------------------------------------------------------------
# Optimizer
# ------------------------------------------------------------------------------------------------
def test_optimizer_param_groups_have_the_multipliers(tiny):
    cfg = tiny_cfg(tiny, "SOLVER.BASE_LR", 1e-3)
    model = train_net.Trainer.build_model(cfg)
    optimizer = train_net.Trainer.build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert "FullModelGradientClipping" in type(optimizer).__name__
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"backbone", "linear_proj", "other"}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4)
    assert groups["linear_proj"]["lr"] == pytest.approx(1e-4)
    assert groups["other"]["lr"] == pytest.approx(1e-3)
    assert all(g["weight_decay"] == 1e-4 for g in optimizer.param_groups)

    names = {id(p): n for n, p in model.named_parameters()}
    in_group = {name: {names[id(p)] for p in g["params"]} for name, g in groups.items()}
    assert all(n.startswith("backbone.") for n in in_group["backbone"])
    assert all(("sampling_offsets" in n or "reference_points" in n) for n in in_group["linear_proj"])
    assert any("sampling_offsets" in n for n in in_group["linear_proj"])
    assert not any(n.startswith("backbone.") or "sampling_offsets" in n for n in in_group["other"])
    # Every trainable parameter exactly once.
    listed = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(listed) == len(set(listed))
    assert set(listed) == {id(p) for p in model.parameters() if p.requires_grad}


def test_param_groups_list_a_shared_parameter_once():
    shared = torch.nn.Linear(2, 2)
    model = torch.nn.Module()
    model.backbone = torch.nn.Sequential(shared)
    model.head = torch.nn.Sequential(shared, torch.nn.Linear(2, 1))
    groups = get_param_groups(model, 1.0, 0.0, 0.1, 0.1, ["sampling_offsets"])
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == 4
    assert [g["name"] for g in groups] == ["backbone", "other"]


def _two_param_model_with_grads():
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(torch.zeros(4))
    model.b = torch.nn.Parameter(torch.zeros(4))
    model.a.grad = torch.full((4,), 0.5)  # norm 1
    model.b.grad = torch.full((4,), 0.5)  # norm 1
    return model


def test_full_model_gradient_clipping_clips_the_total_norm(tiny):
    cfg = tiny_cfg(tiny, "SOLVER.OPTIMIZER", "SGD", "SOLVER.MOMENTUM", 0.0, "SOLVER.WEIGHT_DECAY", 0.0)
    model = _two_param_model_with_grads()
    optimizer = build_optimizer(cfg, model)
    optimizer.step()
    total = torch.linalg.vector_norm(torch.cat([model.a.grad, model.b.grad]))
    assert total.item() == pytest.approx(0.1, rel=1e-4)  # CLIP_VALUE 0.1 over the whole model
    # Per-parameter clipping (detectron2's "norm") would have left each tensor at norm 0.1.
    assert torch.linalg.vector_norm(model.a.grad).item() == pytest.approx(0.1 / 2**0.5, rel=1e-4)

    per_param = tiny_cfg(tiny, "SOLVER.OPTIMIZER", "SGD", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm")
    model = _two_param_model_with_grads()
    build_optimizer(per_param, model).step()
    assert torch.linalg.vector_norm(model.a.grad).item() == pytest.approx(0.1, rel=1e-4)


@pytest.mark.parametrize("name", ["ADAMW", "SGD"])
def test_fused_optimizer_takes_the_same_clipped_steps(tiny, name):
    """SOLVER.FUSED_OPTIMIZER: the fused kernel, the same updates (full-model clipping included)."""
    weights = []
    for fused in (False, True):
        cfg = tiny_cfg(tiny, "SOLVER.OPTIMIZER", name, "SOLVER.FUSED_OPTIMIZER", fused)
        model = torch.nn.Linear(5, 3)
        torch.nn.init.constant_(model.weight, 0.3)
        torch.nn.init.constant_(model.bias, -0.2)
        optimizer = build_optimizer(cfg, model)
        assert optimizer.defaults.get("fused") is (True if fused else None)
        for step in range(3):
            optimizer.zero_grad()
            model(torch.linspace(-1, 1, 10).view(2, 5) * (step + 1)).pow(2).sum().backward()
            optimizer.step()
        weights.append(torch.cat([model.weight.flatten(), model.bias]).detach())
    assert not torch.equal(weights[0][:15], torch.full((15,), 0.3))  # the steps moved the weights
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-6, atol=1e-7)


def test_unknown_optimizer_is_named(tiny):
    cfg = tiny_cfg(tiny, "SOLVER.OPTIMIZER", "ADAMX")
    with pytest.raises(ValueError, match="ADAMX"):
        build_optimizer(cfg, torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------
# Config errors
# ------------------------------------------------------------------------------------------------
def test_typo_key_on_the_command_line_is_a_key_error_naming_it(tiny):
    args = parse_args("--config-file", tiny.config, "MODEL.HYBRID_DETR.DECODR_MODE", "dac")
    with pytest.raises(KeyError, match=r"MODEL\.HYBRID_DETR\.DECODR_MODE.*did you mean MODEL\.HYBRID_DETR\.DECODER_MODE"):
        train_net.setup(args)


def test_typo_key_in_a_yaml_file_is_a_key_error_naming_it(tiny, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{tiny.config}"\nSOLVER:\n  BACKBONE_MULTIPLER: 0.1\n')
    with pytest.raises(KeyError, match=r"SOLVER\.BACKBONE_MULTIPLER.*bad\.yaml.*did you mean SOLVER\.BACKBONE_MULTIPLIER"):
        load_config(str(bad))


def test_unknown_decoder_mode_is_named(tiny):
    cfg = tiny_cfg(tiny, "MODEL.HYBRID_DETR.DECODER_MODE", "deformable+dino")
    with pytest.raises(ValueError, match="dino"):
        train_net.Trainer.build_model(cfg)


def test_broken_annotations_fail_before_training(tiny):
    DatasetCatalog.register(
        "tiny_broken",
        lambda: [{"file_name": "broken.jpg", "image_id": 1, "height": 100, "width": 100,
                  "annotations": [{"bbox": [10, 10, -5, 20], "bbox_mode": 1, "category_id": 0}]}],
    )
    MetadataCatalog.get("tiny_broken").set(thing_classes=list(SYNTHETIC_CLASSES))
    try:
        cfg = tiny_cfg(tiny, "DATASETS.TRAIN", '("tiny_broken",)')
        with pytest.raises(ValueError, match="tiny_broken.*broken.jpg.*negative size"):
            train_net.Trainer.build_train_loader(cfg)
        cfg = tiny_cfg(tiny, "MODEL.HYBRID_DETR.NUM_CLASSES", 80)
        with pytest.raises(ValueError, match="has 6 classes but MODEL.HYBRID_DETR.NUM_CLASSES is 80"):
            train_net.Trainer.build_train_loader(cfg)
    finally:
        DatasetCatalog.remove("tiny_broken")
        MetadataCatalog.remove("tiny_broken")


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
def test_checkpoint_save_then_load_gives_identical_outputs(tiny, tmp_path):
    cfg = tiny_cfg(tiny)
    torch.manual_seed(0)
    model = train_net.Trainer.build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("ckpt")
    torch.manual_seed(1)
    reloaded = train_net.Trainer.build_model(cfg)
    DetectionCheckpointer(reloaded).load(str(tmp_path / "ckpt.pth"))

    batch = next(iter(train_net.Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0])))
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        a, b = model(batch)[0]["instances"], reloaded(batch)[0]["instances"]
    assert len(a) == len(b) > 0
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.pred_classes, b.pred_classes)


# ------------------------------------------------------------------------------------------------
# Training, resuming, evaluation
# ------------------------------------------------------------------------------------------------
def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def trained(tiny):
    """Three training iterations through train_net.main; returns the output folder."""
    output_dir = tiny.root / "train"
    train_net.main(parse_args("--config-file", tiny.config, "OUTPUT_DIR", output_dir))
    return output_dir


@pytest.mark.slow
def test_training_writes_checkpoint_metrics_and_events(trained):
    files = os.listdir(trained)
    assert "model_final.pth" in files and "last_checkpoint" in files and "config.yaml" in files
    assert "log.txt" in files
    assert any(f.startswith("events.out.tfevents") for f in files)
    records = _metrics(trained)
    train_records = [r for r in records if "total_loss" in r]
    assert train_records and train_records[-1]["iteration"] == 2
    assert all(torch.isfinite(torch.tensor(r["total_loss"])) for r in train_records)
    assert train_records[-1]["lr"] == pytest.approx(2e-5)  # STEPS (2,): lr x 0.1 at iteration 2
    assert any("bbox/AP" in r for r in records)  # evaluated after the last iteration


@pytest.mark.slow
def test_an_evaluation_at_a_checkpoint_iteration_is_in_metrics_json(tiny, tmp_path):
    """EVAL_PERIOD = CHECKPOINT_PERIOD: the evaluation after iteration 2 is written with the checkpoint
    (the checkpointer flushes the writers, which never go back to an iteration they wrote)."""
    output_dir = tmp_path / "eval_at_checkpoint"
    train_net.main(parse_args("--config-file", tiny.config, "OUTPUT_DIR", output_dir, "SOLVER.MAX_ITER", 4,
                              "SOLVER.STEPS", "(3,)", "SOLVER.CHECKPOINT_PERIOD", 2, "TEST.EVAL_PERIOD", 2))
    assert "model_0000001.pth" in os.listdir(output_dir)
    evaluated = [r["iteration"] for r in _metrics(output_dir) if "bbox/AP" in r]
    assert evaluated == [1, 4]  # after the 2nd step (logged at its index) and after the last


@pytest.mark.slow
def test_resume_continues_the_iteration_count(tiny, trained):
    cfg = train_net.setup(parse_args("--config-file", tiny.config, "--resume",
                                     "OUTPUT_DIR", trained, "SOLVER.MAX_ITER", 5))
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 3
    assert trainer.scheduler.last_epoch == 3  # the LR schedule resumes too
    trainer.train()
    assert trainer.iter == 5  # detectron2 leaves `iter` at max_iter after the loop
    assert max(r["iteration"] for r in _metrics(trained) if "total_loss" in r) == 4


@pytest.mark.slow
def test_eval_only_prints_ap_speed_and_gflops(tiny, trained):
    """The real command line, in a fresh process: COCO AP table, images/s and GFLOPs on stdout,
    the benchmark in inference/benchmark.json, our deformable-attention op counted."""
    from hybrid_detr.layers import extension_available

    weights = trained / "model_final.pth"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {PROJECT_DIR!r})
        from hybrid_detr.data import register_synthetic_datasets
        register_synthetic_datasets(root={str(tiny.datasets)!r}, prefix={PREFIX!r}, **{SPLITS!r})
        import train_net
        sys.argv = ["train_net.py", "--eval-only", "--config-file", {tiny.config!r},
                    "MODEL.WEIGHTS", {str(weights)!r}, "OUTPUT_DIR", {str(tiny.root / "eval")!r}]
        train_net.invoke_main()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, DETECTRON2_DATASETS=str(tiny.datasets)))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Evaluation results for bbox" in out
    assert re.search(r"\|\s+AP\s+\|\s+AP50\s+\|\s+AP75\s+\|", out)  # the COCO AP table
    assert "Inference speed on tiny_synthetic_val:" in out and "images/s" in out
    assert "Model GFLOPs on tiny_synthetic_val:" in out

    with open(tiny.root / "eval" / "inference" / "benchmark.json") as f:
        benchmark = json.load(f)
    assert benchmark["dataset"] == "tiny_synthetic_val"
    assert benchmark["speed"]["images_per_s"] > 0 and benchmark["speed"]["num_images"] >= 1
    assert benchmark["flops"]["gflops"] > 0
    if extension_available():  # else the pure-PyTorch path runs, made of ordinary aten ops
        assert "hybrid_detr::ms_deform_attn" not in benchmark["flops"]["unsupported_ops"]
        assert benchmark["flops"]["by_operator"].get("ms_deform_attn", 0) > 0


# ------------------------------------------------------------------------------------------------
# Demo
# ------------------------------------------------------------------------------------------------
def test_demo_draws_predictions_to_a_png(tiny, tmp_path):
    from PIL import Image

    import demo  # detectron2's Visualizer needs OpenCV (opencv-python-headless)

    image = tiny.datasets / "hybrid_synthetic" / "val" / "images" / "000001.jpg"
    if not image.exists():
        DatasetCatalog.get(f"{PREFIX}_val")  # generates the split
    output = tmp_path / "out" / "demo.png"
    per_output = demo.main(["--config-file", tiny.config, "--input", str(image), "--output", str(output),
                            "--confidence-threshold", "0.0", "--allow-random-weights"])  # the tiny config has none
    instances = per_output[str(output)]
    assert len(instances) > 0  # threshold 0: every kept detection is drawn
    with Image.open(output) as drawn, Image.open(image) as original:
        assert drawn.format == "PNG" and drawn.size == original.size
