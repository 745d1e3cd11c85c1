"""Several query groups in one decoder pass: side by side along the query dim, kept apart (or
not) by the self-attention mask, and their outputs split back out.

Used by Co-DETR (its K positive-query groups in one pass) and by the main-pass hooks of the
modes (extra groups, e.g. denoising queries, that join the one-to-one pass). Who may attend to
whom is a (G, G) boolean "sees" matrix between groups; a group's own `self_attn_mask` and
`padding_mask` are kept inside its block.
"""
from typing import List, Optional, Sequence

import torch

from .transformer import DecoderOutput, QueryGroup

__all__ = ["concat_groups", "split_decoder_output", "block_diagonal_sees", "decode_groups"]


def block_diagonal_sees(num_groups: int) -> torch.Tensor:
    """Each group sees itself only."""
    return torch.eye(num_groups, dtype=torch.bool)


def concat_groups(groups: Sequence[QueryGroup], sees: Optional[torch.Tensor] = None) -> QueryGroup:
    """The groups side by side (in order) as one QueryGroup.

    `sees[i, j]`: queries of group i may attend to queries of group j (default: each group only
    itself). The result's `self_attn_mask` (Q, Q) is True where attention is blocked, or None when
    nothing is (one group without a mask of its own); its `padding_mask` (N, Q) is None when no
    group has padding."""
    groups = list(groups)
    if sees is None:
        sees = block_diagonal_sees(len(groups))
    if tuple(sees.shape) != (len(groups), len(groups)):
        raise ValueError(f"concat_groups: `sees` must be ({len(groups)}, {len(groups)}), got {tuple(sees.shape)}")
    sizes = [g.content.shape[1] for g in groups]
    device = groups[0].content.device
    self_attn_mask = None
    if len(groups) > 1 or groups[0].self_attn_mask is not None:
        group_id = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
        self_attn_mask = ~sees.to(device)[group_id[:, None], group_id[None, :]]
        start = 0
        for group, size in zip(groups, sizes):
            if group.self_attn_mask is not None:
                block = self_attn_mask[start : start + size, start : start + size]
                self_attn_mask[start : start + size, start : start + size] = block | group.self_attn_mask
            start += size
    padding_mask = None
    if any(g.padding_mask is not None for g in groups):
        n = groups[0].content.shape[0]
        padding_mask = torch.cat(
            [
                g.padding_mask if g.padding_mask is not None else torch.zeros(n, s, dtype=torch.bool, device=device)
                for g, s in zip(groups, sizes)
            ],
            1,
        )
    return QueryGroup(
        torch.cat([g.content for g in groups], 1),
        torch.cat([g.position for g in groups], 1),
        torch.cat([g.reference for g in groups], 1),
        self_attn_mask=self_attn_mask,
        padding_mask=padding_mask,
    )


def split_decoder_output(
    output: DecoderOutput, sizes: Sequence[int], padding_masks: Optional[Sequence[Optional[torch.Tensor]]] = None
) -> List[DecoderOutput]:
    """The per-group outputs of a decoder pass over `concat_groups` (self-attention outputs
    included); `padding_masks` (one per group, or None) are attached to them for the losses."""
    sizes = list(sizes)
    padding_masks = list(padding_masks) if padding_masks is not None else [None] * len(sizes)
    self_attn = [t.split(sizes, dim=1) for t in output.self_attn_outputs]  # per layer, per group
    return [
        DecoderOutput(
            logits,
            boxes,
            hidden,
            tuple(layer[i] for layer in self_attn),
            padding_mask=padding_masks[i],
        )
        for i, (logits, boxes, hidden) in enumerate(
            zip(output.logits.split(sizes, dim=2), output.boxes.split(sizes, dim=2), output.hidden.split(sizes, dim=2))
        )
    ]


def decode_groups(decoder, groups: Sequence[QueryGroup], memory, sees: Optional[torch.Tensor] = None, **decoder_kwargs):
    """One decoder pass over `groups` side by side (`concat_groups` with `sees`), the output split back
    per group, each with its group's padding mask. `decoder_kwargs` go to the decoder (e.g. skip_self_attn)."""
    groups = list(groups)
    output = decoder(concat_groups(groups, sees), memory, **decoder_kwargs)
    return split_decoder_output(output, [g.content.shape[1] for g in groups], [g.padding_mask for g in groups])
