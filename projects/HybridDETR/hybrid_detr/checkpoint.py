"""detectron2's DetectionCheckpointer with atomic writes and clear errors on bad weights.

- `save` writes `name.pth.tmp`, fsyncs it and renames it into place; `last_checkpoint` is
  replaced the same way, after the checkpoint it names is complete. A job killed during a save
  leaves the previous `last_checkpoint` and its file intact. A model with NaN/Inf weights is not
  saved (FloatingPointError naming the tensors), so `last_checkpoint` never names a diverged model.
- `load` (MODEL.WEIGHTS or the last checkpoint) raises `CheckpointError` naming the file and the
  problem for: a missing or empty file, a git-LFS pointer, a text file, a truncated or non-PyTorch
  file, a file none of whose tensors belong to this model ("foreign"), NaN/Inf values in what it
  loads, and an unreachable URL (with how to point MODEL.WEIGHTS at a local copy).
- `.pth` files are read with `torch.load(weights_only=True)`; `.pkl` files (detectron2's and
  Detectron's model zoo) with an unpickler that only rebuilds numpy arrays, numbers, strings and
  containers, and refuses any other Python object by name without calling it.
- `resume_or_load(..., resume=True)` insists that the last checkpoint fits the model exactly
  (its optimizer state is for those shapes); `load_for_inference` (--eval-only) that every tensor
  used at inference is in the file with its shape.
"""
import collections
import importlib
import importlib.util
import logging
import os
import pickle
import urllib.error
import zipfile
from typing import Callable, Iterable, List, Optional, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _filter_reused_missing_keys

__all__ = [
    "CheckpointError",
    "HybridCheckpointer",
    "atomic_write_text",
    "describe_non_finite",
    "load_restricted_pickle",
    "non_finite_tensors",
]

logger = logging.getLogger(__name__)

_URL_PREFIXES = ("http://", "https://", "detectron2://", "catalog://")

# Parameters of the parts HybridDETR runs in training only (the modes' main-pass hooks and training
# branches, `HybridDETR.main_passes` / `.branches`: see modeling/modes.py); inference never reads them.
TRAINING_ONLY_PREFIXES = ("main_passes.", "branches.")

_GIT_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


class CheckpointError(RuntimeError):
    """A checkpoint or MODEL.WEIGHTS file that cannot be used; the message names it."""


def atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _is_url(path: str) -> bool:
    return path.startswith(_URL_PREFIXES)


# ------------------------------------------------------------------------------------------------
# Non-finite values
# ------------------------------------------------------------------------------------------------
def non_finite_tensors(named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> List[Tuple[str, int, int, int]]:
    """(name, number of NaN, number of Inf, numel) of every floating tensor holding a NaN or an Inf,
    in the given order (one device sync for all tensors; the counts only for the bad ones)."""
    named = [(n, t) for n, t in named_tensors if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    if not named:
        return []
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(t).all() for _, t in named]).cpu()
        bad = []
        for (name, t), ok in zip(named, finite.tolist()):
            if not ok:
                bad.append((name, int(torch.isnan(t).sum()), int(torch.isinf(t).sum()), t.numel()))
    return bad


def describe_non_finite(bad: List[Tuple[str, int, int, int]], limit: int = 5) -> str:
    """'name (3 NaN, 1 Inf of 4096 values), ...' for `non_finite_tensors`' result."""
    parts = []
    for name, nans, infs, numel in bad[:limit]:
        counts = ", ".join(f"{n} {what}" for n, what in ((nans, "NaN"), (infs, "Inf")) if n)
        parts.append(f"{name} ({counts} of {numel} values)")
    more = f", ... ({len(bad)} tensors in all)" if len(bad) > limit else ""
    return ", ".join(parts) + more


# ------------------------------------------------------------------------------------------------
# What a weights file is, before unpickling anything
# ------------------------------------------------------------------------------------------------
def _check_file_kind(filename: str) -> None:
    """Refuses, naming the file, what cannot be a checkpoint: an empty file, a git-LFS pointer (the
    weights were never downloaded), a text file. A checkpoint is a zip archive (torch.save) or a
    binary pickle (legacy torch.save, detectron2 / Detectron .pkl files), which start with b"PK" or
    b"\\x80"."""
    with open(filename, "rb") as f:
        head = f.read(256)
    if not head:
        raise CheckpointError(f"not a checkpoint: {filename} is empty (0 bytes); copy or download the weights again")
    if head.startswith(_GIT_LFS_POINTER):
        raise CheckpointError(
            f"{filename} is a git-LFS pointer file ({os.path.getsize(filename)} bytes of text), not the weights: "
            f"run `git lfs pull` in its repository (or download the file itself) and try again"
        )
    if head.startswith((b"PK", b"\x80")):
        return
    if filename.endswith(".pkl"):
        return  # a protocol 0/1 pickle is text; the restricted unpickler judges it
    if b"\x00" in head:
        what = f"it starts with {head[:16]!r}"
    else:
        what = f"a text file starting with {head.decode('utf-8', 'replace')[:40]!r}"
    raise CheckpointError(
        f"not a checkpoint: {filename} is not a PyTorch checkpoint (a zip archive written by torch.save) "
        f"nor a pickle ({what}). Point MODEL.WEIGHTS at a .pth / .pkl weights file"
    )


# ------------------------------------------------------------------------------------------------
# .pkl files without running code
# ------------------------------------------------------------------------------------------------
# What detectron2's and Detectron's model-zoo .pkl files need: numpy arrays and scalars (numpy 1
# names them numpy.core.*, numpy 2 numpy._core.*), the latin-1 byte strings Python 3 writes with
# protocol 2, and OrderedDict. Everything else (a class, a function such as os.system) is refused.
_ALLOWED_PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, filename):
        super().__init__(file, encoding="latin1")
        self.filename = filename

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_PICKLE_GLOBALS:
            raise CheckpointError(
                f"{self.filename}: refusing to load it: unpickling it needs the Python object {module}.{name}, "
                f"and a .pkl weights file may only hold numpy arrays, numbers, strings and containers (an "
                f"arbitrary pickle can run code). If you trust the file, re-save its weights as a dict of "
                f"numpy arrays or with torch.save"
            )
        if module.startswith("numpy.core.") and importlib.util.find_spec("numpy._core") is not None:
            module = "numpy._core." + module[len("numpy.core."):]  # numpy 2 renamed numpy.core
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in a weights file")


def load_restricted_pickle(filename: str):
    """The object pickled in `filename`, built from numpy arrays, numbers, strings and containers
    only; any other global raises CheckpointError naming it, before anything is called."""
    with open(filename, "rb") as f:
        return _RestrictedUnpickler(f, filename).load()


def _key_groups(keys, limit=6) -> str:
    """Keys summarised by module (its first four names, indices as '*'), with their number:
    'decoder.layers.*.cross_attn.* (12), level_embed'."""
    groups = collections.Counter()
    for key in keys:
        module = ["*" if p.isdigit() else p for p in key.split(".")[:-1]][:4]
        while module and module[-1] == "*":
            module.pop()
        groups[".".join(module) + ".*" if module else key] += 1
    shown = [f"{g} ({n})" if n > 1 else g for g, n in list(groups.items())[:limit]]
    more = f", ... ({len(keys)} tensors in all)" if len(groups) > limit else ""
    return ", ".join(shown) + more


class HybridCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saves, no saves of a diverged model, and clear errors on
    weights that cannot be used (see the module docstring).

    `divergence_hint`: a callable giving the likely cause to name when the model is not finite at a
    save (the trainer gives its learning rates).
    """

    def __init__(self, model, save_dir="", *, divergence_hint: Optional[Callable[[], str]] = None, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.divergence_hint = divergence_hint
        # What the file being loaded must fit: None (detectron2's partial load, e.g. fine-tuning from
        # ImageNet weights), "resume" (every tensor, same shapes) or "inference" (every tensor used at
        # inference); `config_hint` ends the error message.
        self._fit, self._config_hint = None, ""

    # -- saving -----------------------------------------------------------------------------------
    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        basename = f"{name}.pth"
        self.check_finite_before_save(basename, kwargs.get("iteration"))
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        save_file = os.path.join(self.save_dir, basename)
        tmp = save_file + ".tmp"
        self.logger.info(f"Saving checkpoint to {save_file}")
        with open(tmp, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, save_file)
        self.tag_last_checkpoint(basename)

    def check_finite_before_save(self, basename: str, iteration=None) -> None:
        """FloatingPointError naming the first non-finite weights when the model is not finite (it is
        then not saved, and `last_checkpoint` keeps naming the previous checkpoint)."""
        bad = non_finite_tensors(self.model.state_dict().items())
        if not bad:
            return
        previous = self.get_checkpoint_file() if self.has_checkpoint() else ""
        kept = (f"{os.path.join(self.save_dir, 'last_checkpoint')} still names {os.path.basename(previous)}"
                if previous else "no checkpoint was written")
        when = f" after iteration {iteration}" if iteration is not None else ""
        hint = self.divergence_hint() if self.divergence_hint is not None else ""
        raise FloatingPointError(
            f"Not saving {basename}: the model's weights are not finite{when}: {describe_non_finite(bad)}. "
            f"Training diverged{': ' + hint if hint else ''}. Training stopped; {kept}."
        )

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    # -- loading ------------------------------------------------------------------------------------
    def get_checkpoint_file(self) -> str:
        path = super().get_checkpoint_file()
        if path and not os.path.isfile(path):
            raise CheckpointError(
                f"{os.path.join(self.save_dir, 'last_checkpoint')} names {os.path.basename(path)}, which does "
                f"not exist in {self.save_dir}: restore it or remove last_checkpoint to start afresh"
            )
        return path

    def resume_or_load(self, path: str, *, resume: bool = True):
        """detectron2's `resume_or_load`; a resumed checkpoint must fit the model exactly."""
        return self._load_fitting("resume" if resume and self.has_checkpoint() else None, path, resume)

    def load_for_inference(self, path: str, *, resume: bool = False, config_hint: str = ""):
        """`resume_or_load` for evaluation (--eval-only): there must be weights (MODEL.WEIGHTS, or the
        last checkpoint with `resume`), holding every tensor the model uses at inference with its
        shape, all finite. Tensors of training-only parts (a mode's auxiliary heads) may be absent or
        extra. `config_hint` (e.g. the config's DECODER_MODE) ends the error message."""
        if not path and not (resume and self.has_checkpoint()):
            where = f" and {self.save_dir} has no last_checkpoint" if resume else ""
            raise CheckpointError(
                f"Evaluating without weights: MODEL.WEIGHTS is empty{where}, so the model would be evaluated "
                f"with random weights. Pass MODEL.WEIGHTS /path/to/model_final.pth (or --resume with the "
                f"OUTPUT_DIR of a training run)"
            )
        self._config_hint = config_hint
        try:
            return self._load_fitting("inference", path, resume)
        finally:
            self._config_hint = ""

    def _load_fitting(self, fit, path, resume):
        self._fit = fit
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self._fit = None

    def load(self, path, *args, **kwargs):
        if path and not _is_url(path) and not os.path.isfile(path):
            raise CheckpointError(f"Checkpoint / MODEL.WEIGHTS file not found: {path}")
        try:
            return super().load(path, *args, **kwargs)
        except CheckpointError:
            raise
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            raise CheckpointError(
                f"Could not download the weights {path!r} ({getattr(e, 'reason', e)}). On a machine "
                f"without internet access, download the file elsewhere, copy it here and set "
                f"MODEL.WEIGHTS /path/to/{os.path.basename(path.split('?')[0])} (or MODEL.WEIGHTS \"\" to "
                f"start from random weights)"
            ) from e
        except OSError as e:
            if path and _is_url(path):
                raise CheckpointError(
                    f"Could not download the weights {path!r} ({e}). On a machine without internet access, "
                    f"copy the file here and set MODEL.WEIGHTS to its local path"
                ) from e
            raise

    def _load_file(self, filename):
        _check_file_kind(filename)
        try:
            if filename.endswith(".pkl"):
                return self._load_pkl(filename)
            return super()._load_file(filename)
        except CheckpointError:
            raise
        except pickle.UnpicklingError as e:
            if "weights_only" in str(e) or "Weights only load failed" in str(e):
                raise CheckpointError(
                    f"{filename} holds Python objects other than tensors and plain containers, so it is not "
                    f"loaded (torch.load weights_only=True). Re-save its state_dict with torch.save"
                ) from e
            raise CheckpointError(f"{filename} is truncated or not a PyTorch checkpoint ({e})") from e
        except (EOFError, OSError, RuntimeError, zipfile.BadZipFile, ValueError, KeyError, IndexError, TypeError) as e:
            raise CheckpointError(
                f"{filename} is truncated or not a PyTorch checkpoint ({type(e).__name__}: {e})"
            ) from e

    def _load_pkl(self, filename):
        """A detectron2 model-zoo file ({"model": {name: array}, "__author__": ...}) as is; anything
        else as Detectron / Caffe2 blobs, renamed by detectron2's matching heuristics (as
        DetectionCheckpointer reads .pkl files, but through `load_restricted_pickle`)."""
        data = load_restricted_pickle(filename)
        if not isinstance(data, dict):
            raise CheckpointError(f"{filename}: expected a dict of weights, found a {type(data).__name__}")
        if "model" in data and "__author__" in data:
            self.logger.info(f"Reading a file from '{data['__author__']}'")
            return data
        blobs = data.get("blobs", data)  # detection models keep their weights under "blobs"
        if not isinstance(blobs, dict):
            raise CheckpointError(f"{filename}: expected a dict of weights under 'blobs', found a {type(blobs).__name__}")
        weights = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
        return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}

    def _torch_load(self, f):
        return torch.load(f, map_location=torch.device("cpu"), weights_only=True)

    def _load_model(self, checkpoint):
        state = checkpoint.get("model")
        if not isinstance(state, dict):
            raise CheckpointError(f"{self._current_file()} has no state dict under 'model'")
        not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor) and not hasattr(v, "__array__")]
        if not_tensors:
            raise CheckpointError(
                f"{self._current_file()}: 'model' holds values that are not tensors: "
                + ", ".join(f"{k} ({type(state[k]).__name__})" for k in not_tensors[:5])
            )
        # The file's own values (two names of one shared tensor could hide a NaN in the model).
        bad = non_finite_tensors((k, torch.as_tensor(v) if not isinstance(v, torch.Tensor) else v)
                                 for k, v in state.items() if getattr(v, "dtype", None) != object)
        if bad:
            raise CheckpointError(
                f"{self._current_file()} holds non-finite weights: {describe_non_finite(bad)}. It was saved "
                f"after training diverged (or is damaged): use an earlier checkpoint (model_*.pth in its folder)"
            )
        num_tensors, sample = len(state), ", ".join(list(state)[:3])
        incompatible = super()._load_model(checkpoint)
        shape_keys = {k for k, *_ in incompatible.incorrect_shapes}
        model_state = self.model.state_dict()
        order = {k: i for i, k in enumerate(model_state)}
        missing = sorted((k for k in _filter_reused_missing_keys(self.model, incompatible.missing_keys)
                          if k not in shape_keys), key=lambda k: order.get(k, len(order)))
        if num_tensors and not set(model_state) - set(missing) - shape_keys:
            raise CheckpointError(
                f"{self._current_file()}: none of its {num_tensors} tensors (e.g. {sample}) fits this "
                f"model: it is a checkpoint of another model"
            )
        if self._fit is not None:
            self._check_fit(missing, list(incompatible.unexpected_keys), incompatible.incorrect_shapes)
        return incompatible

    def _check_fit(self, missing, unexpected, incorrect_shapes):
        """Raises CheckpointError when the loaded file does not fit the model as `self._fit` asks."""
        if self._fit == "inference":
            missing = [k for k in missing if not k.startswith(TRAINING_ONLY_PREFIXES)]
            unexpected = [k for k in unexpected if not k.startswith(TRAINING_ONLY_PREFIXES)]
        if not (missing or unexpected or incorrect_shapes):
            return
        problems = []
        if incorrect_shapes:
            shown = "; ".join(f"{k}: {tuple(c)} in the checkpoint, {tuple(m)} in the model"
                              for k, c, m in incorrect_shapes[:5])
            more = f"; ... ({len(incorrect_shapes)} in all)" if len(incorrect_shapes) > 5 else ""
            problems.append(f"{len(incorrect_shapes)} tensors of another shape ({shown}{more})")
        if missing:
            problems.append(f"missing from the checkpoint: {_key_groups(missing)}")
        if unexpected:
            problems.append(f"in the checkpoint but not in the model: {_key_groups(unexpected)}")
        file = self._current_file()
        if self._fit == "resume":
            raise CheckpointError(
                f"--resume: {file}, the last checkpoint of {self.save_dir}, does not fit the model this config "
                f"builds: " + "; ".join(problems) + ". The config changed since the checkpoint was written (a "
                f"layer size, the number of layers or classes, DECODER_MODE, ...), and its optimizer state is for "
                f"the old shapes. To train the new model from scratch, choose a new OUTPUT_DIR; to fine-tune it "
                f"from these weights, pass MODEL.WEIGHTS {file} without --resume (what does not fit starts from "
                f"its initialisation); to continue the old run, use the config it was started with "
                f"({os.path.join(self.save_dir, 'config.yaml')})."
            )
        hint = f" (this config: {self._config_hint})" if self._config_hint else ""
        raise CheckpointError(
            f"{file} does not fit the model this config builds for evaluation: " + "; ".join(problems) + ". "
            f"Evaluated like this, those parts would keep random weights. Is it a checkpoint of another "
            f"MODEL.HYBRID_DETR.DECODER_MODE or architecture{hint}? Evaluate it with the config it was trained "
            f"with (config.yaml in its OUTPUT_DIR)."
        )

    def _current_file(self):
        url = self._parsed_url_during_load
        return url.geturl() if url is not None else "the checkpoint"
