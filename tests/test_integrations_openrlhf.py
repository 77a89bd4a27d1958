"""fastrlhf.integrations.openrlhf against the installed OpenRLHF 0.11 (``pip install --no-deps openrlhf==0.11.2``).

Each test calls OpenRLHF's own function (kept before ``apply()``) and the patched name OpenRLHF's trainer looks up, on
the same fresh random inputs, compares outputs and gradients, and counts the fastrlhf.kernels calls behind the patch.
OpenRLHF's GPU-only imports (flash-attn, DeepSpeed, vLLM) get placeholders while its modules load (tests/helpers/peers.py).

Tolerances: both sides compute in fp32 (OpenRLHF casts KL inputs with .float(); the losses get fp32 inputs here):
1e-5 absolute / relative. bf16 inputs: OpenRLHF computes in bf16 while our kernels compute in fp32 and return fp32, so
OpenRLHF's own function runs on the same values upcast to fp32 (exact), and ours on the bf16 tensors must match it to
fp32 rounding; our gradients are stored in bf16 (one rounding, 2^-8 relative).
"""
from __future__ import annotations

import importlib.metadata

import pytest
import torch

pytest.importorskip("openrlhf", reason="OpenRLHF is part of the test install (README: pip install --no-deps ...)")

from fastrlhf.integrations import openrlhf as fast_openrlhf  # noqa: E402

from tests.helpers.peers import counting, import_openrlhf  # noqa: E402
from tests.helpers.tolerances import FP32

UTILS, LOSS, EXP, KLC, PPO_ACTOR = import_openrlhf()
ORIG = {n: getattr(UTILS, n) for n in ("compute_approx_kl", "log_probs_from_logits", "compute_entropy")}
ORIG_POLICY, ORIG_VALUE = LOSS.PolicyLoss.forward, LOSS.ValueLoss.forward
ORIG_GAE = EXP.RemoteExperienceMaker.get_advantages_and_returns
ORIG_ADAPTIVE = KLC.AdaptiveKLController
BF16_RTOL = 2**-8


@pytest.fixture
def patch():
    p = fast_openrlhf.apply()
    assert p.applied, p.reason
    yield p
    p.undo()


def _mask(B, T):
    """[B, T] with right padding, a full row and an all-masked row (B ≥ 4)."""
    m = torch.ones(B, T)
    m[0, T - 3:] = 0
    m[2, 1:] = 0
    m[3, :] = 0
    return m


def test_apply_replaces_OpenRLHF_names_and_undo_restores_them():
    with fast_openrlhf.patched() as p:
        assert p.applied and p.version == importlib.metadata.version("openrlhf") and not p.skipped
        for name, orig in ORIG.items():
            assert getattr(UTILS, name) is not orig, name
        assert PPO_ACTOR.compute_approx_kl is UTILS.compute_approx_kl   # the trainer's by-name import follows
        assert EXP.compute_approx_kl is UTILS.compute_approx_kl
        assert LOSS.PolicyLoss.forward is not ORIG_POLICY and LOSS.ValueLoss.forward is not ORIG_VALUE
        assert EXP.RemoteExperienceMaker.get_advantages_and_returns is not ORIG_GAE
    for name, orig in ORIG.items():
        assert getattr(UTILS, name) is orig and PPO_ACTOR.compute_approx_kl is ORIG["compute_approx_kl"]
    assert LOSS.PolicyLoss.forward is ORIG_POLICY and LOSS.ValueLoss.forward is ORIG_VALUE
    assert EXP.RemoteExperienceMaker.get_advantages_and_returns is ORIG_GAE and KLC.AdaptiveKLController is ORIG_ADAPTIVE


def test_unknown_version_warns_and_patches_nothing(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.4")
    with pytest.warns(RuntimeWarning, match="0.10.4 is not a version"):
        p = fast_openrlhf.apply()
    assert not p.applied and not p.patched and UTILS.compute_approx_kl is ORIG["compute_approx_kl"]


def test_old_compute_approx_kl_signature_warns_and_patches_nothing(monkeypatch):
    def old(log_probs, log_probs_base, kl_estimator="k1", action_mask=None):  # OpenRLHF's older signature
        return log_probs - log_probs_base

    monkeypatch.setattr(UTILS, "compute_approx_kl", old)
    with pytest.warns(RuntimeWarning, match="compute_approx_kl has parameters"):
        p = fast_openrlhf.apply()
    assert not p.applied and LOSS.PolicyLoss.forward is ORIG_POLICY


def _kl_inputs(dtype):
    base = -torch.rand(4, 12) * 5
    lp = base + torch.randn(4, 12) * torch.tensor([0.05, 1.0, 4.0, 30.0]).repeat(3)  # into the clamp regions
    old = lp + torch.randn(4, 12) * 1.5                                             # weights beyond the clip of 10
    return lp.to(dtype), base.to(dtype), old.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unbiased,with_old", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_compute_approx_kl_equals_OpenRLHF(patch, monkeypatch, est, unbiased, with_old, dtype):
    lp, base, old = _kl_inputs(dtype)
    a0, a1 = lp.float().clone().requires_grad_(True), lp.clone().requires_grad_(True)
    kw = dict(kl_estimator=est, unbiased_gradient=unbiased)
    want = ORIG["compute_approx_kl"](a0, base.float(), old.float() if with_old else None, **kw)
    with counting(monkeypatch, "kl_penalty") as n:
        got = PPO_ACTOR.compute_approx_kl(a1, base, log_probs_old=old if with_old else None, **kw)
    assert n["kl_penalty"] == (2 if unbiased else 1) and patch.calls["compute_approx_kl"] == 1
    assert got.dtype == torch.float32
    # the forward value is the estimator itself (OpenRLHF's straight-through sum (value + s) − s rounds it by up to an
    # ulp of value + s, s = w·r²/2 up to ~10³ here; ours adds s − s = 0 exactly): compare with its unbiased=False value
    value = ORIG["compute_approx_kl"](a0.detach(), base.float(), kl_estimator=est, unbiased_gradient=False)
    torch.testing.assert_close(got, value, atol=1e-5, rtol=1e-5)
    g = torch.randn(4, 12)
    (want * g).sum().backward()
    (got * g).sum().backward()
    rtol = 1e-5 if dtype == torch.float32 else BF16_RTOL
    torch.testing.assert_close(a1.grad.float(), a0.grad, atol=1e-5, rtol=rtol)


def test_compute_approx_kl_unknown_estimator_goes_to_OpenRLHF(patch):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="Unknown kl_estimator"):
        UTILS.compute_approx_kl(x, x, kl_estimator="low_var_kl")
    assert patch.fallbacks["compute_approx_kl"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_log_probs_and_entropy_equal_OpenRLHF(patch, monkeypatch, tau, dtype):
    B, T, V = 3, 5, 211
    logits = (torch.randn(B, T, V) * 3).to(dtype)
    labels = torch.randint(0, V, (B, T))
    g = torch.randn(B, T)
    for name, args in (("log_probs_from_logits", (labels, tau)), ("compute_entropy", ())):
        if name == "compute_entropy" and tau != 1.0:
            continue
        x0 = logits.float().clone().requires_grad_(True)
        x1 = logits.clone().requires_grad_(True)
        # OpenRLHF divides the logits it is given in place when τ ≠ 1: hand it a non-leaf copy
        want = ORIG[name](x0 * 1.0, *args) if name == "log_probs_from_logits" else ORIG[name](x0, *args)
        with counting(monkeypatch, "logprobs_from_logits") as n:
            got = getattr(UTILS, name)(x1, *args)
        assert n["logprobs_from_logits"] == 1 and patch.calls[name] == 1
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        (want * g).sum().backward()
        (got * g).sum().backward()
        rtol = 1e-5 if dtype == torch.float32 else BF16_RTOL
        torch.testing.assert_close(x1.grad.float(), x0.grad, atol=1e-6, rtol=rtol)
        torch.testing.assert_close(x1.detach(), logits)  # ours leaves the caller's logits as they were


def _policy_inputs(B, T, dtype):
    old = -torch.rand(B, T) * 4
    lp = old + torch.randn(B, T)                  # ratios outside [0.8, 1.28], ~13% beyond 3
    adv = torch.randn(B, T) * 2
    lp[:, 1] = old[:, 1] + 2.0                   # ρ = e² > 3 with A < 0 on a valid column: the dual clip acts
    adv[:, 1] = -adv[:, 1].abs() - 0.5
    return old, lp.to(dtype), adv, _mask(B, T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("token_level,info", [(True, {}), (True, {"dp_size": 2, "batch_num_tokens": 37.0}),
                                              (False, {}), (False, {"dp_size": 4, "global_batch_size": 9})])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_loss_equals_OpenRLHF(patch, monkeypatch, dual_clip, token_level, info, dtype):
    old, lp, adv, m = _policy_inputs(6, 10, dtype)
    fn = LOSS.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual_clip, token_level_loss=token_level)
    a0, a1 = lp.float().clone().requires_grad_(True), lp.clone().requires_grad_(True)
    want = ORIG_POLICY(fn, a0, old, adv, action_mask=m, **info)
    with counting(monkeypatch, "ppo_policy_loss") as n:
        got = fn(a1, old, adv, action_mask=m, **info)
    assert n["ppo_policy_loss"] == 1 and patch.calls["PolicyLoss.forward"] == 1
    assert got[3] is None and got[4] is None and want[3] is None
    for g_, w_ in zip(got[:3], want[:3]):
        torch.testing.assert_close(g_, w_, **FP32)
    want[0].backward()
    got[0].backward()
    rtol = 1e-5 if dtype == torch.float32 else BF16_RTOL
    torch.testing.assert_close(a1.grad.float(), a0.grad, atol=1e-7, rtol=rtol)


def test_policy_loss_gspo_goes_to_OpenRLHF(patch):
    old, lp, adv, m = _policy_inputs(6, 8, torch.float32)
    fn = LOSS.PolicyLoss(policy_loss_type="gspo")
    want = ORIG_POLICY(fn, lp, old, adv, action_mask=m)
    got = fn(lp, old, adv, action_mask=m)
    assert patch.fallbacks["PolicyLoss.forward"] == 1 and patch.calls["PolicyLoss.forward"] == 0
    torch.testing.assert_close(got[0], want[0])


@pytest.mark.parametrize("token_level,info", [(True, {}), (True, {"dp_size": 2, "batch_num_tokens": 41}),
                                              (False, {}), (False, {"dp_size": 2, "global_batch_size": 7.0})])
def test_value_loss_equals_OpenRLHF(patch, monkeypatch, token_level, info):
    B, T = 6, 10
    old = torch.randn(B, T)
    v = old + torch.randn(B, T) * 0.5
    ret, m = torch.randn(B, T), _mask(B, T)
    fn = LOSS.ValueLoss(clip_eps=0.2, token_level_loss=token_level)
    a0, a1 = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    want = ORIG_VALUE(fn, a0, old, ret, action_mask=m, **info)
    with counting(monkeypatch, "ppo_value_loss") as n:
        got = fn(a1, old, ret, action_mask=m, **info)
    assert n["ppo_value_loss"] == 1 and patch.calls["ValueLoss.forward"] == 1
    torch.testing.assert_close(got, want, **FP32)
    want.backward()
    got.backward()
    torch.testing.assert_close(a1.grad, a0.grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("T", [7, 16])
def test_gae_equals_OpenRLHF(patch, monkeypatch, T):
    B = 5
    values, rewards, m = torch.randn(B, T), torch.randn(B, T), _mask(B, T)
    want = ORIG_GAE(None, values, rewards, m, 0.98, 0.93)
    with counting(monkeypatch, "gae") as n:
        got = EXP.RemoteExperienceMaker.get_advantages_and_returns(None, values, rewards, m, 0.98, 0.93)
    assert n["gae"] == 1 and patch.calls["RemoteExperienceMaker.get_advantages_and_returns"] == 1
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, atol=1e-5, rtol=1e-5)   # every position, padding included


def test_gae_with_a_hole_goes_to_OpenRLHF(patch):
    values, rewards, m = torch.randn(4, 8), torch.randn(4, 8), torch.ones(4, 8)
    m[1, 3] = 0
    want = ORIG_GAE(None, values, rewards, m, 0.98, 0.93)
    got = EXP.RemoteExperienceMaker.get_advantages_and_returns(None, values, rewards, m, 0.98, 0.93)
    assert patch.fallbacks["RemoteExperienceMaker.get_advantages_and_returns"] == 1
    torch.testing.assert_close(got[0], want[0])


def test_kl_controllers_equal_OpenRLHF(patch):
    got = KLC.AdaptiveKLController(0.05, 0.1, 1000)
    want = ORIG_ADAPTIVE(0.05, 0.1, 1000)
    assert isinstance(got, fast_openrlhf.AdaptiveKLController) and patch.calls["AdaptiveKLController"] == 1
    for kl, n in ((0.3, 64), (0.02, 64), (0.11, 128)):
        got.update(kl, n)
        want.update(kl, n)
        assert got.value == pytest.approx(want.value, rel=1e-12)
