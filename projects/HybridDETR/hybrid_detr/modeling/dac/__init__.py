"""DAC-DETR (Hu et al., "DAC-DETR: Divide the Attention Layers and Conquer", NeurIPS 2023).

The decoder's self-attention (which pushes queries apart, suiting one-to-one matching) and its
cross-attention (which gathers queries on objects) pull training in opposite directions. DAC-DETR
adds a *C-decoder* during training: the same decoder layers and prediction heads with every
self-attention removed, fed the same queries, trained with a one-to-many assignment. Inference runs
the ordinary decoder (the "O-decoder") alone.

This package holds the whole idea:
- `matcher.py`, `DACMatcher`: the one-to-many assignment of the C-branch, batched over images;
- `loss.py`, `IoUAwareBCELoss`: Align-DETR's IoU-aware classification loss used by the official release
  (the paper's "*" rows), an optional classification loss of the C-branch;
- `branch.py`, `DACBranch`: the training branch ("dac" in DECODER_MODE) that runs the C-decoder through the
  shared `DeformableDecoder` (`skip_self_attn=True`) and returns its "dac_"-prefixed losses.

It adds no parameters: the C-decoder *is* the decoder, called without self-attention.
"""
from .branch import DACBranch  # noqa: E402  (registers DECODER_MODE "dac")
from .config import add_dac_config  # noqa: E402
from .loss import IoUAwareBCELoss  # noqa: E402
from .matcher import DACMatcher  # noqa: E402

__all__ = ["DACBranch", "DACMatcher", "IoUAwareBCELoss", "add_dac_config"]
