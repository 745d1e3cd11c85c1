import os
import sys

# Test this checkout's package, whatever else is installed; tests in subfolders share the helpers
# in tests/ (model_helpers.py).
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
sys.path.insert(0, os.path.join(ROOT, "projects", "HybridDETR"))
sys.path.insert(0, TESTS)
