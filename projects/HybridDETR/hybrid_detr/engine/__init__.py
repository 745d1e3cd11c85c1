"""Training and evaluation pieces of HybridDETR's `train_net.py`.

`Trainer` lives in `hybrid_detr.engine.trainer` (imported on demand: it pulls in the data and
checkpoint modules)."""
from .launch import create_ddp_model  # noqa: F401
from .model_analysis import benchmark_model, count_flops, format_benchmark, measure_inference_speed  # noqa: F401
from .optimizer import build_optimizer, get_param_groups, maybe_add_full_model_gradient_clipping  # noqa: F401
