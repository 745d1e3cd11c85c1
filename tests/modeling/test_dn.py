"""DINO's contrastive denoising ("dn"): groups, noise, attention mask, losses, composition with DAC,
Co-DETR and SMCA, and the batches without objects."""
import pytest
import torch
from detectron2.modeling import build_model

from hybrid_detr.modeling.dn import denoising_groups, num_denoising_groups
from hybrid_detr.modeling.dn.denoising import DenoisingNoise, draw_noise
from model_helpers import NUM_CLASSES, synthetic_batch, synthetic_input, tiny_cfg

DN_MODEL = dict(TWO_STAGE=True, WITH_BOX_REFINE=True, MIXED_SELECTION=True)


def targets_of(*boxes_per_image):
    return [
        {"labels": torch.arange(len(b)) % NUM_CLASSES, "boxes": torch.tensor(b, dtype=torch.float32).view(-1, 4)}
        for b in boxes_per_image
    ]


@pytest.mark.parametrize(
    "dn_number, max_boxes, groups",
    # 200 // (2 S), at least 1; below 50 the official code keeps 2 x dn_number groups.
    [(100, 0, 1), (100, 1, 100), (100, 3, 33), (100, 7, 14), (100, 50, 2), (100, 100, 1), (100, 150, 1), (10, 3, 20)],
)
def test_number_of_groups(dn_number, max_boxes, groups):
    assert num_denoising_groups(dn_number, max_boxes) == groups


def test_layout_mask_and_assignment_without_noise():
    targets = targets_of([[0.3, 0.4, 0.2, 0.2], [0.6, 0.6, 0.3, 0.1]], [[0.5, 0.5, 0.4, 0.4]])
    dn = denoising_groups(targets, 4, 0.0, 0.0, NUM_CLASSES)  # 2 * 4 < 100: 8 groups of 2 x 2 slots
    assert (dn.num_groups, dn.max_boxes, dn.num_queries) == (8, 2, 32)
    # Image 1 has one box: its second slot of each half is padding (label -1, box 0.5).
    assert dn.labels[1].view(8, 2, 2)[:, :, 1].eq(-1).all() and dn.labels[0].ge(0).all()
    assert dn.boxes[1].view(8, 2, 2, 4)[:, :, 1].eq(0.5).all()
    # Without noise every slot's box is its gt (through the official eps-1e-3 inverse sigmoid).
    torch.testing.assert_close(dn.boxes[0].view(8, 2, 2, 4)[:, 0], targets[0]["boxes"].expand(8, 2, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(dn.boxes[0].view(8, 2, 2, 4)[:, 1], targets[0]["boxes"].expand(8, 2, 4), atol=1e-6, rtol=0)
    # Groups of 4 slots see each other only.
    group = torch.arange(32) // 4
    assert dn.self_attn_mask.equal(group[:, None] != group[None, :])
    # Positives: first half of every group, one (group, gt) pair each, 8 x 3 in all.
    a = dn.assignment
    assert len(a) == 24 and set(((a.query_index % 4) < 2).tolist()) == {True}
    assert a.query_index[a.batch_index == 1].remainder(4).eq(0).all()
    for i, t in enumerate(dn.group_targets):
        gt = a.gt_index[a.batch_index == i]
        assert len(set(gt.tolist())) == len(gt)  # every positive its own gt copy
        assert t["labels"][gt].equal(dn.labels[i, a.query_index[a.batch_index == i]])


def test_noise_bounds_positives_inside_negatives_outside():
    torch.manual_seed(0)
    boxes = torch.rand(20, 2) * 0.4 + 0.3
    targets = [{"labels": torch.zeros(20, dtype=torch.int64), "boxes": torch.cat((boxes, torch.full((20, 2), 0.1)), 1)}]
    dn = denoising_groups(targets, 100, 0.0, 1.0, NUM_CLASSES)  # 5 groups
    gt = targets[0]["boxes"]
    shown = dn.boxes[0].view(dn.num_groups, 2, 20, 4)

    def corners(b):
        return torch.cat((b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2), -1)

    moved = (corners(shown) - corners(gt)).abs() / 0.05  # in units of the half size
    assert moved[:, 0].max() < 1.0 + 1e-3  # positives: less than (w/2, h/2)
    # Negatives: 1-2 times, where the box did not turn inside out (corners crossing: w or h 0).
    kept = (shown[:, 1, :, 2:] > 1e-3).all(-1)
    assert kept.float().mean() > 0.5
    assert moved[:, 1][kept].min() > 1.0 - 1e-3 and moved[:, 1].max() < 2.0 + 1e-3


def test_label_noise_replaces_about_half_the_ratio():
    torch.manual_seed(0)
    targets = [{"labels": torch.zeros(1000, dtype=torch.int64), "boxes": torch.full((1000, 4), 0.5)}]
    dn = denoising_groups(targets, 100, 0.5, 0.0, 100)  # 1000 > 100 boxes: one group
    assert dn.num_groups == 1
    replaced = dn.labels[0].ne(0).float().mean().item()  # a draw of class 0 looks unreplaced (1 %)
    assert 0.22 < replaced < 0.27


def test_given_noise_is_used():
    targets = targets_of([[0.5, 0.5, 0.2, 0.2]])
    k = 2 * num_denoising_groups(100, 1)
    noise = DenoisingNoise(torch.ones(k), torch.zeros(0, dtype=torch.int64), torch.ones(k, 4), torch.full((k, 4), 0.5))
    dn = denoising_groups(targets, 100, 0.5, 1.0, NUM_CLASSES, noise=noise)
    # Every corner moved +0.5 (positives) / +1.5 (negatives) half sizes: centre +0.05 / +0.15.
    torch.testing.assert_close(dn.boxes[0, 0], torch.tensor([0.55, 0.55, 0.2, 0.2]), atol=1e-6, rtol=0)
    torch.testing.assert_close(dn.boxes[0, 1], torch.tensor([0.65, 0.65, 0.2, 0.2]), atol=1e-6, rtol=0)
    assert draw_noise(k, NUM_CLASSES, 0.5, 1.0, "cpu").box_sign.abs().eq(1).all()


def dn_model(mode="dn", **overrides):
    cfg = tiny_cfg(DECODER_MODE=mode, **{**DN_MODEL, **overrides})
    cfg.MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS = 1
    torch.manual_seed(0)
    return build_model(cfg)


def test_dn_trains_and_the_matching_queries_never_see_it():
    model = dn_model()
    batch = synthetic_batch()
    losses = model(batch)
    names = {"dn_loss_class", "dn_loss_bbox", "dn_loss_giou", "dn_loss_class_0"}
    assert names <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.main_passes["dn"].label_embedding.weight.grad.abs().sum() > 0
    with torch.no_grad():
        hook = model.main_passes["dn"]
        hook.extra_queries = lambda inputs: None
        without = model(batch)
    for name, value in without.items():
        if not name.startswith("dn_"):
            torch.testing.assert_close(losses[name], value, rtol=0, atol=1e-5)
    assert all(without[k] == 0 for k in names)


def test_batches_without_objects_train_and_inference_never_denoises():
    model = dn_model()
    empty = [synthetic_input(96, 128, 0, seed=1), synthetic_input(80, 100, 0, seed=2)]
    losses = model(empty)
    assert losses["dn_loss_class"] == 0 and losses["dn_loss_bbox_0"] == 0
    sum(losses.values()).backward()  # the label embedding stays in the graph
    assert model.main_passes["dn"].label_embedding.weight.grad is not None

    def never(_inputs):
        raise AssertionError("denoising at inference")

    model.main_passes["dn"].extra_queries = never
    model.eval()
    assert len(model(synthetic_batch())[0]["instances"]) == 100


def test_dn_needs_two_stage():
    with pytest.raises(ValueError, match="TWO_STAGE"):
        build_model(tiny_cfg(DECODER_MODE="dn"))


def test_dn_dac_runs_the_denoising_queries_through_the_c_decoder():
    model = dn_model("dn+dac")
    model.branches["dac"].matcher.cap_sampling = "score"
    batch = synthetic_batch()
    torch.manual_seed(1)
    losses = model(batch)
    assert {"dac_dn_loss_class", "dac_dn_loss_bbox", "dac_loss_class", "dn_loss_class"} <= set(losses)
    assert losses["dac_dn_loss_class"] != losses["dn_loss_class"]  # the C pass's own outputs
    # Without self-attention the denoising queries cannot change the C-decoder's matching queries.
    model.branches["dac"].run_extra_queries = False
    torch.manual_seed(1)
    alone = model(batch)
    assert not any(k.startswith("dac_dn_") for k in alone)
    for name in alone:
        torch.testing.assert_close(alone[name], losses[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["dn+co_detr", "dn+smca"])
def test_dn_composes(mode):
    model = dn_model(mode)
    losses = model(synthetic_batch())
    assert "dn_loss_class" in losses and all(torch.isfinite(v) for v in losses.values())
    if mode == "dn+co_detr":
        assert any(k.startswith("co_atss_query_") for k in losses)
    sum(losses.values()).backward()


def test_co_dino_positive_queries_have_no_unused_parameter():
    """With positions recomputed from the boxes (Co-DINO), a per-head embedding would get no gradient
    (DDP refuses that): the config must say HEAD_EMBED none, and then every parameter trains."""
    overrides = dict(QUERY_POSITION_FROM_REFERENCE=True, MIXED_SELECTION=True)
    with pytest.raises(ValueError, match="HEAD_EMBED must be 'none'"):
        dn_model("dn+co_detr", **overrides)
    cfg = tiny_cfg(DECODER_MODE="dn+co_detr", **{**DN_MODEL, **overrides})
    cfg.MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS = 2
    cfg.MODEL.HYBRID_DETR.CO_DETR.HEAD_EMBED = "none"
    torch.manual_seed(0)
    model = build_model(cfg)
    sum(model(synthetic_batch()).values()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
