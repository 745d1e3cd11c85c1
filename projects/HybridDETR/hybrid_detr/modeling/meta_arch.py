"""The `HybridDETR` meta-architecture: one image path for every decoder mode.

images -> backbone -> neck -> deformable encoder -> queries (learned or two-stage) -> decoder
-> training: one-to-one losses + each mode's branch losses; inference: top-k -> Instances.

The host knows the modes only through the contract in `modes.py`: the decoder mode builds each
decoder layer's cross-attention, the decoder's classification loss, the main-pass hooks (query
groups that join the one-to-one pass) and the training branches (passes of their own).
"""
from typing import Dict, List, Optional

import torch
from torch import nn
from torchvision.ops import batched_nms, box_convert

from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances

from .box_ops import normalized_targets
from .criterion import DetectionCriterion, num_boxes_across_workers
from .matcher import HungarianMatcher
from .modes import BranchInputs, ExtraQueries, MainPassInputs, parse_decoder_mode
from .neck import MultiScaleNeck, backbone_levels
from .postprocess import top_k_detections
from .query_groups import decode_groups
from .token_layout import EncoderMemory, LevelLayout, valid_ratios
from .transformer import (
    DecoderOutput,
    DeformableDecoder,
    DeformableEncoder,
    DeformableEncoderLayer,
    LearnedQueries,
    PredictionHeads,
    TwoStageQueries,
    build_decoder_layers,
    reset_transformer_parameters,
)

__all__ = ["HybridDETR"]


@META_ARCH_REGISTRY.register()
class HybridDETR(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        m = cfg.MODEL.HYBRID_DETR
        self.mode = parse_decoder_mode(m.DECODER_MODE)
        self.num_classes = m.NUM_CLASSES
        self.aux_loss = m.AUX_LOSS
        self.detections_per_image = cfg.TEST.DETECTIONS_PER_IMAGE
        self.nms_thresh_test = m.NMS_THRESH_TEST
        self.nms_pre_topk_test = m.NMS_PRE_TOPK_TEST

        self.backbone = build_backbone(cfg)
        self.in_features = list(m.IN_FEATURES)
        in_channels, in_strides = backbone_levels(self.backbone.output_shape(), self.in_features)
        self.neck = MultiScaleNeck(
            in_channels, in_strides, m.HIDDEN_DIM, m.NUM_FEATURE_LEVELS, m.POSITION_TEMPERATURE, m.POSITION_OFFSET
        )
        self.level_embed = nn.Parameter(torch.empty(m.NUM_FEATURE_LEVELS, m.HIDDEN_DIM).normal_())

        encoder_layer = DeformableEncoderLayer(
            m.HIDDEN_DIM, m.DIM_FEEDFORWARD, m.DROPOUT, m.NUM_FEATURE_LEVELS, m.NHEADS, m.ENC_N_POINTS
        )
        self.encoder = DeformableEncoder(encoder_layer, m.ENC_LAYERS)
        heads = PredictionHeads(
            m.HIDDEN_DIM, m.NUM_CLASSES, m.DEC_LAYERS, m.WITH_BOX_REFINE, m.TWO_STAGE,
            share_decoder_heads=m.SHARE_DECODER_HEADS, inverse_sigmoid_eps=m.INVERSE_SIGMOID_EPS,
        )
        layers = build_decoder_layers(
            m.DEC_LAYERS, m.HIDDEN_DIM, m.DIM_FEEDFORWARD, m.DROPOUT, m.NHEADS, lambda: self.mode.build_cross_attention(cfg)
        )
        self.decoder = DeformableDecoder(
            layers, heads, refine_boxes=m.WITH_BOX_REFINE, look_forward_twice=m.LOOK_FORWARD_TWICE,
            query_position_from_reference=m.QUERY_POSITION_FROM_REFERENCE, final_norm=m.DECODER_FINAL_NORM,
        )
        if m.TWO_STAGE_ENCODER_LOSS not in ("class_agnostic", "class_aware_topk"):
            raise ValueError(
                "MODEL.HYBRID_DETR.TWO_STAGE_ENCODER_LOSS must be 'class_agnostic' or 'class_aware_topk', "
                f"got {m.TWO_STAGE_ENCODER_LOSS!r}"
            )
        self.class_aware_encoder_loss = m.TWO_STAGE_ENCODER_LOSS == "class_aware_topk"
        if m.TWO_STAGE:
            self.query_source = TwoStageQueries(
                m.NUM_QUERIES, m.HIDDEN_DIM, heads, mixed_selection=m.MIXED_SELECTION, mask_invalid=m.TWO_STAGE_MASK_INVALID,
                ranking=m.TWO_STAGE_RANKING, position_from_decoder=m.QUERY_POSITION_FROM_REFERENCE,
                selected_encoder_outputs=self.class_aware_encoder_loss,
            )
        elif m.MIXED_SELECTION:
            raise ValueError("MODEL.HYBRID_DETR.MIXED_SELECTION needs TWO_STAGE: True (it selects encoder proposals)")
        elif m.QUERY_POSITION_FROM_REFERENCE:
            raise ValueError(
                "MODEL.HYBRID_DETR.QUERY_POSITION_FROM_REFERENCE needs TWO_STAGE: True (positions from 4-d reference boxes)"
            )
        else:
            self.query_source = LearnedQueries(m.NUM_QUERIES, m.HIDDEN_DIM)

        self.matcher = HungarianMatcher(m.COST_CLASS, m.COST_BBOX, m.COST_GIOU, m.FOCAL_ALPHA, m.FOCAL_GAMMA)
        self.criterion = DetectionCriterion(
            m.NUM_CLASSES, m.FOCAL_ALPHA, m.FOCAL_GAMMA, m.CLASS_WEIGHT, m.L1_WEIGHT, m.GIOU_WEIGHT,
            classification=self.mode.build_one_to_one_classification(cfg), giou_eps=m.GIOU_EPS,
        )
        self.main_passes = nn.ModuleDict(self.mode.build_main_passes(cfg))
        self.branches = nn.ModuleDict(self.mode.build_branches(cfg, self.neck.strides))
        # The official transformer initialisation (xavier, then MSDeformAttn's, each cross-attention's
        # and the reference points' own), once everything is built.
        reset_transformer_parameters(self.encoder, self.decoder, self.query_source, self.level_embed)

        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)

    @property
    def device(self):
        return self.pixel_mean.device

    def forward(self, batched_inputs: List[Dict]):
        images, padding_mask = self.preprocess_image(batched_inputs)
        if not self.training:
            _, _, _, one_to_one = self.transformer(*self.features(images.tensor, padding_mask))
            return self.inference(one_to_one, images.image_sizes, batched_inputs)

        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        targets = normalized_targets(gt_instances, images.image_sizes)
        num_boxes = num_boxes_across_workers(targets, self.device)
        memory, queries, encoder_predictions = self.encode_and_select(*self.features(images.tensor, padding_mask))
        pass_inputs = MainPassInputs(queries, memory, targets, num_boxes, self.criterion, self.query_source)
        one_to_one, extras = self.one_to_one_pass(queries, memory, pass_inputs)

        losses = self.criterion.decoder_losses(
            one_to_one, targets, lambda _, logits, boxes: self.matcher(logits, boxes, targets), num_boxes,
            aux_loss=self.aux_loss,
        )
        if encoder_predictions is not None:
            logits, boxes = encoder_predictions
            if self.class_aware_encoder_loss:
                # DINO's "interm" loss (models/dino/dino.py:588-604): the selected top-k proposals
                # (the query source returns only those), Hungarian-matched to the real labels and
                # trained with the decoder's focal / L1 / GIoU and weights (interm_loss_coef 1.0).
                encoder_targets = targets
            else:
                # Two-stage encoder head, class-agnostic as in the official code (its `bin_targets`):
                # every target is labelled 0, matched and trained (focal over all K outputs, so the
                # other K-1 stay background) on that binary problem; proposals are ranked by logit 0.
                encoder_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            assignment = self.matcher(logits, boxes, encoder_targets)
            enc_losses = self.criterion(logits, boxes, encoder_targets, assignment, num_boxes, self.criterion.focal)
            losses.update({f"enc_{k}": v for k, v in enc_losses.items()})
        for name, hook in self.main_passes.items():
            extra, output = extras.get(name, (None, None))  # None: the hook added no query this step
            losses.update(hook.losses(pass_inputs, extra, output))
        branch_inputs = BranchInputs(
            queries, memory, one_to_one, targets, num_boxes, images, gt_instances, self.decoder, self.criterion,
            {name: (self.main_passes[name], extra, output) for name, (extra, output) in extras.items()}, pass_inputs,
        )
        for branch in self.branches.values():
            losses.update(branch(branch_inputs))
        return losses

    def one_to_one_pass(self, queries, memory: EncoderMemory, pass_inputs: MainPassInputs):
        """The one-to-one decoder pass, joined by the main-pass hooks' queries (training):
        (one-to-one output, {hook name: (ExtraQueries, its output)} for the hooks that added some)."""
        extras: Dict[str, ExtraQueries] = {}
        for name, hook in self.main_passes.items():
            extra = hook.extra_queries(pass_inputs)
            if extra is not None:
                extras[name] = extra
        return self.decode_with_extras(queries, memory, extras)

    def decode_with_extras(self, queries, memory: EncoderMemory, extras: Dict[str, ExtraQueries]):
        """One decoder pass over `extras`' groups (in order) then the one-to-one queries: the
        one-to-one queries never see the others, each extra group sees itself (and the one-to-one
        queries when it asks to), never another extra group. Returns as `one_to_one_pass`."""
        if not extras:
            return self.decoder(queries, memory), {}
        groups = [e.group for e in extras.values()] + [queries]
        sees = torch.eye(len(groups), dtype=torch.bool)
        sees[:-1, -1] = torch.tensor([e.sees_one_to_one for e in extras.values()])
        outputs = decode_groups(self.decoder, groups, memory, sees)
        return outputs[-1], {name: (extra, out) for (name, extra), out in zip(extras.items(), outputs)}

    @torch.no_grad()
    def raw_predictions(self, batched_inputs: List[Dict]) -> Dict[str, torch.Tensor]:
        """The last decoder layer's raw outputs, in inference mode: `pred_logits` (N, Q, K) and
        `pred_boxes` (N, Q, 4) cxcywh in [0, 1] of each unpadded image (the official models'
        `pred_logits` / `pred_boxes`). The model's train/eval state is restored afterwards."""
        was_training = self.training
        self.eval()
        try:
            images, padding_mask = self.preprocess_image(batched_inputs)
            _, _, _, one_to_one = self.transformer(*self.features(images.tensor, padding_mask))
        finally:
            self.train(was_training)
        logits, boxes = one_to_one.layer(-1)
        return {"pred_logits": logits, "pred_boxes": boxes}

    def preprocess_image(self, batched_inputs):
        """Normalised, padded images and their padding mask (N, H, W), True on padding."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        n, _, h, w = images.tensor.shape
        padding_mask = torch.ones(n, h, w, dtype=torch.bool, device=self.device)
        for mask, (img_h, img_w) in zip(padding_mask, images.image_sizes):
            mask[:img_h, :img_w] = False
        return images, padding_mask

    def features(self, images: torch.Tensor, padding_mask: torch.Tensor):
        """Backbone + neck: per-level maps, padding masks and position embeddings, finest first."""
        features = self.backbone(images)
        return self.neck([features[f] for f in self.in_features], padding_mask)

    def encode_levels(self, maps, masks, positions, layout: Optional[LevelLayout] = None) -> EncoderMemory:
        """The deformable encoder over the neck's levels, laid out as one token sequence (`layout`:
        the maps' own by default)."""
        layout = layout if layout is not None else LevelLayout.of_maps(maps)
        ratios = valid_ratios(masks)
        src = layout.flatten(maps)
        pos = layout.flatten([p + self.level_embed[level][:, None, None] for level, p in enumerate(positions)])
        flat_mask = layout.flatten(masks)
        memory = self.encoder(src, pos, layout, ratios, flat_mask)
        return EncoderMemory(memory, layout, ratios, flat_mask, pos)

    def encode(self, images: torch.Tensor, padding_mask: torch.Tensor) -> EncoderMemory:
        return self.encode_levels(*self.features(images, padding_mask))

    def encode_and_select(self, maps, masks, positions, layout: Optional[LevelLayout] = None):
        """Encoder and query selection: (memory, queries, encoder predictions or None)."""
        memory = self.encode_levels(maps, masks, positions, layout)
        queries, encoder_predictions = self.query_source(memory)
        return memory, queries, encoder_predictions

    def transformer(self, maps, masks, positions, layout: Optional[LevelLayout] = None):
        """Encoder, query selection and the one-to-one decoder pass alone (inference): (memory,
        queries, encoder predictions or None, decoder output). `layout`: see `encode_levels`. No
        host synchronisation: it compiles as one graph."""
        memory, queries, encoder_predictions = self.encode_and_select(maps, masks, positions, layout)
        return memory, queries, encoder_predictions, self.decoder(queries, memory)

    def inference(self, outputs: DecoderOutput, image_sizes, batched_inputs):
        """Top-k (query, class) pairs of the last layer -> Instances in original image coordinates.

        With NMS_THRESH_TEST > 0 (DAC-DETR's release evaluation): the NMS_PRE_TOPK_TEST best pairs,
        class-wise NMS at that IoU, then the best DETECTIONS_PER_IMAGE."""
        logits, boxes = outputs.layer(-1)
        nms = self.nms_thresh_test > 0
        keep = self.nms_pre_topk_test if nms else self.detections_per_image
        scores, labels, boxes, _ = top_k_detections(logits, boxes, keep)
        results = []
        for i, (h, w) in enumerate(image_sizes):
            xyxy = box_convert(boxes[i], "cxcywh", "xyxy") * torch.tensor([w, h, w, h], device=boxes.device)
            image_scores, image_labels = scores[i], labels[i]
            if nms:
                kept = batched_nms(xyxy.float(), image_scores.float(), image_labels, self.nms_thresh_test)
                kept = kept[: self.detections_per_image]
                xyxy, image_scores, image_labels = xyxy[kept], image_scores[kept], image_labels[kept]
            instances = Instances((h, w))
            instances.pred_boxes = Boxes(xyxy)
            instances.scores = image_scores
            instances.pred_classes = image_labels
            height = batched_inputs[i].get("height", h)
            width = batched_inputs[i].get("width", w)
            results.append({"instances": detector_postprocess(instances, height, width)})
        return results
