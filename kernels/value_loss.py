"""Clipped value loss, forward and backward fused. Math: docs/kernels.md, "Clipped value loss".

Notation: B batch (rows), T response tokens, m the [B, T] mask.

    v_clip = V_old + clip(V − V_old, −ε, ε)
    ℓ = ½ max((V − R)², (v_clip − R)²)          ∂ℓ/∂V = V − R on the unclipped branch, 0 when the clipped term wins
    loss = agg(ℓ, m)   (``_aggregate.py``)
    vf_clipfrac = fraction of valid tokens where the clipped term is strictly larger

Fusion as in ``ppo_loss.py``: ``_value_fwd_kernel`` (grid (B,), row loop in BLOCK_T tiles: ℓ, m ∂ℓ/∂V, row partials
[S_b, n_b, #clipped]) + ``_finalize_kernel`` + backward ``_scale_grad_kernel``: 3 launches, no host sync.

v_clip is formed as V itself when |V − V_old| ≤ ε (the same value as V_old + (V − V_old) in exact arithmetic), so an
unclipped token can never count as "clipped" through the 1-ulp rounding of V_old + (V − V_old).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _aggregate as agg_mod
from .ppo_loss import fwd_block_t


@triton.jit
def _value_fwd_kernel(
    # data ptrs
    v_ptr, old_ptr, ret_ptr, mask_ptr, dl_ptr, part_ptr,
    # shapes
    T,
    # strides
    s_v_b, s_v_t, s_old_b, s_old_t, s_ret_b, s_ret_t, s_m_b, s_m_t,
    # constants
    eps,
    STORE_GRAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One row per program. Writes dl[b, :] = m ∂ℓ/∂V (fp32, if STORE_GRAD) and part[b, :] = [S_b, n_b, #clipped]."""
    row = tl.program_id(0).to(tl.int64)
    acc_l = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_clip = tl.zeros([BLOCK_T], dtype=tl.float32)
    t0 = tl.full([], 0, tl.int32)
    while t0 < T:  # (a while loop: Triton 3.6's interpreter cannot take a runtime bound in range() under numpy 2.4)
        t = t0 + tl.arange(0, BLOCK_T)
        ok = t < T
        m = (tl.load(mask_ptr + row * s_m_b + t * s_m_t, mask=ok, other=0) != 0) & ok
        v = tl.load(v_ptr + row * s_v_b + t * s_v_t, mask=ok, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + row * s_old_b + t * s_old_t, mask=ok, other=0.0).to(tl.float32)
        ret = tl.load(ret_ptr + row * s_ret_b + t * s_ret_t, mask=ok, other=0.0).to(tl.float32)
        diff = v - old                                                      # V − V_old
        v_clip = tl.where(diff > eps, old + eps, tl.where(diff < -eps, old - eps, v))   # V_old + clip(V − V_old, ±ε)
        err = v - ret                                                       # V − R
        err_cl = v_clip - ret                                               # v_clip − R
        sq = err * err
        sq_cl = err_cl * err_cl
        clipped = sq_cl > sq                                                # clipped term strictly larger
        loss = 0.5 * tl.maximum(sq, sq_cl)                                  # ℓ = ½ max((V − R)², (v_clip − R)²)
        dl = tl.where(clipped, 0.0, err)                                    # ∂ℓ/∂V (v_clip constant in V if clipped)
        acc_l += tl.where(m, loss, 0.0)                                     # S_b = Σ_t ℓ m
        acc_n += tl.where(m, 1.0, 0.0)                                      # n_b = Σ_t m
        acc_clip += tl.where(m & clipped, 1.0, 0.0)
        if STORE_GRAD:
            tl.store(dl_ptr + row * T + t, tl.where(m, dl, 0.0), mask=ok)
        t0 += BLOCK_T
    base = part_ptr + row * 3
    tl.store(base + 0, tl.sum(acc_l, axis=0))
    tl.store(base + 1, tl.sum(acc_n, axis=0))
    tl.store(base + 2, tl.sum(acc_clip, axis=0))


def _rows_triton(v, old, ret, mask, eps, need_grad):
    """-> (dl [B, T] fp32 or None, partials [B, 3] fp32). One launch."""
    B, T = v.shape
    part = torch.empty((B, 3), dtype=torch.float32, device=v.device)
    dl = torch.empty((B, T), dtype=torch.float32, device=v.device) if need_grad else None
    _value_fwd_kernel[(B,)](
        v, old, ret, mask, dl if dl is not None else part, part,
        T,
        v.stride(0), v.stride(1), old.stride(0), old.stride(1), ret.stride(0), ret.stride(1),
        mask.stride(0), mask.stride(1),
        eps,
        STORE_GRAD=need_grad, BLOCK_T=fwd_block_t(T), num_warps=4,
    )
    return dl, part


def _rows_torch(v, old, ret, mask, eps, need_grad):
    """Same contract as ``_rows_triton`` (vectorised torch, analytic derivative)."""
    f32 = torch.float32
    v, old, ret = v.to(f32), old.to(f32), ret.to(f32)
    m = mask != 0
    diff = v - old
    v_clip = torch.where(diff > eps, old + eps, torch.where(diff < -eps, old - eps, v))   # V_old + clip(V − V_old, ±ε)
    err, err_cl = v - ret, v_clip - ret
    clipped = err_cl * err_cl > err * err
    loss = 0.5 * torch.maximum(err * err, err_cl * err_cl)                  # ℓ = ½ max(...)
    dl = torch.where(clipped, 0.0, err)                                     # ∂ℓ/∂V
    part = torch.stack([torch.where(m, loss, 0.0).sum(1), m.to(f32).sum(1), (m & clipped).to(f32).sum(1)], dim=1)
    return (torch.where(m, dl, 0.0).contiguous() if need_grad else None), part


def ppo_value_loss(values, old_values, returns, mask, *, clip_eps=0.2, agg="token-mean", normalizer=None):
    """Clipped value loss, fused forward + backward.

    Args:
        values: [B, T] V under the current value model (any float dtype, may be non-contiguous); the only input that
            receives a gradient.
        old_values, returns: [B, T] (or broadcastable to it); no gradient.
        mask: [B, T] bool / int / float, nonzero = valid token.
        clip_eps: ε_v ≥ 0.  agg / normalizer: as ``ppo_policy_loss``.
    Returns:
        (loss: 0-d fp32, {"vf_clipfrac": detached 0-d fp32}).
    """
    where = "ppo_value_loss"
    values = agg_mod.main_input("values", values, where)
    old = agg_mod.side_input("old_values", old_values, values, where)
    ret = agg_mod.side_input("returns", returns, values, where)
    m = agg_mod.side_input("mask", mask, values, where, is_mask=True)
    if not (isinstance(clip_eps, (int, float)) and 0.0 <= clip_eps < math.inf):
        raise ValueError(f"{where}: clip_eps must be a finite float >= 0, got {clip_eps!r}")
    eps = float(clip_eps)

    def rows(need_grad: bool, on_triton: bool):
        return (_rows_triton if on_triton else _rows_torch)(values, old, ret, m, eps, need_grad)

    loss, metrics = agg_mod.fused_row_loss(values, rows, agg, normalizer, where)
    return loss, {"vf_clipfrac": metrics[0]}


def ppo_value_loss_ref(values, old_values, returns, mask, *, clip_eps=0.2, agg="token-mean", normalizer=None):
    """Plain eager PyTorch formula (same arguments and returns as ``ppo_value_loss``); autograd gives the reference
    gradient. Computes in float64 for float64 inputs, else in fp32."""
    dt = torch.promote_types(values.dtype, torch.float32)
    v = values.to(dt)
    old = old_values.detach().to(dt)
    ret = returns.detach().to(dt)
    m = (mask != 0).to(dt)
    v_clip = old + (v - old).clamp(-clip_eps, clip_eps)                    # v_clip = V_old + clip(V − V_old, −ε, ε)
    sq = (v - ret) ** 2
    sq_cl = (v_clip - ret) ** 2
    loss = agg_mod.aggregate_ref(0.5 * torch.maximum(sq, sq_cl), m, agg, normalizer)   # ℓ = ½ max(...), aggregated
    # "clipped strictly larger" needs the clip to act (|V − V_old| > ε); without that guard, the 1-ulp rounding of
    # V_old + (V − V_old) would make (v_clip − R)² > (V − R)² on unclipped tokens.
    clipped = (sq_cl > sq) & ((v - old).abs() > clip_eps)
    return loss, {"vf_clipfrac": agg_mod.masked_mean_ref(clipped.to(dt), m).detach()}
