"""whiten against its float64 reference: one-program and two-phase Triton paths, C++ path, masks, dtypes, edge cases.

Tolerance. Inputs are rounded once to the test dtype and the float64 reference sees the same values, so the fp32 kernel is
held to an fp32 bound in every dtype: max|out − ref64| ≤ 2·max|base32 − ref64| + 16·eps32·max|ref64|·(1 + |μ|/σ),
base32 being plain PyTorch (whiten_ref) in fp32 on the same inputs. The second term is the conditioning of the problem:
rounding x − μ costs eps·|μ| absolute, i.e. eps·|μ|/σ after the division by σ, and the output is of size max|ref64|.
"""
import importlib

import pytest
import torch

from fastrlhf import kernels
from fastrlhf.kernels import whiten, whiten_ref
from tests.conftest import pick
from tests.helpers.masks import make_mask
from tests.helpers.tolerances import EXACT

whiten_mod = importlib.import_module("fastrlhf.kernels.whitening")
EPS32 = torch.finfo(torch.float32).eps
BACKENDS = ("triton", "torch")
TWO_PHASE = dict(small_n=16, block=16, chunk=48)  # interpreter-sized two-phase launch: several chunks of 3 tiles each
TWO_PHASE_CUDA = dict(small_n=1024)  # on CUDA: force the two-phase path with the launcher's own chunking


def two_phase(device):
    return TWO_PHASE if device == "cpu" else TWO_PHASE_CUDA


def _check(out, x, mask, shift_mean, what):
    ref = whiten_ref(x.double(), mask, shift_mean=shift_mean)
    base = whiten_ref(x.float(), mask, shift_mean=shift_mean)
    m = mask != 0
    xs = x.double()[m]
    cond = 1.0
    if xs.numel() >= 2:
        cond += (xs.mean().abs() / xs.std().clamp(min=1e-30)).item()
    err = (out.double() - ref).abs().max().item()
    tol = 2 * (base.double() - ref).abs().max().item() + 16 * EPS32 * ref.abs().max().item() * cond
    assert err <= tol, f"{what}: max err {err:.3e} > tol {tol:.3e}"
    assert torch.all(out[~m] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["right", "left", "holes"])
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("dtype,mask_dtype", [(torch.float32, torch.bool), (torch.bfloat16, torch.int64),
                                              (torch.float16, torch.float32)])
def test_matches_float64(backend, kind, shift_mean, dtype, mask_dtype, device):
    B, T = pick((5, 70), (64, 1024))
    x = (torch.randn(B, T, device=device) * 3 + 2).to(dtype)
    mask = make_mask(B, T, kind, device).to(mask_dtype)
    with kernels.backend(backend):
        out = whiten(x, mask, shift_mean=shift_mean)
    assert out.dtype == torch.float32 and out.shape == (B, T)
    _check(out, x, mask, shift_mean, "whiten")


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("kind", ["right", "holes"])
def test_triton_two_phase(shift_mean, kind, device):
    """Many chunks: per-chunk (n, mean, M2) partials merged with Chan's formula (chunks may be empty)."""
    B, T = pick((5, 70), (64, 4096))
    x = torch.randn(B, T, device=device) * 2 - 1
    mask = make_mask(B, T, kind, device)
    mask[1, :] = False  # whole chunks without a valid element
    out = whiten_mod.whiten_triton(x, mask, shift_mean, 1e-8, **two_phase(device))
    _check(out, x, mask, shift_mean, "two-phase")


@pytest.mark.parametrize("path", ["triton", "triton-two-phase", "torch"])
def test_large_offset_is_accurate(path, device):
    """x = 1000 + N(0, 1): E[x²] − E[x]² would lose ~6 of fp32's 7 digits; the two-pass statistics must not."""
    B, T = pick((4, 64), (64, 1024))
    x = 1000.0 + torch.randn(B, T, device=device)
    mask = make_mask(B, T, "holes", device)
    if path == "triton-two-phase":
        out = whiten_mod.whiten_triton(x, mask, True, 1e-8, **two_phase(device))
    else:
        with kernels.backend(path):
            out = whiten(x, mask)
    _check(out, x, mask, True, path)
    m = mask != 0
    y = out[m].double()
    assert abs(y.mean().item()) < 1e-4 and abs(y.std().item() - 1.0) < 1e-4  # whitened: mean 0, std 1 (eps negligible)


@pytest.mark.parametrize("path", ["triton", "triton-two-phase", "torch"])
def test_constant_zero_and_single(path, device):
    def run(x, mask, shift_mean=True):
        if path == "triton-two-phase":
            return whiten_mod.whiten_triton(x, mask, shift_mean, 1e-8, **two_phase(device))
        with kernels.backend(path):
            return whiten(x, mask, shift_mean=shift_mean)

    B, T = pick((3, 50), (64, 1024))
    mask = make_mask(B, T, "holes", device)
    c = torch.full((B, T), 3.7, device=device)
    assert torch.equal(run(c, mask), torch.zeros_like(c))  # constant: σ² = 0, x − μ = 0 exactly
    kept = run(c, mask, shift_mean=False)  # shift_mean=False: μ added back at valid positions only
    torch.testing.assert_close(kept, torch.where(mask, c, 0.0), **EXACT)
    x = torch.randn(B, T, device=device)
    z = torch.zeros(B, T, dtype=torch.bool, device=device)
    assert torch.equal(run(x, z), torch.zeros_like(x))  # all-zero mask: zeros, finite
    assert torch.equal(run(x, z, shift_mean=False), torch.zeros_like(x))
    one = torch.zeros(B, T, dtype=torch.bool, device=device)
    one[1, 7] = True  # Σm = 1: σ² = 0, x − μ = 0 → 0 (μ back with shift_mean=False)
    assert torch.equal(run(x, one), torch.zeros_like(x))
    torch.testing.assert_close(run(x, one, shift_mean=False), torch.where(one, x, 0.0), **EXACT)
    t1 = torch.tensor([[4.0]], device=device)  # B = T = 1
    assert torch.equal(run(t1, torch.ones(1, 1, device=device)), torch.zeros(1, 1, device=device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_none_mask_and_detached(backend, device):
    B, T = pick((4, 30), (64, 1024))
    x = torch.randn(T, B, device=device, dtype=torch.bfloat16).t().requires_grad_()  # [B, T] transposed view
    mask = make_mask(B, 2 * T, "holes", device)[:, ::2]
    assert not x.is_contiguous() and not mask.is_contiguous()
    with kernels.backend(backend):
        out = whiten(x, mask)
        full = whiten(x, None)
    assert not out.requires_grad  # documented: detached, no autograd
    _check(out, x.detach(), mask, True, "non-contiguous")
    _check(full, x.detach(), torch.ones(B, T, dtype=torch.bool, device=device), True, "mask=None")


def test_bad_arguments():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="mask shape"):
        whiten(x, torch.ones(3, 2))
    with pytest.raises(ValueError, match="eps"):
        whiten(x, None, eps=-1.0)
    with pytest.raises(TypeError, match="whiten: x"):
        whiten(x.long(), None)
