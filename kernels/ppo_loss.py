"""Clipped PPO policy loss (+ optional KL-in-loss term), forward and backward fused.

Notation: B batch (rows), T response tokens, m the [B, T] mask.

    ρ = exp(clamp(logp − old, −20, 20))
    ℓ = max(−A ρ, −A clip(ρ, 1 − ε_low, 1 + ε_high));   dual clip c > 1: ℓ = min(ℓ, −c A) where A < 0
    ℓ += β_loss · KL(estimator) of d = ref − logp, as defined once in ``kl.py`` (``kl_estimate`` / ``kl_estimator_ref``)
    loss = agg(ℓ, m)   (``_aggregate.py``: token-mean / seq-mean-token-mean / seq-mean-token-sum)

Fusion (CUDA, 3 launches for forward + backward, no host sync):
 1. ``_ppo_fwd_kernel``, grid (B,): each program walks its row in BLOCK_T tiles and computes ℓ, ∂ℓ/∂logp (analytic,
    stored m·∂ℓ/∂logp as fp32 [B, T] when a gradient is needed) and the row partials [S_b, n_b, #clipped, Σ½r², Σ KL].
 2. ``_finalize_kernel`` (1 program): loss = Σ_b w_b S_b, metrics, per-row weights w_b.
 3. backward ``_scale_grad_kernel``: grad = g · w_b · (m ∂ℓ/∂logp), written in logprobs' dtype (no recomputation).
The CPU path runs the same three steps as vectorised torch inside the same ``autograd.Function``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _aggregate as agg_mod
from ._backend import interpreting
from .kl import ESTIMATORS, KL_CODE, KL_NAME, kl_estimate, kl_estimator_ref, kl_value_and_grad_torch

KL_ESTIMATORS = ESTIMATORS
METRICS_WITH_KL = ("clipfrac", "approx_kl", "kl")


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _ppo_fwd_kernel(
    # data ptrs
    logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, dl_ptr, part_ptr,
    # shapes
    T, n_cols,
    # strides
    s_lp_b, s_lp_t, s_old_b, s_old_t, s_adv_b, s_adv_t, s_m_b, s_m_t, s_ref_b, s_ref_t,
    # constants
    lo, hi, dual_c, kl_coef,
    KL_EST: tl.constexpr, STORE_GRAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One row per program. Writes dl[b, :] = m ∂ℓ/∂logp (fp32, if STORE_GRAD), part[b, :] = [S, n, clip, akl, (kl)]."""
    row = tl.program_id(0).to(tl.int64)
    acc_l = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_clip = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_akl = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_kl = tl.zeros([BLOCK_T], dtype=tl.float32)
    t0 = tl.full([], 0, tl.int32)
    while t0 < T:  # (a while loop: Triton 3.6's interpreter cannot take a runtime bound in range() under numpy 2.4)
        t = t0 + tl.arange(0, BLOCK_T)
        ok = t < T
        m = (tl.load(mask_ptr + row * s_m_b + t * s_m_t, mask=ok, other=0) != 0) & ok
        logp = tl.load(logp_ptr + row * s_lp_b + t * s_lp_t, mask=ok, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + row * s_old_b + t * s_old_t, mask=ok, other=0.0).to(tl.float32)
        adv = tl.load(adv_ptr + row * s_adv_b + t * s_adv_t, mask=ok, other=0.0).to(tl.float32)
        r = logp - old                                                    # log ρ
        rho = tl.exp(tl.minimum(tl.maximum(r, -20.0), 20.0))              # ρ = exp(clamp(r, −20, 20))
        pg_un = -adv * rho                                                # −A ρ
        pg_cl = -adv * tl.minimum(tl.maximum(rho, lo), hi)                # −A clip(ρ, 1 − ε_low, 1 + ε_high)
        clipped = pg_cl > pg_un                                           # clipped term strictly active
        loss = tl.maximum(pg_un, pg_cl)                                   # ℓ = max(−Aρ, −A clip(ρ))
        # ∂ℓ/∂logp = −A ρ on the unclipped branch (ρ' = ρ inside the ±20 clamp); 0 when the clipped (constant) term wins
        dl = tl.where(clipped, 0.0, -adv * tl.where(tl.abs(r) <= 20.0, rho, 0.0))
        # dual clip (c > 1, A < 0): ℓ = min(ℓ, −c A), constant (∂ = 0) when −c A wins
        dual = (adv < 0) & (dual_c > 1.0) & (-dual_c * adv < loss)
        loss = tl.where(dual, -dual_c * adv, loss)
        dl = tl.where(dual, 0.0, dl)
        if KL_EST != 0:
            ref = tl.load(ref_ptr + row * s_ref_b + t * s_ref_t, mask=ok, other=0.0).to(tl.float32)
            kl, dk_dd = kl_estimate(ref - logp, KL_EST)                   # KL(d), d = ref − logp
            dkl = -dk_dd                                                  # ∂KL/∂logp = −∂KL/∂d
            loss += kl_coef * kl                                          # ℓ += β_loss KL
            dl += kl_coef * dkl
            acc_kl += tl.where(m, kl, 0.0)
        acc_l += tl.where(m, loss, 0.0)                                   # S_b = Σ_t ℓ m
        acc_n += tl.where(m, 1.0, 0.0)                                    # n_b = Σ_t m
        acc_clip += tl.where(m & clipped, 1.0, 0.0)
        acc_akl += tl.where(m, 0.5 * r * r, 0.0)                          # approx_kl numerator Σ ½ (logp − old)² m
        if STORE_GRAD:
            tl.store(dl_ptr + row * T + t, tl.where(m, dl, 0.0), mask=ok)
        t0 += BLOCK_T
    base = part_ptr + row * n_cols
    tl.store(base + 0, tl.sum(acc_l, axis=0))
    tl.store(base + 1, tl.sum(acc_n, axis=0))
    tl.store(base + 2, tl.sum(acc_clip, axis=0))
    tl.store(base + 3, tl.sum(acc_akl, axis=0))
    if KL_EST != 0:
        tl.store(base + 4, tl.sum(acc_kl, axis=0))


def fwd_block_t(T: int) -> int:
    """BLOCK_T of ``_ppo_fwd_kernel`` / ``_value_fwd_kernel``: 16 under the interpreter (so small tests loop over
    several tiles), else 256 for rows ≤ 256 tokens and 1024 otherwise (the configs ``test_aot_ppo.py`` compiles)."""
    if interpreting():
        return 16
    return 256 if T <= 256 else 1024


def _rows_triton(logp, old, adv, mask, ref, lo, hi, dual_c, kl_coef, kl_code, need_grad):
    """-> (dl [B, T] fp32 or None, partials [B, 4 or 5] fp32). One launch."""
    B, T = logp.shape
    n_cols = 5 if kl_code else 4
    part = torch.empty((B, n_cols), dtype=torch.float32, device=logp.device)
    dl = torch.empty((B, T), dtype=torch.float32, device=logp.device) if need_grad else None
    ref_t = ref if ref is not None else logp                       # unused when KL_EST == 0
    _ppo_fwd_kernel[(B,)](
        logp, old, adv, mask, ref_t, dl if dl is not None else part, part,
        T, n_cols,
        logp.stride(0), logp.stride(1), old.stride(0), old.stride(1), adv.stride(0), adv.stride(1),
        mask.stride(0), mask.stride(1), ref_t.stride(0), ref_t.stride(1),
        lo, hi, dual_c, kl_coef,
        KL_EST=kl_code, STORE_GRAD=need_grad, BLOCK_T=fwd_block_t(T), num_warps=4,
    )
    return dl, part


# ----------------------------------------------------------------------------------------------------------------------
# Torch (CPU path): the same fused forward, vectorised, with the analytic derivative.
# ----------------------------------------------------------------------------------------------------------------------
def _rows_torch(logp, old, adv, mask, ref, lo, hi, dual_c, kl_coef, kl_code, need_grad):
    """Same contract as ``_rows_triton``."""
    f32 = torch.float32
    logp, old, adv = logp.to(f32), old.to(f32), adv.to(f32)
    m = mask != 0
    r = logp - old                                                         # log ρ
    rho = torch.exp(r.clamp(-20.0, 20.0))                                  # ρ
    pg_un = -adv * rho                                                     # −A ρ
    pg_cl = -adv * rho.clamp(lo, hi)                                       # −A clip(ρ, 1 − ε_low, 1 + ε_high)
    clipped = pg_cl > pg_un
    loss = torch.maximum(pg_un, pg_cl)
    dl = torch.where(clipped, 0.0, -adv * torch.where(r.abs() <= 20.0, rho, 0.0))   # ∂ℓ/∂logp
    if dual_c > 1.0:
        dual = (adv < 0) & (-dual_c * adv < loss)                          # ℓ = min(ℓ, −c A) for A < 0
        loss = torch.where(dual, -dual_c * adv, loss)
        dl = torch.where(dual, 0.0, dl)
    cols = [torch.where(m, loss, 0.0), m.to(f32), (m & clipped).to(f32), torch.where(m, 0.5 * r * r, 0.0)]
    if kl_code:
        kl, dk_dd = kl_value_and_grad_torch(ref.to(f32) - logp, KL_NAME[kl_code])   # KL(d), d = ref − logp
        dkl = -dk_dd                                                       # ∂KL/∂logp
        cols[0] = torch.where(m, loss + kl_coef * kl, 0.0)                  # ℓ += β_loss KL
        dl = dl + kl_coef * dkl
        cols.append(torch.where(m, kl, 0.0))
    part = torch.stack([c.sum(1) for c in cols], dim=1)                    # [B, 4 or 5]
    return (torch.where(m, dl, 0.0).contiguous() if need_grad else None), part


def _check_args(clip_eps, clip_eps_high, dual_clip, ref_logprobs, kl_coef, kl_estimator, where):
    if not (isinstance(clip_eps, (int, float)) and 0.0 <= clip_eps < 1.0):
        raise ValueError(f"{where}: clip_eps must be a float in [0, 1), got {clip_eps!r}")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if not (isinstance(eps_high, (int, float)) and 0.0 <= eps_high < math.inf):
        raise ValueError(f"{where}: clip_eps_high must be a finite float >= 0, got {clip_eps_high!r}")
    if dual_clip is not None and not (isinstance(dual_clip, (int, float)) and 1.0 < dual_clip < math.inf):
        raise ValueError(f"{where}: dual_clip must be None or a finite float > 1, got {dual_clip!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"{where}: kl_estimator={kl_estimator!r}; expected one of {KL_ESTIMATORS}")
    if not (isinstance(kl_coef, (int, float)) and math.isfinite(kl_coef)):
        raise ValueError(f"{where}: kl_coef must be a finite float, got {kl_coef!r}")
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError(f"{where}: kl_coef={kl_coef} needs ref_logprobs (the KL-in-loss term is against it)")
    return float(clip_eps), float(eps_high)


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_eps=0.2, clip_eps_high=None, dual_clip=None,
                    ref_logprobs=None, kl_coef=0.0, kl_estimator="k3", agg="token-mean", normalizer=None):
    """Clipped PPO policy loss, fused forward + backward.

    Args:
        logprobs: [B, T] log π(y_t) under the current policy (any float dtype, may be non-contiguous); the only input
            that receives a gradient.
        old_logprobs, advantages, ref_logprobs: [B, T] (or broadcastable to it, e.g. advantages [B, 1]); no gradient.
        mask: [B, T] bool / int / float, nonzero = valid response token (padding left, right or in holes).
        clip_eps, clip_eps_high: ε_low, ε_high (ε_high defaults to ε_low). dual_clip: c > 1 or None.
        kl_coef, kl_estimator: β_loss and "k1" | "k2" | "k3" | "abs" for the KL-in-loss term against ref_logprobs.
        agg: "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum".
        normalizer: None, a float > 0 or a 0-d tensor: the denominator (global token count for token-mean, global
            row count for the seq-mean modes) under gradient accumulation / data parallel.
    Returns:
        (loss: 0-d fp32, metrics: dict of detached 0-d fp32 ``clipfrac``, ``approx_kl`` and ``kl`` (with a reference)).
    """
    where = "ppo_policy_loss"
    logprobs = agg_mod.main_input("logprobs", logprobs, where)
    old = agg_mod.side_input("old_logprobs", old_logprobs, logprobs, where)
    adv = agg_mod.side_input("advantages", advantages, logprobs, where)
    m = agg_mod.side_input("mask", mask, logprobs, where, is_mask=True)
    ref = None if ref_logprobs is None else agg_mod.side_input("ref_logprobs", ref_logprobs, logprobs, where)
    eps_low, eps_high = _check_args(clip_eps, clip_eps_high, dual_clip, ref_logprobs, kl_coef, kl_estimator, where)
    kl_code = KL_CODE[kl_estimator] if ref is not None else 0
    lo, hi, dual_c = 1.0 - eps_low, 1.0 + eps_high, 0.0 if dual_clip is None else float(dual_clip)

    def rows(need_grad: bool, on_triton: bool):
        run = _rows_triton if on_triton else _rows_torch
        return run(logprobs, old, adv, m, ref, lo, hi, dual_c, float(kl_coef), kl_code, need_grad)

    loss, metrics = agg_mod.fused_row_loss(logprobs, rows, agg, normalizer, where)
    names = METRICS_WITH_KL if kl_code else METRICS_WITH_KL[:2]
    return loss, {name: metrics[i] for i, name in enumerate(names)}


# ----------------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------------
def ppo_policy_loss_ref(logprobs, old_logprobs, advantages, mask, *, clip_eps=0.2, clip_eps_high=None, dual_clip=None,
                        ref_logprobs=None, kl_coef=0.0, kl_estimator="k3", agg="token-mean", normalizer=None):
    """Plain eager PyTorch formula (same arguments and returns as ``ppo_policy_loss``); autograd gives the reference
    gradient. Computes in float64 for float64 inputs, else in fp32."""
    dt = torch.promote_types(logprobs.dtype, torch.float32)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    logp = logprobs.to(dt)
    old = old_logprobs.detach().to(dt)
    adv = advantages.detach().to(dt)
    m = (mask != 0).to(dt)
    log_ratio = logp - old
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))                        # ρ = exp(clamp(logp − old, −20, 20))
    pg_un = -adv * ratio                                                   # −A ρ
    pg_cl = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + eps_high)             # −A clip(ρ, 1 − ε_low, 1 + ε_high)
    loss_tok = torch.maximum(pg_un, pg_cl)                                 # ℓ = max(...)
    if dual_clip is not None:
        loss_tok = torch.where(adv < 0, torch.minimum(loss_tok, -dual_clip * adv), loss_tok)   # dual clip
    metrics = {
        "clipfrac": agg_mod.masked_mean_ref((pg_cl > pg_un).to(dt), m),
        "approx_kl": agg_mod.masked_mean_ref(0.5 * log_ratio ** 2, m),     # ½ (logp − old)²
    }
    if ref_logprobs is not None:
        kl = kl_estimator_ref(ref_logprobs.detach().to(dt) - logp, kl_estimator)
        loss_tok = loss_tok + kl_coef * kl                                 # ℓ += β_loss KL
        metrics["kl"] = agg_mod.masked_mean_ref(kl, m)
    loss = agg_mod.aggregate_ref(loss_tok, m, agg, normalizer)
    return loss, {k: v.detach() for k, v in metrics.items()}
