"""The LM head's numerics, one definition for sampling (the engine) and for training (PPO's old / reference / new
log-probs), so that a rollout's log-probs are the ones the update recomputes.

Notation: N tokens (any leading shape), H hidden size, V vocabulary, W the head weight [V, H].
The operands are cast to the compute dtype (``compute_dtype``): the autocast dtype when autocast is on for W's device
(bf16 over fp32 master weights: bf16 inputs, fp32 accumulation on tensor cores), else W's own dtype. Both
``head_logprobs`` (the fused ``linear_logprobs`` kernel) and ``head_logits`` (full fp32 logits for the sampler) use
those same operands and accumulate in fp32; neither rounds logits to bf16 nor takes the fp32 FMA path under bf16.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .fused_linear_kl import linear_kl
from .fused_linear_logprobs import linear_logprobs


def compute_dtype(weight: Tensor) -> torch.dtype:
    """The dtype the head's operands are cast to: the active autocast dtype on ``weight``'s device, else its dtype."""
    dev = weight.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype


def head_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, temperature: float = 1.0,
                  return_entropy: bool = False):
    """log p(labels) (and entropy) for z = hidden·Wᵀ/τ with the fused kernel (no [N, V] logits), fp32 outputs.

    hidden: [..., H], weight: [V, H], labels: [...] -> logp [...] (, entropy [...]). Differentiable (through the casts
    to the fp32 masters)."""
    dt = compute_dtype(weight)
    return linear_logprobs(hidden.to(dt), weight.to(dt), labels, temperature=temperature,
                             return_entropy=return_entropy)


def head_logits(hidden: Tensor, weight: Tensor) -> Tensor:
    """fp32 logits hidden·Wᵀ from the same compute-dtype operands as ``head_logprobs`` (for sampling).

    hidden: [B, H], weight: [V, H] -> [B, V] fp32. bf16 on CUDA: one GEMM with fp32 output (torch.mm out_dtype);
    elsewhere the bf16 operands are upcast (their products are exact in fp32) and multiplied in fp32."""
    dt = compute_dtype(weight)
    dev = weight.device.type
    with torch.autocast(dev, enabled=False):
        h, w = hidden.to(dt), weight.to(dt)
        if dt == torch.float32:
            return h @ w.t()
        if dev == "cuda":
            return torch.mm(h, w.t(), out_dtype=torch.float32)
        return h.float() @ w.float().t()


def head_kl(hidden: Tensor, weight: Tensor, ref_hidden: Tensor, ref_weight: Tensor, *, mask: Tensor | None = None,
            temperature: float = 1.0) -> Tensor:
    """Exact per-token KL(π ‖ π_ref) over the whole vocabulary (``linear_kl``) with the same operand
    precision as ``head_logprobs``. hidden [..., H], weight [V, H], ref_hidden [..., HR], ref_weight [V, HR],
    mask [...] or None -> [...] fp32; gradient to the policy's hidden and weight only."""
    dt = compute_dtype(weight)
    return linear_kl(hidden.to(dt), weight.to(dt), ref_hidden.detach().to(dt), ref_weight.detach().to(dt),
                       mask=mask, temperature=temperature)
