from .meta_arch import BranchInputs, HybridDETR  # noqa: F401  (registers the meta-architecture)
from .modes import CROSS_ATTENTION_REGISTRY, TRAINING_BRANCH_REGISTRY, parse_decoder_mode  # noqa: F401
from .dac import DACBranch  # noqa: F401  (registers DECODER_MODE "dac")
from . import smca  # noqa: F401  (registers SMCACrossAttention)
from .co_detr import CoDETRBranch  # noqa: F401  (registers DECODER_MODE "co_detr")
