"""CPU tests of the MSDeformAttn op (hybrid_detr.layers._C) against the pure-PyTorch reference."""
import warnings

import pytest
import torch

from hybrid_detr.layers import (
    MSDeformAttn,
    extension_available,
    flop_count_handles,
    ms_deform_attn,
    ms_deform_attn_reference,
)

pytestmark = pytest.mark.skipif(not extension_available(), reason="hybrid_detr.layers._C is not built")

op = torch.ops.hybrid_detr.ms_deform_attn if extension_available() else None


def make_inputs(N, Lq, M, D, shapes, P, dtype=torch.float64, device="cpu", spread=0.3, seed=0, requires_grad=False):
    """Random inputs; `spread` pushes sampling locations outside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(shapes)
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * (1 + 2 * spread) - spread
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    tensors = [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (value, loc, attn)]
    return tensors[0], spatial_shapes.to(device), level_start_index.to(device), tensors[1], tensors[2]


SHAPE_CASES = [
    # (N, Lq, M, D, level shapes, P)
    (1, 7, 1, 1, [(5, 6)], 1),
    (2, 9, 2, 30, [(6, 4), (3, 2)], 2),
    (1, 13, 4, 32, [(8, 8), (4, 4), (2, 2)], 4),
    (2, 5, 3, 64, [(7, 9), (4, 5), (2, 3), (1, 2)], 3),
    (1, 6, 2, 71, [(9, 5), (5, 3), (3, 2), (2, 1), (1, 1)], 8),
    (2, 4, 1, 257, [(3, 5), (2, 3)], 5),
]


@pytest.mark.parametrize("N,Lq,M,D,shapes,P", SHAPE_CASES)
def test_forward_matches_reference_float64(N, Lq, M, D, shapes, P):
    v, ss, lsi, loc, attn = make_inputs(N, Lq, M, D, shapes, P)
    out = op(v, ss, lsi, loc, attn)
    ref = ms_deform_attn_reference(v, ss, loc, attn)
    assert out.shape == (N, Lq, M * D)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("N,Lq,M,D,shapes,P", SHAPE_CASES)
def test_forward_matches_reference_float32(N, Lq, M, D, shapes, P):
    v, ss, lsi, loc, attn = make_inputs(N, Lq, M, D, shapes, P, dtype=torch.float32)
    torch.testing.assert_close(op(v, ss, lsi, loc, attn), ms_deform_attn_reference(v, ss, loc, attn),
                               rtol=1e-4, atol=1e-5)


def test_forward_bfloat16():
    v, ss, lsi, loc, attn = make_inputs(2, 11, 4, 32, [(8, 8), (4, 4), (2, 2)], 4)
    ref = ms_deform_attn_reference(v, ss, loc, attn)
    out = op(v.bfloat16(), ss, lsi, loc.bfloat16(), attn.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_backward_matches_reference_float32_and_bfloat16():
    args = make_inputs(2, 10, 2, 40, [(7, 6), (3, 4)], 3, dtype=torch.float64)
    grad = torch.randn(2, 10, 80, dtype=torch.float64)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        # reference in float64 on the same (rounded) inputs
        ref_in = [t.detach().to(dtype).double().requires_grad_() for t in (args[0], args[3], args[4])]
        ref = ms_deform_attn_reference(ref_in[0], args[1], ref_in[1], ref_in[2])
        ref_grads = torch.autograd.grad(ref, ref_in, grad.to(dtype).double())
        ins = [t.detach().to(dtype).requires_grad_() for t in (args[0], args[3], args[4])]
        out = op(ins[0], args[1], args[2], ins[1], ins[2])
        grads = torch.autograd.grad(out, ins, grad.to(dtype))
        for g, r in zip(grads, ref_grads):
            assert g.dtype == dtype
            torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * 10)


def test_bfloat16_value_with_float32_coordinates():
    """Autocast's mix (bfloat16 value, float32 locations and weights): the value is sampled as
    bfloat16 and accumulated in float32, so the result is the float32 op on the rounded value,
    rounded once; locations and weights keep float32 and so do their gradients."""
    v, ss, lsi, loc, attn = make_inputs(2, 11, 4, 32, [(8, 8), (4, 4), (2, 2)], 4, dtype=torch.float32)
    grad = torch.randn(2, 11, 128)
    v16, g16 = v.bfloat16(), grad.bfloat16()
    ins = [v16.clone().requires_grad_(), loc.clone().requires_grad_(), attn.clone().requires_grad_()]
    out = op(ins[0], ss, lsi, ins[1], ins[2])
    grads = torch.autograd.grad(out, ins, g16)
    ref_ins = [v16.float().requires_grad_(), loc.clone().requires_grad_(), attn.clone().requires_grad_()]
    ref = op(ref_ins[0], ss, lsi, ref_ins[1], ref_ins[2])
    ref_grads = torch.autograd.grad(ref, ref_ins, g16.float())
    assert out.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    torch.testing.assert_close(out, ref.bfloat16(), rtol=0, atol=0)  # one rounding of the same sum
    torch.testing.assert_close(grads[0], ref_grads[0].bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(grads[1], ref_grads[1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grads[2], ref_grads[2], rtol=1e-5, atol=1e-5)
    # All-bfloat16 locations move the samples: measurably further from the float32 result.
    all16 = op(v16, ss, lsi, loc.bfloat16(), attn.bfloat16())
    assert (all16.float() - ref).abs().max() > (out.float() - ref).abs().max()


def test_float16_value_on_the_cpu_is_computed_in_float32():
    v, ss, lsi, loc, attn = make_inputs(1, 6, 2, 8, [(4, 3), (2, 2)], 2, dtype=torch.float32)
    ins = [v.half().requires_grad_(), loc.clone().requires_grad_(), attn.clone().requires_grad_()]
    out = op(ins[0], ss, lsi, ins[1], ins[2])
    grads = torch.autograd.grad(out, ins, torch.ones_like(out))
    assert out.dtype == torch.float16 and [g.dtype for g in grads] == [torch.float16, torch.float32, torch.float32]
    torch.testing.assert_close(out, op(v.half().float(), ss, lsi, loc, attn).half())


def test_reference_takes_the_mixed_dtypes():
    v, ss, lsi, loc, attn = make_inputs(1, 6, 2, 8, [(4, 3), (2, 2)], 2, dtype=torch.float32)
    out = ms_deform_attn_reference(v.bfloat16(), ss, loc, attn)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ms_deform_attn_reference(v.bfloat16().float(), ss, loc, attn).bfloat16())


def test_gradcheck_float64():
    v, ss, lsi, loc, attn = make_inputs(2, 3, 2, 5, [(4, 3), (2, 2)], 2, requires_grad=True)
    # Keep locations away from pixel borders, where bilinear interpolation is not differentiable.
    with torch.no_grad():
        for lvl, (h, w) in enumerate([(4, 3), (2, 2)]):
            size = torch.tensor([w, h], dtype=torch.float64)
            pix = loc[:, :, :, lvl] * size - 0.5
            frac = pix - pix.floor()
            loc[:, :, :, lvl] += (0.5 - frac).sign() * (frac - 0.5).abs().lt(0.45).logical_not() * 0.1 / size
    assert torch.autograd.gradcheck(
        lambda v_, l_, a_: op(v_, ss, lsi, l_, a_), (v, loc, attn), eps=1e-6, atol=1e-5
    )


def test_gradient_matches_reference_with_outside_points():
    v, ss, lsi, loc, attn = make_inputs(1, 20, 2, 7, [(5, 4), (3, 3)], 4, spread=0.6, requires_grad=True)
    out = op(v, ss, lsi, loc, attn)
    ref = ms_deform_attn_reference(v, ss, loc, attn)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (v, loc, attn), grad)
    want = torch.autograd.grad(ref, (v, loc, attn), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_opcheck():
    for requires_grad in (False, True):
        args = make_inputs(2, 5, 2, 8, [(4, 3), (2, 2)], 2, dtype=torch.float32, requires_grad=requires_grad)
        torch.library.opcheck(op, args)
        # autocast's mix: bfloat16 value, float32 locations and weights
        mixed = [args[0].detach().bfloat16().requires_grad_(requires_grad)] + list(args[1:])
        torch.library.opcheck(op, mixed)


def test_torch_compile_fullgraph():
    # Compiled forward and backward against the pure-PyTorch reference (not the same kernel again):
    # a wrong fake kernel or autograd registration under compile would show here.
    v, ss, lsi, loc, attn = make_inputs(1, 6, 2, 8, [(4, 3), (2, 2)], 2, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(lambda *a: op(*a) * 2, fullgraph=True, backend="aot_eager")
    out = compiled(v, ss, lsi, loc, attn)
    ref = ms_deform_attn_reference(v, ss, loc, attn) * 2
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (v, loc, attn), grad)
    want = torch.autograd.grad(ref, (v, loc, attn), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_non_contiguous_inputs():
    v, ss, lsi, loc, attn = make_inputs(2, 6, 3, 16, [(5, 5), (3, 2)], 3)
    v_nc = v.transpose(0, 2).contiguous().transpose(0, 2)  # same values, permuted strides
    loc_nc = torch.stack([loc, loc], dim=-1)[..., 0]       # strided last dim
    attn_nc = attn.permute(4, 3, 2, 1, 0).contiguous().permute(4, 3, 2, 1, 0)
    assert not (v_nc.is_contiguous() or loc_nc.is_contiguous() or attn_nc.is_contiguous())
    torch.testing.assert_close(loc_nc, loc)
    out = op(v_nc, ss, lsi, loc_nc, attn_nc)
    torch.testing.assert_close(out, op(v, ss, lsi, loc, attn), rtol=0, atol=0)
    # non-contiguous grad_output
    v_nc.requires_grad_()
    grad = torch.randn(out.shape[2], out.shape[1], out.shape[0], dtype=out.dtype).permute(2, 1, 0)
    (g_nc,) = torch.autograd.grad(op(v_nc, ss, lsi, loc_nc, attn_nc), v_nc, grad)
    v.requires_grad_()
    (g,) = torch.autograd.grad(op(v, ss, lsi, loc, attn), v, grad.contiguous())
    torch.testing.assert_close(g_nc, g)


@pytest.mark.parametrize("N,Lq", [(0, 5), (2, 0)])
def test_empty(N, Lq):
    v, ss, lsi, loc, attn = make_inputs(N, Lq, 2, 8, [(4, 3), (2, 2)], 2, requires_grad=True)
    out = op(v, ss, lsi, loc, attn)
    assert out.shape == (N, Lq, 16)
    out.sum().backward()
    assert v.grad.shape == v.shape and loc.grad.shape == loc.shape and attn.grad.shape == attn.shape
    assert v.grad.abs().sum() == 0


def _bad(**changes):
    v, ss, lsi, loc, attn = make_inputs(1, 4, 2, 8, [(4, 3), (2, 2)], 2, dtype=torch.float32)
    args = dict(value=v, spatial_shapes=ss, level_start_index=lsi, sampling_locations=loc, attention_weights=attn)
    args.update({k: (f(args[k]) if callable(f) else f) for k, f in changes.items()})
    return list(args.values())


BAD_INPUTS = [
    (dict(value=lambda t: t[0]), r"value must be \(N, S, M, D\)"),
    (dict(sampling_locations=lambda t: t[..., 0]), r"sampling_locations must be \(N, Lq, M, L, P, 2\)"),
    (dict(attention_weights=lambda t: t[..., :1]), r"attention_weights must be \(N, Lq, M, L, P\)"),
    (dict(attention_weights=lambda t: t[0]), r"attention_weights must be \(N, Lq, M, L, P\)"),
    (dict(spatial_shapes=lambda t: t.flatten()), r"spatial_shapes must be \(L, 2\)"),
    (dict(spatial_shapes=lambda t: t[:1]), r"spatial_shapes has 1 levels"),
    (dict(spatial_shapes=lambda t: t.int()), r"spatial_shapes must be int64"),
    (dict(level_start_index=lambda t: t.int()), r"level_start_index must be int64"),
    (dict(level_start_index=lambda t: t[:1]), r"level_start_index has 1 entries"),
    (dict(level_start_index=lambda t: t + 1), r"level_start_index\[0\] = 1 is inconsistent"),
    (dict(spatial_shapes=lambda t: t * 2, level_start_index=torch.tensor([0, 48])),
     r"sum over levels of H\*W from spatial_shapes is 64 but value has S = 16"),
    (dict(value=lambda t: t[:, :, :1]), r"does not match value"),
    (dict(sampling_locations=lambda t: t.double()), r"sampling_locations must have the dtype of value \(Float\), "
                                                     r"got Double"),
    (dict(value=lambda t: t.bfloat16(), sampling_locations=lambda t: t.double(), attention_weights=lambda t: t.double()),
     r"sampling_locations must have the dtype of value \(BFloat16\) or float32, got Double"),
    (dict(value=lambda t: t.bfloat16(), attention_weights=lambda t: t.bfloat16()),
     r"attention_weights must have the dtype of sampling_locations \(Float\), got BFloat16"),
    (dict(attention_weights=lambda t: t.double()), r"attention_weights must have the dtype of sampling_locations"),
    (dict(value=lambda t: t.long(), sampling_locations=lambda t: t.long(), attention_weights=lambda t: t.long()),
     r"value must be a floating-point tensor"),
]


@pytest.mark.parametrize("changes,match", BAD_INPUTS)
def test_bad_inputs(changes, match):
    with pytest.raises(RuntimeError, match=match):
        op(*_bad(**changes))


# Inputs the reference must refuse as the kernel does (the dtype pairs above are the kernel's own rules:
# the reference computes any floating mix in the widest dtype).
REFERENCE_BAD_INPUTS = [case for case in BAD_INPUTS if "dtype of" not in case[1] and "int64" not in case[1]] + [
    (dict(spatial_shapes=lambda t: t.float()), r"spatial_shapes must be int64 \(torch.long\), got torch.float32"),
    (dict(level_start_index=lambda t: t.float()), r"level_start_index must be int64 \(torch.long\), got torch.float32"),
    (dict(sampling_locations=lambda t: t.long()), r"sampling_locations must be a floating-point tensor, got torch.int64"),
    (dict(attention_weights=lambda t: t.int()), r"attention_weights must be a floating-point tensor, got torch.int32"),
    (dict(spatial_shapes=torch.tensor([[-4, 3], [2, 2]]), level_start_index=torch.tensor([0, -12]),
          value=lambda t: t[:, :-8]), r"spatial_shapes\[0\] = \(-4, 3\) must not be negative"),
]


@pytest.mark.parametrize("changes,match", REFERENCE_BAD_INPUTS)
def test_reference_path_refuses_what_the_kernel_refuses(changes, match):
    """The wrapper's fallback (CPU float16 has no kernel there) and the reference itself check as the op."""
    args = _bad(**changes)
    with pytest.raises(RuntimeError, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ms_deform_attn(*[t.half() if i in (0, 3, 4) and t.is_floating_point() else t for i, t in enumerate(args)])
    with pytest.raises(RuntimeError, match=match):
        ms_deform_attn_reference(args[0], args[1], args[3], args[4], level_start_index=args[2])


def test_integer_value_is_refused_not_truncated():
    v, ss, lsi, loc, attn = _bad()
    value = (v * 10).long()
    with pytest.raises(RuntimeError, match=r"ms_deform_attn: value must be a floating-point tensor, got torch.int64"):
        ms_deform_attn(value, ss, lsi, loc, attn)
    with pytest.raises(RuntimeError, match=r"value must be a floating-point tensor, got torch.int64"):
        ms_deform_attn_reference(value, ss, loc, attn)


def test_reference_without_level_start_index_still_checks_the_level_sizes():
    v, ss, _, loc, attn = _bad()
    with pytest.raises(RuntimeError, match=r"sum over levels of H\*W from spatial_shapes is 64 but value has S = 16"):
        ms_deform_attn_reference(v, ss * 2, loc, attn)
    with pytest.raises(RuntimeError, match=r"sum over levels of H\*W from spatial_shapes is 64 but value has S = 16"):
        ms_deform_attn_reference(v, [(8, 6), (4, 4)], loc, attn)


# The layout check the CUDA path runs on the device (tensor ops + _assert_async, no host copy), run
# here on CPU tensors, where the same assertion raises at once.
LAYOUTS = [
    ([[4, 3], [2, 2]], [0, 12], 16, True),
    ([[4, 3], [2, 2]], [0, 13], 16, False),  # start not the exclusive cumsum
    ([[4, 3], [2, 2]], [1, 12], 16, False),
    ([[4, 3], [2, 2]], [0, 12], 17, False),  # sum of H*W != S
    ([[-4, 3], [2, 2]], [0, -12], -8, False),  # negative H, otherwise consistent
    ([[0, 3], [2, 2]], [0, 0], 4, True),  # an empty level is allowed
]


@pytest.mark.parametrize("shapes,starts,num_keys,consistent", LAYOUTS)
def test_device_side_level_layout_check(shapes, starts, num_keys, consistent):
    check = torch.ops.hybrid_detr._check_level_layout
    shapes, starts = torch.tensor(shapes), torch.tensor(starts)
    if consistent:
        check(shapes, starts, num_keys)
    else:
        with pytest.raises(RuntimeError, match=r"spatial_shapes / level_start_index / value are inconsistent"):
            check(shapes, starts, num_keys)
    with pytest.raises(RuntimeError, match=r"no levels in spatial_shapes but value has S = 3"):
        check(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long), 3)


def test_bad_grad_output():
    v, ss, lsi, loc, attn = make_inputs(1, 4, 2, 8, [(4, 3), (2, 2)], 2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"grad_output must be \(N, Lq, M\*D\)"):
        torch.ops.hybrid_detr._ms_deform_attn_backward(torch.zeros(1, 4, 15), v, ss, lsi, loc, attn)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to put tensors on another device")
def test_device_mismatch():
    with pytest.raises(RuntimeError, match=r"spatial_shapes is on cpu but value is on cuda"):
        op(*_bad(value=lambda t: t.cuda(), sampling_locations=lambda t: t.cuda(), attention_weights=lambda t: t.cuda(),
                 level_start_index=lambda t: t.cuda()))


def test_wrapper_takes_the_compiled_op_when_it_has_a_kernel(monkeypatch):
    args = make_inputs(1, 4, 2, 8, [(4, 3), (2, 2)], 2, dtype=torch.float64)
    calls = []
    import hybrid_detr.layers.ms_deform_attn_func as func

    monkeypatch.setattr(func, "ms_deform_attn_reference", lambda *a, **k: calls.append("reference"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the compiled path must not warn
        out = ms_deform_attn(*args)
    assert calls == [], "the wrapper ran the reference although the op has a float64 CPU kernel"
    torch.testing.assert_close(out, ms_deform_attn_reference(args[0], args[1], args[3], args[4]),
                               rtol=1e-12, atol=1e-12)


# A process where `hybrid_detr.layers._C` cannot be loaded (as when the extension was never built).
_WITHOUT_EXTENSION = r"""
import sys, warnings

class BlockExtension:
    def find_spec(self, name, path=None, target=None):
        if name in ("hybrid_detr.layers._C", "hybrid_detr._C"):
            raise ImportError(f"{name} blocked by the test")
        return None

sys.meta_path.insert(0, BlockExtension())
import torch
import hybrid_detr.layers as layers
import hybrid_detr.layers.ms_deform_attn_func as func

assert not layers.extension_available()
assert not hasattr(torch.ops.hybrid_detr, "ms_deform_attn"), "the op got registered without the extension"
ran = []
reference = func.ms_deform_attn_reference
func.ms_deform_attn_reference = lambda *a, **k: ran.append(1) or reference(*a, **k)
g = torch.Generator().manual_seed(0)
shapes, start = torch.tensor([[4, 5], [2, 3]]), torch.tensor([0, 20])
value = torch.randn(2, 26, 2, 8, generator=g, dtype=torch.float64)
loc = torch.rand(2, 7, 2, 2, 3, 2, generator=g, dtype=torch.float64)
weights = torch.rand(2, 7, 2, 2, 3, generator=g, dtype=torch.float64).softmax(-1)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = layers.ms_deform_attn(value, shapes, start, loc, weights)
    layers.ms_deform_attn(value, shapes, start, loc, weights)  # warned once per device and dtype
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert len(messages) == 1, messages
assert "falls back to the slow pure-PyTorch reference" in messages[0] and "pip install" in messages[0], messages
assert ran == [1, 1], ran
torch.save(dict(out=out, value=value, loc=loc, weights=weights), sys.argv[1])
try:
    layers.ms_deform_attn(value, shapes, start + 1, loc, weights)
except RuntimeError as e:
    assert "level_start_index[0] = 1 is inconsistent" in str(e), e
else:
    raise AssertionError("the fallback accepted a wrong level_start_index")
print("ok")
"""


def test_fallback_when_the_extension_is_missing(tmp_path):
    import os
    import subprocess
    import sys

    saved = tmp_path / "fallback.pt"
    res = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION, str(saved)], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "ok"
    # The fallback's output is the compiled op's (computed here, where the extension is loaded).
    got = torch.load(saved)
    shapes, start = torch.tensor([[4, 5], [2, 3]]), torch.tensor([0, 20])
    torch.testing.assert_close(got["out"], op(got["value"], shapes, start, got["loc"], got["weights"]),
                               rtol=1e-12, atol=1e-12)


# -- module ---------------------------------------------------------------------------------------
def _module_inputs(N, Lq, d_model, shapes, ref_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(shapes, dtype=torch.int64)
    areas = ss.prod(1)
    lsi = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S = int(areas.sum())
    query = torch.randn(N, Lq, d_model, generator=g)
    value = torch.randn(N, S, d_model, generator=g)
    ref = torch.rand(N, Lq, len(shapes), ref_dim, generator=g)
    if ref_dim == 4:
        ref[..., 2:] = ref[..., 2:] * 0.5 + 0.05
    mask = torch.zeros(N, S, dtype=torch.bool)
    mask[0, S // 2:] = True
    return query, ref, value, ss, lsi, mask


@pytest.mark.parametrize("ref_dim", [2, 4])
@pytest.mark.parametrize("use_mask", [False, True])
def test_module_matches_reference_path(ref_dim, use_mask):
    torch.manual_seed(0)
    shapes = [(8, 10), (4, 5), (2, 3)]
    m = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=3)
    with torch.no_grad():  # non-trivial offsets and logits
        m.sampling_offsets.weight.normal_(std=0.5)
        m.attention_weights.weight.normal_(std=0.5)
    q, ref, value, ss, lsi, mask = _module_inputs(2, 9, 32, shapes, ref_dim)
    mask = mask if use_mask else None
    out = m(q, ref, value, ss, lsi, mask)
    m.use_reference = True
    expected = m(q, ref, value, ss, lsi, mask)
    assert out.shape == (2, 9, 32)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # gradients reach every parameter and agree
    grads = {}
    for use_ref in (False, True):
        m.use_reference = use_ref
        m.zero_grad()
        m(q, ref, value, ss, lsi, mask).square().sum().backward()
        grads[use_ref] = {k: p.grad.clone() for k, p in m.named_parameters()}
    for k in grads[True]:
        torch.testing.assert_close(grads[False][k], grads[True][k], rtol=1e-3, atol=1e-4, msg=k)


def test_module_padding_mask_zeroes_padded_keys():
    m = MSDeformAttn(d_model=16, n_levels=1, n_heads=2, n_points=2)
    q, ref, value, ss, lsi, _ = _module_inputs(1, 5, 16, [(4, 4)], 2)
    mask = torch.ones(1, 16, dtype=torch.bool)
    out = m(q, ref, value, ss, lsi, mask)
    torch.testing.assert_close(out, m.output_proj.bias.expand_as(out))


def test_module_init_and_steps():
    m = MSDeformAttn(d_model=64, n_levels=2, n_heads=8, n_points=3)
    assert isinstance(m.sampling_offsets, torch.nn.Linear) and isinstance(m.output_proj, torch.nn.Linear)
    assert m.sampling_offsets.weight.abs().sum() == 0 and m.attention_weights.weight.abs().sum() == 0
    bias = m.sampling_offsets.bias.view(8, 2, 3, 2)
    torch.testing.assert_close(bias[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))
    torch.testing.assert_close(bias[2, 1], torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 3.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[1], bias[1, :1].expand(2, 3, 2))  # same on every level
    q, ref, _, ss, _, _ = _module_inputs(2, 5, 64, [(4, 4), (2, 2)], 2)
    loc, logits = m.sampling_locations_and_logits(q, ref, ss)
    assert loc.shape == (2, 5, 8, 2, 3, 2) and logits.shape == (2, 5, 8, 2, 3)
    # with zero weights: location = reference + bias / (W, H)
    torch.testing.assert_close(loc[:, :, 0, 0, 0], ref[:, :, 0] + torch.tensor([1 / 4, 0.0]))
    weights = m.attention_weights_from_logits(logits)
    torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(2, 5, 8))


def test_flop_count_handle():
    import fvcore.nn as fvcore  # a dependency of the package (setup.py)
    m = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    q, ref, value, ss, lsi, _ = _module_inputs(2, 7, 32, [(4, 4), (2, 2)], 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flops = fvcore.FlopCountAnalysis(m, (q, ref, value, ss, lsi))
        flops.set_op_handle(**flop_count_handles())
        flops.unsupported_ops_warnings(False)
        by_op = flops.by_operator()
    assert by_op["ms_deform_attn"] == 2 * 7 * 4 * 2 * 3 * 8 * 5  # fvcore drops the namespace


@pytest.mark.parametrize("use_reference", [False, True])
def test_module_under_autocast_samples_bfloat16_values_at_float32_locations(monkeypatch, use_reference):
    import importlib

    module = importlib.import_module("hybrid_detr.layers.ms_deform_attn")  # the package exports a function of that name
    seen = {}
    name = "ms_deform_attn_reference" if use_reference else "ms_deform_attn"
    original = getattr(module, name)

    def record(value, *args):
        seen.update(value=value.dtype, locations=args[-2].dtype, weights=args[-1].dtype)
        return original(value, *args)

    monkeypatch.setattr(module, name, record)
    m = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2, use_reference=use_reference)
    q, ref, value, ss, lsi, _ = _module_inputs(1, 5, 16, [(4, 4), (2, 2)], 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(q, ref, value, ss, lsi)
    assert seen == {"value": torch.bfloat16, "locations": torch.float32, "weights": torch.float32}
    assert out.shape == (1, 5, 16) and torch.isfinite(out).all()
    # Outside autocast everything is float32; float64 locations promote the value.
    m(q, ref, value, ss, lsi)
    assert seen == {"value": torch.float32, "locations": torch.float32, "weights": torch.float32}
    m.sample(value.view(1, 20, 2, 8), ss, lsi, torch.rand(1, 5, 2, 2, 2, 2, dtype=torch.float64),
             torch.rand(1, 5, 2, 2, 2))
    assert seen == {"value": torch.float64, "locations": torch.float64, "weights": torch.float64}


def test_native_bfloat16_sampling_is_exact_under_autocast(monkeypatch):
    """Under autocast the value is already bfloat16 and the output feeds a bfloat16 matmul: sampling
    the bfloat16 value natively gives bit-identical outputs and gradients to sampling a float32
    copy of it (what the module did before), without the float32 copies."""
    torch.manual_seed(0)
    m = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    q, ref, value, ss, lsi, _ = _module_inputs(2, 9, 32, [(8, 8), (4, 4)], 2)

    def run():
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(q, ref, value, ss, lsi)
        out.float().square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    native, native_grads = run()
    monkeypatch.setattr(m, "sample", lambda v, s_, i_, loc, w: ms_deform_attn(v.float(), s_, i_, loc.float(), w.float()))
    copied, copied_grads = run()
    assert torch.equal(native, copied)
    assert all(torch.equal(native_grads[k], copied_grads[k]) for k in native_grads)


# -- CPU kernel variants (baseline / AVX2 / AVX-512), chosen at run time ----------------------------
_VARIANT_CHECK = r"""
import sys, torch
sys.path.insert(0, {root!r})
from hybrid_detr.layers import _C
from hybrid_detr.layers import ms_deform_attn_reference
sys.path.insert(0, {here!r})
from test_ms_deform_attn import make_inputs
cap = torch.backends.cpu.get_cpu_capability()
built = _C.cpu_kernel_variants().split(",")
# the best variant built that this capability allows
allowed = {{"AVX512": ["avx512", "avx2"], "AVX2": ["avx2"]}}.get(cap, [])
want = next((v for v in allowed if v in built), "baseline")
assert _C.cpu_kernel_isa() == want, (cap, built, _C.cpu_kernel_isa())
op = torch.ops.hybrid_detr.ms_deform_attn
for D in (1, 7, 16, 32, 40, 71):
    args = make_inputs(2, 9, 2, D, [(6, 7), (3, 4), (1, 2)], 3, spread=0.2)
    grad = torch.randn(2, 9, 2 * D, dtype=torch.float64)
    # (value dtype, locations / weights dtype, tolerance); the last is autocast's mix
    for dtype, coords, tol in ((torch.float64, torch.float64, 1e-12), (torch.float32, torch.float32, 1e-4),
                               (torch.bfloat16, torch.bfloat16, 5e-2), (torch.bfloat16, torch.float32, 5e-2)):
        types = (dtype, coords, coords)
        ref_in = [t.detach().to(d).double().requires_grad_() for t, d in zip((args[0], args[3], args[4]), types)]
        ref = ms_deform_attn_reference(ref_in[0], args[1], ref_in[1], ref_in[2])
        ref_grads = torch.autograd.grad(ref, ref_in, grad.to(dtype).double())
        ins = [t.detach().to(d).requires_grad_() for t, d in zip((args[0], args[3], args[4]), types)]
        out = op(ins[0], args[1], args[2], ins[1], ins[2])
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
        grads = torch.autograd.grad(out, ins, grad.to(dtype))
        assert [g.dtype for g in grads] == list(types)
        for g, r in zip(grads, ref_grads):
            scale = max(1.0, r.abs().max().item())
            torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * scale)
print("ok", cap, want)
"""


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_cpu_kernel_variants(capability):
    """Each ISA build of the CPU kernels, selected with ATEN_CPU_CAPABILITY as ATen's kernels are
    (a CPU without the instructions keeps its best supported one), against the reference."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.join(os.path.dirname(os.path.dirname(here)), "projects", "HybridDETR")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", _VARIANT_CHECK.format(root=root, here=here)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().startswith("ok")


@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="torch without OpenMP: ATen runs serially")
def test_cpu_kernels_use_torchs_threads():
    """The kernels' at::parallel_for is a header template: without -fopenmp in our build it would run
    every loop on one thread whatever torch.set_num_threads says (as it did before the fix)."""
    from hybrid_detr.layers import _C

    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert _C.cpu_parallel_threads() == n
    finally:
        torch.set_num_threads(threads)


def test_backward_is_deterministic_and_thread_independent():
    args = make_inputs(2, 30, 4, 16, [(9, 8), (5, 4), (3, 2)], 4, dtype=torch.float32, requires_grad=True)
    grad = torch.randn(2, 30, 64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            results.append(torch.autograd.grad(op(*args), (args[0], args[3], args[4]), grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_all_samples_outside_give_exact_zeros():
    # The forward output and grad_loc / grad_attn are allocated uninitialised: every element must be written.
    v, ss, lsi, loc, attn = make_inputs(2, 6, 2, 32, [(4, 3), (2, 2)], 2, dtype=torch.float32, requires_grad=True)
    with torch.no_grad():
        loc.fill_(3.0)
    out = op(v, ss, lsi, loc, attn)
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out, (v, loc, attn), torch.randn_like(out))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def test_location_gradient_at_minus_one_matches_grid_sample():
    """At pixel coordinate exactly -1 (loc = -0.5 / W) the sample is 0 but grid_sample's location
    gradient is the right-sided one, through the corner at 0; at exactly W (or H) it is 0."""
    H, W = 4, 4
    ss = torch.tensor([[H, W]])
    lsi = torch.tensor([0])
    g = torch.Generator().manual_seed(0)
    value = torch.randn(1, H * W, 1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    at_minus_one, inside, at_end = -0.5 / W, 0.3, (W + 0.5) / W
    points = [(at_minus_one, inside), (inside, at_minus_one), (at_minus_one, at_minus_one), (at_end, inside),
              (inside, at_end), (inside, inside)]
    loc = torch.tensor(points, dtype=torch.float64).view(1, 1, 1, 1, len(points), 2).requires_grad_()
    attn = torch.rand(1, 1, 1, 1, len(points), generator=g, dtype=torch.float64).requires_grad_()
    out = op(value, ss, lsi, loc, attn)
    ref = ms_deform_attn_reference(value, ss, loc, attn)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (value, loc, attn), grad)
    want = torch.autograd.grad(ref, (value, loc, attn), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    gl = got[1].view(-1, 2)
    assert gl[0, 0] != 0 and gl[1, 1] != 0  # right-sided, not zero
    assert gl[3, 0] == 0 and gl[4, 1] == 0


def fma_discriminating_inputs():
    """float32 locations next to pixel centres where one rounding of loc * W - 0.5 (an fma) and two
    roundings (multiply, then subtract) fall on different sides of the centre, on a single row of
    width W with value[x] = x**2, so that the location gradient tells which side was taken.

    Returns the op's inputs and the expected x-gradients (the fma side)."""
    import numpy as np

    locs, widths = [], []
    for W in (3, 5, 7, 11, 13, 25, 37, 100):
        for k in range(W):
            c = np.float32((k + 0.5) / W)
            for steps in range(-4, 5):
                x = np.float32(c)
                for _ in range(abs(steps)):
                    x = np.nextafter(x, np.float32(np.sign(steps) * 10))
                fma = np.float32(np.float64(x) * W - 0.5)  # exact product and difference, one rounding
                two = np.float32(np.float32(x * np.float32(W)) - np.float32(0.5))
                if np.floor(fma) != np.floor(two):
                    locs.append(float(x))
                    widths.append(W)
    assert locs, "no float32 location separates one rounding from two"
    # One level per sample point would be awkward: use one level per distinct W.
    Ws = sorted(set(widths))
    ss = torch.tensor([[1, w] for w in Ws])
    areas = ss.prod(1)
    lsi = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    value = torch.cat([torch.arange(w, dtype=torch.float32) ** 2 for w in Ws]).view(1, -1, 1, 1)
    L, P = len(Ws), max(widths.count(w) for w in Ws)
    loc = torch.full((1, 1, 1, L, P, 2), 5.0)  # unused slots: outside
    loc[..., 1] = 0.5  # y = 0: the row's centre line
    expected = torch.zeros(1, 1, 1, L, P)
    used = [0] * L
    for x, w in zip(locs, widths):
        lvl = Ws.index(w)
        p = used[lvl]
        used[lvl] += 1
        loc[0, 0, 0, lvl, p, 0] = x
        x0 = int(np.floor(np.float32(np.float64(np.float32(x)) * w - 0.5)))
        v = lambda j: float(j * j) if 0 <= j < w else 0.0  # noqa: E731
        expected[0, 0, 0, lvl, p] = w * (v(x0 + 1) - v(x0))  # attention weight 1, grad_output 1
    attn = torch.ones(1, 1, 1, L, P)
    return (value, ss, lsi, loc, attn), expected


def test_pixel_coordinate_is_one_rounding():
    """loc * W - 0.5 is one fma on CPU and CUDA alike, so both take the same one-sided location gradient
    at pixel centres (nvcc contracts to an fma by itself; a CPU compiler may not)."""
    (value, ss, lsi, loc, attn), expected = fma_discriminating_inputs()
    loc.requires_grad_()
    out = op(value, ss, lsi, loc, attn)
    (g,) = torch.autograd.grad(out, loc, torch.ones_like(out))
    inside = loc[..., 0] < 1
    torch.testing.assert_close(g[..., 0][inside], expected[inside], rtol=1e-5, atol=1e-3)


def test_cuda_backward_alert_logic(monkeypatch, capfd):
    """The CUDA backward's choice, checked on the host: atomics by default; with
    torch.use_deterministic_algorithms(True) the deterministic path; forcing atomics then alerts."""
    def mode():
        return "deterministic" if torch.ops.hybrid_detr._cuda_backward_deterministic() else "atomic"

    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    monkeypatch.delenv("HYBRID_DETR_CUDA_BACKWARD", raising=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.use_deterministic_algorithms(False)
            assert mode() == "atomic"
            torch.use_deterministic_algorithms(True)
            assert mode() == "deterministic"
        monkeypatch.setenv("HYBRID_DETR_CUDA_BACKWARD", "atomic")
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward_cuda"):
            mode()
        torch.use_deterministic_algorithms(True, warn_only=True)
        capfd.readouterr()
        assert mode() == "atomic"
        # a C++ warning (TORCH_WARN): a custom op's call does not turn it into a Python warning
        assert "ms_deform_attn_backward_cuda does not have a deterministic" in capfd.readouterr().err
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)


def test_setup_defaults(monkeypatch):
    """Without a visible GPU setup.py builds every architecture CUDA 13 supports that users have
    (Turing included), and on x86-64 the CPU kernels for the baseline, AVX2 and AVX-512."""
    import importlib.util
    import os
    import platform

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("hybrid_detr_setup", os.path.join(root, "setup.py"))
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # setup() itself only runs under __main__
    assert setup.DEFAULT_CUDA_ARCH_LIST == "7.5;8.0;8.6;8.9;9.0+PTX"
    names = [name for name, _, _ in setup._cpu_isa_variants()]
    assert names[0] == "baseline"
    if platform.machine().lower() in ("x86_64", "amd64") and os.environ.get("HYBRID_DETR_CPU_BASELINE_ONLY") != "1":
        assert names == ["baseline", "avx2", "avx512"]
    cuda_home = setup._find_cuda_home()
    if not (torch.version.cuda and cuda_home) or torch.cuda.is_available():
        pytest.skip("needs a CUDA build of torch, a CUDA toolkit and no visible GPU")
    monkeypatch.chdir(root)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "")
    monkeypatch.setenv("FORCE_CUDA", "1")
    monkeypatch.delenv("HYBRID_DETR_NO_CUDA", raising=False)
    setup.get_extensions(cuda_home)
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "7.5;8.0;8.6;8.9;9.0+PTX"
