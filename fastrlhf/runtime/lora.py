"""LoRA for the PPO policy through peft (optional dependency): the reference model is the policy with its adapter disabled.

    add_lora(model, rank=16, alpha=32)           # freezes the base weights, trains only the low-rank adapters
    with adapters_disabled(model): ...           # the frozen SFT model (the KL reference) without a second copy
    merged_copy(model) / merged_state_dict(model) # W + (alpha/r)·B·A as a plain CausalLM / its weights, for the HF export
    lora_state_dict(model) / check_lora_state_dict(model, sd)  # the adapter alone; does a saved one fit the model

LoRA (Hu et al. 2021): W x + (alpha / r) · B A x with A [r, in], B [out, r], B initialised to 0 so training starts at
the SFT model exactly.

The model fuses q/k/v_proj into ``qkv_proj`` and gate/up_proj into ``gate_up_proj``. Targets naming HF's separate
projections (the default) split those fused layers back first (``unfuse_projections``), so every target gets its own
adapter as in peft on an HF model, and adapter checkpoints keep HF's names; targets "qkv_proj" / "gate_up_proj" put one
adapter on the fused layer instead (and keep the fused matmul).
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
    from fastrlhf.models.decoder import unfuse_projections

    unfuse_projections(model, targets)  # adapters on q_proj / up_proj / ... need those layers separate
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
def merged_state_dict(model, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The weights of ``model`` with every adapter merged: W + (alpha/r)·B·A per adapted layer, keys as in the plain
    model (no ``.base_layer.``, no ``lora_*``). ``state``: the full weights to merge (default ``model.state_dict()``;
    e.g. gathered from an FSDP-sharded model: the layers' names and scalings come from ``model``)."""
    from peft.tuners.lora import LoraLayer

    state = model.state_dict() if state is None else state
    scalings = {name: {a: m.scaling[a] for a in m.active_adapters}
                for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    out = {}
    for k, v in state.items():
        if "lora_" in k:
            continue
        if k.endswith(".base_layer.weight") and k[: -len(".base_layer.weight")] in scalings:
            layer = k[: -len(".base_layer.weight")]
            w = v.float()
            for a, scale in scalings[layer].items():  # ΔW = scale · B [out, r] @ A [r, in]
                w = w + scale * (state[f"{layer}.lora_B.{a}.weight"].float() @ state[f"{layer}.lora_A.{a}.weight"].float())
            v = w.to(v.dtype)
        out[k.replace(".base_layer.", ".")] = v
    return out


@torch.no_grad()
def merged_copy(model):
    """A plain ``CausalLM``/``ScoreModel`` of the same config whose weights are W + ΔW (ΔW = alpha/r · B A)."""
    clean = type(model)(model.config)
    clean.load_state_dict(merged_state_dict(model))
    return clean.to(next(model.parameters()).device)


def lora_state_dict(model, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors alone (``lora_*`` keys) of ``state`` (default ``model.state_dict()``), on the CPU."""
    state = model.state_dict() if state is None else state
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if "lora_" in k}


def check_lora_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    """Raise if ``state`` lacks adapter tensors of ``model`` (another lora_rank / targets than the checkpoint's)."""
    missing = [k for k in model.state_dict() if "lora_" in k and k not in state]
    if missing:
        raise ValueError(f"LoRA adapter checkpoint lacks {len(missing)} tensors (e.g. {missing[0]}); was it saved with "
                         "the same lora_rank and targets?")
