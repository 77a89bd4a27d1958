"""fastrlhf.integrations.verl against the installed veRL 0.9 (``pip install --no-deps verl==0.9.1``, see README).

Each test calls veRL's own function (kept before ``apply()``) and the patched name veRL's trainer looks up, on the same
fresh random inputs, and compares outputs and gradients; it also counts the fastrlhf.kernels calls behind the patch.

Tolerances: both sides compute in fp32 with different summation orders over ≤ 1001 terms: 1e-5 absolute / 1e-5
relative (2e-5 after whitening, which divides by a std of ~40 values). bf16 inputs: veRL computes in bf16 while our
kernels compute in fp32 and return fp32, so veRL's own function is run on the same values upcast to fp32 (exact), and
ours on the bf16 tensors must match it to fp32 rounding; our gradients are stored in bf16 (one rounding, 2^-8 relative).
"""
from __future__ import annotations

import importlib.metadata

import pytest
import torch

pytest.importorskip("verl", reason="veRL is part of the test install (README: pip install --no-deps verl==0.9.1)")

from fastrlhf.integrations import verl as fast_verl  # noqa: E402

from tests.helpers.peers import counting, import_verl  # noqa: E402
from tests.helpers.tolerances import FP32

TF, CA = import_verl()
ORIG = {n: getattr(TF, n) for n in ("logprobs_from_logits", "entropy_from_logits", "masked_whiten")}
ORIG.update({n: getattr(CA, n) for n in ("compute_gae_advantage_return", "compute_policy_loss_vanilla",
                                          "compute_policy_loss", "compute_value_loss", "kl_penalty",
                                          "AdaptiveKLController", "FixedKLController")})
BF16_RTOL = 2**-8


@pytest.fixture
def patch():
    p = fast_verl.apply()
    assert p.applied, p.reason
    yield p
    p.undo()


def _mask(B, T):
    """[B, T] with right padding, left padding, a hole, a full row and an all-masked row (B ≥ 5)."""
    m = torch.ones(B, T)
    m[0, T - 3:] = 0
    m[1, :2] = 0
    m[2, 3:5] = 0
    m[4, :] = 0
    return m


def _actor_config(**kw):
    from verl.workers.config import ActorConfig

    base = dict(strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, rollout_n=1, clip_ratio=0.2,
                clip_ratio_low=0.2, clip_ratio_high=0.28)
    base.update(kw)
    return ActorConfig(**base)


def test_apply_replaces_veRL_names_and_undo_restores_them():
    with fast_verl.patched() as p:
        assert p.applied and p.version == importlib.metadata.version("verl")
        for name, orig in ORIG.items():
            module = TF if name in ("logprobs_from_logits", "entropy_from_logits", "masked_whiten") else CA
            assert getattr(module, name) is not orig, name
        assert CA.get_policy_loss_fn("vanilla") is CA.compute_policy_loss_vanilla
        assert CA.get_adv_estimator_fn("gae") is CA.compute_gae_advantage_return
        assert fast_verl.apply() is p  # a second apply() returns the active patch
    for name, orig in ORIG.items():
        module = TF if name in ("logprobs_from_logits", "entropy_from_logits", "masked_whiten") else CA
        assert getattr(module, name) is orig, name
    assert CA.get_policy_loss_fn("vanilla") is ORIG["compute_policy_loss_vanilla"]
    assert CA.get_adv_estimator_fn("gae") is ORIG["compute_gae_advantage_return"]


def test_unknown_version_warns_and_patches_nothing(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.8.0")
    with pytest.warns(RuntimeWarning, match="0.8.0 is not a version"):
        p = fast_verl.apply()
    assert not p.applied and not p.patched
    assert CA.kl_penalty is ORIG["kl_penalty"]


def test_changed_signature_warns_and_patches_nothing(monkeypatch):
    monkeypatch.setattr(CA, "kl_penalty", lambda logprob, ref_logprob, kl_penalty, extra=1: None)
    with pytest.warns(RuntimeWarning, match="kl_penalty has parameters"):
        p = fast_verl.apply()
    assert not p.applied and TF.logprobs_from_logits is ORIG["logprobs_from_logits"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [37, 1001])
def test_logprobs_and_entropy_equal_veRL(patch, monkeypatch, dtype, V):
    B, T = 3, 5
    logits = (torch.randn(B, T, V) * 3).to(dtype)
    labels = torch.randint(0, V, (B, T))
    g = torch.randn(B, T)
    for name in ("logprobs_from_logits", "entropy_from_logits"):
        args = (labels,) if name == "logprobs_from_logits" else ()
        x0 = logits.float().clone().requires_grad_(True)   # veRL on the same values in fp32 (exact upcast)
        x1 = logits.clone().requires_grad_(True)
        want = ORIG[name](x0, *args)
        with counting(monkeypatch, "logprobs_from_logits") as n:
            got = getattr(TF, name)(x1, *args)
        assert n["logprobs_from_logits"] == 1 and patch.calls[name] >= 1
        assert got.dtype == torch.float32 and got.shape == (B, T)
        (want * g).sum().backward()
        (got * g).sum().backward()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert x1.grad.dtype == dtype
        rtol = 1e-5 if dtype == torch.float32 else BF16_RTOL
        torch.testing.assert_close(x1.grad.float(), x0.grad, atol=1e-6, rtol=rtol)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_equals_veRL_on_valid_tokens(patch, monkeypatch, shift_mean):
    x, m = torch.randn(6, 9) * 3 + 1.5, _mask(6, 9)
    want = ORIG["masked_whiten"](x, m, shift_mean=shift_mean)
    with counting(monkeypatch, "whiten") as n:
        got = TF.masked_whiten(x, m, shift_mean)
    assert n["whiten"] == 1
    v = m.bool()
    torch.testing.assert_close(got[v], want[v], atol=1e-5, rtol=2e-5)
    assert (got[~v] == 0).all()
    with pytest.raises(ValueError, match="sum of the mask is one"):
        TF.masked_whiten(x, torch.eye(6, 9)[:1].expand(6, 9) * (torch.arange(6)[:, None] == 0))


@pytest.mark.parametrize("T", [6, 13])
def test_gae_equals_veRL_on_valid_tokens(patch, monkeypatch, T):
    B = 6
    r, v, m = torch.randn(B, T), torch.randn(B, T), _mask(B, T)
    want_a, want_r = ORIG["compute_gae_advantage_return"](r, v, m, 0.97, 0.9)
    with counting(monkeypatch, "gae", "whiten") as n:
        got_a, got_r = CA.get_adv_estimator_fn("gae")(r, v, m, torch.tensor(0.97), 0.9)
    assert n["gae"] == 1 and n["whiten"] == 1 and patch.calls["compute_gae_advantage_return"] == 1
    valid = m.bool()
    torch.testing.assert_close(got_r[valid], want_r[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_a[valid], want_a[valid], atol=1e-5, rtol=2e-5)
    assert (got_a[~valid] == 0).all() and (got_r[~valid] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k2+", "low_var_kl+",
                                  "k3+"])
def test_kl_penalty_equals_veRL(patch, monkeypatch, name, dtype):
    logp = -torch.rand(4, 12) * 5
    ref = logp + torch.randn(4, 12) * torch.tensor([0.05, 1.0, 4.0, 30.0]).repeat(3)  # into both clamp regions
    logp, ref = logp.to(dtype), ref.to(dtype)
    a0, a1 = logp.float().clone().requires_grad_(True), logp.clone().requires_grad_(True)
    want = ORIG["kl_penalty"](a0, ref.float(), name)
    with counting(monkeypatch, "kl_penalty") as n:
        got = CA.kl_penalty(a1, ref, name)
    assert n["kl_penalty"] >= 1 and patch.calls["kl_penalty"] == 1
    g = torch.randn(4, 12)
    (want.float() * g).sum().backward()
    (got * g).sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    rtol = 1e-5 if dtype == torch.float32 else BF16_RTOL
    torch.testing.assert_close(a1.grad.float(), a0.grad, atol=1e-5, rtol=rtol)


def test_kl_penalty_unknown_name_goes_to_veRL(patch):
    x = torch.zeros(2, 3)
    with pytest.raises(NotImplementedError):
        CA.kl_penalty(x, x, "full")
    assert patch.fallbacks["kl_penalty"] == 1 and patch.calls["kl_penalty"] == 0


_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"]
_BATCH_INFO = [{}, {"dp_size": 2, "batch_num_tokens": 61, "global_batch_size": 11, "loss_scale_factor": 7}]


def _policy_inputs(B, T, dtype):
    old = -torch.rand(B, T) * 4
    lp = old + torch.randn(B, T)                 # ratios well outside [0.8, 1.28], ~13% beyond 3 (the dual clip)
    adv = torch.randn(B, T) * 2
    lp[:, 5] = old[:, 5] + 2.0                   # ρ = e² > 3 with A < 0 on a valid column: the dual clip acts
    adv[:, 5] = -adv[:, 5].abs() - 0.5
    return old.to(dtype), lp.to(dtype), adv, _mask(B, T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("info", _BATCH_INFO)
@pytest.mark.parametrize("mode", _MODES)
def test_policy_loss_vanilla_equals_veRL(patch, monkeypatch, mode, info, dtype):
    old, lp, adv, m = _policy_inputs(6, 10, dtype)
    cfg = _actor_config(global_batch_info=dict(info))   # clip_ratio_c left at veRL's default 3.0
    a0, a1 = lp.float().clone().requires_grad_(True), lp.clone().requires_grad_(True)
    want, want_m = ORIG["compute_policy_loss_vanilla"](old.float(), a0, adv, m, loss_agg_mode=mode, config=cfg)
    with counting(monkeypatch, "ppo_policy_loss") as n:
        got, got_m = CA.get_policy_loss_fn("vanilla")(old, a1, adv, m, loss_agg_mode=mode, config=cfg)
    assert n["ppo_policy_loss"] == 1 and patch.calls["compute_policy_loss_vanilla"] == 1
    assert got.dtype == torch.float32 and got.dim() == 0
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, **FP32)
    rtol = 1e-5 if dtype == torch.float32 else BF16_RTOL
    torch.testing.assert_close(a1.grad.float(), a0.grad, atol=1e-7, rtol=rtol)
    assert set(got_m) == set(want_m)
    assert want_m["actor/pg_clipfrac_lower"] > 0  # the dual clip acted on this batch
    for k in want_m:
        assert got_m[k] == pytest.approx(want_m[k], rel=1e-5, abs=1e-6), k


def test_policy_loss_with_rollout_weights_goes_to_veRL(patch):
    old, lp, adv, m = _policy_inputs(6, 8, torch.float32)
    loss, _ = CA.compute_policy_loss_vanilla(old, lp, adv, m, config=_actor_config(), rollout_is_weights=torch.rand(6, 8))
    assert patch.fallbacks["compute_policy_loss_vanilla"] == 1 and patch.calls["compute_policy_loss_vanilla"] == 0
    assert torch.isfinite(loss)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_deprecated_compute_policy_loss_equals_veRL(patch, monkeypatch, mode):
    old, lp, adv, m = _policy_inputs(6, 10, torch.float32)
    a0, a1 = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    kw = dict(cliprange=0.2, cliprange_high=0.3, clip_ratio_c=2.5, loss_agg_mode=mode)
    with pytest.warns(Warning):
        want = ORIG["compute_policy_loss"](old, a0, adv, m, **kw)
    with counting(monkeypatch, "ppo_policy_loss") as n:
        got = CA.compute_policy_loss(old, a1, adv, m, **kw)
    assert n["ppo_policy_loss"] == 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **FP32)
    want[0].backward()
    got[0].backward()
    torch.testing.assert_close(a1.grad, a0.grad, **FP32)


@pytest.mark.parametrize("info", _BATCH_INFO)
@pytest.mark.parametrize("mode", _MODES)
def test_value_loss_equals_veRL(patch, monkeypatch, mode, info):
    B, T = 6, 10
    old = torch.randn(B, T)
    v = old + torch.randn(B, T) * 0.5            # some beyond the 0.2 clip range
    ret, m = torch.randn(B, T), _mask(B, T)
    a0, a1 = v.clone().requires_grad_(True), v.clone().requires_grad_(True)
    want, want_cf = ORIG["compute_value_loss"](a0, ret, old, m, 0.2, mode, **info)
    with counting(monkeypatch, "ppo_value_loss") as n:
        got, got_cf = CA.compute_value_loss(a1, ret, old, m, 0.2, mode, **info)
    assert n["ppo_value_loss"] == 1 and patch.calls["compute_value_loss"] == 1
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, **FP32)
    torch.testing.assert_close(a1.grad, a0.grad, **FP32)
    assert 0 < want_cf.item() < 1
    torch.testing.assert_close(got_cf, want_cf, atol=1e-6, rtol=0)


def test_kl_controllers_equal_veRL(patch):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"type": "adaptive", "kl_coef": 0.05, "target_kl": 0.1, "horizon": 1000})
    got = CA.get_kl_controller(cfg)                  # veRL's factory, passing target_kl=
    want = ORIG["AdaptiveKLController"](init_kl_coef=0.05, target_kl=0.1, horizon=1000)
    assert isinstance(got, fast_verl.AdaptiveKLController) and patch.calls["AdaptiveKLController"] == 1
    for kl, n in ((0.3, 64), (0.02, 64), (0.11, 128), (0.0, 32)):
        got.update(current_kl=kl, n_steps=n)
        want.update(current_kl=kl, n_steps=n)
        assert got.value == pytest.approx(want.value, rel=1e-12)
    fixed = CA.get_kl_controller(OmegaConf.create({"type": "fixed", "kl_coef": 0.2}))
    fixed.update(current_kl=1.0, n_steps=8)
    assert isinstance(fixed, fast_verl.FixedKLController) and fixed.value == 0.2


def test_allow_untested_patches_another_version_when_signatures_match(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.0")
    with pytest.warns(RuntimeWarning, match="allow_untested=True"):
        p = fast_verl.apply(allow_untested=True)
    try:
        assert p.applied and CA.kl_penalty is not ORIG["kl_penalty"]
    finally:
        p.undo()
    assert CA.kl_penalty is ORIG["kl_penalty"]
