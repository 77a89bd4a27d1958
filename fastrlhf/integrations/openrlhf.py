"""Run OpenRLHF's PPO / GRPO math on ``fastrlhf.kernels``: one call before the trainer starts.

    from fastrlhf.integrations import openrlhf as fast_openrlhf
    patch = fast_openrlhf.apply()    # or: with fast_openrlhf.patched(): ...;  patch.undo() restores OpenRLHF

Notation: B batch, T response tokens, V vocabulary. ``action_mask`` is [B, T], nonzero for a response token.

Each function below has exactly the signature and defaults of OpenRLHF 0.11's function of the same name; ``apply()``
swaps it in place of OpenRLHF's own (the module attribute and the copies other OpenRLHF modules imported by name, or the
method on the class), after checking that OpenRLHF's signature is still the one below.

``openrlhf.models.utils``
- ``compute_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1", unbiased_gradient=False)``:
  with r = log_probs − log_probs_base: k1 = r, k2 = r²/2, k3 = exp(−r) − 1 + r, each clamped to [−10, 10].
  ``unbiased_gradient=True`` keeps that value but takes the gradient of w·r²/2 with the detached importance weight
  w = min(exp(log_probs − log_probs_old), KL_IS_WEIGHT_CLIP) (w = 1 without ``log_probs_old``).
- ``log_probs_from_logits(logits [..., V], labels [...], temperature=1.0)`` -> fp32 log softmax(logits / τ)[label].
- ``compute_entropy(logits [..., V])`` -> fp32 LSE(z) − Σ softmax(z)·z.
``openrlhf.models.loss``
- ``PolicyLoss.forward(log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
  batch_num_tokens=None, global_batch_size=None)`` for ``policy_loss_type="ppo"`` without IS correction:
  ℓ = −min(ρA, clip(ρ, 1 − ε_low, 1 + ε_high)A), with ``dual_clip`` c: for A < 0, min(ℓ, −cA);
  ρ = exp(clamp(logp − old, −20, 20)). Returns (loss, clip_ratio, ppo_kl, None, None).
- ``ValueLoss.forward(values, old_values, returns, action_mask=None, dp_size=1, ...)`` with ``clip_eps`` set:
  ½ agg(max((V_old + clip(V − V_old, ±ε) − R)², (V − R)²)).
  Aggregation: token level Σℓm / (batch_num_tokens or Σm) · dp; per sample Σ_b (S_b / n_b) over the non-empty rows
  / (global_batch_size or their number) · dp.
``openrlhf.trainer.ppo_utils.experience_maker``
- ``RemoteExperienceMaker.get_advantages_and_returns(values, rewards, action_mask, gamma, lambd)``: GAE over
  response tokens that form one block from the start of each row (OpenRLHF's action masks: the response, then
  padding); A_t = δ_t + γλ A_{t+1}, δ_t = r_t + γ V_{t+1} − V_t, R = A + V; 0 on the padding.
``openrlhf.trainer.ppo_utils.kl_controller``: ``AdaptiveKLController(init_kl_coef, target, horizon)``,
  ``FixedKLController(kl_coef)`` on our controllers.

Differences from OpenRLHF: results are fp32 whatever the input dtype (OpenRLHF keeps bf16 log-probs in bf16);
``log_probs_from_logits`` with τ ≠ 1 does not divide the caller's logits in place; an empty batch gives 0 where
OpenRLHF's masked means give NaN. Calls we do not serve go to OpenRLHF's own function and are counted in
``patch.fallbacks``: other policy loss types (gspo) or IS correction, ``ValueLoss`` without ``clip_eps``, an unknown
``kl_estimator``, action masks with a hole or left padding in the GAE.

Not patched: the advantage whitening inside ``compute_advantages_and_returns`` (inline code, not a function: it divides
by the biased masked variance, rsqrt(max(Σ(A − μ)²m / Σm, 1e-8)); ``masked_normalize`` gives the per-row form),
``aggregate_loss`` for the KL and entropy terms, ``masked_mean``, ``compute_reward``, the REINFORCE returns, the
``ring_attn`` / packed-sample paths. Any OpenRLHF other than 0.11.x: a warning and no patch.
"""
from __future__ import annotations

import importlib.metadata
import sys
import warnings

import torch

from fastrlhf import kernels

from ._patch import (PatchSlot, PeerPatch, counting_class, import_optional, served, signature_of,
                     version_key)

SUPPORTED = ("0.11.x",)
KL_IS_WEIGHT_CLIP = 10.0  # OpenRLHF's default bound on w (its own module constant is read when loaded)
_UTILS = "openrlhf.models.utils"
_LOSS = "openrlhf.models.loss"
_EXP = "openrlhf.trainer.ppo_utils.experience_maker"
_KLC = "openrlhf.trainer.ppo_utils.kl_controller"
_ESTIMATORS = ("k1", "k2", "k3")

# --- OpenRLHF's functions on our kernels (usable without OpenRLHF installed) ------------------------------------------


def _is_weight_clip() -> float:
    """OpenRLHF's bound on the importance weight (its module constant when loaded, else its default)."""
    module = sys.modules.get(_UTILS)
    return float(getattr(module, "KL_IS_WEIGHT_CLIP", KL_IS_WEIGHT_CLIP))


def compute_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1", unbiased_gradient=False):
    """log_probs (with gradient), log_probs_base, log_probs_old [B, T] -> fp32 [B, T] (formulas in the docstring)."""
    if kl_estimator not in _ESTIMATORS:
        raise ValueError(f"Unknown kl_estimator: {kl_estimator}")
    # our estimators of d = base − logp = −r: k1 = −d = r, k2 = ½ d² = r²/2, k3 = exp(d) − d − 1 = exp(−r) − 1 + r
    value = kernels.kl_penalty(log_probs, log_probs_base, estimator=kl_estimator, clamp=(-10.0, 10.0))
    if not unbiased_gradient:
        return value
    if log_probs_old is None:
        w = 1.0
    else:  # w = min(π_θ / π_old, clip), detached
        w = (log_probs.detach().float() - log_probs_old.float()).exp().clamp(max=_is_weight_clip())
    surrogate = w * kernels.kl_penalty(log_probs, log_probs_base, estimator="k2")   # w · r²/2: the reverse-KL gradient
    return value.detach() + (surrogate - surrogate.detach())  # the value exactly (s − s = 0), the surrogate's gradient


def log_probs_from_logits(logits, labels, temperature=1.0):
    """logits [..., V], labels [...] -> fp32 log softmax(logits / τ)[label] (the logits are not modified)."""
    return kernels.logprobs_from_logits(logits, labels, temperature=float(temperature))


def compute_entropy(logits):
    """logits [..., V] -> fp32 H [...] = LSE(z) − Σ softmax(z)·z."""
    dummy = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)  # any valid label; logp unused
    return kernels.logprobs_from_logits(logits, dummy, return_entropy=True)[1]


def loss_aggregation(token_level_loss, dp_size=1, batch_num_tokens=None, global_batch_size=None):
    """OpenRLHF's ``aggregate_loss`` arguments -> (our ``agg``, ``normalizer``), so that our loss equals OpenRLHF's."""
    def scaled(x):
        return x.detach().float() / dp_size if isinstance(x, torch.Tensor) else float(x) / dp_size

    if token_level_loss:
        return "token-mean", None if batch_num_tokens is None else scaled(batch_num_tokens)
    return "seq-mean-token-mean", None if global_batch_size is None else scaled(global_batch_size)


def _mask_or_ones(action_mask, like):
    return torch.ones_like(like, dtype=torch.bool) if action_mask is None else action_mask


def policy_loss_forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
                        dp_size=1, batch_num_tokens=None, global_batch_size=None):
    """``PolicyLoss.forward`` for policy_loss_type "ppo", no IS correction: [B, T] inputs -> (loss, clip_ratio,
    ppo_kl, None, None), 0-d fp32."""
    del rollout_log_probs  # read by OpenRLHF only for its IS correction, which we do not serve
    mask = _mask_or_ones(action_mask, log_probs)
    agg, normalizer = loss_aggregation(self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
    loss, metrics = kernels.ppo_policy_loss(log_probs, old_log_probs, advantages, mask, clip_eps=self.clip_eps_low,
                                      clip_eps_high=self.clip_eps_high, dual_clip=self.dual_clip, agg=agg,
                                      normalizer=normalizer)
    with torch.no_grad():
        m = mask.float()
        ppo_kl = ((old_log_probs - log_probs.detach()) * m).sum() / m.sum()   # mean of −(logp − old)
    return loss, metrics["clipfrac"], ppo_kl, None, None


def value_loss_forward(self, values, old_values, returns, action_mask=None, dp_size=1, batch_num_tokens=None,
                       global_batch_size=None):
    """``ValueLoss.forward`` with ``clip_eps`` set: [B, T] inputs -> loss 0-d fp32."""
    mask = _mask_or_ones(action_mask, values)
    agg, normalizer = loss_aggregation(self.token_level_loss, dp_size, batch_num_tokens, global_batch_size)
    loss, _ = kernels.ppo_value_loss(values, old_values, returns, mask, clip_eps=self.clip_eps, agg=agg,
                               normalizer=normalizer)
    return loss


@torch.no_grad()
def get_advantages_and_returns(self, values, rewards, action_mask, gamma, lambd):
    """values, rewards, action_mask [B, T] (response first, padding after) -> (advantages, returns) fp32 [B, T]."""
    del self
    adv, ret = kernels.gae(rewards, values, action_mask, gamma=float(gamma), lam=float(lambd))
    return adv, ret


class AdaptiveKLController(kernels.AdaptiveKLController):
    """OpenRLHF's constructor on our controller."""

    def __init__(self, init_kl_coef, target, horizon):
        super().__init__(init_kl_coef, target, horizon)


class FixedKLController(kernels.FixedKLController):
    """OpenRLHF's constructor on our controller."""

    def __init__(self, kl_coef):
        super().__init__(kl_coef)


# --- the patch --------------------------------------------------------------------------------------------------------

_slot = PatchSlot()  # the active patch


def _serve_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1", unbiased_gradient=False):
    return kl_estimator in _ESTIMATORS


def _float_logits(logits, *args, **kwargs):
    return logits.is_floating_point()


def _serve_policy(self, *args, **kwargs):
    return self.policy_loss_type == "ppo" and self.is_correction_level == "off"


def _serve_value(self, *args, **kwargs):
    return self.clip_eps is not None


def _serve_gae(self, values, rewards, action_mask, gamma, lambd):
    if action_mask is None:
        return True
    m = action_mask != 0
    return not bool((m[:, 1:] & ~m[:, :-1]).any())  # no valid token after a padded one (a hole, left padding)


def apply(*, allow_untested: bool = False) -> PeerPatch:
    """Swap OpenRLHF's functions (listed in the module docstring) for ours. Returns a ``PeerPatch`` (a context manager).

    OpenRLHF other than 0.11.x, or a function whose signature differs from ours: a warning and no patch (``applied``
    is False); ``allow_untested=True`` patches another version when every signature still matches. The experience
    maker and the KL controllers are patched when their modules import (they need ray); otherwise they are listed in
    ``patch.skipped``. Calling ``apply()`` while a patch is active returns that patch.
    """
    try:
        version = importlib.metadata.version("openrlhf")
    except importlib.metadata.PackageNotFoundError as e:
        raise ImportError("fastrlhf.integrations.openrlhf.apply(): OpenRLHF is not installed") from e
    if _slot.current() is not None:
        return _slot.current()
    patch = PeerPatch("openrlhf", version)
    if version_key(version) != (0, 11):
        note = f"fastrlhf.integrations.openrlhf: OpenRLHF {version} is not a version we have read " \
               f"(supported: {SUPPORTED})"
        if not allow_untested:
            patch.reason = note + "; nothing patched, OpenRLHF runs unchanged"
            warnings.warn(patch.reason, RuntimeWarning, stacklevel=2)
            return patch
        warnings.warn(note + "; allow_untested=True: patching where the signatures match", RuntimeWarning,
                      stacklevel=2)
    utils = import_optional(_UTILS, patch)
    loss = import_optional(_LOSS, patch)
    if utils is None or loss is None:
        patch.reason = f"fastrlhf.integrations.openrlhf: cannot import OpenRLHF's models ({'; '.join(patch.skipped)})" \
                       "; nothing patched"
        warnings.warn(patch.reason, RuntimeWarning, stacklevel=2)
        return patch
    exp = import_optional(_EXP, patch)
    klc = import_optional(_KLC, patch)

    # (owner, name, ours, serve, is_method); serve None: a class, every construction counted
    targets = [
        (utils, "compute_approx_kl", compute_approx_kl, _serve_kl, False),
        (utils, "log_probs_from_logits", log_probs_from_logits, _float_logits, False),
        (utils, "compute_entropy", compute_entropy, _float_logits, False),
        (loss.PolicyLoss, "forward", policy_loss_forward, _serve_policy, True),
        (loss.ValueLoss, "forward", value_loss_forward, _serve_value, True),
    ]
    if exp is not None:
        targets.append((exp.RemoteExperienceMaker, "get_advantages_and_returns", get_advantages_and_returns,
                        _serve_gae, True))
    if klc is not None:
        targets += [(klc, "AdaptiveKLController", AdaptiveKLController, None, False),
                    (klc, "FixedKLController", FixedKLController, None, False)]

    for owner, name, ours, _, _ in targets:  # 1. check every signature before touching anything
        original = getattr(owner, name, None)
        got = None if original is None else signature_of(original)
        if got != signature_of(ours):
            where = getattr(owner, "__qualname__", None) or owner.__name__
            patch.reason = (f"fastrlhf.integrations.openrlhf: OpenRLHF {version}: {where}.{name} has parameters {got}, "
                            f"expected {signature_of(ours)}; nothing patched, OpenRLHF runs unchanged")
            warnings.warn(patch.reason, RuntimeWarning, stacklevel=2)
            return patch
    for owner, name, ours, serve, is_method in targets:  # 2. swap
        original = getattr(owner, name)
        label = f"{owner.__name__}.{name}" if is_method else name
        if serve is None:
            patch.set_everywhere("openrlhf", owner, name, counting_class(patch, label, ours))
        elif is_method:
            patch.set_attr(owner, name, served(patch, label, ours, original, serve))
        else:
            patch.set_everywhere("openrlhf", owner, name, served(patch, label, ours, original, serve))
    return _slot.activate(patch)


def undo() -> None:
    """Undo the active ``apply()`` (no-op when nothing is patched)."""
    _slot.undo()


def patched(*, allow_untested: bool = False):
    """``with patched() as p:`` runs the block with OpenRLHF patched and restores it after (unless already patched)."""
    return _slot.patched(apply, allow_untested=allow_untested)
