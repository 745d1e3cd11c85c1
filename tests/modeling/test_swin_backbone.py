"""The Swin backbone (timm's Swin, the detection Swin's padding): output names, shapes and channels for any
image size; the same outputs as timm's own forward where every stage is whole windows (and where it is not,
the detection order of padding and shift, which timm does not follow); gradient checkpointing and frozen
stages; clear config errors; a tiny Swin training through the whole model on the CPU."""
import pytest
import torch
from detectron2.modeling import build_backbone

from hybrid_detr.modeling import HybridDETR
from hybrid_detr.modeling.backbones import SWIN_STAGE_NAMES, add_swin_config
from model_helpers import synthetic_batch, tiny_cfg


def swin_cfg(out_features=("res3", "res4", "res5"), **swin):
    cfg = tiny_cfg()
    add_swin_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_swin_backbone"
    cfg.MODEL.SWIN.EMBED_DIM = 16
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 2, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [1, 2, 2, 4]
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.0
    cfg.MODEL.SWIN.OUT_FEATURES = list(out_features)
    for key, value in swin.items():
        setattr(cfg.MODEL.SWIN, key, value)
    return cfg


def test_outputs_for_any_image_size():
    torch.manual_seed(0)
    backbone = build_backbone(swin_cfg(SWIN_STAGE_NAMES)).eval()
    shapes = backbone.output_shape()
    assert [(n, s.channels, s.stride) for n, s in shapes.items()] == [
        ("res2", 16, 4), ("res3", 32, 8), ("res4", 64, 16), ("res5", 128, 32)
    ]
    for height, width in [(97, 141), (33, 250), (224, 224)]:
        with torch.no_grad():
            out = backbone(torch.randn(2, 3, height, width))
        assert list(out) == list(SWIN_STAGE_NAMES)
        for name, value in out.items():
            stride = shapes[name].stride
            assert value.shape == (2, shapes[name].channels, -(-height // stride), -(-width // stride))
            assert torch.isfinite(value).all()


def test_stages_after_the_last_output_are_not_built():
    backbone = build_backbone(swin_cfg(("res2", "res3")))
    assert len(backbone.body.layers) == 2 and list(backbone.output_norms) == ["res2", "res3"]
    assert not any(k.startswith(("body.norm.", "body.head.")) for k in backbone.state_dict())


def test_timm_forward_where_stages_are_whole_windows_detection_padding_elsewhere():
    """At 224 x 224 every stage (56, 28, 14, 7) is whole 7-windows: our blocks compute what timm's forward
    does. At 200 x 200 they do not: the detection Swin pads before the shift, timm after, and the
    outputs differ (the reason the backbone runs the blocks itself)."""
    torch.manual_seed(0)
    backbone = build_backbone(swin_cfg(SWIN_STAGE_NAMES)).eval()
    with torch.no_grad():
        for size, same in ((224, True), (200, False)):
            images = torch.randn(1, 3, size, size)
            ours = backbone(images)
            timm_maps = backbone.body.forward_intermediates(images, indices=[0, 1, 2, 3], intermediates_only=True)
            for name, timm_map in zip(SWIN_STAGE_NAMES, timm_maps):
                normed = backbone.output_norms[name](timm_map.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                assert normed.shape == ours[name].shape
                difference = (normed - ours[name]).abs().max().item()
                if same:
                    assert difference < 1e-5, (size, name, difference)
            if not same:
                assert difference > 1e-3  # the last stage, after every block's padding


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_backbone(swin_cfg()).train()
    checkpointed = build_backbone(swin_cfg(GRAD_CHECKPOINTING=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 75, 90)
    for model in (plain, checkpointed):
        sum(v.square().mean() for v in model(images).values()).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        assert a.grad is not None and torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-5), name


def test_frozen_stages_follow_freeze_at():
    cfg = swin_cfg(SWIN_STAGE_NAMES, DROP_PATH_RATE=0.2)
    cfg.MODEL.BACKBONE.FREEZE_AT = 2  # patch embedding + res2 (its blocks and output norm)
    backbone = build_backbone(cfg).train()
    frozen = {n for n, p in backbone.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("body.patch_embed.", "body.layers.0.", "output_norms.res2.")) for n in frozen)
    assert {n for n, _ in backbone.named_parameters() if n.startswith(("body.patch_embed.", "body.layers.0."))} <= frozen
    assert not backbone.body.layers[0].training and backbone.body.layers[1].training  # no drop path when frozen
    with pytest.raises(ValueError, match="FREEZE_AT=7"):
        cfg.MODEL.BACKBONE.FREEZE_AT = 7
        build_backbone(cfg)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(OUT_FEATURES=["res6"]), "MODEL.SWIN.OUT_FEATURES"),
        (dict(ARCH="resnet50"), "MODEL.SWIN.ARCH 'resnet50' is not a timm Swin"),
        (dict(DEPTHS=[2, 2], NUM_HEADS=[1, 2, 4]), "one entry per stage"),
    ],
)
def test_bad_config_errors_name_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        build_backbone(swin_cfg(**change))


def test_missing_swin_keys_say_how_to_add_them():
    cfg = tiny_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_swin_backbone"
    cfg.MODEL.pop("SWIN", None)  # a detectron2 config without HybridDETR's Swin keys
    with pytest.raises(KeyError, match="add_swin_config"):
        build_backbone(cfg)


def test_tiny_swin_trains_through_the_whole_model():
    """Two training steps of the full model (two-stage + refinement, 3 Swin levels + 1) with a tiny Swin."""
    torch.manual_seed(0)
    cfg = swin_cfg()
    cfg.MODEL.HYBRID_DETR.WITH_BOX_REFINE = True
    cfg.MODEL.HYBRID_DETR.NUM_FEATURE_LEVELS = 4
    cfg.MODEL.HYBRID_DETR.TWO_STAGE = True
    model = HybridDETR(cfg).train()
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        losses = model(synthetic_batch())
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    changed = [n for n, p in model.backbone.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # every backbone parameter, the last stage's norm included
    model.eval()
    with torch.no_grad():
        results = model(synthetic_batch())
    assert len(results) == 2 and results[0]["instances"].pred_boxes.tensor.shape[1] == 4
