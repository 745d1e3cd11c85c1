"""What every converter of an official checkpoint shares: a safe loader with clear errors, the
torchvision-ResNet -> detectron2-ResNet key mapping, the 91-slot COCO-id class head -> detectron2's
80 contiguous classes, a key-consumption tracker, and an atomic detectron2-checkpoint writer."""
import argparse
import os
import pickle
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from ..checkpoint import describe_non_finite, non_finite_tensors

__all__ = [
    "CONVERTERS",
    "COCO_THING_IDS",
    "Conversion",
    "ConversionError",
    "StateDictReader",
    "coco91_to_80",
    "convert_torchvision_backbone",
    "check_against_config",
    "check_finite",
    "convert_file",
    "load_official_checkpoint",
    "register_converter",
    "save_detectron2_checkpoint",
    "torchvision_resnet_to_detectron2",
]


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says what was expected and what was found."""


@dataclass
class Conversion:
    """A converted model: detectron2 state dict, and what the user needs to know about it."""

    state_dict: Dict[str, torch.Tensor]
    config_name: str  # the shipped config this checkpoint is for, e.g. "coco/deformable_detr_r50_50ep.yaml"
    description: str  # e.g. "Deformable DETR, R-50, box refinement + two-stage"
    notes: List[str] = field(default_factory=list)  # what was dropped or remapped


Converter = Callable[[Dict[str, torch.Tensor]], Conversion]
CONVERTERS: Dict[str, Converter] = {}


# Classes a converter's official files may hold besides tensors and containers (allowed when loading).
SAFE_GLOBALS: Dict[str, tuple] = {}


def register_converter(name: str, safe_globals: Iterable = ()):
    """Registers `fn(official_state_dict) -> Conversion` as the converter `name` (a subcommand of
    tools/convert_official.py). `safe_globals`: classes its files may contain, allowed by the loader."""

    def register(fn: Converter) -> Converter:
        if name in CONVERTERS:
            raise ValueError(f"converter {name!r} registered twice")
        CONVERTERS[name] = fn
        SAFE_GLOBALS[name] = tuple(safe_globals)
        return fn

    return register


def _coco_thing_ids() -> List[int]:
    """COCO category ids of the 80 thing classes, in detectron2's contiguous order."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return [c["id"] for c in COCO_CATEGORIES if c["isthing"]]


COCO_THING_IDS = _coco_thing_ids()


def coco91_to_80(tensor: torch.Tensor, first: Optional[int] = None) -> torch.Tensor:
    """Rows of a class head indexed by COCO category id (91 slots, DETR-style) -> detectron2's 80
    contiguous classes. `first` replaces the source row of class 0 (e.g. 0: a class-agnostic
    objectness channel kept in front)."""
    if tensor.shape[0] != 91:
        raise ConversionError(f"expected a 91-slot COCO class head, found {tensor.shape[0]} outputs")
    index = list(COCO_THING_IDS)
    if first is not None:
        index[0] = first
    return tensor[torch.as_tensor(index)].clone()


def torchvision_resnet_to_detectron2(name: str) -> str:
    """A torchvision ResNet parameter name (no prefix) -> detectron2's ResNet name (no prefix):
    conv1/bn1 -> stem.conv1(.norm); layerI.J.convK/bnK -> res{I+1}.J.convK(.norm);
    layerI.J.downsample.0/1 -> res{I+1}.J.shortcut(.norm)."""
    m = re.fullmatch(r"(conv1|bn1)\.(\w+)", name)
    if m:
        return "stem.conv1." + ("norm." if m.group(1) == "bn1" else "") + m.group(2)
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(conv|bn)(\d)\.(\w+)", name)
    if m:
        stage, block, kind, k, leaf = m.groups()
        return f"res{int(stage) + 1}.{block}.conv{k}." + ("norm." if kind == "bn" else "") + leaf
    m = re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.([01])\.(\w+)", name)
    if m:
        stage, block, which, leaf = m.groups()
        return f"res{int(stage) + 1}.{block}.shortcut." + ("norm." if which == "1" else "") + leaf
    raise ConversionError(f"not a torchvision ResNet parameter: {name!r}")


def convert_torchvision_backbone(reader, out: Dict[str, torch.Tensor], hint: str = "") -> None:
    """The official `backbone.0.body.*` (a torchvision ResNet) -> `out["backbone.*"]` (detectron2's
    ResNet, FrozenBN buffers included); `hint` ends the error when there is none."""
    for key in reader.keys_with_prefix("backbone.0.body."):
        name = key[len("backbone.0.body."):]
        if name.endswith("num_batches_tracked"):
            reader.mark_used([key])
            continue
        out["backbone." + torchvision_resnet_to_detectron2(name)] = reader.get(key)
    if "backbone.stem.conv1.weight" not in out:
        raise ConversionError(f"{reader.model} checkpoint: no torchvision ResNet under 'backbone.0.body.'{hint}")


class StateDictReader:
    """Reads an official state dict key by key and remembers what was read, so that a converter
    can insist that every key was used (a checkpoint of another model is then an error naming
    its unexpected keys, not a silently half-converted file)."""

    def __init__(self, state_dict: Dict[str, torch.Tensor], model: str):
        self.state_dict = state_dict
        self.model = model
        self.used = set()

    def __contains__(self, key):
        return key in self.state_dict

    def get(self, key: str, shape: Optional[Iterable[int]] = None) -> torch.Tensor:
        if key not in self.state_dict:
            raise ConversionError(
                f"{self.model} checkpoint: key {key!r} is missing (found {len(self.state_dict)} keys, e.g. "
                f"{sorted(self.state_dict)[:3]}); is this a {self.model} checkpoint?"
            )
        value = self.state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{self.model} checkpoint: {key!r} is a {type(value).__name__}, not a tensor")
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ConversionError(
                f"{self.model} checkpoint: {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)} "
                "(a model of another size or kind?)"
            )
        self.used.add(key)
        return value

    def keys_with_prefix(self, prefix: str) -> List[str]:
        return sorted(k for k in self.state_dict if k.startswith(prefix))

    def mark_used(self, keys: Iterable[str]):
        self.used.update(keys)

    def check_all_used(self):
        unused = sorted(set(self.state_dict) - self.used)
        if unused:
            shown = ", ".join(unused[:8]) + (f", ... ({len(unused)} in all)" if len(unused) > 8 else "")
            raise ConversionError(
                f"{self.model} checkpoint has keys this converter does not know: {shown}. Is it a checkpoint "
                f"of another model (choose the matching converter) or of a variant we do not support?"
            )


def _describe_top_level(obj) -> str:
    if isinstance(obj, dict):
        return f"a dict with keys {sorted(map(str, obj))[:8]}"
    return f"a {type(obj).__name__}"


def load_official_checkpoint(path: str, model: str, safe_globals: Iterable = ()) -> Dict[str, torch.Tensor]:
    """The model state dict of an official checkpoint file (`{"model": state_dict, ...}`,
    `{"state_dict": ...}` (mmdet) or a bare state dict), loaded with `weights_only=True`.

    argparse.Namespace (the official `args` entry) and the classes in `safe_globals` (for a
    converter whose release stores more, e.g. numpy scalars in mmcv's `meta`) are allowed; anything
    else that needs arbitrary code to unpickle is refused, naming what it needs. Errors name the
    file and what was found.
    """
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":
        raise ConversionError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    if head[:2] == b"PK" and not zipfile.is_zipfile(path):
        raise ConversionError(f"{path}: a damaged or truncated checkpoint (its zip archive cannot be read)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *safe_globals]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        message = str(e)
        needs = re.search(r"GLOBAL (\S+) was not an allowed global", message)
        if needs:
            raise ConversionError(
                f"{path}: refusing to load it: unpickling it needs the Python object {needs.group(1)}, and a "
                f"checkpoint is loaded with torch.load(weights_only=True) only (an arbitrary pickle can run code). "
                f"If you trust the file, save its model state dict alone (torch.save(torch.load(path, "
                f"weights_only=False)['model'], 'model_only.pth')) and convert that."
            ) from None
        detail = re.search(r"WeightsUnpickler error: (.*?)(\n\n|$)", message, re.S)
        raise ConversionError(
            f"{path}: cannot be read with torch.load(weights_only=True): damaged or truncated, or a pickle using "
            f"more than tensors and plain containers ({(detail.group(1) if detail else message).strip()[:200]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ConversionError(f"{path}: a damaged or truncated checkpoint ({type(e).__name__}: {e})") from None
    state_dict = checkpoint
    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict"):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                state_dict = checkpoint[key]
                break
    if not isinstance(state_dict, dict) or not state_dict or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise ConversionError(
            f"{path}: expected a {model} checkpoint (a dict with a 'model' state dict of tensors), found "
            f"{_describe_top_level(checkpoint)}"
        )
    return state_dict


def save_detectron2_checkpoint(conversion: Conversion, path: str, source: str = ""):
    """Writes `{"model": ..., "__author__": ..., "matching_heuristics": False}` (what detectron2's
    DetectionCheckpointer loads as is) atomically: a temporary file in the same folder, renamed
    over `path` only once complete, so no half-written output is ever left."""
    data = {
        "model": conversion.state_dict,
        "__author__": f"hybrid_detr.converters ({conversion.description}{'; from ' + os.path.basename(source) if source else ''})",
        "matching_heuristics": False,
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".converting-", suffix=".pth", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def expected_state_shapes(config_name: str) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of the state dict of the model a shipped config builds (on the meta device:
    no memory, no weights)."""
    from detectron2.modeling import META_ARCH_REGISTRY

    from ..config import load_config
    from ..model_zoo import get_config_file

    cfg = load_config(get_config_file(config_name), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    with torch.device("meta"):
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_against_config(conversion: Conversion):
    """The converted state dict must have exactly the keys and shapes of the model its config
    builds (detectron2's checkpointer would otherwise skip, with a mere warning, what does not fit)."""
    expected = expected_state_shapes(conversion.config_name)
    found = {k: tuple(v.shape) for k, v in conversion.state_dict.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k} {found[k]} (config: {expected[k]})" for k in sorted(set(found) & set(expected)) if found[k] != expected[k]]
    if missing or unexpected or wrong:
        problems = [
            f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("other shape", wrong))
            if items
        ]
        raise ConversionError(
            f"the converted {conversion.description} does not fit configs/{conversion.config_name} ("
            + "; ".join(problems)
            + "): a checkpoint of another architecture (FFN width, queries, layers, ...)?"
        )


def check_finite(state_dict: Dict[str, torch.Tensor], path: str) -> None:
    """ConversionError naming the tensors of an official state dict that hold NaN or Inf: such a
    checkpoint (a diverged run's, or a damaged file) would convert into a model that predicts NaN."""
    bad = non_finite_tensors(state_dict.items())
    if bad:
        raise ConversionError(
            f"{path}: non-finite values in {describe_non_finite(bad)}; refusing to convert it (the run that "
            f"saved it diverged, or the file is damaged): use another checkpoint of that run"
        )


def convert_file(model: str, input_path: str, output_path: str) -> Conversion:
    """Loads `input_path` as an official `model` checkpoint, refuses it if a tensor holds NaN/Inf,
    converts it, checks it against the config it is for (every key, every shape) and writes
    `output_path`."""
    if model not in CONVERTERS:
        raise ConversionError(f"unknown model {model!r}: choose from {sorted(CONVERTERS)}")
    if os.path.abspath(input_path) == os.path.abspath(output_path):
        raise ConversionError("the output would overwrite the input; choose another output path")
    official = load_official_checkpoint(input_path, model, SAFE_GLOBALS[model])
    check_finite(official, input_path)
    conversion = CONVERTERS[model](official)
    check_against_config(conversion)
    save_detectron2_checkpoint(conversion, output_path, source=input_path)
    return conversion
