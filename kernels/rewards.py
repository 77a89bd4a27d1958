"""Reward shaping with the KL penalty in the reward (InstructGPT; math: docs/kernels.md, "Reward shaping").

Notation: B rows, T response tokens. r[b, t] = −β · kl[b, t] · m[b, t], plus scores[b] added at the LAST valid token of row b
(the largest t with m[b, t] ≠ 0, wherever padding sits; rows with no valid token get no score). Output fp32 [B, T].
The map is linear, so autograd is exact: ∂/∂kl = −β·m·g,  ∂/∂scores[b] = g[b, last_b] (0 for an empty row).
CUDA: one Triton program per row (two sweeps over T tiles: find the last valid index, then write). CPU: the PyTorch reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import use_triton
from ._utils import check_float, next_power_of_2

MAX_BLOCK_T = 1024  # the launcher picks BLOCK_T = clamp(next_pow2(T), 16, 1024), num_warps = 4


def _check_args(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor) -> None:
    check_float("shape_rewards: scores", scores)
    check_float("shape_rewards: kl", kl)
    if kl.dim() != 2:
        raise ValueError(f"shape_rewards: kl must be [B, T], got shape {list(kl.shape)}")
    if tuple(scores.shape) != (kl.shape[0],):
        raise ValueError(f"shape_rewards: scores must be [B]={[kl.shape[0]]}, got shape {list(scores.shape)}")
    if mask is None or tuple(mask.shape) != tuple(kl.shape):
        got = None if mask is None else list(mask.shape)
        raise ValueError(f"shape_rewards: mask must be [B, T]={list(kl.shape)}, got {got}")


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, T] -> int64 [B]: the largest t with mask[b, t] ≠ 0, or −1 for a row without valid tokens."""
    t = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask != 0, t, -1).amax(dim=1) if mask.shape[1] > 0 else torch.full(
        (mask.shape[0],), -1, dtype=torch.long, device=mask.device)


def shape_rewards_ref(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, *, kl_coef: float) -> torch.Tensor:
    """Plain PyTorch reference in the inputs' dtype (float64 in the tests); differentiable.

    scores: [B], kl: [B, T], mask: [B, T] (bool/int/float) -> [B, T].
    """
    _check_args(scores, kl, mask)
    m = (mask != 0).to(kl.dtype)
    last = last_valid_index(mask)  # [B]
    at_last = (torch.arange(kl.shape[1], device=kl.device) == last[:, None]).to(kl.dtype)  # one-hot [B, T]; none if −1
    return -float(kl_coef) * kl * m + scores[:, None].to(kl.dtype) * at_last  # r = −β·kl·m + s·1[t = last]


@triton.jit
def _shape_rewards_kernel(
    # data ptrs
    scores_ptr, kl_ptr, mask_ptr, out_ptr, last_ptr,
    # shapes
    T,
    # strides
    stride_kl_b, stride_mask_b,
    # constants
    kl_coef,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_T)
    # sweep 1: last = max{t : m[t] ≠ 0} (−1 if none)
    # (while loops, not range(0, T, ...): Triton's interpreter cannot take a runtime range bound under numpy >= 2.4)
    last = tl.full((), -1, tl.int32)
    t0 = 0
    while t0 < T:
        t = t0 + cols
        m = tl.load(mask_ptr + row * stride_mask_b + t, mask=t < T, other=0)
        last = tl.maximum(last, tl.max(tl.where(m != 0, t, -1), axis=0))
        t0 += BLOCK_T
    tl.store(last_ptr + row, last)
    score = tl.load(scores_ptr + row).to(tl.float32)
    # sweep 2: r[t] = −β·kl[t]·m[t] + score·1[t = last]
    t0 = 0
    while t0 < T:
        t = t0 + cols
        inb = t < T
        m = tl.load(mask_ptr + row * stride_mask_b + t, mask=inb, other=0)
        k = tl.load(kl_ptr + row * stride_kl_b + t, mask=inb, other=0.0).to(tl.float32)
        r = tl.where(m != 0, -kl_coef * k, 0.0) + tl.where(t == last, score, 0.0)
        tl.store(out_ptr + row * T + t, r, mask=inb)
        t0 += BLOCK_T


def pick_block_t(T: int) -> int:
    return min(max(next_power_of_2(T), 16), MAX_BLOCK_T)


def _mask_for_kernel(mask: torch.Tensor) -> torch.Tensor:
    """Row-contiguous mask the kernel can load: bool is reinterpreted as uint8 (no copy), other dtypes load as they are."""
    mask = mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


class _ShapeRewards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, kl, mask, kl_coef):
        B, T = kl.shape
        kl_c = kl.detach().contiguous()  # [B, T]
        m = _mask_for_kernel(mask)  # [B, T]
        out = torch.empty((B, T), dtype=torch.float32, device=kl.device)
        last = torch.empty((B,), dtype=torch.int32, device=kl.device)
        if B > 0:
            _shape_rewards_kernel[(B,)](
                scores.detach().contiguous(), kl_c, m, out, last, T, kl_c.stride(0), m.stride(0), float(kl_coef),
                BLOCK_T=pick_block_t(T), num_warps=4,
            )
        ctx.save_for_backward(mask, last)
        ctx.kl_coef, ctx.dtypes = float(kl_coef), (scores.dtype, kl.dtype)
        return out

    @staticmethod
    def backward(ctx, g):
        mask, last = ctx.saved_tensors
        g = g.float()
        m = (mask != 0).to(torch.float32)
        grad_kl = (-ctx.kl_coef * g * m).to(ctx.dtypes[1])  # ∂r/∂kl = −β·m
        has = last >= 0
        picked = g.gather(1, last.clamp(min=0).long()[:, None])[:, 0]  # g[b, last_b]
        grad_scores = torch.where(has, picked, torch.zeros_like(picked)).to(ctx.dtypes[0])  # ∂r/∂s_b = 1[t = last_b]
        return grad_scores, grad_kl, None, None


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, *, kl_coef: float) -> torch.Tensor:
    """KL-shaped per-token rewards, fp32, differentiable w.r.t. scores and kl.

    scores: [B] sequence scores; kl: [B, T] per-token KL; mask: [B, T] (bool/int/float, padding on either side or holes)
    -> rewards fp32 [B, T] = −kl_coef·kl·m, plus scores[b] at the last valid token of row b.
    """
    _check_args(scores, kl, mask)
    if use_triton(kl):
        return _ShapeRewards.apply(scores, kl, mask, kl_coef)
    return shape_rewards_ref(scores.float(), kl.float(), mask, kl_coef=kl_coef)
