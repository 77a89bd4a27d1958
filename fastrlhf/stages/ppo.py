"""Stage 3 of InstructGPT: PPO against the reward model with a per-token KL penalty to the SFT policy.

Models: policy and frozen reference from the SFT checkpoint, reward model from the RM checkpoint, value model initialised
from the RM (InstructGPT §3.5). One iteration = the numbered steps below (the math is in ``ppo_core``):

    1. sample prompts          2. generate (hybrid engine, same weights as training)      3. score with the reward model
    4. old/ref log-probs, values   5. per-token rewards -β·KL (+ score at the last token)   6. GAE   7. whiten advantages
    8. epochs × minibatches of clipped policy loss + clipped value loss (+ PPO-ptx)

Defaults follow InstructGPT where it states them (β = 0.02, clip 0.2, λ = 0.95, γ = 1).

Under torchrun (``fastrlhf.runtime.distributed``): policy and value FSDP2-sharded and trained, reference and reward model
sharded for inference only. Each iteration samples ``batch_size × world`` prompts of one global order, rank r rolls out
its slice; the policy's full weights are gathered once per rollout (``generation_gather``); advantages are whitened
with all ranks' statistics and the losses divide by the global token count, so N ranks match one process with
``batch_size × N`` prompts and ``minibatch_size × N`` rollouts per minibatch (given the same rollouts).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from fastrlhf.runtime import distributed
from fastrlhf.runtime.build import disable_dropout, load_sharded
from fastrlhf import kernels
from fastrlhf.runtime.checkpoint import (graceful_interrupt, has_training_state, latest_checkpoint, load_trainer_state,
                                         load_training_state, prepare_run_dir, resolve_resume, save_checkpoint,
                                         seed_everything, set_rng_state, trainer_state_dict)
from fastrlhf.runtime.config import check_ranges, flat_kwargs, param, section
from fastrlhf.runtime.data import EpochSampler, check_prompt_length, check_vocab, load_prompts, tokenize_prompt
from fastrlhf.engine.hybrid import HybridEngine
from fastrlhf.runtime.lora import adapters_disabled, add_lora, check_lora_state_dict, lora_state_dict, merged_state_dict
from fastrlhf.models.decoder import autocast_context
from fastrlhf.models.hf_io import ModelFolderError, check_model_folder, has_score_head, load_tokenizer
from fastrlhf.runtime.metrics import explained_variance, peak_memory_gb
from fastrlhf.runtime.device import model_precision
from fastrlhf.runtime.optim import ADAM_BETAS, ADAM_EPS, adamw_groups, make_adamw
from fastrlhf.stages.ppo_core import KL_ESTIMATORS, OLD_LOGPROBS, logprob_mismatch, masked_mean, ppo_iteration
from fastrlhf.stages.loop import Iterations
from fastrlhf.stages.sections import RunSection, SamplingSection


LORA_FILE = "lora_adapter.safetensors"


@dataclass
class PPOOptimSection:
    """The policy's and the value model's optimizers."""

    lr: float = param(1e-5, "policy learning rate (AdamW)", gt=0)
    value_lr: float = param(1e-5, "value-model learning rate (AdamW)", gt=0)
    weight_decay: float = param(0.0, "AdamW weight decay", ge=0)
    optimizer: str = param("adamw", "adamw | adamw8bit (bitsandbytes)", choices=("adamw", "adamw8bit"))
    max_grad_norm: float = param(1.0, "gradient clipping (0 = off)", ge=0)


@dataclass
class KLSection:
    """The KL to the reference (SFT) policy: a per-token penalty in the reward, and optionally a term in the loss."""

    kl_coef: float = param(0.02, "β: per-token KL penalty coefficient in the reward", ge=0)
    adaptive_kl: bool = param(False, "adapt β toward kl_target (Ziegler et al. 2019)")
    kl_target: float = param(6.0, "target KL (nats per sequence) for the adaptive controller", gt=0)
    kl_horizon: int = param(10000, "horizon (rollouts) of the adaptive KL controller", ge=1)
    kl_estimator: str = param("k1", "per-token KL in the reward: k1 | k2 | k3 | abs of the sampled tokens' log-probs, "
                              "or full: the exact KL over the whole vocabulary (fused, from both models' hidden "
                              "states and heads)", choices=KL_ESTIMATORS)
    kl_loss_coef: float = param(0.0, "β_loss of a KL term in the policy loss against the reference (0 = off)", ge=0)
    kl_loss_estimator: str = param("k3", "KL of the loss term: k1 | k2 | k3 | abs | full", choices=KL_ESTIMATORS)


@dataclass
class LoRASection:
    """LoRA adapters on the policy (peft); the reference is the policy with its adapters disabled."""

    rank: int = param(0, "LoRA rank of the policy; 0 = train all weights", flat="lora_rank", ge=0)
    alpha: float = param(32.0, "LoRA alpha (the update is scaled by alpha / rank)", flat="lora_alpha", gt=0)
    dropout: float = param(0.0, "dropout on the LoRA input (PPO turns every dropout off: the old and new log-probs "
                           "must come from one function for the ratio to be exact)", flat="lora_dropout", ge=0, lt=1)
    targets: list[str] = param(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                               "linear layers that get adapters (HF names; qkv_proj / gate_up_proj adapt the fused "
                               "projections as one layer each)", flat="lora_targets")


@dataclass
class LossSection:
    """PPO's clipped objectives and advantage estimation."""

    clip_eps: float = param(0.2, "PPO ratio clip ε", gt=0)
    vf_clip_eps: float = param(0.2, "value clip ε", gt=0)
    gamma: float = param(1.0, "GAE discount γ", ge=0, le=1)
    lam: float = param(0.95, "GAE λ", ge=0, le=1)
    whiten_advantages: bool = param(True, "normalise advantages to mean 0, std 1 over valid tokens")
    missing_eos_penalty: float = param(0.0, "subtracted from the score of responses without EOS (0 = off)", ge=0)
    old_logprobs: str = param("recompute", "behaviour log-probs: recompute (a policy forward before the update) | "
                              "rollout (the engine's, same head kernel; skips that forward; needs top_k 0, top_p 1)",
                              choices=OLD_LOGPROBS)


@dataclass
class PtxSection:
    """PPO-ptx (InstructGPT): the LM loss on pretraining-like text mixed into the policy update."""

    coef: float = param(0.0, "γ of PPO-ptx: weight of the LM loss on the ptx data (0 = off)", flat="ptx_coef", ge=0)
    data: str = param("", "jsonl of SFT rows ({\"prompt\",\"response\"} or {\"messages\"})", flat="ptx_data")
    batch_tokens: int = param(512, "tokens per PPO-ptx batch (packed)", flat="ptx_batch_tokens", ge=1)


@flat_kwargs
@dataclass
class PPOConfig:
    """PPO (stage 3): fine-tune the SFT policy against the reward model with a KL penalty to the SFT policy."""

    policy: str = param("", "SFT checkpoint folder (HF format): the policy and the frozen reference start here")
    reward_model: str = param("", "reward-model checkpoint folder (HF *ForSequenceClassification format)")
    value_model: str = param("", "value-model init checkpoint (default: the reward model, as in InstructGPT)")
    prompts: str = param("", "jsonl of {\"prompt\"} or {\"messages\"} rows")
    random_reward_head: bool = param(False, "accept a reward_model without a trained score head (a causal LM): its "
                                            "head starts random, so PPO optimises noise (tests and benchmarks only)")
    iterations: int = param(20, "PPO iterations (rollout + update)", ge=1)
    batch_size: int = param(16, "prompts per iteration and rank (rollouts B; world × B in all)", ge=1)
    minibatch_size: int = param(16, "rollouts per optimizer step and rank", ge=1)
    ppo_epochs: int = param(4, "passes over each batch of rollouts", ge=1)
    forward_batch_size: int = param(64, "rollouts per forward when computing old/ref log-probs and values", ge=1)
    padding_free: str = param("auto", "run the experience forwards and every minibatch on the valid tokens only, "
                              "packed with per-sequence positions (flash-attn varlen on CUDA): auto | on (auto = on) | "
                              "off (padded [B, P+G] rows; same results)", choices=("auto", "on", "off"))
    sampling: SamplingSection = section(SamplingSection, "rollout sampling")
    kl: KLSection = section(KLSection, "KL penalty to the reference policy")
    loss: LossSection = section(LossSection, "clipped objectives, GAE, advantage whitening")
    optim: PPOOptimSection = section(PPOOptimSection, "policy and value optimizers")
    lora: LoRASection = section(LoRASection, "LoRA adapters on the policy")
    ptx: PtxSection = section(PtxSection, "PPO-ptx pretraining mix")
    run: RunSection = section(RunSection, "output folder, device, checkpoints, logging, resume", output_dir="runs/ppo")


def make_optimizer(model, *, kind: str, lr: float, weight_decay: float):
    """AdamW (optim.make_adamw) or bitsandbytes' 8-bit AdamW when ``kind == "adamw8bit"`` (same parameter groups, betas
    and eps: norm gains and biases are not decayed)."""
    if kind == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise RuntimeError("ppo: optimizer 'adamw8bit' needs bitsandbytes (pip install bitsandbytes); "
                               "use --optimizer adamw") from e
        return bnb.optim.AdamW8bit(adamw_groups(model, weight_decay), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    return make_adamw(model, lr=lr, weight_decay=weight_decay)


def _read_adapter(path: Path) -> dict:
    """The LoRA adapter of an older checkpoint (safetensors only); an unreadable file is named in one line."""
    try:
        return load_safetensors(str(path))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelFolderError(f"{path}: not a readable safetensors file ({first})") from None


def _freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _ptx_iterator(cfg: PPOConfig, tokenizer, max_len: int, device):
    """Endless packed LM batches of the PPO-ptx data (InstructGPT's pretraining-mix term), and the loss on one."""
    from fastrlhf.runtime.data import PackedLoader, load_sft, tokenize_sft
    from fastrlhf.stages.losses import packed_lm_loss

    samples, _ = tokenize_sft(load_sft(cfg.ptx.data), tokenizer, max_len)
    loader = PackedLoader(samples, cfg.ptx.batch_tokens, tokenizer.pad_token_id, seed=cfg.run.seed + 7)
    rank, world = distributed.rank(), distributed.world_size()

    def batches():  # one budget per rank per minibatch: rank r takes the r-th of each group of `world`
        it = iter(loader)
        while True:
            group = [next(it) for _ in range(world)]
            yield group[rank].to(device)

    def loss(policy, batch):  # token-mean over all ranks' ptx tokens (FSDP averages the gradients)
        return packed_lm_loss(policy, batch, normalizer=distributed.global_count(batch.loss_mask.sum()) / world)

    return batches(), loss


def train(cfg: PPOConfig, *, log=None, on_iteration=None) -> dict:
    """Run PPO; returns a summary dict (final metrics, checkpoint path). ``log``: an optional MetricsLogger.
    ``on_iteration(step, rollout, experience, metrics)``: called after each iteration's metrics (e.g. to score the
    rollouts with another judge); ``step`` counts from 1."""
    check_ranges(cfg)
    for name in ("policy", "reward_model", "prompts"):
        if not getattr(cfg, name):
            raise ValueError(f"ppo: the field '{name}' is required (see fastrlhf ppo --help)")
    if cfg.minibatch_size > cfg.batch_size:
        raise ValueError(f"ppo: need minibatch_size ({cfg.minibatch_size}) <= batch_size ({cfg.batch_size})")
    if cfg.ptx.coef > 0 and not cfg.ptx.data:
        raise ValueError("ppo: ptx_coef > 0 needs ptx_data (a jsonl of SFT rows)")
    if cfg.loss.old_logprobs == "rollout" and (cfg.sampling.top_k > 0 or cfg.sampling.top_p < 1.0):
        raise ValueError("ppo: old_logprobs rollout needs top_k 0 and top_p 1 (with filtering the engine's log-probs are "
                         "those of the filtered distribution, not the policy's); use old_logprobs recompute")
    env = distributed.init(cfg.run.device)
    device = env.device
    if env.launched and cfg.optim.optimizer != "adamw":
        raise ValueError("ppo under torchrun: optimizer adamw8bit is a single-process feature for now (bitsandbytes "
                         "states are not sharded); use optimizer adamw with FSDP")
    seed_everything(cfg.run.seed)
    run_dir = Path(cfg.run.output_dir)
    prepare_run_dir(run_dir, resume=cfg.run.resume, overwrite=cfg.run.overwrite)  # before any expensive work
    for flag in ("policy", "reward_model", "value_model"):
        if getattr(cfg, flag):
            check_model_folder(getattr(cfg, flag), f"--{flag}")
    if not cfg.random_reward_head and not has_score_head(cfg.reward_model):
        raise ModelFolderError(f"{cfg.reward_model}: --reward_model is a causal LM without a trained score head (PPO "
                               f"would optimise a random reward); give a reward model trained with fastrlhf rm, or "
                               f"--random_reward_head true to accept a random head")
    resume_from = resolve_resume(cfg.run.resume, run_dir)

    # Models: policy (trained) and value (trained); reference and reward (frozen).
    tokenizer = load_tokenizer(cfg.policy)
    # One precision for all four models (fp32 weights, bf16 autocast where enabled): the reference then computes
    # exactly like the policy (KL 0 at step 0) and the reward model scores like it did when its bias was fixed.
    prec = model_precision(cfg.run.mixed_precision, device)
    bf16 = prec.bf16_compute
    ref_context = None
    # FSDP2-sharded under torchrun (weights broadcast from rank 0; the frozen ones for inference only), else plain.
    # Resuming, the trained weights (policy, value) come from the checkpoint's sharded training state instead.
    resume_state = resume_from is not None and has_training_state(resume_from)
    if cfg.lora.rank > 0:  # LoRA: the base weights stay the SFT model's; the reference is the adapter switched off
        policy = load_sharded(cfg.policy, env, head="lm", dtype=prec.weights, bf16_compute=bf16,
                              weights=not resume_state,
                              prepare=lambda m: add_lora(m, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                                                         dropout=cfg.lora.dropout, targets=cfg.lora.targets))
        if resume_from is not None and not resume_state:  # an older checkpoint: the adapter file (read by rank 0)
            adapter = _read_adapter(resume_from / LORA_FILE) if env.is_main else {}
            if env.is_main:
                check_lora_state_dict(policy, adapter)
            distributed.load_full_state(policy, adapter, strict=False)
        ref, ref_context = policy, (lambda: adapters_disabled(policy))
    else:
        policy = load_sharded(resume_from or cfg.policy, env, head="lm", dtype=prec.weights, bf16_compute=bf16,
                              weights=not resume_state)
        ref = load_sharded(cfg.policy, env, head="lm", dtype=prec.weights, bf16_compute=bf16, prepare=_freeze)
    disable_dropout(policy)  # e.g. lora_dropout: train-mode forwards must equal the eval-mode old log-probs
    check_vocab(tokenizer, policy.config.vocab_size, where=f"{cfg.policy}: tokenizer")
    policy.config.gradient_checkpointing = cfg.run.gradient_checkpointing
    reward = load_sharded(cfg.reward_model, env, head="score", dtype=prec.weights, bf16_compute=bf16, prepare=_freeze)
    value_init = (resume_from / "value_model") if resume_from else (cfg.value_model or cfg.reward_model)
    value = load_sharded(value_init, env, head="score", dtype=prec.weights, bf16_compute=bf16, weights=not resume_state)
    disable_dropout(value)
    policy.train(), value.train()
    policy_opt = make_optimizer(policy, kind=cfg.optim.optimizer, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    value_opt = make_optimizer(value, kind=cfg.optim.optimizer, lr=cfg.optim.value_lr, weight_decay=cfg.optim.weight_decay)
    kl_ctl = (kernels.AdaptiveKLController(cfg.kl.kl_coef, cfg.kl.kl_target, cfg.kl.kl_horizon) if cfg.kl.adaptive_kl
              else kernels.FixedKLController(cfg.kl.kl_coef))
    compute_dtype = prec.autocast
    autocast = lambda: autocast_context(device, enabled=compute_dtype is not None)  # noqa: E731
    gather = distributed.GenerationGather(policy, cfg.sampling.generation_gather, compute_dtype)  # mode "local" when unsharded
    engine = HybridEngine(policy, memory_policy="keep", compute_dtype=compute_dtype, weight_gather=gather)

    # Data: prompts tokenized once (validated: every prompt + max_new_tokens must fit the context).
    ctx = policy.config.max_position_embeddings
    max_prompt = cfg.sampling.max_prompt_len or (ctx - cfg.sampling.max_new_tokens)
    prompts = []
    for ex in load_prompts(cfg.prompts):
        ids = tokenize_prompt(tokenizer, ex.prompt, ex.source)
        check_prompt_length(len(ids), max_prompt, ex.source)
        prompts.append(ids)
    # fixed rollout shapes; one global batch of batch_size × world prompts per iteration, rank r takes its slice
    sampler = EpochSampler(len(prompts), cfg.batch_size * env.world_size, seed=cfg.run.seed, drop_last=True)
    ptx_batches, ptx_loss_fn = (None, None)
    if cfg.ptx.coef > 0:
        if not cfg.ptx.data:
            raise ValueError("ppo: ptx_coef > 0 needs ptx_data (a jsonl of SFT rows)")
        ptx_batches, ptx_loss_fn = _ptx_iterator(cfg, tokenizer, ctx, device)

    start = 0
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        load_training_state(resume_from, {"policy": (policy, policy_opt), "value": (value, value_opt)},
                            legacy={"policy": state.get("optimizer"), "value": state["extra"].get("value_optimizer")})
        kl_ctl.load_state_dict(state["extra"]["kl_ctl"])
        sampler.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        start = int(state["step"])
        distributed.print0(f"[fastrlhf ppo] resumed from {resume_from} at iteration {start}")

    if log is None:
        from fastrlhf.runtime.metrics import MetricsLogger
        log = MetricsLogger(run_dir, tensorboard=cfg.run.tensorboard, stage="ppo", total_steps=cfg.iterations,
                            resume_step=start if resume_from is not None else None)
    gen = torch.Generator(device="cpu")
    batches = iter(sampler)

    def save(step: int) -> Path:
        st = trainer_state_dict(step=step, data_state=sampler.state_dict(), extra={"kl_ctl": kl_ctl.state_dict()})
        extra, export, kept = {}, None, {}

        def merge_lora(state):  # rank 0, on the full weights gathered from the shards
            kept["adapter"] = lora_state_dict(policy, state)
            return merged_state_dict(policy, state)
        if cfg.lora.rank > 0:  # the HF export holds merged weights; the adapter alone is kept to resume
            export = merge_lora
            extra[LORA_FILE] = lambda p: save_safetensors(kept["adapter"], str(p))
        return save_checkpoint(run_dir, step, model=policy, tokenizer=tokenizer, trainer_state=st, config=cfg,
                               keep=cfg.run.keep_checkpoints, extra_files=extra, extra_models={"value_model": value},
                               trained={"policy": (policy, policy_opt), "value": (value, value_opt)},
                               export=export)

    # One iteration's fixed arguments (ppo_core.ppo_iteration, the function the PPO benchmark times too)
    models = dict(engine=engine, policy=policy, ref_policy=ref, reward_model=reward, value_model=value,
                  policy_opt=policy_opt, value_opt=value_opt, ref_context=ref_context)
    sampling = dict(max_new_tokens=cfg.sampling.max_new_tokens, temperature=cfg.sampling.temperature,
                    top_k=cfg.sampling.top_k, top_p=cfg.sampling.top_p, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    packed = cfg.padding_free != "off"  # auto = on
    experience = dict(padding_free=packed, gamma=cfg.loss.gamma, lam=cfg.loss.lam, temperature=cfg.sampling.temperature,
                      eos_token_id=tokenizer.eos_token_id, missing_eos_penalty=cfg.loss.missing_eos_penalty or None,
                      forward_batch_size=cfg.forward_batch_size, autocast=autocast,
                      whiten_advantages=cfg.loss.whiten_advantages, old_logprobs=cfg.loss.old_logprobs,
                      kl_estimator=cfg.kl.kl_estimator,
                      keep_ref_hidden=cfg.kl.kl_loss_coef != 0.0 and cfg.kl.kl_loss_estimator == "full")
    update = dict(padding_free=packed, epochs=cfg.ppo_epochs, minibatch_size=cfg.minibatch_size, clip_eps=cfg.loss.clip_eps,
                  vf_clip_eps=cfg.loss.vf_clip_eps, temperature=cfg.sampling.temperature,
                  max_grad_norm=cfg.optim.max_grad_norm or None, autocast=autocast, ptx_batches=ptx_batches,
                  ptx_coef=cfg.ptx.coef, ptx_loss_fn=ptx_loss_fn, kl_loss_coef=cfg.kl.kl_loss_coef,
                  kl_loss_estimator=cfg.kl.kl_loss_estimator, ref_head_weight=ref.lm_head_weight)

    book = Iterations("ppo", cfg.run, total=cfg.iterations, start=start, log=log, save=save,
                      last=latest_checkpoint(run_dir), loss_keys=("policy_loss", "value_loss"))
    with graceful_interrupt() as stop:
        for step in range(start, cfg.iterations):
            t0 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # 1. sample prompts
            batch = [prompts[i] for i in distributed.local_slice(next(batches), env)]
            # 2.-8. generate, score, old/ref log-probs and values, shaped rewards, GAE, whitening, PPO epochs
            beta = kl_ctl.value  # the β that shapes these rewards (logged below; the controller updates after)
            it = ppo_iteration(batch, **models, kl_coef=beta, sampling=sampling, experience=experience, update=update,
                               rollout_seed=cfg.run.seed * 100003 + step + env.rank * 1_000_003,  # distinct per rank
                               generator=gen, update_seed=cfg.run.seed * 7919 + step)
            rollout, exp, stats = it.rollout, it.experience, it.stats
            t1, t2 = t0 + it.time_generate, t0 + it.time_generate + it.time_experience
            t3 = t2 + it.time_train
            # KL per sequence (nats), mean over all ranks' rollouts: the quantity the adaptive controller targets
            seq_kl = distributed.reduce_metrics({"kl": float((exp.kl * exp.mask).sum(-1).mean())})["kl"]
            n_tok = int(exp.mask.sum())
            # rollout log-probs vs the first forward on the same weights: the recomputed old log-probs, or (rollout
            # mode) the update's first minibatch before any optimizer step
            if cfg.loss.old_logprobs == "recompute":
                mm_mean, mm_max = logprob_mismatch(exp.rollout_logprobs, exp.old_logprobs, exp.mask)
            else:
                mm_mean, mm_max = stats["first_forward_mismatch_mean"], stats["first_forward_mismatch_max"]
            metrics = {
                "step": step + 1, "score": float(exp.scores.mean()), "kl": seq_kl, "kl_coef": float(beta),
                "non_score_reward": float((-beta * exp.kl * exp.mask).sum(-1).mean()),
                "logprob_mismatch_mean": mm_mean, "logprob_mismatch_max": mm_max, "kl_loss": stats["kl_loss"],
                "entropy": stats["entropy"], "clipfrac": stats["clipfrac"], "approx_kl": stats["approx_kl"],
                "policy_loss": stats["policy_loss"], "value_loss": stats["value_loss"],
                "vf_clipfrac": stats["vf_clipfrac"], "ptx_loss": stats["ptx_loss"], "grad_norm": stats["grad_norm"],
                "explained_variance": explained_variance(exp.old_values, exp.returns, exp.mask),
                "advantage_mean": masked_mean(exp.advantages, exp.mask),
                "response_length": float(rollout.lengths.float().mean()),
                "tokens_per_s": n_tok / max(t3 - t0, 1e-9),
                "time/generate": t1 - t0, "time/experience": t2 - t1, "time/train": t3 - t2,
                "peak_mem_gb": peak_memory_gb(device),
            }
            metrics = distributed.reduce_metrics(metrics, sum_keys=("tokens_per_s",),
                                       max_keys=("peak_mem_gb", "time/generate", "time/experience", "time/train",
                                                 "logprob_mismatch_max"))
            if on_iteration is not None:
                on_iteration(step + 1, rollout, exp, metrics)
            kl_ctl.update(seq_kl, cfg.batch_size * env.world_size)  # β for the next iteration's rewards
            if book.record(step, metrics, stop_now=distributed.any_rank(bool(stop))):  # Ctrl-C: all ranks save, stop
                break
    out = book.close(run_dir)
    engine.free()
    return {**out}


def main(argv=None) -> dict:
    from fastrlhf.runtime.config import parse_config
    out = train(parse_config(PPOConfig, argv, prog="fastrlhf ppo"))
    distributed.shutdown()  # under torchrun: leave the process group once every rank is done
    return out
