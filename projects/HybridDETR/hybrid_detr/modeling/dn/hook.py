"""DINO's denoising queries as a main-pass hook ("dn" in DECODER_MODE): they join the one-to-one
decoder pass, and every decoder layer's outputs on them get the detection loss towards their gt.

Losses as the official criterion (IDEA-Research/DINO models/dino/dino.py `SetCriterion.forward`,
lines 502-540 and 564-585): each layer's positives are assigned to the gt they were made from (no
matching), classification over every denoising query (negatives and padding slots are background),
L1 and GIoU on the positives, all normalised by num_boxes x G, with the weights of the one-to-one
losses (build_dino lines 770-773: loss_ce_dn = cls_loss_coef, ...). The classification loss is the
decoder's (the criterion's): focal, or with DAC's CLS_LOSS "iou_aware_bce" the IoU-aware BCE, each
(group, gt) pair ranking first (rank weight 1), as DAC-DETR's release trains its denoising queries
(models/segmentation.py `IA_BCE_loss` with w_prime=1 for cdn). Names "dn_loss_*".
"""
from typing import Dict, Optional

import torch
from detectron2.config import configurable
from torch import nn

from ..criterion import DetectionCriterion
from ..modes import ExtraQueries, MainPassHook, MainPassInputs
from ..transformer import DecoderOutput, QueryGroup
from .denoising import DenoisingGroups, denoising_groups

__all__ = ["DenoisingQueries"]

class DenoisingQueries(MainPassHook):
    @configurable
    def __init__(
        self,
        *,
        hidden_dim: int,
        num_classes: int,
        labelbook_size: int,
        dn_number: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        aux_loss: bool = True,
        num_decoder_layers: int = 6,
        inverse_sigmoid_eps: float = 1e-3,
    ):
        super().__init__()
        if dn_number < 1:
            raise ValueError(f"MODEL.HYBRID_DETR.DN.NUMBER must be >= 1, got {dn_number}")
        if labelbook_size < num_classes:
            raise ValueError(f"MODEL.HYBRID_DETR.DN.LABELBOOK_SIZE {labelbook_size} < NUM_CLASSES {num_classes}")
        self.num_classes = num_classes
        self.dn_number = dn_number
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.aux_loss = aux_loss
        self.num_decoder_layers = num_decoder_layers
        self.inverse_sigmoid_eps = inverse_sigmoid_eps
        # The official `label_enc` (dino.py:81): labelbook_size + 1 rows, normal_ init (nn.Embedding's).
        self.label_embedding = nn.Embedding(labelbook_size + 1, hidden_dim)

    @classmethod
    def from_config(cls, cfg):
        m = cfg.MODEL.HYBRID_DETR
        dn = m.DN
        if not m.TWO_STAGE:
            # Denoising queries take their position from the query source's embedding of a box
            # (DINO and DAC-DETR's release: two-stage query selection).
            raise ValueError(
                f"DECODER_MODE {m.DECODER_MODE!r}: denoising queries need MODEL.HYBRID_DETR.TWO_STAGE: True "
                "(their positional queries are the two-stage proposal embedding of their boxes)"
            )
        return {
            "hidden_dim": m.HIDDEN_DIM,
            "num_classes": m.NUM_CLASSES,
            "labelbook_size": dn.LABELBOOK_SIZE or m.NUM_CLASSES,
            "dn_number": dn.NUMBER,
            "label_noise_ratio": dn.LABEL_NOISE_RATIO,
            "box_noise_scale": dn.BOX_NOISE_SCALE,
            "aux_loss": m.AUX_LOSS,
            "num_decoder_layers": m.DEC_LAYERS,
            # The noised boxes go through the decoder's inverse sigmoid (DINO 1e-3, DAC's release 1e-5).
            "inverse_sigmoid_eps": m.INVERSE_SIGMOID_EPS,
        }

    def groups(self, targets) -> Optional[DenoisingGroups]:
        """This batch's denoising groups (noise drawn now), None without any gt box."""
        return denoising_groups(
            targets, self.dn_number, self.label_noise_ratio, self.box_noise_scale, self.num_classes,
            inverse_sigmoid_eps=self.inverse_sigmoid_eps,
        )

    def queries(self, dn: DenoisingGroups, query_source, dtype) -> QueryGroup:
        """Content: the label embedding of each slot's (noised) class, zero on padding slots;
        reference: its noised box; position: the query source's embedding of that box."""
        content = self.label_embedding(dn.labels.clamp(min=0)) * (dn.labels >= 0)[..., None]
        position, _ = query_source.embed_boxes(dn.boxes, dtype)
        return QueryGroup(content.to(dtype), position, dn.boxes.to(dtype), self_attn_mask=dn.self_attn_mask)

    def extra_queries(self, inputs: MainPassInputs) -> Optional[ExtraQueries]:
        dn = self.groups(inputs.targets)
        if dn is None:
            return None
        dtype = inputs.memory.memory.dtype
        return ExtraQueries(self.queries(dn, inputs.query_source, dtype), sees_one_to_one=True, state=dn)

    def losses(
        self, inputs: MainPassInputs, extra: Optional[ExtraQueries], output: Optional[DecoderOutput]
    ) -> Dict[str, torch.Tensor]:
        prefix = "dn_"
        if extra is None:
            # No gt box in the batch: zero losses that keep the label embedding in the graph
            # (the official code returns zeros too, dino.py:533-540, and adds label_enc * 0).
            zero = self.label_embedding.weight.sum() * 0.0
            suffixes = DetectionCriterion.layer_suffixes(self.num_decoder_layers, self.aux_loss)
            return {f"{prefix}{name}{suffix}": zero for _, suffix in suffixes for name in DetectionCriterion.LOSS_NAMES}
        dn: DenoisingGroups = extra.state
        return inputs.criterion.decoder_losses(
            output,
            dn.group_targets,
            lambda _layer, _logits, _boxes: dn.assignment,
            inputs.num_boxes * dn.num_groups,
            prefix=prefix,
            aux_loss=self.aux_loss,
        )
