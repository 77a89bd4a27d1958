"""Packed (padding-free) vs padded training forward+backward of the decoder on CPU, and the packed attention strategies.

    python -m benchmarks.run_packed_attention [--iters 5] [--threads 2] [--seed 0] [--fixed]

Tiny benchmark shape (hidden 256, 4 layers, 4 heads / 2 KV heads, vocab 4096), B = 16 rows of a left-padded prompt
(P ≤ 32) and a right-padded response (G ≤ 64), lengths drawn at random (prompt 4..P, response with a long tail: 1..G),
or all full (``--fixed``: no padding, what packing costs when there is nothing to remove).
Arms: "padded" ([B, P+G] with attention_mask), "packed/repad" ([1, N], q/k/v re-padded per sample for SDPA),
"packed/blockdiag" ([1, N], one N×N block-diagonal causal mask). Time = median of ``iters`` forward+backward passes
through the response log-probs (fused head), as one PPO minibatch runs them; the arms take turns.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def make_batch(B: int, P: int, G: int, V: int, gen: torch.Generator, fixed: bool = False):
    """Left-padded prompts (4..P tokens) + right-padded responses (long tail, 1..G); ``fixed``: every prompt P and every
    response G tokens (no padding).  -> ids, attn, resp_ids, resp_mask"""
    p_len = torch.full((B,), P) if fixed else torch.randint(4, P + 1, (B,), generator=gen)
    g_len = torch.full((B,), G) if fixed else (torch.rand(B, generator=gen) ** 2 * G).long().clamp(1, G)  # median ≈ G/4
    ids = torch.randint(4, V, (B, P + G), generator=gen)
    t = torch.arange(P + G)
    attn = ((t[None] >= P - p_len[:, None]) & (t[None] < P + g_len[:, None])).long()
    return ids * attn, attn, (ids * attn)[:, P:], attn[:, P:].float()


def main(argv=None):
    from fastrlhf.models import attention
    from fastrlhf.models.decoder import CausalLM, ModelConfig
    from fastrlhf.stages.ppo_core import ResponseBatch, positions_from_mask

    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fixed", action="store_true", help="no padding: every prompt P, every response G tokens")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    B, P, G = 16, 32, 64
    c = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, attn_impl="sdpa")
    model = CausalLM(c)
    ids, attn, resp, mask = make_batch(B, P, G, c.vocab_size, torch.Generator().manual_seed(a.seed), a.fixed)
    pos = positions_from_mask(attn)
    print(f"B={B} P={P} G={G}: {int(attn.sum())} valid tokens of {attn.numel()} "
          f"(padding {1 - attn.float().mean().item():.1%})")

    def step(padding_free: bool):
        rb = ResponseBatch.build(ids, attn, pos, resp, mask, P, padding_free=padding_free)
        model.zero_grad(set_to_none=True)
        lp = rb.logprobs(model)
        (lp * mask).sum().backward()

    arms = {"padded": (False, "repad"), "packed/repad": (True, "repad"), "packed/blockdiag": (True, "blockdiag")}
    lps = {}
    for name, (pf, strat) in arms.items():  # the arms compute the same log-probs (fp32)
        attention.PACKED_SDPA = strat
        with torch.no_grad():
            lps[name] = ResponseBatch.build(ids, attn, pos, resp, mask, P, padding_free=pf).logprobs(model) * mask
    diff = max(float((lp - lps["padded"]).abs().max()) for lp in lps.values())
    print(f"max |logp(arm) - logp(padded)| over valid tokens: {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit(f"benchmarks/run_packed_attention.py: the arms disagree (max |Δ logp| = {diff:.3g})")
    ts = {name: [] for name in arms}
    for i in range(a.iters + 1):  # round robin, so that a change of machine load hits every arm; pass 0 = warm-up
        for name, (pf, strat) in arms.items():
            attention.PACKED_SDPA = strat
            t0 = time.perf_counter()
            step(pf)
            if i:
                ts[name].append(time.perf_counter() - t0)
    attention.PACKED_SDPA = "repad"
    res = {name: statistics.median(t) for name, t in ts.items()}
    res["max_logp_diff"] = diff
    base = res["padded"]
    for name, t in res.items():
        if name == "max_logp_diff":
            continue
        print(f"{name:18s} {t * 1e3:8.1f} ms  ({base / t:.2f}x vs padded)")
    return res


if __name__ == "__main__":
    main()
