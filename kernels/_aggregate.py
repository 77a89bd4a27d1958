"""Aggregation of per-token losses over valid tokens, shared by ``ppo_loss.py`` and ``value_loss.py``.

Notation: B batch (rows), T time, m the [B, T] 0/1 mask, ℓ the per-token loss.
Modes (docs/kernels.md, "Clipped policy loss"):
- ``token-mean``:          L = Σ_bt ℓ m / D,                      D = normalizer or Σ_bt m  (global count under DP)
- ``seq-mean-token-mean``: L = Σ_b [n_b > 0] (Σ_t ℓ m / n_b) / D,  D = normalizer or #{b : n_b > 0}, n_b = Σ_t m_bt
- ``seq-mean-token-sum``:  L = Σ_b Σ_t ℓ m / D,                   D = normalizer or B
Every mode is linear in the per-row sums S_b = Σ_t ℓ_bt m_bt:  L = Σ_b w_b S_b, with one weight per row
(token-mean w_b = 1/D;  seq-mean-token-mean w_b = [n_b > 0] / (n_b D);  seq-mean-token-sum w_b = 1/D), so
∂L/∂ℓ_bt = w_b m_bt and the backward of a fused loss is  grad_bt = g · w_b · (m ∂ℓ/∂x)_bt  (g the upstream scalar).
A zero denominator (all-zero mask) gives L = 0 and w = 0, never NaN.

The fused losses write per-row partials P [B, K] (fp32): column 0 = S_b, 1 = n_b, 2.. = metric numerators (Σ_t over
valid tokens). ``finalize`` turns P into (loss, metrics = column sums 2.. / Σ n_b, w [B]); ``scale_grad`` forms the
gradient.
Both exist as one Triton kernel each (one program for ``finalize``; grid (B, T tiles) for ``scale_grad``) and as a
vectorised torch version for the CPU path.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._backend import interpreting, use_triton

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
AGG_CODE = {name: i for i, name in enumerate(AGG_MODES)}
NORM_NONE, NORM_SCALAR, NORM_TENSOR = 0, 1, 2  # how the normalizer reaches the finalize kernel (constexpr NORM_MODE)


def check_agg(agg: str, where: str) -> int:
    if agg not in AGG_CODE:
        raise ValueError(f"{where}: agg={agg!r}; expected one of {AGG_MODES}")
    return AGG_CODE[agg]


def check_normalizer(normalizer, device: torch.device, where: str):
    """Validate ``normalizer`` (None, a float > 0, or a 1-element tensor). Returns (NORM_MODE, float, tensor|None).

    A tensor is never read on the host (no sync); it is moved to ``device`` as fp32 (a no-op when it already is).
    """
    if normalizer is None:
        return NORM_NONE, 1.0, None
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"{where}: normalizer must be a scalar (0-d) tensor, got shape {list(normalizer.shape)}")
        return NORM_TENSOR, 1.0, normalizer.detach().reshape(()).to(device=device, dtype=torch.float32)
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
        raise TypeError(f"{where}: normalizer must be None, a float or a 0-d tensor, got {type(normalizer).__name__}")
    if not normalizer > 0 or normalizer == float("inf"):
        raise ValueError(f"{where}: normalizer must be a finite number > 0, got {normalizer}")
    return NORM_SCALAR, float(normalizer), None


# ----------------------------------------------------------------------------------------------------------------------
# Reference aggregation (plain eager PyTorch, differentiable, float64-capable): used by the *_ref functions.
# ----------------------------------------------------------------------------------------------------------------------
def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where den > 0, else 0 (no NaN in value or gradient)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def default_denominator(mask: torch.Tensor, agg: str) -> torch.Tensor:
    """The denominator D of ``agg`` when no normalizer is given (mask [B, T] 0/1 -> 0-d, mask's float dtype):
    token-mean Σ m, seq-mean-token-mean #{b : n_b > 0}, seq-mean-token-sum B. Data parallel: Σ of it over the ranks
    is the normalizer that makes N ranks' loss the loss of their union."""
    check_agg(agg, "default_denominator")
    m = mask if mask.is_floating_point() else mask.float()
    if agg == "token-mean":
        return m.sum()                                                    # D = Σ m
    if agg == "seq-mean-token-mean":
        return (m.sum(-1) > 0).to(m.dtype).sum()                          # D = #non-empty rows
    return torch.full((), float(m.shape[0]), dtype=m.dtype, device=m.device)  # D = B


def aggregate_ref(loss_tok: torch.Tensor, mask: torch.Tensor, agg: str, normalizer=None) -> torch.Tensor:
    """Aggregate per-token losses ``loss_tok`` [B, T] over ``mask`` [B, T] (0/1, loss dtype). Returns a 0-d tensor."""
    check_agg(agg, "aggregate_ref")
    den = (default_denominator(mask.to(loss_tok.dtype), agg) if normalizer is None
           else torch.as_tensor(normalizer, dtype=loss_tok.dtype, device=loss_tok.device))  # D (or normalizer)
    row_sum = (loss_tok * mask).sum(-1)                                   # S_b = Σ_t ℓ m            [B]
    if agg == "seq-mean-token-mean":
        n_row = mask.sum(-1)                                              # n_b = Σ_t m              [B]
        nonempty = (n_row > 0).to(loss_tok.dtype)                         # rows with ≥ 1 valid token
        return _safe_div((_safe_div(row_sum, n_row) * nonempty).sum(), den)   # L = Σ_b (S_b / n_b) / D
    return _safe_div(row_sum.sum(), den)                                  # L = Σ ℓ m / D


def masked_mean_ref(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ x m / Σ m over all tokens (0 when Σ m = 0); for metrics."""
    return _safe_div((x * mask).sum(), mask.sum())


# ----------------------------------------------------------------------------------------------------------------------
# Triton: finalize (1 program) and scale_grad (grid (B, cdiv(T, BLOCK_T))).
# ----------------------------------------------------------------------------------------------------------------------
@triton.jit
def _finalize_kernel(
    # data ptrs
    part_ptr, loss_ptr, metrics_ptr, w_ptr, norm_ptr,
    # shapes
    B, n_cols,
    # constants
    norm_value,
    AGG: tl.constexpr, NORM_MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """P [B, n_cols] fp32 -> loss (0-d), metrics [n_cols - 2] (= column sums / Σ n_b), w [B]. One program."""
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < n_cols
    tot = tl.zeros([BLOCK_K], dtype=tl.float32)          # Σ_b P[b, k]
    nonempty = tl.zeros([BLOCK_B], dtype=tl.float32)     # #{b : n_b > 0}, lane-wise
    # pass 1: column totals
    b0 = tl.full([], 0, tl.int32)
    while b0 < B:  # (while: Triton 3.6's interpreter cannot take a runtime bound in range() under numpy 2.4)
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        p = tl.load(part_ptr + rows[:, None] * n_cols + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0)
        tot += tl.sum(p, axis=0)
        n_b = tl.load(part_ptr + rows * n_cols + 1, mask=row_ok, other=0.0)
        nonempty += tl.where(n_b > 0, 1.0, 0.0)
        b0 += BLOCK_B
    n_tok = tl.sum(tl.where(cols == 1, tot, 0.0), axis=0)   # Σ_b n_b = number of valid tokens
    # denominator D of the aggregation (see module docstring)
    if NORM_MODE == 1:
        den = norm_value
    elif NORM_MODE == 2:
        den = tl.load(norm_ptr).to(tl.float32)
    elif AGG == 0:
        den = n_tok                                       # token-mean: D = Σ m
    elif AGG == 1:
        den = tl.sum(nonempty, axis=0)                    # seq-mean-token-mean: D = #non-empty rows
    else:
        den = B * 1.0                                     # seq-mean-token-sum: D = B
    inv_den = tl.where(den > 0, 1.0 / tl.where(den > 0, den, 1.0), 0.0)   # 1/D, 0 when D = 0
    # pass 2: per-row weights w_b and L = Σ_b w_b S_b
    acc = tl.zeros([BLOCK_B], dtype=tl.float32)
    b0 = tl.full([], 0, tl.int32)
    while b0 < B:
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        s_b = tl.load(part_ptr + rows * n_cols, mask=row_ok, other=0.0)
        n_b = tl.load(part_ptr + rows * n_cols + 1, mask=row_ok, other=0.0)
        if AGG == 1:
            w = tl.where(n_b > 0, inv_den / tl.where(n_b > 0, n_b, 1.0), 0.0)   # w_b = [n_b > 0] / (n_b D)
        else:
            w = tl.zeros([BLOCK_B], dtype=tl.float32) + inv_den                 # w_b = 1 / D
        tl.store(w_ptr + rows, w, mask=row_ok)
        acc += w * s_b
        b0 += BLOCK_B
    tl.store(loss_ptr, tl.sum(acc, axis=0))
    # metrics: Σ_b P[b, k] / Σ_b n_b for k ≥ 2 (0 when there is no valid token)
    inv_tok = tl.where(n_tok > 0, 1.0 / tl.where(n_tok > 0, n_tok, 1.0), 0.0)
    tl.store(metrics_ptr + cols - 2, tot * inv_tok, mask=(cols >= 2) & col_ok)


@triton.jit
def _scale_grad_kernel(
    # data ptrs
    dl_ptr, w_ptr, g_ptr, out_ptr,
    # shapes
    T,
    # constants
    BLOCK_T: tl.constexpr,
):
    """out[b, t] = g · w_b · dl[b, t]  (dl [B, T] fp32 contiguous, 0 on masked tokens; out in the input dtype)."""
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = t < T
    scale = tl.load(g_ptr).to(tl.float32) * tl.load(w_ptr + row)          # g · w_b
    d = tl.load(dl_ptr + row * T + t, mask=ok, other=0.0)
    tl.store(out_ptr + row * T + t, (d * scale).to(out_ptr.dtype.element_ty), mask=ok)


def grad_block_t(T: int) -> int:
    """BLOCK_T of ``scale_grad``: 16 under the interpreter (multi-tile on small tests), else 256 (T ≤ 256) or 1024."""
    if interpreting():
        return 16
    return 256 if T <= 256 else 1024


FINALIZE_BLOCK_B = 1024
FINALIZE_BLOCK_K = 8


def finalize_triton(partials: torch.Tensor, agg_code: int, norm_mode: int, norm_value: float, norm_tensor):
    """partials [B, K] fp32 contiguous -> (loss 0-d fp32, metrics [K - 2] fp32, w [B] fp32). One launch, no sync."""
    B, K = partials.shape
    assert K <= FINALIZE_BLOCK_K
    dev = partials.device
    loss = torch.empty((), dtype=torch.float32, device=dev)
    metrics = torch.empty((K - 2,), dtype=torch.float32, device=dev)
    w = torch.empty((B,), dtype=torch.float32, device=dev)
    block_b = 16 if interpreting() else FINALIZE_BLOCK_B
    _finalize_kernel[(1,)](
        partials, loss, metrics, w, norm_tensor if norm_tensor is not None else loss,
        B, K, norm_value,
        AGG=agg_code, NORM_MODE=norm_mode, BLOCK_B=block_b, BLOCK_K=FINALIZE_BLOCK_K, num_warps=4,
    )
    return loss, metrics, w


def scale_grad_triton(dl: torch.Tensor, w: torch.Tensor, g: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """dl [B, T] fp32, w [B], g 0-d -> grad [B, T] in ``out_dtype``. One launch."""
    B, T = dl.shape
    out = torch.empty((B, T), dtype=out_dtype, device=dl.device)
    block_t = grad_block_t(T)
    _scale_grad_kernel[(B, triton.cdiv(T, block_t))](dl, w, g, out, T, BLOCK_T=block_t, num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Torch (CPU path): the same finalize / scale, vectorised.
# ----------------------------------------------------------------------------------------------------------------------
def finalize_torch(partials: torch.Tensor, agg_code: int, norm_mode: int, norm_value: float, norm_tensor):
    """Same contract as ``finalize_triton``."""
    B = partials.shape[0]
    tot = partials.sum(0)                                               # Σ_b P[b, k]
    s_b, n_b = partials[:, 0], partials[:, 1]
    n_tok = tot[1]                                                      # Σ m
    if norm_mode == NORM_SCALAR:
        den = torch.tensor(norm_value, dtype=torch.float32, device=partials.device)
    elif norm_mode == NORM_TENSOR:
        den = norm_tensor.to(torch.float32)
    elif agg_code == 0:
        den = n_tok                                                     # token-mean: D = Σ m
    elif agg_code == 1:
        den = (n_b > 0).sum().to(torch.float32)                         # D = #non-empty rows
    else:
        den = torch.tensor(float(B), dtype=torch.float32, device=partials.device)   # D = B
    one = torch.ones((), dtype=torch.float32, device=partials.device)
    inv_den = torch.where(den > 0, one / torch.where(den > 0, den, one), 0.0)
    if agg_code == 1:
        w = torch.where(n_b > 0, inv_den / torch.where(n_b > 0, n_b, one), 0.0)   # w_b = [n_b > 0] / (n_b D)
    else:
        w = inv_den.expand(B).clone()                                           # w_b = 1 / D
    loss = (w * s_b).sum()                                                      # L = Σ_b w_b S_b
    inv_tok = torch.where(n_tok > 0, one / torch.where(n_tok > 0, n_tok, one), 0.0)
    return loss, tot[2:] * inv_tok, w


def scale_grad_torch(dl: torch.Tensor, w: torch.Tensor, g: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return (dl * (g.to(torch.float32) * w)[:, None]).to(out_dtype)            # grad_bt = g · w_b · dl_bt


# ----------------------------------------------------------------------------------------------------------------------
# Input checks shared by the two losses.
# ----------------------------------------------------------------------------------------------------------------------
def main_input(name: str, x, where: str) -> torch.Tensor:
    """The differentiated input (logprobs / values): a float [B, T] tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{where}: {name} must be [B, T], got shape {list(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"{where}: {name} must be a float tensor (fp32/bf16/fp16/fp64), got {x.dtype}")
    return x


def side_input(name: str, x, like: torch.Tensor, where: str, *, is_mask: bool = False) -> torch.Tensor:
    """A non-differentiated input broadcast (as a strided view, no copy) to ``like``'s [B, T]; detached.

    Float for data; bool / integer / float for a mask (nonzero = valid token). E.g. advantages [B, 1] (per sequence).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device != like.device:
        raise ValueError(f"{where}: {name} is on {x.device} but the main input is on {like.device}")
    if is_mask:
        if x.is_complex():
            raise TypeError(f"{where}: {name} must be bool / integer / float, got {x.dtype}")
    elif x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"{where}: {name} must be a float tensor (fp32/bf16/fp16/fp64), got {x.dtype}")
    if x.shape == like.shape:  # the common case: no broadcast needed (this runs per call; keep it cheap)
        return x.detach()
    try:
        shape = torch.broadcast_shapes(x.shape, like.shape)
    except RuntimeError:
        shape = None
    if shape != like.shape:
        raise ValueError(f"{where}: {name} has shape {list(x.shape)}, not broadcastable to [B, T] = {list(like.shape)}")
    return x.detach().expand(like.shape)


class Aggregation(NamedTuple):
    """How a fused loss reduces its per-row partials: mode code, normalizer (mode, float, tensor) and the backend."""

    agg_code: int
    norm_mode: int
    norm_value: float
    on_triton: bool


class FusedRowLoss(torch.autograd.Function):
    """L = Σ_b w_b S_b from a fused rows pass; the one autograd body of every fused per-token loss.

    ``rows(need_grad)`` runs the loss's rows kernel on its inputs (captured by the caller; they take no gradient) and
    returns (dl [B, T] fp32 = m ∂ℓ/∂x or None, partials [B, K] fp32). Only ``x`` [B, T] receives a gradient:
    grad_bt = g w_b dl_bt, in x's dtype. Returns (loss 0-d fp32, metrics [K − 2] fp32, not differentiable)."""

    @staticmethod
    def forward(ctx, x, norm_tensor, rows, agg: Aggregation):
        need_grad = bool(ctx.needs_input_grad[0])
        dl, part = rows(need_grad)
        fin = finalize_triton if agg.on_triton else finalize_torch
        loss, metrics, w = fin(part, agg.agg_code, agg.norm_mode, agg.norm_value, norm_tensor)
        ctx.mark_non_differentiable(metrics)
        ctx.on_triton, ctx.dtype = agg.on_triton, x.dtype
        if need_grad:
            ctx.save_for_backward(dl, w)
        return loss, metrics

    @staticmethod
    def backward(ctx, g_loss, g_metrics):
        dl, w = ctx.saved_tensors
        scale = scale_grad_triton if ctx.on_triton else scale_grad_torch
        return scale(dl, w, g_loss, ctx.dtype), None, None, None   # grad_bt = g w_b m ∂ℓ/∂x


def fused_row_loss(x: torch.Tensor, rows, agg: str, normalizer, where: str):
    """Check ``agg`` / ``normalizer`` and apply ``FusedRowLoss`` with ``rows(need_grad, on_triton)``."""
    agg_code = check_agg(agg, where)
    norm_mode, norm_value, norm_tensor = check_normalizer(normalizer, x.device, where)
    on_triton = use_triton(x) and x.numel() > 0
    return FusedRowLoss.apply(x, norm_tensor, lambda need_grad: rows(need_grad, on_triton),
                              Aggregation(agg_code, norm_mode, norm_value, on_triton))
