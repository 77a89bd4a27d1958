"""Masked whitening of advantages / rewards (math: docs/kernels.md, "Masked whitening").

Notation: x and m of any shape (e.g. [B, T]), N = their number of elements; statistics over the valid elements:
    μ = Σ x m / Σ m,   σ² = Σ (x − μ)² m / (Σ m − 1)  (0 when Σ m < 2),   out = (x − μ) · rsqrt(σ² + eps) · m.
``shift_mean=False`` adds μ back at the valid positions: out = ((x − μ) · rsqrt(σ² + eps) + μ) · m. Masked positions are 0
either way (also when the mask is all 0). Outputs are fp32 and DETACHED: whitening is applied to GAE targets and rewards,
which carry no gradient, so there is no autograd.

Accuracy in fp32 (two passes, never E[x²] − E[x]²): each chunk takes the mean of (x − pivot) with the pivot its first valid
element of the first tile (exact for constant input), then Σ (x − mean)² in a second pass; chunks are merged with Chan et al.'s
formula M2 = Σ M2_i + Σ n_i (mean_i − μ)².
CUDA: one program over everything when N ≤ SMALL_N (three sweeps: mean, M2, write); otherwise two launches: per-chunk
(n, mean, M2) partials, then every program merges the ≤ MAX_PARTIALS partials and writes its chunk.
CPU: the C++ op ``_C.whiten`` (csrc/whiten.cpp) (two passes in double).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._backend import use_triton
from ._native import native
from ._utils import check_float

# At most this many elements: one program (one SM; ~3 sweeps of 2·SMALL_N·4 B). Above it the two launches spread the
# chunks over the SMs: a PPO batch of 64 × 1024 advantages runs as 64 chunks, not on one SM.
SMALL_N = 16384
SMALL_BLOCK, SMALL_WARPS = 4096, 8  # tile and warps of the one-program kernel
BLOCK, WARPS = 1024, 4  # tile and warps of the two-phase kernels
MAX_PARTIALS = 1024  # two-phase: at most this many chunks (the apply kernel loads them all in one tile)


def _check_args(x, mask, eps) -> None:
    check_float("whiten: x", x)
    if mask is not None and tuple(mask.shape) != tuple(x.shape):
        raise ValueError(f"whiten: mask shape {list(mask.shape)} != x shape {list(x.shape)}")
    if mask is not None and mask.device != x.device:
        raise ValueError(f"whiten: x on {x.device} but mask on {mask.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"whiten: eps must be a finite number >= 0, got {eps!r}")


def whiten_ref(x: torch.Tensor, mask: torch.Tensor | None = None, *, shift_mean: bool = True,
               eps: float = 1e-8) -> torch.Tensor:
    """Plain PyTorch reference in x's dtype (float64 in the tests). x, mask: [...] (same shape) -> [...]."""
    _check_args(x, mask, eps)
    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask != 0
    mf = m.to(x.dtype)
    n = mf.sum()
    xz = torch.where(m, x, torch.zeros_like(x))  # padding may hold anything; it never enters the sums
    mean = xz.sum() / n.clamp(min=1)  # μ = Σ x m / Σ m
    var = torch.where(n >= 2, ((xz - mean) ** 2 * mf).sum() / (n - 1).clamp(min=1), torch.zeros_like(n))  # σ²
    out = (xz - mean) * torch.rsqrt(var + eps)  # (x − μ)·rsqrt(σ² + eps)
    if not shift_mean:
        out = out + mean
    return out * mf


@triton.jit
def _chunk_stats(x_ptr, m_ptr, start, end, BLOCK: tl.constexpr):
    """(n, mean, M2) of the valid elements of x[start:end], two passes in fp32 with per-lane accumulators."""
    offs = tl.arange(0, BLOCK)
    # pivot: the first valid element of the first tile (0 if none); means of (x − pivot) are exact for constant input
    idx = start + offs
    ok = idx < end
    m = tl.load(m_ptr + idx, mask=ok, other=0) != 0
    x = tl.load(x_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    first = tl.min(tl.where(m, offs, BLOCK), axis=0)
    pivot = tl.sum(tl.where(offs == first, x, 0.0), axis=0)
    cnt_acc = tl.zeros((BLOCK,), tl.float32)
    sum_acc = tl.zeros((BLOCK,), tl.float32)
    o = start
    while o < end:  # pass 1: Σ m and Σ (x − pivot) m
        idx = o + offs
        ok = idx < end
        m = tl.load(m_ptr + idx, mask=ok, other=0) != 0
        x = tl.load(x_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        cnt_acc += m.to(tl.float32)
        sum_acc += tl.where(m, x - pivot, 0.0)
        o += BLOCK
    cnt = tl.sum(cnt_acc, axis=0)
    mean = pivot + tl.sum(sum_acc, axis=0) / tl.maximum(cnt, 1.0)  # μ = pivot + Σ (x − pivot) m / Σ m
    m2_acc = tl.zeros((BLOCK,), tl.float32)
    o = start
    while o < end:  # pass 2: M2 = Σ (x − μ)² m
        idx = o + offs
        ok = idx < end
        m = tl.load(m_ptr + idx, mask=ok, other=0) != 0
        x = tl.load(x_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        dx = x - mean
        m2_acc += tl.where(m, dx * dx, 0.0)
        o += BLOCK
    return cnt, mean, tl.sum(m2_acc, axis=0)


@triton.jit
def _chunk_apply(x_ptr, m_ptr, out_ptr, start, end, cnt, mean, m2, eps, add_mean, BLOCK: tl.constexpr):
    """out[start:end] = ((x − μ)·rsqrt(σ² + eps) + add_mean·μ)·m."""
    var = tl.where(cnt >= 2.0, m2 / tl.maximum(cnt - 1.0, 1.0), 0.0)  # σ² = M2 / (Σ m − 1), 0 when Σ m < 2
    rstd = tl.rsqrt(var + eps)
    offs = tl.arange(0, BLOCK)
    o = start
    while o < end:
        idx = o + offs
        ok = idx < end
        m = tl.load(m_ptr + idx, mask=ok, other=0) != 0
        x = tl.load(x_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        y = (x - mean) * rstd + add_mean * mean
        tl.store(out_ptr + idx, tl.where(m, y, 0.0), mask=ok)
        o += BLOCK


@triton.jit
def _whiten_small_kernel(x_ptr, m_ptr, out_ptr, N, eps, add_mean, BLOCK: tl.constexpr):
    """One program: statistics of all N elements, then the write."""
    start = tl.program_id(0).to(tl.int64) * 0  # int64 offsets
    cnt, mean, m2 = _chunk_stats(x_ptr, m_ptr, start, start + N, BLOCK)
    _chunk_apply(x_ptr, m_ptr, out_ptr, start, start + N, cnt, mean, m2, eps, add_mean, BLOCK)


@triton.jit
def _whiten_partials_kernel(x_ptr, m_ptr, part_n_ptr, part_mean_ptr, part_m2_ptr, N, CHUNK, BLOCK: tl.constexpr):
    """Phase 1: program p stores (n_p, mean_p, M2_p) of x[p·CHUNK : (p+1)·CHUNK]."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * CHUNK
    end = tl.minimum(start + CHUNK, N)
    cnt, mean, m2 = _chunk_stats(x_ptr, m_ptr, start, end, BLOCK)
    tl.store(part_n_ptr + pid, cnt)
    tl.store(part_mean_ptr + pid, mean)
    tl.store(part_m2_ptr + pid, m2)


@triton.jit
def _whiten_apply_kernel(x_ptr, m_ptr, out_ptr, part_n_ptr, part_mean_ptr, part_m2_ptr, N, CHUNK, P, eps, add_mean,
                         BLOCK: tl.constexpr, P_BLOCK: tl.constexpr):
    """Phase 2: merge the P partials (Chan et al.), then write chunk p."""
    j = tl.arange(0, P_BLOCK)
    ok = j < P
    n_j = tl.load(part_n_ptr + j, mask=ok, other=0.0)
    mean_j = tl.load(part_mean_ptr + j, mask=ok, other=0.0)
    m2_j = tl.load(part_m2_ptr + j, mask=ok, other=0.0)
    cnt = tl.sum(n_j, axis=0)  # Σ m
    pivot = tl.load(part_mean_ptr)  # chunk 0's mean: the merged mean is exact when all chunk means agree
    mean = pivot + tl.sum(n_j * (mean_j - pivot), axis=0) / tl.maximum(cnt, 1.0)  # μ = Σ n_j mean_j / Σ n_j
    dm = mean_j - mean
    m2 = tl.sum(m2_j + n_j * dm * dm, axis=0)  # M2 = Σ M2_j + Σ n_j (mean_j − μ)²
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * CHUNK
    _chunk_apply(x_ptr, m_ptr, out_ptr, start, tl.minimum(start + CHUNK, N), cnt, mean, m2, eps, add_mean, BLOCK)


def whiten_triton(x, mask, shift_mean: bool, eps: float, *, small_n: int = SMALL_N, small_block: int = SMALL_BLOCK,
                  block: int = BLOCK, chunk: int | None = None):
    """Launch the Triton kernels (CUDA or the interpreter). Keyword overrides let tests force the two-phase path."""
    xf = x.detach().contiguous().view(-1)  # [N]
    n = xf.numel()
    if mask is None:
        mf = torch.ones(n, dtype=torch.uint8, device=x.device)
    else:
        mf = mask.contiguous().view(-1)
        if mf.dtype == torch.bool:
            mf = mf.view(torch.uint8)  # load bool as bytes
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    add_mean = 0.0 if shift_mean else 1.0
    if n == 0:
        return out.view(x.shape)
    if n <= small_n:
        _whiten_small_kernel[(1,)](xf, mf, out, n, float(eps), add_mean, BLOCK=small_block, num_warps=SMALL_WARPS)
        return out.view(x.shape)
    if chunk is None:
        chunk = block * triton.cdiv(n, block * MAX_PARTIALS)  # a multiple of the tile, ≤ MAX_PARTIALS chunks
    p = triton.cdiv(n, chunk)
    if p > MAX_PARTIALS:
        raise ValueError(f"whiten: {p} chunks > MAX_PARTIALS={MAX_PARTIALS} (chunk={chunk}, N={n})")
    parts = torch.empty((3, p), dtype=torch.float32, device=x.device)  # (n_p, mean_p, M2_p)
    _whiten_partials_kernel[(p,)](xf, mf, parts[0], parts[1], parts[2], n, chunk, BLOCK=block, num_warps=WARPS)
    _whiten_apply_kernel[(p,)](
        xf, mf, out, parts[0], parts[1], parts[2], n, chunk, p, float(eps), add_mean,
        BLOCK=block, P_BLOCK=MAX_PARTIALS, num_warps=WARPS,
    )
    return out.view(x.shape)


def _whiten_cpp(x, mask, shift_mean: bool, eps: float):
    C = native()
    if C is None:  # kernels lifted out without their C++ build: the PyTorch reference
        return whiten_ref(x.float(), mask, shift_mean=shift_mean, eps=eps)

    xn = x.detach().to(torch.float32).contiguous().numpy()
    mn = (torch.ones(x.shape, dtype=torch.bool) if mask is None else mask != 0).contiguous().numpy()
    return torch.from_numpy(C.whiten(xn, mn, bool(shift_mean), float(eps)))


@torch.no_grad()
def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Masked whitening, fp32, detached (no autograd).

    x: [...] e.g. [B, T] (fp32/bf16/fp16, any strides); mask: same shape, bool/int/float (None = all valid) -> fp32 [...];
    0 at masked positions. shift_mean=False keeps the mean (adds μ back at valid positions).
    """
    _check_args(x, mask, eps)
    if use_triton(x):
        return whiten_triton(x, mask, shift_mean, eps)
    if x.is_cuda:  # backend "torch" on CUDA tensors: the PyTorch reference in fp32
        return whiten_ref(x.float(), mask, shift_mean=shift_mean, eps=eps)
    return _whiten_cpp(x, mask, shift_mean, eps)
