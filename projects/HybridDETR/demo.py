#!/usr/bin/env python
"""Draw HybridDETR's detections on an image and save it as a PNG.

    python projects/HybridDETR/demo.py --config-file configs/quickstart/deformable_detr_r18_synthetic.yaml \
        --input datasets/hybrid_synthetic/val/images/000001.jpg --output demo.png \
        --opts MODEL.WEIGHTS output/quickstart/deformable_detr_r18_synthetic/model_final.pth

Class names come from the metadata of the config's first test dataset (DATASETS.TEST).
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402

import hybrid_detr  # noqa: E402,F401  (registers the HybridDETR meta-architecture and datasets)
from hybrid_detr.config import load_config  # noqa: E402

logger = logging.getLogger("detectron2")


def get_parser():
    parser = argparse.ArgumentParser(description="HybridDETR demo: detections drawn on an image")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to a config file")
    parser.add_argument("--input", required=True, metavar="IMAGE", help="path to an input image")
    parser.add_argument("--output", required=True, metavar="PNG", help="where to write the drawn image")
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.5, help="draw detections scoring at least this"
    )
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs"
    )
    return parser


def setup_cfg(args):
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    return cfg


def run_demo(cfg, input_path, output_path, confidence_threshold=0.5):
    """Predicts on `input_path`, draws the detections scoring >= `confidence_threshold` and writes
    the result to `output_path` (PNG). Returns the drawn Instances (on the CPU)."""
    predictor = DefaultPredictor(cfg)
    image = read_image(input_path, format="BGR")
    instances = predictor(image)["instances"].to("cpu")
    instances = instances[instances.scores >= confidence_threshold]
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    drawing = Visualizer(image[:, :, ::-1], metadata).draw_instance_predictions(instances)
    out_dir = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(out_dir, exist_ok=True)
    drawing.save(output_path)
    logger.info(f"{input_path}: {len(instances)} detections with score >= {confidence_threshold}, drawn to {output_path}")
    return instances


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="detectron2")
    setup_logger(name="hybrid_detr", abbrev_name="hdetr")
    return run_demo(setup_cfg(args), args.input, args.output, args.confidence_threshold)


if __name__ == "__main__":
    main()  # pragma: no cover
