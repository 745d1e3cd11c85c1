"""The baseline model's parts: matcher, criterion, decoder groups, modes, training and inference."""
import math

import pytest
import torch
from detectron2.modeling import build_model
from torchvision.ops import box_convert, generalized_box_iou

from hybrid_detr.modeling import parse_decoder_mode
from hybrid_detr.modeling.criterion import DetectionCriterion
from hybrid_detr.modeling.matcher import Assignment, HungarianMatcher
from hybrid_detr.modeling.transformer import QueryGroup
from model_helpers import NUM_CLASSES, assert_detections, expected_detections, synthetic_batch, tiny_cfg


def target(labels, boxes):
    return {"labels": torch.tensor(labels, dtype=torch.int64), "boxes": torch.tensor(boxes, dtype=torch.float32)}


def as_pairs(assignment: Assignment):
    return sorted(zip(assignment.batch_index.tolist(), assignment.query_index.tolist(), assignment.gt_index.tolist()))


# ---------------------------------------------------------------- matcher
def test_matcher_pairs_each_gt_with_the_query_on_top_of_it():
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]]])
    logits = torch.zeros(1, 3, 2)
    # gt 0 sits on query 1, gt 1 on query 0: the assignment must cross.
    targets = [target([0, 1], [[0.7, 0.7, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]])]
    assert as_pairs(HungarianMatcher()(logits, boxes, targets)) == [(0, 0, 1), (0, 1, 0)]


def test_matcher_class_cost_breaks_a_tie_between_identical_boxes():
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])
    logits = torch.tensor([[[4.0, -4.0], [-4.0, 4.0]]])  # query 0 says class 0, query 1 class 1
    targets = [target([1, 0], [[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]])]
    assert as_pairs(HungarianMatcher()(logits, boxes, targets)) == [(0, 0, 1), (0, 1, 0)]


def test_matcher_batches_images_independently_and_allows_images_without_objects():
    boxes = torch.rand(3, 4, 4) * 0.5 + 0.25
    logits = torch.randn(3, 4, 2)
    targets = [target([0], [[0.5, 0.5, 0.2, 0.2]]), target([], torch.zeros(0, 4).tolist()), target([1, 1], [[0.3, 0.3, 0.1, 0.1], [0.6, 0.6, 0.3, 0.3]])]
    matcher = HungarianMatcher()
    batched = as_pairs(matcher(logits, boxes, targets))
    for i in (0, 2):
        single = as_pairs(matcher(logits[i : i + 1], boxes[i : i + 1], [targets[i]]))
        assert [(q, g) for b, q, g in batched if b == i] == [(q, g) for _, q, g in single]
    assert [b for b, _, _ in batched].count(1) == 0
    assert len(matcher(logits, boxes, [targets[1]] * 3)) == 0


# ---------------------------------------------------------------- criterion
def test_criterion_values_on_a_hand_made_case():
    alpha, gamma = 0.25, 2.0
    criterion = DetectionCriterion(num_classes=2, focal_alpha=alpha, focal_gamma=gamma, class_weight=2.0, l1_weight=5.0, giou_weight=2.0)
    logits = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]])
    gt_box = [0.5, 0.6, 0.2, 0.4]
    targets = [target([1], [gt_box])]
    assignment = Assignment(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    losses = criterion(logits, boxes, targets, assignment, normalizer=1.0)

    def focal(x, t):
        p = 1 / (1 + math.exp(-x))
        if t:
            return alpha * (1 - p) ** gamma * -math.log(p)
        return (1 - alpha) * p**gamma * -math.log(1 - p)

    # Query 0 is positive for class 1 only; everything else is background.
    expected_class = focal(0.0, 0) + focal(1.0, 1) + focal(-1.0, 0) + focal(0.0, 0)
    expected_l1 = 0.0 + 0.1 + 0.0 + 0.2
    pred_xyxy = box_convert(boxes[0, :1], "cxcywh", "xyxy")
    gt_xyxy = box_convert(torch.tensor([gt_box]), "cxcywh", "xyxy")
    # Boxes nested: GIoU = IoU = area ratio 0.04 / 0.08.
    assert generalized_box_iou(pred_xyxy, gt_xyxy).item() == pytest.approx(0.5)
    assert losses["loss_class"].item() == pytest.approx(2.0 * expected_class, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(5.0 * expected_l1, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(2.0 * 0.5, rel=1e-5)
    halved = criterion(logits, boxes, targets, assignment, normalizer=2.0)
    assert halved["loss_bbox"].item() == pytest.approx(losses["loss_bbox"].item() / 2)


def test_criterion_rejects_logits_of_the_wrong_number_of_classes():
    criterion = DetectionCriterion(num_classes=3)
    with pytest.raises(ValueError, match="5 classes, the criterion expects 3"):
        criterion(torch.zeros(1, 2, 5), torch.rand(1, 2, 4), [target([], [])], Assignment.empty("cpu"), 1.0)


# ---------------------------------------------------------------- modes and config errors
def test_decoder_mode_parsing():
    assert parse_decoder_mode("deformable").branches == ()
    with pytest.raises(ValueError, match="Unknown MODEL.HYBRID_DETR.DECODER_MODE 'dac_detr'"):
        parse_decoder_mode("dac_detr")
    with pytest.raises(ValueError, match="twice"):
        parse_decoder_mode("deformable+deformable")


def test_unknown_mode_in_config_is_a_clear_error():
    with pytest.raises(ValueError, match="DECODER_MODE 'smac'"):
        build_model(tiny_cfg(DECODER_MODE="smac"))


def test_in_features_the_backbone_lacks_are_a_clear_error():
    with pytest.raises(ValueError, match="res6"):
        build_model(tiny_cfg(IN_FEATURES=["res4", "res6"]))


# ---------------------------------------------------------------- decoder groups
def test_padding_queries_and_group_masks_give_finite_outputs():
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    images, padding = model.preprocess_image(synthetic_batch())
    memory = model.encode(images.tensor, padding)
    n, q, c = 2, 6, 64
    group = QueryGroup(
        content=torch.randn(n, q, c),
        position=torch.randn(n, q, c),
        reference=torch.rand(n, q, 4),
        self_attn_mask=torch.block_diag(torch.ones(3, 3), torch.ones(3, 3)) == 0,
        padding_mask=torch.tensor([[False] * 6, [False, True, True, False, True, True]]),
    )
    with torch.no_grad():
        out = model.decoder(group, memory)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.boxes).all()
        # Queries of the second group do not see the first: changing it leaves them as they were.
        changed = QueryGroup(group.content.clone(), group.position, group.reference, group.self_attn_mask, group.padding_mask)
        changed.content[:, :3] += 1.0
        again = model.decoder(changed, memory)
    assert torch.allclose(out.hidden[:, :, 3:], again.hidden[:, :, 3:], atol=1e-5)
    assert not torch.allclose(out.hidden[:, :, :3], again.hidden[:, :, :3], atol=1e-3)


# ---------------------------------------------------------------- training and inference
@pytest.mark.parametrize("options", [{}, {"WITH_BOX_REFINE": True, "TWO_STAGE": True}])
def test_training_step_gives_finite_losses_for_every_layer(options):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**options)).train()
    losses = model(synthetic_batch())
    for name in ["loss_class", "loss_bbox", "loss_giou", "loss_class_0", "loss_bbox_0", "loss_giou_0"]:
        assert torch.isfinite(losses[name]) and losses[name] > 0, name
    if options.get("TWO_STAGE"):
        assert {"enc_loss_class", "enc_loss_bbox", "enc_loss_giou"} <= set(losses)
    sum(losses.values()).backward()
    assert model.level_embed.grad is not None and model.backbone.stem.conv1.weight.grad is not None


def test_a_batch_without_objects_trains_background_only():
    model = build_model(tiny_cfg()).train()
    batch = [synthetic_batch()[1]]
    losses = model(batch)
    assert losses["loss_class"] > 0
    assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0
    sum(losses.values()).backward()  # the zero box losses are still part of the graph


def test_a_few_iterations_lower_the_loss_on_a_tiny_batch():
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).train()
    batch = synthetic_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(12):
        loss = sum(model(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.7 * history[0], history


def test_inference_returns_top_k_detections_inside_the_original_image():
    cfg = tiny_cfg()
    cfg.TEST.DETECTIONS_PER_IMAGE = 30
    model = build_model(cfg).eval()
    batch = synthetic_batch()
    batch[0]["height"], batch[0]["width"] = 144, 384  # the original: 1.5x the input's height, 3x its width
    with torch.no_grad():
        results = model(batch)
    instances = results[0]["instances"]
    assert len(instances) == 30 and instances.image_size == (144, 384)
    assert (instances.scores[:-1] >= instances.scores[1:]).all()
    boxes = instances.pred_boxes.tensor
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= 384).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= 144).all()
    assert ((instances.pred_classes >= 0) & (instances.pred_classes < NUM_CLASSES)).all()
    # Each image: the top-30 (query, class) pairs of the last layer, boxes scaled to its output size (x by the
    # width, y by the height; the second image's output is its input).
    assert results[1]["instances"].image_size == (80, 100)
    assert_detections(results, expected_detections(model, batch))


def test_giou_eps_is_the_official_one():
    """GIoU loss with GIOU_EPS added to the union and the enclosing area: 0 as Deformable DETR's
    util/box_ops.py (exact 1 - GIoU), 1e-6 as DINO's."""
    boxes = torch.tensor([[[0.5, 0.5, 0.02, 0.02]]])
    targets = [target([0], [[0.51, 0.5, 0.02, 0.02]])]
    assignment = Assignment(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    logits = torch.zeros(1, 1, 2)
    exact = DetectionCriterion(num_classes=2, giou_weight=1.0)(logits, boxes, targets, assignment, 1.0)["loss_giou"]
    # IoU of two 0.02-boxes shifted by half a side: 1/3; the enclosing box is the union: GIoU = 1/3.
    assert exact.item() == pytest.approx(2 / 3, abs=1e-6)
    dino = DetectionCriterion(num_classes=2, giou_weight=1.0, giou_eps=1e-6)(logits, boxes, targets, assignment, 1.0)
    union = 0.02 * 0.03
    assert dino["loss_giou"].item() == pytest.approx(1 - (union / 3) / (union + 1e-6), abs=1e-6)
    assert tiny_cfg().MODEL.HYBRID_DETR.GIOU_EPS == 0.0
