"""Co-DETR: collaborative hybrid assignments training (DECODER_MODE "co_detr").

One file per idea: `config.py` (its config keys), `adapter.py` (multi-scale adapter over the encoder memory), `atss.py` (ATSS
head + assigner), `rcnn_head.py` (detectron2's Faster R-CNN heads on the adapter),
`positive_queries.py` (customized positive queries), `branch.py` (the training branch).
"""
from .branch import CoDETRBranch  # registers DECODER_MODE "co_detr"
from .config import add_co_detr_config

__all__ = ["CoDETRBranch", "add_co_detr_config"]
