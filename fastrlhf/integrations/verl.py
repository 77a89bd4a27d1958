"""Run veRL's PPO / GRPO math on ``fastrlhf.kernels``: one call before the trainer starts.

    from fastrlhf.integrations import verl as fast_verl
    patch = fast_verl.apply()        # or: with fast_verl.patched(): ...;  patch.undo() restores veRL

Notation: B batch, T response tokens, V vocabulary. Masks are [B, T], nonzero for a response token.

Each function below has exactly the signature and defaults of veRL 0.9's function of the same name; ``apply()`` swaps it
in place of veRL's own (the module attribute, the copies other veRL modules imported by name, and the registry entry
through which veRL looks it up), after checking that veRL's signature is still the one below.

``verl.utils.torch_functional``
- ``logprobs_from_logits(logits [..., V], labels [...], inplace_backward=True)`` -> fp32 log softmax(logits)[label]
  (veRL divides the logits by the temperature before the call; so τ = 1 here).
- ``entropy_from_logits(logits [..., V])`` -> fp32 LSE(z) − Σ softmax(z)·z.
- ``masked_whiten(values, mask, shift_mean=True)``: (x − μ)·rsqrt(σ² + 1e-8) over the valid tokens, unbiased σ²;
  veRL's errors for fewer than two valid tokens.
``verl.trainer.ppo.core_algos``
- ``compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam)`` (also registry "gae"):
  δ_t = r_t + γ V_next − V_t, A_t = δ_t + γλ A_next over the valid tokens (masked tokens carry V_next and A_next),
  R = A + V, then A ← masked_whiten(A).
- ``compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
  config=None, rollout_is_weights=None)`` (also registry "vanilla") and the deprecated ``compute_policy_loss(...,
  clip_ratio_c=3.0, ...)``: ℓ = max(−Aρ, −A clip(ρ, 1 − ε_low, 1 + ε_high)), and for A < 0 always the dual clip
  min(ℓ, −A·c) with c = ``clip_ratio_c`` (default 3.0); ρ = exp(clamp(logp − old, −20, 20)).
- ``compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean", ...)``:
  ½ agg(max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²)).
- ``kl_penalty(logprob, ref_logprob, kl_penalty)``: "kl"/"k1" = logp − ref, "abs" = |logp − ref|, "mse"/"k2" =
  ½(logp − ref)², "low_var_kl"/"k3" = clamp(exp(d) − d − 1, −10, 10) with d = clamp(ref − logp, −20, 20); a trailing
  "+" keeps the value and takes the gradient of k2.
- ``AdaptiveKLController(init_kl_coef, target_kl, horizon)``, ``FixedKLController(kl_coef)``: β ← β(1 + clip(KL/target
  − 1, ±0.2)·n/horizon); veRL's ``get_kl_controller`` builds them by these names.

Loss aggregation (veRL's ``loss_agg_mode`` with its ``dp_size`` / ``batch_num_tokens`` / ``global_batch_size`` /
``loss_scale_factor``): "token-mean" Σℓm / (batch_num_tokens or Σm) · dp; "token-sum" Σℓm · dp; "seq-mean-token-sum"
Σ_b S_b / (global_batch_size or the number of non-empty rows) · dp (also divided by loss_scale_factor, default T, for
"-norm"); "seq-mean-token-mean" Σ_b (S_b / n_b) / (global_batch_size or the non-empty rows) · dp.

Differences from veRL, all outside what veRL's losses read: results are fp32 whatever the input dtype (veRL keeps bf16
log-probs in bf16); masked positions of the whitened values and of the GAE outputs are 0 (veRL leaves carried values
there); a batch with no valid token gives a loss of 0 (veRL: NaN). Calls we do not serve go to veRL's own function and
are counted in ``patch.fallbacks``: ``rollout_is_weights``, a ``kl_penalty`` name outside the list, non-float logits,
whitening with gradient.

Not patched: the other policy losses (gspo, clip_cov, ...) and advantage estimators (grpo, rloo, ...), ``agg_loss``
(the entropy and KL-loss reductions), ``entropy_from_logits_with_chunking``, veRL's fused-kernel and Megatron paths.
Any veRL other than 0.9.x: a warning and no patch.
"""
from __future__ import annotations

import importlib.metadata
import warnings

import torch

from fastrlhf import kernels

from ._patch import (PatchSlot, PeerPatch, counting_class, import_optional, served, signature_of,
                     version_key)

SUPPORTED = ("0.9.x",)
_TF = "verl.utils.torch_functional"
_CA = "verl.trainer.ppo.core_algos"
_KL_NAMES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}

# --- veRL's functions on our kernels (usable without veRL installed) --------------------------------------------------


def logprobs_from_logits(logits, labels, inplace_backward=True):
    """logits [..., V] (already / τ), labels [...] -> fp32 [...] log softmax(logits)[label]. ``inplace_backward`` is
    veRL's flash-attn memory switch; our kernel never keeps a [..., V] gradient buffer."""
    del inplace_backward
    return kernels.logprobs_from_logits(logits, labels)


def entropy_from_logits(logits):
    """logits [..., V] -> fp32 H [...] = LSE(z) − Σ softmax(z)·z."""
    dummy = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)  # any valid label; logp unused
    return kernels.logprobs_from_logits(logits, dummy, return_entropy=True)[1]


def masked_whiten(values, mask, shift_mean=True):
    """values, mask [B, T] -> fp32 [B, T]: (x − μ)·rsqrt(σ² + 1e-8) (+ μ if not shift_mean), unbiased σ² over the
    valid tokens, 0 where mask = 0. Fewer than two valid tokens: veRL's ValueError."""
    n = mask.sum()
    if n == 0:
        raise ValueError("At least one element in the mask has to be 1.")
    if n == 1:
        raise ValueError("The sum of the mask is one, which can cause a division by zero.")
    return kernels.whiten(values, mask, shift_mean=shift_mean)


def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
    """rewards, values, response_mask [B, T] -> (whitened advantages [B, T], returns [B, T]) fp32, no gradient."""
    with torch.no_grad():
        adv, ret = kernels.gae(token_level_rewards, values, response_mask, gamma=float(gamma), lam=float(lam))
        adv = masked_whiten(adv, response_mask)                          # A ← (A − μ)·rsqrt(σ² + 1e-8)
    return adv, ret


def kl_penalty(logprob, ref_logprob, kl_penalty):
    """logprob, ref_logprob [B, T] -> fp32 [B, T] (estimator names in the module docstring)."""
    straight_through = kl_penalty.endswith("+")
    base = kl_penalty[:-1] if straight_through else kl_penalty
    if base not in _KL_NAMES:
        raise NotImplementedError(f"kl_penalty={kl_penalty!r}: fastrlhf serves {sorted(_KL_NAMES)} (optionally '+')")
    est = _KL_NAMES[base]
    value = kernels.kl_penalty(logprob, ref_logprob, estimator=est, clamp=(-10.0, 10.0) if est == "k3" else None)
    if not straight_through or est == "k2":
        return value
    k2 = kernels.kl_penalty(logprob, ref_logprob, estimator="k2")              # ½ (logp − ref)²: the gradient of "+"
    return k2 - k2.detach() + value.detach()


def _normalizer(x, dp_size):
    """x / dp_size for an int / float / 0-d tensor count (a tensor stays on its device, no sync)."""
    if isinstance(x, torch.Tensor):
        return x.detach().float() / dp_size
    return float(x) / dp_size


def loss_aggregation(loss_agg_mode, mask, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                     loss_scale_factor=None):
    """veRL's ``loss_agg_mode`` and batch info -> (our ``agg``, ``normalizer``), so that our loss equals veRL's."""
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            return "token-mean", None                                    # / Σ m
        return "token-mean", _normalizer(batch_num_tokens, dp_size)      # / batch_num_tokens · dp
    if loss_agg_mode == "token-sum":
        return "token-mean", 1.0 / dp_size                               # Σ ℓ m · dp
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            den = ((mask != 0).sum(-1) > 0).sum().float()                # the non-empty rows
        else:
            den = _normalizer(global_batch_size, dp_size)                # global_batch_size / dp
        if loss_agg_mode == "seq-mean-token-sum-norm":
            den = den * (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return "seq-mean-token-sum", den
    if loss_agg_mode == "seq-mean-token-mean":
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            return "seq-mean-token-mean", None                           # / the non-empty rows
        return "seq-mean-token-mean", _normalizer(global_batch_size, dp_size)
    raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")


def _masked_mean(x, mask):
    """veRL's metric mean: Σ x m / (Σ m + 1e-8), masked entries never read."""
    return (torch.where(mask.bool(), x, 0.0) * mask).sum() / (mask.sum() + 1e-8)


def _policy_loss(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c, loss_agg_mode,
                 batch_info):
    """The shared core of both policy losses: (loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower), all 0-d tensors."""
    assert clip_ratio_c > 1.0, (
        "The lower bound of the clip_ratio_c for dual-clip PPO should be greater than 1.0,"
        + f" but get the value: {clip_ratio_c}."
    )
    agg, normalizer = loss_aggregation(loss_agg_mode, response_mask, **batch_info)
    loss, _ = kernels.ppo_policy_loss(log_prob, old_log_prob, advantages, response_mask, clip_eps=clip_low,
                                clip_eps_high=clip_high, dual_clip=clip_ratio_c, agg=agg, normalizer=normalizer)
    with torch.no_grad():  # veRL's three metrics, by its definitions, in fp32
        advantages = advantages.float()
        log_ratio = torch.clamp(log_prob.detach().float() - old_log_prob.float(), min=-20.0, max=20.0)
        ratio = torch.exp(log_ratio)                                     # ρ
        pg1 = -advantages * ratio                                        # −A ρ
        pg2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)   # −A clip(ρ)
        clipped = torch.maximum(pg1, pg2)
        pg_clipfrac = _masked_mean(torch.gt(pg2, pg1).float(), response_mask)
        ppo_kl = _masked_mean(-log_ratio, response_mask)
        lower = torch.gt(clipped, -advantages * clip_ratio_c) * (advantages < 0).float()
        pg_clipfrac_lower = _masked_mean(lower, response_mask)
    return loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                config=None, rollout_is_weights=None):
    """log-probs, advantages, mask [B, T]; ``config`` veRL's ActorConfig (clip_ratio[_low/_high], clip_ratio_c,
    global_batch_info) -> (loss 0-d fp32, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower": float})."""
    if rollout_is_weights is not None:
        raise NotImplementedError("rollout_is_weights: per-token loss weights are not served by fastrlhf")
    assert config is not None
    clip_ratio = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip_ratio
    c = config.get("clip_ratio_c", 3.0)
    loss, clipfrac, ppo_kl, lower = _policy_loss(old_log_prob, log_prob, advantages, response_mask, low, high, c,
                                                 loss_agg_mode, dict(config.global_batch_info))
    return loss, {"actor/pg_clipfrac": clipfrac.item(), "actor/ppo_kl": ppo_kl.item(),
                  "actor/pg_clipfrac_lower": lower.item()}


def compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None, cliprange_low=None,
                        cliprange_high=None, clip_ratio_c=3.0, loss_agg_mode="token-mean"):
    """veRL's deprecated form: -> (loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower), 0-d fp32 tensors."""
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    return _policy_loss(old_log_prob, log_prob, advantages, response_mask, low, high, clip_ratio_c, loss_agg_mode, {})


def compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean", dp_size=1,
                       batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """vpreds (with gradient), returns, values (old), response_mask [B, T] -> (vf_loss 0-d fp32, vf_clipfrac 0-d)."""
    agg, normalizer = loss_aggregation(loss_agg_mode, response_mask, dp_size, batch_num_tokens, global_batch_size,
                                       loss_scale_factor)
    loss, _ = kernels.ppo_value_loss(vpreds, values, returns, response_mask, clip_eps=cliprange_value, agg=agg,
                               normalizer=normalizer)
    with torch.no_grad():  # veRL's metric: the clipped branch strictly larger
        v = vpreds.detach()
        v_clip = torch.max(torch.min(v, values + cliprange_value), values - cliprange_value)
        vf_clipfrac = _masked_mean(torch.gt((v_clip - returns) ** 2, (v - returns) ** 2).float(), response_mask)
    return loss, vf_clipfrac


class AdaptiveKLController(kernels.AdaptiveKLController):
    """veRL's constructor (``target_kl=``) on our controller."""

    def __init__(self, init_kl_coef, target_kl, horizon):
        super().__init__(init_kl_coef, target_kl, horizon)


class FixedKLController(kernels.FixedKLController):
    """veRL's constructor on our controller."""

    def __init__(self, kl_coef):
        super().__init__(kl_coef)


# --- the patch --------------------------------------------------------------------------------------------------------

_slot = PatchSlot()  # the active patch


def _always(*args, **kwargs):
    return True


def _float_logits(logits, *args, **kwargs):
    return logits.is_floating_point()


def _no_grad_whiten(values, *args, **kwargs):
    return not (values.requires_grad and torch.is_grad_enabled())


def _known_kl(logprob, ref_logprob, kl_penalty):
    return kl_penalty.rstrip("+") in _KL_NAMES and kl_penalty.count("+") <= 1


def _no_is_weights(*args, **kwargs):
    return kwargs.get("rollout_is_weights", args[6] if len(args) > 6 else None) is None


# (module, name, our function, when we serve it)
_TARGETS = (
    (_TF, "logprobs_from_logits", logprobs_from_logits, _float_logits),
    (_TF, "entropy_from_logits", entropy_from_logits, _float_logits),
    (_TF, "masked_whiten", masked_whiten, _no_grad_whiten),
    (_CA, "compute_gae_advantage_return", compute_gae_advantage_return, _always),
    (_CA, "compute_policy_loss_vanilla", compute_policy_loss_vanilla, _no_is_weights),
    (_CA, "compute_policy_loss", compute_policy_loss, _always),
    (_CA, "compute_value_loss", compute_value_loss, _always),
    (_CA, "kl_penalty", kl_penalty, _known_kl),
    (_CA, "AdaptiveKLController", AdaptiveKLController, None),
    (_CA, "FixedKLController", FixedKLController, None),
)


def apply(*, allow_untested: bool = False) -> PeerPatch:
    """Swap veRL's functions (listed in the module docstring) for ours. Returns a ``PeerPatch`` (a context manager).

    veRL other than 0.9.x, or a function whose signature differs from ours: a warning and no patch (``applied`` is
    False); ``allow_untested=True`` patches another version when every signature still matches. Calling ``apply()``
    while a patch is active returns that patch.
    """
    try:
        version = importlib.metadata.version("verl")
    except importlib.metadata.PackageNotFoundError as e:
        raise ImportError("fastrlhf.integrations.verl.apply(): veRL is not installed (pip install verl)") from e
    if _slot.current() is not None:
        return _slot.current()
    patch = PeerPatch("verl", version)
    if version_key(version) != (0, 9):
        note = f"fastrlhf.integrations.verl: veRL {version} is not a version we have read (supported: {SUPPORTED})"
        if not allow_untested:
            patch.reason = note + "; nothing patched, veRL runs unchanged"
            warnings.warn(patch.reason, RuntimeWarning, stacklevel=2)
            return patch
        warnings.warn(note + "; allow_untested=True: patching where the signatures match", RuntimeWarning,
                      stacklevel=2)
    tf = import_optional(_TF, patch)
    ca = import_optional(_CA, patch)
    if tf is None or ca is None:
        patch.reason = f"fastrlhf.integrations.verl: cannot import veRL's modules ({'; '.join(patch.skipped)}); " \
                       "nothing patched"
        warnings.warn(patch.reason, RuntimeWarning, stacklevel=2)
        return patch
    modules = {_TF: tf, _CA: ca}
    for mod_name, name, ours, _ in _TARGETS:  # 1. check every signature before touching anything
        original = getattr(modules[mod_name], name, None)
        got = None if original is None else signature_of(original)
        if got != signature_of(ours):
            patch.reason = (f"fastrlhf.integrations.verl: veRL {version}: {mod_name}.{name} has parameters {got}, "
                            f"expected {signature_of(ours)}; nothing patched, veRL runs unchanged")
            warnings.warn(patch.reason, RuntimeWarning, stacklevel=2)
            return patch
    for mod_name, name, ours, serve in _TARGETS:  # 2. swap
        module = modules[mod_name]
        original = getattr(module, name)
        if serve is None:
            replacement = counting_class(patch, name, ours)
        else:
            replacement = served(patch, name, ours, original, serve)
        patch.set_everywhere("verl", module, name, replacement)
    for table, key, name in ((ca.ADV_ESTIMATOR_REGISTRY, "gae", "compute_gae_advantage_return"),
                             (ca.POLICY_LOSS_REGISTRY, "vanilla", "compute_policy_loss_vanilla")):
        if key in table:
            patch.set_item(table, key, getattr(ca, name))
    return _slot.activate(patch)


def undo() -> None:
    """Undo the active ``apply()`` (no-op when nothing is patched)."""
    _slot.undo()


def patched(*, allow_untested: bool = False):
    """``with patched() as p:`` runs the block with veRL patched and restores it after (unless already patched)."""
    return _slot.patched(apply, allow_untested=allow_untested)
