"""Tiny configs and batches shared by the model tests (fast on a 2-core CPU)."""
import torch
from detectron2.config import get_cfg
from detectron2.structures import Boxes, Instances

from hybrid_detr import add_hybrid_detr_config

NUM_CLASSES = 5


def tiny_cfg(**hybrid_detr_overrides):
    cfg = get_cfg()
    add_hybrid_detr_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "HybridDETR"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    m = cfg.MODEL.HYBRID_DETR
    m.HIDDEN_DIM = 64
    m.NHEADS = 4
    m.ENC_LAYERS = 1
    m.DEC_LAYERS = 2
    m.DIM_FEEDFORWARD = 128
    m.NUM_QUERIES = 20
    m.NUM_CLASSES = NUM_CLASSES
    m.DROPOUT = 0.0
    for key, value in hybrid_detr_overrides.items():
        setattr(m, key, value)
    return cfg


def synthetic_input(height, width, num_objects, seed=0):
    """A detectron2 input dict: random image, `num_objects` random boxes (0 is allowed)."""
    g = torch.Generator().manual_seed(seed)
    instances = Instances((height, width))
    xy = torch.rand(num_objects, 2, generator=g) * torch.tensor([width * 0.6, height * 0.6])
    wh = 8 + torch.rand(num_objects, 2, generator=g) * torch.tensor([width * 0.3, height * 0.3])
    instances.gt_boxes = Boxes(torch.cat((xy, xy + wh), 1))
    instances.gt_classes = torch.randint(0, NUM_CLASSES, (num_objects,), generator=g)
    image = torch.rand(3, height, width, generator=g) * 255
    return {"image": image, "instances": instances, "height": height, "width": width}


def synthetic_batch():
    """Two images of different sizes (so padding is exercised), one without objects."""
    return [synthetic_input(96, 128, 3, seed=1), synthetic_input(80, 100, 0, seed=2)]


def flatten_config(node, prefix=""):
    """A config as {"A.B.C": value}, to compare two configs key by key."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def expected_detections(model, batch):
    """Deformable DETR's post-process written out, from the model's raw last-layer outputs
    (`raw_predictions`): per image (scores, labels, boxes xyxy in pixels of the output size
    "height" x "width"), the DETECTIONS_PER_IMAGE best (query, class) pairs by sigmoid score, boxes
    clipped to the image and empty ones dropped (detectron2's detector_postprocess)."""
    raw = model.raw_predictions(batch)
    results = []
    for x, logits, boxes in zip(batch, raw["pred_logits"], raw["pred_boxes"]):
        height, width = x.get("height", x["image"].shape[1]), x.get("width", x["image"].shape[2])
        probs = logits.sigmoid()
        scores, flat = probs.flatten().topk(min(model.detections_per_image, probs.numel()))
        queries, labels = flat // probs.shape[1], flat % probs.shape[1]
        cx, cy, w, h = boxes[queries].unbind(-1)
        xyxy = torch.stack(((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height), -1)
        xyxy = torch.stack((xyxy[:, 0].clamp(0, width), xyxy[:, 1].clamp(0, height),
                            xyxy[:, 2].clamp(0, width), xyxy[:, 3].clamp(0, height)), -1)
        keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        results.append((scores[keep], labels[keep], xyxy[keep]))
    return results


def assert_detections(results, expected, atol=1e-3):
    """The model's results (list of {"instances"}) are `expected_detections`' (boxes to `atol` pixels:
    the model scales to the input size, then to the output size)."""
    assert len(results) == len(expected)
    for result, (scores, labels, boxes) in zip(results, expected):
        instances = result["instances"]
        assert len(instances) == len(scores) > 0
        torch.testing.assert_close(instances.scores, scores, rtol=0, atol=1e-6)
        assert torch.equal(instances.pred_classes, labels)
        torch.testing.assert_close(instances.pred_boxes.tensor, boxes, rtol=0, atol=atol)
