"""Optimizer and learning-rate schedule shared by the stages: AdamW groups, warmup + cosine, one optimizer step."""
from __future__ import annotations

import math

import torch

from fastrlhf.runtime import distributed


ADAM_BETAS, ADAM_EPS = (0.9, 0.95), 1e-8


def adamw_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The trainable parameters in two groups: matrices decayed, 1-D params (norm gains, biases) not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(model: torch.nn.Module, *, lr: float, weight_decay: float, betas=ADAM_BETAS, eps: float = ADAM_EPS):
    """AdamW with weight decay on matrices only (``adamw_groups``), torch's fused kernel (one pass over each tensor) on
    CPU and CUDA floating-point parameters, else torch's default. Same math as the multi-tensor kernel, other float
    rounding; speed: ``python -m benchmarks.run_kernels --ops adamw`` (benchmarks/RESULTS.md)."""
    groups = adamw_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


def lr_at(step: int, *, total: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine decay to ``min_ratio · peak`` at ``total``.

    lr(s) = peak · (s+1)/warmup                                       for s < warmup
    lr(s) = peak · (r + (1 − r) · ½(1 + cos(π · (s − warmup)/(total − warmup))))   after, r = min_ratio
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def apply_step(model, optimizer, loss: float, *, step: int, total: int, warmup: int, peak_lr: float, min_lr_ratio: float,
               max_grad_norm: float, where: str) -> tuple[float, float, float]:
    """The end of one SFT / reward-model step, after the backward passes: the global loss (mean of the ranks' terms),
    gradient clipping by the global norm (0 = off), a stop on a non-finite loss or norm (the same on every rank,
    before the weights change), the warmup + cosine lr (``lr_at``) and the optimizer step.
    Returns (loss, lr, grad_norm). ``where``: the message prefix of the error (it names the last good checkpoint)."""
    loss = distributed.reduce_metrics({"loss": float(loss)})["loss"]
    gnorm = (float(distributed.local_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)))
             if max_grad_norm > 0 else 0.0)
    if not math.isfinite(loss) or not math.isfinite(gnorm):
        raise FloatingPointError(f"{where}: non-finite loss ({loss}) or grad norm ({gnorm}) at step {step + 1}")
    lr = lr_at(step, total=total, peak=peak_lr, warmup=warmup, min_ratio=min_lr_ratio)
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, lr, gnorm
