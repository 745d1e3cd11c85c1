import os
import sys

# Test this checkout's package, whatever else is installed.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects", "HybridDETR"))
