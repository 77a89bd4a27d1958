"""``fastrlhf generate``: sample responses from a checkpoint for a prompt or a jsonl of prompts (hybrid engine)."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch

from fastrlhf.runtime.config import param


@dataclass
class GenerateConfig:
    """Generate responses from a local HF checkpoint (prompts as text or a jsonl of {"prompt"} / {"messages"})."""

    model: str = param("", "checkpoint folder (HF format, model + tokenizer)")
    prompt: str = param("", "one prompt (text); or use prompts")
    prompts: str = param("", "jsonl of {\"prompt\"} or {\"messages\"} rows")
    output: str = param("", "write {\"prompt\",\"responses\"} rows to this jsonl ('' = print)")
    num_samples: int = param(1, "responses per prompt")
    max_new_tokens: int = param(64, "response length cap (tokens)")
    temperature: float = param(0.0, "sampling temperature (0 = greedy)")
    top_k: int = param(0, "top-k sampling (0 = off)")
    top_p: float = param(1.0, "nucleus sampling (1 = off)")
    batch_size: int = param(32, "prompts per generate call")
    seed: int = param(0, "sampling seed")
    device: str = param("auto", "auto | cpu | cuda | cuda:N")


def run(cfg: GenerateConfig) -> list[dict]:
    from fastrlhf.runtime.data import check_vocab, load_prompts
    from fastrlhf.stages.eval import sample_responses
    from fastrlhf.models.hf_io import load_model, load_tokenizer
    from fastrlhf.runtime.device import resolve_device

    if not cfg.model:
        raise ValueError("generate: the field 'model' is required (see fastrlhf generate --help)")
    if bool(cfg.prompt) == bool(cfg.prompts):
        raise ValueError("generate: give exactly one of 'prompt' (text) or 'prompts' (a jsonl file)")
    prompts = [cfg.prompt] if cfg.prompt else [ex.prompt for ex in load_prompts(cfg.prompts)]
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, head="lm", device=resolve_device(cfg.device),
                       dtype=torch.bfloat16 if resolve_device(cfg.device).type == "cuda" else torch.float32)
    check_vocab(tok, model.config.vocab_size, where=f"{cfg.model}: tokenizer")
    model.eval()
    outs = sample_responses(model, tok, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed, batch_size=cfg.batch_size,
                            n_samples=cfg.num_samples)
    rows = [{"prompt": p, "responses": r} for p, r in zip(prompts, outs)]
    if cfg.output:
        with open(cfg.output, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    else:
        for r in rows:
            for resp in r["responses"]:
                print(f"{r['prompt'] if isinstance(r['prompt'], str) else r['prompt'][-1]['content']}\n  -> {resp}",
                      file=sys.stdout)
    return rows


def main(argv=None) -> list[dict]:
    from fastrlhf.runtime.config import parse_config
    return run(parse_config(GenerateConfig, argv, prog="fastrlhf generate"))
