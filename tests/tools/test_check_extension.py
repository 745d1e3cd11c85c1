"""tools/check_extension.py: the smoke check bootstrap.sh and gpu_check.sh run right after building."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from hybrid_detr.layers import extension_available, ms_deform_attn_reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tools", "check_extension.py")
needs_extension = pytest.mark.skipif(not extension_available(), reason="hybrid_detr.layers._C is not built")


def _load():
    spec = importlib.util.spec_from_file_location("check_extension", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_extension
def test_the_built_extension_passes_in_a_subprocess():
    result = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check_extension: OK on cpu" in result.stdout


def test_an_op_that_accepts_a_wrong_layout_fails_the_check():
    check = _load().check

    def ignores_the_layout(value, shapes, starts, locations, weights):
        return ms_deform_attn_reference(value, shapes, locations, weights)

    assert check("cpu", op=ignores_the_layout) == "cpu: a wrong level_start_index was accepted"


def test_an_op_with_another_message_fails_the_check():
    check = _load().check

    def vague(value, shapes, starts, locations, weights):
        if starts[1] != 12:
            raise RuntimeError("bad input")
        return ms_deform_attn_reference(value, shapes, locations, weights)

    assert check("cpu", op=vague) == "cpu: unexpected error message: bad input"
