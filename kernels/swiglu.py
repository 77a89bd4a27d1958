"""SwiGLU activation of the decoder MLP: silu(gate) ⊙ up, from the fused gate/up projection or from two tensors.

Notation: N rows (leading dims flattened), F intermediate size, a = gate [N, F], b = up [N, F] (``swiglu(gu)`` takes the
fused projection output gu [N, 2F] = [a | b]). σ the logistic function. Elementwise, in fp32:
    y = silu(a) ⊙ b = a σ(a) ⊙ b
    ∂L/∂a = g ⊙ b ⊙ σ(a) (1 + a (1 − σ(a)));   ∂L/∂b = g ⊙ a σ(a)          (g = ∂L/∂y)
y is in the inputs' dtype (rounded once); the gradients are in the inputs' dtype too (for gu: one [N, 2F] tensor).

Triton: programs over (row, BLOCK columns); gate and up are two pointers with their own row strides, so the two halves
of a fused projection are read in place. CPU: ``swiglu_ref`` (torch's silu, then the product, as the Llama family does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import use_triton
from ._utils import check_float, next_power_of_2

BLOCK_MAX, WARPS = 2048, 8  # columns per program (at most) and warps; F ≤ 1024 uses one tile of next_pow2(F)


def launch_config(F_: int) -> tuple[int, int]:
    """(BLOCK columns per program, num_warps) for intermediate size F."""
    block = min(BLOCK_MAX, next_power_of_2(F_))
    return block, (WARPS if block >= 2048 else 4)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch (float64 in the tests; the CPU path). gate, up [..., F] -> [..., F]; or gate = gu [..., 2F] and
    up None: the two halves of a fused gate/up projection."""
    if up is None:
        gate, up = gate.chunk(2, dim=-1)  # gu = [a | b]
    return F.silu(gate) * up  # y = a σ(a) ⊙ b


@triton.jit
def _swiglu_fwd_kernel(a_ptr, b_ptr, y_ptr, F, stride_a, stride_b, stride_y, BLOCK: tl.constexpr):
    """Row program 0, columns [program 1 · BLOCK, + BLOCK): y = a σ(a) ⊙ b."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < F
    a = tl.load(a_ptr + row * stride_a + cols, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + row * stride_b + cols, mask=ok, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-a))  # σ(a)
    tl.store(y_ptr + row * stride_y + cols, (a * sig * b).to(y_ptr.dtype.element_ty), mask=ok)  # y = a σ(a) b


@triton.jit
def _swiglu_bwd_kernel(a_ptr, b_ptr, g_ptr, da_ptr, db_ptr, F, stride_a, stride_b, stride_g, stride_da, stride_db,
                       BLOCK: tl.constexpr):
    """∂L/∂a = g b σ(a)(1 + a(1 − σ(a))), ∂L/∂b = g a σ(a), for the same tiles as the forward."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < F
    a = tl.load(a_ptr + row * stride_a + cols, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + row * stride_b + cols, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-a))  # σ(a)
    silu = a * sig
    da = g * b * sig * (1.0 + a * (1.0 - sig))  # ∂L/∂a
    db = g * silu  # ∂L/∂b
    tl.store(da_ptr + row * stride_da + cols, da.to(da_ptr.dtype.element_ty), mask=ok)
    tl.store(db_ptr + row * stride_db + cols, db.to(db_ptr.dtype.element_ty), mask=ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., F] as [N, F] with a unit-stride last dim (a view when possible: a half of a fused projection stays one)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def swiglu_fwd_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b [..., F] (any row strides) -> y [..., F] contiguous, in a's dtype."""
    a2, b2 = _rows(a), _rows(b)
    N, F_ = a2.shape
    y = torch.empty((N, F_), dtype=a.dtype, device=a.device)
    block, warps = launch_config(F_)
    if N and F_:
        _swiglu_fwd_kernel[(N, triton.cdiv(F_, block))](a2, b2, y, F_, a2.stride(0), b2.stride(0), y.stride(0),
                                                       BLOCK=block, num_warps=warps)
    return y.view(a.shape)


def swiglu_bwd_triton(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, da: torch.Tensor, db: torch.Tensor) -> None:
    """Write ∂L/∂a into da and ∂L/∂b into db ([..., F] each, e.g. the two halves of one [..., 2F] buffer)."""
    a2, b2, g2 = _rows(a), _rows(b), _rows(g)
    da2, db2 = da.view(-1, da.shape[-1]), db.view(-1, db.shape[-1])  # views: the kernel writes into the caller's
    N, F_ = a2.shape
    block, warps = launch_config(F_)
    if N and F_:
        _swiglu_bwd_kernel[(N, triton.cdiv(F_, block))](a2, b2, g2, da2, db2, F_, a2.stride(0), b2.stride(0),
                                                       g2.stride(0), da2.stride(0), db2.stride(0), BLOCK=block,
                                                       num_warps=warps)


class _SwiGLUFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gu):
        F_ = gu.shape[-1] // 2
        ctx.save_for_backward(gu)
        return swiglu_fwd_triton(gu[..., :F_], gu[..., F_:])

    @staticmethod
    def backward(ctx, g):
        (gu,) = ctx.saved_tensors
        F_ = gu.shape[-1] // 2
        dgu = torch.empty(gu.shape, dtype=gu.dtype, device=gu.device)  # [..., 2F] = [∂L/∂a | ∂L/∂b]
        swiglu_bwd_triton(gu[..., :F_], gu[..., F_:], g, dgu[..., :F_], dgu[..., F_:])
        return dgu


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return swiglu_fwd_triton(a, b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        da = torch.empty(a.shape, dtype=a.dtype, device=a.device)
        db = torch.empty(b.shape, dtype=b.dtype, device=b.device)
        swiglu_bwd_triton(a, b, g, da, db)
        return da, db


class _SwiGLUFusedCpu(torch.autograd.Function):
    """CPU training, fused input: ``swiglu_ref``'s ops, and a backward that writes [∂L/∂a | ∂L/∂b] into one buffer
    (autograd of ``chunk`` would build the halves apart and then copy them together)."""

    @staticmethod
    def forward(ctx, gu):
        a, b = gu.chunk(2, dim=-1)
        s = F.silu(a)  # σ(a)·a
        ctx.save_for_backward(gu, s)
        return s * b

    @staticmethod
    def backward(ctx, g):
        gu, s = ctx.saved_tensors
        F_ = s.shape[-1]
        dgu = torch.empty(gu.shape, dtype=gu.dtype, device=gu.device)
        torch.mul(g, s, out=dgu[..., F_:])  # ∂L/∂b = g ⊙ silu(a)
        # ∂L/∂a = silu'(a) ⊙ (g ⊙ b)
        torch.ops.aten.silu_backward.grad_input(g * gu[..., F_:], gu[..., :F_], grad_input=dgu[..., :F_])
        return dgu


def _check_args(gate, up) -> None:
    check_float("swiglu: gate", gate)
    if up is None:
        if gate.dim() < 1 or gate.shape[-1] % 2:
            raise ValueError(f"swiglu: the fused gate/up input must be [..., 2F], got {list(gate.shape)}")
        return
    check_float("swiglu: up", up)
    if tuple(gate.shape) != tuple(up.shape) or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate and up must have the same shape and dtype, got {list(gate.shape)} "
                         f"{gate.dtype} and {list(up.shape)} {up.dtype}")


def swiglu(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) ⊙ up; differentiable w.r.t. its inputs.

    ``swiglu(gu)``: gu [..., 2F] = [gate | up] (a fused gate/up projection's output) -> [..., F];
    ``swiglu(gate, up)``: gate, up [..., F] (same dtype) -> [..., F]. fp32/bf16/fp16, output in the inputs' dtype.
    CUDA: the Triton kernels (under ``torch.compile``: the PyTorch code); CPU: ``swiglu_ref`` (in training with the fused
    input, its ops with a backward that writes both halves of the gradient into one buffer).
    """
    _check_args(gate, up)
    compiling = torch.compiler.is_compiling()
    train = torch.is_grad_enabled() and (gate.requires_grad or (up is not None and up.requires_grad)) and not compiling
    if use_triton(gate) and not compiling:
        if not train:
            F_ = gate.shape[-1] // 2  # inference (the decode step): no autograd node
            return swiglu_fwd_triton(gate[..., :F_], gate[..., F_:]) if up is None else swiglu_fwd_triton(gate, up)
        if up is None:
            return _SwiGLUFused.apply(gate)
        return _SwiGLU.apply(gate, up)
    if train and up is None:
        return _SwiGLUFusedCpu.apply(gate)
    return swiglu_ref(gate, up)
