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

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastrlhf.runtime import distributed as D
from fastrlhf.runtime.build import load_sharded
from fastrlhf.runtime.checkpoint import (graceful_interrupt, has_training_state, latest_checkpoint, load_trainer_state,
                         load_training_state, resolve_resume, restore_trainer_state, save_checkpoint, seed_everything,
                         trainer_state_dict)
from fastrlhf.runtime.config import param
from fastrlhf.runtime.data import (PackedLoader, check_vocab, load_sft, make_packed_batch, split_holdout,
                   tokenize_sft)
from fastrlhf.runtime.metrics import MetricsLogger, peak_memory_gb, progress
from fastrlhf.models.decoder import autocast_context
from fastrlhf.models.hf_io import load_tokenizer
from fastrlhf.runtime.device import use_autocast
from fastrlhf.runtime.optim import apply_step, make_adamw
from fastrlhf.stages.losses import packed_lm_loss


@dataclass
class SFTConfig:
    """SFT (stage 1): fine-tune a causal LM on demonstrations, loss on response tokens only."""

    model: str = param("", "base model: a local HF checkpoint folder (model + tokenizer)")
    data: str = param("", "jsonl of {\"prompt\",\"response\"} or {\"messages\"} rows")
    eval_data: str = param("", "held-out jsonl (default: eval_fraction of data)")
    eval_fraction: float = param(0.05, "fraction of data held out when eval_data is not given")
    output_dir: str = param("runs/sft", "where checkpoints, metrics.jsonl and plots go")
    seed: int = param(0, "seed of data order, held-out split and initialisation")
    device: str = param("auto", "auto | cpu | cuda | cuda:N")
    max_seq_len: int = param(0, "longest sample in tokens (0 = the model's context); longer responses are cut")
    batch_tokens: int = param(4096, "tokens per micro-batch (the packing budget; >= max_seq_len)")
    grad_accum: int = param(1, "micro-batches per optimizer step and rank (a step = grad_accum × world budgets)")
    epochs: int = param(1, "passes over the data (ignored when max_steps > 0)")
    max_steps: int = param(0, "optimizer steps (0 = epochs × steps per epoch)")
    lr: float = param(2e-5, "peak learning rate")
    min_lr_ratio: float = param(0.1, "final lr of the cosine schedule, as a fraction of lr")
    warmup_ratio: float = param(0.03, "fraction of the steps with linear warmup")
    weight_decay: float = param(0.0, "AdamW weight decay (matrices only)")
    betas: tuple[float, ...] = param((0.9, 0.95), "AdamW betas")
    max_grad_norm: float = param(1.0, "gradient clipping by global norm (0 = off)")
    mixed_precision: str = param("auto", "auto (bf16 autocast on CUDA) | bf16 | no", choices=("auto", "bf16", "no"))
    gradient_checkpointing: bool = param(False, "recompute each block in backward (less memory)")
    eval_every: int = param(0, "held-out loss every N steps (0 = only at the end)")
    save_every: int = param(0, "checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = param(2, "how many checkpoints to keep")
    resume: str = param("", "'' | auto | a checkpoint folder: continue from the same step, data order and RNG")
    log_every: int = param(1, "console line every N steps")
    tensorboard: bool = param(False, "also log to TensorBoard (if installed)")
    plots: bool = param(True, "PNG plots of the curves beside the final checkpoint (if matplotlib is installed)")


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
    mine = D.padded_shard(bins)
    for b, weight in progress(mine, desc="sft eval", total=len(mine)):
        batch = make_packed_batch([loader.samples[i] for i in b], loader.budget, loader.pad_id).to(device)
        with autocast_context(device, enabled=autocast):
            n = float(batch.loss_mask.sum())
            total += weight * float(packed_lm_loss(model, batch, normalizer=1.0))
            count += weight * n
    model.train(was)
    total, count = D.all_reduce_sum(total), D.all_reduce_sum(count)
    return total / max(count, 1.0)


def train(cfg: SFTConfig) -> dict:
    """Run SFT; returns {"checkpoint", "steps", "eval_loss", "history"}."""
    for name in ("model", "data"):
        if not getattr(cfg, name):
            raise ValueError(f"sft: the field '{name}' is required (see fastrlhf sft --help)")
    if cfg.grad_accum < 1 or cfg.batch_tokens < 1:
        raise ValueError(f"sft: grad_accum ({cfg.grad_accum}) and batch_tokens ({cfg.batch_tokens}) must be >= 1")
    env = D.init(cfg.device)
    device = env.device
    seed_everything(cfg.seed)
    run_dir = Path(cfg.output_dir)
    resume_from = resolve_resume(cfg.resume, run_dir)

    # 1. model + tokenizer (weights from safetensors only)
    tokenizer = load_tokenizer(cfg.model)
    autocast = use_autocast(cfg.mixed_precision, device)
    # FSDP2-sharded under torchrun (weights broadcast from rank 0), a plain model on `device` otherwise; resuming, the
    # weights come from the checkpoint's sharded training state instead (each rank reads its shards)
    resume_state = resume_from is not None and has_training_state(resume_from)
    model = load_sharded(resume_from or cfg.model, env, head="lm", bf16_compute=autocast, weights=not resume_state)
    check_vocab(tokenizer, model.config.vocab_size, where=f"{cfg.model}: tokenizer")
    model.config.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    ctx = model.config.max_position_embeddings
    max_len = min(cfg.max_seq_len or ctx, ctx)
    if cfg.batch_tokens < max_len:
        max_len = cfg.batch_tokens  # a sample must fit one budget

    # 2. data: validated, tokenized (response-only loss mask), held-out split
    samples, n_cut = tokenize_sft(load_sft(cfg.data), tokenizer, max_len)
    if cfg.eval_data:
        held, n_cut_eval = tokenize_sft(load_sft(cfg.eval_data), tokenizer, max_len)
    else:
        samples, held = split_holdout(samples, cfg.eval_fraction, cfg.seed)
    if n_cut:
        D.print0(f"[fastrlhf sft] {n_cut} responses cut to {max_len} tokens")

    # 3. packing into fixed token budgets, seeded order resumable at (epoch, index)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loader = PackedLoader(samples, cfg.batch_tokens, pad_id, seed=cfg.seed)
    eval_loader = PackedLoader(held, cfg.batch_tokens, pad_id, seed=cfg.seed) if held else None
    per_step = cfg.grad_accum * env.world_size  # packed budgets consumed per optimizer step, all ranks together
    steps_per_epoch = max(1, loader.batches_per_epoch() // per_step)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_ratio * total)
    opt = make_adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)

    start = 0
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        start = restore_trainer_state(state, data=loader)
        load_training_state(resume_from, {"model": (model, opt)}, legacy={"model": state.get("optimizer")})
        D.print0(f"[fastrlhf sft] resumed from {resume_from} at step {start}")
    last_ckpt = latest_checkpoint(run_dir)
    log = MetricsLogger(run_dir, stage="sft", total_steps=total, tensorboard=cfg.tensorboard,
                        resume_step=start if resume_from is not None else None, plots=cfg.plots)
    history: list[dict] = []
    eval_loss = float("nan")

    def save(step: int) -> Path:
        st = trainer_state_dict(step=step, data_state=loader.state_dict())
        return save_checkpoint(run_dir, step, model=model, tokenizer=tokenizer, trainer_state=st, config=cfg,
                               keep=cfg.keep_checkpoints, trained={"model": (model, opt)})

    batches = iter(loader)
    bar = progress(total=total, initial=start, desc="sft")
    with graceful_interrupt() as stop:
        for step in range(start, total):
            t0 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # 4. one optimizer step = grad_accum packed micro-batches per rank; token-mean over all ranks' tokens
            step_bins = [next(batches) for _ in range(per_step)]
            micro = [b.to(device) for b in D.local_slice(step_bins, env)]
            n_resp = D.global_count(sum(float(b.loss_mask.sum()) for b in micro))
            loss_sum = 0.0
            for i, b in enumerate(micro):
                D.set_gradient_sync(model, i == len(micro) - 1)  # FSDP: reduce-scatter once, after the last one
                with autocast_context(device, enabled=autocast):
                    # FSDP averages gradients over ranks: Σ_ranks (Σ_local / (N/world)) / world = Σ_all / N
                    loss = packed_lm_loss(model, b, normalizer=n_resp / env.world_size)
                loss.backward()
                loss_sum += float(loss.detach())
            # 5. global loss, clip, schedule, AdamW; a non-finite loss or gradient stops before the weights change
            loss_sum, lr, gnorm = apply_step(
                model, opt, loss_sum, step=step, total=total, warmup=warmup, peak_lr=cfg.lr,
                min_lr_ratio=cfg.min_lr_ratio, max_grad_norm=cfg.max_grad_norm,
                where=f"sft (stopped without saving; last good checkpoint: {last_ckpt})")
            # 6. metrics, held-out loss, checkpoints
            dt = time.perf_counter() - t0
            n_tok = sum(b.n_tokens for b in micro)
            m = {"loss": loss_sum, "lr": lr, "grad_norm": gnorm, "tokens_per_s": n_tok / max(dt, 1e-9),
                 "epoch": loader.epoch, "time/train": dt, "peak_mem_gb": peak_memory_gb(device)}
            m = D.reduce_metrics(m, sum_keys=("tokens_per_s",), max_keys=("peak_mem_gb", "time/train"))
            stop_now = D.any_rank(bool(stop))  # a Ctrl-C seen by any rank: all save together, then stop
            done = step + 1 == total
            if done or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
                eval_loss = m["eval_loss"] = evaluate(model, eval_loader, device, autocast)
            history.append({"step": step + 1, **m})
            log.log(step + 1, m, echo=done or (step + 1) % max(cfg.log_every, 1) == 0 or "eval_loss" in m)
            bar.update(1)
            if done or stop_now or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                last_ckpt = save(step + 1)
            if stop_now:
                D.print0(f"[fastrlhf sft] interrupted at step {step + 1}; saved {last_ckpt}")
                break
    bar.close()
    if last_ckpt is None:
        last_ckpt = save(start)
    log.close(plot_dir=last_ckpt)
    return {"checkpoint": str(last_ckpt), "steps": history[-1]["step"] if history else start, "eval_loss": eval_loss,
            "history": history}


def main(argv=None) -> dict:
    from fastrlhf.runtime.config import parse_config
    out = train(parse_config(SFTConfig, argv, prog="fastrlhf sft"))
    D.shutdown()  # under torchrun: leave the process group once every rank is done
    return out
