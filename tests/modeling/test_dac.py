"""DAC-DETR: the one-to-many matcher, the IoU-aware loss, and the C-branch in the model."""
import math

import pytest
import torch
from detectron2.modeling import build_model
from model_helpers import NUM_CLASSES, synthetic_batch, tiny_cfg

from hybrid_detr.modeling.box_ops import batched_box_iou, rank_within_groups
from hybrid_detr.modeling.criterion import DetectionCriterion
from hybrid_detr.modeling.dac import DACBranch, DACMatcher, IoUAwareBCELoss
from hybrid_detr.modeling.matcher import Assignment


def pairs(assignment: Assignment):
    return sorted(zip(assignment.batch_index.tolist(), assignment.query_index.tolist(), assignment.gt_index.tolist()))


def assign(matcher, score_qg, valid=None):
    """Assignment of one image from a (Q, G) score table."""
    score = torch.tensor(score_qg, dtype=torch.float32)[None]
    valid = torch.ones(1, score.shape[2], dtype=torch.bool) if valid is None else torch.tensor([valid])
    return {(q, g) for _, q, g in pairs(matcher.assign(score, valid))}


# ---------------------------------------------------------------- matcher, hand-computed cases


def test_threshold_and_forced_top1():
    matcher = DACMatcher(score_threshold=0.4, topk_per_gt=6, max_positives=75, cap_sampling="score")
    scores = [
        [0.9, 0.1],  # q0 -> g0, above the threshold
        [0.5, 0.2],  # q1 -> g0, above
        [0.3, 0.35],  # q2 -> g1, below, but g1's best query: forced positive
        [0.2, 0.1],  # q3 -> g0, below
        [0.1, 0.3],  # q4 -> g1, below
    ]
    assert assign(matcher, scores) == {(0, 0), (1, 0), (2, 1)}
    # A higher threshold: only the forced top-1 queries remain.
    matcher.score_threshold = 0.95
    assert assign(matcher, scores) == {(0, 0), (2, 1)}


def test_forced_top1_keeps_its_own_best_gt():
    """As in the official code, a gt's top-1 query is made positive but stays with its best gt."""
    matcher = DACMatcher(score_threshold=0.4, cap_sampling="score")
    scores = [
        [0.9, 0.3],  # q0: best gt g0, and also g1's best query
        [0.5, 0.1],
        [0.1, 0.2],
    ]
    # g0 has 2 positives (q0, q1); g1 has none of its own.
    assert assign(matcher, scores) == {(0, 0), (1, 0)}


def test_topk_per_gt():
    matcher = DACMatcher(score_threshold=0.4, topk_per_gt=6, cap_sampling="score")
    scores = [[0.9 - 0.05 * q] for q in range(10)]  # 8 queries >= 0.4, decreasing
    assert assign(matcher, scores) == {(q, 0) for q in range(6)}
    matcher.topk_per_gt = 2
    assert assign(matcher, scores) == {(0, 0), (1, 0)}


def test_gt_takes_its_top_queries_among_all_queries():
    """A gt with c positives takes its c highest-scoring queries, even ones whose best gt is another."""
    matcher = DACMatcher(score_threshold=0.4, topk_per_gt=6, cap_sampling="score")
    scores = [
        [0.80, 0.85],  # q0 -> g1 (best), but g0's second-best query
        [0.90, 0.10],  # q1 -> g0
        [0.70, 0.10],  # q2 -> g0
        [0.10, 0.60],  # q3 -> g1
    ]
    # g0: 2 positives (q1, q2) -> its top-2 queries q1, q0; g1: 2 positives (q0, q3) -> q0, q3.
    assert assign(matcher, scores) == {(1, 0), (0, 0), (0, 1), (3, 1)}


def test_cap_on_positives_per_image():
    scores = [[0.0, 0.0] for _ in range(10)]
    for q, s in enumerate([0.9, 0.8, 0.7, 0.6, 0.5]):
        scores[q][0] = s
    for q, s in enumerate([0.95, 0.85, 0.45, 0.44, 0.43]):
        scores[5 + q][1] = s
    matcher = DACMatcher(score_threshold=0.4, topk_per_gt=6, max_positives=4, cap_sampling="score")
    # The 4 best positives are q5, q0, q6, q1: two per gt.
    assert assign(matcher, scores) == {(0, 0), (1, 0), (5, 1), (6, 1)}
    matcher.max_positives = 75
    assert len(assign(matcher, scores)) == 10
    # Random sampling (the official code): still 4 pairs, each a gt's best queries.
    matcher = DACMatcher(score_threshold=0.4, topk_per_gt=6, max_positives=4, cap_sampling="random")
    for seed in range(5):
        torch.manual_seed(seed)
        result = assign(matcher, scores)
        assert len(result) == 4
        for g, best in ((0, [0, 1, 2, 3, 4]), (1, [5, 6, 7, 8, 9])):
            chosen = sorted(q for q, gg in result if gg == g)
            assert chosen == best[: len(chosen)]


def test_padding_gts_and_images_without_gt():
    matcher = DACMatcher(score_threshold=0.4, cap_sampling="score")
    # The padding gt (valid False) is never assigned even with high scores.
    assert assign(matcher, [[0.9, 0.99], [0.5, 0.99]], valid=[True, False]) == {(0, 0), (1, 0)}
    # A whole image without gt.
    assert assign(matcher, [[0.9, 0.9]], valid=[False, False]) == set()
    logits = torch.zeros(2, 4, NUM_CLASSES)
    boxes = torch.full((2, 4, 4), 0.5)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    assert len(matcher(logits, boxes, [empty, empty])) == 0
    one = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 1.0, 1.0]])}
    result = pairs(matcher(logits, boxes, [empty, one]))
    assert result and all(b == 1 for b, _, _ in result)


def test_scores_are_iou_and_class_probability():
    matcher = DACMatcher(iou_weight=0.7, cls_weight=0.3)
    logits = torch.full((1, 2, NUM_CLASSES), -10.0)
    logits[0, 0, 2] = 0.0  # p = 0.5 for class 2
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.4, 0.2]]])
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    score, valid = matcher.scores(logits, boxes, targets)
    assert valid.tolist() == [[True]]
    expected_q0 = 0.7 * 1.0 + 0.3 * 0.5
    expected_q1 = 0.7 * 0.5 + 0.3 * torch.sigmoid(torch.tensor(-10.0)).item()
    assert score[0, :, 0].tolist() == pytest.approx([expected_q0, expected_q1], abs=1e-6)


def test_batched_equals_per_image():
    torch.manual_seed(0)
    n, q = 3, 30
    logits = torch.randn(n, q, NUM_CLASSES) * 2
    boxes = torch.cat((torch.rand(n, q, 2) * 0.6 + 0.2, torch.rand(n, q, 2) * 0.3 + 0.05), -1)
    targets = []
    for size in (4, 0, 7):
        gt = torch.cat((torch.rand(size, 2) * 0.6 + 0.2, torch.rand(size, 2) * 0.3 + 0.05), -1)
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (size,)), "boxes": gt})
    matcher = DACMatcher(score_threshold=0.3, topk_per_gt=3, max_positives=8, cap_sampling="score")
    batched = pairs(matcher(logits, boxes, targets))
    per_image = []
    for i, target in enumerate(targets):
        if len(target["labels"]):
            per_image += [(i, qq, g) for _, qq, g in pairs(matcher(logits[i : i + 1], boxes[i : i + 1], [target]))]
    assert batched == sorted(per_image)
    assert len(batched) > 0


def test_batched_box_iou():
    a = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]])
    b = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.55, 0.5, 0.2, 0.2]]])
    iou = batched_box_iou(a, b)
    assert iou.shape == (1, 2, 2)
    assert iou[0, 0].tolist() == pytest.approx([1.0, 0.15 / 0.25], abs=1e-6)
    assert iou[0, 1].tolist() == pytest.approx([0.0, 0.0])


# ---------------------------------------------------------------- IoU-aware BCE


def test_rank_within_groups():
    quality = torch.tensor([0.3, 0.6, 0.5, 0.9, 0.1])
    group = torch.tensor([0, 0, 0, 1, 1])
    assert rank_within_groups(quality, group).tolist() == [2, 0, 1, 0, 1]


def test_iou_aware_bce_values():
    logits = torch.tensor([[[0.5, -1.0], [2.0, -3.0], [0.0, 0.0]]])  # N=1, Q=3, K=2
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    assignment = Assignment(torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([0, 0]))
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.55, 0.5, 0.2, 0.2]])
    gt = targets[0]["boxes"].expand(2, 4)
    onehot = torch.zeros_like(logits)
    onehot[0, [0, 1], 0] = 1
    boxes = torch.zeros(1, 3, 4).index_put((assignment.batch_index, assignment.query_index), pred)
    pairs = DetectionCriterion.matched_pairs(logits, boxes, targets, assignment)
    assert torch.equal(pairs.onehot, onehot) and torch.equal(pairs.gt_boxes, gt)
    loss, rank_weight = IoUAwareBCELoss()(logits, pairs, 2.0)
    p = logits.sigmoid()
    t0 = p[0, 0, 0] ** 0.25 * 1.0**0.75
    t1 = p[0, 1, 0] ** 0.25 * 0.6**0.75
    # rank by t within the gt: q0 first (its box is exact), then q1
    assert t0 > t1
    w0, w1 = 1.0, math.exp(-1 / 1.5)
    assert rank_weight.tolist() == pytest.approx([w0, w1])
    s0, s1 = t0 * w0, t1 * w1
    expected = -(s0 * p[0, 0, 0].log() + (1 - s0) * (1 - p[0, 0, 0]).log())
    expected += -(s1 * p[0, 1, 0].log() + (1 - s1) * (1 - p[0, 1, 0]).log())
    negatives = torch.ones_like(p, dtype=torch.bool)
    negatives[0, [0, 1], 0] = False
    expected += (-(p**2) * (1 - p).log())[negatives].sum()
    assert loss.item() == pytest.approx(expected.item() / 2.0, rel=1e-5)


# ---------------------------------------------------------------- the C-branch in the model


def build(mode="dac", seed=0, **dac):
    cfg = tiny_cfg(DECODER_MODE=mode)
    for key, value in dac.items():
        setattr(cfg.MODEL.HYBRID_DETR.DAC, key, value)
    torch.manual_seed(seed)
    return build_model(cfg)


def test_dac_mode_registers_the_branch_and_adds_no_parameters():
    baseline, dac = build("deformable"), build("dac")
    assert isinstance(dac.branches["dac"], DACBranch)
    names = {name: p.shape for name, p in baseline.named_parameters()}
    assert {name: p.shape for name, p in dac.named_parameters()} == names
    assert sum(p.numel() for p in dac.parameters()) == sum(p.numel() for p in baseline.parameters())
    assert list(dac.branches["dac"].parameters()) == []


def count_calls(model):
    """Counters of the calls of every decoder layer's self- and cross-attention, and a snapshot of
    them taken when the DAC branch starts."""
    counts = {"self": 0, "cross": 0}
    snapshot = {}

    def counter(kind):
        def hook(*_):
            counts[kind] += 1

        return hook

    for layer in model.decoder.layers:
        layer.self_attn.register_forward_hook(counter("self"))
        layer.cross_attn.register_forward_hook(counter("cross"))
    model.branches["dac"].register_forward_pre_hook(lambda *_: snapshot.update(counts))
    return counts, snapshot


def test_training_step_c_pass_skips_self_attention_and_gives_dac_losses():
    # The paper's formulation (Q_C^0 = Q): no gradient reaches self-attention through the C pass.
    model = build("dac", C_INPUT_FROM_O_SELF_ATTN=False, MATCH_AGAINST_O_BOXES=False)
    model.train()
    counts, at_branch = count_calls(model)
    layers = len(model.decoder.layers)
    losses = model(synthetic_batch())
    # The O pass: one self- and one cross-attention call per layer; the C pass: cross-attention only.
    assert at_branch == {"self": layers, "cross": layers}
    assert counts == {"self": layers, "cross": 2 * layers}

    dac_keys = {k for k in losses if k.startswith("dac_")}
    expected = {f"dac_loss_{name}{suffix}" for name in ("class", "bbox", "giou") for suffix in ["", "_0"]}
    assert dac_keys == expected
    assert {"loss_class", "loss_bbox", "loss_giou"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["dac_loss_bbox"].item() > 0  # every gt has at least its top-1 query

    # The C losses alone train cross-attention, FFN and heads, never self-attention.
    sum(v for k, v in losses.items() if k.startswith("dac_")).backward()
    layer = model.decoder.layers[0]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.cross_attn.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.ffn.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.heads.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in layer.self_attn.parameters())


def test_iou_aware_loss_option_trains():
    """CLS_LOSS "iou_aware_bce" changes the class loss of both branches, and weights the C branch's box
    losses by each pair's rank weight exp(-rank / 1.5) <= 1 (the O branch's pairs all rank first: weight 1)."""
    batch = synthetic_batch()
    losses = {}
    for cls_loss in ("focal", "iou_aware_bce"):
        # score threshold 0: each gt gets several C queries (its top-6), ranked
        model = build("dac", CLS_LOSS=cls_loss, CAP_SAMPLING="score", SCORE_THRESHOLD=0.0).train()
        losses[cls_loss] = model(batch)
    focal, iou_aware = losses["focal"], losses["iou_aware_bce"]
    assert set(focal) == set(iou_aware)
    assert all(torch.isfinite(v) for v in iou_aware.values())
    for key in ("loss_class", "dac_loss_class"):
        assert not torch.allclose(iou_aware[key], focal[key]), key
    for key in ("loss_bbox", "loss_giou"):
        torch.testing.assert_close(iou_aware[key], focal[key])
    for key in ("dac_loss_bbox", "dac_loss_giou"):  # one-to-many: a gt's second query weighs exp(-1/1.5)
        assert iou_aware[key] < focal[key], key
    iou_aware["dac_loss_class"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.heads.parameters())


def test_official_defaults_run():
    model = build("dac", CAP_SAMPLING="score")
    assert model.branches["dac"].match_against_o_boxes and model.branches["dac"].c_input_from_o_self_attn
    model.train()
    counts, _ = count_calls(model)
    losses = model(synthetic_batch())
    layers = len(model.decoder.layers)
    assert counts == {"self": layers, "cross": 2 * layers}  # still no self-attention in the C pass
    assert all(torch.isfinite(v) for v in losses.values())
    # The C branch starts from the O branch's layer-0 self-attention output: its losses reach it.
    sum(v for k, v in losses.items() if k.startswith("dac_")).backward()
    self_attn = model.decoder.layers[0].self_attn
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in self_attn.parameters())


def test_invalid_cls_loss_is_rejected():
    with pytest.raises(ValueError, match="CLS_LOSS"):
        build("dac", CLS_LOSS="softmax")


def test_inference_identical_to_baseline_with_the_same_weights():
    baseline, dac = build("deformable", seed=0), build("dac", seed=1)
    dac.load_state_dict(baseline.state_dict(), strict=True)
    baseline.eval()
    dac.eval()
    counts, _ = count_calls(dac)
    batch = synthetic_batch()
    with torch.no_grad():
        expected, got = baseline(batch), dac(batch)
    layers = len(dac.decoder.layers)
    assert counts == {"self": layers, "cross": layers}  # no C pass at inference
    for e, g in zip(expected, got):
        e, g = e["instances"], g["instances"]
        assert torch.equal(e.pred_boxes.tensor, g.pred_boxes.tensor)
        assert torch.equal(e.scores, g.scores)
        assert torch.equal(e.pred_classes, g.pred_classes)


def test_dac_with_two_stage_and_box_refinement():
    """The setting of the COCO config: each branch refines its own boxes from the same proposals."""
    # 3 layers: the C pass's layer 0 takes the O pass's layer-0 self-attention output (the release's
    # default), so the passes' boxes part from layer 1 on.
    cfg = tiny_cfg(DECODER_MODE="dac", TWO_STAGE=True, WITH_BOX_REFINE=True, DEC_LAYERS=3)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # untrained box heads end in zeros (boxes = references): let them refine
        for head in model.decoder.heads.box_heads:
            head.layers[-1].weight.normal_(std=0.05)
    model.train()
    counts, _ = count_calls(model)
    references, passes = [], []
    for layer in model.decoder.layers:
        layer.cross_attn.register_forward_pre_hook(lambda _m, args: references.append(args[1]))
    model.decoder.register_forward_hook(lambda _m, args, out: passes.append((args[0], out)))
    losses = model(synthetic_batch())
    layers = len(model.decoder.layers)
    assert counts == {"self": layers, "cross": 2 * layers}
    assert {"dac_loss_class", "dac_loss_bbox_0", "enc_loss_class"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    (o_queries, o_out), (c_queries, c_out) = passes
    # the same proposals start both passes ...
    assert torch.equal(c_queries.reference, o_queries.reference)
    assert torch.equal(references[layers], references[0])
    # ... then each pass's layer l + 1 samples around its own layer-l boxes, and the two differ
    valid_ratios = references[0][:, :, :, :2] / o_queries.reference[:, :, None, :2]
    for layer in range(layers - 1):
        for out, sampled in ((o_out, references[layer + 1]), (c_out, references[layers + layer + 1])):
            expected = out.boxes[layer].detach()[:, :, None, :2] * valid_ratios
            torch.testing.assert_close(sampled[..., :2], expected)
    assert torch.equal(o_out.boxes[0], c_out.boxes[0])
    assert not torch.allclose(o_out.boxes[1], c_out.boxes[1])
    sum(losses.values()).backward()
