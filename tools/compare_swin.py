#!/usr/bin/env python
"""Our Swin backbone against the official detection Swins, on seeded random weights.

    PYTHONPATH=/path/to/mmcv-1.7.0 python tools/compare_swin.py --official-src /path/to/Co-DETR
    python tools/compare_swin.py --official-src /path/to/Co-DETR --layouts swin_v1 --arch large

For each layout it builds the official module from the checkout (nothing of it is copied here):
- swin_v1: Co-DETR `projects/models/swin_transformer.py` SwinTransformerV1 (Co-DINO / Co-Deformable-DETR's Swin;
  the same layout as Microsoft's Swin, DINO's and DAC-DETR's);
- mmdet: Co-DETR's mmdet 2.x `mmdet/models/backbones/swin.py` SwinTransformer (+ mmdet/models/utils/transformer.py),
fills every parameter with seeded random values, converts its state dict (as a detector's `backbone.*`)
with `hybrid_detr.converters.swin`, loads it strictly into our backbone of the same architecture and
compares the four output stages on images of sizes that are not multiples of the windows.

Needs mmcv 1.x's Python package importable (e.g. PYTHONPATH with the unpacked `mmcv==1.7.0` sdist plus
addict and yapf): its compiled ops are stubbed (`mmcv._ext`), and mmdet's registry / logger modules and
`mmcv_custom` are replaced by stand-ins at import time (the backbones use them for registration and
pretrained loading only). Exit status 1 when any output differs by more than --tolerance.
"""
import argparse
import importlib.util
import os
import sys
import types

import torch
from torch import nn

try:
    import hybrid_detr  # noqa: F401
except ImportError as error:
    sys.exit(f"cannot import hybrid_detr ({error}): run `bash tools/bootstrap.sh`")

from detectron2.modeling import build_backbone  # noqa: E402

from hybrid_detr.config import get_hybrid_detr_cfg  # noqa: E402
from hybrid_detr.converters.common import StateDictReader  # noqa: E402
from hybrid_detr.converters.swin import convert_swin_backbone  # noqa: E402
from hybrid_detr.modeling.backbones import add_swin_config  # noqa: E402

ARCHS = {  # embed dim, depths, heads, window, timm name
    "tiny": (32, [2, 2, 2, 2], [1, 2, 4, 8], 7, "swin_tiny_patch4_window7_224"),
    "large": (192, [2, 2, 18, 2], [6, 12, 24, 48], 12, "swin_large_patch4_window12_384"),
}
SIZES = [(2, 97, 141), (1, 224, 224), (1, 123, 45), (1, 200, 333)]


def _package(name: str, path=None):
    module = types.ModuleType(name)
    module.__path__ = [path] if path else []
    sys.modules[name] = module
    return module


def _load_file(name: str, path: str):
    if not os.path.isfile(path):
        sys.exit(f"{path}: not found; is --official-src a Co-DETR checkout (Sense-X/Co-DETR)?")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_official(src: str):
    """{layout: official Swin class}, imported from the checkout with stand-ins for what they only register with."""
    ext = types.ModuleType("mmcv._ext")  # compiled ops: never called by the backbones

    def compiled_op(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def stub(*args, **kwargs):
            raise NotImplementedError(f"mmcv._ext.{name} is stubbed out by tools/compare_swin.py")

        return stub

    ext.__getattr__ = compiled_op
    sys.modules.setdefault("mmcv._ext", ext)
    try:
        import mmcv  # noqa: F401
        from mmcv.runner import BaseModule  # noqa: F401
    except ImportError as e:
        sys.exit(f"mmcv 1.x's Python package is not importable ({e}): put the unpacked mmcv==1.7.0 sdist on PYTHONPATH")

    class _Registry:
        def register_module(self, *args, **kwargs):
            return lambda cls: cls

    mmdet_dir = os.path.join(src, "mmdet")
    _package("mmdet", mmdet_dir)
    _package("mmdet.models", os.path.join(mmdet_dir, "models"))
    _package("mmdet.models.backbones", os.path.join(mmdet_dir, "models", "backbones"))
    _package("mmdet.models.utils", os.path.join(mmdet_dir, "models", "utils"))
    builder = types.ModuleType("mmdet.models.builder")
    builder.BACKBONES = _Registry()
    sys.modules["mmdet.models.builder"] = builder
    utils = _package("mmdet.utils")
    import logging

    utils.get_root_logger = lambda *a, **k: logging.getLogger("official")
    # mmdet/models/utils/transformer.py imports fairscale's checkpoint wrapper (its DETR layers only) and
    # mmdet.models.utils.builder's TRANSFORMER registry.
    _package("fairscale")
    _package("fairscale.nn")
    _package("fairscale.nn.checkpoint").checkpoint_wrapper = lambda module, *a, **k: module
    _package("mmdet.models.utils.builder").TRANSFORMER = _Registry()
    custom = _package("mmcv_custom")
    custom.load_checkpoint = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("pretrained loading is stubbed"))

    v1 = _load_file("official_swin_v1", os.path.join(src, "projects", "models", "swin_transformer.py"))
    _load_file("mmdet.models.utils.ckpt_convert", os.path.join(mmdet_dir, "models", "utils", "ckpt_convert.py"))
    _load_file("mmdet.models.utils.transformer", os.path.join(mmdet_dir, "models", "utils", "transformer.py"))
    mm = _load_file("mmdet.models.backbones.swin", os.path.join(mmdet_dir, "models", "backbones", "swin.py"))
    return {"swin_v1": v1.SwinTransformerV1, "mmdet": mm.SwinTransformer}


def build_official(cls, layout: str, arch: str) -> nn.Module:
    embed, depths, heads, window, _ = ARCHS[arch]
    if layout == "swin_v1":
        model = cls(embed_dim=embed, depths=depths, num_heads=heads, window_size=window, drop_path_rate=0.0, out_indices=(0, 1, 2, 3))
    else:
        model = cls(embed_dims=embed, depths=depths, num_heads=heads, window_size=window, drop_path_rate=0.0, out_indices=(0, 1, 2, 3))
    model.eval()  # (SwinTransformerV1.train returns None)
    return model


def randomize(model: nn.Module, seed: int):
    """Every parameter seeded random (norm scales around 1), so that no layer is an identity or a zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            value = torch.randn(parameter.shape, generator=generator) * 0.05
            if parameter.dim() == 1 and "norm" in name and name.endswith("weight"):
                value += 1.0
            if name.endswith("relative_position_bias_table"):
                value *= 10  # a bias that matters
            parameter.copy_(value)


def build_ours(arch: str) -> nn.Module:
    embed, depths, heads, window, timm_name = ARCHS[arch]
    cfg = get_hybrid_detr_cfg()
    add_swin_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_swin_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.SWIN.ARCH = timm_name
    cfg.MODEL.SWIN.EMBED_DIM, cfg.MODEL.SWIN.DEPTHS, cfg.MODEL.SWIN.NUM_HEADS, cfg.MODEL.SWIN.WINDOW_SIZE = embed, depths, heads, window
    cfg.MODEL.SWIN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.0
    return build_backbone(cfg).eval()


def compare(official_cls, layout: str, arch: str, seed: int) -> float:
    torch.manual_seed(seed)
    official = build_official(official_cls, layout, arch)
    randomize(official, seed)
    state = {"backbone." + k: v for k, v in official.state_dict().items()}
    reader = StateDictReader(state, f"official {layout}")
    converted = {}
    convert_swin_backbone(reader, "backbone.", converted)
    reader.check_all_used()
    ours = build_ours(arch)
    ours.load_state_dict({k[len("backbone."):]: v for k, v in converted.items()}, strict=True)
    worst = 0.0
    generator = torch.Generator().manual_seed(seed + 1)
    for batch, height, width in SIZES:
        images = torch.randn(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = official(images)
            found = ours(images)
        for index, name in enumerate(("res2", "res3", "res4", "res5")):
            if expected[index].shape != found[name].shape:
                print(f"  {layout} {arch} {height}x{width} {name}: shape {tuple(found[name].shape)}, official {tuple(expected[index].shape)}")
                return float("inf")
            difference = (expected[index] - found[name]).abs().max().item()
            worst = max(worst, difference)
        print(f"  {layout:8s} {arch:6s} {batch}x3x{height}x{width}: max |ours - official| over 4 stages = {worst:.2e}")
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-src", required=True, help="a Sense-X/Co-DETR checkout")
    parser.add_argument("--layouts", nargs="+", default=["swin_v1", "mmdet"], choices=["swin_v1", "mmdet"])
    parser.add_argument("--arch", nargs="+", default=["tiny"], choices=sorted(ARCHS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    classes = import_official(os.path.abspath(args.official_src))
    failed = []
    for layout in args.layouts:
        for arch in args.arch:
            worst = compare(classes[layout], layout, arch, args.seed)
            if not worst <= args.tolerance:
                failed.append(f"{layout}/{arch} ({worst:.2e})")
    if failed:
        print(f"FAILED (> {args.tolerance}): {', '.join(failed)}")
        return 1
    print(f"all outputs within {args.tolerance} of the official modules (converted weights loaded strictly)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
