"""fastrlhf.integrations.functional against float64 references written from veRL's and OpenRLHF's documented formulas
(the references below are the equations; the peers' own code is compared in test_integrations_verl.py /
test_integrations_openrlhf.py).

Tolerances: inputs are exact fp32/bf16 values, references run in float64 on those same values, and our kernels accumulate
in fp32, so the error is fp32 rounding of O(1)–O(10) quantities summed over V ≤ 1001 or T ≤ 13 terms: 1e-5 absolute
(2e-5 relative for the whitened advantages, which divide by a std estimated from ~30 values).
"""
from __future__ import annotations

import pytest
import torch

from fastrlhf.integrations.functional import openrlhf, verl
from tests.helpers.tolerances import FP32


def _masks(B: int, T: int) -> torch.Tensor:
    """[B, T] masks with right padding, left padding, a hole, a full row and an empty row (B ≥ 5)."""
    m = torch.ones(B, T)
    m[0, T - 3:] = 0          # right padding
    m[1, :2] = 0              # left padding
    m[2, 3:5] = 0             # a hole
    m[4, :] = 0               # nothing valid
    return m


# --- log-probs and entropy ------------------------------------------------------------------------------------------


def _ref_logp_ent(z64, y):
    lse = torch.logsumexp(z64, -1)  # LSE(z)
    return z64.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse, lse - (torch.softmax(z64, -1) * z64).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1001, 37])
def test_verl_and_openrlhf_logprobs_match_float64(dtype, V):
    B, T, tau = 3, 7, 0.6
    logits = (torch.randn(B, T, V) * 4).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (B, T))

    logp_v = verl.logprobs_from_logits(logits, labels)  # veRL: logits already / τ by the caller (τ = 1 here)
    ent_v = verl.entropy_from_logits(logits)
    logp_o = openrlhf.log_probs_from_logits(logits, labels, temperature=tau)  # OpenRLHF divides by τ itself
    for t in (logp_v, ent_v, logp_o):
        assert t.dtype == torch.float32 and t.shape == (B, T)

    x64 = logits.detach().double().requires_grad_(True)
    ref_v, ref_ent = _ref_logp_ent(x64, labels)
    ref_o, _ = _ref_logp_ent(x64 / tau, labels)
    torch.testing.assert_close(logp_v.double(), ref_v, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_v.double(), ref_ent, atol=1e-5, rtol=0)
    torch.testing.assert_close(logp_o.double(), ref_o, atol=1e-5, rtol=0)

    # gradients one output at a time (autograd would otherwise sum three bf16-rounded contributions in bf16)
    for out, ref in ((logp_v, ref_v), (ent_v, ref_ent), (logp_o, ref_o)):
        g = torch.randn(B, T)  # non-unit upstream gradient
        (got,) = torch.autograd.grad(out, logits, g, retain_graph=True)
        (want,) = torch.autograd.grad(ref, x64, g.double(), retain_graph=True)
        # fp32 math, result stored in the logits' dtype: bf16 allows one rounding (2^-8 relative)
        rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (2**-8, 1e-6)
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)


# --- veRL GAE -------------------------------------------------------------------------------------------------------


def _verl_gae_ref(r, v, m, gamma, lam):
    """GAE over the valid tokens of each row (masked tokens skipped: V_next and A_next come from the next valid token),
    R = A + V, then A whitened over all valid tokens of the batch with the unbiased variance. float64, 0 where m = 0."""
    B, T = r.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        next_v, next_a = 0.0, 0.0
        for t in reversed(range(T)):
            if m[b, t] == 0:
                continue
            delta = r[b, t] + gamma * next_v - v[b, t]   # δ_t = r_t + γ V_next − V_t
            adv[b, t] = delta + gamma * lam * next_a     # A_t = δ_t + γλ A_next
            next_v, next_a = v[b, t], adv[b, t]
    ret = (adv + v) * m                                  # R_t = A_t + V_t
    valid = adv[m.bool()]
    mu, var = valid.mean(), valid.var(unbiased=True)
    white = (adv - mu) * torch.rsqrt(var + 1e-8) * m     # (A − μ) / sqrt(σ² + 1e-8)
    return white, ret


@pytest.mark.parametrize("T", [13, 6])
def test_verl_gae_matches_float64(T):
    B, gamma, lam = 6, 0.97, 0.9
    r, v, m = torch.randn(B, T), torch.randn(B, T), _masks(B, T)
    adv, ret = verl.compute_gae_advantage_return(r, v, m, gamma, lam)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == ret.shape == (B, T)
    ref_adv, ref_ret = _verl_gae_ref(r.double(), v.double(), m.double(), gamma, lam)
    torch.testing.assert_close(ret.double(), ref_ret, atol=1e-5, rtol=0)
    torch.testing.assert_close(adv.double(), ref_adv, atol=1e-5, rtol=2e-5)
    assert (adv[m == 0] == 0).all() and (ret[m == 0] == 0).all()


def test_verl_gae_closed_form():
    """rewards [0, 0, 0, 1], values 0, no padding: R = A = [(γλ)³, (γλ)², γλ, 1] before whitening."""
    gamma, lam = 0.9, 0.8
    r, v, m = torch.tensor([[0.0, 0.0, 0.0, 1.0]]), torch.zeros(1, 4), torch.ones(1, 4)
    adv, ret = verl.compute_gae_advantage_return(r, v, m, gamma, lam)
    gl = gamma * lam
    expect = torch.tensor([[gl**3, gl**2, gl, 1.0]])
    torch.testing.assert_close(ret, expect, atol=1e-6, rtol=0)
    torch.testing.assert_close(adv, (expect - expect.mean()) / expect.std(), atol=1e-5, rtol=0)


def test_verl_masked_whiten_keeps_mean_when_asked():
    x, m = torch.randn(5, 9) * 3 + 2, _masks(5, 9)
    x64, m64 = x.double(), m.double()
    valid = x64[m.bool()]
    mu, var = valid.mean(), valid.var(unbiased=True)
    ref = ((x64 - mu) * torch.rsqrt(var + 1e-8) + mu) * m64
    torch.testing.assert_close(verl.masked_whiten(x, m, shift_mean=False).double(), ref, atol=1e-5, rtol=1e-5)


# --- KL estimators --------------------------------------------------------------------------------------------------


def _logps(shape):
    """Token log-probs and reference log-probs whose difference spans small values and the clamp regions (|d| up to 30)."""
    logp = -torch.rand(shape) * 5
    ref = logp + torch.randn(shape) * torch.tensor([0.05, 1.0, 4.0, 30.0]).repeat(shape[-1] // 4 + 1)[: shape[-1]]
    return logp, ref


def _verl_kl_ref(lp, rf, name):
    """veRL's documented estimators, float64: kl = lp − rf, abs = |lp − rf|, mse = ½(lp − rf)²,
    low_var_kl = clamp(exp(d) − d − 1, −10, 10) with d = clamp(rf − lp, −20, 20)."""
    base = name.rstrip("+")
    if base in ("kl", "k1"):
        val = lp - rf
    elif base == "abs":
        val = (lp - rf).abs()
    elif base in ("mse", "k2"):
        val = 0.5 * (lp - rf) ** 2
    else:
        d = torch.clamp(rf - lp, -20, 20)
        val = torch.clamp(torch.exp(d) - d - 1, -10, 10)
    if name.endswith("+"):  # straight-through: value of `base`, gradient of ½(lp − rf)²
        k2 = 0.5 * (lp - rf) ** 2
        val = k2 - k2.detach() + val.detach()
    return val


@pytest.mark.parametrize("name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "low_var_kl+", "k3+"])
def test_verl_kl_penalty_matches_float64(name):
    logp, ref = _logps((4, 12))
    logp.requires_grad_(True)
    out = verl.kl_penalty(logp, ref, name)
    assert out.dtype == torch.float32 and out.shape == logp.shape
    lp64 = logp.detach().double().requires_grad_(True)
    want = _verl_kl_ref(lp64, ref.double(), name)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    g = torch.randn(4, 12)
    (out * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(logp.grad.double(), lp64.grad, atol=1e-5, rtol=1e-5)


def test_verl_kl_penalty_rejects_unknown_names():
    lp, rf = torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(NotImplementedError, match="full"):  # veRL's own error type for names it does not compute
        verl.kl_penalty(lp, rf, "full")
    with pytest.raises(NotImplementedError, match="low_var_kl"):
        verl.kl_penalty(lp, rf, "k4")


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased,with_old", [(False, False), (True, False), (True, True)])
def test_openrlhf_compute_approx_kl_matches_float64(est, unbiased, with_old):
    logp, base = _logps((5, 8))
    old = logp + torch.randn(5, 8) * 1.5 if with_old else None
    logp.requires_grad_(True)
    out = openrlhf.compute_approx_kl(logp, base, old, kl_estimator=est, unbiased_gradient=unbiased)
    lp64 = logp.detach().double().requires_grad_(True)
    r = lp64 - base.double()                              # r = log π − log π_base
    want = {"k1": r, "k2": r**2 / 2.0, "k3": torch.exp(-r) - 1 + r}[est]
    want = want.clamp(min=-10, max=10)                    # every estimator clamped to [−10, 10]
    if unbiased:                                          # value kept, gradient of w · r²/2, w detached
        w = 1.0 if old is None else torch.exp(lp64.detach() - old.double()).clamp(max=10.0)
        surrogate = w * r**2 / 2.0
        want = want.detach() + surrogate - surrogate.detach()
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    g = torch.randn(5, 8)
    (out * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(logp.grad.double(), lp64.grad, atol=1e-5, rtol=1e-5)


def test_openrlhf_compute_approx_kl_rejects_bad_input():
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="Unknown kl_estimator"):
        openrlhf.compute_approx_kl(lp, lp, kl_estimator="low_var_kl")


def test_openrlhf_compute_approx_kl_takes_openrlhf_0_11_arguments():
    """The third positional argument is log_probs_old (OpenRLHF 0.11), not the estimator name or a mask."""
    lp, base = _logps((2, 4))
    out = openrlhf.compute_approx_kl(lp, base, lp + 0.1, "k2", True)
    torch.testing.assert_close(out, ((lp - base) ** 2 / 2).clamp(-10, 10), atol=1e-6, rtol=1e-6)


# --- TRL's GRPO loss ------------------------------------------------------------------------------------------------


def _grpo_ref(lp, old, adv, m, ref, eps_lo, eps_hi, beta, loss_type, max_len, num_items):
    """TRL GRPO's documented loss in float64: ℓ = −min(ρA, clip(ρ, 1−ε_lo, 1+ε_hi)A) + β(exp(d) − d − 1), d = ref − lp."""
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    rho = torch.exp(lp - old)
    tok = -torch.minimum(rho * adv, torch.clamp(rho, 1 - eps_lo, 1 + eps_hi) * adv)
    if beta:
        d = ref - lp
        tok = tok + beta * (torch.exp(d) - d - 1)
    if loss_type == "grpo":
        return ((tok * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return (tok * m).sum() / m.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return (tok * m).sum() / (tok.shape[0] * max_len)
    return (tok * m).sum() / num_items


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,per_token_adv", [(0.0, False), (0.04, True)])
def test_trl_grpo_loss_matches_float64(loss_type, beta, per_token_adv):
    from fastrlhf.integrations.functional import trl_grpo_loss

    B, T = 6, 9
    m = _masks(B, T)
    old = -torch.rand(B, T) * 4
    lp = (old + torch.randn(B, T) * 0.3).requires_grad_(True)  # ratios around 1, some beyond the clip range
    ref = old + torch.randn(B, T) * 0.5
    adv = torch.randn(B, T) if per_token_adv else torch.randn(B)
    kw = dict(epsilon_low=0.2, epsilon_high=0.28, beta=beta, loss_type=loss_type, max_completion_length=T + 3,
              num_items=torch.tensor(float(m.sum() + 5)))
    loss, metrics = trl_grpo_loss(lp, old, adv, m, ref, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and "clipfrac" in metrics

    lp64 = lp.detach().double().requires_grad_(True)
    want = _grpo_ref(lp64, old.double(), adv.double(), m.double(), ref.double(), 0.2, 0.28, beta, loss_type, T + 3,
                     float(m.sum() + 5))
    torch.testing.assert_close(loss.double(), want, **FP32)
    loss.backward()
    want.backward()
    torch.testing.assert_close(lp.grad.double(), lp64.grad, **FP32)


def test_trl_grpo_loss_rejects_unsupported():
    from fastrlhf.integrations.functional import trl_grpo_loss

    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="cispo"):
        trl_grpo_loss(x, x, torch.zeros(2), m, loss_type="cispo")
    with pytest.raises(ValueError, match="max_completion_length"):
        trl_grpo_loss(x, x, torch.zeros(2), m, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        trl_grpo_loss(x, x, torch.zeros(2), m, beta=0.1, loss_type="bnpo")
