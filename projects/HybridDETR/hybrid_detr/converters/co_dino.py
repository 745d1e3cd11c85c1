"""The official Co-DETR release's Co-DINO R-50 (Sense-X/Co-DETR,
`projects/configs/co_dino/co_dino_5scale_r50_1x_coco.py`, mmdet 2.x, `co_dino_5scale_r50_1x_coco.pth`)
-> HybridDETR, query head only (what the official model runs at inference, `eval_module='detr'`), with
DECODER_MODE "dn" (its denoising label embedding kept for fine-tuning).

Key names as in the official model definitions, read from a model built from them (`projects/models/
co_detr.py` CoDETR, `co_dino_head.py` CoDINOHead, `transformer.py` CoDinoTransformer and
DinoTransformerDecoder, mmdet 2.x ResNet / ChannelMapper, mmcv 1.x transformer layers). What Co-DINO
shares with Co-Deformable-DETR is converted by the `co_detr` converter (`co_detr.py`: mmdet's ResNet-50
-> detectron2's, the ChannelMapper (here four 1x1 convs on C2-C5 + one 3x3 stride-2 conv on C5) ->
`neck.*`, the mmcv encoder / decoder layers, `enc_output(_norm)`, one class / box head per decoder layer
plus the encoder's, `query_head.cls_branches.{0..6}` / `reg_branches.{0..6}`, 80 classes as they are);
its drop list covers Co-DINO's auxiliary parts too. Co-DINO's own keys:

- `query_head.transformer.query_embed.weight` (900, 256): the content queries of mixed selection
  (CoDinoTransformer.init_layers, transformer.py:573; Co-Deformable-DETR's `query_head.query_embedding`)
  -> `query_source.content.weight`;
- `query_head.transformer.decoder.ref_point_head.{0,2}` (Linear 2d->d, ReLU, Linear d->d; transformer.py:465)
  -> `decoder.ref_point_head.layers.{0,1}` (QUERY_POSITION_FROM_REFERENCE);
- `query_head.transformer.decoder.norm` (transformer.py:467) -> `decoder.norm` (DECODER_FINAL_NORM);
- `query_head.label_embedding.weight` (80, 256): the denoising queries' label embedding
  (co_dino_head.py:46, `cls_out_channels` rows = 80 classes in mmdet's contiguous order = detectron2's)
  -> `main_passes.dn.label_embedding.weight` (81 rows: DN.LABELBOOK_SIZE 0 = NUM_CLASSES, + 1), the
  80 rows as they are, then a zero row: ours has one more row, which is never looked up (noised labels
  are drawn in [0, 80) in both, query_denoising.py:121; padding slots get zero content).

Dropped (training only, not run at inference): `rpn_head.*`, `roi_head.0.bbox_head.*` (Faster R-CNN),
`bbox_head.0.*` (ATSS), `query_head.downsample.*` (the adapter's extra level), and the positive queries'
projections `query_head.transformer.aux_pos_trans.{0,1}` (Linear 2d->d) / `aux_pos_trans_norm.{0,1}`
(LayerNorm d): Co-DINO's positive-query embedding (with_coord_feat False, no head embedding) has no
counterpart in our Co-DETR branch (Linear 2d->2d + LayerNorm 2d, a feature term, a per-head embedding),
so they could not be loaded there either. Any other key (a mask head, a Swin backbone) is refused.

The LSJ R-50 variants (`co_dino_5scale_lsj_r50_*`) have the same keys but were trained and are evaluated
without padding masks (`with_attn_mask=False`); the 9-encoder-layer ones do not fit the config.
"""
from typing import Dict

import torch

from .co_detr import convert_co_detr
from .common import Conversion, ConversionError, register_converter
from .kinds import describe_kind

__all__ = ["convert_co_dino", "CONFIG"]

CONFIG = "coco/co_dino_r50_12ep_query_head.yaml"
DESCRIPTION = (
    "Co-DINO R-50 1x, 5 scales (Co-DETR release), query head only: DINO's architecture (900 queries, FFN 2048, "
    "two-stage + box refinement, mixed selection, look-forward-twice, positions from the reference boxes, final "
    "decoder norm) with a head per decoder layer, and its denoising label embedding"
)
_Q = "query_head."
_T = "query_head.transformer."
# Keys only Co-DINO's query head has (CoDinoTransformer, DinoTransformerDecoder, CoDINOHead).
_MARKERS = (
    _T + "query_embed.weight",
    _T + "decoder.ref_point_head.0.weight",
    _T + "decoder.norm.weight",
    _Q + "label_embedding.weight",
    _T + "enc_output.weight",
)
_DECODER_EXTRAS = {  # Co-DINO's decoder modules -> ours
    _T + "decoder.ref_point_head.0.": "decoder.ref_point_head.layers.0.",
    _T + "decoder.ref_point_head.2.": "decoder.ref_point_head.layers.1.",
    _T + "decoder.norm.": "decoder.norm.",
}


@register_converter("co_dino")
def convert_co_dino(official: Dict[str, torch.Tensor]) -> Conversion:
    """An official Co-DINO R-50 (mmdet 2.x) state dict -> HybridDETR's query head with denoising (DECODER_MODE dn)."""
    missing = [k for k in _MARKERS if k not in official]
    if missing:
        raise ConversionError(
            "expected an mmdet Co-DINO checkpoint (CoDINOHead: query_head.transformer.query_embed, "
            "query_head.transformer.decoder.ref_point_head / norm, query_head.label_embedding), found "
            f"{describe_kind(official)}: {', '.join(missing)} missing"
        )
    out: Dict[str, torch.Tensor] = {}
    own = set()
    for source, target in _DECODER_EXTRAS.items():
        for key in [k for k in official if k.startswith(source)]:
            out[target + key[len(source):]] = official[key]
            own.add(key)
    if len(out) != 6:
        raise ConversionError(
            f"co_dino checkpoint: expected the decoder's ref_point_head (2 Linear layers) and norm, found "
            f"{sorted(own)}"
        )
    content = official[_T + "query_embed.weight"]
    label_embedding = official[_Q + "label_embedding.weight"]
    d_model = content.shape[-1]
    if label_embedding.dim() != 2 or tuple(label_embedding.shape) != (80, d_model):
        raise ConversionError(
            f"co_dino checkpoint: query_head.label_embedding.weight has shape {tuple(label_embedding.shape)}, "
            f"expected (80, {d_model}) (one row per COCO class)"
        )
    own.update((_T + "query_embed.weight", _Q + "label_embedding.weight"))

    # The rest is laid out as Co-Deformable-DETR's query head, whose mixed-selection content queries are
    # `query_head.query_embedding` (the same (Q, d) embedding).
    shared = {k: v for k, v in official.items() if k not in own}
    shared[_Q + "query_embedding.weight"] = content
    try:
        base = convert_co_detr(shared)
    except ConversionError as e:
        raise ConversionError(f"co_dino checkpoint (the part laid out as Co-Deformable-DETR's): {e}") from None
    state_dict = {**base.state_dict, **{k: v.detach().clone() for k, v in out.items()}}
    state_dict["main_passes.dn.label_embedding.weight"] = torch.cat(
        (label_embedding.detach(), label_embedding.new_zeros(1, d_model))
    )
    # The shared part's notes, less the two that read differently here.
    notes = [n for n in base.notes if not n.startswith(("class branches", "query_head.query_embedding"))]
    notes += [
        "class branches: mmdet's 80 contiguous COCO classes = detectron2's (no remapping); proposals ranked by their "
        "best class (TWO_STAGE_RANKING max_class, transformer.py:663)",
        "query_head.transformer.query_embed -> mixed selection's learned content queries (query_source.content)",
        "decoder ref_point_head and final norm -> decoder.ref_point_head / decoder.norm (DINO's decoder)",
        "query_head.label_embedding (80 classes) -> main_passes.dn.label_embedding (80 rows + a zero row, never "
        "looked up): fine-tuning trains with denoising as the release did",
    ]
    return Conversion(state_dict, CONFIG, DESCRIPTION, notes)
