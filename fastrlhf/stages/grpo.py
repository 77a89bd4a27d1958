"""Critic-free group RL: GRPO (DeepSeekMath), Dr.GRPO and RLOO with programmatic and/or learned rewards.

No value model. Each iteration samples Q prompts, generates n completions of each, scores them and uses the group's
other completions as the baseline (``grpo_core``):

    1. sample Q prompts                 2. generate n completions per prompt (hybrid engine, the training weights)
    3. rewards: Σ_k w_k f_k(prompts, completions) (+ w_rm · reward-model score)
    4. old log-probs (only when μ > 1 or several minibatches) and reference log-probs (only when β > 0; the
       reference's hidden states instead for the exact full-vocabulary KL in the loss)
    5. KL in the reward (``kl_in reward``): r −= β Σ_t KL_t         6. group advantages: grpo | drgrpo | rloo
    7. μ passes of clipped-surrogate minibatch steps (asymmetric clip ε_low / ε_high, KL-in-loss, ``loss_agg``)

β = 0 loads no reference model. Under torchrun each rank generates and scores whole groups (Q prompts per rank), so
the advantages need no communication; the policy is FSDP2-sharded and the loss denominators are global (as in PPO).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastrlhf import kernels
from fastrlhf.engine.hybrid import HybridEngine
from fastrlhf.models.decoder import autocast_context
from fastrlhf.models.hf_io import check_model_folder, load_tokenizer
from fastrlhf.runtime import distributed
from fastrlhf.runtime.build import disable_dropout, load_sharded
from fastrlhf.runtime.checkpoint import (graceful_interrupt, has_training_state, latest_checkpoint, load_trainer_state,
                                         load_training_state, prepare_run_dir, resolve_resume, save_checkpoint,
                                         seed_everything, set_rng_state, trainer_state_dict)
from fastrlhf.runtime.config import ConfigError, check_ranges, flat_kwargs, param, section
from fastrlhf.runtime.data import DataError, EpochSampler, check_prompt_length, check_vocab, load_prompts, tokenize_prompt
from fastrlhf.runtime.device import model_precision
from fastrlhf.runtime.metrics import peak_memory_gb
from fastrlhf.runtime.optim import make_adamw
from fastrlhf.stages.grpo_core import (ADVANTAGE_MODES, GroupBatch, RewardFunctions, batch_full_kl, batch_logprobs,
                                       batch_response_hidden, group_advantages, grpo_update)
from fastrlhf.stages.ppo_core import positions_from_mask, sequence_scores
from fastrlhf.stages.loop import Iterations
from fastrlhf.stages.sections import RunSection, SamplingSection


@flat_kwargs
@dataclass
class GRPOConfig:
    """GRPO / Dr.GRPO / RLOO: n samples per prompt, group-relative advantages, programmatic or learned rewards."""

    policy: str = param("", "initial policy (HF folder, e.g. the SFT checkpoint); also the reference when kl_coef > 0")
    prompts: str = param("", "prompts: jsonl of {\"prompt\"} or {\"messages\"}, a .parquet file, or a datasets folder "
                             "(save_to_disk)")
    reward_funcs: list[str] = param([], "Python reward functions f(prompts, completions) -> list[float], each as "
                                        "module:function or path/to/file.py:function")
    reward_weights: list[float] = param([], "one weight per reward function (default: all 1)")
    reward_model: str = param("", "optional learned reward model (HF *ForSequenceClassification folder)")
    reward_model_weight: float = param(1.0, "weight of the reward-model score in the summed reward")
    iterations: int = param(20, "iterations (generation batch + μ passes of updates)", ge=0)
    batch_size: int = param(8, "prompts per iteration and rank (Q); Q·n completions", ge=1)
    num_generations: int = param(8, "n: completions per prompt (the group size, >= 2)", ge=2)
    minibatch_size: int = param(0, "completions per optimizer step and rank (0 = the whole Q·n batch)", ge=0)
    mu: int = param(1, "μ: passes over each generation batch (1 = on-policy, ratio 1)", ge=1)
    advantage: str = param("grpo", "grpo (r−mean)/(std+eps) | drgrpo r−mean | rloo leave-one-out mean",
                           choices=ADVANTAGE_MODES)
    adv_eps: float = param(1e-4, "eps of the grpo std normalisation", ge=0)
    loss_agg: str = param("token-mean", "loss aggregation over tokens and sequences",
                          choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"))
    clip_eps_low: float = param(0.2, "ε_low: ratio clipped below at 1 − ε_low", ge=0, lt=1)
    clip_eps_high: float = param(0.2, "ε_high: ratio clipped above at 1 + ε_high (clip-higher, DAPO: 0.28)", ge=0)
    kl_coef: float = param(0.0, "β of the KL to the reference (0 = no reference model is loaded)", ge=0)
    kl_in: str = param("loss", "where the KL goes: loss (a per-token term) | reward (β·Σ_t KL subtracted from r)",
                       choices=("loss", "reward"))
    kl_estimator: str = param("k3", "per-token KL estimator: k1 | k2 | k3 | abs of the sampled tokens' log-probs, or "
                              "full: the exact KL over the whole vocabulary (fused, from both models' hidden states)",
                              choices=("k1", "k2", "k3", "abs", "full"))
    lr: float = param(1e-6, "policy learning rate (AdamW)", gt=0)
    weight_decay: float = param(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = param(1.0, "gradient clipping (0 = off)", ge=0)
    forward_batch_size: int = param(64, "completions per forward for old / reference log-probs and RM scores", ge=1)
    padding_free: str = param("auto", "run the RM, old / reference forwards and every minibatch on the valid tokens "
                              "only, packed (flash-attn varlen on CUDA): auto | on (auto = on) | off (padded rows; same "
                              "results)", choices=("auto", "on", "off"))
    share_prompts: bool = param(True, "padding-free forwards store each prompt once for its n completions (the "
                                "linear layers skip n − 1 copies of it; same results up to float rounding)")
    sampling: SamplingSection = section(SamplingSection, "completion sampling")
    run: RunSection = section(RunSection, "output folder, device, checkpoints, logging, resume", output_dir="runs/grpo")


def check_config(cfg: GRPOConfig) -> None:
    """Field checks that need no files (required fields, ranges, cross-field rules); every message names the flag."""
    if not cfg.policy:
        raise ConfigError("grpo: --policy is required (the initial policy folder)")
    if not cfg.prompts:
        raise ConfigError("grpo: --prompts is required (jsonl, parquet or a datasets folder)")
    if not cfg.reward_funcs and not cfg.reward_model:
        raise ConfigError("grpo: no reward: give --reward_funcs module:function and/or --reward_model FOLDER")
    check_ranges(cfg)  # each field's declared range (num_generations >= 2, mu >= 1, ...)
    if cfg.minibatch_size > cfg.batch_size * cfg.num_generations:
        raise ConfigError(f"grpo: --minibatch_size {cfg.minibatch_size} exceeds batch_size × num_generations = "
                          f"{cfg.batch_size * cfg.num_generations}")


def _freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def decode_completions(tokenizer, response_ids: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    """Completion texts (special tokens, EOS included, left out).  response_ids [B, G], lengths [B] -> B strings."""
    ids, lens = response_ids.tolist(), lengths.tolist()
    return [tokenizer.decode(row[:n], skip_special_tokens=True).strip() for row, n in zip(ids, lens)]


def train(cfg: GRPOConfig, *, log=None) -> dict:
    """Run GRPO; returns {"checkpoint", "history", "final"}. ``log``: an optional MetricsLogger."""
    check_config(cfg)
    reward_fns = RewardFunctions.from_config(cfg.reward_funcs, cfg.reward_weights) if cfg.reward_funcs else None
    env = distributed.init(cfg.run.device)
    device = env.device
    seed_everything(cfg.run.seed)
    run_dir = Path(cfg.run.output_dir)
    prepare_run_dir(run_dir, resume=cfg.run.resume, overwrite=cfg.run.overwrite)  # before any expensive work
    for flag in ("policy", "reward_model"):
        if getattr(cfg, flag):
            check_model_folder(getattr(cfg, flag), f"--{flag}")
    resume_from = resolve_resume(cfg.run.resume, run_dir)
    resume_state = resume_from is not None and has_training_state(resume_from)

    # Models: the policy (trained); the reference only when β > 0; the reward model only when given.
    tokenizer = load_tokenizer(cfg.policy)
    # One precision for every model (fp32 weights, bf16 autocast where enabled): the reference computes exactly like
    # the policy (KL 0 before the first update), and dropout is off (old and new log-probs are one function).
    prec = model_precision(cfg.run.mixed_precision, device)
    bf16 = prec.bf16_compute
    policy = load_sharded(resume_from or cfg.policy, env, head="lm", dtype=prec.weights, bf16_compute=bf16,
                          weights=not resume_state)
    disable_dropout(policy)
    check_vocab(tokenizer, policy.config.vocab_size, where=f"{cfg.policy}: tokenizer")
    policy.config.gradient_checkpointing = cfg.run.gradient_checkpointing
    ref = (load_sharded(cfg.policy, env, head="lm", dtype=prec.weights, bf16_compute=bf16, prepare=_freeze)
           if cfg.kl_coef > 0 else None)
    rm = (load_sharded(cfg.reward_model, env, head="score", dtype=prec.weights, bf16_compute=bf16, prepare=_freeze)
          if cfg.reward_model else None)
    policy.train()
    optimizer = make_adamw(policy, lr=cfg.lr, weight_decay=cfg.weight_decay)
    compute_dtype = prec.autocast
    autocast = lambda: autocast_context(device, enabled=compute_dtype is not None)  # noqa: E731
    gather = distributed.GenerationGather(policy, cfg.sampling.generation_gather, compute_dtype)
    engine = HybridEngine(policy, memory_policy="keep", compute_dtype=compute_dtype, weight_gather=gather)

    # Data: prompts tokenized once, each checked to fit the context with max_new_tokens.
    ctx = policy.config.max_position_embeddings
    max_prompt = cfg.sampling.max_prompt_len or (ctx - cfg.sampling.max_new_tokens)
    examples = load_prompts(cfg.prompts)
    prompt_ids = []
    for ex in examples:
        ids = tokenize_prompt(tokenizer, ex.prompt, ex.source)
        if not ids:
            raise DataError(f"{ex.source}: field 'prompt' tokenizes to no tokens")
        check_prompt_length(len(ids), max_prompt, ex.source)
        prompt_ids.append(ids)
    sampler = EpochSampler(len(examples), cfg.batch_size * env.world_size, seed=cfg.run.seed, drop_last=True)
    Q, n = cfg.batch_size, cfg.num_generations
    B = Q * n
    mb_size = cfg.minibatch_size or B
    need_old = cfg.mu > 1 or mb_size < B  # μ = 1 and one minibatch: old = current (ratio 1), no extra forward

    start = 0
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        load_training_state(resume_from, {"policy": (policy, optimizer)}, legacy={"policy": state.get("optimizer")})
        sampler.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        start = int(state["step"])
        distributed.print0(f"[fastrlhf grpo] resumed from {resume_from} at iteration {start}")
    if log is None:
        from fastrlhf.runtime.metrics import MetricsLogger
        log = MetricsLogger(run_dir, tensorboard=cfg.run.tensorboard, stage="grpo", total_steps=cfg.iterations,
                            resume_step=start if resume_from is not None else None)
    gen = torch.Generator(device="cpu")
    batches = iter(sampler)

    def save(step: int) -> Path:
        st = trainer_state_dict(step=step, data_state=sampler.state_dict())
        return save_checkpoint(run_dir, step, model=policy, tokenizer=tokenizer, trainer_state=st, config=cfg,
                               keep=cfg.run.keep_checkpoints, trained={"policy": (policy, optimizer)})

    book = Iterations("grpo", cfg.run, total=cfg.iterations, start=start, log=log, save=save,
                      last=latest_checkpoint(run_dir), loss_keys=("policy_loss",))
    with graceful_interrupt() as stop:
        for step in range(start, cfg.iterations):
            t0 = time.perf_counter()
            # 1. sample Q prompts (rank r takes its slice of the global batch)
            idx = distributed.local_slice(next(batches), env)
            # 2. generate n completions per prompt: rows q·n .. q·n+n−1 are prompt q's group
            rows = [prompt_ids[i] for i in idx for _ in range(n)]
            with engine.generation(max_batch_size=B, max_seq_len=max(map(len, rows)) + cfg.sampling.max_new_tokens):
                rollout = engine.generate(rows, max_new_tokens=cfg.sampling.max_new_tokens, temperature=cfg.sampling.temperature,
                                          top_k=cfg.sampling.top_k, top_p=cfg.sampling.top_p, eos_token_id=tokenizer.eos_token_id,
                                          pad_token_id=tokenizer.pad_token_id,
                                          seed=cfg.run.seed * 100003 + step + env.rank * 1_000_003)
            t1 = time.perf_counter()
            input_ids, attention_mask = rollout.sequences()  # [B, P+G]
            position_ids = positions_from_mask(attention_mask)
            P = rollout.prompt_ids.shape[1]
            mask = rollout.response_mask.float()  # [B, G]
            packed = cfg.padding_free != "off"  # auto = on
            fwd = dict(temperature=cfg.sampling.temperature, forward_batch_size=cfg.forward_batch_size, autocast=autocast,
                       padding_free=packed, share_prompts=cfg.share_prompts, mask=mask)
            # 3. rewards: weighted Python functions of (prompt, completion text) + the reward model's score
            completions = decode_completions(tokenizer, rollout.response_ids, rollout.lengths)
            reward = torch.zeros(B, dtype=torch.float32)
            parts: dict[str, float] = {}
            if reward_fns is not None:
                r_fn, parts = reward_fns([examples[i].prompt for i in idx for _ in range(n)], completions)
                reward += r_fn
            policy.eval()
            if rm is not None:
                with torch.no_grad(), autocast():
                    score = torch.cat([sequence_scores(rm, input_ids[sl], attention_mask[sl], position_ids[sl],
                                                       packed=packed)
                                       for sl in (slice(s, s + cfg.forward_batch_size)
                                                  for s in range(0, B, cfg.forward_batch_size))]).cpu()
                parts["reward/reward_model"] = float(score.mean())
                reward += cfg.reward_model_weight * score
            reward = reward.to(device)
            # 4. old log-probs (the policy before this batch's updates) and reference log-probs (β > 0)
            args = (input_ids, attention_mask, position_ids, rollout.response_ids, P)
            old_lp = batch_logprobs(policy, *args, **fwd) * mask if need_old else None
            full_in_loss = ref is not None and cfg.kl_in == "loss" and cfg.kl_estimator == "full"
            ref_lp = batch_logprobs(ref, *args, **fwd) * mask if ref is not None and not full_in_loss else None
            ref_h = (batch_response_hidden(ref, input_ids, attention_mask, position_ids, P,
                                           forward_batch_size=cfg.forward_batch_size, autocast=autocast,
                                           mask=mask, padding_free=packed, share_prompts=cfg.share_prompts)
                     if full_in_loss else None)  # [B, G, H]: the exact KL in the loss needs the reference's states
            policy.train()
            # 5. KL in the reward: r −= β Σ_t KL_t (the sampled tokens under the current policy vs the reference)
            kl_tok = None
            if ref_lp is not None and cfg.kl_in == "reward":
                if cfg.kl_estimator == "full":  # KL(π ‖ π_ref) = Σ_v p_v (log p_v − log q_v) per token, exact
                    policy.eval()
                    kl_tok = batch_full_kl(policy, ref, input_ids, attention_mask, position_ids, mask, P,
                                           temperature=cfg.sampling.temperature,
                                           forward_batch_size=cfg.forward_batch_size, autocast=autocast,
                                           padding_free=packed, share_prompts=cfg.share_prompts)
                    policy.train()
                else:
                    cur_lp = old_lp if old_lp is not None else batch_logprobs(policy, *args, **fwd) * mask
                    kl_tok = kernels.kl_penalty(cur_lp, ref_lp, estimator=cfg.kl_estimator) * mask  # [B, G]
                reward = reward - cfg.kl_coef * kl_tok.sum(-1)
            # 6. group advantages over each prompt's n completions
            adv = group_advantages(reward.view(Q, n), cfg.advantage, cfg.adv_eps).reshape(B)
            t2 = time.perf_counter()
            # 7. μ passes of minibatch updates
            batch = GroupBatch(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               response_ids=rollout.response_ids, mask=mask, advantages=adv, old_logprobs=old_lp,
                               ref_logprobs=ref_lp if cfg.kl_in == "loss" else None, prompt_len=P, ref_hidden=ref_h)
            gen.manual_seed(cfg.run.seed * 7919 + step)
            stats = grpo_update(batch, policy=policy, optimizer=optimizer, mu=cfg.mu, minibatch_size=mb_size,
                                clip_eps_low=cfg.clip_eps_low, clip_eps_high=cfg.clip_eps_high,
                                kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator if cfg.kl_in == "loss" and not full_in_loss else "k3",
                                agg=cfg.loss_agg,
                                temperature=cfg.sampling.temperature, max_grad_norm=cfg.max_grad_norm or None,
                                autocast=autocast, generator=gen, padding_free=packed, share_prompts=cfg.share_prompts,
                                ref_head_weight=ref.lm_head_weight if full_in_loss else None)
            t3 = time.perf_counter()
            group_std = reward.view(Q, n).std(1)
            metrics = {
                "step": step + 1, "reward": float(reward.mean()), "reward_std": float(group_std.mean()),
                "frac_zero_std": float((group_std == 0).float().mean()),
                **parts,
                # KL to the reference, mean per token (the loss term's own metric when it is in the loss)
                "kl": (float(kl_tok.sum() / mask.sum().clamp_min(1)) if kl_tok is not None
                       else stats["kl"] if ref is not None else 0.0),
                "kl_seq": float(kl_tok.sum(-1).mean()) if kl_tok is not None else math.nan,
                "entropy": stats["entropy"], "clipfrac": stats["clipfrac"], "approx_kl": stats["approx_kl"],
                "policy_loss": stats["policy_loss"], "grad_norm": stats["grad_norm"],
                "response_length": float(rollout.lengths.float().mean()),
                "tokens_per_s": float(mask.sum()) / max(t3 - t0, 1e-9),
                "time/generate": t1 - t0, "time/score": t2 - t1, "time/train": t3 - t2,
                "peak_mem_gb": peak_memory_gb(device),
            }
            metrics = distributed.reduce_metrics(metrics, sum_keys=("tokens_per_s",),
                                       max_keys=("peak_mem_gb", "time/generate", "time/score", "time/train"))
            if book.record(step, metrics, stop_now=distributed.any_rank(bool(stop))):  # Ctrl-C: all ranks save, stop
                break
    out = book.close(run_dir)
    engine.free()
    return {**out, "reference_loaded": ref is not None}


def main(argv=None) -> dict:
    from fastrlhf.runtime.config import parse_config
    out = train(parse_config(GRPOConfig, argv, prog="fastrlhf grpo"))
    distributed.shutdown()
    return out
