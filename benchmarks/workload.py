"""Benchmark workloads: ``fixed`` (every prompt P tokens, every response exactly G) and ``realistic`` (spread prompt
lengths, responses that end at EOS with a long tail), shared by the generation and PPO runners.

Realistic workload (B prompts, prompt budget P, response budget G, vocabulary V, EOS id V−1):
- prompt lengths: uniform integers over [max(1, ⌈P/8⌉), P], drawn from a seeded generator (left-padded to the longest);
- response lengths: every decode step ends the row with probability h = 1 − 0.5^(4/G) (a geometric EOS hazard), so the
  length L (EOS included) has P(L > k) = (1 − h)^k: median G/4, p90 = G·log(10)/(4·log 2) ≈ 0.83·G, and 0.5^4 = 6.25%
  of the rows reach the cap G without EOS.

The hazard lives in the model's weights (``install_eos_hazard``), so every arm — fastrlhf, transformers' ``generate``,
TRL — loads the same checkpoint and samples its EOS at the same rate with its own sampler: the arms see the same length
distribution, not row-for-row identical sequences (their random number streams differ). Each runner prints and
writes the response-length median / p90 and the padding fraction it measured for every arm, so the reader can check
that the arms got comparable work. Construction, for a Qwen2-style model with a tied head (embedding table E [V, H],
final RMSNorm weight g; dimension j = H − 1 is reserved):
- E[v, j] = a for every token v ≠ EOS and E[EOS, j] = 2a, with a = 10·rms over tokens of ‖E[v, :j]‖;
- no layer writes dimension j (row j of every ``o_proj`` and ``down_proj`` weight is zero), so the residual stream
  keeps x_j = a at every position and a dominates the RMSNorm scale: h_j = g_j·a / rms(x) ≈ g_j·√H;
- the logits z_v = h·E[v] share the term a·h_j for every v ≠ EOS, and EOS gets 2a·h_j: EOS sits a·h_j above the
  rest, while the rest are near-uniform (the other components of h are ≈ 10x smaller than at init);
- g_j is set by bisection so that the mean EOS probability over random sequences is h (the gap is a·h_j ≈
  log((V − 1)·h/(1 − h))). Every other weight keeps its random init. Compute per token is unchanged, so the realistic
  workload costs what a real model with these lengths would cost.
"""
from __future__ import annotations

import math

import torch

WORKLOADS = ("fixed", "realistic")


def eos_hazard(G: int) -> float:
    """Per-step EOS probability h = 1 − 0.5^(4/G): median response length G/4, p90 ≈ 0.83·G."""
    return 1.0 - 0.5 ** (4.0 / G)


def prompt_lengths(B: int, P: int, generator: torch.Generator) -> list[int]:
    """B prompt lengths, uniform integers over [max(1, ⌈P/8⌉), P]."""
    lo = max(1, -(-P // 8))
    return torch.randint(lo, P + 1, (B,), generator=generator).tolist()


def make_prompts(B: int, P: int, V: int, workload: str, generator: torch.Generator) -> list[list[int]]:
    """B prompts (token-id lists, ids below V − 2: pad = V − 2 and EOS = V − 1 never appear in a prompt). ``fixed``:
    all of length P; ``realistic``: lengths from ``prompt_lengths``."""
    check_workload(workload)
    ids = torch.randint(0, V - 2, (B, P), generator=generator)
    if workload == "fixed":
        return ids.tolist()
    lens = prompt_lengths(B, P, generator)
    return [ids[i, :n].tolist() for i, n in enumerate(lens)]


def check_workload(workload: str) -> None:
    if workload not in WORKLOADS:
        raise ValueError(f"--workload {workload!r}: expected one of {', '.join(WORKLOADS)}")


@torch.no_grad()
def install_eos_hazard(model, eos_id: int, hazard: float, *, seed: int = 0, n_seq: int = 4, seq_len: int = 64) -> float:
    """Build the EOS hazard into a transformers Qwen2/Llama-style ``*ForCausalLM`` with a tied head, in place (see the
    module docstring). Calibrated on ``n_seq`` random sequences of ``seq_len`` tokens. Returns the calibrated mean EOS
    probability (≈ ``hazard``)."""
    inner = model.model
    E = inner.embed_tokens.weight  # [V, H], also the LM head (tied)
    if model.get_output_embeddings().weight.data_ptr() != E.data_ptr():
        raise ValueError("benchmarks/workload.py: install_eos_hazard needs a tied LM head (tie_word_embeddings=True)")
    V, H = E.shape
    j = H - 1
    a = 10.0 * float(E[:, :j].float().pow(2).sum(-1).mean().sqrt())
    E[:, j] = a
    E[eos_id, j] = 2.0 * a
    for layer in inner.layers:
        layer.self_attn.o_proj.weight[j].zero_()
        layer.mlp.down_proj.weight[j].zero_()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 2, (n_seq, seq_len), generator=g).to(E.device)
    was_training = model.training
    model.eval()
    seen = []  # the final norm's input [n, T, H]: g_j acts only after it, so one forward serves every g_j tried
    hook = inner.norm.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    try:
        model(input_ids=ids)
    finally:
        hook.remove()
    x = seen[-1]

    def p_eos(gj: float) -> float:
        inner.norm.weight[j] = gj
        logits = model.lm_head(inner.norm(x)).float()  # [n, T, V]
        return float(torch.softmax(logits, -1)[..., eos_id].mean())

    lo, hi = math.log(1e-4), math.log(1e3)  # p_eos grows with g_j: bisect on log g_j
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if p_eos(math.exp(mid)) < hazard:
            lo = mid
        else:
            hi = mid
    got = p_eos(math.exp(0.5 * (lo + hi)))
    model.train(was_training)
    return got


def response_lengths(responses: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """responses [B, g] int -> lengths [B] int64: up to and including the first EOS, else g."""
    g = responses.shape[1]
    if eos_id is None or g == 0:
        return torch.full((responses.shape[0],), g, dtype=torch.long)
    is_eos = responses == eos_id
    first = torch.where(is_eos.any(-1), is_eos.long().argmax(-1) + 1, torch.full_like(is_eos[:, 0], g, dtype=torch.long))
    return first.long()


def length_stats(lengths: list[int]) -> dict:
    """{"median": ..., "p90": ...} of response lengths (nearest-rank quantiles)."""
    xs = sorted(int(x) for x in lengths)
    if not xs:
        return {"median": math.nan, "p90": math.nan}
    q = lambda f: float(xs[min(len(xs) - 1, max(0, math.ceil(f * len(xs)) - 1))])  # noqa: E731
    return {"median": q(0.5), "p90": q(0.9)}


def pad_fraction(prompt_lens: list[int], resp_lens: list[int], width: int) -> float:
    """Share of the [B, width] (prompt + response) token grid a padded forward spends on pad tokens:
    1 − (Σ prompt + Σ response tokens) / (B·width)."""
    B = len(prompt_lens)
    return 1.0 - (sum(prompt_lens) + sum(resp_lens)) / (B * width) if B and width else 0.0


def sample_response_lengths(B: int, G: int, generator: torch.Generator) -> list[int]:
    """B response lengths (EOS included) from the realistic workload's hazard h = ``eos_hazard(G)``, capped at G:
    L = ⌈log u / log(1 − h)⌉ for u uniform in (0, 1), so that P(L > k) = (1 − h)^k."""
    h = eos_hazard(G)
    u = torch.rand(B, generator=generator, dtype=torch.float64).clamp_(min=1e-300)
    return torch.ceil(torch.log(u) / math.log1p(-h)).clamp_(1, G).long().tolist()
