"""SMCA defaults that follow the official multi-scale release (`Multi_scale_SMCA.zip` of
gaopengcuhk/SMCA-DETR, models/transformer.py with `--dynamic_scale type3 --smooth 8`); one test per
default. The facts are restated in each test; the release's code is not needed to run them."""
import os

import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

from hybrid_detr.config import load_config
from hybrid_detr.modeling.smca import (
    DeformableSMCACrossAttention,
    GaussianPrior,
    SMCACrossAttention,
    feature_level_strides,
    level_units,
)
from hybrid_detr.modeling.token_layout import EncoderMemory, LevelLayout
from model_helpers import tiny_cfg

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
# One unpadded image, four levels of strides 8, 16, 32, 64 (a 256 x 320 image).
STRIDES = (8, 16, 32, 64)
SHAPES = [(32, 40), (16, 20), (8, 10), (4, 5)]


def unpadded_memory(d_model=16):
    layout = LevelLayout.of_shapes(SHAPES)
    s = layout.num_tokens
    return EncoderMemory(
        memory=torch.randn(1, s, d_model),
        layout=layout,
        valid_ratios=torch.ones(1, len(SHAPES), 2),
        padding_mask=torch.zeros(1, s, dtype=torch.bool),
        position=torch.randn(1, s, d_model),
    )


def test_config_defaults_are_the_release():
    smca = tiny_cfg(DECODER_MODE="smca").MODEL.HYBRID_DETR.SMCA
    assert smca.BETA == 8.0  # --smooth 8
    assert smca.PER_HEAD  # one Gaussian per head
    assert smca.LEVEL_PRIORS  # offsets and scales per level, each level's own cells
    assert not smca.KEY_AT_CELL_CENTER  # key grid at cell corners (torch.arange)
    assert not smca.SCALE_SELECTION_PER_HEAD  # one alpha per query and level


def test_units_are_each_levels_own_cells_with_factors():
    """Release: squared distances in each level's cells times 0.5 (stride 16), 1 (32), 2 (64); its
    stride-8 level is convolved to stride 16 and measured as such (0.5 in stride-16 cells)."""
    cells, factors = level_units(STRIDES, level_priors=True)
    assert cells == [0.5, 1.0, 1.0, 1.0] and factors == [0.5, 0.5, 1.0, 2.0]
    assert level_units(STRIDES, level_priors=False) == ([0.25, 0.5, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0])
    assert feature_level_strides(["res3", "res4", "res5"], 4) == [8, 16, 32, 64]
    assert feature_level_strides(["res2", "res3", "res4", "res5"], 4) == [4, 8, 16, 32]


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_log_prior_per_level_at_corner_keys(level):
    """With the init (a = 1, zero offsets), log G at key (r, c) of level l is
    -factor_l * ((c - cx_l)^2 + (r - cy_l)^2) / 8, (cx_l, cy_l) = center x level size in the level's
    cells (stride-16 cells for stride 8); key (r, c) at (c, r), not (c + 0.5, r + 0.5)."""
    memory = unpadded_memory()
    prior = GaussianPrior(16, 2, True, 8.0, STRIDES)
    with torch.no_grad():
        prior.center_offsets.weight.zero_()
        prior.center_offsets.bias.zero_()
    h, w = SHAPES[level]
    # a center exactly on key (row 2, column 3) of this level, measured in that level's cells
    center = torch.tensor([[[3.0 / w, 2.0 / h]]])
    centers, inverse = prior(torch.randn(1, 1, 16), center, memory)
    torch.testing.assert_close(inverse, torch.ones_like(inverse))
    bias = prior.level_bias(centers[:, :, level], inverse[:, :, level], memory, level).view(2, h, w)
    factor = [0.5, 0.5, 1.0, 2.0][level]
    unit = 0.5 if level == 0 else 1.0  # stride-8 cells are half a stride-16 cell
    r, c = torch.meshgrid(torch.arange(h) * unit, torch.arange(w) * unit, indexing="ij")
    cx, cy = 3.0 * unit, 2.0 * unit
    expected = -factor * ((c - cx) ** 2 + (r - cy) ** 2) / 8.0
    torch.testing.assert_close(bias[0], expected)
    torch.testing.assert_close(bias[1], expected)
    assert bias[0, 2, 3] == 0


def test_offsets_and_scales_per_head_and_level():
    """Release: point2 = Linear(d, 2 x 8 heads x 4 levels), point3 = Linear(d, 16 x 4) (type3: per
    head (x, y) per level); each level uses its own slice."""
    prior = GaussianPrior(256, 8, True, 8.0, STRIDES)
    assert prior.center_offsets.out_features == 2 * 8 * 4
    assert prior.inverse_scales.out_features == 2 * 8 * 4
    memory = unpadded_memory(256)
    query, center = torch.randn(1, 3, 256), torch.rand(1, 3, 2)
    before = prior(query, center, memory)
    with torch.no_grad():  # move the offsets and scales of level 2 only
        rows = torch.arange(2 * 8 * 4).view(4, 8, 2)[2].flatten()
        prior.center_offsets.bias[rows] += 1.0
        prior.inverse_scales.bias[rows] += 1.0
    after = prior(query, center, memory)
    for b, a in zip(before, after):
        changed = (b != a).flatten(3).any(-1).any(0).any(0)  # (L, G)
        assert changed[2].all() and not changed[[0, 1, 3]].any()


def test_init_heads_start_apart_and_scales_at_one():
    """Release: the transformer's xavier pass covers point2 (offsets) and point4 (scale
    selection), biases keep Linear's default; point3 (scales) is then set to weight 0, bias 1."""
    torch.manual_seed(0)
    prior = GaussianPrior(256, 8, True, 8.0, STRIDES)
    bound = (6 / (256 + 64)) ** 0.5  # xavier_uniform_ bound for (64, 256)
    w = prior.center_offsets.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound and w.std() > 0.5 * bound
    assert prior.center_offsets.bias.abs().max() <= 1 / 256**0.5 and prior.center_offsets.bias.abs().max() > 0
    assert (prior.inverse_scales.weight == 0).all() and (prior.inverse_scales.bias == 1).all()
    # Heads start apart: at one query, per level, the 8 heads' centers differ by about a cell.
    query = nn.functional.layer_norm(torch.randn(1, 5, 256), (256,))  # the release's LayerNorm-ed input
    centers, _ = prior(query, torch.full((1, 5, 2), 0.5), unpadded_memory(256))
    spread = centers.std(dim=3)  # (1, Q, L, 2) across heads
    assert (spread > 0.3).all()


@pytest.mark.parametrize("per_head", [False, True])
def test_scale_selection_one_weight_per_query(per_head):
    """Release: point4 = Linear(d, 4 levels), softmax over levels, the same alpha for every head;
    xavier weight, so it does not start uniform."""
    torch.manual_seed(0)
    attention = SMCACrossAttention(64, 8, [0, 1, 2, 3], level_strides=STRIDES, scale_selection_per_head=per_head)
    selection = attention.scale_selection
    assert selection.out_features == (8 * 4 if per_head else 4)
    alpha = selection(torch.randn(2, 5, 64))
    assert alpha.shape == (2, 8 if per_head else 1, 5, 4)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(alpha.shape[:-1]))
    assert alpha.std(-1).min() > 0.01  # not uniform at init
    bound = (6 / (64 + selection.out_features)) ** 0.5
    assert selection.weight.abs().max() <= bound and selection.weight.abs().max() > 0.9 * bound


def test_model_defaults_reach_the_modules():
    """The COCO SMCA config builds decoder priors with the release's factors, per level."""
    cfg = load_config(os.path.join(CONFIGS, "coco/smca_deformable_detr_r50_50ep.yaml"))
    m = cfg.MODEL.HYBRID_DETR
    # build the cross-attention alone (no backbone weights needed)
    from hybrid_detr.modeling.smca import build_smca_cross_attention

    attention = build_smca_cross_attention(cfg)
    assert isinstance(attention, SMCACrossAttention)
    assert attention.prior.levels == [0, 1, 2, 3] and attention.prior.factors == [0.5, 0.5, 1.0, 2.0]
    assert attention.prior.sets == 4 and attention.prior.groups == m.NHEADS
    assert attention.scale_selection.out_features == 4
    m.SMCA.DEFORMABLE = True
    deformable = build_smca_cross_attention(cfg)
    assert isinstance(deformable, DeformableSMCACrossAttention)
    assert deformable.prior.factors == [0.5, 0.5, 1.0, 2.0]


def test_tiny_model_uses_level_priors():
    model = build_model(tiny_cfg(DECODER_MODE="smca"))
    prior = model.decoder.layers[0].cross_attn.prior
    assert prior.level_priors and len(prior.levels) == prior.sets


def test_reset_parameters_restores_the_release_init():
    """GaussianPrior and ScaleSelection re-apply their own (the release's) init on reset, for the
    transformer's xavier pass followed by each module's reset."""
    torch.manual_seed(0)
    attention = SMCACrossAttention(64, 8, [0, 1, 2, 3], level_strides=STRIDES)
    with torch.no_grad():
        for p in attention.parameters():
            p.fill_(0.123)
    attention.prior.reset_parameters()
    attention.scale_selection.reset_parameters()
    assert (attention.prior.inverse_scales.weight == 0).all() and (attention.prior.inverse_scales.bias == 1).all()
    for linear in (attention.prior.center_offsets, attention.scale_selection):
        assert linear.weight.std() > 0.01 and (linear.bias != 0.123).all()
