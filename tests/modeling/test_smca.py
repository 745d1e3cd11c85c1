"""SMCA: Gaussian-modulated co-attention (dense), "deformable SMCA", and the `dense` mode (SMCA's
co-attention without the prior). Parity with the official release: test_parity_smca.py."""
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from hybrid_detr.modeling.smca import (
    DeformableSMCACrossAttention,
    SMCACrossAttention,
    gaussian_log_prior,
)
from hybrid_detr.modeling.token_layout import EncoderMemory, LevelLayout
from model_helpers import assert_detections, expected_detections, synthetic_batch, tiny_cfg

# Two levels (strides 16 and 32); image 1 of the batch is padded (valid 4 x 5 of 6 x 8, and 2 x 3
# of 3 x 4).
SHAPES = [(6, 8), (3, 4)]
STRIDES = (16, 32)
VALID = [[(6, 8), (3, 4)], [(4, 5), (2, 3)]]


def make_memory(d_model, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, s = len(VALID), sum(h * w for h, w in SHAPES)
    masks, ratios = [], []
    for level, (h, w) in enumerate(SHAPES):
        mask = torch.ones(n, h, w, dtype=torch.bool)
        for i in range(n):
            vh, vw = VALID[i][level]
            mask[i, :vh, :vw] = False
        masks.append(mask.flatten(1))
        ratios.append(torch.tensor([[VALID[i][level][1] / w, VALID[i][level][0] / h] for i in range(n)]))
    return EncoderMemory(
        memory=torch.randn(n, s, d_model, generator=g),
        layout=LevelLayout.of_shapes(SHAPES),
        valid_ratios=torch.stack(ratios, 1),
        padding_mask=torch.cat(masks, 1),
        position=torch.randn(n, s, d_model, generator=g),
    )


def randomize(module, seed=1):
    """Non-trivial weights everywhere (offsets, scales and scale selection start as constants)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def dense_attention_without_prior(module: SMCACrossAttention, query, memory: EncoderMemory):
    """Independent multi-scale attention: per-level softmax over valid keys, alpha-weighted."""
    n, q, c = query.shape
    m, d = module.n_heads, c // module.n_heads
    qs = module.q_proj(query).view(n, q, m, d)
    selection = module.scale_selection
    alpha = F.linear(query, selection.weight, selection.bias).view(n, q, selection.groups, -1).softmax(-1)
    out = 0
    for i, level in enumerate(module.levels):
        h, w = SHAPES[level]
        start = int(memory.level_start_index[level])
        tokens = slice(start, start + h * w)
        ks = module.k_proj(memory.memory[:, tokens] + memory.position[:, tokens]).view(n, h * w, m, d)
        vs = module.v_proj(memory.memory[:, tokens]).view(n, h * w, m, d)
        logits = torch.einsum("nqmd,nsmd->nmqs", qs, ks) / math.sqrt(d)
        logits = logits.masked_fill(memory.padding_mask[:, None, None, tokens], float("-inf"))
        attended = torch.einsum("nmqs,nsmd->nqmd", logits.softmax(-1), vs)
        out = out + alpha[..., i : i + 1] * attended
    return module.out_proj(out.reshape(n, q, c))


@pytest.mark.parametrize("per_head_selection", [False, True])
def test_flat_prior_is_dense_attention(per_head_selection):
    torch.manual_seed(0)
    memory = make_memory(32)
    query = torch.randn(2, 7, 32)
    reference = torch.rand(2, 7, 2)
    kwargs = dict(level_strides=STRIDES, scale_selection_per_head=per_head_selection)
    flat = randomize(SMCACrossAttention(32, 4, [0, 1], beta=1e12, **kwargs)).eval()
    expected = dense_attention_without_prior(flat, query, memory)
    torch.testing.assert_close(flat(query, None, memory, reference), expected, rtol=1e-5, atol=1e-5)
    # With the official beta the prior does change the result.
    modulated = SMCACrossAttention(32, 4, [0, 1], beta=8.0, **kwargs).eval()
    modulated.load_state_dict(flat.state_dict())
    assert not torch.allclose(modulated(query, None, memory, reference), expected, atol=1e-3)
    # The `dense` mode's module (no prior) with the same weights is the flat-prior SMCA.
    dense = SMCACrossAttention(32, 4, [0, 1], prior=False, **kwargs).eval()
    assert dense.prior is None
    missing, unexpected = dense.load_state_dict(flat.state_dict(), strict=False)
    assert not missing and all(k.startswith("prior.") for k in unexpected)
    torch.testing.assert_close(dense(query, None, memory, reference), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense(query, None, memory, None), expected, rtol=1e-5, atol=1e-5)


def test_log_prior_formula():
    delta = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    s = torch.tensor([2.0, 3.0])  # (s_w, s_h)
    expected = -(delta[:, 0] ** 2 / (8 * s[0] ** 2) + delta[:, 1] ** 2 / (8 * s[1] ** 2))
    torch.testing.assert_close(gaussian_log_prior(delta, 1 / s, 8.0), expected)


def _single_level_memory(h, w, d_model):
    """One unpadded level whose values are (x, y, x^2, y^2) of each key, in cells."""
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    feats = torch.stack((xs, ys, xs**2, ys**2), -1).reshape(1, h * w, 4)
    feats = feats.repeat(1, 1, d_model // 4)
    return EncoderMemory(
        memory=feats,
        layout=LevelLayout.of_shapes([(h, w)]),
        valid_ratios=torch.ones(1, 1, 2),
        padding_mask=torch.zeros(1, h * w, dtype=torch.bool),
        position=torch.zeros_like(feats),
    )


def test_gaussian_peaks_at_center_and_falls_off_with_scale():
    """Content-blind keys: the attention is G / sum(G). Its mean is the predicted center and its
    variance beta * s^2 / 2 in each axis, per head."""
    h, w, beta = 40, 48, 8.0
    memory = _single_level_memory(h, w, 8)
    attention = SMCACrossAttention(8, 2, [0], beta=beta, level_strides=(32,), key_at_cell_center=True).eval()
    s = torch.tensor([[1.0, 2.0], [1.5, 0.75]])  # per head (s_w, s_h), in cells
    offsets = torch.tensor([[0.0, 0.0], [3.0, -2.0]])  # per head, in cells
    with torch.no_grad():
        attention.k_proj.weight.zero_()
        attention.v_proj.weight.copy_(torch.eye(8))
        attention.out_proj.weight.copy_(torch.eye(8))
        attention.prior.center_offsets.weight.zero_()
        attention.prior.center_offsets.bias.copy_(offsets.flatten())
        attention.prior.inverse_scales.bias.copy_((1 / s).flatten())
    reference = torch.tensor([[[0.45, 0.55]]])  # normalised; the unit level is this level
    out = attention(torch.randn(1, 1, 8), None, memory, reference)[0, 0].view(2, 4)  # per head
    center = reference[0, 0] * torch.tensor([w, h]) + offsets
    torch.testing.assert_close(out[:, :2], center, rtol=0, atol=1e-3)
    variance = out[:, 2:] - out[:, :2] ** 2
    torch.testing.assert_close(variance, beta * s**2 / 2, rtol=1e-3, atol=1e-3)

    # The bias itself: 0 at the center, log G = -(dx^2/(beta s_w^2) + dy^2/(beta s_h^2)) elsewhere.
    centers = torch.tensor([[[[10.5, 20.5]]]])  # (N, Q, G, 2): exactly the centre of key (20, 10)
    inverse = 1 / torch.tensor([[[[2.0, 4.0]]]])
    bias = attention.prior.level_bias(centers, inverse, memory, 0).view(h, w)
    assert bias.flatten().argmax() == 20 * w + 10 and bias[20, 10] == 0
    assert math.isclose(bias[20, 13].item(), -(3**2) / (beta * 2.0**2), rel_tol=1e-6)
    assert math.isclose(bias[25, 10].item(), -(5**2) / (beta * 4.0**2), rel_tol=1e-6)
    # A larger scale falls off more slowly.
    wide = attention.prior.level_bias(centers, inverse / 2, memory, 0).view(h, w)
    assert wide[20, 13] > bias[20, 13] and math.isclose(wide[20, 13].item(), bias[20, 13].item() / 4, rel_tol=1e-6)


@pytest.mark.parametrize("key_at_cell_center", [False, True])
def test_deformable_prior_at_sampling_locations(key_at_cell_center):
    """Deformable SMCA adds log G at each sampling location; a location at a key's centre gets that
    key's log G in the dense co-attention (same prior, same weights)."""
    torch.manual_seed(0)
    memory = make_memory(16)
    kwargs = dict(level_strides=STRIDES, key_at_cell_center=key_at_cell_center)
    attention = randomize(DeformableSMCACrossAttention(16, 2, 2, 3, beta=8.0, **kwargs))
    reference = torch.rand(2, 5, 2) * 0.8 + 0.1
    query = torch.randn(2, 5, 16)
    captured = {}

    def spy(module, args, kwargs, output):
        captured["log_prior"] = kwargs["log_prior"]

    attention.attn.register_forward_hook(spy, with_kwargs=True)
    reference_points = reference[:, :, None] * memory.valid_ratios[:, None]
    attention(query, reference_points, memory, reference)
    dense = SMCACrossAttention(16, 2, [0, 1], beta=8.0, **kwargs)
    dense.prior.load_state_dict(attention.prior.state_dict())
    centers, inverse = dense.prior(query, reference, memory)
    for level, (h, w) in enumerate(SHAPES):
        bias = dense.prior.level_bias(centers[:, :, level], inverse[:, :, level], memory, level)  # (N, M, Q, HW)
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        key_centres = torch.stack((xs.flatten() / w, ys.flatten() / h), -1)  # (HW, 2), padded frame
        # locations (N, Q, M, L, P, 2): every key centre of this level as P points, on both levels
        locations = key_centres[None, None, None, None].expand(2, 5, 2, 2, h * w, 2)
        at_keys = captured["log_prior"](locations)[:, :, :, level]  # (N, Q, M, HW)
        torch.testing.assert_close(at_keys, bias.permute(0, 2, 1, 3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deformable", [False, True])
def test_padding_is_ignored(deformable):
    torch.manual_seed(0)
    memory = make_memory(32)
    if deformable:
        attention = randomize(DeformableSMCACrossAttention(32, 2, 4, 2, level_strides=STRIDES))
    else:
        attention = randomize(SMCACrossAttention(32, 4, [0, 1], level_strides=STRIDES))
    attention.eval()
    query, reference = torch.randn(2, 6, 32), torch.rand(2, 6, 2)
    reference_points = reference[:, :, None] * memory.valid_ratios[:, None]
    before = attention(query, reference_points, memory, reference)
    pad = memory.padding_mask
    assert pad.any()
    memory.memory = torch.where(pad[..., None], torch.randn_like(memory.memory) * 100, memory.memory)
    memory.position = torch.where(pad[..., None], torch.randn_like(memory.position) * 100, memory.position)
    after = attention(query, reference_points, memory, reference)
    torch.testing.assert_close(before, after)
    assert torch.isfinite(after).all()


@pytest.mark.parametrize("deformable", [False, True])
def test_gradients_reach_center_and_scale_predictors(deformable):
    torch.manual_seed(0)
    memory = make_memory(32)
    if deformable:
        attention = DeformableSMCACrossAttention(32, 2, 4, 2, level_strides=STRIDES)
        with torch.no_grad():  # non-uniform logits, so the prior's gradient is not zero
            attention.attn.attention_weights.weight.normal_(std=0.3)
    else:
        attention = SMCACrossAttention(32, 4, [0, 1], level_strides=STRIDES)
    reference = torch.rand(2, 6, 2).requires_grad_()
    reference_points = reference.detach()[:, :, None] * memory.valid_ratios[:, None]
    attention(torch.randn(2, 6, 32), reference_points, memory, reference).square().sum().backward()
    assert reference.grad is not None and reference.grad.abs().sum() > 0  # the shared center
    for p in (attention.prior.center_offsets.weight, attention.prior.inverse_scales.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_bad_levels_rejected():
    cfg = tiny_cfg(DECODER_MODE="smca")
    cfg.MODEL.HYBRID_DETR.SMCA.LEVELS = [0, 4]
    with pytest.raises(ValueError, match="SMCA.LEVELS"):
        build_model(cfg)


def _train_and_infer(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    losses = model(synthetic_batch())
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    batch = synthetic_batch()
    with torch.no_grad():
        results = model(batch)
        # the detections are the top (query, class) pairs of the last layer, boxes in each image's pixels
        assert_detections(results, expected_detections(model, batch))
    return model, losses


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"PER_HEAD": False, "LEVELS": [1, 2, 3]},
        {"DEFORMABLE": True},
        {"DEFORMABLE": True, "PER_HEAD": False},
        {"LEVEL_PRIORS": False, "KEY_AT_CELL_CENTER": True, "SCALE_SELECTION_PER_HEAD": True},
        {"DEFORMABLE": True, "LEVEL_PRIORS": False, "KEY_AT_CELL_CENTER": True},
    ],
    ids=[
        "smca",
        "smca-shared-head-3-levels",
        "deformable-smca",
        "deformable-smca-shared-head",
        "smca-ours-options",
        "deformable-smca-ours-options",
    ],
)
def test_training_step_and_inference(overrides):
    cfg = tiny_cfg(DECODER_MODE="smca")
    for key, value in overrides.items():
        setattr(cfg.MODEL.HYBRID_DETR.SMCA, key, value)
    model, _ = _train_and_infer(cfg)
    cross = model.decoder.layers[0].cross_attn
    assert isinstance(cross, DeformableSMCACrossAttention if overrides.get("DEFORMABLE") else SMCACrossAttention)
    # The center predictor (the learned queries' reference points) and the scale predictors learn.
    assert model.query_source.reference_points.weight.grad.abs().sum() > 0
    for layer in model.decoder.layers:
        assert layer.cross_attn.prior.inverse_scales.weight.grad.abs().sum() > 0


def test_smca_with_box_refinement_and_two_stage():
    """The Gaussian's center is the query's reference: the two-stage proposal in layer 0, then each layer's
    refined box."""
    model, losses = _train_and_infer(tiny_cfg(DECODER_MODE="smca", WITH_BOX_REFINE=True, TWO_STAGE=True))
    assert {"enc_loss_class", "enc_loss_bbox", "loss_bbox_0"} <= set(losses)
    with torch.no_grad():  # untrained box heads end in zeros: give the refinement something to do
        for head in model.decoder.heads.box_heads:
            head.layers[-1].weight.normal_(std=0.05)
    centers, seen = [], {}
    for layer in model.decoder.layers:
        layer.cross_attn.register_forward_pre_hook(lambda _m, args: centers.append(args[3]))
    model.decoder.register_forward_hook(lambda _m, args, out: seen.update(queries=args[0], output=out))
    with torch.no_grad():
        model(synthetic_batch())
    assert len(centers) == len(model.decoder.layers) == 2
    assert torch.equal(centers[0], seen["queries"].reference)  # the proposals
    assert torch.equal(centers[1], seen["output"].boxes[0])  # refined by layer 0
    assert not torch.equal(centers[1], centers[0])


@pytest.mark.parametrize("deformable", [False, True])
def test_smca_with_dac(deformable):
    """DAC's C pass runs SMCA's cross-attention without self-attention, and its losses train SMCA's prior."""
    cfg = tiny_cfg(DECODER_MODE="smca+dac")
    cfg.MODEL.HYBRID_DETR.SMCA.DEFORMABLE = deformable
    model, _ = _train_and_infer(cfg)
    model.train()
    model.zero_grad()
    calls = {"self": 0, "cross": 0}
    for layer in model.decoder.layers:
        layer.self_attn.register_forward_hook(lambda *_: calls.update(self=calls["self"] + 1))
        layer.cross_attn.register_forward_hook(lambda *_: calls.update(cross=calls["cross"] + 1))
    losses = model(synthetic_batch())
    layers = len(model.decoder.layers)
    assert calls == {"self": layers, "cross": 2 * layers}  # O pass: both; C pass: cross-attention only
    dac_losses = {k: v for k, v in losses.items() if k.startswith("dac_")}
    assert set(dac_losses) == {f"dac_loss_{n}{s}" for n in ("class", "bbox", "giou") for s in ("", "_0")}
    sum(dac_losses.values()).backward()
    for layer in model.decoder.layers:
        assert layer.cross_attn.prior.inverse_scales.weight.grad.abs().sum() > 0
    # The C pass runs no self-attention; it starts from the O pass's layer-0 self-attention output (the
    # release's C_INPUT_FROM_O_SELF_ATTN), so only that layer's self-attention gets the C losses' gradient.
    first, *others = [layer.self_attn for layer in model.decoder.layers]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in first.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for attn in others for p in attn.parameters())


def test_flop_handle_counts_the_dense_attention():
    from fvcore.nn import FlopCountAnalysis

    from hybrid_detr.layers import flop_count_handles

    memory = make_memory(32)

    class Wrapper(torch.nn.Module):  # tracing takes tensors only
        def __init__(self):
            super().__init__()
            self.attention = SMCACrossAttention(32, 4, [0, 1], level_strides=STRIDES).eval()

        def forward(self, query, reference, tokens, valid_ratios, padding_mask, position):
            return self.attention(
                query, None, EncoderMemory(tokens, memory.layout, valid_ratios, padding_mask, position), reference
            )

    fields = (memory.memory, memory.valid_ratios, memory.padding_mask, memory.position)
    inputs = (torch.randn(2, 7, 32), torch.rand(2, 7, 2)) + fields
    analysis = FlopCountAnalysis(Wrapper(), inputs).set_op_handle(**flop_count_handles())
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    # Q K^T and attention x V: N x heads x Q x S x (2 x head dim), over both levels.
    expected = 2 * 4 * 7 * sum(h * w for h, w in SHAPES) * (8 + 8)
    assert analysis.by_operator()["scaled_dot_product_attention"] == expected


def test_dense_mode_trains_and_infers():
    """DECODER_MODE "dense": SMCA's co-attention module without the prior, in every layer."""
    model, losses = _train_and_infer(tiny_cfg(DECODER_MODE="dense"))
    for layer in model.decoder.layers:
        assert isinstance(layer.cross_attn, SMCACrossAttention) and layer.cross_attn.prior is None
    assert model.decoder.layers[0].cross_attn.q_proj.weight.grad.abs().sum() > 0
    assert not any(k.startswith("dac_") for k in losses)


def test_dense_mode_equals_smca_with_flat_prior():
    """The same weights in a "dense" model and an "smca" model with a huge BETA give the same
    predictions (the prior's own weights are the only extra parameters of smca)."""
    dense_cfg = tiny_cfg(DECODER_MODE="dense")
    smca_cfg = tiny_cfg(DECODER_MODE="smca")
    smca_cfg.MODEL.HYBRID_DETR.SMCA.BETA = 1e12
    torch.manual_seed(0)
    smca = build_model(smca_cfg).eval()
    dense = build_model(dense_cfg).eval()
    missing, unexpected = dense.load_state_dict(smca.state_dict(), strict=False)
    assert not missing and unexpected and all(".cross_attn.prior." in k for k in unexpected)
    with torch.no_grad():
        a, b = smca(synthetic_batch()), dense(synthetic_batch())
    for x, y in zip(a, b):
        torch.testing.assert_close(x["instances"].pred_boxes.tensor, y["instances"].pred_boxes.tensor, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(x["instances"].scores, y["instances"].scores, rtol=1e-4, atol=1e-4)
    # With the official BETA the smca model differs.
    smca_cfg.MODEL.HYBRID_DETR.SMCA.BETA = 8.0
    modulated = build_model(smca_cfg).eval()
    modulated.load_state_dict(smca.state_dict())
    with torch.no_grad():
        c = modulated(synthetic_batch())
    assert not torch.allclose(c[0]["instances"].scores, b[0]["instances"].scores, atol=1e-4)
