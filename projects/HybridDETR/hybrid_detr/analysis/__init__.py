"""The researcher's toolbox behind tools/explain.py, tools/export.py and tools/plot_metrics.py:
attention views captured with forward hooks (`explain`), export of the inference model to ONNX and
torch.export (`export`), training curves from metrics.json (`metrics`), one image as the model sees
it (`inputs`). Import the submodules (matplotlib and onnx are only needed by the views and export)."""
# Behind the other tools: a training step as the trainer takes it and the trainer's batches
# (`training_step`), time and memory on a device (`measurement`), where a step's time goes
# (`step_profile`, tools/profile_step.py), training cost per mode (`step_cost`, tools/compare_step_cost.py),
# AP over training per mode and seed (`mode_comparison`, tools/compare_modes.py), our op against its
# reference (`op_benchmark`, tools/benchmark_op.py), inference cost (`inference_cost`,
# tools/analyze_model.py), HybridDETR against the official models (`official_comparison`; DINO:
# `dino_comparison`; tools/compare_official.py).
