"""The algorithmic core of critic-free group RL (GRPO, Dr.GRPO, RLOO), free of I/O.

Notation: Q prompts, n samples per prompt (a group), B = Q·n completions (group q = rows q·n .. q·n+n−1),
G response length, r [Q, n] sequence rewards, A [Q, n] sequence advantages (every token of a completion gets its A).

Group advantages (:func:`group_advantages`):
    grpo    A_i = (r_i − mean(r)) / (std(r) + eps)      std with Bessel's correction (n − 1)  (DeepSeekMath)
    drgrpo  A_i =  r_i − mean(r)                         no std (Dr.GRPO, Liu et al. 2025)
    rloo    A_i =  r_i − Σ_{j≠i} r_j / (n − 1)           leave-one-out baseline (Ahmadian et al. 2024)
Rewards (:class:`RewardFunctions`): Python functions ``f(prompts, completions) -> list[float]`` named as
``module:function`` or ``path/to/file.py:function``, combined with weights:  r = Σ_k w_k f_k (+ w_rm · RM score).
The update (:func:`grpo_update`): μ passes over the batch in minibatches, each one clipped-surrogate step with
asymmetric clipping (ε_low, ε_high) and the optional KL-in-loss term, aggregated by ``agg`` (all in the fused
``kernels.ppo_policy_loss``).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from fastrlhf import kernels
from fastrlhf.runtime import distributed
from fastrlhf.runtime.config import ConfigError
from fastrlhf.stages.ppo_core import ResponseBatch, _chunks, full_kl_loss_term

ADVANTAGE_MODES = ("grpo", "drgrpo", "rloo")


# ------------------------------------------------------------------------------------------------------ advantages

def group_advantages(rewards: torch.Tensor, mode: str = "grpo", eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages.  rewards [Q, n] (n ≥ 2) -> [Q, n], computed in fp32 (float64 stays float64)."""
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"group_advantages: mode={mode!r}; expected one of {ADVANTAGE_MODES}")
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"group_advantages: rewards must be [Q, n] with n >= 2, got {list(rewards.shape)}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    n = r.shape[1]
    mean = r.mean(1, keepdim=True)                                      # mean over the group
    if mode == "grpo":
        return (r - mean) / (r.std(1, keepdim=True, unbiased=True) + eps)  # (r − mean) / (std + eps)
    if mode == "drgrpo":
        return r - mean                                                 # r − mean
    return (r - mean) * (n / (n - 1))                                   # r_i − (Σ r − r_i)/(n − 1) = n/(n−1)·(r_i − mean)


def group_advantages_ref(rewards: torch.Tensor, mode: str = "grpo", eps: float = 1e-4) -> torch.Tensor:
    """Loop-by-loop float64 definition of :func:`group_advantages` (for tests).  [Q, n] -> [Q, n] float64."""
    out = torch.zeros(rewards.shape, dtype=torch.float64)
    for q, row in enumerate(rewards.double().tolist()):
        n = len(row)
        mean = sum(row) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / (n - 1))
        for i, x in enumerate(row):
            if mode == "grpo":
                out[q, i] = (x - mean) / (std + eps)
            elif mode == "drgrpo":
                out[q, i] = x - mean
            else:
                out[q, i] = x - (sum(row) - x) / (n - 1)
    return out


# ---------------------------------------------------------------------------------------------------------- rewards

def load_reward_function(spec: str, field: str = "reward_funcs") -> Callable:
    """``module:function`` (importable from sys.path / PYTHONPATH) or ``path/to/file.py:function`` -> the callable.

    Any problem raises ConfigError naming ``field`` and the spec (the CLI prints it in one line, exit status 2)."""
    if not isinstance(spec, str) or spec.count(":") < 1:
        raise ConfigError(f"--{field}: {spec!r} is not 'module:function' or 'path/to/file.py:function'")
    target, name = spec.rsplit(":", 1)
    if not target or not name.isidentifier():
        raise ConfigError(f"--{field}: {spec!r} is not 'module:function' or 'path/to/file.py:function'")
    try:
        if target.endswith(".py") or os.sep in target:
            if not os.path.isfile(target):
                raise ConfigError(f"--{field}: {spec!r}: file {target!r} not found")
            mod_name = "fastrlhf_reward_" + os.path.splitext(os.path.basename(target))[0]
            mspec = importlib.util.spec_from_file_location(mod_name, target)
            module = importlib.util.module_from_spec(mspec)
            sys.modules[mod_name] = module  # dataclasses / pickling inside the user's file need it registered
            mspec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as e:  # an ImportError, or an error raised while the user's module runs
        raise ConfigError(f"--{field}: {spec!r}: cannot import {target!r} ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ConfigError(f"--{field}: {spec!r}: {target!r} has no attribute {name!r}")
    if not callable(fn):
        raise ConfigError(f"--{field}: {spec!r}: {name!r} is not callable")
    try:
        inspect.signature(fn).bind([], [])
    except (TypeError, ValueError):
        raise ConfigError(f"--{field}: {spec!r}: must accept (prompts, completions)") from None
    return fn


@dataclass
class RewardFunctions:
    """Weighted Python reward functions.  ``__call__(prompts, completions)`` -> (r [B] fp32, {name: mean})."""

    specs: list[str]
    fns: list[Callable]
    weights: list[float]

    @classmethod
    def from_config(cls, specs: list[str], weights: list[float]) -> "RewardFunctions":
        if weights and len(weights) != len(specs):
            raise ConfigError(f"--reward_weights: {len(weights)} weights for {len(specs)} reward_funcs")
        for w in weights:
            if not math.isfinite(w):
                raise ConfigError(f"--reward_weights: {w} is not a finite number")
        return cls(list(specs), [load_reward_function(s) for s in specs], list(weights) or [1.0] * len(specs))

    def __call__(self, prompts: list, completions: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
        total = torch.zeros(len(completions), dtype=torch.float32)
        parts = {}
        for spec, fn, w in zip(self.specs, self.fns, self.weights):
            out = fn(prompts, completions)
            try:
                vals = [float(v) for v in out]
            except (TypeError, ValueError):
                raise ConfigError(f"--reward_funcs: {spec} must return a list of floats, got {type(out).__name__}") from None
            if len(vals) != len(completions):
                raise ConfigError(f"--reward_funcs: {spec} returned {len(vals)} rewards for {len(completions)} completions")
            if not all(math.isfinite(v) for v in vals):
                raise ConfigError(f"--reward_funcs: {spec} returned a non-finite reward")
            r = torch.tensor(vals, dtype=torch.float32)
            total += w * r                                              # r = Σ_k w_k f_k
            parts[f"reward/{spec.rsplit(':', 1)[1]}"] = float(r.mean())
        return total, parts


# ------------------------------------------------------------------------------------------------------- the batch

@dataclass
class GroupBatch:
    """One generation batch, all [B, ·] (B = Q·n), detached."""

    input_ids: torch.Tensor  # [B, P+G]
    attention_mask: torch.Tensor  # [B, P+G]
    position_ids: torch.Tensor  # [B, P+G]
    response_ids: torch.Tensor  # [B, G]
    mask: torch.Tensor  # [B, G] fp32
    advantages: torch.Tensor  # [B] sequence advantages
    old_logprobs: torch.Tensor | None  # [B, G]; None: μ = 1 with one minibatch (old = current, ratio 1)
    ref_logprobs: torch.Tensor | None  # [B, G]; None: no per-token-estimator KL in the loss
    prompt_len: int
    ref_hidden: torch.Tensor | None = None  # [B, G, H] the reference's response hidden states (the full-KL loss term)

    def minibatch(self, idx: torch.Tensor) -> "GroupBatch":
        return GroupBatch(**{k: (v[idx] if torch.is_tensor(v) else v) for k, v in self.__dict__.items()})


@torch.no_grad()
def batch_logprobs(model, input_ids, attention_mask, position_ids, response_ids, prompt_len: int, *, temperature: float,
                   forward_batch_size: int, autocast, context=None, mask: torch.Tensor | None = None,
                   padding_free: bool = False, share_prompts: bool = True) -> torch.Tensor:
    """Response log-probs of a frozen forward (old policy or reference), in chunks.  -> [B, G] fp32.

    padding_free: each chunk's forward on its valid tokens only, packed (needs ``mask`` [B, G], the valid response
    tokens; the result is then 0 elsewhere); share_prompts: a chunk's rows of one prompt store it once."""
    if padding_free and mask is None:
        raise ValueError("batch_logprobs: padding_free needs mask [B, G] (the valid response tokens)")
    out = []
    for sl in _chunks(input_ids.shape[0], forward_batch_size):
        rb = ResponseBatch.build(input_ids[sl], attention_mask[sl], position_ids[sl], response_ids[sl],
                                 mask[sl] if mask is not None else None, prompt_len, padding_free=padding_free,
                                 share_prompts=share_prompts)
        with autocast(), (context() if context is not None else contextlib.nullcontext()):
            out.append(rb.logprobs(model, temperature=temperature))
    return torch.cat(out)


@torch.no_grad()
def batch_response_hidden(model, input_ids, attention_mask, position_ids, prompt_len: int, *, forward_batch_size: int,
                          autocast, mask: torch.Tensor | None = None, padding_free: bool = False,
                          share_prompts: bool = True) -> torch.Tensor:
    """Response hidden states of a frozen forward (the reference, for the full-KL loss term), in chunks.  -> [B, G, H]

    padding_free: each chunk's forward on its valid tokens only, packed (needs ``mask`` [B, G]; 0 at invalid tokens)."""
    if padding_free and mask is None:
        raise ValueError("batch_response_hidden: padding_free needs mask [B, G] (the valid response tokens)")
    out = []
    for sl in _chunks(input_ids.shape[0], forward_batch_size):
        rb = ResponseBatch.build(input_ids[sl], attention_mask[sl], position_ids[sl], input_ids[sl, prompt_len:],
                                 mask[sl] if mask is not None else None, prompt_len, padding_free=padding_free,
                                 share_prompts=share_prompts)
        with autocast():
            out.append(rb.to_grid(rb.hidden(model)))
    return torch.cat(out)


@torch.no_grad()
def batch_full_kl(policy, ref, input_ids, attention_mask, position_ids, mask, prompt_len: int, *, temperature: float,
                  forward_batch_size: int, autocast, padding_free: bool = True,
                  share_prompts: bool = True) -> torch.Tensor:
    """Exact per-token KL(π ‖ π_ref) over the whole vocabulary (``kernels.head.head_kl``: both models' response hidden
    states and heads, no [B, G, V] logits), in chunks.  mask [B, G] -> [B, G] fp32, 0 where mask = 0.
    padding_free: the forwards on the valid tokens only, packed."""
    out = []
    for sl in _chunks(input_ids.shape[0], forward_batch_size):
        rb = ResponseBatch.build(input_ids[sl], attention_mask[sl], position_ids[sl], input_ids[sl, prompt_len:],
                                 mask[sl], prompt_len, padding_free=padding_free, share_prompts=share_prompts)
        with autocast():
            h, h_ref = rb.hidden(policy), rb.hidden(ref)
            out.append(rb.full_kl(h, policy.lm_head_weight, h_ref, ref.lm_head_weight, temperature=temperature))
    return torch.cat(out) * mask


def grpo_update(batch: GroupBatch, *, policy, optimizer, mu: int, minibatch_size: int, clip_eps_low: float,
                clip_eps_high: float, kl_coef: float, kl_estimator: str, agg: str, temperature: float,
                max_grad_norm: float | None, autocast: Callable[[], contextlib.AbstractContextManager],
                generator: torch.Generator | None = None, ref_head_weight: torch.Tensor | None = None,
                padding_free: bool = True, share_prompts: bool = True) -> dict[str, float]:
    """μ passes over ``batch`` in shuffled minibatches of ``minibatch_size`` completions, one optimizer step each.

    Loss per token: max(−A ρ, −A clip(ρ, 1 − ε_low, 1 + ε_high)) (+ β·KL(estimator) against the reference when
    ``batch.ref_logprobs`` is set, or β·KL_full, the exact KL over the vocabulary from the policy's hidden states and
    ``batch.ref_hidden`` with the reference head ``ref_head_weight``), aggregated by ``agg``; ρ = exp(logp − old). Without old log-probs (μ = 1, one
    minibatch) old = logp.detach(), so ρ = 1 and the gradient is the policy gradient −A ∇logp.
    Data parallel: the denominator of ``agg`` is the sum over ranks / world (FSDP averages the gradients).
    padding_free: each minibatch's forward and backward on its valid tokens only, packed (same loss and gradients).
    share_prompts: packed, a minibatch's completions of one prompt store it once (same loss and gradients up to float
    rounding; the linear layers skip n − 1 copies of each prompt).
    """
    B = batch.input_ids.shape[0]
    stats: dict[str, list[torch.Tensor]] = {k: [] for k in ("policy_loss", "clipfrac", "approx_kl", "kl", "entropy",
                                                              "grad_norm")}
    kl_in_loss = batch.ref_logprobs is not None and kl_coef > 0
    full_in_loss = batch.ref_hidden is not None and kl_coef > 0
    if full_in_loss and ref_head_weight is None:
        raise ValueError("grpo_update: batch.ref_hidden needs ref_head_weight (the reference's LM head)")
    for _pass in range(mu):
        perm = torch.randperm(B, generator=generator, device="cpu").to(batch.input_ids.device)
        for sl in _chunks(B, minibatch_size):
            mb = batch.minibatch(perm[sl])
            norm = distributed.all_reduce_sum(kernels.default_denominator(mb.mask, agg)) / distributed.world_size()
            with autocast():
                rb = ResponseBatch.build(mb.input_ids, mb.attention_mask, mb.position_ids, mb.response_ids, mb.mask,
                                         mb.prompt_len, padding_free=padding_free, share_prompts=share_prompts)
                h = rb.hidden(policy)  # [b, G, H], packed: [M, H]
                logp, ent = rb.logprobs(policy, temperature=temperature, return_entropy=True, hidden=h)
                old = mb.old_logprobs if mb.old_logprobs is not None else logp.detach()
                loss, m = kernels.ppo_policy_loss(logp, old, mb.advantages[:, None], mb.mask, clip_eps=clip_eps_low,
                                            clip_eps_high=clip_eps_high,
                                            ref_logprobs=mb.ref_logprobs if kl_in_loss else None,
                                            kl_coef=kl_coef if kl_in_loss else 0.0, kl_estimator=kl_estimator,
                                            agg=agg, normalizer=norm)
                if full_in_loss:  # ℓ += β · agg(KL_full)
                    term, m["kl"] = full_kl_loss_term(h, policy.lm_head_weight, mb.ref_hidden, ref_head_weight,
                                                      mb.mask, agg, norm, temperature=temperature, batch=rb)
                    loss = loss + kl_coef * term
            if distributed.any_rank(not bool(torch.isfinite(loss.detach()))):
                raise FloatingPointError(f"non-finite GRPO loss ({float(loss):.4g})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                gn = torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], max_grad_norm)
                stats["grad_norm"].append(distributed.local_tensor(gn).detach())
            optimizer.step()
            stats["policy_loss"].append(loss.detach())
            for k in ("clipfrac", "approx_kl", "kl"):
                if k in m:
                    stats[k].append(m[k])
            stats["entropy"].append((ent.detach().float() * mb.mask).sum() / mb.mask.sum().clamp_min(1))
    return {k: (float(torch.stack([t.float() for t in v]).mean()) if v else math.nan) for k, v in stats.items()}
