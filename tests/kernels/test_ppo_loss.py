"""ppo_policy_loss (fused Triton / vectorised torch) against ppo_policy_loss_ref in float64 on fresh random inputs.

Every test runs on both backends: "triton" (the kernels; Triton's interpreter on CPU) and "torch" (the CPU path).
Tolerances: tests/helpers/tolerances.py. Shapes: [6, 21] under the interpreter (2 BLOCK_T tiles per row), [64, 1024]
on CUDA.
"""
import math

import pytest
import torch

from fastrlhf import kernels
from fastrlhf.kernels import ppo_policy_loss, ppo_policy_loss_ref
from tests.conftest import pick
from tests.helpers.loss_cases import shape
from tests.helpers.masks import make_mask
from tests.helpers.tolerances import GRAD_TOL, LOSS_TOL, assert_close, count_tol

BACKENDS = ("triton", "torch")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
UPSTREAM = 3.7  # non-unit upstream gradient: backward of loss * 3.7


def make_inputs(B, T, device, dtype=torch.float32, spread=0.5, mask_layout="mixed"):
    """logp, old, adv, ref, mask. log-ratio ~ N(0, spread²): with spread 0.5 a sizeable share of tokens falls in each
    clip branch and (for dual_clip 2) beyond the dual clip; ref differs from logp by N(0, 0.5²). Row 0 also gets one
    planted token per branch (the tests still measure the branch shares on the data they use)."""
    logp = (-3.0 * torch.rand(B, T, device=device)).to(dtype)
    old = (logp.float() + spread * torch.randn(B, T, device=device)).to(dtype)
    adv = torch.randn(B, T, device=device).to(dtype)
    ref = (logp.float() + 0.5 * torch.randn(B, T, device=device)).to(dtype)
    mask = make_mask(B, T, mask_layout, device)
    if T >= 5:  # plant one token per branch in row 0 so every branch is exercised whatever the draw
        # log ρ per planted token: low clip, high clip, dual clip, inside, 1.1 < ρ < 1.3
        r = torch.tensor([-0.5, 0.5, 1.2, 0.0, 0.18], device=device)
        a = torch.tensor([-1.0, 1.0, -1.0, 1.0, 1.0], device=device)
        old[0, :5] = (logp[0, :5].float() - r).to(dtype)
        adv[0, :5] = a.to(dtype)
        mask[0, :5] = True
    return logp, old, adv, ref, mask


def run_both(backend, logp, old, adv, mask, ref=None, **kw):
    """(loss, metrics, grad) from the kernel under ``backend`` and from the float64 reference (upstream grad 3.7)."""
    x = logp.detach().clone().requires_grad_(True)
    with kernels.backend(backend):
        loss, metrics = ppo_policy_loss(x, old, adv, mask, ref_logprobs=ref, **kw)
        (loss * UPSTREAM).backward()
    x64 = logp.detach().double().requires_grad_(True)
    ref64 = None if ref is None else ref.double()
    loss64, metrics64 = ppo_policy_loss_ref(x64, old.double(), adv.double(), mask, ref_logprobs=ref64, **kw)
    (loss64 * UPSTREAM).backward()
    return (loss, metrics, x.grad), (loss64, metrics64, x64.grad)


def check(got, want, mask, dtype=torch.float32):
    (loss, metrics, grad), (loss64, metrics64, grad64) = got, want
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, loss64, **LOSS_TOL, what="loss")
    assert set(metrics) == set(metrics64)
    for name, value in metrics.items():
        assert value.dtype == torch.float32 and value.dim() == 0 and not value.requires_grad, name
        tol = dict(rtol=0.0, atol=count_tol(mask)) if name == "clipfrac" else LOSS_TOL
        assert_close(value, metrics64[name], **tol, what=name)
    assert grad.dtype == dtype and grad.shape == grad64.shape
    assert_close(grad, grad64, **GRAD_TOL[dtype], what="grad")


def branch_fractions(logp, old, adv, mask, eps_low, eps_high, dual_clip):
    """Share of valid tokens in the low-clip (A < 0, ρ < 1 − ε_low), high-clip (A > 0, ρ > 1 + ε_high) and dual-clip
    (A < 0, ρ > c) branches, from the test data in float64."""
    m = mask.bool()
    rho = torch.exp((logp.double() - old.double()).clamp(-20, 20))
    a = adv.double()
    low = (a < 0) & (rho < 1 - eps_low) & m
    high = (a > 0) & (rho > 1 + eps_high) & m
    dual = (a < 0) & (rho > dual_clip) & m if dual_clip else torch.zeros_like(m)
    n = m.sum().clamp(min=1)
    return low.sum() / n, high.sum() / n, dual.sum() / n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_agg_modes_match_ref(backend, agg, device):
    B, T = shape()
    logp, old, adv, ref, mask = make_inputs(B, T, device)
    low, high, dual = branch_fractions(logp, old, adv, mask, 0.2, 0.2, 2.0)
    assert low > 0 and high > 0 and dual > 0, "test data must exercise the low, high and dual clip branches"
    got, want = run_both(backend, logp, old, adv, mask, ref, clip_eps=0.2, dual_clip=2.0, kl_coef=0.1, agg=agg)
    check(got, want, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ("k1", "k2", "k3", "abs", None))
def test_kl_estimators(backend, estimator, device):
    B, T = shape()
    logp, old, adv, ref, mask = make_inputs(B, T, device)
    if estimator is None:
        got, want = run_both(backend, logp, old, adv, mask)
        assert set(got[1]) == {"clipfrac", "approx_kl"}
    else:
        got, want = run_both(backend, logp, old, adv, mask, ref, kl_coef=0.3, kl_estimator=estimator)
        assert set(got[1]) == {"clipfrac", "approx_kl", "kl"}
    check(got, want, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_metric_without_kl_in_loss(backend, device):
    """ref given with kl_coef 0: the loss is the pure clipped loss, the kl metric is still reported."""
    B, T = shape()
    logp, old, adv, ref, mask = make_inputs(B, T, device)
    got, want = run_both(backend, logp, old, adv, mask, ref, kl_coef=0.0)
    check(got, want, mask)
    no_ref, _ = run_both(backend, logp, old, adv, mask)
    assert_close(got[0], no_ref[0], **LOSS_TOL, what="loss with kl_coef 0")
    assert got[1]["kl"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("kind", ("float", "tensor"))
def test_normalizer(backend, agg, kind, device):
    B, T = shape()
    logp, old, adv, ref, mask = make_inputs(B, T, device)
    norm = 3.0 * B * T + 0.5                                     # e.g. the global token / row count across ranks
    normalizer = norm if kind == "float" else torch.tensor(norm, device=device)
    got, want = run_both(backend, logp, old, adv, mask, ref, kl_coef=0.05, agg=agg, normalizer=normalizer)
    check(got, want, mask)
    if agg == "token-mean":                                      # closed form: Σ ℓ m / normalizer = mean · Σm / norm
        plain, _ = run_both(backend, logp, old, adv, mask, ref, kl_coef=0.05)
        assert_close(got[0], plain[0] * mask.sum() / norm, rtol=1e-5, atol=1e-7, what="rescaled loss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_asymmetric_clip(backend, device):
    """ε_low 0.1, ε_high 0.3: tokens with A > 0 and 1.1 < ρ ≤ 1.3 are clipped by a symmetric 0.1 but not here."""
    B, T = shape()
    logp, old, adv, ref, mask = make_inputs(B, T, device)
    rho = torch.exp(logp.double() - old.double())
    between = ((adv > 0) & (rho > 1.1) & (rho < 1.3) & mask).sum()
    low, high, _ = branch_fractions(logp, old, adv, mask, 0.1, 0.3, None)
    assert between > 0 and low > 0 and high > 0
    got, want = run_both(backend, logp, old, adv, mask, clip_eps=0.1, clip_eps_high=0.3)
    check(got, want, mask)
    sym, _ = run_both(backend, logp, old, adv, mask, clip_eps=0.1)
    assert got[1]["clipfrac"] < sym[1]["clipfrac"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ("left", "right", "holes"))
def test_padding_layouts(backend, layout, device):
    B, T = shape()
    logp, old, adv, ref, mask = make_inputs(B, T, device, mask_layout=layout)
    mask[-1] = False                                              # plus an all-masked row
    got, want = run_both(backend, logp, old, adv, mask, ref, kl_coef=0.1, agg="seq-mean-token-mean", dual_clip=3.0)
    check(got, want, mask)
    assert (got[2][~mask] == 0).all(), "padding gets no gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_all_zero_mask(backend, agg, device):
    B, T = shape()
    logp, old, adv, ref, mask = make_inputs(B, T, device)
    mask = torch.zeros_like(mask)
    x = logp.clone().requires_grad_(True)
    with kernels.backend(backend):
        loss, metrics = ppo_policy_loss(x, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, agg=agg)
        (loss * UPSTREAM).backward()
    assert loss.item() == 0.0
    assert all(v.item() == 0.0 for v in metrics.values())
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_single_token(backend, agg, device):
    logp, old, adv, ref, mask = make_inputs(1, 1, device)
    mask[:] = True
    got, want = run_both(backend, logp, old, adv, mask, ref, kl_coef=0.2, agg=agg, dual_clip=1.5)
    check(got, want, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_short_rows(backend, device):
    """B = 20 > the interpreter's finalize tile (16 rows): the per-row weight loop runs over 2 tiles."""
    B, T = pick((20, 5), (4096, 64))
    logp, old, adv, ref, mask = make_inputs(B, T, device)
    got, want = run_both(backend, logp, old, adv, mask, ref, kl_coef=0.1, agg="seq-mean-token-mean", dual_clip=2.0)
    check(got, want, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_low_precision_inputs(backend, dtype, device):
    B, T = shape()
    logp, old, adv, ref, mask = make_inputs(B, T, device, dtype=dtype)
    got, want = run_both(backend, logp, old, adv, mask, ref, kl_coef=0.1, dual_clip=2.0)
    check(got, want, mask, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_broadcast(backend, device):
    """Transposed / strided views and a per-sequence advantage [B, 1] (broadcast, stride 0) are read in place."""
    B, T = shape()
    logp, old, adv, ref, mask = make_inputs(B, T, device)
    logp_t = logp.t().contiguous().t()                            # strides (1, B)
    old_s = torch.stack([old, old], dim=-1)[..., 0]               # stride 2 along T
    ref_t = ref.t().contiguous().t()
    mask_f = torch.stack([mask.float(), mask.float()], dim=-1)[..., 1]   # float mask, strided
    adv_seq = torch.randn(B, 1, device=device)
    assert not logp_t.is_contiguous() and not old_s.is_contiguous() and not mask_f.is_contiguous()
    got, want = run_both(backend, logp_t, old_s, adv_seq, mask_f, ref_t, kl_coef=0.1)
    check(got, want, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ratio_one_closed_form(backend, device):
    """logp == old → ρ = 1: loss = −mean(A) over valid tokens, clipfrac 0, approx_kl 0, grad = −3.7·A·m/Σm."""
    B, T = shape()
    logp, _, adv, _, mask = make_inputs(B, T, device)
    x = logp.clone().requires_grad_(True)
    with kernels.backend(backend):
        loss, metrics = ppo_policy_loss(x, logp, adv, mask)
        (loss * UPSTREAM).backward()
    n = mask.sum()
    assert_close(loss, -(adv * mask).sum() / n, **LOSS_TOL, what="loss")
    assert metrics["clipfrac"].item() == 0.0 and metrics["approx_kl"].item() == 0.0
    assert_close(x.grad, -UPSTREAM * adv * mask / n, **GRAD_TOL[torch.float32], what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_only_through_logprobs(backend, device):
    B, T = shape()
    logp, old, adv, ref, mask = make_inputs(B, T, device)
    x = logp.clone().requires_grad_(True)
    others = [t.clone().requires_grad_(True) for t in (old, adv, ref)]
    with kernels.backend(backend):
        loss, metrics = ppo_policy_loss(x, others[0], others[1], mask, ref_logprobs=others[2], kl_coef=0.1)
        loss.backward()
    assert x.grad is not None
    assert all(t.grad is None for t in others)
    assert all(not v.requires_grad for v in metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_forward_matches(backend, device):
    """Without a gradient the kernel skips storing ∂ℓ/∂logp; loss and metrics are unchanged."""
    B, T = shape()
    logp, old, adv, ref, mask = make_inputs(B, T, device)
    with kernels.backend(backend):
        with torch.no_grad():
            loss0, m0 = ppo_policy_loss(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)
        loss1, m1 = ppo_policy_loss(logp.clone().requires_grad_(True), old, adv, mask, ref_logprobs=ref, kl_coef=0.1)
    assert not loss0.requires_grad and loss1.requires_grad
    assert_close(loss0, loss1, **LOSS_TOL, what="loss")          # (separately compiled variants on CUDA)
    for k in m0:
        assert_close(m0[k], m1[k], **LOSS_TOL, what=k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_log_ratios_stay_finite(backend, device):
    """|logp − old| and |ref − logp| beyond 20: the clamps keep everything finite and match the reference."""
    B, T = shape()
    logp, old, adv, ref, mask = make_inputs(B, T, device)
    old[:, ::3] = logp[:, ::3] - 25.0                              # ρ would be e^25
    ref[:, 1::3] = logp[:, 1::3] + 30.0                            # k3 would overflow without the clamp
    ref[:, 2::3] = logp[:, 2::3] - 30.0
    got, want = run_both(backend, logp, old, adv, mask, ref, kl_coef=0.1, dual_clip=3.0)
    check(got, want, mask)


def test_bad_arguments():
    logp, old, adv, ref, mask = make_inputs(2, 5, "cpu")
    with pytest.raises(ValueError, match="agg"):
        ppo_policy_loss(logp, old, adv, mask, agg="mean")
    with pytest.raises(ValueError, match="kl_estimator"):
        ppo_policy_loss(logp, old, adv, mask, ref_logprobs=ref, kl_estimator="k4")
    with pytest.raises(ValueError, match="ref_logprobs"):
        ppo_policy_loss(logp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_policy_loss(logp, old, adv, mask, dual_clip=1.0)
    with pytest.raises(ValueError, match="clip_eps"):
        ppo_policy_loss(logp, old, adv, mask, clip_eps=1.5)
    with pytest.raises(ValueError, match="normalizer"):
        ppo_policy_loss(logp, old, adv, mask, normalizer=0.0)
    with pytest.raises(ValueError, match="advantages"):
        ppo_policy_loss(logp, old, adv[:, :3], mask)
    with pytest.raises(ValueError, match=r"logprobs must be \[B, T\]"):
        ppo_policy_loss(logp[0], old[0], adv[0], mask[0])
    with pytest.raises(TypeError, match="old_logprobs"):
        ppo_policy_loss(logp, old.long(), adv, mask)


def test_ref_float64_closed_form():
    """The reference itself on a hand-computed token: A = 1, ρ = e^0.5 ≈ 1.65 > 1.2 → ℓ = −1.2 (clipped)."""
    logp = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    loss, metrics = ppo_policy_loss_ref(logp, torch.zeros_like(logp), torch.ones_like(logp), torch.tensor([[1, 0]]))
    assert math.isclose(loss.item(), -1.2) and metrics["clipfrac"].item() == 1.0
    assert math.isclose(metrics["approx_kl"].item(), 0.125)


class _CountingKernel:
    """Stands in for a @triton.jit kernel: counts ``kernel[grid](...)`` launches and forwards them."""

    def __init__(self, kernel, counts, name):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        self.counts[self.name] = self.counts.get(self.name, 0) + 1
        return self.kernel[grid]


def test_three_triton_launches_fwd_bwd(monkeypatch, device):
    """Forward = row kernel + finalize, backward = one scale kernel: 3 Triton launches in all (any agg / normalizer)."""
    import importlib
    ppo_mod = importlib.import_module("fastrlhf.kernels.ppo_loss")
    agg_mod = importlib.import_module("fastrlhf.kernels._aggregate")
    counts = {}
    for mod, name in ((ppo_mod, "_ppo_fwd_kernel"), (agg_mod, "_finalize_kernel"), (agg_mod, "_scale_grad_kernel")):
        monkeypatch.setattr(mod, name, _CountingKernel(getattr(mod, name), counts, name))
    B, T = shape()
    logp, old, adv, ref, mask = make_inputs(B, T, device)
    x = logp.clone().requires_grad_(True)
    with kernels.backend("triton"):
        loss, _ = ppo_policy_loss(x, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, agg="seq-mean-token-mean",
                                  normalizer=torch.tensor(float(B), device=device))
        assert counts == {"_ppo_fwd_kernel": 1, "_finalize_kernel": 1}
        loss.backward()
    assert counts == {"_ppo_fwd_kernel": 1, "_finalize_kernel": 1, "_scale_grad_kernel": 1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: counts GPU kernels and host syncs")
def test_cuda_three_kernels_no_host_sync():
    """On CUDA, forward + backward launch exactly our 3 kernels (plus autograd's fill of the unit upstream gradient)
    and never synchronise with the host."""
    B, T = 64, 1024
    logp, old, adv, ref, mask = make_inputs(B, T, "cuda")
    x = logp.clone().requires_grad_(True)
    ppo_policy_loss(x, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)[0].backward()   # warm-up (compile)
    x.grad = None
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda.set_sync_debug_mode("error")                    # any host sync inside raises
        try:
            loss, metrics = ppo_policy_loss(x, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ours = sorted(k for n in names for k in ("_ppo_fwd_kernel", "_finalize_kernel", "_scale_grad_kernel") if k in n)
    assert ours == ["_finalize_kernel", "_ppo_fwd_kernel", "_scale_grad_kernel"], names
    assert len(names) <= 4, names
