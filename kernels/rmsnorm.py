"""RMSNorm of the decoder's hidden states, forward and backward in one pass over each row.

Notation: N rows (leading dims flattened), H hidden size, x [N, H], w [H], eps > 0. Per row, in fp32:
    r = rsqrt(mean_j x_j² + eps);   x̂ = x · r;   y = w ⊙ x̂
    ∂L/∂x = r · (g ⊙ w − x̂ · mean_j(g_j w_j x̂_j));   ∂L/∂w = Σ_rows g ⊙ x̂      (g = ∂L/∂y)
y has the dtype torch gives ``w * x`` (fp32 master weights over an fp32 residual stream: fp32; a bf16 model: bf16).

Triton: the forward is one program per row (the whole row in one tile of BLOCK_H = next power of two ≥ H), storing y and
r [N] fp32 for the backward. The backward runs P programs over contiguous row ranges: each writes its rows of ∂L/∂x and
keeps a partial Σ g ⊙ x̂ of its rows in registers, stored to [P, H] fp32 and summed over P by torch.
CPU: torch's own fused ``F.rms_norm`` when x and w are both fp32 (fewer ops; the same values as ``rms_norm_ref`` in the
tests, gradients included), else ``rms_norm_ref`` with torch's autograd (x̂ rounded to x's dtype before the weight, as the
Llama family does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import interpreting, use_triton
from ._utils import check_float, next_power_of_2

# (largest BLOCK_H, num_warps): the forward/backward row tile and its warps (8 fp32 per thread per row: the backward
# holds x, g, w and the ∂L/∂w partial in registers without spilling). H > MAX_H runs the PyTorch path.
WARPS = ((1024, 4), (2048, 8), (4096, 16), (8192, 32))
MAX_H = WARPS[-1][0]
BWD_PROGRAMS_PER_SM = 4  # backward: at most this many programs per SM (each stores a [H] partial of ∂L/∂w)


def launch_config(H: int) -> tuple[int, int]:
    """(BLOCK_H, num_warps) for hidden size H."""
    block = next_power_of_2(H)
    for top, warps in WARPS:
        if block <= top:
            return block, warps
    raise ValueError(f"rms_norm: hidden size {H} > {MAX_H} is not supported by the Triton kernel")


def bwd_programs(N: int, device: torch.device) -> int:
    """Programs of the backward: enough to fill the GPU, few enough that the [P, H] partials stay small."""
    if device.type == "cuda" and not interpreting():
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(N, BWD_PROGRAMS_PER_SM * sms))
    return max(1, min(N, 3))  # interpreter: a few programs, so the partial sums are exercised


def _check_args(x, weight, eps) -> None:
    check_float("rms_norm: x", x)
    check_float("rms_norm: weight", weight)
    if weight.dim() != 1 or x.dim() < 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: x [..., H] and weight [H] expected, got x {list(x.shape)}, "
                         f"weight {list(weight.shape)}")
    if not eps > 0:
        raise ValueError(f"rms_norm: eps must be > 0, got {eps!r}")


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain PyTorch (float64 in the tests; the CPU path). x [..., H], weight [H] -> [..., H] in promote(x, w) dtype."""
    xf = x if x.dtype == torch.float64 else x.float()  # statistics in fp32 at least
    xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # x̂ = x · rsqrt(mean x² + eps)
    return weight * xhat.to(x.dtype)  # y = w ⊙ x̂


@triton.jit
def _rms_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, H, stride_x, stride_y, eps, BLOCK_H: tl.constexpr):
    """x [N, H] (row stride stride_x), w [H] -> y [N, H] (row stride stride_y), rstd [N] fp32; one program per row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    ok = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)  # r = rsqrt(mean x² + eps)
    tl.store(y_ptr + row * stride_y + cols, (w * (x * rstd)).to(y_ptr.dtype.element_ty), mask=ok)  # y = w ⊙ x·r
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_bwd_kernel(x_ptr, w_ptr, rstd_ptr, g_ptr, dx_ptr, dw_part_ptr, N, H, ROWS, stride_x, stride_g, stride_dx,
                    BLOCK_H: tl.constexpr):
    """Rows [pid·ROWS, (pid+1)·ROWS) of dx [N, H]; dw_part[pid] = Σ over those rows of g ⊙ x̂ (fp32 [P, H])."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    ok = cols < H
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_H,), tl.float32)
    row = pid.to(tl.int64) * ROWS
    end = tl.minimum(row + ROWS, N)
    while row < end:
        x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * stride_g + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd  # x̂ = x · r
        gw = g * w
        c = tl.sum(gw * xhat, axis=0) / H  # mean_j(g_j w_j x̂_j)
        dx = rstd * (gw - xhat * c)  # ∂L/∂x = r · (g ⊙ w − x̂ · c)
        tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        dw += g * xhat  # ∂L/∂w += g ⊙ x̂
        row += 1
    tl.store(dw_part_ptr + pid.to(tl.int64) * H + cols, dw, mask=ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., H] as [N, H] with a unit-stride last dim (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def rms_norm_fwd_triton(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """x [..., H], weight [H] -> (y [..., H] in promote(x, w) dtype, rstd [N] fp32)."""
    H = x.shape[-1]
    x2 = _rows(x)
    N = x2.shape[0]
    y = torch.empty((N, H), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    block, warps = launch_config(H)
    if N:
        _rms_fwd_kernel[(N,)](x2, weight.contiguous(), y, rstd, H, x2.stride(0), y.stride(0), float(eps),
                              BLOCK_H=block, num_warps=warps)
    return y.view(x.shape), rstd


def rms_norm_bwd_triton(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, g: torch.Tensor,
                        programs: int | None = None):
    """(dx [..., H] in x's dtype, dw [H] in w's dtype) from the saved x, w, rstd and g = ∂L/∂y [..., H]."""
    H = x.shape[-1]
    x2, g2 = _rows(x), _rows(g)
    N = x2.shape[0]
    dx = torch.empty((N, H), dtype=x.dtype, device=x.device)
    if N == 0:
        return dx.view(x.shape), torch.zeros_like(weight)
    P = programs or bwd_programs(N, x.device)
    rows = triton.cdiv(N, P)
    P = triton.cdiv(N, rows)
    part = torch.empty((P, H), dtype=torch.float32, device=x.device)
    block, warps = launch_config(H)
    _rms_bwd_kernel[(P,)](x2, weight.contiguous(), rstd, g2, dx, part, N, H, rows, x2.stride(0), g2.stride(0),
                          dx.stride(0), BLOCK_H=block, num_warps=warps)
    return dx.view(x.shape), part.sum(0).to(weight.dtype)  # ∂L/∂w = Σ_P partials


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rms_norm_fwd_triton(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd_triton(x, weight, rstd, g)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = w ⊙ x · rsqrt(mean(x²) + eps) over the last dim, statistics in fp32; differentiable w.r.t. x and w.

    x: [..., H] fp32/bf16/fp16; weight: [H] -> [..., H] in promote(x, w) dtype. CUDA: the Triton kernels (under
    ``torch.compile``: the PyTorch code, which the compiler fuses itself; H > MAX_H: the PyTorch code); CPU: torch's
    ``F.rms_norm`` for fp32 x and w, else ``rms_norm_ref``.
    """
    _check_args(x, weight, eps)
    if use_triton(x) and not torch.compiler.is_compiling() and x.shape[-1] <= MAX_H:
        if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            return rms_norm_fwd_triton(x, weight, eps)[0]  # inference (the decode step): no autograd node
        return _RMSNorm.apply(x, weight, float(eps))
    if x.dtype == weight.dtype == torch.float32 and not x.is_cuda:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused op: y = w ⊙ x · rsqrt(mean x² + eps)
    return rms_norm_ref(x, weight, eps)
