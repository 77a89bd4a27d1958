"""linear_kl (exact full-vocabulary KL from hidden states and heads) vs its float64 reference on both backends.

Tolerance rule (as for linear_logprobs): our max-abs error against float64 (float64 copies of the same rounded inputs) must
be ≤ 2 × the error of plain PyTorch in the input dtype + a small atol. Plain PyTorch = both logits as ``hidden @ weight.T``
in the input dtype, then an fp32 log-softmax and Σ p (log p − log q). atol: values 2e-5·(1 + max KL) (fp32 sums over V in
another order); gradients 2⁻²³·max|z|·max|grad| (one fp32 ulp of z moves p relatively by that) + half an ulp of the
written 16-bit gradient · max|grad| + the fp32 rounding of z − z_ref weighted by p (bound in ``check_against_ref``).
"""
import importlib
import re

import pytest
import torch

from fastrlhf.kernels import backend
from tests.conftest import ON_CUDA, pick

LK = importlib.import_module("fastrlhf.kernels.fused_linear_kl")
LL = importlib.import_module("fastrlhf.kernels.fused_linear_logprobs")
linear_kl, linear_kl_ref = LK.linear_kl, LK.linear_kl_ref
BACKENDS = ("triton", "torch")
VAL_ATOL = 2e-5
GRAD_ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _inputs(lead, H, V, dtype, device, HR=None, drift=0.3):
    """Policy (x, W) and a reference that differs from it by ``drift`` (logits ~ N(0, 3²), KL ~ 0.1-1 per token)."""
    HR = HR or H
    x = torch.randn(*lead, H, device=device)
    w = torch.randn(V, H, device=device) * (3.0 / H**0.5)
    if HR == H:
        xr = x + drift * torch.randn_like(x)
        wr = w + drift * torch.randn_like(w) * (3.0 / H**0.5)
    else:
        xr = torch.randn(*lead, HR, device=device)
        wr = torch.randn(V, HR, device=device) * (3.0 / HR**0.5)
    return [t.to(dtype) for t in (x, w, xr, wr)]


def _run(fn, x, w, xr, wr, g, **kw):
    """fwd + bwd with upstream gradient g [...] → (kl, dx, dw)."""
    xx = x.detach().clone().requires_grad_()
    ww = w.detach().clone().requires_grad_()
    kl = fn(xx, ww, xr, wr, **kw)
    (kl * g.to(kl.dtype)).sum().backward()
    return kl.detach(), xx.grad, ww.grad


def _plain(x, w, xr, wr, mask=None, temperature=1.0):  # logits in the input dtype, fp32 softmax math
    log_p = torch.log_softmax((x @ w.t()).float() / temperature, -1)
    log_q = torch.log_softmax((xr @ wr.t()).float() / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl if mask is None else torch.where(mask != 0, kl, 0.0)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_against_ref(x, w, xr, wr, be, mask=None, tau=1.0):
    g = torch.randn(x.shape[:-1], device=x.device)
    kw = dict(mask=mask, temperature=tau)
    with backend(be):
        ours = _run(linear_kl, x, w, xr, wr, g, **kw)
    plain = _run(_plain, x, w, xr, wr, g, **kw)
    ref = _run(linear_kl_ref, x.double(), w.double(), xr.double(), wr.double(), g, **kw)
    assert ours[0].dtype == torch.float32 and ours[0].shape == x.shape[:-1]
    assert torch.isfinite(ours[0]).all()
    err, base = _err(ours[0], ref[0]), _err(plain[0], ref[0])
    atol = VAL_ATOL * (1 + ref[0].abs().max().item() if ref[0].numel() else 1)
    assert err <= 2 * base + atol, f"kl: err {err:.3g} > 2×plain {base:.3g} + {atol:.3g}"
    with torch.no_grad():
        z64 = x.double() @ w.double().t() / tau
        zr64 = xr.double() @ wr.double().t() / tau
        z_max = max(z64.abs().max().item(), 1.0) if x.numel() else 1.0
        zz_max = max(z_max, zr64.abs().max().item() if x.numel() else 1.0)
        # z − z_ref carries an fp32 rounding of up to 2⁻²³·(|z| + |z_ref|) that G = g·p·((z − z_ref) − μ)/τ passes on
        # weighted by p: |ΔdX| ≤ 2⁻²²·zz_max/τ·|g|·Σ_v p|W|,  |ΔdW| ≤ 2⁻²²·zz_max/τ·Σ_n p|g||X|
        pg = torch.softmax(z64, -1).reshape(-1, w.shape[0]) * g.double().abs().reshape(-1, 1)
        if mask is not None:
            pg = pg * (mask.reshape(-1, 1) != 0)
        diff_bound = {"dhidden": (pg @ w.double().abs()).max().item() if pg.numel() else 0.0,
                      "dweight": (pg.t() @ x.double().abs().reshape(-1, x.shape[-1])).max().item() if pg.numel() else 0.0}
    for name, o, p, r, like in zip(("dhidden", "dweight"), ours[1:], plain[1:], ref[1:], (x, w)):
        assert o.dtype == like.dtype and o.shape == like.shape
        atol = (GRAD_ULP[like.dtype] + 2.0**-23 * z_max) * r.abs().max().item() + 2.0**-22 * zz_max / tau * diff_bound[name]
        err, base = _err(o, r), _err(p, r)
        assert err <= 2 * base + atol, f"{name}: err {err:.3g} > 2×plain {base:.3g} + {atol:.3g}"
    if mask is not None:  # masked tokens: KL 0 and no gradient
        off = mask == 0
        assert (ours[0][off] == 0).all() and (ours[1][off] == 0).all()
    return ours


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_matches_float64_ref(be, dtype, device):
    lead, H, V = pick(((2, 5), 40, 300), ((4, 512), 896, 151936))
    x, w, xr, wr = _inputs(lead, H, V, dtype, device)
    check_against_ref(x, w, xr, wr, be, tau=0.8)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("V", (pick(1031, 151936), 50257, 37))
def test_odd_vocab_and_masks(be, V, device):
    if be == "triton" and not ON_CUDA and V > 5000:
        V = 517  # the interpreter runs a program per 64-wide vocab tile: same masking code path
    lead = pick((3, 4), (8, 512))
    x, w, xr, wr = _inputs(lead, pick(24, 896), V, torch.float32, device)
    mask = torch.rand(lead, device=device) < 0.6
    mask[0] = False  # one row entirely masked
    mask[1, 1] = True
    check_against_ref(x, w, xr, wr, be, mask=mask, tau=1.7)


@pytest.mark.parametrize("be", BACKENDS)
def test_reference_hidden_size_differs(be, device):
    x, w, xr, wr = _inputs((7,), 32, 200, torch.float32, device, HR=20)
    check_against_ref(x, w, xr, wr, be, tau=0.9)


@pytest.mark.parametrize("be", BACKENDS)
def test_identical_models_give_exact_zero(be, device):
    """π = π_ref: a = Σ e^{z−m}(z − z_ref) = 0 and the LSEs are equal: KL is exactly 0, and so is the gradient."""
    x, w, _, _ = _inputs((2, 6), 24, 333, torch.float32, device)
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    with backend(be):
        kl = linear_kl(xx, ww, x, w, temperature=0.7)
        kl.sum().backward()
    assert torch.equal(kl, torch.zeros_like(kl))
    assert torch.equal(xx.grad, torch.zeros_like(x)) and torch.equal(ww.grad, torch.zeros_like(w))


@pytest.mark.parametrize("be", BACKENDS)
def test_closed_form_uniform_reference(be, device):
    """W_ref = 0: q is uniform, so KL = log V − H(p), with H(p) from the float64 softmax of the policy."""
    x, w, xr, _ = _inputs((5,), 16, 129, torch.float32, device)
    with backend(be):
        kl = linear_kl(x, w, xr, torch.zeros_like(w))
    log_p = torch.log_softmax(x.double() @ w.double().t(), -1)
    want = torch.log(torch.tensor(129.0, dtype=torch.float64)) + (log_p.exp() * log_p).sum(-1)
    torch.testing.assert_close(kl.double(), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("be", BACKENDS)
def test_chunked_forward_and_backward(be, device, monkeypatch):
    """Force many vocab chunks (both paths' backward; the CPU forward too), then token chunks: still matches."""
    x, w, xr, wr = _inputs((13,), 32, 600, torch.bfloat16, device)
    monkeypatch.setattr(LL, "MIN_V_CHUNK", 128)
    for budget in (13 * 200 * 2, 64 * 128 * 2 // 13):
        monkeypatch.setattr(LL, "CHUNK_BYTES", budget)
        check_against_ref(x, w, xr, wr, be, tau=0.9)


@pytest.mark.parametrize("be", BACKENDS)
def test_no_tokens_and_all_masked(be, device):
    x, w, xr, wr = _inputs((2, 3), 8, 10, torch.float32, device)
    for xs, xrs, mask in ((x[:, :0], xr[:, :0], None), (x, xr, torch.zeros(2, 3, device=device))):
        xx, ww = xs.clone().requires_grad_(), w.clone().requires_grad_()
        with backend(be):
            kl = linear_kl(xx, ww, xrs, wr, mask=mask)
            kl.sum().backward()
        assert kl.shape == xs.shape[:-1] and (kl == 0).all()
        assert (xx.grad == 0).all() and (ww.grad == 0).all()


def test_bad_input_errors():
    x, w = torch.randn(3, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="must share V"):
        linear_kl(x, w, x, torch.randn(11, 8))
    with pytest.raises(ValueError, match="must match their heads"):
        linear_kl(x, w, torch.randn(3, 7), w)
    with pytest.raises(ValueError, match="leading shapes differ"):
        linear_kl(x, w, torch.randn(4, 8), w)
    with pytest.raises(TypeError, match="one dtype"):
        linear_kl(x, w, x.bfloat16(), w.bfloat16())
    with pytest.raises(ValueError, match="mask must be"):
        linear_kl(x, w, x, w, mask=torch.ones(4))
    with pytest.raises(ValueError, match="temperature"):
        linear_kl(x, w, x, w, temperature=0.0)


def _rss_bytes(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def _peak_extra_bytes(fn, N: int, V: int, H: int) -> int:
    """Peak resident-memory growth (bytes) of fwd+bwd over what was resident just before (inputs already allocated)."""
    x = torch.randn(N, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    xr, wr = torch.randn(N, H), torch.randn(V, H)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    base = _rss_bytes("VmRSS")
    fn(x, w, xr, wr).sum().backward()
    return _rss_bytes("VmHWM") - base


@pytest.mark.skipif(ON_CUDA, reason="measures the CPU path")
def test_cpu_memory_does_not_grow_with_n_times_v(monkeypatch):
    """CPU path with a 1 MiB chunk budget: peak extra memory stays flat from N=256 to N=2048 at V=4099 (where [N, V] fp32
    logits grow by 28 MiB per model); the materializing reference shows that growth, so the measurement can see it."""
    monkeypatch.setattr(LL, "CHUNK_BYTES", 1 << 20)
    V, H, n_small, n_big = 4099, 16, 256, 2048
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with backend("torch"):
            _peak_extra_bytes(linear_kl, 64, V, H)  # warm-up (thread pools, allocator)
            small = _peak_extra_bytes(linear_kl, n_small, V, H)
            big = _peak_extra_bytes(linear_kl, n_big, V, H)
            ref_big = _peak_extra_bytes(linear_kl_ref, n_big, V, H)
    finally:
        torch.set_num_threads(threads)
    grow_nv = (n_big - n_small) * V * 4
    assert ref_big >= n_big * V * 4, f"measurement sanity: the reference peaked only {ref_big / 2**20:.1f} MiB"
    assert big - small < grow_nv / 4, f"extra memory grew {(big - small) / 2**20:.1f} MiB (N·V·4 grew {grow_nv / 2**20:.0f})"
    assert big < 16 * 2**20, f"extra memory {big / 2**20:.1f} MiB with a 1 MiB chunk budget"
