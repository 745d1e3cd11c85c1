"""DINO's contrastive denoising (Zhang et al., "DINO: DETR with Improved DeNoising Anchor Boxes for
End-to-End Object Detection", ICLR 2023), as DECODER_MODE "dn".

During training, noised copies of the ground-truth boxes and labels join the one-to-one decoder
pass as extra queries (positives, trained to reconstruct their gt; negatives, trained as background),
kept apart by the attention mask; inference never sees them. It composes: "dn+dac" (DAC-DETR's
release), "dn+co_detr" (Co-DINO), "dn+smca".

- `config.py`: its config keys (`add_dn_config`);
- `denoising.py`: the groups, their noise and their attention mask (`denoising_groups`);
- `hook.py`: `DenoisingQueries`, the main-pass hook (queries in, losses out);
- `explain.py`: its view in `tools/explain.py`.
"""
from ..modes import register_decoder_mode
from .config import add_dn_config
from .denoising import DenoisingGroups, denoising_groups, num_denoising_groups
from .explain import explain_view
from .hook import DenoisingQueries

__all__ = ["DenoisingQueries", "DenoisingGroups", "denoising_groups", "num_denoising_groups", "add_dn_config"]

register_decoder_mode("dn", add_config=add_dn_config, main_pass=DenoisingQueries, explain_view=explain_view)
