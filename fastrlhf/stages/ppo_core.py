"""The algorithmic core of PPO-based RLHF (InstructGPT, Ouyang et al. 2022; Ziegler et al. 2019), free of I/O.

One iteration, as the numbered steps in :func:`make_experience` and :func:`ppo_update`:

    1. sample prompts                       (the caller: ``ppo.train``)
    2. generate with the hybrid engine      (``engine.generate`` -> ``Rollout``)
Steps 2-8 together are :func:`ppo_iteration`, which the PPO stage and the PPO benchmark both run.
    3. score prompt+response with the reward model at the last valid token (missing-EOS penalty optional)
    4. old / reference log-probs and values: one forward each of policy, reference and value model
    5. per-token rewards: r_t = -beta * KL_t (+ score at the last valid token)  -> kernels.kl_penalty, kernels.shape_rewards
    6. GAE -> advantages and returns                                             -> kernels.gae
    7. whitened advantages                                                       -> kernels.whiten
    8. epochs x minibatches: clipped policy loss + clipped value loss (+ PPO-ptx)  -> kernels.ppo_policy_loss / ppo_value_loss

Padding-free (default): the forwards of steps 3-4 and 8 run on the valid tokens only, packed into one row [1, N] with
per-sequence positions and cu_seqlens (:class:`ResponseBatch`); log-probs, values and KL come from the packed hidden
states of the M valid response tokens and land in the [B, G] grid (0 at invalid tokens), so everything after the
forwards is the padded path's math unchanged.

Notation: B rollouts, P prompt length (left-padded), G response length (right-padded), H hidden size, V vocabulary,
N valid tokens of a batch, M valid response tokens.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from fastrlhf import kernels
from fastrlhf.engine.hybrid import distinct_rows
from fastrlhf.kernels.head import head_kl, head_logprobs
from fastrlhf.runtime import distributed

OLD_LOGPROBS = ("recompute", "rollout")
KL_ESTIMATORS = (*kernels.kl.ESTIMATORS, "full")  # the per-token estimators of log-probs, or the exact full-vocabulary KL


@dataclass
class Experience:
    """Everything one PPO update needs, all [B, G] unless noted (G = response length). Detached, fp32."""

    input_ids: torch.Tensor  # [B, P+G] prompt (left-padded) + response (right-padded)
    attention_mask: torch.Tensor  # [B, P+G]
    position_ids: torch.Tensor  # [B, P+G]
    response_ids: torch.Tensor  # [B, G]
    mask: torch.Tensor  # [B, G] fp32, 1 = valid response token
    old_logprobs: torch.Tensor  # [B, G] policy log-probs before the update (the behaviour policy's)
    ref_logprobs: torch.Tensor  # [B, G]
    old_values: torch.Tensor  # [B, G]
    rewards: torch.Tensor  # [B, G] shaped per-token rewards
    advantages: torch.Tensor  # [B, G] whitened
    returns: torch.Tensor  # [B, G]
    scores: torch.Tensor  # [B] reward-model scores (after the missing-EOS penalty)
    kl: torch.Tensor  # [B, G] per-token KL (the configured estimator) used in the reward
    prompt_len: int  # P
    rollout_logprobs: torch.Tensor | None = None  # [B, G] the engine's log-probs of the sampled tokens
    ref_hidden: torch.Tensor | None = None  # [B, G, H] the reference's response hidden states (full-KL loss term)

    def minibatch(self, idx: torch.Tensor) -> "Experience":
        fields = {}
        for name, value in self.__dict__.items():
            fields[name] = value[idx] if torch.is_tensor(value) and value.dim() >= 1 else value
        return Experience(**fields)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left/right padded rows: p_t = (number of valid tokens before t), 0 on padding.  [B, T] -> [B, T]"""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0)


def response_hidden(model, input_ids, attention_mask, position_ids, prompt_len: int) -> torch.Tensor:
    """Hidden states that predict each response token: h[:, P-1:-1].  -> [B, G, H]"""
    hidden = model.hidden_states(input_ids, attention_mask=attention_mask, position_ids=position_ids)  # [B, P+G, H]
    return hidden[:, prompt_len - 1 : -1]


def response_logprobs(model, input_ids, attention_mask, position_ids, response_ids, prompt_len: int, *,
                      temperature: float = 1.0, return_entropy: bool = False, hidden: torch.Tensor | None = None):
    """Log-probs of ``response_ids`` under ``model`` (a CausalLM), without materializing [B, G, V] logits.

    Hidden state at position P-1+t predicts response token t:  h[:, P-1:-1] -> ``head_logprobs`` (the fused
    linear_logprobs kernel in the compute precision, the same head numerics as the engine's sampling).
    hidden: the [B, G, H] response hidden states when already computed. Returns logp [B, G] fp32 (and entropy [B, G]).
    """
    h = hidden if hidden is not None else response_hidden(model, input_ids, attention_mask, position_ids, prompt_len)
    return head_logprobs(h, model.lm_head_weight, response_ids, temperature=temperature, return_entropy=return_entropy)


def full_kl_loss_term(hidden, weight, ref_hidden, ref_weight, mask, agg: str, normalizer, *, temperature: float,
                      batch: "ResponseBatch | None" = None):
    """The exact-KL loss term and its metric: (agg(KL_full), token-mean KL_full detached).

    KL_t = Σ_v p_v (log p_v − log q_v) over the whole vocabulary (``head_kl``) from the policy's response hidden states
    ``hidden`` [B, G, H] (with gradient) and the reference's kept ones ``ref_hidden`` [B, G, HR]; mask [B, G].
    batch: the :class:`ResponseBatch` that gave ``hidden`` (packed: [M, H], the valid tokens only; ``ref_hidden`` stays
    [B, G, HR])."""
    if batch is not None:
        kl_tok = batch.full_kl(hidden, weight, batch.from_grid(ref_hidden), ref_weight, temperature=temperature)
    else:
        kl_tok = head_kl(hidden, weight, ref_hidden, ref_weight, mask=mask, temperature=temperature)  # [B, G] fp32
    return (kernels.aggregate_ref(kl_tok, mask, agg, normalizer),
            kernels.aggregate_ref(kl_tok.detach(), mask, "token-mean"))


def logprob_mismatch(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(mean, max) of |a − b| over valid tokens (one process: this rank's tokens; 0 when there are none)."""
    d = (a.float() - b.float()).abs() * mask
    n = mask.sum()
    return (float(d.sum() / n) if n > 0 else 0.0), float(d.max()) if d.numel() else 0.0


def response_values(value_model, input_ids, attention_mask, position_ids, prompt_len: int) -> torch.Tensor:
    """Per-token values of the states that produce each response token: V[:, P-1:-1].  -> [B, G] fp32"""
    values = value_model(input_ids, attention_mask=attention_mask, position_ids=position_ids)  # [B, P+G]
    return values[:, prompt_len - 1 : -1].float()


def sequence_scores(reward_model, input_ids, attention_mask, position_ids, *, packed: Packed | bool | None = None
                    ) -> torch.Tensor:
    """Reward-model score of each whole sequence at its last valid token.  -> [B] fp32

    packed: a :class:`Packed` of these rows, or True to pack them here: one forward over the valid tokens only."""
    if packed is True:
        packed = pack_rows(input_ids, attention_mask, position_ids)
    if packed:
        return reward_model(packed.input_ids, **packed.kwargs())[0].index_select(0, packed.last).float()
    values = reward_model(input_ids, attention_mask=attention_mask, position_ids=position_ids)  # [B, T]
    last = (attention_mask.long() * torch.arange(attention_mask.shape[1], device=attention_mask.device)).argmax(-1)
    return values.gather(1, last[:, None]).squeeze(1).float()


@dataclass
class Packed:
    """The valid tokens of padded rows [B, T] packed into one row [1, N] (N = Σ valid lengths), samples cut by
    ``cu_seqlens``, each with its own positions (the padded rows' position ids at those tokens), and where each row's
    last token and each valid response token sit in it. Built by :func:`pack_rows`."""

    input_ids: torch.Tensor  # [1, N]
    position_ids: torch.Tensor  # [1, N]
    cu_seqlens: torch.Tensor  # [B+1] int32 cumulative lengths
    last: torch.Tensor  # [B] packed index of each row's last valid token
    shape: tuple[int, int]  # (B, G) of the response grid (G = 0 without responses)
    src: torch.Tensor | None = None  # [M] packed index of the state that predicts each valid response token
    dst: torch.Tensor | None = None  # [M] its index b·G + t in the flattened [B, G] response grid
    labels: torch.Tensor | None = None  # [M] the valid response tokens
    seq_index: torch.Tensor | None = None  # shared prompts: [L] each row's packed tokens in order, cut by cu_seqlens

    def kwargs(self) -> dict:
        """The decoder's packed-forward keyword arguments (input ids separate)."""
        kw = {"position_ids": self.position_ids, "cu_seqlens": self.cu_seqlens}
        if self.seq_index is not None:
            kw["seq_index"] = self.seq_index
        return kw

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Per-response-token values [M, ...] -> [B, G, ...], 0 at invalid tokens (differentiable)."""
        B, G = self.shape
        out = x.new_zeros(B * G, *x.shape[1:]).index_copy(0, self.dst, x)
        return out.view(B, G, *x.shape[1:])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, G, ...] -> the valid response tokens' rows [M, ...]."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.dst)


def pack_rows(input_ids, attention_mask, position_ids, response_mask=None, prompt_len: int = 0, *,
              share_prompts: bool = False) -> Packed:
    """Pack the valid (mask = 1) tokens of [B, T] rows into [1, N]; with ``response_mask`` [B, G] (G = T − P, P =
    ``prompt_len``) also locate the responses: response token t of row b is predicted by the state at row position
    P − 1 + t, which must be a valid token (true for left-padded prompts of ≥ 1 token and prefix response masks).

    share_prompts: rows whose prompts (columns :P, ids and mask) are equal store that prompt once (GRPO's n
    completions of one prompt); see :func:`_pack_shared`. Same results up to float rounding, fewer tokens."""
    B, T = attention_mask.shape
    if share_prompts and response_mask is not None and prompt_len > 0:
        first, group = distinct_rows(input_ids[:, :prompt_len], attention_mask[:, :prompt_len])
        if first is not None:
            return _pack_shared(input_ids, attention_mask, position_ids, response_mask, prompt_len, first, group)
    valid = attention_mask.bool().reshape(-1)  # [B·T]
    index = valid.nonzero().squeeze(1)  # [N] flat positions of the valid tokens
    lens = attention_mask.bool().sum(-1)  # [B]
    cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)  # [B+1]
    pk = Packed(input_ids=input_ids.reshape(-1)[index][None], position_ids=position_ids.reshape(-1)[index][None],
                cu_seqlens=cu, last=cu[1:].long() - 1, shape=(B, 0))
    if response_mask is not None:
        G = response_mask.shape[1]
        rank = (valid.long().cumsum(0) - 1).view(B, T)  # packed index of each valid row position
        b, t = response_mask.bool().nonzero(as_tuple=True)  # [M] each
        pk.shape = (B, G)
        pk.src = rank[b, prompt_len - 1 + t]
        pk.dst = b * G + t
        pk.labels = input_ids[b, prompt_len + t]
    return pk


def _pack_shared(input_ids, attention_mask, position_ids, response_mask, prompt_len: int, first, group) -> Packed:
    """``pack_rows`` with rows of one prompt sharing it: ``first`` [Q] the first row of each prompt, ``group`` [B] the
    prompt of each row (``distinct_rows``).

    Layout [1, N]: for each prompt (in order of its first row), its valid tokens once, then the valid response tokens
    of each of its rows (row order). A prompt token attends only to its prompt (causal), so its states are the same for
    every row of the group; a response token attends to its row's prompt and its own earlier tokens. The decoder sees
    each row as the list ``seq_index`` of its packed tokens (prompt, then response; ``cu_seqlens`` cuts the lists, the
    rows' valid lengths as without sharing): the linear layers run on N = Σ_prompts P_q + Σ_rows G_b tokens instead of
    Σ_rows (P_b + G_b), and only attention sees the prompt once per row. Rows are the samples, in their order, so
    ``last``, ``src``, ``dst`` and ``labels`` mean what they mean unshared."""
    B, T = attention_mask.shape
    P, dev = prompt_len, attention_mask.device
    am = attention_mask.bool()
    rows = torch.arange(B, device=dev)
    lead = first[group]  # [B] the row whose prompt tokens are stored for each row's group
    keep = am.clone()
    keep[:, :P] &= (lead == rows)[:, None]  # a prompt's tokens once, in its first row
    order = torch.sort(lead * B + rows).indices  # [B] rows grouped by prompt (first rows' order), then by row
    kept = keep[order].reshape(-1)  # [B·T] in packed order
    rank = torch.full((B, T), -1, dtype=torch.long, device=dev)
    rank[order] = ((kept.long().cumsum(0) - 1).masked_fill(~kept, -1)).view(B, T)  # packed index at each kept (b, t)
    seq = torch.cat([rank[lead, :P], rank[:, P:]], dim=1)  # [B, T] row b's tokens: its prompt (shared), its response
    index = kept.nonzero().squeeze(1)  # [N] positions in the reordered grid
    flat_rows = order[index // T]
    cols = index % T
    lens = am.sum(-1)  # [B]
    cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)  # [B+1]
    seq_index = seq[am]  # [L] row-major: each row's valid positions in order
    G = response_mask.shape[1]
    b, t = response_mask.bool().nonzero(as_tuple=True)  # [M] each
    return Packed(input_ids=input_ids[flat_rows, cols][None], position_ids=position_ids[flat_rows, cols][None],
                  cu_seqlens=cu, last=seq_index[cu[1:].long() - 1], shape=(B, G), src=seq[b, P - 1 + t],
                  dst=b * G + t, labels=input_ids[b, P + t], seq_index=seq_index)


@dataclass
class ResponseBatch:
    """Rows of prompt (left-padded) + response (right-padded) for the teacher-forced forwards of PPO / GRPO, run either
    padded ([B, P+G] with the attention mask) or padding-free (``packed``: the valid tokens only, [1, N] with
    cu_seqlens). Both give the same [B, G] / [B] results (0 at invalid response tokens when packed); packed, the log-probs,
    values and KL come straight from the packed hidden states of the valid response tokens ([M, H], never re-padded)."""

    input_ids: torch.Tensor  # [B, P+G]
    attention_mask: torch.Tensor  # [B, P+G]
    position_ids: torch.Tensor  # [B, P+G]
    response_ids: torch.Tensor  # [B, G]
    mask: torch.Tensor  # [B, G] 1 = valid response token
    prompt_len: int  # P
    packed: Packed | None = None

    @classmethod
    def build(cls, input_ids, attention_mask, position_ids, response_ids, mask, prompt_len: int, *,
              padding_free: bool = True, share_prompts: bool = False) -> "ResponseBatch":
        """padding_free: pack the valid tokens (``pack_rows``); share_prompts: and store a prompt once for the rows
        that continue it."""
        pk = (pack_rows(input_ids, attention_mask, position_ids, mask, prompt_len, share_prompts=share_prompts)
              if padding_free else None)
        return cls(input_ids, attention_mask, position_ids, response_ids, mask, prompt_len, pk)

    @property
    def _padded(self) -> tuple:
        return self.input_ids, self.attention_mask, self.position_ids

    def hidden(self, model) -> torch.Tensor:
        """States that predict the response tokens: padded [B, G, H], packed [M, H] (valid tokens only)."""
        pk = self.packed
        if pk is None:
            return response_hidden(model, *self._padded, self.prompt_len)
        return model.hidden_states(pk.input_ids, **pk.kwargs())[0].index_select(0, pk.src)  # [N, H] -> [M, H]

    def logprobs(self, model, *, temperature: float = 1.0, return_entropy: bool = False,
                 hidden: torch.Tensor | None = None):
        """log p(response) [B, G] fp32 (and entropy [B, G]) through the fused head; ``hidden`` from :meth:`hidden`."""
        h = hidden if hidden is not None else self.hidden(model)
        if self.packed is None:
            return response_logprobs(model, *self._padded, self.response_ids, self.prompt_len, temperature=temperature,
                                     return_entropy=return_entropy, hidden=h)
        out = head_logprobs(h, model.lm_head_weight, self.packed.labels, temperature=temperature,
                            return_entropy=return_entropy)  # [M] (, [M])
        return tuple(map(self.packed.scatter, out)) if return_entropy else self.packed.scatter(out)

    def values(self, value_model) -> torch.Tensor:
        """Per-token values of the states that produce each response token.  -> [B, G] fp32"""
        pk = self.packed
        if pk is None:
            return response_values(value_model, *self._padded, self.prompt_len)
        return pk.scatter(value_model(pk.input_ids, **pk.kwargs())[0].index_select(0, pk.src).float())

    def scores(self, reward_model) -> torch.Tensor:
        """Score of each whole sequence at its last valid token.  -> [B] fp32"""
        if self.packed is None:
            return sequence_scores(reward_model, *self._padded)
        return sequence_scores(reward_model, *self._padded, packed=self.packed)

    def full_kl(self, hidden, weight, ref_hidden, ref_weight, *, temperature: float = 1.0) -> torch.Tensor:
        """Exact KL(π ‖ π_ref) over the vocabulary per response token (``head_kl``) from :meth:`hidden`-shaped states of
        both models.  -> [B, G] fp32, 0 at invalid tokens"""
        if self.packed is None:
            return head_kl(hidden, weight, ref_hidden, ref_weight, mask=self.mask, temperature=temperature)
        return self.packed.scatter(head_kl(hidden, weight, ref_hidden, ref_weight, temperature=temperature))

    def to_grid(self, hidden: torch.Tensor) -> torch.Tensor:
        """:meth:`hidden`-shaped states -> [B, G, H] (kept in the experience; 0 at invalid tokens when packed)."""
        return hidden if self.packed is None else self.packed.scatter(hidden)

    def from_grid(self, x: torch.Tensor) -> torch.Tensor:
        """[B, G, H] (from :meth:`to_grid`) -> :meth:`hidden`'s shape."""
        return x if self.packed is None else self.packed.gather(x)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


@torch.no_grad()
def make_experience(rollout, *, policy, ref_policy, reward_model, value_model, kl_coef: float, gamma: float,
                    lam: float, temperature: float, eos_token_id: int | None, missing_eos_penalty: float | None,
                    forward_batch_size: int, autocast: Callable[[], contextlib.AbstractContextManager],
                    ref_context: Callable[[], contextlib.AbstractContextManager] | None = None,
                    whiten_advantages: bool = True, old_logprobs: str = "recompute", kl_estimator: str = "k1",
                    keep_ref_hidden: bool = False, padding_free: bool = True) -> Experience:
    """Steps 3-7 for one rollout. ``ref_context`` (e.g. LoRA's adapter-disabled context) wraps the reference forward
    when ``ref_policy`` is the policy itself.

    old_logprobs: "recompute" (a policy forward gives the old log-probs) or "rollout" (the engine's log-probs are the
    behaviour policy's; the forward is skipped unless the full KL needs the policy's hidden states).
    kl_estimator: the reward's per-token KL: "k1" | "k2" | "k3" | "abs" of (old, ref) log-probs, or "full", the exact
    KL over the vocabulary from both models' hidden states and heads (``kernels.linear_kl``).
    keep_ref_hidden: keep the reference's response hidden states in the experience (the full-KL loss term).
    padding_free: run the four forwards on the valid tokens only, packed (:class:`ResponseBatch`); same results.
    """
    if old_logprobs not in OLD_LOGPROBS:
        raise ValueError(f"make_experience: old_logprobs={old_logprobs!r}; expected one of {OLD_LOGPROBS}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"make_experience: kl_estimator={kl_estimator!r}; expected one of {KL_ESTIMATORS}")
    need_hidden = kl_estimator == "full" or keep_ref_hidden
    input_ids, attention_mask = rollout.sequences()  # [B, P+G]
    position_ids = positions_from_mask(attention_mask)
    P = rollout.prompt_ids.shape[1]
    mask = rollout.response_mask.float()  # [B, G]
    B = input_ids.shape[0]
    old_lp, ref_lp, vals, scores, kl_full, ref_h = [], [], [], [], [], []
    for sl in _chunks(B, forward_batch_size):
        rb = ResponseBatch.build(input_ids[sl], attention_mask[sl], position_ids[sl], rollout.response_ids[sl],
                                 rollout.response_mask[sl], P, padding_free=padding_free)
        with autocast():
            # 3. score: reward model at the last valid token of prompt+response
            scores.append(rb.scores(reward_model))
            # 4. old log-probs (a fresh forward, same numerics as the update, unless the rollout's are used),
            #    reference log-probs, values
            h_pol = rb.hidden(policy) if (old_logprobs == "recompute" or need_hidden) else None
            if old_logprobs == "recompute":
                old_lp.append(rb.logprobs(policy, temperature=temperature, hidden=h_pol))
            with (ref_context() if ref_context is not None else contextlib.nullcontext()):
                h_ref = rb.hidden(ref_policy)
                ref_lp.append(rb.logprobs(ref_policy, temperature=temperature, hidden=h_ref))
            if kl_estimator == "full":  # KL(π ‖ π_ref) = Σ_v p_v (log p_v − log q_v) per response token
                kl_full.append(rb.full_kl(h_pol, policy.lm_head_weight, h_ref, ref_policy.lm_head_weight,
                                          temperature=temperature))
            if keep_ref_hidden:
                ref_h.append(rb.to_grid(h_ref.detach()))
            vals.append(rb.values(value_model))
    rollout_lp = rollout.logprobs.float() * mask
    old_logprobs_t = torch.cat(old_lp) * mask if old_logprobs == "recompute" else rollout_lp
    ref_logprobs = torch.cat(ref_lp) * mask
    old_values = torch.cat(vals) * mask
    score = torch.cat(scores)
    if missing_eos_penalty is not None and eos_token_id is not None:
        # InstructGPT-style shaping option: a response that never emitted EOS gets a fixed penalty on its score.
        has_eos = ((rollout.response_ids == eos_token_id) & rollout.response_mask.bool()).any(-1)
        score = torch.where(has_eos, score, score - missing_eos_penalty)
    # 5. per-token rewards: r_t = -beta * KL_t * m_t, score added at the last valid token
    if kl_estimator == "full":
        kl = torch.cat(kl_full) * mask
    else:
        kl = kernels.kl_penalty(old_logprobs_t, ref_logprobs, estimator=kl_estimator) * mask
    rewards = kernels.shape_rewards(score, kl, mask, kl_coef=kl_coef)
    # 6. GAE over valid tokens
    advantages, returns = kernels.gae(rewards, old_values, mask, gamma=gamma, lam=lam)
    # 7. whitened advantages (mean 0, unit variance over valid tokens of all ranks)
    if whiten_advantages:
        advantages = whiten_across_ranks(advantages, mask)
    return Experience(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      response_ids=rollout.response_ids, mask=mask, old_logprobs=old_logprobs_t,
                      ref_logprobs=ref_logprobs, old_values=old_values, rewards=rewards, advantages=advantages,
                      returns=returns, scores=score, kl=kl, prompt_len=P, rollout_logprobs=rollout_lp,
                      ref_hidden=torch.cat(ref_h) if keep_ref_hidden else None)


def whiten_across_ranks(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``kernels.whiten`` with the statistics of every rank's valid tokens (data parallel); one process: the kernel.

    n = Σ m, μ = Σ x m / n, σ² = (Σ x² m − n μ²) / (n − 1) over all ranks (float64 sums, one all-reduce);
    out = (x − μ) · rsqrt(σ² + eps) · m.   x, mask: [B, G] -> [B, G]
    """
    if distributed.world_size() == 1:
        return kernels.whiten(x, mask, shift_mean=True, eps=eps)
    m = mask.to(torch.float64)
    xd = torch.where(mask != 0, x.to(torch.float64), torch.zeros((), dtype=torch.float64, device=x.device))
    sums = distributed.all_reduce_sum(torch.stack([m.sum(), xd.sum(), (xd * xd).sum()]))  # [n, Σx, Σx²] of all ranks
    n, sx, sxx = sums[0], sums[1], sums[2]
    mean = sx / n.clamp(min=1)
    var = torch.where(n >= 2, (sxx - n * mean * mean).clamp(min=0) / (n - 1).clamp(min=1), torch.zeros_like(n))
    return ((xd - mean) * torch.rsqrt(var + eps) * m).to(x.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    n = mask.sum()
    return float((x * mask).sum() / n) if n > 0 else 0.0


def ppo_update(exp: Experience, *, policy, value_model, policy_opt, value_opt, epochs: int, minibatch_size: int,
               clip_eps: float, vf_clip_eps: float, temperature: float, max_grad_norm: float | None,
               autocast: Callable[[], contextlib.AbstractContextManager], generator: torch.Generator | None = None,
               ptx_batches: Iterator | None = None, ptx_coef: float = 0.0, ptx_loss_fn=None,
               agg: str = "token-mean", on_minibatch: Callable[[], None] | None = None, kl_loss_coef: float = 0.0,
               kl_loss_estimator: str = "k3", ref_head_weight: torch.Tensor | None = None,
               padding_free: bool = True) -> dict[str, float]:
    """Step 8: ``epochs`` passes over the experience in shuffled minibatches of ``minibatch_size`` rollouts.

    Policy loss: clipped surrogate; value loss: clipped squared error (both fused kernels). The policy and value
    models have separate optimizers (InstructGPT trains separate policy and value networks).
    PPO-ptx: ``ptx_coef * ptx_loss_fn(policy, batch)`` added to the policy loss for each minibatch.
    KL loss term (GRPO style, ``kl_loss_coef`` > 0): β_loss · agg(KL_t) against the reference, KL_t one of the per-token
    estimators of (logp, ref_logp) inside the fused policy loss, or "full": the exact KL over the vocabulary from the
    policy's hidden states and the reference's kept ones (``exp.ref_hidden``, head ``ref_head_weight``).
    Returned with the means: ``first_forward_mismatch_mean`` / ``_max``, |logp − rollout log-prob| over the first
    minibatch's valid tokens in the first forward (before any optimizer step), when the experience has rollout log-probs.
    padding_free: each minibatch's forwards and backward run on its valid tokens only, packed (same losses and gradients).
    Data parallel (FSDP-sharded models): the token-mean denominator is the minibatch's token count over all ranks
    (``normalizer`` = global count / world, since FSDP averages gradients), and a non-finite loss on any rank stops all.
    """
    B = exp.input_ids.shape[0]
    # detached scalar tensors, averaged and copied to the host once at the end (no sync per statistic per minibatch)
    stats: dict[str, list[torch.Tensor]] = {k: [] for k in ("policy_loss", "value_loss", "clipfrac", "approx_kl",
                                                              "vf_clipfrac", "entropy", "ptx_loss", "grad_norm",
                                                              "kl_loss")}
    first: dict[str, float] = {}
    est_in_loss = kl_loss_estimator if (kl_loss_coef != 0.0 and kl_loss_estimator != "full") else "k3"
    for _epoch in range(epochs):
        perm = torch.randperm(B, generator=generator, device="cpu").to(exp.input_ids.device)
        for sl in _chunks(B, minibatch_size):
            mb = exp.minibatch(perm[sl])
            rb = ResponseBatch.build(mb.input_ids, mb.attention_mask, mb.position_ids, mb.response_ids, mb.mask,
                                     mb.prompt_len, padding_free=padding_free)
            # the denominator of `agg` over all ranks' rollouts of this minibatch / world (one process: the local one)
            norm = distributed.all_reduce_sum(kernels.default_denominator(mb.mask, agg)) / distributed.world_size()
            with autocast():
                h = rb.hidden(policy)
                logp, ent = rb.logprobs(policy, temperature=temperature, return_entropy=True, hidden=h)
                if not first and mb.rollout_logprobs is not None:  # the update's first forward vs the rollout's
                    first["mean"], first["max"] = logprob_mismatch(logp.detach(), mb.rollout_logprobs, mb.mask)
                in_loss = kl_loss_coef != 0.0 and kl_loss_estimator != "full"
                pg_loss, pg_metrics = kernels.ppo_policy_loss(logp, mb.old_logprobs, mb.advantages, mb.mask,
                                                        clip_eps=clip_eps, agg=agg, normalizer=norm,
                                                        ref_logprobs=mb.ref_logprobs if in_loss else None,
                                                        kl_coef=kl_loss_coef if in_loss else 0.0,
                                                        kl_estimator=est_in_loss)
                if in_loss:
                    stats["kl_loss"].append(pg_metrics["kl"])
                if kl_loss_coef != 0.0 and kl_loss_estimator == "full":  # ℓ += β_loss · agg(KL_full)
                    term, kl_mean = full_kl_loss_term(h, policy.lm_head_weight, mb.ref_hidden, ref_head_weight,
                                                      mb.mask, agg, norm, temperature=temperature, batch=rb)
                    pg_loss = pg_loss + kl_loss_coef * term
                    stats["kl_loss"].append(kl_mean)
                loss_pi = pg_loss
                if ptx_batches is not None and ptx_coef > 0:
                    ptx = ptx_loss_fn(policy, next(ptx_batches))
                    loss_pi = loss_pi + ptx_coef * ptx
                    stats["ptx_loss"].append(ptx.detach())
            # separate parameter sets, so one backward per model: the policy's activations are freed before the value
            # model's forward (peak memory holds one model's activations, not both); gradients are the same
            policy_opt.zero_grad(set_to_none=True)
            value_opt.zero_grad(set_to_none=True)
            loss_pi.backward()
            with autocast():
                values = rb.values(value_model)
                vf_loss, vf_metrics = kernels.ppo_value_loss(values, mb.old_values, mb.returns, mb.mask,
                                                       clip_eps=vf_clip_eps, agg=agg, normalizer=norm)
            vf_loss.backward()
            # the one host sync per minibatch, before any optimizer step: a non-finite loss never reaches the weights
            if distributed.any_rank(not bool(torch.isfinite(loss_pi.detach() + vf_loss.detach()))):
                raise FloatingPointError(f"non-finite PPO loss (policy {float(loss_pi):.4g}, value {float(vf_loss):.4g})")
            if max_grad_norm is not None:
                gn = torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], max_grad_norm)
                torch.nn.utils.clip_grad_norm_([p for p in value_model.parameters() if p.requires_grad], max_grad_norm)
                stats["grad_norm"].append(distributed.local_tensor(gn).detach())
            policy_opt.step()
            value_opt.step()
            if on_minibatch is not None:
                on_minibatch()
            stats["policy_loss"].append(pg_loss.detach())
            stats["value_loss"].append(vf_loss.detach())
            stats["clipfrac"].append(pg_metrics["clipfrac"])
            stats["approx_kl"].append(pg_metrics["approx_kl"])
            stats["vf_clipfrac"].append(vf_metrics["vf_clipfrac"])
            stats["entropy"].append((ent.detach().float() * mb.mask).sum() / mb.mask.sum().clamp_min(1))
    out = {k: (float(torch.stack([t.float() for t in v]).mean()) if v else math.nan) for k, v in stats.items()}
    out["first_forward_mismatch_mean"] = first.get("mean", math.nan)
    out["first_forward_mismatch_max"] = first.get("max", math.nan)
    return out


@dataclass
class Iteration:
    """What one :func:`ppo_iteration` produced, and how long each phase took (seconds)."""

    rollout: object        # engine.hybrid.Rollout
    experience: Experience
    stats: dict            # ppo_update's statistics
    time_generate: float   # step 2
    time_experience: float  # steps 3-7
    time_train: float      # step 8


def ppo_iteration(prompts: list[list[int]], *, engine, policy, ref_policy, reward_model, value_model, policy_opt,
                  value_opt, kl_coef: float, sampling: dict, experience: dict, update: dict, rollout_seed: int,
                  generator: torch.Generator, update_seed: int, ref_context=None,
                  sync: Callable[[], None] = lambda: None) -> Iteration:
    """Steps 2-8 of one PPO iteration on this rank's prompts (token id lists), on the engine's (= the policy's) weights.

    sampling: ``engine.generate``'s options (max_new_tokens, temperature, top_k, top_p, eos_token_id, pad_token_id);
    experience / update: the other keyword arguments of :func:`make_experience` / :func:`ppo_update`. The frozen
    forwards of steps 3-7 run in eval mode, the update in train mode. ``sync`` (e.g. ``torch.cuda.synchronize``) runs at
    each phase boundary so that the phase times are the device's. Profiler ranges: ``ppo/2_generation``,
    ``ppo/3-7_experience``, ``ppo/8_training``."""
    t0 = time.perf_counter()
    with torch.profiler.record_function("ppo/2_generation"):
        # 2. generate with the hybrid engine (the optimizer's in-place updates are what it sees)
        with engine.generation(max_batch_size=len(prompts),
                               max_seq_len=max(map(len, prompts)) + sampling["max_new_tokens"]):
            rollout = engine.generate(prompts, seed=rollout_seed, **sampling)
        sync()
    t1 = time.perf_counter()
    with torch.profiler.record_function("ppo/3-7_experience"):
        # 3.-7. score, old/ref log-probs and values, shaped rewards, GAE, whitened advantages
        policy.eval(), value_model.eval()  # deterministic forwards for the "old" quantities (no dropout anyway)
        exp = make_experience(rollout, policy=policy, ref_policy=ref_policy, reward_model=reward_model,
                              value_model=value_model, kl_coef=kl_coef, ref_context=ref_context, **experience)
        policy.train(), value_model.train()
        sync()
    t2 = time.perf_counter()
    with torch.profiler.record_function("ppo/8_training"):
        # 8. PPO epochs over minibatches
        generator.manual_seed(update_seed)
        stats = ppo_update(exp, policy=policy, value_model=value_model, policy_opt=policy_opt, value_opt=value_opt,
                           generator=generator, **update)
        sync()
    t3 = time.perf_counter()
    return Iteration(rollout, exp, stats, t1 - t0, t2 - t1, t3 - t2)
