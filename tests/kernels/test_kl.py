"""kl_penalty against its float64 reference (values and gradients), both backends, every estimator.

Tolerances. Inputs are drawn in float64 and rounded once to the test dtype; the float64 reference sees exactly those rounded
values, so the kernel (fp32 math whatever the input dtype) is held to an fp32 bound in every dtype:
    |out − ref64| ≤ 2·|base32 − ref64| + 4·eps32·scale   (elementwise)
where base32 is plain PyTorch (kl_penalty_ref) in fp32 on the same inputs and scale the magnitude of the terms summed
(|logp| + |ref| for k1/abs, d² for k2, exp(d) + |d| + 1 for k3). Gradients: the autograd contract returns them in the input
dtype, so one final rounding to that dtype is unavoidable; they get that rounding's bound on top: one ulp of the dtype,
relative (2⁻⁷ bf16, 2⁻¹⁰ fp16, 0 fp32) — a full ulp, not half, because Triton's interpreter truncates where the GPU
rounds to nearest — plus one subnormal step for values under the smallest normal (tests/helpers/tolerances.py).
"""
import pytest
import torch

from fastrlhf import kernels
from fastrlhf.kernels import kl_penalty, kl_penalty_ref
from tests.conftest import pick
from tests.helpers.tolerances import rounding_bound

EST = ("k1", "k2", "k3", "abs")
EPS32 = torch.finfo(torch.float32).eps
BACKENDS = ("triton", "torch")


def _scale(logp, ref, est):
    d = ref - logp
    if est == "k2":
        return d * d
    if est == "k3":
        return torch.exp(d.clamp(-20, 20)) + d.abs() + 1
    return logp.abs() + ref.abs()


def _inputs(shape, dtype, device, spread=2.0):
    logp = (-spread * torch.rand(shape, dtype=torch.float64)).to(device=device, dtype=dtype)  # log-probs ≤ 0
    ref = (logp.double() + spread * torch.randn(shape, dtype=torch.float64, device=device)).to(dtype)
    return logp, ref


def _check(out, ref64, base32, scale, what, extra=0.0):
    err = (out.double() - ref64).abs()
    tol = 2 * (base32.double() - ref64).abs() + 4 * EPS32 * scale + extra
    bad = err > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off, worst err {err.max():.3e} (tol there {tol.flatten()[err.argmax()]:.3e})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("est", EST)
@pytest.mark.parametrize("clamp", [None, (-0.5, 1.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_values_and_grads_match_float64(backend, est, clamp, dtype, device):
    B, T = pick((3, 37), (64, 1024))
    logp, ref = _inputs((B, T), dtype, device)
    lp = logp.clone().requires_grad_()
    rf = ref.clone().requires_grad_()
    with kernels.backend(backend):
        out = kl_penalty(lp, rf, estimator=est, clamp=clamp)
    assert out.dtype == torch.float32 and out.shape == (B, T)

    lp64 = logp.double().requires_grad_()
    rf64 = ref.double().requires_grad_()
    ref64 = kl_penalty_ref(lp64, rf64, estimator=est, clamp=clamp)
    lp32 = logp.float().requires_grad_()
    rf32 = ref.float().requires_grad_()
    base32 = kl_penalty_ref(lp32, rf32, estimator=est, clamp=clamp)
    scale = _scale(logp.double(), ref.double(), est)
    _check(out, ref64.detach(), base32.detach(), scale, "forward")

    g = torch.randn(B, T, dtype=torch.float64, device=device) * 3  # non-unit upstream gradient
    out.backward(g.float())
    ref64.backward(g)
    base32.backward(g.float())
    assert lp.grad.dtype == dtype and rf.grad.dtype == dtype
    dscale = g.abs() * (1 + (ref.double() - logp.double()).abs() + torch.exp((ref.double() - logp.double()).clamp(-20, 20)))
    for got, want, base, name in ((lp.grad, lp64.grad, lp32.grad, "d logp"), (rf.grad, rf64.grad, rf32.grad, "d ref")):
        _check(got, want, base, dscale, name, extra=rounding_bound(want, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("est", EST)
def test_identical_distributions_give_zero(backend, est, device):
    logp = -torch.rand(pick((4, 19), (64, 1024)), device=device) * 5
    x = logp.clone().requires_grad_()
    with kernels.backend(backend):
        out = kl_penalty(x, logp.clone(), estimator=est)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    # d = 0: ∂k/∂logp = 1 (k1), 0 (k2, k3: exp(0) − 1, abs: sign(0))
    assert torch.equal(x.grad, torch.full_like(x, 1.0 if est == "k1" else 0.0))


# d = ref − logp beyond ±20 (and inside, at the clamp's edges): the closed forms in float64, written out here.
BIG_D = [-1000.0, -30.0, -20.5, -20.0, -19.5, -1.0, 0.0, 0.75, 19.5, 20.0, 20.5, 30.0, 1000.0]


def _closed_form(est, d):
    """(k, ∂k/∂logp) in float64 for d = ref − logp; k3 is evaluated at d' = clamp(d, −20, 20), gradient 0 beyond."""
    d = torch.tensor(d, dtype=torch.float64)
    inside = d.abs() <= 20
    dc = d.clamp(-20, 20)
    if est == "k1":
        return -d, torch.ones_like(d)
    if est == "k2":
        return 0.5 * d * d, -d
    if est == "k3":
        return torch.exp(dc) - dc - 1, torch.where(inside, 1 - torch.exp(dc), 0.0)
    return d.abs(), -torch.sign(d)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("est", EST)
def test_one_definition_beyond_20(backend, est, device):
    """kl_penalty and the fused PPO loss's KL term give the same values and gradients as the float64 closed form at
    |log-ratio| > 20 (the two used to disagree there for k3), on both backends."""
    want, want_g = _closed_form(est, BIG_D)
    logp = torch.full((1, len(BIG_D)), -7.0, device=device)
    ref = logp + torch.tensor(BIG_D, device=device)
    assert torch.equal((ref - logp).double().cpu()[0], torch.tensor(BIG_D, dtype=torch.float64))  # d exact in fp32
    x = logp.clone().requires_grad_()
    with kernels.backend(backend):
        out = kl_penalty(x, ref, estimator=est)
        out.sum().backward()
    tol = dict(rtol=4 * EPS32, atol=4 * EPS32 * float(torch.exp(torch.tensor(20.0))) if est == "k3" else 0)
    torch.testing.assert_close(out.double().cpu()[0], want, **tol)
    torch.testing.assert_close(x.grad.double().cpu()[0], want_g, **tol)
    # the PPO loss with A = 0 and β_loss = 1, summed over one row: loss = Σ_t KL_t and ∂loss/∂logp_t = ∂KL_t/∂logp_t
    y = logp.clone().requires_grad_()
    with kernels.backend(backend):
        loss, metrics = kernels.ppo_policy_loss(y, logp, torch.zeros_like(logp), torch.ones_like(logp, dtype=torch.bool),
                                          ref_logprobs=ref, kl_coef=1.0, kl_estimator=est, agg="seq-mean-token-sum")
        loss.backward()
    torch.testing.assert_close(y.grad.double().cpu()[0], want_g, **tol)
    torch.testing.assert_close(loss.double().cpu(), want.sum(), rtol=8 * EPS32, atol=tol["atol"] * len(BIG_D))
    torch.testing.assert_close(metrics["kl"].double().cpu(), want.mean(), rtol=8 * EPS32, atol=tol["atol"])
    # and the PyTorch reference (float64) that both backends' tests compare against agrees with the closed form
    lp64 = logp.double().requires_grad_()
    ref64 = kl_penalty_ref(lp64, ref.double(), estimator=est)
    ref64.sum().backward()
    torch.testing.assert_close(ref64.detach().cpu()[0], want, rtol=1e-15, atol=0)
    torch.testing.assert_close(lp64.grad.cpu()[0], want_g, rtol=1e-15, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    B, T = pick((4, 21), (64, 1024))
    big_l = -torch.rand(T, 2 * B, device=device, dtype=torch.bfloat16) * 3
    big_r = -torch.rand(B, 2 * T, device=device, dtype=torch.float16) * 3
    logp = big_l.t()[::2]  # [B, T] strided view (transposed, every other row)
    ref = big_r[:, 1::2]  # [B, T] stride 2 along T
    assert not logp.is_contiguous() and not ref.is_contiguous()
    with kernels.backend(backend):
        out = kl_penalty(logp, ref, estimator="k2", clamp=(0.0, 2.0))
    want = kl_penalty_ref(logp.double(), ref.double(), estimator="k2", clamp=(0.0, 2.0))
    base = kl_penalty_ref(logp.float(), ref.float(), estimator="k2", clamp=(0.0, 2.0))
    _check(out, want, base, _scale(logp.double(), ref.double(), "k2"), "non-contiguous")


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_shapes(backend, device):
    for shape in [(1, 1), (7,), (2, 3, 5)]:
        logp, ref = _inputs(shape, torch.float32, device)
        with kernels.backend(backend):
            out = kl_penalty(logp, ref, estimator="abs")
        assert out.shape == shape
        torch.testing.assert_close(out.double(), (ref.double() - logp.double()).abs(), rtol=EPS32, atol=0)


def test_bad_arguments():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"unknown estimator 'k4'.*'k1', 'k2', 'k3', 'abs'"):
        kl_penalty(x, x, estimator="k4")
    with pytest.raises(ValueError, match="shape mismatch"):
        kl_penalty(x, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="clamp"):
        kl_penalty(x, x, clamp=(1.0, 0.0))
    with pytest.raises(TypeError, match="logprobs"):
        kl_penalty(x.long(), x)
