"""train_net.py in child processes, on a tiny model and a tiny synthetic dataset (CPU, 1 thread).

`TinySetup(root)` generates the dataset (16 images of 96-128 px), writes the tiny config and a
runner script. The runner registers the dataset at import time, so the processes that
detectron2's `launch` spawns (which re-import it) see it too, then calls `train_net.invoke_main()`.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROJECT_DIR = os.path.join(ROOT, "projects", "HybridDETR")
BASE_CONFIG = os.path.join(ROOT, "configs", "Base-HybridDETR.yaml")
PREFIX = "tiny_runs"
SPLITS = dict(num_train=12, num_val=4, min_side=96, max_side=128)

TINY_CONFIG = """\
_BASE_: "{base}"
MODEL:
  DEVICE: "cpu"
  WEIGHTS: ""
  BACKBONE:
    FREEZE_AT: 0
  RESNETS:
    DEPTH: 18
    RES2_OUT_CHANNELS: 64
    NORM: "GN"
  HYBRID_DETR:
    NUM_CLASSES: {num_classes}
    HIDDEN_DIM: 32
    NHEADS: 2
    ENC_LAYERS: 1
    DEC_LAYERS: 2
    DIM_FEEDFORWARD: 64
    NUM_QUERIES: 10
    DROPOUT: 0.0
DATASETS:
  TRAIN: ("{prefix}_train",)
  TEST: ("{prefix}_val",)
SOLVER:
  IMS_PER_BATCH: 2
  MAX_ITER: 3
  STEPS: (2,)
  CHECKPOINT_PERIOD: 100
INPUT:
  MIN_SIZE_TRAIN: (64, 80)
  MAX_SIZE_TRAIN: 96
  MIN_SIZE_TEST: 64
  MAX_SIZE_TEST: 96
  CROP:
    SIZE: (48, 64)
  DETR_CROP_RESIZE: [64, 80]
DATALOADER:
  NUM_WORKERS: 0
SEED: 0
"""

RUNNER = """\
import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, {project!r})
from hybrid_detr.data import register_synthetic_datasets

register_synthetic_datasets(root={datasets!r}, prefix={prefix!r}, **{splits!r})
import train_net
from hybrid_detr.engine.trainer import Trainer

Trainer.WRITER_PERIOD = int(os.environ.get("TINY_WRITER_PERIOD", "20"))
_STEP_SLEEP = float(os.environ.get("TINY_STEP_SLEEP", "0"))  # lets a test kill the run mid-way
if _STEP_SLEEP:
    import time

    _run_step = Trainer.run_step

    def _slow_run_step(self):
        _run_step(self)
        time.sleep(_STEP_SLEEP)

    Trainer.run_step = _slow_run_step

if __name__ == "__main__":
    train_net.invoke_main()
"""


class TinySetup:
    def __init__(self, root):
        from detectron2.data import DatasetCatalog, MetadataCatalog
        from hybrid_detr.data import ensure_synthetic_dataset, register_synthetic_datasets

        self.root = str(root)
        self.datasets = os.path.join(self.root, "datasets")
        names = register_synthetic_datasets(root=self.datasets, prefix=PREFIX, **SPLITS)
        for name in names:  # generate once, here, rather than in racing children
            ensure_synthetic_dataset(name)
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        self.config = os.path.join(self.root, "tiny.yaml")
        with open(self.config, "w") as f:
            f.write(TINY_CONFIG.format(base=BASE_CONFIG, prefix=PREFIX, num_classes=6))
        self.runner = os.path.join(self.root, "run_train_net.py")
        with open(self.runner, "w") as f:
            f.write(RUNNER.format(project=PROJECT_DIR, datasets=self.datasets, prefix=PREFIX, splits=SPLITS))

    def env(self, **extra):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DETECTRON2_DATASETS=self.datasets,
                   PYTHONPATH=PROJECT_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def command(self, *args):
        return [sys.executable, self.runner, "--config-file", self.config, *[str(a) for a in args]]

    def start(self, *args, env=None):
        """A running train_net.py (stdout and stderr to <root>/log-<pid>.txt)."""
        log = open(os.path.join(self.root, f"log-{len(os.listdir(self.root))}.txt"), "w")
        # Its own process group: killing the group also kills the workers `launch` spawned.
        proc = subprocess.Popen(self.command(*args), stdout=log, stderr=subprocess.STDOUT, env=env or self.env(),
                                start_new_session=True)
        proc.log_path = log.name
        log.close()
        return proc

    def run(self, *args, timeout=300, env=None):
        """train_net.py to completion; returns its output; fails the test (with the output) if it fails."""
        proc = subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout,
                              env=env or self.env())
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-5000:]
        return out


def metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def bbox_results(output_dir, dataset=PREFIX + "_val"):
    """COCO bbox results (detections) written by the evaluator, sorted."""
    with open(os.path.join(output_dir, "inference", dataset, "coco_instances_results.json")) as f:
        return sorted(json.load(f), key=lambda d: (d["image_id"], -d["score"], d["category_id"], d["bbox"]))
