"""Every key name and shape of the official DAC-DETR and Co-DETR (Co-Deformable-DETR) checkpoints,
written from their model definitions (no official code and no download at test time), for the
converter tests."""
from typing import List, Tuple

from official_keys import Shape, deformable_detr_keys


def dac_detr_keys(d=256, ffn=2048, layers=6, queries=900, classes=91) -> List[Tuple[str, Shape]]:
    """DAC-DETR's release (models/deformable_detr.py DeformableDETR, H-DETR-style, built with
    --two_stage --with_box_refine --mixed_selection --dim_feedforward 2048 --num_queries_one2one 900):
    the Deformable DETR ++ two-stage layout, plus mixed selection's content queries (query_embed,
    (Q, d)) and CDN's label embedding (label_enc, 91 + 1 slots; dn_components.py has no parameter)."""
    keys = deformable_detr_keys("two_stage", d=d, ffn=ffn, layers=layers, queries=queries, classes=classes)
    keys += [("query_embed.weight", (queries, d)), ("label_enc.weight", (classes + 1, d))]
    return keys
