"""HybridDETR: DAC-DETR, SMCA and Co-DETR decoders on a Deformable-DETR transformer, for detectron2.

Importing the package registers the `HybridDETR` meta-architecture and the embedded synthetic
dataset with detectron2.
"""
__version__ = "0.1.0"

try:
    import detectron2  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "hybrid_detr needs detectron2. Run `bash tools/bootstrap.sh` from the repository root, or "
        "install it yourself: `pip install 'git+https://github.com/facebookresearch/detectron2.git'`."
    ) from e

from .config import add_hybrid_detr_config  # noqa: F401,E402
from . import modeling  # noqa: F401,E402  (registers the HybridDETR meta-architecture)
from . import data  # noqa: F401,E402  (registers hybrid_synthetic_train / hybrid_synthetic_val)
