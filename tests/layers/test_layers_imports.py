"""The op layer (`hybrid_detr.layers`) is the bottom of the package: it needs torch alone.

It imports nothing from the rest of `hybrid_detr` nor from detectron2 (read from its source), and
in a process where detectron2 cannot be imported, `import hybrid_detr.layers` works and its op runs.
"""
import ast
import os
import subprocess
import sys

import pytest

import hybrid_detr
import hybrid_detr.layers

LAYERS_DIR = os.path.dirname(hybrid_detr.layers.__file__)
PACKAGE_ROOT = os.path.dirname(os.path.dirname(hybrid_detr.__file__))


def _imported_modules(path):
    """Absolute names of every module `path` imports, at any depth (function bodies included)."""
    package = "hybrid_detr.layers"
    names = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0]
                names.append(f"{base}.{node.module}" if node.module else base)
            else:
                names.append(node.module)
    return names


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(LAYERS_DIR) if f.endswith(".py")))
def test_layer_sources_import_nothing_above_them(name):
    for module in _imported_modules(os.path.join(LAYERS_DIR, name)):
        top = module.split(".")[0]
        assert top != "detectron2", f"layers/{name} imports {module}"
        if top == "hybrid_detr":
            assert module == "hybrid_detr.layers" or module.startswith("hybrid_detr.layers."), (
                f"layers/{name} imports {module}, above the op layer"
            )


_WITHOUT_DETECTRON2 = r"""
import sys

class BlockDetectron2:
    def find_spec(self, name, path=None, target=None):
        if name == "detectron2" or name.startswith("detectron2."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, BlockDetectron2())
sys.path.insert(0, __ROOT__)
import torch
import hybrid_detr.layers as layers

assert not [m for m in sys.modules if m.split(".")[0] == "detectron2"]
assert layers.extension_available(), "the compiled op did not load"
g = torch.Generator().manual_seed(0)
shapes = torch.tensor([[4, 5], [2, 3]])
start = torch.tensor([0, 20])
value = torch.randn(2, 26, 2, 8, generator=g)
loc = torch.rand(2, 7, 2, 2, 3, 2, generator=g)
weights = torch.rand(2, 7, 2, 2, 3, generator=g).softmax(-1)
out = layers.ms_deform_attn(value, shapes, start, loc, weights)
torch.testing.assert_close(out, layers.ms_deform_attn_reference(value, shapes, loc, weights))
module = layers.MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3)
query = torch.randn(2, 7, 16, generator=g)
ref = torch.rand(2, 7, 2, 2, generator=g)
assert module(query, ref, torch.randn(2, 26, 16, generator=g), shapes, start).shape == (2, 7, 16)

import hybrid_detr
assert hybrid_detr._C is layers._C
try:
    hybrid_detr.add_hybrid_detr_config
except ImportError as e:
    assert "needs detectron2" in str(e), e
else:
    raise AssertionError("hybrid_detr.add_hybrid_detr_config without detectron2")
print("ok")
"""


def test_layers_import_and_run_without_detectron2():
    if not hybrid_detr.layers.extension_available():
        pytest.skip("hybrid_detr.layers._C is not built")
    code = _WITHOUT_DETECTRON2.replace("__ROOT__", repr(PACKAGE_ROOT))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "ok"


def test_the_extension_is_also_hybrid_detr_C():
    """README's `hybrid_detr._C.cpu_kernel_isa()`: the old name is an alias, loaded once."""
    if not hybrid_detr.layers.extension_available():
        pytest.skip("hybrid_detr.layers._C is not built")
    import importlib

    alias = importlib.import_module("hybrid_detr._C")  # as `import hybrid_detr._C` does
    assert alias is hybrid_detr._C is hybrid_detr.layers._C
    assert alias.__name__ == "hybrid_detr.layers._C"
    assert alias.cpu_kernel_isa() in ("baseline", "avx2", "avx512")
