"""veRL's and OpenRLHF's conventions (names, argument order, clamps, what they return) on ``fastrlhf.kernels``.

Notation: B batch, T response tokens, V vocabulary. Masks are [B, T], 1 for a response token, 0 for padding.
All results are fp32. Use the namespaces as drop-ins::

    from fastrlhf.integrations.functional import verl, openrlhf
    verl.kl_penalty(logprob, ref_logprob, "low_var_kl")
    openrlhf.compute_approx_kl(log_probs, log_probs_base, kl_estimator="k3")

The formulas below are the ones those projects document (facts, not their code); each is checked in
tests/test_integrations_functional.py against a float64 reference written from them.

veRL (``verl.trainer.ppo.core_algos``, ``verl.utils.torch_functional``)
- ``logprobs_from_logits(logits [..., V], labels [...])``: log softmax(logits)[label]. veRL divides the logits by the
  rollout temperature before the call; so do we (τ = 1 here).
- ``entropy_from_logits(logits [..., V])``: LSE(z) − Σ softmax(z)·z.
- ``compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam) -> (advantages, returns)``:
  GAE over the valid tokens (masked tokens are skipped: V and A carry through them), returns = A + V, then the advantages
  are whitened over the valid tokens (mean 0, unbiased variance 1). veRL leaves its carried values at masked positions; we
  return 0 there (every veRL loss masks those positions).
- ``kl_penalty(logprob, ref_logprob, kl_penalty)``: "kl"/"k1" = logp − ref; "abs" = |logp − ref|; "mse"/"k2" = ½(logp − ref)²;
  "low_var_kl"/"k3" = clamp(exp(d) − d − 1, −10, 10) with d = clamp(ref − logp, −20, 20); a trailing "+" (e.g. "k3+")
  keeps that value but takes the gradient of k2 (straight-through: k2 − sg(k2) + sg(value)). "full" needs the whole
  distribution and is not supported.
- ``masked_whiten(values, mask, shift_mean=True)``: (x − μ)/sqrt(σ² + 1e-8) over the valid tokens, unbiased σ².

OpenRLHF (``openrlhf.models.utils``)
- ``compute_approx_kl(log_probs, log_probs_base, kl_estimator="k1", action_mask=None)``: with r = log_probs − log_probs_base,
  k1 = r, k2 = r²/2, k3 = exp(−r) − 1 + r, then clamp(−10, 10) for every estimator; older releases took ``action_mask``
  and multiplied it in (kept as an optional argument).
- ``log_probs_from_logits(logits [..., V], labels [...], temperature=1.0)``: log softmax(logits / τ)[label].

TRL's GRPO loss (documented in TRL's GRPO trainer docs; TRL computes it inline in ``GRPOTrainer._compute_loss``, so it
cannot be patched in: ``trl_grpo_loss`` is for trainers that subclass GRPOTrainer or write their own loop)
- per token ℓ_t = −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A) + β (exp(d_t) − d_t − 1), ρ_t = exp(logp_t − old_t),
  d_t = ref_t − logp_t, A one advantage per completion ([B] or [B, 1]) or per token ([B, T]);
- ``loss_type``: "grpo" = mean over the B completions of each one's token mean; "bnpo" = Σ ℓ m / Σ m;
  "dr_grpo" = Σ ℓ m / (B · max_completion_length); "dapo" = Σ ℓ m / ``num_items`` (the token count of the whole
  batch, across accumulation steps and processes).
"""
from __future__ import annotations

import types

import torch

from fastrlhf.kernels import gae, logprobs_from_logits, ppo_policy_loss, whiten
from fastrlhf.kernels import kl_penalty as _kl

# --- veRL -------------------------------------------------------------------------------------------------------------

_VERL_KL = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


def verl_logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True) -> torch.Tensor:
    """veRL's ``logprobs_from_logits``: logits [..., V] (already divided by the temperature), labels [...] -> fp32 [...].

    ``inplace_backward`` is veRL's memory switch for its flash-attn kernel; ours never keeps a [..., V] gradient buffer.
    """
    del inplace_backward
    return logprobs_from_logits(logits, labels)


def verl_entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """veRL's ``entropy_from_logits``: logits [..., V] -> fp32 H [...] = LSE(z) − Σ softmax(z)·z."""
    dummy = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)  # any valid label; logp unused
    return logprobs_from_logits(logits, dummy, return_entropy=True)[1]


def verl_masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """veRL's ``masked_whiten``: [B, T] -> fp32 [B, T], (x − μ)·rsqrt(σ² + 1e-8) (+ μ if not shift_mean), 0 where mask = 0."""
    return whiten(values, mask, shift_mean=shift_mean)


def verl_compute_gae_advantage_return(token_level_rewards: torch.Tensor, values: torch.Tensor,
                                      response_mask: torch.Tensor, gamma: float, lam: float):
    """veRL's GAE estimator: rewards, values, response_mask [B, T] -> (whitened advantages [B, T], returns [B, T]) fp32.

    δ_t = r_t + γ V_next(t) − V_t,  A_t = δ_t + γλ A_next(t) over valid tokens,  R_t = A_t + V_t,  A ← whiten(A).
    Computed without gradient (as veRL does). Masked positions are 0 in both outputs.
    """
    with torch.no_grad():
        adv, ret = gae(token_level_rewards, values, response_mask, gamma=float(gamma), lam=float(lam))
        adv = whiten(adv, response_mask, shift_mean=True)
    return adv, ret


def verl_kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """veRL's ``kl_penalty(logprob, ref_logprob, kl_penalty)``: [B, T] -> fp32 [B, T] (names in the module docstring)."""
    name = kl_penalty
    straight_through = name.endswith("+")  # for "k2+" this changes nothing: value and gradient are both k2's
    base = name[:-1] if straight_through else name
    if base == "full":
        raise NotImplementedError("verl_kl_penalty: 'full' needs the whole distribution (logits), not token log-probs")
    if base not in _VERL_KL:
        raise ValueError(f"verl_kl_penalty: kl_penalty={kl_penalty!r}; expected one of "
                         f"{sorted(_VERL_KL)} (optionally with a trailing '+')")
    est = _VERL_KL[base]
    value = _kl(logprob, ref_logprob, estimator=est, clamp=(-10.0, 10.0) if est == "k3" else None)
    if not straight_through:
        return value
    k2 = _kl(logprob, ref_logprob, estimator="k2")  # ½ (logp − ref)²: the gradient veRL's "+" variants use
    return k2 - k2.detach() + value.detach()


verl = types.SimpleNamespace(
    logprobs_from_logits=verl_logprobs_from_logits,
    entropy_from_logits=verl_entropy_from_logits,
    masked_whiten=verl_masked_whiten,
    compute_gae_advantage_return=verl_compute_gae_advantage_return,
    kl_penalty=verl_kl_penalty,
)

# --- OpenRLHF ---------------------------------------------------------------------------------------------------------

_OPENRLHF_KL = ("k1", "k2", "k3")


def openrlhf_compute_approx_kl(log_probs: torch.Tensor, log_probs_base: torch.Tensor, kl_estimator: str = "k1",
                               action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """OpenRLHF's ``compute_approx_kl``: [B, T] -> fp32 [B, T], estimator of KL(π ‖ π_base) clamped to [−10, 10].

    With r = log_probs − log_probs_base (= −d in shared/KERNELS.md): k1 = r, k2 = r²/2, k3 = exp(−r) − 1 + r, which are
    exactly our k1, k2, k3. (Our k3 also clamps d to [−20, 20] before exp; beyond that range OpenRLHF's value exceeds 10
    and is clamped to 10 anyway, so the results agree.)
    """
    if kl_estimator not in _OPENRLHF_KL:
        raise ValueError(f"openrlhf_compute_approx_kl: kl_estimator={kl_estimator!r}; expected one of {_OPENRLHF_KL}")
    kl = _kl(log_probs, log_probs_base, estimator=kl_estimator, clamp=(-10.0, 10.0))
    if action_mask is not None:
        if action_mask.shape != kl.shape:
            raise ValueError(f"openrlhf_compute_approx_kl: action_mask {list(action_mask.shape)} != "
                             f"log_probs {list(kl.shape)}")
        kl = kl * action_mask.to(kl.dtype)
    return kl


def openrlhf_log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """OpenRLHF's ``log_probs_from_logits``: logits [..., V], labels [...] -> fp32 log softmax(logits / τ)[label]."""
    return logprobs_from_logits(logits, labels, temperature=temperature)


openrlhf = types.SimpleNamespace(
    compute_approx_kl=openrlhf_compute_approx_kl,
    log_probs_from_logits=openrlhf_log_probs_from_logits,
)


# --- TRL's GRPO loss --------------------------------------------------------------------------------------------------

_GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def trl_grpo_loss(per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor, advantages: torch.Tensor,
                  completion_mask: torch.Tensor, ref_per_token_logps: torch.Tensor | None = None, *,
                  epsilon_low: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
                  loss_type: str = "dapo", max_completion_length: int | None = None, num_items=None):
    """TRL GRPO's clipped loss (+ k3 KL when ``beta`` > 0) as one fused ``ppo_policy_loss`` call.

    per_token_logps (the only input with a gradient), old_per_token_logps, ref_per_token_logps, completion_mask: [B, T];
    advantages: [B], [B, 1] or [B, T]. Returns (loss 0-d fp32, metrics dict: clipfrac, approx_kl, kl).
    The ratio is exp(clamp(logp − old, −20, 20)) (TRL: no clamp; equal unless |logp − old| > 20).
    """
    if loss_type not in _GRPO_LOSS_TYPES:
        raise ValueError(f"trl_grpo_loss: loss_type={loss_type!r}; supported: {_GRPO_LOSS_TYPES} "
                         "(cispo, sapo, vespo, luspo have other per-token losses)")
    B = per_token_logps.shape[0]
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # [B] -> [B, 1], broadcast over T
    if beta != 0.0 and ref_per_token_logps is None:
        raise ValueError("trl_grpo_loss: beta != 0 needs ref_per_token_logps")
    if loss_type == "grpo":
        agg, normalizer = "seq-mean-token-mean", float(B)  # / B: rows without valid tokens count as 0, as in TRL
    elif loss_type == "bnpo":
        agg, normalizer = "token-mean", None               # / Σ m (0 when Σ m = 0)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("trl_grpo_loss: loss_type='dr_grpo' needs max_completion_length")
        agg, normalizer = "token-mean", float(B * max_completion_length)
    else:
        if num_items is None:
            raise ValueError("trl_grpo_loss: loss_type='dapo' needs num_items (tokens in the whole batch)")
        agg, normalizer = "token-mean", num_items
    return ppo_policy_loss(per_token_logps, old_per_token_logps, adv, completion_mask, clip_eps=epsilon_low,
                           clip_eps_high=epsilon_high, ref_logprobs=ref_per_token_logps if beta != 0.0 else None,
                           kl_coef=beta, kl_estimator="k3", agg=agg, normalizer=normalizer)
