"""veRL's and OpenRLHF's conventions (names, argument order, clamps, what they return) on ``fastrlhf.kernels``.

Notation: B batch, T response tokens, V vocabulary. Masks are [B, T], 1 for a response token, 0 for padding.
All results are fp32. Use the namespaces as drop-ins::

    from fastrlhf.integrations.functional import verl, openrlhf
    verl.kl_penalty(logprob, ref_logprob, "low_var_kl")
    openrlhf.compute_approx_kl(log_probs, log_probs_base, kl_estimator="k3")

The functions are those of ``fastrlhf.integrations.verl`` / ``.openrlhf`` (the same signatures as the peers' own, which
``apply()`` patches in); these namespaces keep them importable without the peers installed. Each is checked in
tests/test_integrations_functional.py against a float64 reference written from the formulas below, and against the
peers' own code in tests/test_integrations_verl.py / test_integrations_openrlhf.py.

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
- ``compute_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1", unbiased_gradient=False)``
  (OpenRLHF 0.11's signature): with r = log_probs − log_probs_base, k1 = r, k2 = r²/2, k3 = exp(−r) − 1 + r, then
  clamp(−10, 10) for every estimator; ``unbiased_gradient`` keeps the value and takes the gradient of w·r²/2,
  w = min(exp(log_probs − log_probs_old), 10) detached.
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

from fastrlhf.kernels import ppo_policy_loss

from . import openrlhf as _openrlhf
from . import verl as _verl

verl = types.SimpleNamespace(
    logprobs_from_logits=_verl.logprobs_from_logits,
    entropy_from_logits=_verl.entropy_from_logits,
    masked_whiten=_verl.masked_whiten,
    compute_gae_advantage_return=_verl.compute_gae_advantage_return,
    kl_penalty=_verl.kl_penalty,
    compute_policy_loss=_verl.compute_policy_loss,
    compute_value_loss=_verl.compute_value_loss,
    AdaptiveKLController=_verl.AdaptiveKLController,
    FixedKLController=_verl.FixedKLController,
)

openrlhf = types.SimpleNamespace(
    compute_approx_kl=_openrlhf.compute_approx_kl,
    log_probs_from_logits=_openrlhf.log_probs_from_logits,
    compute_entropy=_openrlhf.compute_entropy,
    get_advantages_and_returns=lambda values, rewards, action_mask, gamma, lambd:
        _openrlhf.get_advantages_and_returns(None, values, rewards, action_mask, gamma, lambd),
    AdaptiveKLController=_openrlhf.AdaptiveKLController,
    FixedKLController=_openrlhf.FixedKLController,
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
