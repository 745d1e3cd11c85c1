"""Configs shipped with HybridDETR, by name, in the way `detectron2.model_zoo` serves detectron2's.

Names are paths relative to the repository's `configs/` directory, with or without ".yaml", e.g.
"coco/deformable_detr_r50_50ep.yaml" or "quickstart/deformable_detr_r18_synthetic". An installed
package finds them under `hybrid_detr/model_zoo/configs` (a link to, or copy of, `configs/` made
by setup.py); a source checkout falls back to the repository's `configs/`.

No trained weights are published yet: `trained=True` raises an error that says so.
"""
import os
from typing import List, Optional

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model

from hybrid_detr.checkpoint import HybridCheckpointer
from hybrid_detr.config import load_config
from hybrid_detr.engine.checks import check_device, check_model_values

__all__ = ["list_configs", "get_config_file", "get_config", "get"]

_HERE = os.path.dirname(os.path.abspath(__file__))
# The package's own copy first, then <repo>/configs for a checkout used without installing.
_CONFIG_ROOTS = (
    os.path.join(_HERE, "configs"),
    os.path.normpath(os.path.join(_HERE, "..", "..", "..", "..", "configs")),
)


def _config_root() -> str:
    for root in _CONFIG_ROOTS:
        if os.path.isdir(root):
            return root
    raise RuntimeError(
        "HybridDETR's configs are missing: looked in " + ", ".join(_CONFIG_ROOTS) +
        ". Reinstall the package (`pip install -e . --no-build-isolation` links them)."
    )


def list_configs() -> List[str]:
    """Names of all shipped model configs (files whose name starts with "Base-" are bases, left out)."""
    root = _config_root()
    names = []
    for dirpath, _, files in os.walk(root, followlinks=True):
        for f in files:
            if f.endswith(".yaml") and not f.startswith("Base-"):
                names.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(names)


def get_config_file(config_path: str) -> str:
    """The absolute path of a shipped config, e.g. `get_config_file("coco/deformable_detr_r50_50ep.yaml")`."""
    name = config_path if config_path.endswith(".yaml") else config_path + ".yaml"
    path = os.path.join(_config_root(), name)
    if not os.path.isfile(path):
        raise RuntimeError(
            f"{config_path} is not in HybridDETR's model zoo. Available: {', '.join(list_configs())}"
        )
    return path


def get_config(config_path: str, trained: bool = False) -> CfgNode:
    """A detectron2 config with HybridDETR's keys, merged from a shipped config file.

    `trained=True` would point MODEL.WEIGHTS at published weights; none are published yet, so it
    raises a RuntimeError (train with `train_net.py` and pass your own MODEL.WEIGHTS instead).
    """
    cfg_file = get_config_file(config_path)
    if trained:
        raise RuntimeError(
            f"No trained weights are published for {config_path}: HybridDETR's model zoo has configs "
            "only. Train one with `python projects/HybridDETR/train_net.py --config-file "
            f"{cfg_file}` and load the result with MODEL.WEIGHTS <path/to/model_final.pth>."
        )
    return load_config(cfg_file)


def get(config_path: str, trained: bool = False, device: Optional[str] = None) -> torch.nn.Module:
    """The model of a shipped config, built and loaded with the config's MODEL.WEIGHTS (for COCO
    configs: ImageNet backbone weights, downloaded by detectron2; the quickstart: none). In
    training mode, as detectron2's `model_zoo.get` returns it. `device` defaults to "cpu" when no
    GPU is visible; a weights URL that cannot be reached raises CheckpointError saying how to
    point MODEL.WEIGHTS at a local copy.
    """
    import hybrid_detr.modeling  # noqa: F401  (registers the meta-architecture)

    cfg = get_config(config_path, trained=trained)
    if device is None and not torch.cuda.is_available():
        device = "cpu"
    if device is not None:
        cfg.MODEL.DEVICE = device
    check_model_values(cfg)
    check_device(cfg)
    model = build_model(cfg)
    # Errors name the file or URL; an unreachable URL says how to use a local copy instead.
    HybridCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model
