"""Losses more than one stage trains with: the language-model loss on packed sequences (SFT, PPO-ptx)."""
from __future__ import annotations

import torch

from fastrlhf import kernels
from fastrlhf.runtime.data import PackedBatch


def packed_lm_loss(model, batch: PackedBatch, normalizer: float | None = None) -> torch.Tensor:
    """Σ −log p(target) over loss-masked tokens of a packed batch / normalizer (default: its masked-token count).

    batch.input_ids [1, T] -> hidden [1, T, H] -> linear_logprobs(hidden, W_lm, targets) [1, T] (fp32, no [T, V] logits).
    """
    hidden = model.hidden_states(batch.input_ids, position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens)
    weight = model.lm_head_weight
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    logp = kernels.linear_logprobs(hidden, weight, batch.targets)  # [1, T] fp32
    n = batch.loss_mask.sum() if normalizer is None else normalizer
    return -(logp * batch.loss_mask).sum() / max(float(n), 1.0)  # token-mean NLL of response tokens
