"""detectron2's DetectionCheckpointer with atomic writes and clear errors on bad weights.

- `save` writes `name.pth.tmp`, fsyncs it and renames it into place; `last_checkpoint` is
  replaced the same way, after the checkpoint it names is complete. A job killed during a save
  leaves the previous `last_checkpoint` and its file intact.
- `load` (MODEL.WEIGHTS or the last checkpoint) raises `CheckpointError` naming the file and the
  problem for: a missing file, a truncated or non-PyTorch file, a file none of whose tensors
  belong to this model ("foreign"), and an unreachable URL (with how to point MODEL.WEIGHTS at a
  local copy). `.pth` files are read with `torch.load(weights_only=True)`.
"""
import logging
import os
import pickle
import urllib.error
import zipfile

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["CheckpointError", "HybridCheckpointer", "atomic_write_text"]

logger = logging.getLogger(__name__)

_URL_PREFIXES = ("http://", "https://", "detectron2://", "catalog://")


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


class HybridCheckpointer(DetectionCheckpointer):
    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        tmp = save_file + ".tmp"
        self.logger.info(f"Saving checkpoint to {save_file}")
        with open(tmp, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    def get_checkpoint_file(self) -> str:
        path = super().get_checkpoint_file()
        if path and not os.path.isfile(path):
            raise CheckpointError(
                f"{os.path.join(self.save_dir, 'last_checkpoint')} names {os.path.basename(path)}, which does "
                f"not exist in {self.save_dir}: restore it or remove last_checkpoint to start afresh"
            )
        return path

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
        try:
            return super()._load_file(filename)
        except pickle.UnpicklingError as e:
            if "weights_only" in str(e) or "Weights only load failed" in str(e):
                raise CheckpointError(
                    f"{filename} holds Python objects other than tensors and plain containers, so it is not "
                    f"loaded (torch.load weights_only=True). Re-save its state_dict with torch.save"
                ) from e
            raise CheckpointError(f"{filename} is truncated or not a PyTorch checkpoint ({e})") from e
        except (EOFError, OSError, RuntimeError, zipfile.BadZipFile, ValueError, KeyError) as e:
            raise CheckpointError(
                f"{filename} is truncated or not a PyTorch checkpoint ({type(e).__name__}: {e})"
            ) from e

    def _torch_load(self, f):
        return torch.load(f, map_location=torch.device("cpu"), weights_only=True)

    def _load_model(self, checkpoint):
        state = checkpoint.get("model")
        if not isinstance(state, dict):
            raise CheckpointError(f"{self._current_file()} has no state dict under 'model'")
        num_tensors, sample = len(state), ", ".join(list(state)[:3])
        incompatible = super()._load_model(checkpoint)
        skipped = set(incompatible.missing_keys) | {k for k, *_ in incompatible.incorrect_shapes}
        if num_tensors and not set(self.model.state_dict()) - skipped:
            raise CheckpointError(
                f"{self._current_file()}: none of its {num_tensors} tensors (e.g. {sample}) fits this "
                f"model: it is a checkpoint of another model"
            )
        return incompatible

    def _current_file(self):
        url = self._parsed_url_during_load
        return url.geturl() if url is not None else "the checkpoint"
