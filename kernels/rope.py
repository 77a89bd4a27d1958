"""Rotary position embedding of the queries and keys in one launch ("rotate half" layout of Llama / Qwen2 / Mistral).

Notation: N tokens (leading dims flattened: [B, T] padded or [N] packed), Hq / Hkv query / key heads, D head dim (even),
x = (x₁, x₂) the two halves of a head (pair i is (x[i], x[i + D/2])). cos, sin [N, D] hold each token's own rotation
(built from its position p: cos(p · inv_freq) repeated over both halves, times any attention scaling), so packed
sequences whose positions restart per sample need nothing special. Per head, in fp32:
    y₁ = x₁ ⊙ cos₁ − x₂ ⊙ sin₁;    y₂ = x₂ ⊙ cos₂ + x₁ ⊙ sin₂          (y = x ⊙ cos + rotate_half(x) ⊙ sin)
    ∂L/∂x₁ = g₁ ⊙ cos₁ + g₂ ⊙ sin₂;  ∂L/∂x₂ = g₂ ⊙ cos₂ − g₁ ⊙ sin₁
cos / sin get no gradient (they are functions of the positions). Outputs are contiguous, in q's / k's dtype.

Triton: one program per token rotates all Hq query and Hkv key heads of that token ([heads, D/2] tiles); q and k may be
strided views (e.g. slices of a fused QKV projection [N, (Hq + 2·Hkv)·D]); the backward is the same kernel with the
transposed rotation. CPU: ``rope_cpu``, the values of ``rope_ref`` bit for bit (cos / sin cast to x's dtype first, as the
Llama family does) without its cat / neg copies; in training, its transposed rotation is the backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import use_triton
from ._utils import check_float, next_power_of_2


def launch_config(Hq: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D2, num_warps): query heads and half head dim rounded up to powers of two; warps by tile size."""
    bh, bd = next_power_of_2(Hq), next_power_of_2(D // 2)
    return bh, bd, 4 if bh * bd >= 1024 else (2 if bh * bd >= 256 else 1)


def _check_args(q, k, cos, sin) -> None:
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_float(f"rope: {name}", t)
    if q.dim() < 2 or k.dim() != q.dim() or q.shape[-1] != k.shape[-1] or q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"rope: q [..., Hq, D] and k [..., Hkv, D] with the same leading dims expected, got "
                         f"q {list(q.shape)}, k {list(k.shape)}")
    D = q.shape[-1]
    if D % 2:
        raise ValueError(f"rope: head dim D={D} must be even")
    want = (*q.shape[:-2], D)
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != want:
            raise ValueError(f"rope: {name} must be [..., D] = {list(want)} (one row per token), got {list(t.shape)}")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)  # (x₁, x₂) -> (−x₂, x₁)


def _tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return cos.unsqueeze(-2).to(dtype), sin.unsqueeze(-2).to(dtype)  # [..., 1, D]: the same for every head


def rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Plain PyTorch (float64 in the tests; the values of the CPU path). q [..., Hq, D], k [..., Hkv, D], cos / sin
    [..., D] -> (q_rot, k_rot) in q's / k's dtype."""
    def rot(x):
        c, s = _tables(cos, sin, x.dtype)
        return x * c + _rotate_half(x) * s  # y = x ⊙ cos + rotate_half(x) ⊙ sin

    return rot(q), rot(k)


def _rotate_cpu(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """The CPU rotation: x [..., H, D], c / s [..., 1, D] in x's dtype -> y [..., H, D] contiguous.

    Forward: y₁ = x₁ cos₁ − x₂ sin₁, y₂ = x₂ cos₂ + x₁ sin₂; ``backward`` (the transposed rotation, x = the gradient g):
    ∂x₁ = g₁ cos₁ + g₂ sin₂, ∂x₂ = g₂ cos₂ − g₁ sin₁. Three products and two in-place updates of the halves, the same
    roundings as ``rope_ref`` and its autograd (a − b = a + (−b) exactly), without the cat / neg copies."""
    h = x.shape[-1] // 2
    y = x * c  # x ⊙ cos
    y1, y2 = y[..., :h], y[..., h:]  # views: updated in place
    if backward:
        y1.add_(x[..., h:] * s[..., h:])  # ∂x₁ = g₁ cos₁ + g₂ sin₂
        y2.sub_(x[..., :h] * s[..., :h])  # ∂x₂ = g₂ cos₂ − g₁ sin₁
    else:
        y1.sub_(x[..., h:] * s[..., :h])  # y₁ = x₁ cos₁ − x₂ sin₁
        y2.add_(x[..., :h] * s[..., h:])  # y₂ = x₂ cos₂ + x₁ sin₂
    return y


def rope_cpu(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False):
    """The CPU path without autograd: (q_rot, k_rot) = (``_rotate_cpu`` of q, of k), bitwise ``rope_ref``'s values;
    backward=True applies the transposed rotation."""
    cq, sq = _tables(cos, sin, q.dtype)
    ck, sk = (cq, sq) if k.dtype == q.dtype else _tables(cos, sin, k.dtype)
    return _rotate_cpu(q, cq, sq, backward), _rotate_cpu(k, ck, sk, backward)


@triton.jit
def _rotate_heads(x_ptr, y_ptr, stride_h, c1, c2, s1, s2, NH: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_D2: tl.constexpr, BACKWARD: tl.constexpr):
    """The NH heads of one token: x at x_ptr + h·stride_h + d, y contiguous [NH, 2·HALF] at y_ptr."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D2)[None, :]
    ok = (h < NH) & (d < HALF)
    x1 = tl.load(x_ptr + h * stride_h + d, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + h * stride_h + HALF + d, mask=ok, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2  # ∂L/∂x₁ = g₁ cos₁ + g₂ sin₂
        y2 = x2 * c2 - x1 * s1  # ∂L/∂x₂ = g₂ cos₂ − g₁ sin₁
    else:
        y1 = x1 * c1 - x2 * s1  # y₁ = x₁ cos₁ − x₂ sin₁
        y2 = x2 * c2 + x1 * s2  # y₂ = x₂ cos₂ + x₁ sin₂
    out = y_ptr + h * (2 * HALF) + d
    tl.store(out, y1.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(out + HALF, y2.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, stride_qn, stride_qh, stride_kn, stride_kh,
                 stride_cn, stride_sn, HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_D2: tl.constexpr, BACKWARD: tl.constexpr):
    """Token n = program 0: q [N, HQ, D] (strides stride_qn, stride_qh, 1), k likewise, cos / sin [N, D] (row strides
    stride_cn / stride_sn) -> qo [N, HQ, D], ko [N, HKV, D] contiguous. BACKWARD: the transposed rotation (gradients)."""
    n = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D2)[None, :]
    dm = d < HALF
    c1 = tl.load(cos_ptr + n * stride_cn + d, mask=dm, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + n * stride_cn + HALF + d, mask=dm, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + n * stride_sn + d, mask=dm, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + n * stride_sn + HALF + d, mask=dm, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + n * stride_qn, qo_ptr + n * (HQ * 2 * HALF), stride_qh, c1, c2, s1, s2, HQ, HALF,
                  BLOCK_HQ, BLOCK_D2, BACKWARD)
    _rotate_heads(k_ptr + n * stride_kn, ko_ptr + n * (HKV * 2 * HALF), stride_kh, c1, c2, s1, s2, HKV, HALF,
                  BLOCK_HKV, BLOCK_D2, BACKWARD)


def _heads(t: torch.Tensor) -> torch.Tensor:
    """t [..., H, D] as [N, H, D] with a unit-stride last dim (a view when possible, e.g. a slice of a fused QKV)."""
    t3 = t.reshape(-1, *t.shape[-2:])
    return t3 if t3.stride(-1) == 1 else t3.contiguous()


def _table(t: torch.Tensor, n: int) -> torch.Tensor:
    t2 = t.reshape(n, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False):
    """Launch the kernel: (q_rot, k_rot) contiguous in q's / k's shapes; backward=True applies the transposed rotation."""
    q3, k3 = _heads(q), _heads(k)
    n, hq, D = q3.shape
    hkv = k3.shape[1]
    c2, s2 = _table(cos, n), _table(sin, n)
    qo = torch.empty((n, hq, D), dtype=q.dtype, device=q.device)
    ko = torch.empty((n, hkv, D), dtype=k.dtype, device=k.device)
    bh, bd, warps = launch_config(max(hq, hkv), D)
    if n:
        _rope_kernel[(n,)](q3, k3, c2, s2, qo, ko, q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1),
                           c2.stride(0), s2.stride(0), HQ=hq, HKV=hkv, HALF=D // 2, BLOCK_HQ=bh,
                           BLOCK_HKV=next_power_of_2(hkv), BLOCK_D2=bd, BACKWARD=backward, num_warps=warps)
    return qo.view(q.shape), ko.view(k.shape)


class _Rope(torch.autograd.Function):
    """``rotate`` (``rope_triton`` or ``rope_cpu``) forward; the same function's transposed rotation as the backward."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, rotate):
        ctx.save_for_backward(cos, sin)
        ctx.rotate = rotate
        ctx.q_shape, ctx.q_dtype, ctx.k_shape, ctx.k_dtype = q.shape, q.dtype, k.shape, k.dtype
        return rotate(q, k, cos, sin)

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin = ctx.saved_tensors
        gq = torch.zeros(ctx.q_shape, dtype=ctx.q_dtype, device=cos.device) if gq is None else gq
        gk = torch.zeros(ctx.k_shape, dtype=ctx.k_dtype, device=cos.device) if gk is None else gk
        gq, gk = ctx.rotate(gq, gk, cos, sin, backward=True)
        return gq, gk, None, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate queries and keys by their tokens' positions; differentiable w.r.t. q and k.

    q: [..., Hq, D], k: [..., Hkv, D] (same leading dims, e.g. [B, T] or packed [N]; any strides with a unit-stride D);
    cos, sin: [..., D] one row per token. Returns (q_rot [..., Hq, D], k_rot [..., Hkv, D]) in q's / k's dtype.
    CUDA: the Triton kernel (under ``torch.compile``: the PyTorch code); CPU: ``rope_cpu`` (``rope_ref``'s values).
    """
    _check_args(q, k, cos, sin)
    rotate = rope_triton if use_triton(q) and not torch.compiler.is_compiling() else rope_cpu
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad) and not torch.compiler.is_compiling():
        return _Rope.apply(q, k, cos, sin, rotate)  # training: the transposed rotation as the backward
    return rotate(q, k, cos, sin)  # inference (the decode step) or traced by torch.compile: no autograd Function
