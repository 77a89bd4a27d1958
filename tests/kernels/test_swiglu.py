"""swiglu against its float64 reference: fused [.., 2F] and two-tensor forms, gradients, odd F, fp32 / bf16.

Tolerance: the kernel computes in fp32 and rounds once to the inputs' dtype, so per element
|out − ref64| ≤ rounding_bound(ref64, dtype) + 32·eps32·scale (one ulp: the interpreter
truncates where the GPU rounds to nearest), scale = max |ref64| of that output.
"""
import pytest
import torch

from fastrlhf import kernels
from fastrlhf.kernels import swiglu, swiglu_ref
from tests.conftest import pick
from tests.kernels.test_rmsnorm import assert_close


def _check(out, ref, dtype, what):
    assert out.dtype == dtype and out.shape == ref.shape, what
    assert_close(out, ref, ref.abs().max(), dtype, what)


def _check_fused(gu, dtype, backend="triton"):
    """swiglu of the fused [.., 2F] input (Triton kernel, or the CPU path: backend "torch") and its gradient against
    swiglu_ref in float64. Returns (y, the upstream gradient); gu.grad holds the gradient."""
    gu = gu.requires_grad_()
    with kernels.backend(backend):
        y = swiglu(gu)
    g = torch.randn(y.shape, device=gu.device).to(dtype)
    y.backward(g)
    gu64 = gu.detach().double().requires_grad_()
    y64 = swiglu_ref(gu64)
    y64.backward(g.double())
    _check(y, y64, dtype, "y")
    _check(gu.grad, gu64.grad, dtype, "dgu")
    return y, g


@pytest.mark.parametrize("F", [37, 64, 2100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_float64(F, dtype, device):
    lead = pick((2, 3), (8, 512))
    _check_fused((torch.randn(*lead, 2 * F, device=device) * 3).to(dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_tensors_strided_match_float64(dtype, device):
    """gate / up as strided views (columns of a wider projection): read in place, gradients to each."""
    N, F = pick((7, 45), (4096, 4864))
    wide = (torch.randn(N, 3 * F, device=device) * 3).to(dtype)
    a = wide[:, :F].detach().requires_grad_()
    b = wide[:, 2 * F:].detach().requires_grad_()
    with kernels.backend("triton"):
        y = swiglu(a[:, :], b)
    g = torch.randn(y.shape, device=device).to(dtype)
    y.backward(g)
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = swiglu_ref(a64, b64)
    y64.backward(g.double())
    _check(y, y64, dtype, "y")
    _check(a.grad, a64.grad, dtype, "da")
    _check(b.grad, b64.grad, dtype, "db")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real shapes need CUDA (the interpreter is too slow)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_real_shape_qwen2_05b(dtype):
    _check_fused((torch.randn(8, 512, 2 * 4864, device="cuda") * 3).to(dtype), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_training_path_matches_float64_and_swiglu_refs_bits(dtype):
    """CPU, fused input, gradient wanted: the autograd Function with the one-buffer backward is within the bound of
    float64, and bit for bit ``swiglu_ref`` with torch's autograd in the same dtype."""
    gu = (torch.randn(5, 3, 2 * 37) * 3).to(dtype)
    y, g = _check_fused(gu, dtype, backend="torch")
    assert type(y.grad_fn).__name__ != "MulBackward0"  # the Function, not the ref's graph
    gu2 = gu.detach().requires_grad_()
    y2 = swiglu_ref(gu2)
    y2.backward(g)
    assert torch.equal(y, y2) and torch.equal(gu.grad, gu2.grad)


def test_cpu_path_is_the_llama_mlp_activation():
    gu = torch.randn(3, 2 * 19).bfloat16()
    assert torch.equal(swiglu(gu), torch.nn.functional.silu(gu[:, :19]) * gu[:, 19:])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"swiglu: the fused gate/up input must be \[..., 2F\]"):
        swiglu(torch.randn(3, 7))
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.randn(3, 7), torch.randn(3, 8))


def test_no_grad_calls_match_the_autograd_path(device):
    """Inference skips the autograd node (decode step); the values are the same kernels' (also for rope, rms_norm)."""
    gu = torch.randn(3, 2 * 21, device=device)
    x, w = torch.randn(3, 21, device=device), torch.rand(21, device=device)
    q, k = torch.randn(3, 2, 8, device=device), torch.randn(3, 1, 8, device=device)
    cos, sin = torch.randn(3, 8, device=device), torch.randn(3, 8, device=device)
    with kernels.backend("triton"):
        with torch.no_grad():
            a = (swiglu(gu), swiglu(gu[:, :21], gu[:, 21:]), kernels.rms_norm(x, w, 1e-6), *kernels.rope(q, k, cos, sin))
        b = (swiglu(gu.requires_grad_()), swiglu(gu[:, :21], gu[:, 21:]), kernels.rms_norm(x, w.requires_grad_(), 1e-6),
             *kernels.rope(q.requires_grad_(), k, cos, sin))
    for u, v in zip(a, b):
        assert v.grad_fn is not None and u.grad_fn is None
        assert torch.equal(u, v.detach())
