"""Inference cost of a config (behind tools/analyze_model.py): parameters, GFLOPs per image (fvcore, our
op and SDPA counted) and images/s, on the images of its first test set (`engine.benchmark_model`)."""
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_test_loader
from detectron2.modeling import build_model

from ..data import DetrDatasetMapper, ensure_synthetic_dataset
from ..engine import benchmark_model

__all__ = ["analyze"]


def analyze(cfg, num_images=20, flop_images=3):
    """`benchmark_model`'s result on DATASETS.TEST[0] (`num_images` timed, `flop_images` counted) of the
    config's model with MODEL.WEIGHTS, plus "parameters" and "dataset"."""
    dataset = cfg.DATASETS.TEST[0]
    ensure_synthetic_dataset(dataset)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    loader = build_detection_test_loader(cfg, dataset, mapper=DetrDatasetMapper(cfg, is_train=False))
    result = benchmark_model(model, loader, max_images=num_images, flop_images=flop_images)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["dataset"] = dataset
    return result
