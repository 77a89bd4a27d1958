"""Stage 2 of InstructGPT: the reward model.

A scalar head on the last token (the EOS) of each response, initialised from the SFT model. Loss (InstructGPT eq. 1):
for a prompt x with K ranked responses, every ranked pair (y_w above y_l) contributes, all C(K,2) pairs of one prompt form
one batch element and each response passes through the model once:
    loss(x) = −1/C(K,2) · Σ_(w,l) log σ(r(x, y_w) − r(x, y_l))       (C(K,2) = the number of untied pairs kept)
The batch loss is the mean over prompts. Held-out metric: pairwise accuracy P[r(x, y_w) > r(x, y_l)].
At the end, the bias b = mean r(x, y_demo) over the SFT demonstrations is stored with the model (config.json
"fastrlhf_reward_bias", subtracted by ScoreModel), so the demonstrations have mean reward 0.

    1. load SFT body + fresh scalar head       2. read, validate, tokenize rankings, split held-out
    3. per step: batch_size prompts × their K responses -> rewards -> pairwise loss -> backward (grad_accum)
    4. clip, warmup+cosine lr, AdamW           5. log / held-out accuracy / checkpoint       6. bias from SFT demos, final save

Under torchrun (``fastrlhf.runtime.distributed``): FSDP2-sharded model; a micro-batch is ``batch_size × world`` prompts of one
global order, rank r takes its slice, and the loss divides by the global number of prompts, so N ranks match one
process with ``batch_size × N``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastrlhf.models.decoder import autocast_context
from fastrlhf.runtime import distributed
from fastrlhf.runtime.config import check_ranges, flat_kwargs, param, section
from fastrlhf.runtime.data import (EpochSampler, RMBatch, collate_rm, load_preferences, load_sft, pad_right,
                                  split_holdout, tokenize_conversation, tokenize_preferences)
from fastrlhf.runtime.metrics import progress
from fastrlhf.stages.loop import StepOut, run_steps, start_run
from fastrlhf.stages.sections import OptimSection, RunSection


@flat_kwargs
@dataclass
class RewardConfig:
    """Reward model (stage 2): a scalar head trained on ranked comparisons (InstructGPT's pairwise loss)."""

    model: str = param("", "SFT checkpoint folder (HF format): body of the reward model; the scalar head starts fresh")
    data: str = param("", "jsonl of {\"prompt\",\"responses\",\"ranking\"} (K=2..9) or {\"prompt\",\"chosen\",\"rejected\"}")
    eval_data: str = param("", "held-out comparisons jsonl (default: eval_fraction of data)")
    eval_fraction: float = param(0.1, "fraction of prompts held out when eval_data is not given", ge=0, lt=1)
    sft_data: str = param("", "SFT demonstrations jsonl: the stored bias gives them mean reward 0 ('' = no bias)")
    max_seq_len: int = param(0, "longest prompt+response in tokens (0 = the model's context); longer responses are cut", ge=0)
    batch_size: int = param(8, "prompts per micro-batch and rank (each with all its K responses)", ge=1)
    grad_accum: int = param(1, "micro-batches per optimizer step", ge=1)
    epochs: int = param(1, "passes over the data (InstructGPT: 1, the RM overfits after one epoch)", ge=1)
    max_steps: int = param(0, "optimizer steps (0 = epochs × steps per epoch)", ge=0)
    eval_every: int = param(0, "held-out accuracy every N steps (0 = only at the end)", ge=0)
    optim: OptimSection = section(OptimSection, "AdamW, warmup + cosine schedule, clipping", lr=9e-6)
    run: RunSection = section(RunSection, "output folder, device, checkpoints, logging, resume", output_dir="runs/rm")


def ranking_loss(rewards: torch.Tensor, batch: RMBatch, normalizer: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT's loss and pairwise accuracy.

    rewards [M] fp32 (one per sequence); batch.win/lose/pair_group [P]. Returns (loss scalar, accuracy scalar):
    loss = Σ_g [ −1/C_g · Σ_{(w,l) ∈ g} log σ(r_w − r_l) ] / D,  D = normalizer or the number of prompts G (a mean),
    accuracy = mean over pairs of 1[r_w > r_l]. Data-parallel: D = global prompt count / world (FSDP averages grads).
    """
    d = rewards[batch.win] - rewards[batch.lose]                         # [P]  r(x, y_w) − r(x, y_l)
    nll = -F.logsigmoid(d)                                              # [P]  −log σ(d)
    per_group = torch.zeros(batch.n_groups, device=d.device, dtype=d.dtype).index_add_(0, batch.pair_group, nll)
    count = torch.bincount(batch.pair_group, minlength=batch.n_groups).clamp(min=1).to(d.dtype)
    denom = float(batch.n_groups) if normalizer is None else normalizer
    loss = (per_group / count).sum() / denom                            # each prompt's C(K,2) pairs = one element
    return loss, (d.detach() > 0).float().mean()


def rewards_of(model, batch: RMBatch) -> torch.Tensor:
    """[M] reward at the last valid token (EOS) of each right-padded sequence, fp32."""
    return model.score_last(batch.input_ids, batch.attention_mask).float()


@torch.no_grad()
def evaluate(model, items, pad_id: int, batch_size: int, device, autocast: bool) -> dict:
    """Held-out pairwise accuracy and loss (nan when there is no held-out data). Under torchrun the batches are split
    over the ranks (padded with weight-0 repeats so every rank runs the same number of forwards) and the sums reduced."""
    if not items:
        return {"eval_accuracy": float("nan"), "eval_loss": float("nan")}
    was = model.training
    model.eval()
    hits = pairs = 0.0
    loss_sum = 0.0
    chunks = [items[lo: lo + batch_size] for lo in range(0, len(items), batch_size)]
    for chunk, weight in progress(distributed.padded_shard(chunks), desc="rm eval"):
        b = collate_rm(chunk, pad_id).to(device)
        with autocast_context(device, enabled=autocast):
            r = rewards_of(model, b)
        loss, acc = ranking_loss(r, b)
        hits += weight * float(acc) * len(b.win)
        pairs += weight * len(b.win)
        loss_sum += weight * float(loss) * b.n_groups
    model.train(was)
    hits, pairs, loss_sum = (distributed.all_reduce_sum(x) for x in (hits, pairs, loss_sum))
    return {"eval_accuracy": hits / max(pairs, 1.0), "eval_loss": loss_sum / len(items)}


@torch.no_grad()
def demonstration_bias(model, tokenizer, sft_path: str, device, autocast: bool, max_len: int,
                       batch_size: int = 32) -> float:
    """Mean reward (under the current bias) of the SFT demonstrations: prompt + demonstrated response, scored at its EOS."""
    rows = []
    for ex in load_sft(sft_path):
        ids, _ = tokenize_conversation(tokenizer, ex.messages, ex.source)
        eos = tokenizer.eos_token_id
        if eos is not None and eos in ids:  # score at the final EOS, as for the comparisons
            ids = ids[: len(ids) - ids[::-1].index(eos)]
        rows.append(ids[:max_len - 1] + ids[-1:] if len(ids) > max_len else ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()
    total = 0.0
    chunks = [rows[lo: lo + batch_size] for lo in range(0, len(rows), batch_size)]
    for chunk, weight in progress(distributed.padded_shard(chunks), desc="rm bias"):  # split over ranks, equal forwards
        ids, mask = pad_right(chunk, pad)
        with autocast_context(device, enabled=autocast):
            total += weight * float(model.score_last(ids.to(device), mask.to(device)).float().sum())
    return distributed.all_reduce_sum(total) / len(rows)


def train(cfg: RewardConfig) -> dict:
    """Train the reward model; returns {"checkpoint", "steps", "eval_accuracy", "bias", "history"}."""
    check_ranges(cfg)
    for name in ("model", "data"):
        if not getattr(cfg, name):
            raise ValueError(f"rm: the field '{name}' is required (see fastrlhf rm --help)")
    # 1. SFT body + scalar head (fresh unless resuming; FSDP2-sharded under torchrun)
    run = start_run(cfg, stage="rm", head="score")
    model, device, env, tokenizer = run.model, run.device, run.env, run.tokenizer
    max_len = min(cfg.max_seq_len or run.max_len, run.max_len)

    # 2. comparisons: validated (permutations, 2 <= K <= 9, ties dropped), tokenized, held-out split by prompt
    items, n_cut = tokenize_preferences(load_preferences(cfg.data), tokenizer, max_len)
    if cfg.eval_data:
        held, _ = tokenize_preferences(load_preferences(cfg.eval_data), tokenizer, max_len)
    else:
        items, held = split_holdout(items, cfg.eval_fraction, cfg.run.seed)
    if n_cut:
        distributed.print0(f"[fastrlhf rm] {n_cut} responses cut to {max_len} tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sampler = EpochSampler(len(items), cfg.batch_size * env.world_size, seed=cfg.run.seed)  # global batches
    total = cfg.max_steps or cfg.epochs * max(1, sampler.batches_per_epoch() // cfg.grad_accum)
    batches = iter(sampler)

    def step(i: int) -> StepOut:
        # 3. grad_accum micro-batches of prompts, each prompt's K responses scored once
        loss_sum, acc_sum, n_tok = 0.0, 0.0, 0
        for k in range(cfg.grad_accum):
            glob = next(batches)                         # the global micro-batch (all ranks)
            mine = distributed.local_slice(glob, env)
            weight = 1.0 if mine else 0.0                # a short last batch may leave a rank nothing: it runs a
            b = collate_rm([items[j] for j in (mine or glob[:1])], pad_id).to(device)  # weight-0 forward (FSDP)
            distributed.set_gradient_sync(model, k == cfg.grad_accum - 1)
            with autocast_context(device, enabled=run.autocast):
                r = rewards_of(model, b)
            loss, acc = ranking_loss(r, b, normalizer=len(glob) / env.world_size)
            (weight * loss / cfg.grad_accum).backward()
            loss_sum += weight * float(loss.detach()) / cfg.grad_accum
            acc_sum += weight * float(acc) / cfg.grad_accum
            n_tok += int(b.attention_mask.sum())
        return StepOut(loss_sum, {"accuracy": acc_sum}, n_tok)

    def finish() -> None:
        # 6. the bias that gives the SFT demonstrations mean reward 0, stored with the model (then the final save)
        if cfg.sft_data:
            bias = float(model.config.reward_bias)
            bias += demonstration_bias(model, tokenizer, cfg.sft_data, device, run.autocast, max_len)
            model.config.reward_bias = bias
            distributed.print0(f"[fastrlhf rm] reward bias {bias:+.4f} (SFT demonstrations now have mean reward 0)")

    # 4.-5. AdamW steps, held-out accuracy, checkpoints (Ctrl-C saves); 6. bias and final checkpoint
    out = run_steps(run, cfg, total=total, data=sampler, step=step, finish=finish,
                    evaluate=lambda: evaluate(model, held, pad_id, cfg.batch_size, device, run.autocast))
    return {"checkpoint": out["checkpoint"], "steps": out["steps"],
            "eval_accuracy": out["eval"].get("eval_accuracy", float("nan")), "bias": float(model.config.reward_bias),
            "history": out["history"], "interrupted": out["stopped"]}


def main(argv=None) -> dict:
    from fastrlhf.runtime.config import parse_config
    out = train(parse_config(RewardConfig, argv, prog="fastrlhf rm"))
    distributed.shutdown()  # under torchrun: leave the process group once every rank is done
    return out


RMConfig = RewardConfig  # the short name (fastrlhf rm)
