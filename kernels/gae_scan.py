"""Generalized advantage estimation over the valid tokens of each row (math: docs/kernels.md, "GAE over valid tokens").

Notation: B rows, T response tokens; m[b, t] ≠ 0 marks a valid token (padding on either side, or holes). Per row, with
next(t) the next valid position after t (V and A beyond the last valid position are 0):
    δ_t = r_t + γ·V_next(t) − V_t,   A_t = δ_t + γλ·A_next(t),   R_t = A_t + V_t,   A_t = R_t = 0 where m_t = 0.
Outputs are fp32 and detached (GAE targets carry no gradient; there is no autograd).

CUDA: one Triton launch, one program per row walking its row right to left in BLOCK_T tiles aligned to multiples of BLOCK_T.
Each tile is loaded in increasing address order (so the loads vectorise) and reversed in registers (``tl.flip``): scan
index i = 0 is the tile's rightmost position, so a forward ``tl.associative_scan`` runs the right-to-left recurrences
x_t = a_t·x_{t+1} + b_t, plus a carry between tiles; the results are flipped back before the (vectorised) stores. (Not
``associative_scan(reverse=True)``: Triton has had open reports of wrong reverse scans with non-commutative combines.)
Two scans per tile, each combining (apply 1, then 2):
  1. next valid value: with I(t) = V at the first valid position ≥ t, I(t) = (1 − m_t)·I(t+1) + m_t·V_t, and
     V_next(t) = I(t+1). The scan carries the map (S, I) ↦ (I, a·I + b) on the pair (S(t), I(t)) = (I(t+1), I(t)), so
     V_next comes out of the same scan without a load shifted by one: a map of the form (S, I) ↦ (x·I + p, y·I + q) is
     (x, y, p, q); the element t is (1, 1 − m_t, 0, m_t·V_t); applying (x1, y1, p1, q1) then (x2, y2, p2, q2) gives
     (x2·y1, y2·y1, x2·q1 + p2, y2·q1 + q2).
  2. G(t) = A at the first valid position ≥ t: G(t) = m_t·(δ_t + γλ·G(t+1)) + (1 − m_t)·G(t+1), i.e.
     (a, b) = (m_t·γλ + 1 − m_t, m_t·δ_t), combined as (a1, b1) then (a2, b2) = (a1·a2, a2·b1 + b2); A_t = m_t·G(t).
CPU: the C++ op ``_C.gae`` (csrc/gae.cpp) (plain loops in double over numpy buffers).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._backend import use_triton
from ._native import native
from ._utils import check_float, next_power_of_2

MIN_BLOCK_T, MAX_BLOCK_T = 16, 1024  # BLOCK_T = clamp(next_pow2(T), 16, 1024); num_warps from pick_num_warps


def _check_args(rewards, values, mask, gamma, lam) -> None:
    check_float("gae: rewards", rewards)
    check_float("gae: values", values)
    if rewards.dim() != 2:
        raise ValueError(f"gae: rewards must be [B, T], got shape {list(rewards.shape)}")
    if tuple(values.shape) != tuple(rewards.shape):
        raise ValueError(f"gae: values shape {list(values.shape)} != rewards shape {list(rewards.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(rewards.shape):
        raise ValueError(f"gae: mask shape {list(mask.shape)} != rewards shape {list(rewards.shape)}")
    for name, x in (("gamma", gamma), ("lam", lam)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise ValueError(f"gae: {name} must be a finite number, got {x!r}")


def gae_ref(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None, *, gamma: float = 1.0,
            lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: a plain Python loop over T (vectorised over B) in the inputs' dtype (float64 in the tests).

    rewards, values, mask: [B, T] -> (advantages [B, T], returns [B, T]).
    """
    _check_args(rewards, values, mask, gamma, lam)
    m = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask != 0
    B, T = rewards.shape
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    r, v = rewards.to(dtype), values.to(dtype)
    adv = torch.zeros((B, T), dtype=dtype, device=rewards.device)
    v_next = torch.zeros(B, dtype=dtype, device=rewards.device)  # V at next(t), 0 beyond the last valid token
    a_next = torch.zeros(B, dtype=dtype, device=rewards.device)  # A at next(t)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * v_next - v[:, t]  # δ_t = r_t + γ·V_next(t) − V_t
        a = delta + gamma * lam * a_next  # A_t = δ_t + γλ·A_next(t)
        mt = m[:, t]
        adv[:, t] = torch.where(mt, a, torch.zeros_like(a))  # A_t = 0 where m_t = 0
        v_next = torch.where(mt, v[:, t], v_next)  # holes carry the state through
        a_next = torch.where(mt, a, a_next)
    ret = torch.where(m, adv + v, torch.zeros_like(adv))  # R_t = A_t + V_t, 0 where m_t = 0
    return adv, ret


@triton.jit
def _linear_combine(a1, b1, a2, b2):
    # x ↦ a1·x + b1, then x ↦ a2·x + b2:  (a1, b1)∘(a2, b2) = (a1·a2, a2·b1 + b2)
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _shift_combine(x1, y1, p1, q1, x2, y2, p2, q2):
    # (S, I) ↦ (x1·I + p1, y1·I + q1), then (S, I) ↦ (x2·I + p2, y2·I + q2)
    return x2 * y1, y2 * y1, x2 * q1 + p2, y2 * q1 + q2


@triton.jit
def _gae_kernel(
    # data ptrs
    r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr,
    # shapes
    T,
    # strides (rows; the T axis is contiguous)
    stride_r, stride_v, stride_m,
    # constants
    gamma, gamma_lam,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_T)
    last_i = i == BLOCK_T - 1  # in the flipped tile: its leftmost position
    v_carry = tl.full((), 0.0, tl.float32)  # I right of the tile: V at the first valid position ≥ t_lo + BLOCK_T
    g_carry = tl.full((), 0.0, tl.float32)  # G right of the tile: A at the first valid position ≥ t_lo + BLOCK_T
    t_lo = ((T - 1) // BLOCK_T) * BLOCK_T  # the last tile; tiles start at multiples of BLOCK_T
    # (a while loop: Triton's interpreter cannot take a runtime range() bound under numpy >= 2.4)
    while t_lo >= 0:
        p = t_lo + i  # positions of this tile, left to right (loads and stores in address order)
        in_p = p < T
        m_in = tl.where(tl.load(m_ptr + row * stride_m + p, mask=in_p, other=0) != 0, 1.0, 0.0)
        r_in = tl.load(r_ptr + row * stride_r + p, mask=in_p, other=0.0).to(tl.float32)
        v_in = tl.load(v_ptr + row * stride_v + p, mask=in_p, other=0.0).to(tl.float32)
        m = tl.flip(m_in, 0) != 0  # right to left: index 0 is position t_lo + BLOCK_T − 1
        r = tl.flip(r_in, 0)
        v = tl.flip(v_in, 0)
        # 1. (S(t), I(t)) = (I(t+1), (1 − m_t)·I(t+1) + m_t·V_t) from the right: V_next(t) = S(t)
        one = tl.full((BLOCK_T,), 1.0, tl.float32)
        sx, sy, sp, sq = tl.associative_scan((one, tl.where(m, 0.0, 1.0), tl.zeros_like(v), tl.where(m, v, 0.0)), 0,
                                             _shift_combine)
        v_next = sx * v_carry + sp
        delta = r + gamma * v_next - v  # δ_t = r_t + γ·V_next(t) − V_t
        # 2. G(t) = m_t·(δ_t + γλ·G(t+1)) + (1 − m_t)·G(t+1)
        ga, gb = tl.associative_scan((tl.where(m, gamma_lam, 1.0), tl.where(m, delta, 0.0)), 0, _linear_combine)
        g = ga * g_carry + gb
        adv = tl.where(m, g, 0.0)  # A_t = m_t·G(t)
        ret = tl.where(m, g + v, 0.0)  # R_t = A_t + V_t
        tl.store(adv_ptr + row * T + p, tl.flip(adv, 0), mask=in_p)
        tl.store(ret_ptr + row * T + p, tl.flip(ret, 0), mask=in_p)
        # carries for the tile to the left: I and G at this tile's leftmost position t_lo
        v_carry = tl.sum(tl.where(last_i, sy * v_carry + sq, 0.0), axis=0)
        g_carry = tl.sum(tl.where(last_i, g, 0.0), axis=0)
        t_lo -= BLOCK_T


def pick_block_t(T: int) -> int:
    return min(max(next_power_of_2(T), MIN_BLOCK_T), MAX_BLOCK_T)


def pick_num_warps(block_t: int) -> int:
    return 8 if block_t >= 1024 else 4


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """[B, T] with a unit stride along T (the kernel takes the row stride)."""
    return x if x.stride(1) == 1 else x.contiguous()


def gae_triton(rewards, values, mask, gamma: float, lam: float, *, block_t: int | None = None):
    """Launch the Triton kernel (CUDA, or the interpreter). block_t overrides the launcher's choice (tests: multi-tile)."""
    B, T = rewards.shape
    r, v = _rows_contiguous(rewards.detach()), _rows_contiguous(values.detach())
    m = torch.ones((B, T), dtype=torch.uint8, device=r.device) if mask is None else _rows_contiguous(mask)
    if m.dtype == torch.bool:
        m = m.contiguous().view(torch.uint8)  # load bool as bytes
    adv = torch.empty((B, T), dtype=torch.float32, device=r.device)
    ret = torch.empty((B, T), dtype=torch.float32, device=r.device)
    block_t = block_t or pick_block_t(T)
    if B > 0 and T > 0:
        _gae_kernel[(B,)](
            r, v, m, adv, ret, T, r.stride(0), v.stride(0), m.stride(0), float(gamma), float(gamma) * float(lam),
            BLOCK_T=block_t, num_warps=pick_num_warps(block_t),
        )
    return adv, ret


def _gae_cpp(rewards, values, mask, gamma: float, lam: float):
    C = native()
    if C is None:  # kernels lifted out without their C++ build: the PyTorch reference
        return gae_ref(rewards.float(), values.float(), mask, gamma=gamma, lam=lam)
    r = rewards.detach().to(torch.float32).contiguous().numpy()
    v = values.detach().to(torch.float32).contiguous().numpy()
    m = (torch.ones(rewards.shape, dtype=torch.bool) if mask is None else mask != 0).contiguous().numpy()
    adv, ret = C.gae(r, v, m, float(gamma), float(lam))
    return torch.from_numpy(adv), torch.from_numpy(ret)


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns over valid tokens, fp32, detached.

    rewards: [B, T]; values: [B, T] (fp32/bf16/fp16, any strides); mask: [B, T] bool/int/float (None = all valid)
    -> (advantages [B, T], returns [B, T]), both 0 where mask = 0.
    """
    _check_args(rewards, values, mask, gamma, lam)
    if values.device != rewards.device or (mask is not None and mask.device != rewards.device):
        raise ValueError("gae: rewards, values and mask must be on the same device")
    if use_triton(rewards):
        return gae_triton(rewards, values, mask, gamma, lam)
    if rewards.is_cuda:  # backend "torch" on CUDA tensors: the PyTorch reference in fp32
        adv, ret = gae_ref(rewards.float(), values.float(), mask, gamma=gamma, lam=lam)
        return adv, ret
    return _gae_cpp(rewards, values, mask, gamma, lam)
