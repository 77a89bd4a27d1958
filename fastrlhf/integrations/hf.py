"""Per-token log-probs of a Hugging Face causal LM without materializing its [B, L, V] logits.

    logp = linear_logprobs_forward(model, input_ids, labels, attention_mask=mask, temperature=0.7)

runs the model's body (``model.base_model``: the decoder stack and final norm) for the last hidden states h [B, L, H], then
``fastrlhf.kernels.linear_logprobs`` on the LM head (W [V, H], optional bias) for z = (h Wᵀ + b) / τ: the vocabulary is
streamed in tiles, only the fp32 LSE per token is kept, and the backward recomputes tiles.

Notation: B batch, L sequence length, H hidden size, V vocabulary.
Alignment (``shift=True``, the transformers convention for ``labels``): position t − 1 predicts ``labels[:, t]``, so the
result is [B, L − 1] for ``labels[:, 1:]``. With ``shift=False`` the labels are already aligned ([B, L] -> [B, L]).
Labels < 0 (e.g. −100 on prompt and padding) give logp 0 (and entropy 0) and cost nothing: only valid positions are
projected through the head.
Models whose head is not a plain linear map are refused with a clear error (``final_logit_softcapping``); a scalar logit
multiplier in the config (``logit_scale``, ``logits_scaling``) is folded into the temperature.
"""
from __future__ import annotations

import torch

from fastrlhf.kernels import linear_logprobs


def _logit_multiplier(config) -> float:
    """Scalar c with logits = c · (h Wᵀ + b) for the config's model family (1.0 for plain heads)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        raise NotImplementedError(f"linear_logprobs_forward: {cfg.model_type} applies final_logit_softcapping "
                                  f"({cfg.final_logit_softcapping}); the fused head computes plain linear logits")
    if getattr(cfg, "logit_scale", None) is not None:        # Cohere: logits · logit_scale
        return float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None) is not None:     # Granite: logits / logits_scaling
        return 1.0 / float(cfg.logits_scaling)
    return 1.0


def linear_logprobs_forward(model, input_ids: torch.Tensor, labels: torch.Tensor, *,
                            attention_mask: torch.Tensor | None = None, temperature: float = 1.0,
                            return_entropy: bool = False, shift: bool = True, **model_kwargs):
    """log p(labels) under softmax(model(input_ids).logits / τ), without the logits.

    input_ids: [B, L] int; labels: [B, L] int (< 0 = ignore); attention_mask: [B, L] or None; extra ``model_kwargs`` go to
    the body (e.g. ``position_ids``). Returns fp32 logp [B, L − 1] (``shift``) or [B, L], and the entropy of the same
    shape if ``return_entropy``. Differentiable w.r.t. every parameter of the model.
    """
    if input_ids.dim() != 2 or labels.shape != input_ids.shape:
        raise ValueError(f"linear_logprobs_forward: input_ids {list(input_ids.shape)} and labels {list(labels.shape)} "
                         "must both be [B, L]")
    if not temperature > 0:
        raise ValueError(f"linear_logprobs_forward: temperature must be > 0, got {temperature}")
    body, head = model.base_model, model.get_output_embeddings()
    if body is model or head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"linear_logprobs_forward: {type(model).__name__} is not a causal LM with a separate body "
                        "(model.base_model) and linear LM head (model.get_output_embeddings())")
    c = _logit_multiplier(model.config)
    if not c > 0:
        raise ValueError(f"linear_logprobs_forward: logit multiplier {c} must be > 0")

    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [B, L, H]
    if shift:
        hidden, labels = hidden[:, :-1], labels[:, 1:]  # h_{t−1} predicts y_t
    labels = labels.to(hidden.device)
    valid = labels >= 0  # [B, L'] only these rows go through the head
    weight = head.weight
    bias = getattr(head, "bias", None)
    if not bool(valid.any()):  # nothing to score: zeros that still depend on the body (a zero gradient, not an error)
        zero = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device) + 0.0 * hidden.float().sum()
        return (zero, zero.clone()) if return_entropy else zero
    h = hidden[valid].to(weight.dtype)  # [N, H]; under autocast the head runs in the weight's dtype (fp32 stays fp32)
    # z = c · (h Wᵀ + b) / τ  =  (h Wᵀ + b) / (τ / c)
    res = linear_logprobs(h, weight, labels[valid], bias=bias, temperature=temperature / c,
                          return_entropy=return_entropy)
    parts = res if return_entropy else (res,)
    # scatter back to [B, L']; masked_scatter keeps the graph connected even when no label is valid
    full = tuple(torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device).masked_scatter(valid, p)
                 for p in parts)
    return full if return_entropy else full[0]
