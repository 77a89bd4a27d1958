"""y = x·Wᵀ + b on CPU through oneDNN with W packed once into oneDNN's blocked layout (inference only).

Notation: N rows (any leading shape), K in-features, M out-features, W [M, K].

Why. torch's fp32 ``F.linear`` on CPU calls the BLAS it was built with (MKL in the official wheels). For the skinny GEMMs
of a decode step (N = the batch, a few dozen rows) oneDNN's matmul over a weight reordered once into its blocked
layout reads W faster, and on some x86 CPUs MKL's fp32 path is far from the machine's peak: on the AMD EPYC (AVX-512)
of ``benchmarks/RESULTS.md`` a 32×256 by 256×1536 product takes about half the time of ``F.linear``. The engine packs
every ``nn.Linear`` once per rollout (W changes after every optimizer step, never inside a rollout) and reuses the
packed copies for the prefill and every decode step.

``pack`` / ``linear`` use the ATen ops oneDNN registers (``torch.ops.mkldnn``), the same ones torch.compile's CPU
backend emits for frozen linears. The math is the same product; only the fp32 summation order differs from
``F.linear`` (tests bound both against ``linear_ref`` in float64). ``linear`` has no autograd.

Training (``train_linear``): the same op on the plain weight (oneDNN reorders it inside the call), differentiable:
    y = x·Wᵀ + b  (oneDNN);   dX = dY·W  (oneDNN, on Wᵀ made contiguous);   dW = dYᵀ·X,  db = Σ_rows dY  (torch's BLAS)
On the EPYC of RESULTS.md the forward and dX products of the tiny model's projections (2-3 k rows) take 0.65-0.8× the
time of MKL's, while MKL stays faster for dW (ad hoc, 2 threads); a GRPO update then takes 0.94-0.98× the time
(RESULTS.md). Small products lose: each call reorders the plain weight and sets up its primitive, about 0.1-0.25 ms
at these sizes, so below ``TRAIN_MIN_MACS`` multiply-adds per call (N·K·M) ``F.linear`` is faster (ad hoc: 640×64 by
64×192 took 710 vs 470 µs forward + backward, 1024×256 by 256×512 6.9 vs 7.3 ms, 2176×256 by 256×1536 36 vs 43 ms).
``fastrlhf.models.linear.Linear`` uses it for fp32 CPU weights at or above that size.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def available() -> bool:
    """Whether this torch build has oneDNN with the packed-linear ops (the official x86 and aarch64 CPU wheels do)."""
    ops = getattr(torch.ops, "mkldnn", None)
    return bool(torch.backends.mkldnn.is_available() and ops is not None and hasattr(ops, "_linear_pointwise")
                and hasattr(ops, "_reorder_linear_weight"))


def pack(weight: Tensor, batch_hint: int | None = None) -> Tensor:
    """W [M, K] fp32 on CPU -> W in oneDNN's blocked layout (an opaque ``torch._mkldnn`` tensor, a copy: later changes
    to ``weight`` do not reach it). ``batch_hint``: the number of rows N the layout is tuned for (any N works)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        raise ValueError(f"onednn_linear.pack: expected a 2-D fp32 CPU weight, got {weight.dtype} "
                         f"{list(weight.shape)} on {weight.device}")
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)


def linear(x: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., K] fp32 CPU, ``packed`` from ``pack`` (W [M, K]), bias [M] or None -> x·Wᵀ + b [..., M] fp32.
    Inference only: raises if autograd would need to flow through it."""
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        raise RuntimeError("onednn_linear.linear has no backward: call it under torch.no_grad() (training uses F.linear)")
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"onednn_linear.linear: expected fp32 CPU input, got {x.dtype} on {x.device}")
    return _onednn_mm(x, packed, None if bias is None else bias.detach())


TRAIN_MIN_MACS = 1 << 27  # N·K·M of one call (~134M): smaller products run faster through F.linear (see above)


def _onednn_mm(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """x [..., K] · wᵀ (+ bias) through oneDNN; w [M, K] packed (``pack``) or plain row-major fp32."""
    return torch.ops.mkldnn._linear_pointwise.default(x, w, bias, "none", [], "")  # the overload: no packet lookup


class _TrainLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [N, K]
        ctx.save_for_backward(x2 if weight.requires_grad else None, weight)  # X only for dW (a frozen W needs none)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        y = _onednn_mm(x2, weight.detach(), None if bias is None else bias.detach())  # y = x·Wᵀ + b   [N, M]
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x2, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()  # [N, M]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _onednn_mm(dy2, w.t().contiguous(), None).view(ctx.x_shape)  # dX = dY·W   [N, K]
        if ctx.needs_input_grad[1]:
            dw = dy2.t() @ x2  # dW = dYᵀ·X   [M, K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)  # db = Σ_rows dY   [M]
        return dx, dw, db


def train_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x·Wᵀ + b with oneDNN GEMMs for y and dX (see the module docstring); differentiable once.

    x [..., K] fp32 CPU (K ≥ 1, at least one row), weight [M, K] fp32 CPU, bias [M] or None -> [..., M] fp32."""
    if not (x.dtype == weight.dtype == torch.float32 and x.device.type == weight.device.type == "cpu"):
        raise ValueError(f"onednn_linear.train_linear: expected fp32 CPU tensors, got x {x.dtype} on {x.device}, "
                         f"weight {weight.dtype} on {weight.device}")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1] or x.numel() == 0:
        raise ValueError(f"onednn_linear.train_linear: x {list(x.shape)} and weight {list(weight.shape)} must be "
                         "[..., K] (non-empty) and [M, K]")
    return _TrainLinear.apply(x, weight, bias)


def linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """The reference y = x·Wᵀ + b in x's dtype (tests call it in float64)."""
    y = x @ weight.to(x.dtype).t()
    return y if bias is None else y + bias.to(x.dtype)


def _count_flops() -> None:
    """Make ``torch.utils.flop_counter.FlopCounterMode`` count these GEMMs (2·N·M·K per call), as it counts
    ``aten.mm``, so that FLOP profiles of a run stay complete when the engine decodes through oneDNN."""
    from torch.utils import flop_counter
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or op.default in flop_counter.flop_registry:
        return

    def flops(x_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(out_shape) * x_shape[-1]  # every output element is a K-long dot product

    flop_counter.register_flop_formula(op)(flops)


if available():
    _count_flops()
