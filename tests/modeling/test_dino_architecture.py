"""DINO's architecture as options of the shared transformer (IDEA-Research/DINO; each test names the
official lines it follows). Every option is off by default; the formulas are re-derived here from the
official code's facts (no official code is imported)."""
import math

import pytest
import torch
from detectron2.modeling import META_ARCH_REGISTRY, build_model

from hybrid_detr.config import load_config
from hybrid_detr.model_zoo import get_config_file
from hybrid_detr.modeling.position_encoding import PositionEmbeddingSine, box_sine_embedding
from hybrid_detr.modeling.transformer import QueryGroup, inverse_sigmoid
from model_helpers import NUM_CLASSES, synthetic_batch, tiny_cfg

DINO = dict(
    TWO_STAGE=True, WITH_BOX_REFINE=True, MIXED_SELECTION=True, LOOK_FORWARD_TWICE=True, QUERY_POSITION_FROM_REFERENCE=True,
    DECODER_FINAL_NORM=True, SHARE_DECODER_HEADS=True, TWO_STAGE_RANKING="max_class",
    TWO_STAGE_ENCODER_LOSS="class_aware_topk", TWO_STAGE_MASK_INVALID=False, INVERSE_SIGMOID_EPS=1e-3,
    POSITION_TEMPERATURE=20, POSITION_OFFSET=0.0, DEC_LAYERS=3,
)


def _dino(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(**{**DINO, **overrides}))


def _memory_and_queries(model):
    images, padding_mask = model.preprocess_image(synthetic_batch())
    memory = model.encode(images.tensor, padding_mask)
    queries, encoder_predictions = model.query_source(memory)
    return memory, queries, encoder_predictions


def _sine_dino(pos, num=128, temperature=10000):
    """gen_sineembed_for_position (models/dino/utils.py:138-164), re-derived: per coordinate
    c * 2pi / 10000^(2 floor(i/2) / num), sin on even i and cos on odd i interleaved; y, x, w, h."""
    dim_t = temperature ** (2 * (torch.arange(num) // 2) / num)

    def one(c):
        a = c[..., None] * (2 * math.pi) / dim_t
        return torch.stack((a[..., 0::2].sin(), a[..., 1::2].cos()), -1).flatten(-2)

    parts = [one(pos[..., 1]), one(pos[..., 0])] + ([one(pos[..., 2]), one(pos[..., 3])] if pos.shape[-1] == 4 else [])
    return torch.cat(parts, -1)


def test_every_dino_option_is_off_by_default():
    m = tiny_cfg().MODEL.HYBRID_DETR
    assert not (m.QUERY_POSITION_FROM_REFERENCE or m.DECODER_FINAL_NORM or m.SHARE_DECODER_HEADS)
    assert (m.TWO_STAGE_RANKING, m.TWO_STAGE_ENCODER_LOSS, m.INVERSE_SIGMOID_EPS) == ("objectness", "class_agnostic", 1e-5)
    assert (m.POSITION_TEMPERATURE, m.POSITION_OFFSET) == (10000, -0.5)
    torch.manual_seed(0)
    model = build_model(tiny_cfg(TWO_STAGE=True, WITH_BOX_REFINE=True))
    assert model.decoder.ref_point_head is None and model.decoder.norm is None
    assert model.query_source.position_proj is not None
    assert model.decoder.heads.class_heads[0] is not model.decoder.heads.class_heads[1]


def test_box_sine_embedding_in_dino_order():
    boxes = torch.rand(2, 5, 4)
    torch.testing.assert_close(box_sine_embedding(boxes, 16, y_first=True), _sine_dino(boxes, 16), rtol=0, atol=1e-6)
    points = torch.rand(3, 2)
    torch.testing.assert_close(box_sine_embedding(points, 8, y_first=True), _sine_dino(points, 8), rtol=0, atol=1e-6)
    # The default order is x, y, w, h (Deformable DETR's proposal embedding).
    assert torch.equal(box_sine_embedding(boxes, 16)[..., :16], box_sine_embedding(boxes, 16, y_first=True)[..., 16:32])


def test_position_embedding_temperature_20_without_offset():
    """PositionEmbeddingSineHW(128, 20, 20, normalize=True) (position_encoding.py:62-108, 142-147)."""
    mask = torch.ones(1, 4, 6, dtype=torch.bool)
    mask[0, :3, :5] = False
    pos = PositionEmbeddingSine(8, temperature=20, offset=0.0)(mask)
    not_mask = (~mask).float()
    y = not_mask.cumsum(1) / (not_mask.cumsum(1)[:, -1:, :] + 1e-6) * 2 * math.pi
    x = not_mask.cumsum(2) / (not_mask.cumsum(2)[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = 20 ** (2 * (torch.arange(8) // 2) / 8)

    def one(c):
        a = c[..., None] / dim_t
        return torch.stack((a[..., 0::2].sin(), a[..., 1::2].cos()), -1).flatten(-2)

    expected = torch.cat((one(y), one(x)), -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(pos, expected, rtol=0, atol=1e-6)
    model = _dino()
    assert (model.neck.position_embedding.temperature, model.neck.position_embedding.offset) == (20, 0.0)


def test_dino_heads_are_shared_by_the_decoder_layers_and_the_encoder_has_its_own():
    """dino.py:132-169: one class / box head for every decoder layer, deep copies for the encoder;
    class bias at the 0.01 prior, the box MLP's last layer zero."""
    heads = _dino().decoder.heads
    assert len(heads.class_heads) == 4
    assert all(heads.class_heads[i] is heads.class_heads[0] and heads.box_heads[i] is heads.box_heads[0] for i in range(3))
    assert heads.class_heads[3] is not heads.class_heads[0] and heads.box_heads[3] is not heads.box_heads[0]
    for i in (0, 3):
        torch.testing.assert_close(heads.class_heads[i].bias, torch.full((NUM_CLASSES,), -math.log(99.0)))
        assert not heads.box_heads[i].layers[-1].weight.any() and not heads.box_heads[i].layers[-1].bias.any()
    assert heads.inverse_sigmoid_eps == 1e-3
    x = torch.tensor([0.0, 5e-4, 0.5, 1.0])
    torch.testing.assert_close(inverse_sigmoid(x, 1e-3), torch.log(x.clamp(min=1e-3) / (1 - x).clamp(min=1e-3)))


def test_query_position_comes_from_each_layers_reference_and_the_group_position_is_unused():
    """deformable_transformer.py:681-696: query_pos = ref_point_head(sine(reference * level-0 valid ratio))."""
    model = _dino().eval()
    with torch.no_grad():
        memory, queries, _ = _memory_and_queries(model)
        assert not queries.position.any()  # zeros: the decoder computes positions itself
        seen = []
        layer = model.decoder.layers[1]
        original = layer.cross_and_ffn

        def spy(content, position, reference_points, memory_, query_reference):
            seen.append((position, query_reference))
            return original(content, position, reference_points, memory_, query_reference)

        layer.cross_and_ffn = spy
        out = model.decoder(queries, memory)
        position, reference = seen[0]
        scaled = reference * torch.cat((memory.valid_ratios[:, 0], memory.valid_ratios[:, 0]), -1)[:, None]
        head = model.decoder.ref_point_head
        expected = head.layers[1](torch.relu(head.layers[0](_sine_dino(scaled, 32))))
        torch.testing.assert_close(position, expected, rtol=0, atol=1e-5)
        # Any other group position gives the same outputs.
        noisy = QueryGroup(queries.content, torch.randn_like(queries.content), queries.reference)
        del layer.cross_and_ffn
        again = model.decoder(noisy, memory)
    assert torch.equal(out.logits, again.logits) and torch.equal(out.boxes, again.boxes)


def test_query_position_from_reference_needs_two_stage():
    with pytest.raises(ValueError, match="QUERY_POSITION_FROM_REFERENCE needs TWO_STAGE"):
        build_model(tiny_cfg(QUERY_POSITION_FROM_REFERENCE=True))


def test_final_norm_predicts_from_the_normed_output_and_refines_from_the_raw_one():
    """deformable_transformer.py:731-755 and dino.py:277-285, unrolled by hand: reference i+1 =
    sigmoid(box_head(raw_i) + logit(ref_i)) detached; box_i = sigmoid(box_head(norm(raw_i)) +
    logit(ref_i before its detach)) (look-forward-twice); logits_i = class_head(norm(raw_i))."""
    model = _dino(1).eval()
    dec = model.decoder
    with torch.no_grad():
        memory, queries, _ = _memory_and_queries(model)
        out = dec(queries, memory)
        heads = dec.heads
        content, reference, undetached = queries.content, queries.reference, queries.reference
        for i, layer in enumerate(dec.layers):
            points = dec._scale_to_levels(reference, memory.valid_ratios)
            position = dec.query_position(points)
            content = layer.cross_and_ffn(layer.self_attention(content, position, None), position, points, memory, reference)
            normed = dec.norm(content)
            logit_ref = inverse_sigmoid(undetached, 1e-3)
            torch.testing.assert_close(out.logits[i], heads.class_heads[i](normed), rtol=0, atol=1e-5)
            torch.testing.assert_close(out.boxes[i], (heads.box_heads[i](normed) + logit_ref).sigmoid(), rtol=0, atol=1e-5)
            torch.testing.assert_close(out.hidden[i], normed, rtol=0, atol=1e-5)
            refined = (heads.box_heads[i](content) + inverse_sigmoid(reference, 1e-3)).sigmoid()
            reference = undetached = refined
    # The norm is in the path: scaling it changes the outputs.
    with torch.no_grad():
        dec.norm.weight.mul_(1.5)
        assert not torch.allclose(dec(queries, memory).logits, out.logits)


def test_max_class_ranking_and_class_aware_encoder_outputs_of_the_selected_proposals():
    """deformable_transformer.py:339-347, 416-417: top-k by the max over classes; the encoder
    ("interm") predictions are those of the k selected proposals, with gradients."""
    model = _dino(2).eval()
    source = model.query_source
    images, padding_mask = model.preprocess_image(synthetic_batch())
    memory = model.encode(images.tensor, padding_mask)
    proposals, valid = source.token_proposals(memory)
    tokens = source.memory_norm(source.memory_proj(memory.memory.masked_fill(~valid[..., None], 0.0)))
    logits, boxes = source.heads.predict(source.encoder_head_index, tokens, proposals)
    boxes = boxes.masked_fill(~valid[..., None], 1.0)
    topk = logits.max(-1).values.topk(source.num_queries, dim=1).indices
    queries, (enc_logits, enc_boxes) = source(memory)
    assert enc_logits.shape == (2, source.num_queries, NUM_CLASSES) and enc_boxes.requires_grad
    torch.testing.assert_close(enc_logits, logits.gather(1, topk[..., None].expand(-1, -1, NUM_CLASSES)))
    torch.testing.assert_close(queries.reference, boxes.gather(1, topk[..., None].expand(-1, -1, 4)))
    assert not queries.reference.requires_grad
    assert torch.equal(queries.content[0], source.content.weight)  # embed_init_tgt: learned content
    # Without mixed selection: the selected tokens' projected memory, detached (:350, :354).
    plain = _dino(2, MIXED_SELECTION=False).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("query_source.content")})
    with torch.no_grad():
        content = plain.query_source(memory)[0].content
    torch.testing.assert_close(content, tokens.detach().gather(1, topk[..., None].expand(-1, -1, tokens.shape[-1])))


def test_class_aware_encoder_loss_uses_the_real_labels():
    """dino.py:588-604: the interm outputs matched and trained like a decoder layer (real labels)."""
    model = _dino(3)
    batch = synthetic_batch()
    captured = {}
    original = model.matcher.forward

    def spy(logits, boxes, targets):
        captured.setdefault("calls", []).append((logits.shape, [t["labels"].clone() for t in targets]))
        return original(logits, boxes, targets)

    model.matcher.forward = spy
    losses = model(batch)
    shape, labels = captured["calls"][-1]  # the encoder's matching comes after the decoder's
    assert shape == (2, 20, NUM_CLASSES)
    assert labels[0].any() and torch.equal(labels[0], batch[0]["instances"].gt_classes)  # not all 0
    assert all(torch.isfinite(losses[f"enc_loss_{k}"]) for k in ("class", "bbox", "giou"))


def test_dino_init_xavier_for_the_ref_point_head_and_content_queries():
    """DINO's transformer reset (deformable_transformer.py:225-228) covers ref_point_head and
    tgt_embed (built inside it, :166-168), not the heads."""
    model = _dino(4)
    for weight in (model.decoder.ref_point_head.layers[0].weight, model.query_source.content.weight):
        bound = math.sqrt(6.0 / sum(weight.shape))
        assert weight.abs().max() <= bound and weight.abs().max() > 0.8 * bound


@pytest.mark.parametrize("mode", ["deformable", "dn", "dac"])
def test_a_dino_training_step_trains_every_parameter(mode):
    model = _dino(5, DECODER_MODE=mode)
    losses = model(synthetic_batch())
    assert all(torch.isfinite(v) for v in losses.values())
    assert {"enc_loss_class", "loss_class"} <= set(losses)
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    model.eval()
    with torch.no_grad():
        assert len(model(synthetic_batch())[0]["instances"]) == model.detections_per_image


@pytest.mark.parametrize("scales", [4, 5])
def test_the_dino_configs_build_the_official_architecture(scales):
    cfg = load_config(get_config_file(f"coco/dino_r50_{scales}scale_12ep.yaml"), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    with torch.device("meta"):  # no weights, no memory
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    assert len(model.neck.input_proj) == scales - 1 and len(model.neck.extra_proj) == 1
    assert model.neck.strides == ([4] if scales == 5 else []) + [8, 16, 32, 64]
    assert model.decoder.ref_point_head.layers[0].in_features == 512 and model.decoder.norm is not None
    assert model.query_source.content.weight.shape == (900, 256) and model.query_source.position_proj is None
    assert model.encoder.layers[0].ffn.linear1.out_features == 2048 and model.detections_per_image == 300
    assert model.main_passes["dn"].label_embedding.weight.shape == (81, 256)
    assert cfg.MODEL.HYBRID_DETR.CLASS_WEIGHT == 1.0 and cfg.SOLVER.BASE_LR == 1e-4 and cfg.SOLVER.IMS_PER_BATCH == 16
    assert cfg.SOLVER.LINEAR_PROJ_MULTIPLIER == 1.0 and cfg.SOLVER.BACKBONE_MULTIPLIER == 0.1


@pytest.mark.slow
def test_the_dino_transformer_compiles_as_one_graph():
    """Encoder, DINO's query selection and decoder under torch.compile(fullgraph=True)."""
    model = _dino(6).eval()
    with torch.no_grad():
        images, padding_mask = model.preprocess_image(synthetic_batch())
        levels = model.features(images.tensor, padding_mask)
        eager = model.transformer(*levels)
        compiled = torch.compile(model.transformer, fullgraph=True)(*levels)
    torch.testing.assert_close(compiled[3].logits, eager[3].logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled[3].boxes, eager[3].boxes, atol=1e-5, rtol=1e-5)
