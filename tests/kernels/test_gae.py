"""gae against its float64 reference and closed forms: padding on either side, holes, empty rows, γ ≠ 1, dtypes, backends.

Tolerance. Inputs are rounded once to the test dtype and the float64 reference sees the same values, so the kernel (fp32
math in every dtype) is held to an fp32 bound: max|out − ref64| ≤ 2·max|base32 − ref64| + 8·eps32·max|ref64|·√T', where
base32 is plain PyTorch (gae_ref, a sequential loop) in fp32 on the same inputs. The second term allows for the scan's
different summation order (a tree of depth log T instead of a chain; rounding errors of the T' ≈ min(T, 1/(1−γλ)) summed
terms grow like √T'), in case the fp32 loop happens to be very accurate on a given draw.
"""
import importlib
import math

import pytest
import torch

from fastrlhf import kernels
from fastrlhf.kernels import gae, gae_ref
from tests.conftest import pick
from tests.helpers.masks import make_mask

gae_mod = importlib.import_module("fastrlhf.kernels.gae_scan")
EPS32 = torch.finfo(torch.float32).eps
BACKENDS = ("triton", "torch")


def _check(out, ref64, base32, gamma, lam, what):
    T = ref64.shape[-1]
    horizon = T if gamma * lam >= 1 else min(T, 1.0 / (1.0 - gamma * lam))
    err = (out.double() - ref64).abs().max().item()
    tol = 2 * (base32.double() - ref64).abs().max().item() + 8 * EPS32 * ref64.abs().max().item() * math.sqrt(horizon)
    assert err <= tol, f"{what}: max err {err:.3e} > tol {tol:.3e}"


def _run_and_check(rewards, values, mask, gamma, lam, run):
    adv, ret = run()
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32 and adv.shape == rewards.shape
    A64, R64 = gae_ref(rewards.double(), values.double(), mask, gamma=gamma, lam=lam)
    A32, R32 = gae_ref(rewards.float(), values.float(), mask, gamma=gamma, lam=lam)
    _check(adv, A64, A32, gamma, lam, "advantages")
    _check(ret, R64, R32, gamma, lam, "returns")
    m = mask != 0
    assert torch.all(adv[~m] == 0) and torch.all(ret[~m] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["right", "left", "holes"])
@pytest.mark.parametrize("dtype,mask_dtype", [(torch.float32, torch.bool), (torch.bfloat16, torch.int64),
                                              (torch.float16, torch.float32)])
def test_matches_float64(backend, kind, dtype, mask_dtype, device):
    B, T = pick((5, 70), (64, 1024))
    gamma, lam = (1.0, 0.95) if dtype == torch.float32 else (0.99, 0.9)
    mask = make_mask(B, T, kind, device).to(mask_dtype)
    rewards = torch.randn(B, T, device=device).to(dtype)
    values = torch.randn(B, T, device=device).to(dtype)
    with kernels.backend(backend):
        _run_and_check(rewards, values, mask, gamma, lam, lambda: gae(rewards, values, mask, gamma=gamma, lam=lam))


@pytest.mark.parametrize("block_t", [16, 32])
@pytest.mark.parametrize("kind", ["left", "holes"])
def test_triton_multi_tile_carries(block_t, kind, device):
    """Tiles smaller than T: the carries of both scans (next valid value, running advantage) cross tile borders."""
    B, T = pick((4, 67), (64, 1000))  # T not a multiple of the tile: a partial last tile
    mask = make_mask(B, T, kind, device)
    if kind == "holes":
        mask[0, 5:40] = False  # a hole wider than two tiles
    rewards, values = torch.randn(B, T, device=device), torch.randn(B, T, device=device)
    _run_and_check(rewards, values, mask, 0.99, 0.95,
                   lambda: gae_mod.gae_triton(rewards, values, mask, 0.99, 0.95, block_t=block_t))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.5, 1.0)])
def test_closed_form(backend, gamma, lam, device):
    """rewards [0, 0, 0, 1], values 0 → A = R = [(γλ)³, (γλ)², γλ, 1]; with holes the same over the valid tokens."""
    gl = gamma * lam
    want = torch.tensor([[gl**3, gl**2, gl, 1.0]], device=device)
    with kernels.backend(backend):
        adv, ret = gae(torch.tensor([[0.0, 0.0, 0.0, 1.0]], device=device), torch.zeros(1, 4, device=device),
                       torch.ones(1, 4, device=device), gamma=gamma, lam=lam)
        torch.testing.assert_close(adv, want, rtol=2 * EPS32, atol=0)
        torch.testing.assert_close(ret, want, rtol=2 * EPS32, atol=0)
        # holes and padding: valid tokens at 1, 3, 4, 6 of 8; the reward at 6 decays by γλ per VALID step
        mask = torch.tensor([[0, 1, 0, 1, 1, 0, 1, 0]], dtype=torch.bool, device=device)
        r = torch.tensor([[5.0, 0.0, 7.0, 0.0, 0.0, 9.0, 1.0, 3.0]], device=device)  # rewards at masked slots: ignored
        adv, ret = gae(r, torch.zeros(1, 8, device=device), mask, gamma=gamma, lam=lam)
    want = torch.tensor([[0.0, gl**3, 0.0, gl**2, gl, 0.0, 1.0, 0.0]], device=device)
    torch.testing.assert_close(adv, want, rtol=2 * EPS32, atol=0)
    torch.testing.assert_close(ret, want, rtol=2 * EPS32, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_bootstrap_across_holes(backend, device):
    """δ uses V at the next VALID token: one step, r=0, V=[1, ·, 2] with a hole → A_0 = γ·2 − 1 + γλ·A_2, A_2 = −2."""
    gamma, lam = 0.9, 0.5
    mask = torch.tensor([[1, 0, 1]], device=device)
    values = torch.tensor([[1.0, 100.0, 2.0]], device=device)
    with kernels.backend(backend):
        adv, ret = gae(torch.zeros(1, 3, device=device), values, mask, gamma=gamma, lam=lam)
    a2 = 0.0 + gamma * 0.0 - 2.0  # last valid token: V_next = 0
    a0 = 0.0 + gamma * 2.0 - 1.0 + gamma * lam * a2
    torch.testing.assert_close(adv, torch.tensor([[a0, 0.0, a2]], device=device))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 1.0, 0.0, a2 + 2.0]], device=device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_holes_equal_compacted_row(backend, device):
    """Property: a row with holes gives the same values at its valid tokens as the row with the holes removed."""
    B, T = pick((3, 50), (16, 1024))
    mask = make_mask(B, T, "holes", device)
    mask[-1, :3] = True  # keep at least some valid tokens everywhere
    r, v = torch.randn(B, T, device=device), torch.randn(B, T, device=device)
    with kernels.backend(backend):
        adv, ret = gae(r, v, mask, gamma=0.97, lam=0.9)
        for b in range(B):
            keep = mask[b]
            a_c, r_c = gae(r[b, keep][None], v[b, keep][None], None, gamma=0.97, lam=0.9)
            torch.testing.assert_close(adv[b, keep], a_c[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ret[b, keep], r_c[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend, device):
    B, T = pick((3, 20), (64, 1024))
    r, v = torch.randn(B, T, device=device), torch.randn(B, T, device=device)
    with kernels.backend(backend):
        adv, ret = gae(r, v, torch.zeros(B, T, device=device), gamma=0.99, lam=0.95)  # all-zero mask
        assert torch.equal(adv, torch.zeros_like(adv)) and torch.equal(ret, torch.zeros_like(ret))
        a1, r1 = gae(torch.tensor([[2.0]], device=device), torch.tensor([[0.5]], device=device),
                     torch.ones(1, 1, dtype=torch.bool, device=device), gamma=0.9, lam=0.9)  # B = T = 1
        torch.testing.assert_close(a1, torch.tensor([[1.5]], device=device))  # A = r − V (nothing after it)
        torch.testing.assert_close(r1, torch.tensor([[2.0]], device=device))  # R = A + V = r
        # NaN / inf in padded slots never reach the outputs
        mask = make_mask(B, T, "right", device)
        r_bad, v_bad = r.clone(), v.clone()
        r_bad[~mask], v_bad[~mask] = float("nan"), float("inf")
        adv, ret = gae(r_bad, v_bad, mask, gamma=0.99, lam=0.95)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    A64, R64 = gae_ref(r.double(), v.double(), mask, gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv.double(), A64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_detached(backend, device):
    B, T = pick((4, 30), (64, 1024))
    r = torch.randn(T, B, device=device).t()  # [B, T] transposed view
    v = torch.randn(B, 2 * T, device=device, dtype=torch.bfloat16)[:, ::2].requires_grad_()  # stride 2 along T
    mask = make_mask(B, 2 * T, "holes", device)[:, 1::2]
    assert not r.is_contiguous() and not v.is_contiguous() and not mask.is_contiguous()
    with kernels.backend(backend):
        _run_and_check(r, v.detach(), mask, 1.0, 0.95, lambda: gae(r, v, mask, gamma=1.0, lam=0.95))
        adv, ret = gae(r, v, mask)
    assert not adv.requires_grad and not ret.requires_grad  # GAE targets are detached


def test_bad_arguments():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"rewards must be \[B, T\]"):
        gae(torch.zeros(6), torch.zeros(6), None)
    with pytest.raises(ValueError, match="values shape"):
        gae(x, torch.zeros(3, 2), None)
    with pytest.raises(ValueError, match="mask shape"):
        gae(x, x, torch.ones(2, 4))
    with pytest.raises(ValueError, match="gamma"):
        gae(x, x, None, gamma=float("nan"))
