"""CUDA tests of the MSDeformAttn op: the CPU test comparisons, on the GPU, for fp32/fp16/bf16.

Skipped without a GPU (CI has none); run them on a GPU machine after building with CUDA kernels.
"""
import pytest
import torch

from hybrid_detr.layers import MSDeformAttn, extension_available, ms_deform_attn, ms_deform_attn_reference

from test_ms_deform_attn import SHAPE_CASES, _module_inputs, fma_discriminating_inputs, make_inputs


def _cuda_kernels_built():
    if not extension_available():
        return False
    from hybrid_detr.layers import _C

    return bool(_C.with_cuda())


pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(
        torch.cuda.is_available() and not _cuda_kernels_built(),
        reason="hybrid_detr.layers._C was built without CUDA kernels (rebuild with FORCE_CUDA=1)",
    ),
]

DEV = "cuda"
# (dtype, forward tolerance, gradient tolerance) against a float64 reference on the same rounded inputs.
TOLS = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-2),
    torch.bfloat16: (2e-2, 1e-1),
}


def op(*args):
    return torch.ops.hybrid_detr.ms_deform_attn(*args)


def _reference_on_rounded(args, dtype, grad=None):
    """float64 reference on the inputs rounded to `dtype`, with gradients when `grad` is given."""
    v, ss, lsi, loc, attn = args
    ins = [t.detach().to(dtype).double().requires_grad_(grad is not None) for t in (v, loc, attn)]
    out = ms_deform_attn_reference(ins[0], ss, ins[1], ins[2])
    if grad is None:
        return out, None
    return out, torch.autograd.grad(out, ins, grad.to(dtype).double())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,Lq,M,D,shapes,P", SHAPE_CASES)
def test_forward_matches_reference(N, Lq, M, D, shapes, P, dtype):
    args = make_inputs(N, Lq, M, D, shapes, P, dtype=torch.float64, device=DEV)
    ref, _ = _reference_on_rounded(args, dtype)
    v, ss, lsi, loc, attn = args
    out = op(v.to(dtype), ss, lsi, loc.to(dtype), attn.to(dtype))
    assert out.dtype == dtype and out.device.type == "cuda" and out.shape == (N, Lq, M * D)
    tol = TOLS[dtype][0]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,Lq,M,D,shapes,P", SHAPE_CASES[1:5])
def test_backward_matches_reference(N, Lq, M, D, shapes, P, dtype):
    args = make_inputs(N, Lq, M, D, shapes, P, dtype=torch.float64, device=DEV)
    grad = torch.randn(N, Lq, M * D, dtype=torch.float64, device=DEV)
    _, ref_grads = _reference_on_rounded(args, dtype, grad)
    v, ss, lsi, loc, attn = args
    ins = [t.detach().to(dtype).requires_grad_() for t in (v, loc, attn)]
    out = op(ins[0], ss, lsi, ins[1], ins[2])
    grads = torch.autograd.grad(out, ins, grad.to(dtype))
    tol = TOLS[dtype][1]
    for name, g, r in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape
        # location gradients scale with the level size: compare relative to their magnitude
        scale = max(1.0, r.abs().max().item()) if name == "sampling_locations" else 1.0
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * scale, msg=name)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,Lq,M,D,shapes,P", SHAPE_CASES[1:5])
def test_half_value_with_float32_coordinates(N, Lq, M, D, shapes, P, dtype, deterministic):
    """Autocast's mix: half-type value, float32 locations and weights (and their gradients)."""
    args = make_inputs(N, Lq, M, D, shapes, P, dtype=torch.float64, device=DEV)
    grad = torch.randn(N, Lq, M * D, dtype=torch.float64, device=DEV)
    v, ss, lsi, loc, attn = args
    types = (dtype, torch.float32, torch.float32)
    ref_in = [t.detach().to(d).double().requires_grad_() for t, d in zip((v, loc, attn), types)]
    ref = ms_deform_attn_reference(ref_in[0], ss, ref_in[1], ref_in[2])
    ref_grads = torch.autograd.grad(ref, ref_in, grad.to(dtype).double())
    ins = [t.detach().to(d).requires_grad_() for t, d in zip((v, loc, attn), types)]
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(deterministic)
        out = op(ins[0], ss, lsi, ins[1], ins[2])
        grads = torch.autograd.grad(out, ins, grad.to(dtype))
    finally:
        torch.use_deterministic_algorithms(was)
    assert out.dtype == dtype and [g.dtype for g in grads] == list(types)
    torch.testing.assert_close(out.double(), ref, rtol=TOLS[dtype][0], atol=TOLS[dtype][0])
    tol = TOLS[dtype][1]
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * max(1.0, r.abs().max().item()))


def test_cpu_and_cuda_agree_float32():
    args = make_inputs(2, 50, 8, 32, [(20, 30), (10, 15), (5, 8), (3, 4)], 4, dtype=torch.float32,
                       requires_grad=True)
    out_cpu = op(*args)
    grad = torch.randn_like(out_cpu)
    g_cpu = torch.autograd.grad(out_cpu, (args[0], args[3], args[4]), grad)
    cuda_args = [t.detach().to(DEV).requires_grad_(t.requires_grad) for t in args]
    out_cuda = op(*cuda_args)
    g_cuda = torch.autograd.grad(out_cuda, (cuda_args[0], cuda_args[3], cuda_args[4]), grad.to(DEV))
    torch.testing.assert_close(out_cuda.cpu(), out_cpu, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_cuda, g_cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


def test_gradcheck_float64():
    v, ss, lsi, loc, attn = make_inputs(2, 3, 2, 5, [(4, 3), (2, 2)], 2, device=DEV, requires_grad=True)
    with torch.no_grad():  # keep locations off pixel borders (not differentiable there)
        for lvl, (h, w) in enumerate([(4, 3), (2, 2)]):
            size = torch.tensor([w, h], dtype=torch.float64, device=DEV)
            frac = torch.frac(loc[:, :, :, lvl] * size - 0.5 + 10)
            loc[:, :, :, lvl] += (0.5 - frac).sign() * (frac - 0.5).abs().lt(0.45).logical_not() * 0.1 / size
    assert torch.autograd.gradcheck(lambda v_, l_, a_: op(v_, ss, lsi, l_, a_), (v, loc, attn), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck(dtype):
    args = make_inputs(2, 5, 2, 8, [(4, 3), (2, 2)], 2, dtype=dtype, device=DEV, requires_grad=True)
    # fp16/bf16: opcheck compares autograd against itself, so tolerance is not an issue here.
    torch.library.opcheck(torch.ops.hybrid_detr.ms_deform_attn, args)


def test_large_batch_no_im2col_restriction():
    # batch sizes that are not multiples of anything (the official kernel wanted batch % 64 == 0)
    for N in (1, 3, 5):
        args = make_inputs(N, 7, 2, 16, [(6, 5), (3, 2)], 2, dtype=torch.float32, device=DEV)
        ref = ms_deform_attn_reference(args[0], args[1], args[3], args[4])
        torch.testing.assert_close(op(*args), ref, rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs():
    v, ss, lsi, loc, attn = make_inputs(2, 6, 3, 16, [(5, 5), (3, 2)], 3, dtype=torch.float32, device=DEV)
    v_nc = v.transpose(0, 2).contiguous().transpose(0, 2)
    loc_nc = torch.stack([loc, loc], dim=-1)[..., 0]
    attn_nc = attn.permute(4, 3, 2, 1, 0).contiguous().permute(4, 3, 2, 1, 0)
    assert not (v_nc.is_contiguous() or loc_nc.is_contiguous() or attn_nc.is_contiguous())
    torch.testing.assert_close(op(v_nc, ss, lsi, loc_nc, attn_nc), op(v, ss, lsi, loc, attn), rtol=0, atol=0)


@pytest.mark.parametrize("N,Lq", [(0, 5), (2, 0)])
def test_empty(N, Lq):
    v, ss, lsi, loc, attn = make_inputs(N, Lq, 2, 8, [(4, 3), (2, 2)], 2, dtype=torch.float32, device=DEV,
                                        requires_grad=True)
    out = op(v, ss, lsi, loc, attn)
    assert out.shape == (N, Lq, 16) and out.is_cuda
    out.sum().backward()
    assert v.grad.shape == v.shape and loc.grad.shape == loc.shape and attn.grad.shape == attn.shape


def test_device_mismatch():
    v, ss, lsi, loc, attn = make_inputs(1, 4, 2, 8, [(4, 3), (2, 2)], 2, dtype=torch.float32, device=DEV)
    with pytest.raises(RuntimeError, match=r"spatial_shapes is on cpu but value is on cuda"):
        op(v, ss.cpu(), lsi, loc, attn)
    with pytest.raises(RuntimeError, match=r"sampling_locations is on cpu but value is on cuda"):
        op(v, ss, lsi, loc.cpu(), attn)


def test_bad_level_layout_on_cuda_with_sync_checks(monkeypatch):
    # The default check is a device-side assertion (it poisons the CUDA context, so it is not
    # triggered here); HYBRID_DETR_SYNC_CHECKS=1 checks on the host with the precise message.
    monkeypatch.setenv("HYBRID_DETR_SYNC_CHECKS", "1")
    v, ss, lsi, loc, attn = make_inputs(1, 4, 2, 8, [(4, 3), (2, 2)], 2, dtype=torch.float32, device=DEV)
    with pytest.raises(RuntimeError, match=r"level_start_index\[1\] = 13 is inconsistent"):
        op(v, ss, lsi + torch.tensor([0, 1], device=DEV), loc, attn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_and_backward_do_not_synchronize(dtype):
    """No device-to-host copy in the op (the layout is checked on the device): any synchronising call
    raises under sync debug mode "error"."""
    v, ss, lsi, loc, attn = make_inputs(2, 30, 8, 16, [(16, 12), (8, 6), (4, 3)], 4, dtype=dtype, device=DEV)
    v, loc, attn = (t.requires_grad_() for t in (v, loc, attn))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = op(v, ss, lsi, loc, attn)
        torch.autograd.grad(out.float().sum(), (v, loc, attn))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_dispatcher_wrapper_uses_cuda_kernel(recwarn):
    args = make_inputs(1, 4, 2, 8, [(4, 3), (2, 2)], 2, dtype=torch.float16, device=DEV)
    torch.testing.assert_close(ms_deform_attn(*args), op(*args))
    assert not [w for w in recwarn if "falls back" in str(w.message)]


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_matches_reference_path(ref_dim):
    torch.manual_seed(0)
    m = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=3).to(DEV)
    with torch.no_grad():
        m.sampling_offsets.weight.normal_(std=0.5)
        m.attention_weights.weight.normal_(std=0.5)
    inputs = [t.to(DEV) for t in _module_inputs(2, 9, 32, [(8, 10), (4, 5), (2, 3)], ref_dim)]
    q, ref, value, ss, lsi, mask = inputs
    out = m(q, ref, value, ss, lsi, mask)
    m.use_reference = True
    torch.testing.assert_close(out, m(q, ref, value, ss, lsi, mask), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_module_under_autocast(dtype):
    m = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3).to(DEV)
    q, ref, value, ss, lsi, mask = [t.to(DEV) for t in _module_inputs(2, 9, 32, [(8, 10), (4, 5)], 2)]
    expected = m(q, ref, value, ss, lsi, mask)
    with torch.autocast("cuda", dtype=dtype):
        out = m(q, ref, value, ss, lsi, mask)
    out.float().sum().backward()
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


# Small D packs several rows per warp (D = 16: two rows of 16 lanes; D = 4: eight rows).
SMALL_D_CASES = [
    (2, 37, 8, 16, [(9, 7), (5, 4), (3, 2), (1, 1)], 4),
    (1, 23, 3, 8, [(6, 5), (3, 3)], 3),
    (3, 11, 5, 4, [(7, 3), (2, 2)], 2),
    (1, 9, 2, 12, [(5, 5)], 5),  # D not a power of two: idle lanes inside a group
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,Lq,M,D,shapes,P", SMALL_D_CASES)
def test_small_d_packed_rows(N, Lq, M, D, shapes, P, dtype):
    args = make_inputs(N, Lq, M, D, shapes, P, dtype=torch.float64, device=DEV)
    grad = torch.randn(N, Lq, M * D, dtype=torch.float64, device=DEV)
    ref, ref_grads = _reference_on_rounded(args, dtype, grad)
    v, ss, lsi, loc, attn = args
    ins = [t.detach().to(dtype).requires_grad_() for t in (v, loc, attn)]
    out = op(ins[0], ss, lsi, ins[1], ins[2])
    torch.testing.assert_close(out.double(), ref, rtol=TOLS[dtype][0], atol=TOLS[dtype][0])
    grads = torch.autograd.grad(out, ins, grad.to(dtype))
    tol = TOLS[dtype][1]
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("D", [32, 16])
def test_deterministic_backward(D):
    args = make_inputs(2, 300, 8, D, [(20, 30), (10, 15), (5, 8), (3, 4)], 4, dtype=torch.float32, device=DEV,
                       requires_grad=True)
    grad = torch.randn(2, 300, 8 * D, device=DEV)
    ins = (args[0], args[3], args[4])
    fast = torch.autograd.grad(op(*args), ins, grad)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert torch.ops.hybrid_detr._cuda_backward_deterministic()
        runs = [torch.autograd.grad(op(*args), ins, grad) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(was)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    for a, b in zip(runs[0], fast):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_pixel_coordinate_rounding_matches_cpu():
    """At pixel centres CPU and CUDA take the same one-sided location gradient (one fma on both)."""
    (value, ss, lsi, loc, attn), expected = fma_discriminating_inputs()
    loc = loc.to(DEV).requires_grad_()
    out = op(value.to(DEV), ss.to(DEV), lsi.to(DEV), loc, attn.to(DEV))
    (g,) = torch.autograd.grad(out, loc, torch.ones_like(out))
    inside = loc[..., 0].detach().cpu() < 1
    torch.testing.assert_close(g[..., 0].cpu()[inside], expected[inside], rtol=1e-5, atol=1e-3)
