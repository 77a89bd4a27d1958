"""LoRA for the PPO policy through peft (optional dependency): the reference model is the policy with its adapter disabled.

    add_lora(model, rank=16, alpha=32)           # freezes the base weights, trains only the low-rank adapters
    with adapters_disabled(model): ...           # the frozen SFT model (the KL reference) without a second copy
    merged_copy(model)                           # a plain CausalLM with W + (alpha/r)·B·A, for the Hugging Face export
    lora_state_dict(model) / load_lora_state_dict(model, sd)   # the adapter alone, to resume

LoRA (Hu et al. 2021): W x + (alpha / r) · B A x with A [r, in], B [out, r], B initialised to 0 so training starts at
the SFT model exactly.
"""
from __future__ import annotations

import contextlib

import torch

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _peft():
    try:
        import peft
    except ImportError as e:
        raise RuntimeError("LoRA needs peft (pip install peft, or pip install 'fastrlhf[lora]'); "
                           "set lora_rank 0 to train all weights") from e
    return peft


def add_lora(model, *, rank: int, alpha: float, dropout: float = 0.0, targets=DEFAULT_TARGETS):
    """Inject LoRA adapters into ``targets`` linear layers (in place) and freeze every non-adapter parameter."""
    peft = _peft()
    if rank <= 0:
        raise ValueError(f"add_lora: rank must be > 0, got {rank}")
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    peft.inject_adapter_in_model(cfg, model)
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        n += int("lora_" in name)
    if n == 0:
        raise ValueError(f"add_lora: no layer named like {list(targets)} in {type(model).__name__}")
    return model


def _lora_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def has_lora(model) -> bool:
    try:
        return bool(_lora_layers(model))
    except ImportError:
        return False


@contextlib.contextmanager
def adapters_disabled(model):
    """Run the base (SFT) model: every adapter off inside the block, back on after (also on an exception)."""
    layers = _lora_layers(model)
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


@torch.no_grad()
def merged_copy(model):
    """A plain ``CausalLM``/``ScoreModel`` of the same config whose weights are W + ΔW (ΔW = alpha/r · B A)."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            deltas[name + ".base_layer.weight"] = sum(m.get_delta_weight(a) for a in m.active_adapters)
    state = {}
    for k, v in model.state_dict().items():
        if "lora_" in k:
            continue
        w = v + deltas[k].to(v.dtype) if k in deltas else v
        state[k.replace(".base_layer.", ".")] = w
    clean = type(model)(model.config)
    clean.load_state_dict(state)
    return clean.to(next(model.parameters()).device)


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if "lora_" in k}


def load_lora_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    missing = [k for k in lora_state_dict(model) if k not in state]
    if missing:
        raise ValueError(f"LoRA adapter checkpoint lacks {len(missing)} tensors (e.g. {missing[0]}); was it saved with "
                         "the same lora_rank and targets?")
    model.load_state_dict(state, strict=False)
