"""What kind of official checkpoint a state dict looks like, from a few marker keys, so that a
converter given the wrong file names what it expected and what it found."""
from typing import Dict

import torch

__all__ = ["describe_kind"]


def describe_kind(state_dict: Dict[str, torch.Tensor]) -> str:
    """A short description of the model a state dict most likely belongs to."""
    keys = set(state_dict)
    if any(k.startswith("query_head.") for k in keys):
        aux = sorted({k.split(".")[0] for k in keys if k.split(".")[0] in ("rpn_head", "roi_head", "bbox_head")})
        # Co-DINO's query head (CoDINOHead): DINO's decoder (ref_point_head) and a denoising label embedding.
        kind = "Co-DINO" if "query_head.label_embedding.weight" in keys else "Co-DETR"
        return f"an mmdet {kind} checkpoint (query_head.*" + (", " + ", ".join(f"{a}.*" for a in aux) if aux else "") + ")"
    if any(k.startswith(("neck.", "bbox_head.", "roi_head.")) for k in keys):
        return "an mmdet checkpoint of another detector (neck.* / *_head.* keys, no query_head.*)"
    if "transformer.level_embed" in keys:
        if "transformer.decoder.ref_point_head.layers.0.weight" in keys:
            from .swin import swin_layout  # noqa: E402  (swin.py imports this module)

            levels = {k.split(".")[1] for k in keys if k.startswith("input_proj.")}
            swin = ", Swin backbone" if swin_layout(state_dict, "backbone.0.") else ""
            return f"a DINO checkpoint ({len(levels)} scales{swin})"
        if "label_enc.weight" in keys:
            from .swin import swin_layout  # noqa: E402  (swin.py imports this module)

            swin = ", Swin backbone" if swin_layout(state_dict, "backbone.0.body.") else ""
            return f"a DAC-DETR (DINO-style, CDN label_enc) checkpoint{swin}"
        two_stage = "transformer.enc_output.weight" in keys
        refine = "transformer.decoder.bbox_embed.0.layers.0.weight" in keys
        variant = "++ two-stage" if two_stage else ("+ box refinement" if refine else "plain")
        return f"a Deformable DETR ({variant}) checkpoint"
    from .swin import swin_layout  # noqa: E402  (swin.py imports this module)

    for prefix, what in (("", "a Swin Transformer checkpoint"), ("backbone.", "a checkpoint with a Swin backbone")):
        layout = swin_layout(state_dict, prefix)
        if layout:
            return f"{what} ({layout} layout)"
    return f"an unknown model ({len(keys)} keys, e.g. {sorted(keys)[:3]})"
