"""Co-DETR mode: ATSS assigner, positive queries, group masks, training with K = 0/1/2 aux heads,
and inference that is the query head alone."""
import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from hybrid_detr.modeling.co_detr.atss import ATSSAssigner, centerness_targets
from hybrid_detr.modeling.co_detr.branch import CoDETRBranch
from hybrid_detr.modeling.co_detr.positive_queries import AuxPositives, pack_positives
from hybrid_detr.modeling.criterion import FocalLoss, MatchedPairs
from hybrid_detr.modeling.query_groups import concat_groups, split_decoder_output
from hybrid_detr.modeling.transformer import QueryGroup
from model_helpers import synthetic_batch, synthetic_input, tiny_cfg


# ---------------------------------------------------------------- ATSS assigner
# Two levels: four 10x10 anchors in a row (centres x = 5, 15, 25, 35; y = 5) and two 20x20 ones
# (centres (10, 10), (30, 10)); top-2 candidates per level.
ANCHORS = torch.tensor(
    [[0, 0, 10, 10], [10, 0, 20, 10], [20, 0, 30, 10], [30, 0, 40, 10], [0, 0, 20, 20], [20, 0, 40, 20]],
    dtype=torch.float32,
)
LEVELS = [4, 2]


def assign(gt_boxes, gt_valid=None, anchor_valid=None, topk=2):
    gt_boxes = torch.tensor(gt_boxes, dtype=torch.float32).view(1, -1, 4)
    g = gt_boxes.shape[1]
    gt_valid = torch.ones(1, g, dtype=torch.bool) if gt_valid is None else gt_valid
    anchor_valid = torch.ones(1, len(ANCHORS), dtype=torch.bool) if anchor_valid is None else anchor_valid
    return ATSSAssigner(topk)(ANCHORS, LEVELS, gt_boxes, gt_valid, anchor_valid)


def test_atss_threshold_is_mean_plus_std_of_the_candidates():
    # gt = anchor 0. Candidates: level 0 -> anchors 0 (IoU 1), 1 (IoU 0); level 1 -> anchors 4
    # (IoU 100/400 = .25), 5 (IoU 0). mean .3125, unbiased std .4733: threshold .786 -> anchor 0 only.
    result = assign([[0, 0, 10, 10]])
    assert result.gt_index.tolist() == [[0, -1, -1, -1, -1, -1]]
    assert result.iou[0, 0].item() == pytest.approx(1.0)
    # Same gt, a gt of 12x10 beside it (anchor 0 has IoU 100/120 with it, above its own threshold
    # .68): anchor 0 is positive for both and goes to the one it overlaps most, gt 1.
    result = assign([[0, 0, 12, 10], [0, 0, 10, 10]])
    assert result.gt_index.tolist() == [[1, -1, -1, -1, -1, -1]]


def test_atss_assigns_a_gt_smaller_than_any_anchor_to_the_anchor_at_its_centre():
    # A 4x4 gt centred on anchor 1 (centre (15, 5)). Candidates: anchor 1 (IoU 16/100 = .16), a
    # level-0 neighbour (IoU 0), anchor 4 (IoU 16/400 = .04), anchor 5 (IoU 0): threshold
    # .05 + .0757 = .126, so anchor 1 is positive although its IoU is only .16.
    result = assign([[13, 3, 17, 7]])
    assert result.gt_index.tolist() == [[-1, 0, -1, -1, -1, -1]]
    assert result.iou[0, 1].item() == pytest.approx(0.16)
    # A tiny gt that holds no anchor centre gets no positive (ATSS's centre condition).
    assert (assign([[1, 1, 3, 3]]).gt_index == -1).all()


def test_atss_images_without_gt_and_invalid_anchors():
    boxes = torch.tensor([[[0, 0, 10, 10]], [[0, 0, 0, 0]]], dtype=torch.float32)  # image 1: padding only
    gt_valid = torch.tensor([[True], [False]])
    anchor_valid = torch.ones(2, len(ANCHORS), dtype=torch.bool)
    result = ATSSAssigner(2)(ANCHORS, LEVELS, boxes, gt_valid, anchor_valid)
    assert result.gt_index.tolist() == [[0, -1, -1, -1, -1, -1], [-1] * 6]
    # A batch without any gt at all (G = 0).
    empty = ATSSAssigner(2)(ANCHORS, LEVELS, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool), anchor_valid)
    assert (empty.gt_index == -1).all() and empty.gt_index.shape == (2, 6)
    # Anchors centred on padding are never positive: with anchor 0 invalid, the gt = anchor 0
    # has no positive left (anchor 4's centre lies on its border, not inside).
    anchor_valid[0, 0] = False
    assert (ATSSAssigner(2)(ANCHORS, LEVELS, boxes[:1], gt_valid[:1], anchor_valid[:1]).gt_index == -1).all()


def test_centerness_targets():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 10.0, 20.0]])
    centres = torch.tensor([[5.0, 10.0], [2.5, 5.0]])
    # centre: 1; (2.5, 5): sqrt(2.5/7.5 * 5/15) = 1/3
    assert centerness_targets(centres, boxes).tolist() == pytest.approx([1.0, 1.0 / 3.0])


# ---------------------------------------------------------------- positive queries
def positives(batch_index, score=None, c=8):
    batch_index = torch.tensor(batch_index, dtype=torch.int64)
    p = len(batch_index)
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]]).repeat(p, 1)
    score = torch.arange(p, dtype=torch.float32) if score is None else torch.tensor(score)
    return AuxPositives(batch_index, boxes, torch.arange(p) % 2, score, torch.randn(p, c))


SIZES = torch.tensor([[100, 50], [100, 50]])  # (h, w)


def test_pack_positives_clamps_the_count_and_masks_padding():
    # (Masked padding: no negatives given, i.e. ZERO_PADDING; "best" subset by score.)
    # 3 positives in image 0, none in image 1: M = clamp(3, 9, 300) = 9.
    packed = pack_positives(positives([0, 0, 0], score=[0.2, 0.9, 0.5]), 2, SIZES, 9, 300, subset="best")
    assert packed.num_queries == 9
    assert packed.padding_mask.tolist() == [[False] * 3 + [True] * 6, [True] * 9]
    assert packed.assignment.batch_index.tolist() == [0, 0, 0]
    assert packed.assignment.query_index.tolist() == [0, 1, 2]
    assert packed.assignment.gt_index.tolist() == [1, 0, 0]  # best score first: positives 1, 2, 0
    # Boxes normalised to the unpadded image, cxcywh: xyxy (10, 20, 30, 60) in a 50 x 100 image.
    assert packed.boxes[0, 0].tolist() == pytest.approx([0.4, 0.4, 0.4, 0.4])
    # 20 positives in image 1: M = 20.
    packed = pack_positives(positives([0] * 4 + [1] * 20), 2, SIZES, 9, 300)
    assert packed.num_queries == 20 and (~packed.padding_mask).sum(1).tolist() == [4, 20]
    # More than MAX: M = 300, the best 300 kept.
    packed = pack_positives(positives([1] * 310 + [0]), 2, SIZES, 9, 300, subset="best")
    assert packed.num_queries == 300 and (~packed.padding_mask).sum(1).tolist() == [1, 300]
    kept = packed.assignment.query_index[packed.assignment.batch_index == 1]
    assert kept.tolist() == list(range(300)) and len(packed.assignment) == 301
    # Content features follow their positive (with gradient).
    pos = positives([0, 1, 1])
    pos.features.requires_grad_(True)
    packed = pack_positives(pos, 2, SIZES, 9, 300, subset="best")
    assert torch.equal(packed.features[1, 0], pos.features[2]) and torch.equal(packed.features[0, 1], torch.zeros(8))
    packed.features.sum().backward()
    assert pos.features.grad.eq(1).all()


def test_padding_queries_get_no_loss():
    padding = torch.tensor([[False, False, True, True]])
    logits = torch.randn(1, 4, 3)
    onehot = torch.zeros(1, 4, 3)
    onehot[0, 0, 1] = 1
    loss = FocalLoss(0.25, 2.0)
    pairs = MatchedPairs(None, None, None, None, None, onehot, padding)
    reference = loss(logits, pairs, 1.0).value
    logits[0, 2:] = torch.randn(2, 3) * 10
    assert loss(logits, pairs, 1.0).value.item() == pytest.approx(reference.item())
    assert loss(logits, pairs._replace(padding_mask=None), 1.0).value.item() != pytest.approx(reference.item())


def test_group_masks_keep_groups_apart_in_the_decoder():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(WITH_BOX_REFINE=True)).eval()
    with torch.no_grad():
        images, padding_mask = model.preprocess_image(synthetic_batch())
        memory = model.encode(images.tensor, padding_mask)
        n, c = memory.memory.shape[0], memory.memory.shape[-1]

        def random_group(q):
            centres = torch.rand(n, q, 2) * 0.6 + 0.2
            return torch.randn(n, q, c), torch.randn(n, q, c), torch.cat((centres, torch.rand(n, q, 2) * 0.3 + 0.05), -1)

        a, b = random_group(5), random_group(7)
        pad_a = torch.tensor([[False] * 4 + [True], [False] * 5])
        pad_b = torch.tensor([[False] * 7, [False] * 2 + [True] * 5])

        def run(a, b):
            group = concat_groups([QueryGroup(*a, padding_mask=pad_a), QueryGroup(*b, padding_mask=pad_b)])
            return split_decoder_output(model.decoder(group, memory), [5, 7])

        out_a, out_b = run(a, b)
        b2 = tuple(x + torch.randn_like(x) * 0.5 for x in b[:2]) + (b[2].flip(1),)
        new_a, new_b = run(a, b2)
        assert torch.equal(out_a.hidden, new_a.hidden) or torch.allclose(out_a.hidden, new_a.hidden, atol=1e-6)
        assert torch.allclose(out_a.boxes, new_a.boxes, atol=1e-6)
        assert not torch.allclose(out_b.hidden, new_b.hidden)
        # Padding queries are invisible to the real queries of their own group too.
        a2 = tuple(x.clone() for x in a)
        a2[0][0, 4] += 5.0
        a2[1][0, 4] -= 5.0
        new_a, _ = run(a2, b)
        assert torch.allclose(out_a.hidden[:, 0, :4], new_a.hidden[:, 0, :4], atol=1e-6)
        # Without the mask, the groups would mix (so the test above is not vacuous).
        mixed = QueryGroup(*[torch.cat(x, 1) for x in zip(a, b)])
        mixed2 = QueryGroup(*[torch.cat(x, 1) for x in zip(a, b2)])
        assert not torch.allclose(model.decoder(mixed, memory).hidden[:, :, :5], model.decoder(mixed2, memory).hidden[:, :, :5])


# ---------------------------------------------------------------- the branch in the model
def co_detr_model(num_aux_heads, **overrides):
    cfg = tiny_cfg(DECODER_MODE="co_detr", **overrides)
    cfg.MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS = num_aux_heads
    return build_model(cfg)


def encoder_grad_norm(model):
    return sum(p.grad.norm().item() for p in model.encoder.parameters() if p.grad is not None)


@pytest.mark.parametrize("num_aux_heads", [0, 1, 2])
def test_training_step_with_k_aux_heads(num_aux_heads):
    torch.manual_seed(0)
    model = co_detr_model(num_aux_heads, TWO_STAGE=num_aux_heads == 2, WITH_BOX_REFINE=num_aux_heads == 2).train()
    with EventStorage():
        losses = model(synthetic_batch())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    co = {k for k in losses if k.startswith("co_")}
    heads = ["atss", "rcnn"][:num_aux_heads]
    expected = set()
    for head in heads:
        expected |= {f"co_{head}_query_loss_{name}{suffix}" for name in ("class", "bbox", "giou") for suffix in ("", "_0")}
    if num_aux_heads >= 1:
        expected |= {"co_atss_loss_cls", "co_atss_loss_bbox", "co_atss_loss_centerness"}
    if num_aux_heads == 2:
        expected |= {"co_rcnn_loss_rpn_cls", "co_rcnn_loss_rpn_loc", "co_rcnn_loss_cls", "co_rcnn_loss_box_reg"}
    assert co == expected
    for head in heads:  # the batch has 3 objects: every head finds positives for them
        assert losses[f"co_{head}_query_loss_giou"].item() > 0
    if num_aux_heads == 0:
        return
    # The auxiliary heads' own losses alone reach the encoder (through the adapter) ...
    aux = [v for k, v in losses.items() if k.startswith("co_") and "_query_" not in k]
    sum(aux).backward(retain_graph=True)
    assert encoder_grad_norm(model) > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.decoder.parameters())
    # ... and so do the positive queries' decoder losses (their content is an adapter feature).
    model.zero_grad(set_to_none=True)
    sum(v for k, v in losses.items() if "_query_" in k).backward()
    assert encoder_grad_norm(model) > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.branches["co_detr"].query_embeds.parameters())


def test_a_batch_without_objects_still_trains_the_aux_classifiers():
    torch.manual_seed(0)
    model = co_detr_model(2).train()
    with EventStorage():
        losses = model([synthetic_input(96, 128, 0, seed=3), synthetic_input(80, 100, 0, seed=4)])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["co_atss_loss_cls"].item() > 0 and losses["co_rcnn_loss_cls"].item() > 0
    assert losses["co_rcnn_loss_rpn_cls"].item() > 0
    # No positive at all: a true zero on the positive boxes, still in the graph.
    assert losses["co_atss_loss_bbox"].item() == 0 and losses["co_atss_loss_bbox"].requires_grad
    sum(losses.values()).backward()


def test_invalid_number_of_aux_heads_is_a_clear_error():
    with pytest.raises(ValueError, match="NUM_AUX_HEADS"):
        co_detr_model(3)


def test_inference_is_the_query_head_alone():
    torch.manual_seed(0)
    baseline = build_model(tiny_cfg()).eval()
    co = co_detr_model(2).eval()
    missing, unexpected = co.load_state_dict(baseline.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(k.startswith("branches.co_detr.") for k in missing), missing
    assert any(".heads.rcnn." in k for k in missing) and any(".adapter." in k for k in missing)

    def never(*args, **kwargs):
        raise AssertionError("a training branch ran at inference")

    co.branches["co_detr"].forward = never
    batch = synthetic_batch()
    with torch.no_grad():
        expected, got = baseline(batch), co(batch)
    for e, g in zip(expected, got):
        e, g = e["instances"], g["instances"]
        assert torch.equal(e.pred_boxes.tensor, g.pred_boxes.tensor)
        assert torch.equal(e.scores, g.scores) and torch.equal(e.pred_classes, g.pred_classes)


def test_branch_has_no_parameters_with_k_0():
    assert sum(p.numel() for p in CoDETRBranch(tiny_cfg(DECODER_MODE="co_detr", **{}), [8, 16, 32, 64]).parameters()) > 0
    cfg = tiny_cfg(DECODER_MODE="co_detr")
    cfg.MODEL.HYBRID_DETR.CO_DETR.NUM_AUX_HEADS = 0
    assert sum(p.numel() for p in CoDETRBranch(cfg, [8, 16, 32, 64]).parameters()) == 0
    assert math.isclose(CoDETRBranch(cfg, [8, 16, 32, 64]).aux_scale, 2.0 * 2)  # lambda2 * DEC_LAYERS
