"""Preference evaluation (InstructGPT §4: how often are a policy's outputs preferred over a baseline's?).

``fastrlhf eval --policy A --baseline B --prompts p.jsonl [--reward_model RM | --judge task]`` samples one response per
prompt from each policy (same seeds), scores both with the reward model (or a programmatic judge handed in as a callable,
e.g. the embedded task's labeler, which stands in for the human labelers), and reports the win rate of A over B: (wins + ½ ties) / n, with a 95% normal interval.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fastrlhf.runtime.config import check_ranges, param
from fastrlhf.runtime.device import resolve_device
from fastrlhf.runtime.data import load_prompts, tokenize_prompt
from fastrlhf.engine.hybrid import HybridEngine
from fastrlhf.models.decoder import autocast_context
from fastrlhf.models.hf_io import ModelFolderError, check_model_folder, has_score_head, load_model, load_tokenizer


@dataclass
class EvalConfig:
    """Win rate of one policy over another under a reward model or the embedded judge."""

    policy: str = param("", "checkpoint folder of the policy to evaluate")
    baseline: str = param("", "checkpoint folder of the baseline policy (e.g. the SFT model)")
    prompts: str = param("", "jsonl of {\"prompt\"} or {\"messages\"} rows")
    judge: str = param("rm", "rm (the reward model) | task (the embedded task's programmatic judge)", choices=("rm", "task"))
    reward_model: str = param("", "reward-model checkpoint (judge=rm)")
    max_new_tokens: int = param(32, "response length cap (tokens)", ge=1)
    temperature: float = param(0.0, "sampling temperature (0 = greedy)", ge=0)
    top_p: float = param(1.0, "nucleus sampling (1 = off)", gt=0, le=1)
    batch_size: int = param(64, "prompts per generation batch", ge=1)
    limit: int = param(0, "evaluate on the first N prompts (0 = all)", ge=0)
    seed: int = param(0, "sampling seed")
    device: str = param("auto", "auto | cpu | cuda | cuda:N")


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list, *, max_new_tokens: int, temperature: float = 1.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 64,
                     n_samples: int = 1) -> list[list[str]]:
    """``n_samples`` decoded responses per prompt (text without special tokens) -> [len(prompts)][n_samples].

    Uses the hybrid engine (KV cache; CUDA graphs on CUDA). Prompts are strings or chat messages."""
    ids = [tokenize_prompt(tokenizer, p) for p in prompts]
    engine = HybridEngine(model, memory_policy="free",
                          compute_dtype=torch.bfloat16 if next(model.parameters()).is_cuda else None)
    out: list[list[str]] = [[] for _ in prompts]
    with engine.generation():
        for k in range(n_samples):
            for s in range(0, len(ids), batch_size):
                chunk = ids[s: s + batch_size]
                r = engine.generate(chunk, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                    top_p=top_p, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id, seed=seed * 1000003 + k * 7919 + s)
                for i in range(len(chunk)):
                    n = int(r.lengths[i])
                    out[s + i].append(tokenizer.decode(r.response_ids[i, :n].tolist(), skip_special_tokens=True).strip())
    engine.free()
    return out


@torch.no_grad()
def reward_scores(reward_model, tokenizer, prompts: list, responses: list[str], *, batch_size: int = 64) -> torch.Tensor:
    """Reward-model score of each (prompt, response) at its last token -> [n] fp32."""
    from fastrlhf.runtime.data import pad_right, tokenize_response

    dev = next(reward_model.parameters()).device
    out = []
    for s in range(0, len(prompts), batch_size):
        rows = [tokenize_prompt(tokenizer, p) + tokenize_response(tokenizer, r)
                for p, r in zip(prompts[s: s + batch_size], responses[s: s + batch_size])]
        ids, mask = pad_right(rows, tokenizer.pad_token_id)
        with autocast_context(dev, enabled=dev.type == "cuda"):
            out.append(reward_model.score_last(ids.to(dev), mask.to(dev)).float().cpu())
    return torch.cat(out)


def win_rate(a: list[float], b: list[float]) -> dict:
    """Win rate of a over b: (wins + ½ ties) / n, with a 95% normal-approximation half-width."""
    n = len(a)
    if n == 0 or n != len(b):
        raise ValueError(f"win_rate: need two equal, non-empty score lists (got {len(a)} and {len(b)})")
    wins = sum(x > y for x, y in zip(a, b))
    ties = sum(x == y for x, y in zip(a, b))
    p = (wins + 0.5 * ties) / n
    return {"win_rate": p, "ci95": 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / n), "wins": wins, "ties": ties,
            "losses": n - wins - ties, "n": n, "score_policy": sum(a) / n, "score_baseline": sum(b) / n}


def evaluate(cfg: EvalConfig, judge: Callable[[str, str], float] | None = None) -> dict:
    """Win rate of ``cfg.policy`` over ``cfg.baseline``. judge=task scores each (prompt, response) with ``judge``
    (the caller's programmatic labeler); judge=rm with ``cfg.reward_model``."""
    check_ranges(cfg)
    for name in ("policy", "baseline", "prompts"):
        if not getattr(cfg, name):
            raise ValueError(f"eval: the field '{name}' is required (see fastrlhf eval --help)")
    if cfg.judge == "rm" and not cfg.reward_model:
        raise ValueError("eval: judge=rm needs reward_model (or use --judge task for the embedded task)")
    for name in ("policy", "baseline") + (("reward_model",) if cfg.judge == "rm" else ()):
        check_model_folder(getattr(cfg, name), f"--{name}")
    if cfg.judge == "rm" and not has_score_head(cfg.reward_model):
        raise ModelFolderError(f"{cfg.reward_model}: --reward_model is a causal LM without a trained score head; "
                               f"give a reward model trained with fastrlhf rm (or --judge task)")
    if cfg.judge == "task" and judge is None:
        raise ValueError("eval: judge=task needs a judge callable (the fastrlhf eval command passes the embedded task's)")
    dev = resolve_device(cfg.device)
    examples = load_prompts(cfg.prompts)
    if cfg.limit:
        examples = examples[: cfg.limit]
    prompts = [e.prompt for e in examples]
    texts = {}
    for name in ("policy", "baseline"):
        path = getattr(cfg, name)
        tok = load_tokenizer(path)
        model = load_model(path, head="lm", device=dev)
        texts[name] = [r[0] for r in sample_responses(model, tok, prompts, max_new_tokens=cfg.max_new_tokens,
                                                       temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                                                       batch_size=cfg.batch_size)]
        del model
    if cfg.judge == "task":
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError("eval: judge=task needs plain-text prompts of the embedded task")
        a = [judge(p, r) for p, r in zip(prompts, texts["policy"])]
        b = [judge(p, r) for p, r in zip(prompts, texts["baseline"])]
    else:
        tok = load_tokenizer(cfg.reward_model)
        rm = load_model(cfg.reward_model, head="score", device=dev).eval()
        a = reward_scores(rm, tok, prompts, texts["policy"], batch_size=cfg.batch_size).tolist()
        b = reward_scores(rm, tok, prompts, texts["baseline"], batch_size=cfg.batch_size).tolist()
    result = win_rate(a, b)
    result["examples"] = [{"prompt": p if isinstance(p, str) else p[-1]["content"], "policy": x, "baseline": y}
                          for p, x, y in list(zip(prompts, texts["policy"], texts["baseline"]))[:5]]
    return result
