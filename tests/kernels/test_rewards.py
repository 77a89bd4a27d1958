"""shape_rewards against its float64 reference: padding on either side, holes, empty rows, dtypes, both backends, gradients.

Tolerance. Inputs are rounded once to the test dtype and the float64 reference sees those same values; each output element
is one product −β·kl (plus one score at a single position), so the fp32 kernel is held to a couple of fp32 ulps of the
terms: |out − ref64| ≤ 2·|base32 − ref64| + 2·eps32·(|β·kl| + |s|), base32 being plain PyTorch in fp32.
Gradients are exact linear maps (−β·m·g and a gather of g); they are rounded once to the input dtype (autograd returns the
input's dtype), bounded by one ulp of that dtype relative (2⁻⁷ bf16, 2⁻¹⁰ fp16, 0 fp32) plus one subnormal step
(fp16 gradients under 2⁻¹⁴ sit on a fixed 2⁻²⁴ grid; tests/helpers/tolerances.py), on top of the fp32 bound.
"""
import importlib

import pytest
import torch

from fastrlhf import kernels
from fastrlhf.kernels import shape_rewards, shape_rewards_ref
from tests.conftest import pick
from tests.helpers.masks import make_mask
from tests.helpers.tolerances import EXACT, rounding_bound

EPS32 = torch.finfo(torch.float32).eps
BACKENDS = ("triton", "torch")
rewards_mod = importlib.import_module("fastrlhf.kernels.rewards")  # the module (the package re-exports the functions)


def _check(out, ref64, base32, scale, what, extra=0.0):
    err = (out.double() - ref64).abs()
    tol = 2 * (base32.double() - ref64).abs() + 2 * EPS32 * scale + extra
    bad = err > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} off, worst {err.max():.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["right", "left", "holes"])
@pytest.mark.parametrize("dtype,mask_dtype", [(torch.float32, torch.bool), (torch.bfloat16, torch.int64),
                                              (torch.float16, torch.float32)])
def test_matches_float64_with_grads(backend, kind, dtype, mask_dtype, device, monkeypatch):
    B, T = pick((5, 70), (64, 1024))
    if kind == "holes":  # force the smallest tile: T=70 then spans 5 tiles of 16 (else 1 tile of 128 on CPU)
        monkeypatch.setattr(rewards_mod, "MAX_BLOCK_T", 16)
    beta = 0.05 + torch.rand(()).item()
    m = make_mask(B, T, kind, device).to(mask_dtype)
    scores = (torch.randn(B, dtype=torch.float64, device=device) * 3).to(dtype)
    kl = (torch.randn(B, T, dtype=torch.float64, device=device)).to(dtype)
    s_ = scores.clone().requires_grad_()
    k_ = kl.clone().requires_grad_()
    with kernels.backend(backend):
        out = shape_rewards(s_, k_, m, kl_coef=beta)
    assert out.dtype == torch.float32 and out.shape == (B, T)
    s64, k64 = scores.double().requires_grad_(), kl.double().requires_grad_()
    ref = shape_rewards_ref(s64, k64, m, kl_coef=beta)
    s32, k32 = scores.float().requires_grad_(), kl.float().requires_grad_()
    base = shape_rewards_ref(s32, k32, m, kl_coef=beta)
    scale = beta * kl.double().abs() + scores.double().abs()[:, None]
    _check(out, ref.detach(), base.detach(), scale, "forward")
    assert torch.all(out[m == 0] == 0)

    g = torch.randn(B, T, dtype=torch.float64, device=device) * 2
    out.backward(g.float())
    ref.backward(g)
    base.backward(g.float())
    assert s_.grad.dtype == dtype and k_.grad.dtype == dtype
    _check(s_.grad, s64.grad, s32.grad, g.abs().amax(1), "d scores", rounding_bound(s64.grad, dtype))
    _check(k_.grad, k64.grad, k32.grad, beta * g.abs(), "d kl", rounding_bound(k64.grad, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_lands_on_last_valid_token(backend, device):
    kl = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, 2.0, 2.0, 2.0]],
                      device=device)
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], device=device)  # pads, hole, empty
    scores = torch.tensor([10.0, 20.0, 30.0, 40.0], device=device)
    with kernels.backend(backend):
        out = shape_rewards(scores, kl, mask, kl_coef=0.5)
    want = torch.tensor([[0.0, -1.0, -1.5 + 10.0, 0.0],  # r = −β·kl·m, score at the last valid token (not the padding)
                         [-0.5, 0.0, -0.5 + 20.0, 0.0],
                         [0.0, 0.0, 0.0, 0.0],  # no valid token: no score, all zero
                         [-1.0, -1.0, -1.0, -1.0 + 40.0]], device=device)
    torch.testing.assert_close(out, want, **EXACT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_mask_and_tiny(backend, device):
    B, T = pick((3, 33), (64, 1024))
    kl = torch.randn(B, T, device=device)
    with kernels.backend(backend):
        out = shape_rewards(torch.randn(B, device=device), kl, torch.zeros(B, T, dtype=torch.bool, device=device),
                            kl_coef=0.1)
        one = shape_rewards(torch.tensor([2.0], device=device), torch.tensor([[3.0]], device=device),
                            torch.ones(1, 1, device=device), kl_coef=0.1)
    assert torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(one, torch.tensor([[2.0 - 0.3]], device=device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend, device):
    B, T = pick((4, 40), (64, 1024))
    kl = torch.randn(T, B, device=device, dtype=torch.bfloat16).t()  # [B, T] transposed view
    mask = make_mask(B, 2 * T, "holes", device)[:, ::2]
    scores = torch.randn(2 * B, device=device)[::2]
    assert not kl.is_contiguous() and not mask.is_contiguous() and not scores.is_contiguous()
    with kernels.backend(backend):
        out = shape_rewards(scores, kl, mask, kl_coef=0.2)
    ref = shape_rewards_ref(scores.double(), kl.double(), mask, kl_coef=0.2)
    base = shape_rewards_ref(scores, kl.float(), mask, kl_coef=0.2)
    _check(out, ref, base, 0.2 * kl.double().abs() + scores.double().abs()[:, None], "non-contiguous")


def test_bad_arguments():
    kl = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="scores must be"):
        shape_rewards(torch.zeros(3), kl, torch.ones(2, 3), kl_coef=0.1)
    with pytest.raises(ValueError, match="mask must be"):
        shape_rewards(torch.zeros(2), kl, torch.ones(2, 4), kl_coef=0.1)
    with pytest.raises(ValueError, match=r"kl must be \[B, T\]"):
        shape_rewards(torch.zeros(2), torch.zeros(6), torch.ones(6), kl_coef=0.1)
