"""The researcher's toolbox behind tools/explain.py, tools/export.py and tools/plot_metrics.py:
attention views captured with forward hooks (`explain`), export of the inference model to ONNX and
torch.export (`export`), training curves from metrics.json (`metrics`), one image as the model sees
it (`inputs`). Import the submodules (matplotlib and onnx are only needed by the views and export)."""
