"""The run loop the supervised stages (SFT, reward model) share: one model, one AdamW, a step function; and
(``Iterations``) the bookkeeping after each iteration that the RL stages (PPO, GRPO) share.

    run = start_run(cfg, stage="sft", head="lm")         # process group, seed, resume point, tokenizer, model
    ... the stage reads its data with run.tokenizer, builds its loader ...
    out = run_steps(run, cfg, total=..., data=loader, step=one_step, evaluate=held_out, finish=final_touches)

``run_steps`` owns everything that is not the stage's own math: warmup + cosine schedule, resume (weights, optimizer,
data order, RNG), the optimizer step (``optim.apply_step``: global loss, clipping, the non-finite stop), metrics and the
console, held-out evaluation every ``eval_every`` steps, checkpoints every ``save_every`` steps, Ctrl-C (all ranks save
together, then stop) and the final checkpoint.

A stage config has these fields: model, output_dir, seed, device, mixed_precision, gradient_checkpointing, lr,
min_lr_ratio, warmup_ratio, weight_decay, betas, max_grad_norm, eval_every, save_every, keep_checkpoints, resume,
overwrite, log_every, tensorboard, plots.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from fastrlhf.models.hf_io import check_model_folder, load_tokenizer
from fastrlhf.runtime import distributed
from fastrlhf.runtime.build import load_sharded
from fastrlhf.runtime.checkpoint import (graceful_interrupt, has_training_state, latest_checkpoint, load_trainer_state,
                                         load_training_state, prepare_run_dir, resolve_resume, restore_trainer_state,
                                         save_checkpoint, seed_everything, trainer_state_dict)
from fastrlhf.runtime.data import check_vocab
from fastrlhf.runtime.device import use_autocast
from fastrlhf.runtime.metrics import MetricsLogger, peak_memory_gb, progress
from fastrlhf.runtime.optim import apply_step, make_adamw


@dataclass
class Run:
    """What a stage needs before its data: the process, where the run writes, and the (possibly sharded) model."""

    stage: str                   # "sft" | "rm": console prefix, metrics file stage name
    env: distributed.DistEnv
    run_dir: Path
    resume_from: Path | None     # the checkpoint to continue from (None = a fresh run)
    tokenizer: Any
    model: torch.nn.Module
    autocast: bool               # bf16 autocast over fp32 master weights

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def max_len(self) -> int:
        """The model's context length."""
        return self.model.config.max_position_embeddings


def start_run(cfg, *, stage: str, head: str) -> Run:
    """Process group, seed and resume point; the tokenizer and the model (weights from safetensors only).

    Under torchrun the model is FSDP2-sharded with the weights broadcast from rank 0; resuming, the weights come from the
    checkpoint's sharded training state instead (each rank reads its shards)."""
    env = distributed.init(cfg.run.device)
    seed_everything(cfg.run.seed)
    run_dir = Path(cfg.run.output_dir)
    prepare_run_dir(run_dir, resume=cfg.run.resume, overwrite=cfg.run.overwrite)  # before any expensive work
    check_model_folder(cfg.model, "--model")
    resume_from = resolve_resume(cfg.run.resume, run_dir)
    tokenizer = load_tokenizer(cfg.model)
    autocast = use_autocast(cfg.run.mixed_precision, env.device)
    resume_state = resume_from is not None and has_training_state(resume_from)
    model = load_sharded(resume_from or cfg.model, env, head=head, bf16_compute=autocast, weights=not resume_state)
    check_vocab(tokenizer, model.config.vocab_size, where=f"{cfg.model}: tokenizer")
    model.config.gradient_checkpointing = cfg.run.gradient_checkpointing
    model.train()
    return Run(stage, env, run_dir, resume_from, tokenizer, model, autocast)


@dataclass
class StepOut:
    """What one step of a stage's math returns: the step's loss (this rank's share of the global mean), extra metrics
    and the number of tokens it processed (for tokens/s)."""

    loss: float
    metrics: dict
    tokens: int


def run_steps(run: Run, cfg, *, total: int, data, step: Callable[[int], StepOut],
              evaluate: Callable[[], dict], finish: Callable[[], None] | None = None) -> dict:
    """Steps ``start..total`` of ``step(i)`` (forward + backward of step i), each followed by the optimizer step.

    data: the stage's resumable sampler/loader (``state_dict``/``load_state_dict``): its position is checkpointed.
    evaluate(): held-out metrics (names starting with ``eval_``), run every ``cfg.eval_every`` steps and at the end.
    finish(): runs once after the last step, before the final checkpoint (e.g. the reward model's bias); not on Ctrl-C.
    Returns {"checkpoint", "steps", "history", "eval"} (eval = the last held-out metrics, {} if none ran).
    """
    model, device = run.model, run.device
    opt = make_adamw(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas)
    warmup = int(cfg.optim.warmup_ratio * total)
    start = 0
    if run.resume_from is not None:
        state = load_trainer_state(run.resume_from)
        start = restore_trainer_state(state, data=data)
        load_training_state(run.resume_from, {"model": (model, opt)}, legacy={"model": state.get("optimizer")})
        distributed.print0(f"[fastrlhf {run.stage}] resumed from {run.resume_from} at step {start}")
    last_ckpt = latest_checkpoint(run.run_dir)
    log = MetricsLogger(run.run_dir, stage=run.stage, total_steps=total, tensorboard=cfg.run.tensorboard,
                        resume_step=start if run.resume_from is not None else None, plots=cfg.run.plots)
    history: list[dict] = []
    ev: dict = {}

    def save(at: int) -> Path:
        st = trainer_state_dict(step=at, data_state=data.state_dict())
        return save_checkpoint(run.run_dir, at, model=model, tokenizer=run.tokenizer, trainer_state=st, config=cfg,
                               keep=cfg.run.keep_checkpoints, trained={"model": (model, opt)})

    stopped = False
    bar = progress(total=total, initial=start, desc=run.stage)
    with graceful_interrupt() as stop:
        for i in range(start, total):
            t0 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            out = step(i)
            # global loss, clip, schedule, AdamW; a non-finite loss or gradient stops before the weights change
            loss, lr, gnorm = apply_step(
                model, opt, out.loss, step=i, total=total, warmup=warmup, peak_lr=cfg.optim.lr,
                min_lr_ratio=cfg.optim.min_lr_ratio, max_grad_norm=cfg.optim.max_grad_norm,
                where=f"{run.stage} (stopped without saving; last good checkpoint: {last_ckpt})")
            dt = time.perf_counter() - t0
            m = {"loss": loss, **out.metrics, "lr": lr, "grad_norm": gnorm, "tokens_per_s": out.tokens / max(dt, 1e-9),
                 "time/train": dt, "peak_mem_gb": peak_memory_gb(device)}
            m = distributed.reduce_metrics(m, sum_keys=("tokens_per_s",), max_keys=("peak_mem_gb", "time/train"))
            stop_now = distributed.any_rank(bool(stop))  # a Ctrl-C seen by any rank: all save together, then stop
            done = i + 1 == total
            evaluated = done or bool(cfg.eval_every and (i + 1) % cfg.eval_every == 0)
            if evaluated:
                ev = evaluate()
                m.update(ev)
            history.append({"step": i + 1, **m})
            log.log(i + 1, m, echo=done or (i + 1) % max(cfg.run.log_every, 1) == 0 or evaluated)
            bar.update(1)
            if stop_now and not done:
                last_ckpt = save(i + 1)
                distributed.print0(f"[fastrlhf {run.stage}] interrupted at step {i + 1}; saved {last_ckpt}")
                stopped = True
                break
            if not done and cfg.run.save_every and (i + 1) % cfg.run.save_every == 0:
                last_ckpt = save(i + 1)
    bar.close()
    if not stopped:
        if finish is not None:
            finish()
        last_ckpt = save(max(total, start))
    log.close(plot_dir=last_ckpt)
    return {"checkpoint": str(last_ckpt), "steps": history[-1]["step"] if history else start, "history": history,
            "eval": ev, "stopped": stopped}


class Iterations:
    """The bookkeeping after each iteration of an RL stage (PPO, GRPO), around the stage's own iteration:

        book = Iterations("ppo", cfg.run, total=cfg.iterations, start=start, log=log, save=save, last=latest)
        with graceful_interrupt() as stop:
            for step in range(start, total):
                ... one iteration -> metrics ...
                if book.record(step, metrics, stop_now=distributed.any_rank(bool(stop))):
                    break
        out = book.close(run_dir)

    ``record`` stops on a non-finite loss (before anything is saved), keeps the history, logs, saves every
    ``run.save_every`` iterations and at the last, and on Ctrl-C saves and says to stop. ``close`` saves once when
    there was nothing to run and draws the curves."""

    def __init__(self, stage: str, run_cfg, *, total: int, start: int, log, save: Callable[[int], Path],
                 last: Path | None, loss_keys: tuple[str, ...] = ("policy_loss",)):
        self.stage, self.run_cfg, self.total, self.start = stage, run_cfg, total, start
        self.log, self.save, self.loss_keys = log, save, loss_keys
        self.last_ckpt = last
        self.history: list[dict] = []
        self.stopped = False
        self.bar = progress(total=total, initial=start, desc=stage)

    def record(self, step: int, metrics: dict, *, stop_now: bool) -> bool:
        """After iteration ``step`` (0-based): True when the stage must stop (Ctrl-C on any rank; saved first)."""
        if not all(math.isfinite(metrics[k]) for k in self.loss_keys):
            raise FloatingPointError(f"{self.stage}: non-finite loss at iteration {step + 1}; last good checkpoint: "
                                     f"{self.last_ckpt}")
        self.history.append(metrics)
        self.bar.update(1)
        self.log.log(metrics, step=step + 1, console=(step + 1) % max(self.run_cfg.log_every, 1) == 0)
        every = self.run_cfg.save_every
        if step + 1 == self.total or stop_now or (every and (step + 1) % every == 0):
            self.last_ckpt = self.save(step + 1)
        if stop_now:
            distributed.print0(f"[fastrlhf {self.stage}] stopped at iteration {step + 1}; checkpoint {self.last_ckpt}")
            self.stopped = True
        return self.stopped

    def close(self, run_dir: Path) -> dict:
        """{"checkpoint", "history", "final", "interrupted"} once the loop is over."""
        self.bar.close()
        if self.start >= self.total and self.last_ckpt is None:
            self.last_ckpt = self.save(self.start)
        self.log.close(plots=self.run_cfg.plots, plot_dir=self.last_ckpt if self.last_ckpt is not None else run_dir)
        return {"checkpoint": str(self.last_ckpt) if self.last_ckpt else None, "history": self.history,
                "final": self.history[-1] if self.history else {}, "interrupted": self.stopped}
