"""HybridDETR: DAC-DETR, SMCA and Co-DETR decoders on a Deformable-DETR transformer, for detectron2.

Importing the package registers the `HybridDETR` meta-architecture and the embedded synthetic
dataset with detectron2.

The op layer (`hybrid_detr.layers`: MSDeformAttn and its compiled op) needs torch alone, so the
package imports without detectron2 too; then only the layers are usable, and any other name of the
package raises an ImportError that says how to install detectron2.

The compiled op library is built as `hybrid_detr.layers._C`; `hybrid_detr._C` names the same module.
"""
import sys as _sys

__version__ = "0.1.0"

from . import layers as _layers  # noqa: E402  (torch only)

if getattr(_layers, "_C", None) is not None:  # absent when the extension is not built
    _C = _layers._C
    # `import hybrid_detr._C` finds it here (an alias, never a second load of the library, which
    # would register the ops twice).
    _sys.modules[__name__ + "._C"] = _C

try:
    import detectron2  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    _DETECTRON2_MISSING = e
else:
    _DETECTRON2_MISSING = None
    from .config import add_hybrid_detr_config  # noqa: F401,E402
    from . import modeling  # noqa: F401,E402  (registers the HybridDETR meta-architecture)
    from . import data  # noqa: F401,E402  (registers hybrid_synthetic_train / hybrid_synthetic_val)


def __getattr__(name):
    # Reached only for names not set above: without detectron2, everything but the layers.
    if _DETECTRON2_MISSING is not None and not name.startswith("_"):
        raise ImportError(
            f"hybrid_detr.{name} needs detectron2 (only hybrid_detr.layers works without it). Run "
            "`bash tools/bootstrap.sh` from the repository root, or install it yourself: "
            "`pip install 'git+https://github.com/facebookresearch/detectron2.git'`."
        ) from _DETECTRON2_MISSING
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
