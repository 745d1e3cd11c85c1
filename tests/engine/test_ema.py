"""MODEL_EMA: the average's arithmetic, its checkpoint and resume, and evaluation on it."""
import pytest
import torch
from torch import nn

from hybrid_detr.engine.ema import ModelEMA


def test_update_is_the_exponential_average_of_float_state():
    model = nn.BatchNorm1d(3)
    ema = ModelEMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
        model.num_batches_tracked.fill_(7)
    ema.update(model)
    torch.testing.assert_close(ema.state["weight"], 0.9 * start + 0.1 * (start + 1.0))
    assert ema.state["num_batches_tracked"].item() == 7  # integer buffers are copied
    with ema.applied_to(model):
        torch.testing.assert_close(model.weight, ema.state["weight"])
    torch.testing.assert_close(model.weight, start + 1.0)  # restored after the block
    with pytest.raises(ValueError, match="MODEL_EMA.DECAY"):
        ModelEMA(model, decay=1.0)


def test_trainer_checkpoints_resumes_and_evaluates_the_ema(tmp_path):
    import train_net
    from hybrid_detr.data import register_synthetic_datasets
    from model_helpers import tiny_cfg

    names = register_synthetic_datasets(root=str(tmp_path / "data"), prefix="ema_synthetic", num_train=6, num_val=2,
                                        min_side=64, max_side=80)
    cfg = tiny_cfg()
    cfg.MODEL.HYBRID_DETR.NUM_CLASSES = 6
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (names[0],), ()
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = 2, 2, ()
    cfg.SOLVER.CHECKPOINT_PERIOD = 2
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.CROP.ENABLED = (64,), 80, False
    cfg.INPUT.DETR_CROP_RESIZE = [64]
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.MODEL_EMA.ENABLED, cfg.MODEL_EMA.DECAY = True, 0.5
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.model_ema.updates == 2
    model = trainer.model.model if hasattr(trainer.model, "model") else trainer.model
    weight = dict(model.named_parameters())["level_embed"]
    assert not torch.equal(trainer.model_ema.state["level_embed"], weight)  # a real average, not a copy

    resumed = train_net.Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.model_ema.updates == 2
    for name, value in trainer.model_ema.state.items():
        assert torch.equal(resumed.model_ema.state[name], value), name
    checkpoint = torch.load(tmp_path / "out" / "model_final.pth", weights_only=True)
    assert torch.equal(checkpoint["model_ema"]["state"]["level_embed"], trainer.model_ema.state["level_embed"])
    # Evaluation hooks run on the EMA weights, training continues on its own.
    seen = trainer._with_ema(lambda: model.level_embed.detach().clone())()
    assert torch.equal(seen, trainer.model_ema.state["level_embed"]) and torch.equal(model.level_embed, weight)
