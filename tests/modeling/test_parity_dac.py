"""DAC-DETR defaults against the official release (huzhengdongcs/DAC-DETR)."""
import pytest
import torch
from detectron2.modeling import build_model
from torchvision.ops import box_convert, box_iou

from hybrid_detr.modeling.box_ops import normalized_targets
from hybrid_detr.modeling.criterion import ClassificationLossSpec, DetectionCriterion
from hybrid_detr.modeling.dac import IoUAwareBCELoss
from hybrid_detr.modeling.matcher import Assignment
from model_helpers import synthetic_batch, tiny_cfg


def _dac_model(seed=0, **dac):
    cfg = tiny_cfg(DECODER_MODE="dac", TWO_STAGE=True, WITH_BOX_REFINE=True)
    for key, value in dac.items():
        setattr(cfg.MODEL.HYBRID_DETR.DAC, key, value)
    torch.manual_seed(seed)
    return build_model(cfg).train()


def _dac_losses(**dac):
    """Losses of one training step of `_dac_model(**dac)` (same weights for every setting) on the same
    batch, the random draws (CAP_SAMPLING "random") reseeded, as floats."""
    model = _dac_model(**dac)
    torch.manual_seed(1)
    return {k: v.item() for k, v in model(synthetic_batch()).items()}


def test_defaults_follow_the_release():
    """onetomany.py scores the C-branch against `pred_boxes` (the O-branch's); the C-decoder's layer 0
    takes the O-branch's self-attention output (deformable_transformer.py)."""
    dac = tiny_cfg().MODEL.HYBRID_DETR.DAC
    assert dac.MATCH_AGAINST_O_BOXES and dac.C_INPUT_FROM_O_SELF_ATTN
    assert (dac.MATCH_IOU_WEIGHT, dac.MATCH_CLS_WEIGHT, dac.SCORE_THRESHOLD) == (0.7, 0.3, 0.4)
    assert (dac.TOPK_PER_GT, dac.MAX_POSITIVES, dac.LOSS_NORM_FACTOR, dac.CAP_SAMPLING) == (6, 75, 3.0, "random")
    assert dac.IOU_AWARE_BCE_WEIGHT == 1.0


def test_the_c_losses_are_divided_by_num_boxes_times_loss_norm_factor():
    """onetomany.py: the C-branch's losses over num_boxes * 3: doubling the factor halves every one of
    them and leaves the O-branch's alone."""
    release, doubled = _dac_losses(), _dac_losses(LOSS_NORM_FACTOR=6.0)
    c_keys = [k for k in release if k.startswith("dac_")]
    assert {"dac_loss_class", "dac_loss_bbox", "dac_loss_giou"} <= set(c_keys)
    for key, value in release.items():
        expected = value / 2 if key in c_keys else value
        assert doubled[key] == pytest.approx(expected, rel=1e-5), key


def test_iou_aware_bce_weight_scales_the_class_loss_of_both_branches():
    """The release's cls_loss_coef (IOU_AWARE_BCE_WEIGHT 1) multiplies the IoU-aware BCE of the O- and the
    C-branch, not their box losses nor the encoder's focal loss."""
    release = _dac_losses(CLS_LOSS="iou_aware_bce")
    weighted = _dac_losses(CLS_LOSS="iou_aware_bce", IOU_AWARE_BCE_WEIGHT=2.5)
    class_keys = [k for k in release if k.startswith(("loss_class", "dac_loss_class"))]
    assert "loss_class" in class_keys and "dac_loss_class" in class_keys and "enc_loss_class" not in class_keys
    for key, value in release.items():
        expected = value * 2.5 if key in class_keys else value
        assert weighted[key] == pytest.approx(expected, rel=1e-5), key


def test_the_matching_score_uses_the_configured_weights():
    """onetomany.py: score = 0.7 IoU + 0.3 p(class), positive above 0.4: the branch's matcher computes
    it with the config's weights."""
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.6, 0.5, 0.4, 0.4], [0.1, 0.1, 0.1, 0.1]]])
    logits = torch.zeros(1, 3, 3)  # p = 0.5 for every class
    iou = box_iou(box_convert(boxes[0], "cxcywh", "xyxy"), box_convert(targets[0]["boxes"], "cxcywh", "xyxy"))[:, 0]
    for iou_weight, cls_weight in ((0.7, 0.3), (0.2, 0.9)):
        cfg = tiny_cfg(DECODER_MODE="dac")
        cfg.MODEL.HYBRID_DETR.DAC.MATCH_IOU_WEIGHT, cfg.MODEL.HYBRID_DETR.DAC.MATCH_CLS_WEIGHT = iou_weight, cls_weight
        matcher = build_model(cfg).branches["dac"].matcher
        score, _ = matcher.scores(logits, boxes, targets)
        torch.testing.assert_close(score[0, :, 0], iou_weight * iou + cls_weight * 0.5)


def test_one_to_one_rank_weights_are_one():
    """One query per gt: every pair ranks first, weight exp(0) = 1 (the release's one2one)."""
    torch.manual_seed(0)
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]])}]
    logits = torch.randn(1, 5, 3)
    assignment = Assignment(torch.tensor([0, 0]), torch.tensor([3, 1]), torch.tensor([0, 1]))
    onehot = torch.zeros_like(logits)
    pred = torch.tensor([[0.32, 0.3, 0.2, 0.25], [0.7, 0.62, 0.28, 0.2]])
    pairs = DetectionCriterion.matched_pairs(logits, torch.zeros(1, 5, 4).index_put((assignment.batch_index, assignment.query_index), pred), targets, assignment)
    loss = IoUAwareBCELoss()(logits, pairs, 2.0)
    assert torch.equal(loss.pair_weight, torch.ones(2))


def test_iou_aware_bce_trains_both_branches_with_weight_one_and_keeps_the_encoder_focal():
    model = _dac_model(CLS_LOSS="iou_aware_bce", CAP_SAMPLING="score")
    outputs = []
    handle = model.decoder.register_forward_hook(lambda module, args, out: outputs.append(out))
    batch = synthetic_batch()
    losses = model(batch)
    handle.remove()
    one_to_one = outputs[0]  # the decoder's first call is the O pass
    images, _ = model.preprocess_image(batch)
    targets = normalized_targets([x["instances"] for x in batch], images.image_sizes)
    num_boxes = float(sum(len(t["labels"]) for t in targets))
    logits, boxes = one_to_one.layer(-1)
    assignment = model.matcher(logits, boxes, targets)
    expected = model.criterion(
        logits, boxes, targets, assignment, num_boxes, ClassificationLossSpec(IoUAwareBCELoss(), 1.0)
    )
    torch.testing.assert_close(losses["loss_class"], expected["loss_class"])
    torch.testing.assert_close(losses["loss_bbox"], expected["loss_bbox"])
    focal_weighted = model.criterion(logits, boxes, targets, assignment, num_boxes, model.criterion.focal)  # CLASS_WEIGHT 2
    assert not torch.allclose(losses["loss_class"], focal_weighted["loss_class"])
    # The encoder's proposals keep the focal loss with CLASS_WEIGHT.
    focal_model = _dac_model(CLS_LOSS="focal", CAP_SAMPLING="score")
    focal_losses = focal_model(batch)
    torch.testing.assert_close(losses["enc_loss_class"], focal_losses["enc_loss_class"])


@pytest.mark.parametrize("cls_loss", ["focal", "iou_aware_bce"])
def test_c_branch_matches_against_the_o_boxes_by_default(cls_loss):
    """With the O-branch's boxes, the C-branch's assignment follows the O boxes: shifting only the
    C-branch's boxes leaves it unchanged."""
    model = _dac_model(CLS_LOSS=cls_loss, CAP_SAMPLING="score")
    branch = model.branches["dac"]
    seen = []
    original = branch.matcher.forward
    branch.matcher.forward = lambda logits, boxes, targets: seen.append(boxes) or original(logits, boxes, targets)
    outputs = []
    model.decoder.register_forward_hook(lambda module, args, out: outputs.append(out))
    model(synthetic_batch())
    o_pass = outputs[0]
    assert len(seen) == o_pass.num_layers
    for layer, boxes in enumerate(seen):
        assert torch.equal(boxes, o_pass.boxes[layer])


def test_release_evaluation_nms_option():
    """NMS_THRESH_TEST > 0: class-wise NMS over the best pairs, then DETECTIONS_PER_IMAGE."""
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.TEST.DETECTIONS_PER_IMAGE = 30
    plain = build_model(cfg).eval()
    cfg.MODEL.HYBRID_DETR.NMS_THRESH_TEST = 0.8
    with_nms = build_model(cfg).eval()
    with_nms.load_state_dict(plain.state_dict())
    with torch.no_grad():
        a = plain(synthetic_batch())[0]["instances"]
        b = with_nms(synthetic_batch())[0]["instances"]
    assert len(a) == 30 and 0 < len(b) <= 30
    for label in b.pred_classes.unique():
        boxes = b.pred_boxes.tensor[b.pred_classes == label]
        iou = box_iou(boxes, boxes).fill_diagonal_(0)
        assert (iou <= 0.8).all()  # no two kept boxes of one class overlap above the threshold
    # Untouched pairs keep their scores: the best one is the same.
    assert torch.isclose(a.scores.max(), b.scores.max())


def test_dac_matcher_refuses_non_finite_predictions():
    from hybrid_detr.modeling.dac import DACMatcher

    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    logits, boxes = torch.zeros(1, 4, 3), torch.full((1, 4, 4), 0.5)
    logits[0, 2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="DACMatcher: non-finite predicted logits for 1 queries"):
        DACMatcher()(logits, boxes, targets)
