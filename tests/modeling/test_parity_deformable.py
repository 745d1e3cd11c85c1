"""Defaults that match the official Deformable DETR code (fundamentalvision/Deformable-DETR), and
the shared-transformer options MIXED_SELECTION / LOOK_FORWARD_TWICE (DINO). Each test fails on the
behaviour it replaced."""
import math

import pytest
import torch
from detectron2.modeling import build_model

from hybrid_detr.layers import MSDeformAttn
from hybrid_detr.modeling.transformer import DeformableDecoder
from model_helpers import NUM_CLASSES, synthetic_batch, tiny_cfg

REFINE = {"WITH_BOX_REFINE": True}
TWO_STAGE = {"WITH_BOX_REFINE": True, "TWO_STAGE": True}


def _wh_bias(head):
    return head.layers[-1].bias[2:]


# ---------------------------------------------------------------- 1. box-head w/h bias
@pytest.mark.parametrize("options", [TWO_STAGE, {"TWO_STAGE": True}])
def test_two_stage_box_heads_start_at_wh_bias_zero(options):
    heads = build_model(tiny_cfg(**options)).decoder.heads
    assert len(heads.box_heads) == 3  # 2 decoder layers + the encoder's
    for head in heads.box_heads:
        assert torch.equal(_wh_bias(head), torch.zeros(2))


@pytest.mark.parametrize("options", [{}, REFINE])
def test_without_two_stage_head_0_starts_at_wh_bias_minus_2(options):
    heads = build_model(tiny_cfg(**options)).decoder.heads
    assert torch.equal(_wh_bias(heads.box_heads[0]), torch.full((2,), -2.0))
    if options:  # per-layer heads: the later ones start at 0
        assert torch.equal(_wh_bias(heads.box_heads[1]), torch.zeros(2))


# ---------------------------------------------------------------- 2. refinement references
def _record_references(model):
    seen = []
    for layer in model.decoder.layers:
        layer.cross_attn.register_forward_hook(lambda m, args, out: seen.append((args[1], args[3])))
    return seen


def test_refinement_without_two_stage_uses_the_previous_layers_4d_box_from_layer_1():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(DEC_LAYERS=3, **REFINE)).eval()
    seen = _record_references(model)
    images, padding = model.preprocess_image(synthetic_batch())
    with torch.no_grad():
        _, _, _, out = model.transformer(*model.features(images.tensor, padding))
    (points0, ref0), (points1, ref1), (points2, ref2) = seen
    assert ref0.shape[-1] == 2 and points0.shape[-1] == 2
    assert ref1.shape[-1] == 4 and points1.shape[-1] == 4 and ref2.shape[-1] == 4
    assert torch.equal(ref1, out.boxes[0]) and torch.equal(ref2, out.boxes[1])


def test_without_refinement_every_layer_keeps_the_initial_points():
    model = build_model(tiny_cfg(DEC_LAYERS=3)).eval()
    seen = _record_references(model)
    images, padding = model.preprocess_image(synthetic_batch())
    with torch.no_grad():
        model.transformer(*model.features(images.tensor, padding))
    assert all(torch.equal(ref, seen[0][1]) and ref.shape[-1] == 2 for _, ref in seen)


# ---------------------------------------------------------------- 3. class-agnostic encoder head
def test_two_stage_encoder_head_is_trained_class_agnostically():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**TWO_STAGE)).train()
    calls = []
    model.matcher.register_forward_pre_hook(
        lambda m, args: calls.append((args[0].shape[1], [t["labels"].clone() for t in args[2]]))
    )
    batch = synthetic_batch()
    losses = model(batch)
    num_queries = model.query_source.num_queries
    encoder_calls = [labels for q, labels in calls if q != num_queries]
    decoder_calls = [labels for q, labels in calls if q == num_queries]
    assert len(encoder_calls) == 1 and len(decoder_calls) == 2
    assert all((labels == 0).all() for labels in encoder_calls[0])
    assert (decoder_calls[0][0] != 0).any()  # the decoder keeps the real classes
    assert torch.isfinite(losses["enc_loss_class"]) and losses["enc_loss_class"] > 0


def test_two_stage_proposals_are_ranked_by_logit_0():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**TWO_STAGE)).eval()
    source = model.query_source
    encoder_head = source.heads.class_heads[source.encoder_head_index]
    with torch.no_grad():
        encoder_head.weight.normal_()
        # Class 1 dominates every token's max, so ranking by the max would follow class 1.
        encoder_head.bias.zero_()
        encoder_head.bias[1] = 100.0
    images, padding = model.preprocess_image(synthetic_batch())
    with torch.no_grad():
        memory = model.encode(images.tensor, padding)
        queries, (logits, boxes) = source(memory)
    _, valid = source.token_proposals(memory)
    expected = logits[..., 0].masked_fill(~valid, float("-inf")).topk(source.num_queries, dim=1).indices
    expected_boxes = boxes.gather(1, expected[..., None].expand(-1, -1, 4))
    assert torch.equal(queries.reference, expected_boxes)
    by_max = logits.max(-1).values.masked_fill(~valid, float("-inf")).topk(source.num_queries, dim=1).indices
    assert not torch.equal(by_max, expected)


# ---------------------------------------------------------------- 4. initialisation
def _xavier_bound(weight):
    fan_out, fan_in = weight.shape[0], weight[0].numel()
    return math.sqrt(6.0 / (fan_in + fan_out))


def test_transformer_is_xavier_initialised_and_heads_are_not():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**TWO_STAGE))
    # Xavier: PyTorch's default Linear init is bounded by 1/sqrt(fan_in), below Xavier's bound here.
    xavier = [
        model.encoder.layers[0].ffn.linear1.weight,
        model.decoder.layers[1].ffn.linear2.weight,
        model.decoder.layers[0].self_attn.in_proj_weight,
        model.decoder.layers[0].self_attn.out_proj.weight,
        model.query_source.memory_proj.weight,
        model.query_source.position_proj.weight,
    ]
    for w in xavier:
        bound = _xavier_bound(w)
        assert w.abs().max() <= bound and w.abs().max() > 1.0 / math.sqrt(w.shape[1]), w.shape
    # MSDeformAttn's own reset wins over the xavier pass.
    for m in model.modules():
        if isinstance(m, MSDeformAttn):
            assert torch.equal(m.sampling_offsets.weight, torch.zeros_like(m.sampling_offsets.weight))
            assert torch.equal(m.attention_weights.weight, torch.zeros_like(m.attention_weights.weight))
            assert m.sampling_offsets.bias.abs().max() == m.n_points
    # The prediction heads keep their own init (attached after the official transformer's reset).
    class_head = model.decoder.heads.class_heads[0]
    assert class_head.weight.abs().max() <= 1.0 / math.sqrt(class_head.weight.shape[1])
    assert torch.allclose(class_head.bias, torch.full((NUM_CLASSES,), -math.log(99.0)))
    assert torch.equal(model.decoder.heads.box_heads[0].layers[-1].weight, torch.zeros(4, 64))
    first = model.decoder.heads.box_heads[0].layers[0].weight
    assert first.abs().max() <= 1.0 / math.sqrt(first.shape[1])


def test_learned_queries_keep_their_embedding_and_reference_point_init():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    source = model.query_source
    assert source.embedding.weight.abs().max() > 2.0  # normal_, not xavier
    assert torch.equal(source.reference_points.bias, torch.zeros(2))
    assert source.reference_points.weight.abs().max() <= _xavier_bound(source.reference_points.weight)
    assert abs(model.level_embed.std().item() - 1.0) < 0.3  # normal_


@pytest.mark.parametrize("deformable", [False, True])
def test_smca_cross_attention_keeps_its_own_init_after_the_xavier_pass(deformable):
    torch.manual_seed(0)
    cfg = tiny_cfg(DECODER_MODE="smca")
    cfg.MODEL.HYBRID_DETR.SMCA.DEFORMABLE = deformable
    model = build_model(cfg)
    for layer in model.decoder.layers:
        # SMCA's own init (the release's): inverse scales weight 0, bias 1 (the xavier pass would
        # have made the weight non-zero); offsets and scale selection xavier (heads start apart).
        prior = layer.cross_attn.prior
        assert torch.equal(prior.inverse_scales.weight, torch.zeros_like(prior.inverse_scales.weight))
        assert torch.equal(prior.inverse_scales.bias, torch.ones_like(prior.inverse_scales.bias))
        offsets = prior.center_offsets.weight
        assert 0 < offsets.abs().max() <= _xavier_bound(offsets)
        selection = getattr(layer.cross_attn, "scale_selection", None)
        if selection is not None:
            assert 0 < selection.weight.abs().max() <= _xavier_bound(selection.weight)


# ---------------------------------------------------------------- 5. mixed selection, look-forward-twice
def test_mixed_selection_takes_learned_content_and_proposal_positions():
    torch.manual_seed(0)
    plain = build_model(tiny_cfg(**TWO_STAGE)).eval()
    torch.manual_seed(0)
    mixed = build_model(tiny_cfg(MIXED_SELECTION=True, **TWO_STAGE)).eval()
    mixed.load_state_dict({**plain.state_dict(), "query_source.content.weight": mixed.query_source.content.weight}, strict=True)
    images, padding = plain.preprocess_image(synthetic_batch())
    with torch.no_grad():
        memory = plain.encode(images.tensor, padding)
        a, _ = plain.query_source(memory)
        b, _ = mixed.query_source(memory)
    assert torch.equal(a.reference, b.reference) and torch.equal(a.position, b.position)
    assert torch.equal(b.content, mixed.query_source.content.weight[None].expand(2, -1, -1))
    assert not torch.allclose(a.content, b.content)


def test_mixed_selection_needs_two_stage_and_look_forward_twice_needs_refinement():
    with pytest.raises(ValueError, match="MIXED_SELECTION"):
        build_model(tiny_cfg(MIXED_SELECTION=True))
    with pytest.raises(ValueError, match="LOOK_FORWARD_TWICE"):
        build_model(tiny_cfg(LOOK_FORWARD_TWICE=True))


def _box_losses_and_grads(look_forward_twice):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(LOOK_FORWARD_TWICE=look_forward_twice, **TWO_STAGE)).train()
    images, padding = model.preprocess_image(synthetic_batch())
    _, _, _, out = model.transformer(*model.features(images.tensor, padding))
    out.boxes[1].sum().backward()  # a loss on layer 1's boxes only
    return out.boxes.detach(), model.decoder.heads.box_heads[0].layers[-1].bias.grad


def test_look_forward_twice_same_boxes_but_layer_1_loss_trains_layer_0():
    boxes, grad = _box_losses_and_grads(False)
    boxes_lft, grad_lft = _box_losses_and_grads(True)
    assert torch.allclose(boxes, boxes_lft, atol=1e-6)
    assert grad is None or torch.equal(grad, torch.zeros_like(grad))  # detached: no path to layer 0's head
    assert grad_lft is not None and grad_lft.abs().sum() > 0


def test_look_forward_twice_formula():
    """Layer i's box = sigmoid(delta_i + logit(layer i-1's undetached box)); references detached."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(LOOK_FORWARD_TWICE=True, DEC_LAYERS=3, **REFINE)).train()
    decoder: DeformableDecoder = model.decoder
    deltas = []
    for head in decoder.heads.box_heads:
        head.register_forward_hook(lambda m, args, out: deltas.append(out))
    seen = _record_references(model)
    images, padding = model.preprocess_image(synthetic_batch())
    _, _, _, out = model.transformer(*model.features(images.tensor, padding))
    heads = decoder.heads
    undetached = heads.boxes_around(deltas[0], seen[0][1])
    for i in (1, 2):
        assert not seen[i][1].requires_grad
        expected = heads.boxes_around(deltas[i], undetached)
        assert torch.allclose(out.boxes[i], expected, atol=1e-6)
        assert expected.grad_fn is not None
        undetached = heads.boxes_around(deltas[i], seen[i][1])


# ---------------------------------------------------------------- 6. raw predictions
def test_raw_predictions_are_the_last_layer_in_inference_mode():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**TWO_STAGE)).train()
    batch = synthetic_batch()
    raw = model.raw_predictions(batch)
    assert model.training  # restored
    assert raw["pred_logits"].shape == (2, 20, NUM_CLASSES) and raw["pred_boxes"].shape == (2, 20, 4)
    assert (raw["pred_boxes"] >= 0).all() and (raw["pred_boxes"] <= 1).all()
    model.eval()
    with torch.no_grad():
        images, padding = model.preprocess_image(batch)
        _, _, _, out = model.transformer(*model.features(images.tensor, padding))
        results = model(batch)
    assert torch.equal(raw["pred_logits"], out.logits[-1]) and torch.equal(raw["pred_boxes"], out.boxes[-1])
    # The best detection of image 0 is raw box (query q) scaled to the image.
    flat = raw["pred_logits"][0].sigmoid().flatten().argmax()
    q = int(flat) // NUM_CLASSES
    cx, cy, w, h = raw["pred_boxes"][0, q].tolist()
    height, width = batch[0]["height"], batch[0]["width"]
    expected = torch.tensor([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
    expected = expected.clamp(min=0).clamp(max=torch.tensor([width, height, width, height]))
    assert torch.allclose(results[0]["instances"].pred_boxes.tensor[0], expected, atol=1e-3)


def test_two_stage_mask_invalid_false_ranks_invalid_proposals_as_the_official_code():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(TWO_STAGE_MASK_INVALID=False, **TWO_STAGE)).eval()
    source = model.query_source
    encoder_head = source.heads.class_heads[source.encoder_head_index]
    images, padding = model.preprocess_image(synthetic_batch())
    with torch.no_grad():
        # Invalid tokens have a zeroed feature, hence one shared logit: make it the best (a class-0
        # weight along that feature's normalised projection; every token's is as long).
        memory = model.encode(images.tensor, padding)
        zero_feature = source.memory_norm(source.memory_proj(torch.zeros(1, 64)))[0]
        encoder_head.weight[0] = zero_feature
        encoder_head.bias[0] = 0.0
        queries, (logits, boxes) = source(memory)
    _, valid = source.token_proposals(memory)
    assert (~valid[1]).any()  # the smaller image is padded
    assert torch.equal(boxes[~valid], torch.ones_like(boxes[~valid]))  # the official infinite log-odds
    assert (logits[~valid] != -1e4).all()  # not masked: the loss trains them as background
    assert (logits[~valid][:, 0] >= logits[valid][:, 0].max()).all()
    # They rank first, and their reference boxes are (1, 1, 1, 1).
    assert torch.equal(queries.reference[1, 0], torch.ones(4))
    masked = build_model(tiny_cfg(**TWO_STAGE)).eval()
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        masked_queries, (masked_logits, _) = masked.query_source(memory)
    assert (masked_queries.reference != 1).any(-1).all()
    assert (masked_logits[~valid] == -1e4).all()
    model.train()
    losses = model(synthetic_batch())
    assert all(torch.isfinite(v) for v in losses.values()) and losses["enc_loss_class"] > 0
