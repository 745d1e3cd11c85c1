"""HybridDETR's model zoo: the shipped configs by name (no trained weights are published yet).

    from hybrid_detr import model_zoo
    cfg = model_zoo.get_config("coco/deformable_detr_r50_50ep.yaml")
    model = model_zoo.get("quickstart/deformable_detr_r18_synthetic.yaml")
"""
from .model_zoo import get, get_config, get_config_file, list_configs  # noqa: F401
