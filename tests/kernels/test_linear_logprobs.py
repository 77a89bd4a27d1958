"""linear_logprobs vs the float64 reference on both backends, chunking, and the CPU path's bounded memory.

Tolerance rule: our max-abs error against float64 (on float64 copies of the same rounded inputs) must be ≤ 2 × the error of
plain PyTorch in the input dtype + a small atol. Plain PyTorch = ``hidden @ weight.T (+ b)`` in the input dtype (bf16 logits
for bf16 inputs, as TRL/verl do), then an fp32 log-softmax; its gradients come back through the same dtype's matmuls.
atol: values 2e-5 (a different fp32 summation order over V terms of O(log V) values); gradients: a gradient is a sum of
G·W or G·X products where G = g·p·(…) with p = exp(z − LSE). Each fp32 rounding on the way (z, LSE, log p = z − LSE, the
exp, log p + H, the products and the sums over V or N) can move G by up to u·max|z| relative to the largest gradient
(u = 2⁻²⁴); about a dozen of them stack, and the worst seen over 12,000 random fp32 cases (H = 16..128) was 10 u. So the
atol is 16 u·max|z|·max|grad| (2⁻²⁰) + half an ulp of the written gradient for 16-bit outputs (2⁻⁸ bf16, 2⁻¹¹ fp16)·max|grad|.
"""
import importlib
import re

import pytest
import torch

from fastrlhf.kernels import backend, linear_logprobs, linear_logprobs_ref
from tests.conftest import ON_CUDA, pick

LL = importlib.import_module("fastrlhf.kernels.fused_linear_logprobs")
BACKENDS = ("triton", "torch")
VAL_ATOL = 2e-5
GRAD_FP32_ROUNDINGS = 16 * 2.0**-24  # see the module docstring
GRAD_ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _inputs(lead, H, V, dtype, device, bias=True, ignore_frac=0.2, w_scale=None):
    hidden = torch.randn(*lead, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) * (w_scale or 3.0 / H**0.5)).to(dtype)  # logits ~ N(0, 3²)
    b = torch.randn(V, device=device).to(dtype) if bias else None
    labels = torch.randint(0, V, lead, device=device)
    labels[torch.rand(lead, device=device) < ignore_frac] = -100
    return hidden, weight, b, labels


def _run(fn, hidden, weight, b, labels, tau, g_lp, g_h):
    """fwd + bwd with upstream grads (g_lp, g_h) through (logp, entropy) → (logp, entropy, dhidden, dweight, dbias).
    g_lp or g_h None: that output is left out of the loss (it gets no gradient at all)."""
    x = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    bb = b.detach().clone().requires_grad_() if b is not None else None
    lp, h = fn(x, w, bb, labels, tau)
    sum((out * g).sum() for out, g in ((lp, g_lp), (h, g_h)) if g is not None).backward()
    return lp.detach(), h.detach(), x.grad, w.grad, (bb.grad if bb is not None else None)


def _ours(x, w, b, y, tau):
    return linear_logprobs(x, w, y, bias=b, temperature=tau, return_entropy=True)


def _plain(x, w, b, y, tau):  # logits in the input dtype, fp32 log-softmax
    logits = x @ w.t()
    if b is not None:
        logits = logits + b
    from fastrlhf.kernels import logprobs_from_logits_ref
    return logprobs_from_logits_ref(logits.float(), y, temperature=tau, return_entropy=True)


def _ref64(x, w, b, y, tau):
    return linear_logprobs_ref(x, w, y, bias=b, temperature=tau, return_entropy=True)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_against_ref(hidden, weight, b, labels, tau, be, grads=("logp", "entropy")):
    """``grads``: the outputs in the loss (the others get no gradient, as an entropy kept only as a metric)."""
    g_lp = torch.randn(labels.shape, device=hidden.device) if "logp" in grads else None
    g_h = torch.randn(labels.shape, device=hidden.device) if "entropy" in grads else None
    with backend(be):
        ours = _run(_ours, hidden, weight, b, labels, tau, g_lp, g_h)
    plain = _run(_plain, hidden, weight, b, labels, tau, g_lp, g_h)
    b64 = b.double() if b is not None else None
    ref = _run(_ref64, hidden.double(), weight.double(), b64, labels, tau, g_lp, g_h)  # float64 leaves and grads
    assert ours[0].dtype == ours[1].dtype == torch.float32
    for name, o, p, r in zip(("logp", "entropy"), ours[:2], plain[:2], ref[:2]):
        err, base = _err(o, r), _err(p, r)
        assert err <= 2 * base + VAL_ATOL, f"{name}: err {err:.3g} > 2×plain {base:.3g} + {VAL_ATOL}"
        assert torch.isfinite(o).all()
    with torch.no_grad():
        # the scale of the logits' rounding error: a dot product over H terms rounds relative to Σ_k |h_k·w_vk| (+ |b|),
        # not to |z| itself, which cancellation can make much smaller
        h64 = hidden.double().reshape(-1, hidden.shape[-1])
        mags = h64.abs() @ weight.double().abs().t() + (0 if b is None else b64.abs())
        z_max = max(mags.max().item() / tau, 1.0) if mags.numel() else 1.0
        del h64, mags
    for name, o, p, r, like in zip(("dhidden", "dweight", "dbias"), ours[2:], plain[2:], ref[2:], (hidden, weight, b)):
        if r is None:
            assert o is None
            continue
        assert o.dtype == like.dtype and o.shape == like.shape
        atol = (GRAD_ULP[like.dtype] + GRAD_FP32_ROUNDINGS * z_max) * r.abs().max().item()
        err, base = _err(o, r), _err(p, r)
        assert err <= 2 * base + atol, f"{name}: err {err:.3g} > 2×plain {base:.3g} + {atol:.3g}"
    return ours


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("bias", (True, False))
def test_matches_float64_ref(be, dtype, bias, device):
    lead, H, V = pick(((2, 5), 40, 1000), ((4, 512), 896, 151936))
    hidden, weight, b, labels = _inputs(lead, H, V, dtype, device, bias=bias)
    check_against_ref(hidden, weight, b, labels, 0.8, be)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("grads", (("logp",), ("entropy",)))
def test_one_output_in_the_loss_matches_float64_ref(be, dtype, grads, device):
    """Only log p (the RL losses; the entropy is a metric) or only the entropy has a gradient: the CPU path then skips
    the other term of ∂L/∂z instead of multiplying it by zero."""
    lead, H, V = pick(((3, 7), 40, 1000), ((4, 512), 896, 151936))
    hidden, weight, b, labels = _inputs(lead, H, V, dtype, device)
    check_against_ref(hidden, weight, b, labels, 0.9, be, grads)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("V", (pick(1031, 151936), 50257, 32001))
def test_odd_vocab(be, V, device):
    if be == "triton" and not ON_CUDA and V > 5000:
        V = {50257: 1001, 32001: 517}[V]  # the interpreter runs a program per 64-wide vocab tile: same masking code path
    hidden, weight, b, labels = _inputs(pick((3,), (2, 1024)), pick(24, 896), V, torch.float32, device)
    check_against_ref(hidden, weight, b, labels, 1.7, be)


@pytest.mark.parametrize("be", BACKENDS)
def test_views_and_shapes(be, device):
    H, V = 48, 300
    # hidden [T, B, H] storage seen as [B, T, H]; weight stored [H, V] and seen as [V, H] (non-unit inner stride)
    hidden = torch.randn(pick(3, 64), 2, H, device=device).transpose(0, 1)
    weight = (torch.randn(H, V, device=device) * 0.4).t()
    labels = torch.randint(0, V, (2, pick(3, 64)), device=device)
    lp, h, dx, dw, _ = check_against_ref(hidden, weight, None, labels, 1.0, be)
    assert lp.shape == (2, pick(3, 64)) and dx.shape == hidden.shape and dw.shape == weight.shape
    for lead in ((), (1,), (1, 1), (4, 1), (1, 3), (2, 2, 2)):  # 0-D/1-D/3-D/4-D labels, B=1, T=1
        hidden, weight, b, labels = _inputs(lead, 16, 70, torch.float32, device, ignore_frac=0.0)
        lp, h, *_ = check_against_ref(hidden, weight, b, labels, 1.0, be)
        assert lp.shape == h.shape == labels.shape


@pytest.mark.parametrize("be", BACKENDS)
def test_chunked_backward(be, device, monkeypatch):
    """Force many vocab chunks, then token chunks too (dW through the fp32 buffer): still matches the reference."""
    hidden, weight, b, labels = _inputs((13,), 32, 600, torch.bfloat16, device)
    monkeypatch.setattr(LL, "MIN_V_CHUNK", 128)
    for budget in (13 * 200 * 2, 64 * 128 * 2 // 13):  # 13 tokens × 200 vocab; then < 13 × 128 → token chunks of 5
        monkeypatch.setattr(LL, "CHUNK_BYTES", budget)
        n_c, v_c = LL._chunks(13, 600, 2)
        assert v_c < 600 and (budget > 13 * 128 * 2 or n_c < 13)
        check_against_ref(hidden, weight, b, labels, 0.9, be)


@pytest.mark.parametrize("be", BACKENDS)
def test_closed_form_uniform(be, device):
    """W = 0, b = 0: uniform softmax → logp = −log V, H = log V; the gradient w.r.t. hidden is then exactly 0."""
    V, H = 333, 20
    x = torch.randn(4, H, device=device, requires_grad=True)
    w = torch.zeros(V, H, device=device, requires_grad=True)
    labels = torch.randint(0, V, (4,), device=device)
    with backend(be):
        lp, h = linear_logprobs(x, w, labels, bias=torch.zeros(V, device=device), temperature=0.5, return_entropy=True)
        (lp + h).sum().backward()
    logv = float(torch.log(torch.tensor(float(V))))
    torch.testing.assert_close(lp, torch.full_like(lp, -logv), atol=1e-5, rtol=0)
    torch.testing.assert_close(h, torch.full_like(h, logv), atol=1e-5, rtol=0)
    assert x.grad.abs().max() == 0  # dX = G·W = 0
    # dW = Gᵀ·X/…: with uniform p, dlogp/dz = onehot − 1/V and dH/dz = 0 → row y of dW gets (1 − 1/V)·x/τ
    expect = (torch.nn.functional.one_hot(labels, V).float() - 1.0 / V).t() @ x.detach() / 0.5
    torch.testing.assert_close(w.grad, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("be", BACKENDS)
def test_ignore_index_and_frozen_weight(be, device):
    V, H = 200, 16
    x = torch.randn(5, H, device=device, requires_grad=True)
    w = torch.randn(V, H, device=device) * 0.5  # frozen: no dW computed
    labels = torch.tensor([-100, 3, -1, 199, 0], device=device)
    with backend(be):
        lp = linear_logprobs(x, w, labels)
        lp.sum().backward()
    ign = labels < 0
    assert (lp[ign] == 0).all() and (lp[~ign] < 0).all()
    assert (x.grad[ign] == 0).all() and (x.grad[~ign] != 0).all()
    xr = x.detach().double().requires_grad_()
    linear_logprobs_ref(xr, w.double(), labels).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("be", BACKENDS)
def test_bad_input_errors(be):
    x, w, y = torch.randn(3, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long)
    with backend(be):
        with pytest.raises(ValueError, match=r"hidden must be \[..., H=8\]"):
            linear_logprobs(torch.randn(3, 7), w, y)
        with pytest.raises(TypeError, match="dtype"):
            linear_logprobs(x.bfloat16(), w, y)
        with pytest.raises(ValueError, match="bias must be"):
            linear_logprobs(x, w, y, bias=torch.zeros(9))
        with pytest.raises(ValueError, match="labels contain 10 >= V=10"):
            linear_logprobs(x, w, torch.full((3,), 10))
        with pytest.raises(ValueError, match="weight must be"):
            linear_logprobs(x, w[None], y)


def _rss_bytes(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def _peak_extra_bytes(fn, N: int, V: int, H: int) -> int:
    """Peak resident-memory growth (bytes) of fwd+bwd over what was resident just before (inputs already allocated)."""
    x = torch.randn(N, H, requires_grad=True)
    w = torch.randn(V, H, requires_grad=True)
    y = torch.randint(0, V, (N,))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    base = _rss_bytes("VmRSS")
    lp, h = fn(x, w, y, return_entropy=True)
    (lp + h).sum().backward()
    return _rss_bytes("VmHWM") - base


@pytest.mark.skipif(ON_CUDA, reason="measures the CPU path")
def test_cpu_memory_does_not_grow_with_n_times_v(monkeypatch):
    """CPU path with a 1 MiB chunk budget: peak extra memory stays flat from N=256 to N=2048 at V=4099 (where [N, V] fp32
    logits grow by 28 MiB); the materializing reference shows that growth, so the measurement can see it."""
    monkeypatch.setattr(LL, "CHUNK_BYTES", 1 << 20)
    V, H, n_small, n_big = 4099, 16, 256, 2048
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny chunks: keep OpenMP out of it (this test is about memory, not speed)
    try:
        with backend("torch"):
            _peak_extra_bytes(linear_logprobs, 64, V, H)  # warm-up (thread pools, allocator)
            small = _peak_extra_bytes(linear_logprobs, n_small, V, H)
            big = _peak_extra_bytes(linear_logprobs, n_big, V, H)
            ref_big = _peak_extra_bytes(linear_logprobs_ref, n_big, V, H)
    finally:
        torch.set_num_threads(threads)
    grow_nv = (n_big - n_small) * V * 4
    assert ref_big >= n_big * V * 4, f"measurement sanity: the reference peaked only {ref_big / 2**20:.1f} MiB"
    assert big - small < grow_nv / 4, f"extra memory grew {(big - small) / 2**20:.1f} MiB (N·V·4 grew {grow_nv / 2**20:.0f})"
    assert big < 16 * 2**20, f"extra memory {big / 2**20:.1f} MiB with a 1 MiB chunk budget"


@pytest.mark.parametrize("be", BACKENDS)
def test_no_tokens(be, device):
    x = torch.randn(2, 0, 8, device=device, requires_grad=True)
    w = torch.randn(10, 8, device=device, requires_grad=True)
    with backend(be):
        lp, h = linear_logprobs(x, w, torch.zeros(2, 0, dtype=torch.long, device=device), return_entropy=True)
        (lp.sum() + h.sum()).backward()
    assert lp.shape == h.shape == (2, 0) and x.grad.shape == x.shape
    assert w.grad.shape == w.shape and (w.grad == 0).all()


@pytest.mark.parametrize("triton_path", (True, False))
def test_unchecked_out_of_range_labels_act_as_ignored(triton_path, device):
    """What CUDA does with labels ≥ V (not checked there): like ignored labels (bypasses the CPU-side check)."""
    x = torch.randn(3, 16, device=device, requires_grad=True)
    w = torch.randn(40, 16, device=device)
    lp, h = LL._LinearLogProbs.apply(x, w, None, torch.tensor([5, 40, 1000], device=device), 1.0, triton_path, False)
    lp.sum().backward()
    assert (lp[1:] == 0).all() and lp[0] < 0
    assert (x.grad[1:] == 0).all() and (x.grad[0] != 0).all()


@pytest.mark.parametrize("be", BACKENDS)
def test_chunk_products_accumulate_in_fp32(be, device, monkeypatch):
    """dX = Σ_chunks G_chunk·W_chunk over many vocab chunks: each chunk's product must reach the fp32 sum unrounded.

    The G chunks the backward writes (bf16) are recorded; the float64 sum of their products with W, rounded once to bf16
    (dX's dtype), is then what an fp32 accumulation gives for all but the rare elements within ~1e-6 of a rounding
    boundary; rounding each chunk's product to bf16 before the sum moves most elements."""
    N, H, V = pick((24, 16, 1024), (512, 256, 32768))
    monkeypatch.setattr(LL, "MIN_V_CHUNK", 64)
    monkeypatch.setattr(LL, "CHUNK_BYTES", N * 64 * 4)  # all N tokens × 128 (16-bit G) or 64 (CPU fp32) columns
    monkeypatch.setattr(LL, "CPU_CHUNK_BYTES", N * 64 * 4)
    chunks = []
    for name in ("_dz_triton", "_dz_torch"):
        def rec(*a, _f=getattr(LL, name), **kw):
            g = _f(*a, **kw)
            chunks.append((a[1], g))  # (W chunk, G chunk)
            return g
        monkeypatch.setattr(LL, name, rec)
    hidden, weight, _, labels = _inputs((N,), H, V, torch.bfloat16, device, bias=False, ignore_frac=0.0)
    x = hidden.detach().clone().requires_grad_()
    g_lp, g_h = torch.randn(N, device=device), torch.randn(N, device=device)
    with backend(be):
        lp, ent = linear_logprobs(x, weight, labels, return_entropy=True)
        (lp * g_lp + ent * g_h).sum().backward()
    assert len(chunks) >= V // 128 and all(g.dtype == torch.bfloat16 for _, g in chunks)
    ref = sum(g.double() @ w.double() for w, g in chunks)
    moved = (x.grad != ref.to(torch.bfloat16)).double().mean().item()
    assert moved <= 0.01, f"{moved:.1%} of dX differ from the once-rounded exact sum: chunk products rounded first?"


def test_cpu_backward_reuses_the_forward_logits_when_small(monkeypatch):
    """CPU path, training, N·V·4 ≤ CPU_KEEP_BYTES: the backward reads the forward's logit chunks (no recompute GEMM),
    with the same gradients as recomputing them (bitwise: the same GEMM on the same operands), also for a second
    backward through a retained graph; without a gradient (or above the budget) nothing is kept."""
    calls = []
    real = LL._logits_chunk_torch
    monkeypatch.setattr(LL, "_logits_chunk_torch", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(LL, "CPU_CHUNK_BYTES", 4 * 24 * 40)  # 2 vocab chunks of 40 at N = 24, V = 80
    hidden, weight, b, labels = _inputs((4, 6), 16, 80, torch.float32, "cpu")
    g_lp, g_h = torch.randn(4, 6), torch.randn(4, 6)
    out = {}
    for budget in (2**30, 0):  # keep, recompute
        monkeypatch.setattr(LL, "CPU_KEEP_BYTES", budget)
        calls.clear()
        x, w, bb = (t.detach().clone().requires_grad_() for t in (hidden, weight, b))
        with backend("torch"):
            lp, h = linear_logprobs(x, w, labels, bias=bb, temperature=0.8, return_entropy=True)
        fwd_calls = len(calls)
        ((lp * g_lp).sum() + (h * g_h).sum()).backward(retain_graph=True)
        grads = [t.grad.clone() for t in (x, w, bb)]
        assert len(calls) == (fwd_calls if budget else 2 * fwd_calls) and fwd_calls == 2
        for t in (x, w, bb):
            t.grad = None
        ((lp * g_lp).sum() + (h * g_h).sum()).backward()
        assert all(torch.equal(t.grad, g) for t, g in zip((x, w, bb), grads))  # the kept logits were not changed
        out[budget] = (lp.detach(), h.detach(), grads)
    (lp1, h1, g1), (lp0, h0, g0) = out[2**30], out[0]
    assert torch.equal(lp1, lp0) and torch.equal(h1, h0)
    assert all(torch.equal(a, c) for a, c in zip(g1, g0))
    with torch.no_grad(), backend("torch"):
        ctx_keep = []
        monkeypatch.setattr(LL._LinearLogProbs, "forward",
                            staticmethod(lambda ctx, *a: ctx_keep.append(a[-1]) or (torch.zeros(24), torch.zeros(24))))
        linear_logprobs(hidden.requires_grad_(), weight, labels, bias=b, return_entropy=True)
    assert ctx_keep == [False]
