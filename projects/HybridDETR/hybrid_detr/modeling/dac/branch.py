"""DAC-DETR's training branch ("dac" in DECODER_MODE): the C-decoder, i.e. the shared decoder
called without self-attention, fed the one-to-one queries and trained one-to-many."""
import dataclasses

from detectron2.config import configurable
from torch import nn

from ..modes import BranchInputs, register_decoder_mode
from ..query_groups import decode_groups
from ..transformer import DecoderOutput, QueryGroup
from .config import add_dac_config
from .explain import explain_view
from .loss import iou_aware_bce_spec
from .matcher import DACMatcher

__all__ = ["DACBranch"]


class DACBranch(nn.Module):
    """DAC-DETR's C-branch: the decoder without self-attention, trained one-to-many.

    Same initial queries (content, position, reference points) as the one-to-one O-branch, or, with
    C_INPUT_FROM_O_SELF_ATTN (the official code), the O-branch's layer-0 self-attention output as the
    content. Each branch refines its own boxes. Losses of every decoder layer (AUX_LOSS) are
    normalised by num_boxes * LOSS_NORM_FACTOR and named "dac_loss_*"; the classification loss is
    the decoder's (the criterion's: IoU-aware BCE with CLS_LOSS "iou_aware_bce", else focal).
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
        run_extra_queries: bool = True,
    ):
        """`run_extra_queries`: the C-decoder also runs the queries main-pass hooks added to the O
        pass (DINO's denoising queries), each trained with its hook's losses, named "dac_<name>"."""
        super().__init__()
        self.matcher = matcher
        self.aux_loss = aux_loss
        self.loss_norm_factor = loss_norm_factor
        self.match_against_o_boxes = match_against_o_boxes
        self.c_input_from_o_self_attn = c_input_from_o_self_attn
        self.run_extra_queries = run_extra_queries

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
            "run_extra_queries": dac.C_RUNS_EXTRA_QUERIES,
        }

    def c_queries(self, queries: QueryGroup, one_to_one: DecoderOutput) -> QueryGroup:
        """The C-branch's queries: the O-branch's initial `queries` (optionally with the O-branch's
        layer-0 self-attention output, from its output `one_to_one`, as content)."""
        if not self.c_input_from_o_self_attn:
            return queries
        if not one_to_one.self_attn_outputs:
            raise ValueError("DAC C_INPUT_FROM_O_SELF_ATTN needs the O-branch's layer-0 self-attention output")
        return dataclasses.replace(queries, content=one_to_one.self_attn_outputs[0])

    def forward(self, inputs: BranchInputs):
        c_queries = self.c_queries(inputs.queries, inputs.one_to_one)
        extras = inputs.extras if self.run_extra_queries else {}
        if extras:
            # The release's C-decoder runs every query of the O pass, denoising ones included
            # (deformable_transformer.py: `output_cdecoder = tgt`); without self-attention they
            # cannot interact, so one pass over all groups is the same as one per group.
            groups = [self.c_queries(extra.group, output) for _, extra, output in extras.values()] + [c_queries]
            outputs = decode_groups(inputs.decoder, groups, inputs.memory, skip_self_attn=True)
            c_out = outputs[-1]
        else:
            c_out = inputs.decoder(c_queries, inputs.memory, skip_self_attn=True)
        o_boxes = inputs.one_to_one.boxes
        targets = inputs.targets

        def assign(layer, logits, boxes):
            return self.matcher(logits, o_boxes[layer] if self.match_against_o_boxes else boxes, targets)

        losses = inputs.criterion.decoder_losses(
            c_out,
            targets,
            assign,
            inputs.num_boxes * self.loss_norm_factor,
            prefix="dac_",
            aux_loss=self.aux_loss,
        )
        # Each hook's queries in the C pass get that hook's own losses (the release's "_dn" terms
        # of the C-decoder, normalised as the O-decoder's).
        for (hook, extra, _), output in zip(extras.values(), outputs if extras else []):
            losses.update({f"dac_{k}": v for k, v in hook.losses(inputs.main_pass_inputs, extra, output).items()})
        return losses


# With CLS_LOSS "iou_aware_bce" the release trains both branches with that loss: it becomes the
# decoder's classification loss, which the C-branch uses too.
register_decoder_mode(
    "dac", add_config=add_dac_config, training_branch=DACBranch, one_to_one_classification=iou_aware_bce_spec,
    explain_view=explain_view,
)
