"""Co-DETR defaults against the official Co-Deformable-DETR R-50 release (Sense-X/Co-DETR, mmdet 2.x):
projects/configs/co_deformable_detr/co_deformable_detr_r50_1x_coco.py ("config") and
projects/models/{co_deformable_detr_head,transformer,co_atss_head,co_roi_head}.py.
Each test names the fact it checks."""
import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from hybrid_detr import add_hybrid_detr_config
from hybrid_detr.modeling.co_detr.atss import ATSSHead
from hybrid_detr.modeling.co_detr.positive_queries import (
    AuxNegatives,
    AuxPositives,
    PackedPositives,
    PositiveQueryEmbedding,
    pack_positives,
)
from hybrid_detr.modeling.criterion import FocalLoss, MatchedPairs
from hybrid_detr.modeling.co_detr.rcnn_head import FasterRCNNAuxHead, FlooredMatcher
from hybrid_detr.modeling.matcher import Assignment
from hybrid_detr.modeling.position_encoding import box_sine_embedding
from model_helpers import synthetic_input, tiny_cfg

STRIDES = [8, 16, 32, 64, 128]  # the adapter's five levels


def default_co():
    cfg = get_cfg()
    add_hybrid_detr_config(cfg)
    return cfg.MODEL.HYBRID_DETR.CO_DETR


def co_cfg(**co_overrides):
    cfg = tiny_cfg(DECODER_MODE="co_detr")
    for k, v in co_overrides.items():
        setattr(cfg.MODEL.HYBRID_DETR.CO_DETR, k, v)
    return cfg


# ---------------------------------------------------------------- 1. RPN anchors (config lines 33-38)
def test_rpn_anchors_are_nine_per_location_of_octave_scales_4_5_6_times_stride():
    co = default_co()
    assert (co.RPN_ANCHOR_SCALE, co.RPN_SCALES_PER_OCTAVE, list(co.RPN_ASPECT_RATIOS)) == (4.0, 3, [0.5, 1.0, 2.0])
    head = FasterRCNNAuxHead(co_cfg(), 64, STRIDES)
    generator = head.rpn.anchor_generator
    assert generator.num_cell_anchors == [9] * len(STRIDES)
    assert head.rpn.rpn_head.objectness_logits.out_channels == 9
    for stride, cell in zip(STRIDES, generator.cell_anchors):
        w, h = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
        sizes = sorted({round(v / stride, 3) for v in (w * h).sqrt().tolist()})
        assert sizes == pytest.approx([4.0, 4.0 * 2 ** (1 / 3), 4.0 * 2 ** (2 / 3)], abs=1e-3)  # 4, 5.04, 6.35
        assert sorted({round(v, 3) for v in (h / w).tolist()}) == pytest.approx([0.5, 1.0, 2.0], abs=1e-3)
        # mmdet's center_offset 0: anchors centred on (i * stride, j * stride), cell 0 on (0, 0).
        assert torch.allclose((cell[:, :2] + cell[:, 2:]) / 2, torch.zeros(9, 2), atol=1e-4)


# ---------------------------------------------------------------- 4. RPN low-quality floor (config lines 162-167)
def test_rpn_low_quality_matches_need_iou_0_3():
    assert default_co().RPN_LOW_QUALITY_MIN_IOU == 0.3
    # gt 0's best anchor has IoU 0.2, gt 1's 0.35: neither reaches 0.7.
    iou = torch.tensor([[0.2, 0.1, 0.0], [0.0, 0.05, 0.35]])
    _, labels = FlooredMatcher([0.3, 0.7], [0, -1, 1], 0.3)(iou)
    assert labels.tolist() == [0, 0, 1]  # only gt 1's best anchor is promoted
    _, d2 = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)(iou)
    assert d2.tolist() == [1, 0, 1]  # detectron2 alone has no floor
    head = FasterRCNNAuxHead(co_cfg(), 64, STRIDES)
    assert isinstance(head.rpn.anchor_matcher, FlooredMatcher) and head.rpn.anchor_matcher.min_low_quality == 0.3


# ---------------------------------------------------------------- RoI head (config lines 103-125, 182-196)
def test_roi_head_samples_512_and_pools_from_the_encoder_levels_only():
    co = default_co()
    assert co.ROI_BATCH_SIZE_PER_IMAGE == 512 and co.RPN_PRE_NMS_TOPK_TRAIN == 4000 and co.RPN_POST_NMS_TOPK_TRAIN == 1000
    head = FasterRCNNAuxHead(co_cfg(), 64, STRIDES)
    assert head.roi_heads.batch_size_per_image == 512
    assert head.roi_heads.box_in_features == ["co0", "co1", "co2", "co3"]  # featmap_strides 8..64


def rcnn_forward(head, seed=0, sizes=((96, 128), (80, 100)), objects=(3, 2)):
    torch.manual_seed(seed)
    maps = [torch.randn(2, 64, math.ceil(96 / s), math.ceil(128 / s)) for s in STRIDES]
    images = ImageList(torch.zeros(2, 3, 96, 128), list(sizes))
    gts = [synthetic_input(h, w, k, seed=i)["instances"] for i, ((h, w), k) in enumerate(zip(sizes, objects))]
    with EventStorage():
        return head.train()(maps, images, gts), maps


def test_rcnn_queries_take_the_mean_of_the_box_heads_7x7_features_and_its_background_samples():
    head = FasterRCNNAuxHead(co_cfg(ROI_BATCH_SIZE_PER_IMAGE=64), 64, STRIDES)
    (losses, positives, negatives), maps = rcnn_forward(head)
    assert len(positives.batch_index) > 0 and len(negatives.batch_index) > 0
    # Every sampled RoI is a positive or a negative (64 per image here).
    assert len(positives.batch_index) + len(negatives.batch_index) == 2 * 64
    # Content = mean of the 7x7 RoIAlign the box head pooled (co_roi_head.py line 120).
    pooled = head.roi_heads.box_pooler([m[:1] for m in maps[:4]], [Boxes(positives.boxes[positives.batch_index == 0])])
    assert torch.allclose(positives.features[positives.batch_index == 0], pooled.mean((2, 3)), atol=1e-5)
    neg_feats = negatives.feature_table[negatives.feature_rows]
    pooled = head.roi_heads.box_pooler([m[1:] for m in maps[:4]], [Boxes(negatives.boxes[negatives.batch_index == 1])])
    assert torch.allclose(neg_feats[negatives.batch_index == 1], pooled.mean((2, 3)), atol=1e-5)


# ---------------------------------------------------------------- ATSS (config lines 126-150)
def test_atss_anchors_centred_at_offset_0_and_normaliser_counts_each_image_at_least_once():
    assert default_co().ATSS_ANCHOR_OFFSET == 0.0 and default_co().ATSS_ANCHOR_SCALE == 8.0
    head = ATSSHead(64, 5, STRIDES, anchor_offset=0.0)
    maps = [torch.randn(2, 64, math.ceil(96 / s), math.ceil(128 / s)) for s in STRIDES]
    anchors, counts = head.anchors(maps)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert centres[: counts[0]][:3].tolist() == [[0.0, 0.0], [8.0, 0.0], [16.0, 0.0]]
    assert (anchors[0, 2] - anchors[0, 0]).item() == 64.0  # 8 * stride
    shifted = ATSSHead(64, 5, STRIDES, anchor_offset=0.5).anchors(maps)[0]
    assert ((shifted[:, :2] + shifted[:, 2:]) / 2)[0].tolist() == [4.0, 4.0]
    # Image 1 has no object: mmdet's num_total_samples = sum over images of max(pos, 1).
    images = ImageList(torch.zeros(2, 3, 96, 128), [(96, 128), (80, 100)])
    gts = [synthetic_input(96, 128, 3, seed=1)["instances"], synthetic_input(80, 100, 0)["instances"]]
    torch.manual_seed(0)
    losses, positives, negatives = head(maps, images, gts)
    num_pos = len(positives.batch_index)
    assert 0 < num_pos
    logits, _, centerness = head.predict(maps)
    focal = torch.nn.functional.binary_cross_entropy_with_logits  # centerness BCE / (num_pos + 1)
    from hybrid_detr.modeling.co_detr.atss import centerness_targets

    a = positives.boxes
    target = centerness_targets((a[:, :2] + a[:, 2:]) / 2, gts[0].gt_boxes.tensor[positives.gt_index])
    anchor_index = [((anchors == b).all(1)).nonzero()[0, 0] for b in a]
    expected = focal(centerness[0, anchor_index], target, reduction="sum") / (num_pos + 1)
    assert losses["loss_centerness"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_atss_negatives_are_the_valid_unassigned_anchors():
    head = ATSSHead(64, 5, STRIDES)
    maps = [torch.randn(2, 64, math.ceil(96 / s), math.ceil(128 / s)) for s in STRIDES]
    images = ImageList(torch.zeros(2, 3, 96, 128), [(96, 128), (80, 100)])
    gts = [synthetic_input(96, 128, 3, seed=1)["instances"], synthetic_input(80, 100, 1, seed=2)["instances"]]
    _, positives, negatives = head(maps, images, gts)
    anchors, _ = head.anchors(maps)
    a = len(anchors)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    valid = torch.stack([(centres[:, 0] < w) & (centres[:, 1] < h) for h, w in [(96, 128), (80, 100)]])
    assert len(negatives.batch_index) + len(positives.batch_index) == int(valid.sum())
    pos = set(zip(positives.batch_index.tolist(), [int(((anchors == b).all(1)).nonzero()[0, 0]) for b in positives.boxes]))
    neg_anchor = negatives.feature_rows - negatives.batch_index * a
    neg = set(zip(negatives.batch_index.tolist(), neg_anchor.tolist()))
    assert not pos & neg
    assert all(valid[b, i] for b, i in neg)
    assert torch.equal(negatives.boxes, anchors[neg_anchor])
    # Their feature: the adapter's map at the anchor's level and location (like the positives').
    flat = torch.cat([m.flatten(2) for m in maps], 2).transpose(1, 2)
    assert torch.equal(negatives.feature_table[negatives.feature_rows], flat[negatives.batch_index, neg_anchor])


# ---------------------------------------------------------------- 2. padding with random negatives (head lines 390-453)
def make_positives(batch_index, c=4):
    p = len(batch_index)
    return AuxPositives(
        torch.tensor(batch_index), torch.tensor([[10.0, 20.0, 30.0, 60.0]]).repeat(p, 1), torch.zeros(p, dtype=torch.int64),
        torch.arange(p, dtype=torch.float32), torch.randn(p, c),
    )


def make_negatives(batch_index, c=4):
    p = len(batch_index)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]]) + torch.arange(p, dtype=torch.float32)[:, None]
    return AuxNegatives(torch.tensor(batch_index), boxes, torch.arange(p), torch.randn(p, c))


SIZES = torch.tensor([[100, 50], [100, 50]])


def test_default_padding_is_random_negatives_trained_as_background():
    co = default_co()
    assert co.ZERO_PADDING is False and co.MIN_POS_QUERIES == 9 and co.MAX_POS_QUERIES == 300
    torch.manual_seed(0)
    negatives = make_negatives([0] * 20 + [1] * 4)
    packed = pack_positives(make_positives([0, 0, 0]), 2, SIZES, 9, 300, negatives=negatives)
    assert packed.num_queries == 9
    # Image 0: 3 positives + 6 of its 20 negatives; image 1: its 4 negatives, 5 padding slots left.
    assert packed.padding_mask.tolist() == [[False] * 9, [False] * 4 + [True] * 5]
    assert packed.assignment.query_index.tolist() == [0, 1, 2]  # only positives get a target
    table = negatives.feature_table
    chosen0 = [int((table == f).all(1).nonzero()[0, 0]) for f in packed.features[0, 3:]]
    assert len(set(chosen0)) == 6 and all(i < 20 for i in chosen0)  # image 0's own, no repeats
    assert sorted(int((table == f).all(1).nonzero()[0, 0]) for f in packed.features[1, :4]) == [20, 21, 22, 23]
    # Boxes of negatives: their own, normalised like the positives'.
    i = chosen0[0]
    expected = torch.tensor([(5 + i) / 50, (5 + i) / 100, 10 / 50, 10 / 100])
    assert torch.allclose(packed.boxes[0, 3], expected)
    # Random: another draw picks other negatives of image 0.
    draws = {tuple(pack_positives(make_positives([0, 0, 0]), 2, SIZES, 9, 300, negatives=negatives).features[0, 3:, 0].tolist()) for _ in range(5)}
    assert len(draws) > 1
    # Trained as background: the classification loss sees them (not the padding), no box loss.
    logits = torch.zeros(2, 9, 3)
    onehot = torch.zeros(2, 9, 3)
    focal = FocalLoss(0.25, 2.0)
    pairs = MatchedPairs(None, None, None, None, None, onehot, packed.padding_mask)

    def loss(x):
        return focal(x, pairs, 1.0).value

    base = loss(logits)
    logits[0, 5] = 3.0  # a negative predicting objects costs more
    assert loss(logits) > base
    logits[1, 6] = 3.0  # a padding slot does not
    assert loss(logits) == pytest.approx(loss(logits.index_fill(1, torch.tensor([6]), 0.0)))


def test_zero_padding_option_masks_the_padding():
    model = tiny_branch(ZERO_PADDING=True)
    assert model.zero_padding is True
    packed = pack_positives(make_positives([0, 0, 0]), 2, SIZES, 9, 300, negatives=None)
    assert packed.padding_mask.tolist() == [[False] * 3 + [True] * 6, [True] * 9]


def test_more_positives_than_max_keeps_a_random_subset_by_default():
    assert default_co().POS_QUERY_SUBSET == "random"
    torch.manual_seed(0)
    pos = make_positives([0] * 30)
    kept = [set(pack_positives(pos, 1, SIZES[:1], 9, 10).features[0, :, 0].tolist()) for _ in range(4)]
    assert all(len(k) == 10 for k in kept) and len(set(map(frozenset, kept))) > 1
    best = pack_positives(pos, 1, SIZES[:1], 9, 10, subset="best")
    assert set(best.features[0, :, 0].tolist()) == set(pos.features[20:, 0].tolist())  # scores 20..29


def test_positive_boxes_are_not_clipped_to_the_image():
    # An anchor reaching past the image (official: cxcywh of box / image size, no clipping).
    pos = AuxPositives(torch.tensor([0]), torch.tensor([[-10.0, 40.0, 70.0, 120.0]]), torch.tensor([0]), torch.ones(1), torch.randn(1, 4))
    packed = pack_positives(pos, 1, SIZES[:1], 9, 300)
    assert packed.boxes[0, 0].tolist() == pytest.approx([30 / 50, 80 / 100, 80 / 50, 80 / 100])


# ---------------------------------------------------------------- 3. positive-query embedding (transformer.py 157-169, 407-417)
def tiny_branch(**co_overrides):
    from hybrid_detr.modeling.co_detr.branch import CoDETRBranch

    return CoDETRBranch(co_cfg(**co_overrides), [8, 16, 32, 64])


def test_positive_query_embedding_as_official():
    assert default_co().HEAD_EMBED == "scalar"
    branch = tiny_branch()
    d = 64
    embeds = branch.query_embeds
    assert set(embeds) == {"atss", "rcnn"} and embeds["atss"] is not embeds["rcnn"]  # per head
    e = embeds["atss"]
    assert isinstance(e.box_proj, nn.Linear) and (e.box_proj.in_features, e.box_proj.out_features) == (2 * d, 2 * d)
    assert e.box_norm.normalized_shape == (2 * d,)
    assert (e.feature_proj.in_features, e.feature_proj.out_features) == (d, d) and e.feature_norm.normalized_shape == (d,)
    assert e.head_embed.shape == (1,)  # the R-50 release's Embedding(num_co_heads, 1, ...)
    assert abs(e.head_embed.item()) <= math.sqrt(6 / 3)  # xavier-uniform of a (2, 1) table
    assert PositiveQueryEmbedding(d, "vector", 2).head_embed.shape == (d,)
    # forward, by hand: split(LN(Linear(sine(box)))) = (position, content); content += LN(Linear(feature));
    # position += head embedding.
    torch.manual_seed(0)
    with torch.no_grad():
        e.head_embed.fill_(0.7)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.3], [0.9, 0.1, 1.4, 0.2]]])
    features = torch.randn(1, 2, d)
    packed = PackedPositives(boxes, features, torch.zeros(1, 2, dtype=torch.bool), Assignment.empty("cpu"))
    content, position, reference = e(packed)
    out = e.box_norm(e.box_proj(box_sine_embedding(boxes.clamp(0, 1), d // 2)))
    assert torch.allclose(position, out[..., :d] + 0.7, atol=1e-6)
    assert torch.allclose(content, out[..., d:] + e.feature_norm(e.feature_proj(features)), atol=1e-6)
    assert torch.equal(reference, boxes)  # the reference stays unclipped (w = 1.4)


def _co_losses(atss_weights=None, **co_overrides):
    """One training step's losses (floats) of the tiny Co-DETR model, the same weights and batch for every
    setting and the random draws (RPN / RoI sampling, positive subsets) reseeded."""
    from detectron2.modeling import build_model

    from model_helpers import synthetic_batch

    torch.manual_seed(0)
    model = build_model(co_cfg(**co_overrides)).train()
    if atss_weights is not None:
        head = model.branches["co_detr"].heads["atss"]
        head.class_weight, head.giou_weight, head.centerness_weight = atss_weights
    torch.manual_seed(1)
    with EventStorage():
        return {k: v.item() for k, v in model(synthetic_batch()).items()}


def _assert_scaled(changed, reference, factors):
    """changed[k] == reference[k] * factors(k) for every loss."""
    assert set(changed) == set(reference)
    for key, value in reference.items():
        assert changed[key] == pytest.approx(value * factors(key), rel=1e-5, abs=1e-7), key


@pytest.fixture(scope="module")
def release_losses():
    return _co_losses()


def test_aux_losses_scaled_by_lambda2_times_decoder_layers(release_losses):
    """Config line 7 (lambda_2 = 2) and the heads' loss weights times the decoder's 6 layers (the
    official config multiplies them by num_dec_layer); the query losses by lambda_1 = 1."""
    cfg = get_cfg()
    add_hybrid_detr_config(cfg)
    m = cfg.MODEL.HYBRID_DETR
    assert (m.CO_DETR.LAMBDA1, m.CO_DETR.LAMBDA2, m.CO_DETR.SCALE_AUX_BY_DEC_LAYERS) == (1.0, 2.0, True)
    head_keys = {k for k in release_losses if k.startswith(("co_atss_", "co_rcnn_")) and "_query_" not in k}
    query_keys = {k for k in release_losses if "_query_" in k}
    assert {"co_atss_loss_cls", "co_rcnn_loss_rpn_cls"} <= head_keys and "co_atss_query_loss_class" in query_keys

    def factor(aux, query):
        return lambda key: aux if key in head_keys else query if key in query_keys else 1.0

    # The heads' losses carry lambda_2 x DEC_LAYERS (tiny model: 2 x 2): lambda_2 3 -> x 1.5; without the
    # decoder-layer factor -> / 2. The query losses carry lambda_1 alone. The one-to-one losses neither.
    _assert_scaled(_co_losses(LAMBDA2=3.0), release_losses, factor(1.5, 1.0))
    _assert_scaled(_co_losses(SCALE_AUX_BY_DEC_LAYERS=False), release_losses, factor(0.5, 1.0))
    _assert_scaled(_co_losses(LAMBDA1=0.5), release_losses, factor(1.0, 0.5))


def test_atss_loss_weights_are_1_2_1(release_losses):
    """co_atss_head: loss_cls 1, loss_bbox (GIoU) 2, loss_centerness 1: with 1 / 1 / 1 the GIoU term halves
    and nothing else moves."""
    head = tiny_branch().heads["atss"]
    assert (head.class_weight, head.giou_weight, head.centerness_weight) == (1.0, 2.0, 1.0)
    _assert_scaled(_co_losses(atss_weights=(1.0, 1.0, 1.0)), release_losses,
                   lambda key: 0.5 if key == "co_atss_loss_bbox" else 1.0)


def test_roi_head_size_keys_default_to_official_and_the_quickstart_scales_them_down():
    import os

    from hybrid_detr.config import load_config

    co = default_co()
    assert (co.ROI_FC_DIM, co.ROI_POOLER_SAMPLING_RATIO) == (1024, 0)
    head = FasterRCNNAuxHead(co_cfg(), 64, STRIDES)
    assert head.roi_heads.box_head.fc1.out_features == 1024 and head.roi_heads.box_head.fc2.out_features == 1024
    assert head.roi_heads.box_pooler.level_poolers[0].sampling_ratio == 0
    assert head.rpn.pre_nms_topk[True] == 4000 and head.rpn.post_nms_topk[True] == 1000
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_config(os.path.join(root, "configs", "quickstart", "co_detr_r18_synthetic.yaml"))
    q = cfg.MODEL.HYBRID_DETR.CO_DETR
    assert (q.ROI_BATCH_SIZE_PER_IMAGE, q.ROI_FC_DIM, q.ROI_POOLER_SAMPLING_RATIO) == (32, 256, 1)
    assert (q.RPN_PRE_NMS_TOPK_TRAIN, q.RPN_POST_NMS_TOPK_TRAIN) == (300, 100)
    head = FasterRCNNAuxHead(cfg, cfg.MODEL.HYBRID_DETR.HIDDEN_DIM, STRIDES[:4])
    assert head.roi_heads.batch_size_per_image == 32 and head.roi_heads.box_head.fc1.out_features == 256
    assert head.roi_heads.box_pooler.level_poolers[0].sampling_ratio == 1
    # Everything else stays official.
    for key in ("RPN_ANCHOR_SCALE", "RPN_SCALES_PER_OCTAVE", "RPN_LOW_QUALITY_MIN_IOU", "ZERO_PADDING", "HEAD_EMBED",
                "POS_QUERY_SUBSET", "ATSS_ANCHOR_OFFSET", "MIN_POS_QUERIES", "MAX_POS_QUERIES", "LAMBDA1", "LAMBDA2"):
        assert q[key] == co[key], key


@pytest.mark.parametrize("zero_padding", [False, True])
def test_the_branch_pads_with_negatives_unless_zero_padding(zero_padding):
    from detectron2.modeling import build_model

    from model_helpers import synthetic_batch

    cfg = co_cfg(ZERO_PADDING=zero_padding, HEAD_EMBED="vector" if zero_padding else "scalar")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    branch = model.branches["co_detr"]
    assert branch.zero_padding is zero_padding and branch.subset == "random"
    groups = []
    decode = model.decoder.forward

    def spy(group, memory, *args, **kwargs):
        groups.append(group)
        return decode(group, memory, *args, **kwargs)

    model.decoder.forward = spy
    with EventStorage():
        losses = model(synthetic_batch())  # image 0: 3 objects, image 1: none
    assert all(torch.isfinite(v) for v in losses.values())
    group = groups[-1]  # the positive-query pass (after the one-to-one pass)
    padding = group.padding_mask
    if zero_padding:
        assert padding[1].all()  # the image without objects: padding only
    else:
        # Every slot holds a positive or a negative: the heads have plenty of negatives.
        assert not padding.any()
    # Either way the image without objects has no positive (no box loss target).
    assert losses["co_atss_query_loss_class"] > 0
