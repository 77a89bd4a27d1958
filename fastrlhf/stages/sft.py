"""Stage 1 of InstructGPT: supervised fine-tuning on demonstrations.

Loss: mean negative log-likelihood of the response tokens only (prompt tokens are context), token-averaged over one
optimizer step (all micro-batches of the gradient accumulation), computed with ``kernels.linear_logprobs`` on the final
hidden states, so the [N, V] logits are never materialized. Samples are packed into fixed token budgets
(``batch_tokens``, one micro-batch = one budget, attention does not cross sample boundaries).

    1. load model + tokenizer, check vocab     2. read, validate, tokenize, split held-out     3. pack into token budgets
    4. per step: grad_accum micro-batches -> loss -> backward      5. clip, warmup+cosine lr, AdamW step
    6. log / evaluate / checkpoint (atomic; Ctrl-C saves)            7. final checkpoint + plots

Under torchrun (``fastrlhf.runtime.distributed``): FSDP2-sharded model; one step consumes ``grad_accum × world`` packed
budgets of the global order and rank r trains on its ``grad_accum`` of them; the loss divides by the global count of
response tokens (all-reduced), so N ranks match one process with ``grad_accum × N``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastrlhf.models.decoder import autocast_context
from fastrlhf.runtime import distributed
from fastrlhf.runtime.config import check_ranges, flat_kwargs, param, section
from fastrlhf.runtime.data import PackedLoader, load_sft, make_packed_batch, split_holdout, tokenize_sft
from fastrlhf.runtime.metrics import progress
from fastrlhf.stages.loop import StepOut, run_steps, start_run
from fastrlhf.stages.losses import packed_lm_loss
from fastrlhf.stages.sections import OptimSection, RunSection


@flat_kwargs
@dataclass
class SFTConfig:
    """SFT (stage 1): fine-tune a causal LM on demonstrations, loss on response tokens only."""

    model: str = param("", "base model: a local HF checkpoint folder (model + tokenizer)")
    data: str = param("", "jsonl of {\"prompt\",\"response\"} or {\"messages\"} rows")
    eval_data: str = param("", "held-out jsonl (default: eval_fraction of data)")
    eval_fraction: float = param(0.05, "fraction of data held out when eval_data is not given", ge=0, lt=1)
    max_seq_len: int = param(0, "longest sample in tokens (0 = the model's context); longer responses are cut", ge=0)
    batch_tokens: int = param(4096, "tokens per micro-batch (the packing budget; >= max_seq_len)", ge=1)
    grad_accum: int = param(1, "micro-batches per optimizer step and rank (a step = grad_accum × world budgets)", ge=1)
    epochs: int = param(1, "passes over the data (ignored when max_steps > 0)", ge=1)
    max_steps: int = param(0, "optimizer steps (0 = epochs × steps per epoch)", ge=0)
    eval_every: int = param(0, "held-out loss every N steps (0 = only at the end)", ge=0)
    optim: OptimSection = section(OptimSection, "AdamW, warmup + cosine schedule, clipping", lr=2e-5)
    run: RunSection = section(RunSection, "output folder, device, checkpoints, logging, resume", output_dir="runs/sft")


@torch.no_grad()
def evaluate(model, loader: PackedLoader | None, device, autocast: bool) -> float:
    """Token-mean NLL of the response tokens over one pass of the held-out set (nan if there is none).
    Under torchrun the budgets are split over the ranks (padded with weight-0 repeats: equal forwards per rank)."""
    if loader is None:
        return float("nan")
    was = model.training
    model.eval()
    total, count = 0.0, 0.0
    bins = loader.bins(0)
    mine = distributed.padded_shard(bins)
    for b, weight in progress(mine, desc="sft eval", total=len(mine)):
        batch = make_packed_batch([loader.samples[i] for i in b], loader.budget, loader.pad_id).to(device)
        with autocast_context(device, enabled=autocast):
            n = float(batch.loss_mask.sum())
            total += weight * float(packed_lm_loss(model, batch, normalizer=1.0))
            count += weight * n
    model.train(was)
    total, count = distributed.all_reduce_sum(total), distributed.all_reduce_sum(count)
    return total / max(count, 1.0)


def train(cfg: SFTConfig) -> dict:
    """Run SFT; returns {"checkpoint", "steps", "eval_loss", "history"}."""
    check_ranges(cfg)
    for name in ("model", "data"):
        if not getattr(cfg, name):
            raise ValueError(f"sft: the field '{name}' is required (see fastrlhf sft --help)")
    # 1. model + tokenizer (weights from safetensors only; FSDP2-sharded under torchrun)
    run = start_run(cfg, stage="sft", head="lm")
    model, device, env, tokenizer = run.model, run.device, run.env, run.tokenizer
    max_len = min(cfg.max_seq_len or run.max_len, run.max_len, cfg.batch_tokens)  # a sample must fit one budget

    # 2. data: validated, tokenized (response-only loss mask), held-out split
    samples, n_cut = tokenize_sft(load_sft(cfg.data), tokenizer, max_len)
    if cfg.eval_data:
        held, _ = tokenize_sft(load_sft(cfg.eval_data), tokenizer, max_len)
    else:
        samples, held = split_holdout(samples, cfg.eval_fraction, cfg.run.seed)
    if n_cut:
        distributed.print0(f"[fastrlhf sft] {n_cut} responses cut to {max_len} tokens")

    # 3. packing into fixed token budgets, seeded order resumable at (epoch, index)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loader = PackedLoader(samples, cfg.batch_tokens, pad_id, seed=cfg.run.seed)
    eval_loader = PackedLoader(held, cfg.batch_tokens, pad_id, seed=cfg.run.seed) if held else None
    per_step = cfg.grad_accum * env.world_size  # packed budgets consumed per optimizer step, all ranks together
    total = cfg.max_steps or cfg.epochs * max(1, loader.batches_per_epoch() // per_step)
    batches = iter(loader)

    def step(i: int) -> StepOut:
        # 4. one optimizer step = grad_accum packed micro-batches per rank; token-mean over all ranks' tokens
        micro = [b.to(device) for b in distributed.local_slice([next(batches) for _ in range(per_step)], env)]
        n_resp = distributed.global_count(sum(float(b.loss_mask.sum()) for b in micro))
        loss_sum = 0.0
        for k, b in enumerate(micro):
            distributed.set_gradient_sync(model, k == len(micro) - 1)  # FSDP: reduce-scatter once, after the last one
            with autocast_context(device, enabled=run.autocast):
                # FSDP averages gradients over ranks: Σ_ranks (Σ_local / (N/world)) / world = Σ_all / N
                loss = packed_lm_loss(model, b, normalizer=n_resp / env.world_size)
            loss.backward()
            loss_sum += float(loss.detach())
        return StepOut(loss_sum, {"epoch": loader.epoch}, sum(b.n_tokens for b in micro))

    # 5.-7. AdamW steps, held-out loss, checkpoints (Ctrl-C saves), final checkpoint + plots
    out = run_steps(run, cfg, total=total, data=loader, step=step,
                    evaluate=lambda: {"eval_loss": evaluate(model, eval_loader, device, run.autocast)})
    return {"checkpoint": out["checkpoint"], "steps": out["steps"],
            "eval_loss": out["eval"].get("eval_loss", float("nan")), "history": out["history"],
            "interrupted": out["stopped"]}


def main(argv=None) -> dict:
    from fastrlhf.runtime.config import parse_config
    out = train(parse_config(SFTConfig, argv, prog="fastrlhf sft"))
    distributed.shutdown()  # under torchrun: leave the process group once every rank is done
    return out
