"""DAC-DETR's training branch ("dac" in DECODER_MODE): the C-decoder, i.e. the shared decoder
called without self-attention, fed the one-to-one queries and trained one-to-many."""
import dataclasses
from typing import Optional

from detectron2.config import configurable
from torch import nn

from ..modes import BranchInputs, register_decoder_mode
from ..transformer import QueryGroup
from ..criterion import ClassificationLossSpec
from .loss import iou_aware_bce_spec
from .matcher import DACMatcher

__all__ = ["DACBranch"]


class DACBranch(nn.Module):
    """DAC-DETR's C-branch: the decoder without self-attention, trained one-to-many.

    Same initial queries (content, position, reference points) as the one-to-one O-branch, or, with
    C_INPUT_FROM_O_SELF_ATTN (the official code), the O-branch's layer-0 self-attention output as the
    content. Each branch refines its own boxes. Losses of every decoder layer (AUX_LOSS) are
    normalised by num_boxes * LOSS_NORM_FACTOR and named "dac_loss_*".
    """

    @configurable
    def __init__(
        self,
        *,
        matcher: DACMatcher,
        aux_loss: bool = True,
        loss_norm_factor: float = 3.0,
        match_against_o_boxes: bool = False,
        c_input_from_o_self_attn: bool = False,
        classification: Optional[ClassificationLossSpec] = None,
    ):
        """`classification`: the C-branch's classification loss (None: the criterion's focal loss)."""
        super().__init__()
        self.matcher = matcher
        self.aux_loss = aux_loss
        self.loss_norm_factor = loss_norm_factor
        self.match_against_o_boxes = match_against_o_boxes
        self.c_input_from_o_self_attn = c_input_from_o_self_attn
        self.classification = classification

    @classmethod
    def from_config(cls, cfg, level_strides=None):
        m = cfg.MODEL.HYBRID_DETR
        dac = m.DAC
        return {
            "matcher": DACMatcher(
                dac.MATCH_IOU_WEIGHT,
                dac.MATCH_CLS_WEIGHT,
                dac.SCORE_THRESHOLD,
                dac.TOPK_PER_GT,
                dac.MAX_POSITIVES,
                dac.CAP_SAMPLING,
            ),
            "aux_loss": m.AUX_LOSS,
            "loss_norm_factor": dac.LOSS_NORM_FACTOR,
            "match_against_o_boxes": dac.MATCH_AGAINST_O_BOXES,
            "c_input_from_o_self_attn": dac.C_INPUT_FROM_O_SELF_ATTN,
            "classification": iou_aware_bce_spec(cfg),
        }

    def c_queries(self, inputs: BranchInputs) -> QueryGroup:
        """The C-branch's queries: the O-branch's initial queries (optionally with the O-branch's
        layer-0 self-attention output as content)."""
        if not self.c_input_from_o_self_attn:
            return inputs.queries
        if not inputs.one_to_one.self_attn_outputs:
            raise ValueError("DAC C_INPUT_FROM_O_SELF_ATTN needs the O-branch's layer-0 self-attention output")
        return dataclasses.replace(inputs.queries, content=inputs.one_to_one.self_attn_outputs[0])

    def forward(self, inputs: BranchInputs):
        c_out = inputs.decoder(self.c_queries(inputs), inputs.memory, skip_self_attn=True)
        o_boxes = inputs.one_to_one.boxes
        targets = inputs.targets

        def assign(layer, logits, boxes):
            return self.matcher(logits, o_boxes[layer] if self.match_against_o_boxes else boxes, targets)

        return inputs.criterion.decoder_losses(
            c_out,
            targets,
            assign,
            inputs.num_boxes * self.loss_norm_factor,
            prefix="dac_",
            aux_loss=self.aux_loss,
            classification=self.classification,
        )


# With CLS_LOSS "iou_aware_bce" the release trains the one-to-one (O) queries with that loss too.
register_decoder_mode("dac", training_branch=DACBranch, one_to_one_classification=iou_aware_bce_spec)
