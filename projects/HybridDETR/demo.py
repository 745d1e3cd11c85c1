#!/usr/bin/env python
"""Draw HybridDETR's detections on images or a video, as detectron2's `demo/demo.py` does.

    # one image -> one PNG
    python projects/HybridDETR/demo.py --config-file configs/quickstart/deformable_detr_r18_synthetic.yaml \
        --input datasets/hybrid_synthetic/val/images/000001.jpg --output demo.png \
        --opts MODEL.WEIGHTS output/quickstart/deformable_detr_r18_synthetic/model_final.pth
    # several images or globs (quote them so that the shell does not expand them) -> a folder of PNGs
    python projects/HybridDETR/demo.py --config-file CONFIG --input 'images/*.jpg' other.png --output drawn/ \
        --opts MODEL.WEIGHTS model_final.pth
    # a video -> a video (MP4) of the same size and frame rate
    python projects/HybridDETR/demo.py --config-file CONFIG --video-input clip.mp4 --output drawn/ \
        --opts MODEL.WEIGHTS model_final.pth

`--output` is a file with one input image or a video (a folder: `<folder>/<input name>.png` / `.mp4`), and a
folder (created if needed) with several. Class names come from the metadata of the config's first test
dataset (DATASETS.TEST). The model must be trained: MODEL.WEIGHTS must name a checkpoint holding every
parameter outside the backbone (an ImageNet backbone alone is refused); `--allow-random-weights` draws an
untrained model's detections anyway (to try the pipeline). Bad input (a missing file, a glob that matches
nothing, an unreadable image or video) exits with one line naming it.
"""
import argparse
import glob
import logging
import os
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402

import hybrid_detr  # noqa: E402,F401  (registers the HybridDETR meta-architecture and datasets)
from hybrid_detr.config import load_config  # noqa: E402

logger = logging.getLogger("detectron2")

IMAGE_SUFFIX = ".png"
VIDEO_SUFFIX = ".mp4"


class DemoError(Exception):
    """Bad input to the demo; `main` turns it into one line on stderr and exit status 2."""


def get_parser():
    parser = argparse.ArgumentParser(description="HybridDETR demo: detections drawn on images or a video")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to a config file")
    parser.add_argument(
        "--input", nargs="+", metavar="IMAGE",
        help="input images: paths or glob patterns ('dir/*.jpg'), several allowed",
    )
    parser.add_argument("--video-input", metavar="VIDEO", help="an input video file (read with OpenCV)")
    parser.add_argument(
        "--output", required=True, metavar="PATH",
        help="output file (one image: PNG; a video: MP4) or folder (required with several images)",
    )
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.5, help="draw detections scoring at least this"
    )
    parser.add_argument(
        "--allow-random-weights", action="store_true",
        help="draw even when the model is untrained (MODEL.WEIGHTS empty or without the detector's weights)",
    )
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs"
    )
    return parser


def setup_cfg(args):
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    return cfg


# -- inputs and outputs ---------------------------------------------------------------------------
def expand_inputs(patterns: List[str]) -> List[str]:
    """Existing files as given, glob patterns expanded (sorted); a pattern or file that names nothing is an error."""
    paths = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if os.path.isfile(pattern):
            paths.append(pattern)
            continue
        matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
        if not matches:
            what = "matches no file" if glob.has_magic(pattern) else "does not exist (or is not a file)"
            raise DemoError(f"--input {pattern!r} {what}")
        paths.extend(matches)
    return paths


def output_paths(inputs: List[str], output: str, suffix: str) -> List[str]:
    """Where each input's drawing goes: `output` itself for one input that is not a folder, else
    `output/<input name><suffix>` (names must not collide)."""
    if len(inputs) == 1 and not (os.path.isdir(output) or output.endswith(os.sep)):
        return [output]
    if os.path.exists(output) and not os.path.isdir(output):
        raise DemoError(f"--output {output!r} is a file but there are {len(inputs)} inputs: give a folder")
    paths, seen = [], {}
    for path in inputs:
        name = os.path.splitext(os.path.basename(path))[0] + suffix
        if name in seen:
            raise DemoError(f"inputs {seen[name]!r} and {path!r} would both be drawn to {name!r} in {output!r}: "
                            "run them separately or rename one")
        seen[name] = path
        paths.append(os.path.join(output, name))
    return paths


def _read_image(path: str):
    try:
        return read_image(path, format="BGR")
    except Exception as e:  # PIL's errors name no file
        raise DemoError(f"cannot read image {path!r}: {type(e).__name__}: {e}") from None


# -- the model --------------------------------------------------------------------------------------
class _KeyRecordingCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer keeping what `load` found incompatible (it only logs it)."""

    incompatible = None

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def build_predictor(cfg, allow_random_weights: bool = False) -> DefaultPredictor:
    """detectron2's DefaultPredictor with the weights of `cfg.MODEL.WEIGHTS`, refusing an untrained model
    (no weights, or a checkpoint missing parameters outside the backbone) unless `allow_random_weights`."""
    weights = cfg.MODEL.WEIGHTS
    if not weights and not allow_random_weights:
        raise DemoError(
            "MODEL.WEIGHTS is empty: the demo would draw an untrained model's detections. Give a trained "
            "checkpoint (--opts MODEL.WEIGHTS output/.../model_final.pth) or pass --allow-random-weights"
        )
    unloaded = cfg.clone()
    unloaded.defrost()
    unloaded.MODEL.WEIGHTS = ""  # loaded below, where the missing keys are seen
    unloaded.freeze()
    predictor = DefaultPredictor(unloaded)
    if weights:
        checkpointer = _KeyRecordingCheckpointer(predictor.model)
        path = weights
        if not os.path.isfile(path):  # a URL (detectron2://, https://) is downloaded, as checkpointer.load does
            try:
                path = checkpointer.path_manager.get_local_path(weights)
            except Exception as e:
                raise DemoError(f"MODEL.WEIGHTS {weights!r} cannot be opened: {type(e).__name__}: {e}") from None
            if not os.path.isfile(path):
                raise DemoError(f"MODEL.WEIGHTS {weights!r} does not exist")
        checkpointer.load(path)
        untrained = sorted(k for k in checkpointer.incompatible.missing_keys if not k.startswith("backbone."))
        if untrained and not allow_random_weights:
            raise DemoError(
                f"MODEL.WEIGHTS {weights!r} has no weights for {len(untrained)} parameters outside the backbone "
                f"(e.g. {untrained[0]}): it is not a trained model of this config. Give a trained checkpoint "
                "or pass --allow-random-weights"
            )
    return predictor


def draw(predictor, image_bgr, metadata, confidence_threshold: float):
    """(drawn RGB image as a uint8 array, the drawn Instances on the CPU)."""
    instances = predictor(image_bgr)["instances"].to("cpu")
    instances = instances[instances.scores >= confidence_threshold]
    drawing = Visualizer(image_bgr[:, :, ::-1], metadata).draw_instance_predictions(instances)
    return drawing.get_image(), instances


def run_demo(cfg, input_path, output_path, confidence_threshold=0.5, predictor=None, allow_random_weights=False):
    """Predicts on the image `input_path`, draws the detections scoring >= `confidence_threshold` and
    writes the result to `output_path` (PNG). Returns the drawn Instances (on the CPU)."""
    predictor = predictor or build_predictor(cfg, allow_random_weights)
    image = _read_image(input_path)
    drawn, instances = draw(predictor, image, _metadata(cfg), confidence_threshold)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    from PIL import Image

    Image.fromarray(drawn).save(output_path, format="PNG")
    logger.info(f"{input_path}: {len(instances)} detections with score >= {confidence_threshold}, drawn to {output_path}")
    return instances


def run_video(cfg, video_path, output_path, confidence_threshold=0.5, predictor=None, allow_random_weights=False):
    """Draws the detections on every frame of `video_path` into an MP4 at `output_path` (same size and
    frame rate). Returns the drawn Instances of each frame."""
    import cv2

    if not os.path.isfile(video_path):
        raise DemoError(f"--video-input {video_path!r} does not exist (or is not a file)")
    predictor = predictor or build_predictor(cfg, allow_random_weights)
    video = cv2.VideoCapture(video_path)
    if not video.isOpened():
        raise DemoError(f"cannot open video {video_path!r} with OpenCV")
    width, height = int(video.get(cv2.CAP_PROP_FRAME_WIDTH)), int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    writer = cv2.VideoWriter(output_path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height), True)
    if not writer.isOpened():
        video.release()
        raise DemoError(f"cannot write video {output_path!r} with OpenCV (codec mp4v)")
    metadata, per_frame = _metadata(cfg), []
    try:
        while True:
            ok, frame = video.read()  # BGR, as the predictor takes it
            if not ok:
                break
            drawn, instances = draw(predictor, frame, metadata, confidence_threshold)
            writer.write(cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
            per_frame.append(instances)
    finally:
        video.release()
        writer.release()
    if not per_frame:
        raise DemoError(f"video {video_path!r} has no frame OpenCV can decode")
    logger.info(f"{video_path}: {len(per_frame)} frames drawn to {output_path}")
    return per_frame


def _metadata(cfg):
    return MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")


def run(args) -> Dict[str, object]:
    """Runs the demo for parsed `args`: {output path: drawn Instances (a list of them per frame for a video)}."""
    if bool(args.input) == bool(args.video_input):
        raise DemoError("give either --input (images) or --video-input (a video)")
    if args.input:
        inputs = expand_inputs(args.input)
        outputs = output_paths(inputs, args.output, IMAGE_SUFFIX)
    else:
        outputs = output_paths([args.video_input], args.output, VIDEO_SUFFIX)
    cfg = setup_cfg(args)
    predictor = build_predictor(cfg, args.allow_random_weights)
    if args.video_input:
        return {outputs[0]: run_video(cfg, args.video_input, outputs[0], args.confidence_threshold, predictor)}
    return {out: run_demo(cfg, path, out, args.confidence_threshold, predictor) for path, out in zip(inputs, outputs)}


def main(argv: Optional[List[str]] = None):
    parser = get_parser()
    args = parser.parse_args(argv)
    setup_logger(name="detectron2")
    setup_logger(name="hybrid_detr", abbrev_name="hdetr")
    try:
        return run(args)
    except DemoError as e:
        parser.error(str(e))  # one line on stderr, exit status 2


if __name__ == "__main__":
    main()  # pragma: no cover
