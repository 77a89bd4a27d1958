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
    num_samples: int = param(1, "responses per prompt", ge=1)
    max_new_tokens: int = param(64, "response length cap (tokens)", ge=1)
    temperature: float = param(0.0, "sampling temperature (0 = greedy)", ge=0)
    top_k: int = param(0, "top-k sampling (0 = off)", ge=0)
    top_p: float = param(1.0, "nucleus sampling (1 = off)", gt=0, le=1)
    batch_size: int = param(32, "prompts per generate call", ge=1)
    seed: int = param(0, "sampling seed")
    device: str = param("auto", "auto | cpu | cuda | cuda:N")


def run(cfg: GenerateConfig) -> list[dict]:
    from fastrlhf.models.hf_io import check_model_folder, load_model, load_tokenizer
    from fastrlhf.runtime.config import check_ranges
    from fastrlhf.runtime.data import DataError, check_prompt_length, check_vocab, load_prompts, tokenize_prompt
    from fastrlhf.runtime.device import resolve_device
    from fastrlhf.stages.eval import sample_responses

    check_ranges(cfg)
    if not cfg.model:
        raise ValueError("generate: the field 'model' is required (see fastrlhf generate --help)")
    if bool(cfg.prompt) == bool(cfg.prompts):
        raise ValueError("generate: give exactly one of 'prompt' (text) or 'prompts' (a jsonl file)")
    check_model_folder(cfg.model, "--model")
    examples = [(cfg.prompt, "--prompt")] if cfg.prompt else [(ex.prompt, ex.source) for ex in load_prompts(cfg.prompts)]
    prompts = [p for p, _ in examples]
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, head="lm", device=resolve_device(cfg.device),
                       dtype=torch.bfloat16 if resolve_device(cfg.device).type == "cuda" else torch.float32)
    check_vocab(tok, model.config.vocab_size, where=f"{cfg.model}: tokenizer")
    ctx = model.config.max_position_embeddings
    for p, source in examples:  # every prompt + max_new_tokens must fit the context, as in ppo
        n = len(tokenize_prompt(tok, p, source))
        if source == "--prompt" and n > ctx - cfg.max_new_tokens:
            raise DataError(f"--prompt has {n} tokens; at most {ctx - cfg.max_new_tokens} fit the model's context "
                            f"({ctx}) with room for --max_new_tokens {cfg.max_new_tokens}")
        check_prompt_length(n, ctx - cfg.max_new_tokens, source)
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
