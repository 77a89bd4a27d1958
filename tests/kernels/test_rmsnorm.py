"""rms_norm against its float64 reference: forward, ∂L/∂x and ∂L/∂w, odd hidden sizes, fp32 / bf16, both backends.

Tolerance. The float64 reference sees the same (already rounded) inputs. The kernel works in fp32 and rounds each output
once to its dtype, so per element |out − ref64| ≤ rounding_bound(ref64, dtype) + 32·eps32·scale (one ulp: the
interpreter truncates where the GPU rounds to nearest), where scale bounds the
magnitudes the fp32 arithmetic handles (max |y|; for ∂L/∂x: r·(|g w| + |x̂|·|c|); for ∂L/∂w: Σ_rows |g x̂|).
"""
import pytest
import torch

from fastrlhf import kernels
from fastrlhf.kernels import rms_norm, rms_norm_ref
from tests.conftest import pick
from tests.helpers.tolerances import rounding_bound

EPS32 = torch.finfo(torch.float32).eps


def assert_close(out, ref, scale, dtype, what):
    err = (out.double() - ref).abs()
    bound = rounding_bound(ref, dtype) + 32 * EPS32 * scale
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), f"{what}: err {err.flatten()[worst]:.3e} > bound {bound.flatten()[worst]:.3e}"


def _case(shape, H, dtype, wdtype, device, eps=1e-6):
    x = (torch.randn(*shape, H, device=device) * 2 + 0.5).to(dtype).requires_grad_()
    w = (torch.rand(H, device=device) + 0.5).to(wdtype).requires_grad_()
    with kernels.backend("triton"):
        y = rms_norm(x, w, eps)
    g = torch.randn(y.shape, device=device).to(y.dtype)
    y.backward(g)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = rms_norm_ref(x64, w64, eps)
    y64.backward(g.double())
    assert y.dtype == torch.promote_types(dtype, wdtype) and y.shape == x.shape
    assert x.grad.dtype == dtype and w.grad.dtype == wdtype
    assert_close(y, y64, y64.abs().max(), y.dtype, "y")
    xd, gd = x64.detach(), g.double()
    r = torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xd * r
    c = (gd * w64.detach() * xhat).mean(-1, keepdim=True)
    assert_close(x.grad, x64.grad, (r * ((gd * w64.detach()).abs() + xhat.abs() * c.abs())).max(), dtype, "dx")
    assert_close(w.grad, w64.grad, (gd * xhat).abs().reshape(-1, H).sum(0), wdtype, "dw")


@pytest.mark.parametrize("H", [45, 64, 100])
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                          (torch.bfloat16, torch.bfloat16)])
def test_matches_float64_small(H, dtype, wdtype, device):
    _case(pick((3, 5), (4, 512)), H, dtype, wdtype, device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real shapes need CUDA (the interpreter is too slow)")
@pytest.mark.parametrize("H", [896, 4864, 4096])
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_matches_float64_real_shapes(H, dtype, wdtype):
    _case((8, 512), H, dtype, wdtype, "cuda")


def test_backward_partials_over_programs(device):
    """∂L/∂w summed from several programs' partials equals the one-program result (up to fp32 order)."""
    x = torch.randn(17, 45, device=device)
    w = torch.rand(45, device=device) + 0.5
    g = torch.randn(17, 45, device=device)
    mod = __import__("fastrlhf.kernels.rmsnorm", fromlist=["x"])
    with kernels.backend("triton"):
        _, rstd = mod.rms_norm_fwd_triton(x, w, 1e-6)
        dx1, dw1 = mod.rms_norm_bwd_triton(x, w, rstd, g, programs=1)
        dx5, dw5 = mod.rms_norm_bwd_triton(x, w, rstd, g, programs=5)
    assert torch.equal(dx1, dx5)
    torch.testing.assert_close(dw1, dw5, rtol=1e-5, atol=1e-5)
    assert not torch.equal(dw1, torch.zeros_like(dw1))


def test_cpu_path_is_the_reference_and_matches_the_llama_norm():
    """CPU auto: rms_norm_ref, the Llama family's rounding (x̂ cast to x's dtype before the weight)."""
    x = torch.randn(3, 4, 33).bfloat16()
    w = torch.rand(33) + 0.5
    xf = x.float()
    want = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(rms_norm(x, w, 1e-5), want)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="rms_norm: x"):
        rms_norm(torch.randn(3, 8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="eps"):
        rms_norm(torch.randn(3, 8), torch.ones(8), 0.0)


@pytest.mark.parametrize("H", [45, 256, 896])
def test_cpu_fp32_path_is_the_reference_function(H):
    """CPU fp32 takes torch's fused F.rms_norm: the same function as rms_norm_ref (values and gradients up to fp32
    rounding; equal in practice)."""
    x = (torch.randn(4, 9, H) * 3).requires_grad_()
    w = (torch.rand(H) + 0.5).requires_grad_()
    g = torch.randn(4, 9, H)
    y = rms_norm(x, w, 1e-6)
    y.backward(g)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = rms_norm_ref(x2, w2, 1e-6)
    y2.backward(g)
    for a, b in ((y, y2), (x.grad, x2.grad), (w.grad, w2.grad)):
        torch.testing.assert_close(a, b, rtol=4 * EPS32, atol=4 * EPS32 * b.abs().max().item())
