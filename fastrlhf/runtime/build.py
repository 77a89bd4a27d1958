"""Building a model for this process: read an HF folder, prepare it (LoRA, freezing), shard it under torchrun."""
from __future__ import annotations

import torch

from fastrlhf.models.hf_io import load_model, materialize
from fastrlhf.runtime import distributed


def load_sharded(path, env: distributed.DistEnv, *, head: str = "lm", dtype: torch.dtype = torch.float32, bf16_compute: bool = False,
                 prepare=None, weights: bool = True) -> torch.nn.Module:
    """``load_model`` + ``shard_model`` without a full copy of the weights on every rank.

    Not launched: ``load_model(path)`` on ``env.device`` (then ``prepare``). Under torchrun: rank 0 reads the checkpoint
    into host memory, the other ranks build the model on the meta device (no memory); every rank shards it, the meta
    shards are allocated on the rank's device, and the weights are broadcast from rank 0 tensor by tensor, each rank
    keeping its shard (``set_model_state_dict(..., full_state_dict=True, broadcast_from_rank0=True)``). Host memory:
    one full copy on rank 0 only. ``prepare(model)`` (e.g. LoRA adapters, freezing) runs before sharding.
    weights=False: only the config of ``path`` is read; the (sharded) model gets uninitialised storage, to be filled
    from a checkpoint's training state (``checkpoint.load_training_state``: each rank reads only its shards).
    """
    if not env.launched:
        model = load_model(path, head=head, dtype=dtype, device=env.device, weights=weights)
        if prepare is not None:
            model = prepare(model) or model
        return model if weights else materialize(model, env.device)
    read = weights and env.rank == 0
    model = load_model(path, head=head, dtype=dtype, device="cpu", weights=read)
    if prepare is not None:
        model = prepare(model) or model  # e.g. LoRA adapters: rank 0's fresh ones are broadcast with the rest
    full = dict(model.state_dict()) if read else {}  # keeps the full tensors alive until the broadcast
    distributed.shard_model(model, env, bf16_compute=bf16_compute)
    if not read:
        model.to_empty(device=env.device)  # the meta shards get real (uninitialised) storage on this rank's device
    if weights:
        distributed.load_full_state(model, full, strict=True)
    return model


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set p = 0 on every dropout module (e.g. peft's ``lora_dropout``), in place: a forward in train mode then
    computes the same function as in eval mode (PPO's old and new log-probs must come from one function)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
    return model
