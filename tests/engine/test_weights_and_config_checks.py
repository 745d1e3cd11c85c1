"""Weights, checkpoints, config values and the trainer's reporting, against what an adversarial user
tries: a resume after changing the model, hostile or wrong weights files, a diverging learning
rate, evaluation without (fitting) weights, absurd config values, an offline model zoo, a CUDA
config on a CPU machine, SOLVER.STEPS beyond MAX_ITER, silent first minutes, a one-image speed
benchmark. Tiny models (tests/model_helpers.py) and the tiny synthetic dataset of tiny_runs.py.
"""
import json
import logging
import os
import pickle
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.utils.events import EventWriter

import train_net
from hybrid_detr import model_zoo
from hybrid_detr.checkpoint import CheckpointError, HybridCheckpointer
from hybrid_detr.config import load_config
from hybrid_detr.converters import ConversionError, convert_file
from hybrid_detr.data import SYNTHETIC_CLASSES, register_synthetic_datasets
from hybrid_detr.engine.checks import check_config, check_model_values, check_solver_values
from hybrid_detr.engine.hooks import EarlyPeriodicWriter
from hybrid_detr.engine.model_analysis import format_benchmark, measure_inference_speed
from hybrid_detr.model_zoo import model_zoo as zoo_module
from model_helpers import tiny_cfg
from tiny_runs import BASE_CONFIG, SPLITS, TINY_CONFIG

PREFIX = "tiny_checks"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny dataset (registered as tiny_checks_train/val) and config file of the engine tests."""
    root = tmp_path_factory.mktemp("checks")
    datasets = root / "datasets"
    patch = pytest.MonkeyPatch()
    patch.setenv("DETECTRON2_DATASETS", str(datasets))
    names = register_synthetic_datasets(root=str(datasets), prefix=PREFIX, **SPLITS)
    config = root / "tiny.yaml"
    config.write_text(TINY_CONFIG.format(base=BASE_CONFIG, num_classes=len(SYNTHETIC_CLASSES), prefix=PREFIX))
    yield SimpleNamespace(root=root, config=str(config))
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    patch.undo()


def _cfg(tiny, *opts):
    cfg = load_config(tiny.config, [str(o) for o in opts])
    cfg.freeze()
    return cfg


def _trainer(tiny, output_dir, *opts, resume=False):
    trainer = train_net.Trainer(_cfg(tiny, "OUTPUT_DIR", output_dir, *opts))
    trainer.resume_or_load(resume=resume)
    return trainer


class _Messages(logging.Handler):
    """The messages of a logger (detectron2's loggers do not propagate to pytest's caplog)."""

    def __init__(self, name):
        super().__init__(logging.DEBUG)
        self.logger, self.messages = logging.getLogger(name), []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)


@pytest.fixture(scope="module")
def trained(tiny):
    """Two iterations with the fused AdamW (model_final.pth), the writers' early writes due at every
    iteration (with a writer period of 20 they would write after the last one only). Returns the
    output folder, with the console lines of the run in `console.txt`."""
    output_dir = tiny.root / "trained"
    patch = pytest.MonkeyPatch()
    patch.setattr(train_net.Trainer, "EARLY_WRITE_SECONDS", 0.0)
    try:
        trainer = _trainer(tiny, output_dir, "SOLVER.MAX_ITER", 2, "SOLVER.STEPS", "()",
                           "SOLVER.FUSED_OPTIMIZER", True, "DATASETS.TEST", "()")
        with _Messages("detectron2") as log:
            trainer.train()
    finally:
        patch.undo()
    (output_dir / "console.txt").write_text("\n".join(log.messages))
    return output_dir


def _state_of_tiny_model(**overrides):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**overrides))
    return model, {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# 1. --resume after the model changed
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ffn", [128, 16])  # the checkpoint's is 64: larger and smaller
def test_resume_into_another_layer_size_names_the_tensors_and_the_fix(tiny, trained, ffn):
    with pytest.raises(CheckpointError) as error:
        _trainer(tiny, trained, "SOLVER.MAX_ITER", 4, "SOLVER.STEPS", "()", "SOLVER.FUSED_OPTIMIZER", True,
                 "MODEL.HYBRID_DETR.DIM_FEEDFORWARD", ffn, resume=True)
    message = str(error.value)
    assert f"encoder.layers.0.ffn.linear1.weight: (64, 32) in the checkpoint, ({ffn}, 32) in the model" in message
    assert "model_final.pth" in message and "--resume" in message
    assert "new OUTPUT_DIR" in message and "without --resume" in message


def test_resume_with_other_trained_parameters_names_the_optimizer_groups(tiny, trained):
    """Same weights, other trainable parameters (FREEZE_AT): the optimizer state does not fit."""
    with pytest.raises(CheckpointError, match=r"optimizer state in .*model_final\.pth has parameter groups of "
                                              r"\[\d+, \d+, \d+\] tensors.*new OUTPUT_DIR"):
        _trainer(tiny, trained, "SOLVER.MAX_ITER", 4, "SOLVER.STEPS", "()", "SOLVER.FUSED_OPTIMIZER", True,
                 "MODEL.BACKBONE.FREEZE_AT", 2, resume=True)


def test_fine_tuning_from_the_checkpoint_of_another_size_still_loads_what_fits(tiny, trained, tmp_path):
    trainer = _trainer(tiny, tmp_path, "MODEL.WEIGHTS", trained / "model_final.pth",
                       "MODEL.HYBRID_DETR.DIM_FEEDFORWARD", 128)
    saved = torch.load(trained / "model_final.pth", weights_only=True)["model"]
    state = trainer.checkpointer.model.state_dict()
    assert torch.equal(state["backbone.stem.conv1.weight"], saved["backbone.stem.conv1.weight"])
    assert state["encoder.layers.0.ffn.linear1.weight"].shape == (128, 32)
    assert trainer.start_iter == 0


# ------------------------------------------------------------------------------------------------
# 2. .pkl weights: arrays only, nothing executed
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_detectron2_model_zoo_pkl_loads(tmp_path, protocol):
    model, state = _state_of_tiny_model()
    data = {"model": {k: v.numpy() for k, v in state.items()}, "__author__": "a detectron2 model zoo file"}
    path = tmp_path / "zoo_format.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    torch.manual_seed(1)
    fresh = build_model(tiny_cfg())
    HybridCheckpointer(fresh).resume_or_load(str(path), resume=False)
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_hostile_pkl_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.zeros(3)}, "__author__": _Hostile(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: refusing to load it: unpickling it needs the "
                                                        f"Python object {os.system.__module__}.system")):
        HybridCheckpointer(build_model(tiny_cfg())).resume_or_load(str(path), resume=False)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# 3. A diverging learning rate
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lr, shown", [("1e400", "inf"), ("5.0", "5.0"), ("-1e-4", "-0.0001")])
def test_non_finite_or_absurd_learning_rate_is_refused_before_training(tiny, lr, shown):
    cfg = _cfg(tiny, "SOLVER.BASE_LR", lr)
    with pytest.raises(ValueError, match=rf"SOLVER\.BASE_LR must be a finite learning rate in \[0, 1\], got {shown}"):
        check_config(cfg, 1)


def test_non_finite_weights_are_never_saved_as_the_last_checkpoint(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, "SOLVER.MAX_ITER", 3, "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", 1,
                       "DATASETS.TEST", "()")
    step = trainer.optimizer.step

    def diverging_step(*args, **kwargs):  # what an infinite learning rate does to the weights
        step(*args, **kwargs)
        if trainer.iter == 1:
            with torch.no_grad():
                trainer.checkpointer.model.decoder.heads.class_heads[0].bias.fill_(float("inf"))

    trainer.optimizer.step = diverging_step
    with pytest.raises(FloatingPointError) as error:
        trainer.train()
    message = str(error.value)
    assert "Not saving model_0000001.pth" in message and "after iteration 1" in message
    assert "decoder.heads.class_heads.0.bias (6 Inf of 6 values)" in message
    assert "SOLVER.BASE_LR 0.0002" in message and "learning rate is likely too high" in message
    assert "last_checkpoint still names model_0000000.pth" in message
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pth")) == ["model_0000000.pth"]


# ------------------------------------------------------------------------------------------------
# 4. and 6. --eval-only needs weights that fit, finite
# ------------------------------------------------------------------------------------------------
def test_eval_only_without_weights_is_an_error(tiny, tmp_path):
    args = default_argument_parser().parse_args(
        ["--eval-only", "--config-file", tiny.config, "MODEL.WEIGHTS", "", "OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(CheckpointError, match=r"MODEL\.WEIGHTS is empty.*Pass MODEL\.WEIGHTS /path/to/model_final\.pth"):
        train_net.main(args)


def _saved(tmp_path, name, **overrides):
    model, state = _state_of_tiny_model(**overrides)
    path = tmp_path / name
    torch.save({"model": state}, path)
    return str(path)


def test_eval_only_with_another_modes_checkpoint_names_the_key_groups(tmp_path):
    smca = _saved(tmp_path, "smca.pth", DECODER_MODE="smca")
    model = build_model(tiny_cfg())
    with pytest.raises(CheckpointError, match=r"smca\.pth does not fit .* in the checkpoint but not in the model: "
                                              r"decoder\.layers\.\*\.cross_attn\.\*.*DECODER_MODE.*this config: deformable"):
        HybridCheckpointer(model).load_for_inference(smca, config_hint="deformable")
    deformable = _saved(tmp_path, "deformable.pth")
    with pytest.raises(CheckpointError, match=r"deformable\.pth does not fit .* missing from the checkpoint: "
                                              r"decoder\.layers\.\*\.cross_attn\.\*"):
        HybridCheckpointer(build_model(tiny_cfg(DECODER_MODE="smca"))).load_for_inference(deformable)
    classes = _saved(tmp_path, "classes.pth", NUM_CLASSES=9)
    with pytest.raises(CheckpointError, match=r"tensors of another shape \(decoder\.heads\.class_heads\.0\.weight: "
                                              r"\(9, 64\) in the checkpoint, \(5, 64\) in the model"):
        HybridCheckpointer(build_model(tiny_cfg())).load_for_inference(classes)


def test_eval_only_ignores_training_only_parts(tmp_path):
    """Co-DETR's auxiliary heads are training-only: its checkpoint evaluates under a deformable config
    (and a deformable checkpoint under a co_detr one) with every inference tensor loaded."""
    co_detr = _saved(tmp_path, "co_detr.pth", DECODER_MODE="co_detr")
    model = build_model(tiny_cfg())
    HybridCheckpointer(model).load_for_inference(co_detr)
    saved = torch.load(co_detr, weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    HybridCheckpointer(build_model(tiny_cfg(DECODER_MODE="co_detr"))).load_for_inference(_saved(tmp_path, "d.pth"))


def test_fine_tuning_from_backbone_weights_stays_a_partial_load(tmp_path):
    """Training from ImageNet-style backbone weights: the rest starts from its initialisation, as
    detectron2 does (only evaluation insists on every inference tensor)."""
    _, state = _state_of_tiny_model()
    path = tmp_path / "backbone.pth"
    torch.save({"model": {k: v for k, v in state.items() if k.startswith("backbone.")}}, path)
    model = build_model(tiny_cfg())
    HybridCheckpointer(model).resume_or_load(str(path), resume=False)
    assert torch.equal(model.state_dict()["backbone.stem.conv1.weight"], state["backbone.stem.conv1.weight"])
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: level_embed, neck\.input_proj"):
        HybridCheckpointer(build_model(tiny_cfg())).load_for_inference(str(path))


def test_non_finite_weights_are_refused_naming_them(tmp_path):
    _, state = _state_of_tiny_model()
    state["decoder.heads.box_heads.0.layers.2.bias"][1] = float("nan")
    path = tmp_path / "diverged.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"diverged\.pth holds non-finite weights: "
                                              r"decoder\.heads\.box_heads\.0\.layers\.2\.bias \(1 NaN of 4 values\)"):
        HybridCheckpointer(build_model(tiny_cfg())).load_for_inference(str(path))


# ------------------------------------------------------------------------------------------------
# 5. Files that are no checkpoint
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, content, match", [
    ("boxes.csv", "image,x,y,w,h\n1,2,3,4,5\n", r"not a checkpoint: .*boxes\.csv is not a PyTorch checkpoint.*"
                                                r"a text file starting with 'image,x,y"),
    ("model_final.pth", "version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 160000000\n",
     r"model_final\.pth is a git-LFS pointer file .* run `git lfs pull`"),
    ("empty.pth", "", r"not a checkpoint: .*empty\.pth is empty"),
])
def test_files_that_are_not_checkpoints_are_named(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CheckpointError, match=match):
        HybridCheckpointer(build_model(tiny_cfg())).resume_or_load(str(path), resume=False)


# ------------------------------------------------------------------------------------------------
# 7. The converter refuses NaN
# ------------------------------------------------------------------------------------------------
def test_converter_refuses_non_finite_tensors(tmp_path):
    source, output = tmp_path / "official.pth", tmp_path / "converted.pth"
    state = {"transformer.level_embed": torch.zeros(4, 8), "query_embed.weight": torch.zeros(3, 8)}
    state["query_embed.weight"][0, 0] = float("nan")
    torch.save({"model": state}, source)
    with pytest.raises(ConversionError, match=r"official\.pth: non-finite values in query_embed\.weight "
                                              r"\(1 NaN of 24 values\); refusing to convert"):
        convert_file("deformable_detr", str(source), str(output))
    assert not output.exists()


# ------------------------------------------------------------------------------------------------
# 8. Config values
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, expected", [
    ("NUM_QUERIES", 0, "> 0"), ("NUM_CLASSES", 0, "> 0"), ("DEC_LAYERS", 0, "> 0"), ("NHEADS", 0, "> 0"),
    ("HIDDEN_DIM", -8, "> 0"), ("DIM_FEEDFORWARD", 0, "> 0"), ("ENC_N_POINTS", 0, "> 0"),
    ("ENC_LAYERS", -1, ">= 0"), ("DROPOUT", 1.0, r"in \[0, 1\)"), ("L1_WEIGHT", -5.0, "finite and >= 0"),
    ("NMS_THRESH_TEST", 1.5, r"in \[0, 1\] \(0: no NMS\)"),
])
def test_invalid_model_values_are_named_before_the_model_is_built(key, value, expected):
    cfg = tiny_cfg(**{key: value})
    with pytest.raises(ValueError, match=rf"MODEL\.HYBRID_DETR\.{key} must be {expected}, got {value}"):
        train_net.Trainer.build_model(cfg)  # what --eval-only and training both call


def test_every_shipped_config_passes_the_value_checks():
    for name in model_zoo.list_configs():
        cfg = model_zoo.get_config(name)
        check_model_values(cfg)
        check_solver_values(cfg)


# ------------------------------------------------------------------------------------------------
# 9. and 10. Model zoo offline; a CUDA config on a machine without CUDA
# ------------------------------------------------------------------------------------------------
def test_model_zoo_get_offline_says_how_to_use_a_local_copy(monkeypatch):
    get_config = zoo_module.get_config

    def with_unreachable_weights(name, trained=False):
        cfg = get_config(name, trained=trained)
        cfg.MODEL.WEIGHTS = "http://127.0.0.1:9/ImageNetPretrained/MSRA/R-50.pkl"  # port 9: nothing listens
        return cfg

    monkeypatch.setattr(zoo_module, "get_config", with_unreachable_weights)
    with pytest.raises(CheckpointError, match=r"Could not download the weights 'http://127\.0\.0\.1:9/.*R-50\.pkl'"
                                              r".*MODEL\.WEIGHTS /path/to/R-50\.pkl"):
        model_zoo.get("quickstart/deformable_detr_r18_synthetic.yaml", device="cpu")


def test_cuda_device_without_cuda_says_to_add_model_device_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = tiny_cfg()
    cfg.MODEL.DEVICE = "cuda"
    with pytest.raises(RuntimeError, match=r"MODEL\.DEVICE is 'cuda' but this machine cannot run CUDA.*"
                                           r"add `MODEL\.DEVICE cpu`"):
        train_net.Trainer.build_model(cfg)
    with pytest.raises(RuntimeError, match=r"add `MODEL\.DEVICE cpu`"):
        model_zoo.get("quickstart/deformable_detr_r18_synthetic.yaml", device="cuda")


# ------------------------------------------------------------------------------------------------
# 11. SOLVER.STEPS beyond MAX_ITER: warned and ignored, as detectron2 does
# ------------------------------------------------------------------------------------------------
def test_steps_beyond_max_iter_are_ignored_with_a_warning(tiny):
    cfg = _cfg(tiny, "SOLVER.MAX_ITER", 5, "SOLVER.STEPS", "(3, 5, 88000)", "SOLVER.WARMUP_ITERS", 0)
    check_config(cfg, 1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    with _Messages("detectron2") as log:
        scheduler = train_net.Trainer.build_lr_scheduler(cfg, optimizer)
    assert any("SOLVER.STEPS (3, 5, 88000): [5, 88000] not below SOLVER.MAX_ITER (5), ignored" in m
               for m in log.messages)
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([2e-4] * 3 + [2e-5] * 2)
    with pytest.raises(ValueError, match=r"SOLVER\.STEPS \(4, 2\) must be increasing iterations > 0"):
        check_config(_cfg(tiny, "SOLVER.STEPS", "(4, 2)"), 1)


# ------------------------------------------------------------------------------------------------
# 12. The first minutes of a slow run show losses and an ETA
# ------------------------------------------------------------------------------------------------
class _RecordingWriter(EventWriter):
    def __init__(self, trainer):
        self.trainer, self.iterations = trainer, []

    def write(self):
        self.iterations.append(self.trainer.iter)


def test_early_writes_every_few_seconds_during_the_first_period():
    trainer = SimpleNamespace(iter=0, start_iter=0, max_iter=100)
    writer = _RecordingWriter(trainer)
    now = [0.0]
    hook = EarlyPeriodicWriter([writer], period=20, early_seconds=10.0, clock=lambda: now[0])
    hook.trainer = trainer
    hook.before_train()
    for iteration in range(60):  # 4 s per iteration
        trainer.iter = iteration
        now[0] += 4.0
        hook.after_step()
    # Every 10 s (3 iterations) during the first 20, then every 20 iterations as detectron2.
    assert writer.iterations == [2, 5, 8, 11, 14, 17, 19, 39, 59]


def test_training_writes_the_first_iterations_early(trained):
    with open(trained / "metrics.json") as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert [r["iteration"] for r in records] == [0, 1]  # writer period 20: only iteration 1 without early writes
    assert all("total_loss" in r for r in records)
    console = (trained / "console.txt").read_text()
    assert re.search(r"^ iter: 0 .*total_loss", console, re.M) and re.search(r"^ eta: .*iter: 1 ", console, re.M)


# ------------------------------------------------------------------------------------------------
# 13. The inference speed is measured over more than one image
# ------------------------------------------------------------------------------------------------
class _CountingModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, inputs):
        self.calls += 1
        return inputs


def test_speed_is_timed_over_at_least_20_images_of_a_small_set():
    loader = [[{"image_id": i}] for i in range(4)]
    model = _CountingModel()
    speed = measure_inference_speed(model, loader)
    assert (speed["num_images"], speed["num_distinct_images"], speed["num_warmup"]) == (20, 4, 5)
    assert model.calls == 25
    text = format_benchmark({"speed": speed, "flops": {"gflops": 1.0, "num_images": 3, "mean_input_hw": (64, 80)}})
    assert "over 20 timed images (4 distinct, the set run through again) after 5 warm-up" in text
    assert "1 flop = 1 multiply-add" in text
    big = [[{"image_id": i}] for i in range(80)]
    assert measure_inference_speed(_CountingModel(), big)["num_images"] == 50  # the cap
    assert measure_inference_speed(_CountingModel(), loader, max_images=2)["num_images"] == 2
