"""Every key name and shape of the official DAC-DETR and Co-DETR (Co-Deformable-DETR) checkpoints,
written from their model definitions (no official code and no download at test time), for the
converter tests."""
from typing import List, Tuple

from official_keys import Shape, deformable_detr_keys


def dac_detr_keys(d=256, ffn=2048, layers=6, queries=900, classes=91, **backbone) -> List[Tuple[str, Shape]]:
    """DAC-DETR's release (models/deformable_detr.py DeformableDETR, H-DETR-style, built with
    --two_stage --with_box_refine --mixed_selection --dim_feedforward 2048 --num_queries_one2one 900):
    the Deformable DETR ++ two-stage layout, plus mixed selection's content queries (query_embed,
    (Q, d)) and CDN's label embedding (label_enc, 91 + 1 slots; dn_components.py has no parameter).
    `backbone`: `deformable_detr_keys`' backbone / channels, for a backbone other than R-50."""
    keys = deformable_detr_keys("two_stage", d=d, ffn=ffn, layers=layers, queries=queries, classes=classes, **backbone)
    keys += [("query_embed.weight", (queries, d)), ("label_enc.weight", (classes + 1, d))]
    return keys


def _linear(prefix, out_dim, in_dim) -> List[Tuple[str, Shape]]:
    return [(f"{prefix}.weight", (out_dim, in_dim)), (f"{prefix}.bias", (out_dim,))]


def _norm(prefix, dim) -> List[Tuple[str, Shape]]:
    return [(f"{prefix}.weight", (dim,)), (f"{prefix}.bias", (dim,))]


def _bn(prefix, dim) -> List[Tuple[str, Shape]]:
    # mmdet's ResNet: nn.BatchNorm2d (requires_grad=False, norm_eval): four tensors + num_batches_tracked.
    return [(f"{prefix}.{leaf}", (dim,)) for leaf in ("weight", "bias", "running_mean", "running_var")] + [
        (f"{prefix}.num_batches_tracked", ())
    ]


def mmdet_resnet50(prefix="backbone.") -> List[Tuple[str, Shape]]:
    """mmdet's ResNet-50 (style 'pytorch'): torchvision's parameter names, BN with num_batches_tracked."""
    keys = [(f"{prefix}conv1.weight", (64, 3, 7, 7))] + _bn(f"{prefix}bn1", 64)
    in_ch = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            p = f"{prefix}layer{stage}.{b}"
            keys += [(f"{p}.conv1.weight", (width, in_ch, 1, 1))] + _bn(f"{p}.bn1", width)
            keys += [(f"{p}.conv2.weight", (width, width, 3, 3))] + _bn(f"{p}.bn2", width)
            keys += [(f"{p}.conv3.weight", (width * 4, width, 1, 1))] + _bn(f"{p}.bn3", width * 4)
            if b == 0:
                keys += [(f"{p}.downsample.0.weight", (width * 4, in_ch, 1, 1))] + _bn(f"{p}.downsample.1", width * 4)
            in_ch = width * 4
    return keys


def _mmcv_ms_deform_attn(prefix, d=256, heads=8, levels=4, points=4):
    # mmcv.ops.MultiScaleDeformableAttention
    return (
        _linear(f"{prefix}.sampling_offsets", heads * levels * points * 2, d)
        + _linear(f"{prefix}.attention_weights", heads * levels * points, d)
        + _linear(f"{prefix}.value_proj", d, d)
        + _linear(f"{prefix}.output_proj", d, d)
    )


def _mmcv_ffn(prefix, d, ffn):
    # mmcv FFN (num_fcs 2): layers = Sequential(Sequential(Linear, act, Dropout), Linear, Dropout)
    return _linear(f"{prefix}.layers.0.0", ffn, d) + _linear(f"{prefix}.layers.1", d, ffn)


def co_deformable_detr_keys(
    d=256, ffn=2048, layers=6, queries=300, classes=80, num_co_heads=2, aux_heads=True
) -> List[Tuple[str, Shape]]:
    """Co-DETR's co_deformable_detr_r50_1x_coco.py (mmdet 2.x): CoDETR with ResNet-50, ChannelMapper
    (GN, one extra 3x3 stride-2 conv on C5), RPNHead, CoDeformDETRHead (two-stage, box refinement,
    mixed selection, CoDeformableDetrTransformer with num_co_heads 2), CoStandardRoIHead
    (Shared2FCBBoxHead) and CoATSSHead."""
    keys = mmdet_resnet50("backbone.")
    # ChannelMapper: ConvModule(conv without bias (a norm follows), gn).
    for i, c in enumerate((512, 1024, 2048)):
        keys += [(f"neck.convs.{i}.conv.weight", (d, c, 1, 1))] + _norm(f"neck.convs.{i}.gn", d)
    keys += [("neck.extra_convs.0.conv.weight", (d, 2048, 3, 3))] + _norm("neck.extra_convs.0.gn", d)
    q = "query_head"
    t = f"{q}.transformer"
    keys += [(f"{t}.level_embeds", (4, d))]
    for i in range(layers):
        p = f"{t}.encoder.layers.{i}"
        keys += _mmcv_ms_deform_attn(f"{p}.attentions.0") + _mmcv_ffn(f"{p}.ffns.0", d, ffn)
        keys += _norm(f"{p}.norms.0", d) + _norm(f"{p}.norms.1", d)
    for i in range(layers):
        p = f"{t}.decoder.layers.{i}"
        keys += [(f"{p}.attentions.0.attn.in_proj_weight", (3 * d, d)), (f"{p}.attentions.0.attn.in_proj_bias", (3 * d,))]
        keys += _linear(f"{p}.attentions.0.attn.out_proj", d, d) + _mmcv_ms_deform_attn(f"{p}.attentions.1")
        keys += _mmcv_ffn(f"{p}.ffns.0", d, ffn) + _norm(f"{p}.norms.0", d) + _norm(f"{p}.norms.1", d) + _norm(f"{p}.norms.2", d)
    keys += _linear(f"{t}.enc_output", d, d) + _norm(f"{t}.enc_output_norm", d)
    keys += _linear(f"{t}.pos_trans", 2 * d, 2 * d) + _norm(f"{t}.pos_trans_norm", 2 * d)
    if num_co_heads > 0:  # the positive queries' projections (aux only); head_pos_embed as built (nn.Embedding(2, 1, ...))
        keys += [(f"{t}.head_pos_embed.weight", (num_co_heads, 1))]
        for i in range(num_co_heads):
            keys += _linear(f"{t}.aux_pos_trans.{i}", 2 * d, 2 * d) + _norm(f"{t}.aux_pos_trans_norm.{i}", 2 * d)
        for i in range(num_co_heads):
            keys += _linear(f"{t}.pos_feats_trans.{i}", d, d) + _norm(f"{t}.pos_feats_norm.{i}", d)
    # The extra stride-2 level of the multi-scale adapter (aux heads only).
    keys += [(f"{q}.downsample.0.weight", (d, d, 3, 3)), (f"{q}.downsample.0.bias", (d,))] + _norm(f"{q}.downsample.1", d)
    for i in range(layers + 1):
        keys += _linear(f"{q}.cls_branches.{i}", classes, d)
        keys += _linear(f"{q}.reg_branches.{i}.0", d, d) + _linear(f"{q}.reg_branches.{i}.2", d, d) + _linear(f"{q}.reg_branches.{i}.4", 4, d)
    keys += [(f"{q}.query_embedding.weight", (queries, d))]
    if aux_heads:
        keys += [("rpn_head.rpn_conv.weight", (d, d, 3, 3)), ("rpn_head.rpn_conv.bias", (d,))]
        keys += [("rpn_head.rpn_cls.weight", (9, d, 1, 1)), ("rpn_head.rpn_cls.bias", (9,))]
        keys += [("rpn_head.rpn_reg.weight", (36, d, 1, 1)), ("rpn_head.rpn_reg.bias", (36,))]
        r = "roi_head.0.bbox_head"
        keys += _linear(f"{r}.shared_fcs.0", 1024, d * 7 * 7) + _linear(f"{r}.shared_fcs.1", 1024, 1024)
        keys += _linear(f"{r}.fc_cls", classes + 1, 1024) + _linear(f"{r}.fc_reg", 4 * classes, 1024)
        a = "bbox_head.0"
        keys += [(f"{a}.cls_convs.0.conv.weight", (d, d, 3, 3))] + _norm(f"{a}.cls_convs.0.gn", d)
        keys += [(f"{a}.reg_convs.0.conv.weight", (d, d, 3, 3))] + _norm(f"{a}.reg_convs.0.gn", d)
        keys += [(f"{a}.atss_cls.weight", (classes, d, 3, 3)), (f"{a}.atss_cls.bias", (classes,))]
        keys += [(f"{a}.atss_reg.weight", (4, d, 3, 3)), (f"{a}.atss_reg.bias", (4,))]
        keys += [(f"{a}.atss_centerness.weight", (1, d, 3, 3)), (f"{a}.atss_centerness.bias", (1,))]
        keys += [(f"{a}.scales.{i}.scale", ()) for i in range(5)]
    return keys
