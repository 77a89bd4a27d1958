"""Next-token sampling for generation: greedy, temperature, top-k, top-p (nucleus); no host syncs, seedable.

Notation: B batch, V vocabulary. Everything here is a fixed sequence of tensor ops with shapes that do not depend on the
values (no ``.item()``, no data-dependent Python branches), so it runs inside a captured CUDA graph.

Randomness comes in as one uniform number per row (``uniform`` [B] in [0, 1)), drawn by the caller from a seeded
``torch.Generator``; the token is found by inverse-CDF sampling: y = min{ v : CDF(v) > u · CDF(V−1) } (searchsorted).
One number per row (instead of Gumbel noise of shape [B, V]) keeps the random draw negligible and lets the engine draw
all of a rollout's numbers up front, outside the decode loop.

Log-probs are fp32 and taken under the distribution that was sampled from:
- temperature τ > 0: log p(y) = z_y − LSE(z[kept]) with z = logits / τ, over the tokens top-k / top-p keep (all tokens
  without filtering: then it is exactly ``fastrlhf.kernels.logprobs_from_logits(logits, y, temperature=τ)``). It is
  computed from the max and Σexp the sampler already has, instead of a second pass over [B, V] (tests check it against
  the kernel and against a teacher-forced recomputation).
- greedy (τ = 0): y = argmax(logits), log p(y) = log_softmax(logits)_y of the raw logits
  (``fastrlhf.kernels.logprobs_from_logits``)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastrlhf.kernels import logprobs_from_logits


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. Hashable: the engine keys its captured CUDA graphs on it.

    temperature: 0 = greedy (argmax); > 0 divides the logits.
    top_k: keep the k most likely tokens (0 = off).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1.0 = off).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"sampling: temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"sampling: top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"sampling: top_p must be in (0, 1] (1.0 = off), got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filtered(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)


def filter_logits(z: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set the logits of the tokens that top-k / top-p remove to −inf.  z: [B, V] fp32 (already divided by τ).

    top-k keeps z_v ≥ (k-th largest z) (ties at the boundary are kept); top-p (applied after top-k) keeps, in decreasing
    order of probability, token i iff the probability mass strictly before it is < top_p, so the most likely token is
    always kept and the kept set is the smallest one whose mass reaches top_p.
    """
    V = z.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]  # [B, 1]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        z_sorted, order = torch.sort(z, dim=-1, descending=True)  # [B, V]
        p_sorted = torch.softmax(z_sorted, dim=-1)
        mass_before = torch.cumsum(p_sorted, dim=-1) - p_sorted  # Σ_{j<i} p_j
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


def sample(logits: torch.Tensor, params: SamplingParams, uniform: torch.Tensor | None = None):
    """Pick one token per row and its log-prob under the sampling distribution.

    logits: [B, V] (any float dtype); uniform: [B] fp32 in [0, 1) (required unless greedy).
    Returns (tokens [B] int64, logprobs [B] fp32).
    """
    if params.greedy:
        tokens = torch.argmax(logits, dim=-1)  # first index of the maximum (as transformers' greedy search)
        return tokens, logprobs_from_logits(logits, tokens)
    if uniform is None:
        raise ValueError("sample: `uniform` [B] is required when temperature > 0")
    z = logits.float()
    if params.temperature != 1.0:  # z = logits / τ   [B, V] fp32 (τ = 1: exactly the logits, no pass over [B, V])
        z = z / params.temperature
    if params.filtered:
        z = filter_logits(z, params.top_k, params.top_p)
    z_max = z.amax(dim=-1, keepdim=True)  # [B, 1], finite: the most likely token is always kept
    cdf = torch.cumsum(torch.exp(z - z_max), dim=-1)  # unnormalised CDF: Σ_{j≤v} exp(z_j − max z)   [B, V]
    total = cdf[:, -1:]  # Σ_v exp(z_v − max z)   [B, 1]
    # inverse CDF: first v with CDF(v) > u · total; removed tokens add 0 to the CDF and so are never chosen
    tokens = torch.searchsorted(cdf, uniform.reshape(-1, 1).to(cdf.dtype) * total, right=True)
    tokens = tokens.clamp_(max=z.shape[-1] - 1).squeeze(-1)  # u·total rounding up to total would give V
    # log p(y) = z_y − LSE(z[kept]),  LSE = max z + log Σ exp(z − max z): the log_softmax of
    # ``kernels.logprobs_from_logits`` (without filtering), reusing the max and Σexp the sampler already has
    logprobs = z.gather(-1, tokens[:, None]).squeeze(-1) - (z_max + torch.log(total)).squeeze(-1)
    return tokens, logprobs
