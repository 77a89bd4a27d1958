"""Config sections the stages share: where and how a run runs (``run``), the SFT / reward-model optimizer (``optim``)
and how the RL stages sample (``sampling``).

In a YAML file they are nested (``run: {output_dir: runs/x}``), on the command line dotted (``--run.output_dir runs/x``);
the flat names (``output_dir``, ``--output_dir``, ``SFTConfig(output_dir=...)``) keep working.
"""
from __future__ import annotations

from dataclasses import dataclass

from fastrlhf.runtime.config import param


@dataclass
class RunSection:
    """Where a run writes, what it runs on, how it checkpoints, logs and resumes."""

    output_dir: str = param("runs/run", "where checkpoints, metrics.jsonl and plots go")
    seed: int = param(0, "seed of data order, held-out split, sampling and initialisation")
    device: str = param("auto", "auto | cpu | cuda | cuda:N")
    mixed_precision: str = param("auto", "auto (bf16 autocast on CUDA) | bf16 | no", choices=("auto", "bf16", "no"))
    gradient_checkpointing: bool = param(False, "recompute each block in backward (less memory)")
    save_every: int = param(0, "checkpoint every N steps (0 = only at the end)", ge=0)
    keep_checkpoints: int = param(2, "how many checkpoints to keep", ge=0)
    resume: str = param("", "'' | auto | a checkpoint folder: continue from the same step, data order and RNG")
    overwrite: bool = param(False, "start over in a used output_dir: its checkpoints, metrics and plots are deleted first")
    log_every: int = param(1, "console line every N steps", ge=0)
    tensorboard: bool = param(False, "also log to TensorBoard (if installed)")
    plots: bool = param(True, "PNG plots of the curves beside the final checkpoint (if matplotlib is installed)")


@dataclass
class OptimSection:
    """AdamW with linear warmup and cosine decay (SFT and reward model)."""

    lr: float = param(2e-5, "peak learning rate", gt=0)
    min_lr_ratio: float = param(0.1, "final lr of the cosine schedule, as a fraction of lr", ge=0, le=1)
    warmup_ratio: float = param(0.03, "fraction of the steps with linear warmup", ge=0, le=1)
    weight_decay: float = param(0.0, "AdamW weight decay (matrices only)", ge=0)
    betas: tuple[float, ...] = param((0.9, 0.95), "AdamW betas", ge=0, lt=1)
    max_grad_norm: float = param(1.0, "gradient clipping by global norm (0 = off)", ge=0)


@dataclass
class SamplingSection:
    """How rollouts are sampled."""

    max_new_tokens: int = param(32, "response length cap G (tokens)", ge=1)
    max_prompt_len: int = param(0, "longest prompt allowed (tokens); 0 = the model's context minus max_new_tokens", ge=0)
    temperature: float = param(1.0, "sampling temperature (the same τ scales old/ref/new log-probs)", gt=0)
    top_k: int = param(0, "top-k sampling (0 = off)", ge=0)
    top_p: float = param(1.0, "nucleus sampling (1 = off)", gt=0, le=1)
    generation_gather: str = param("auto", "under torchrun: gather the sharded policy once per rollout (full), per block "
                                   "and decode step (per_block: less memory), or auto (full when it fits)",
                                   choices=("auto", "full", "per_block"))
