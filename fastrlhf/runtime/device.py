"""Which device a run uses and whether it computes under bf16 autocast."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when present, else cpu; otherwise the named device.

    "cuda:N" also becomes the process's current CUDA device (``torch.cuda.set_device``): Triton launches its kernels, and
    CUDA graphs and streams are made, on the current device, so without it work for tensors on GPU N would go to GPU 0.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available (use --device cpu or auto)")
    if dev.type == "cuda" and dev.index is not None:
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device '{name}': only {torch.cuda.device_count()} CUDA device(s) visible")
        torch.cuda.set_device(dev.index)
    return dev


def use_autocast(mixed_precision: str, device: torch.device) -> bool:
    """bf16 autocast over fp32 master weights: "auto" = on CUDA only, "bf16" = always, "no" = never."""
    return mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")


@dataclass(frozen=True)
class Precision:
    """How a stage's models are loaded and run: ``weights`` the parameter dtype, ``autocast`` the compute dtype of the
    forward (None = none). One rule for every model of a stage, trained or frozen, so that a frozen copy of the policy
    (the PPO reference) computes exactly like the policy: same weights dtype, same autocast, same FSDP compute dtype."""

    weights: torch.dtype
    autocast: torch.dtype | None

    @property
    def bf16_compute(self) -> bool:
        return self.autocast == torch.bfloat16


def model_precision(mixed_precision: str, device: torch.device) -> Precision:
    """fp32 weights (the masters of the trained models, and the frozen ones alike), bf16 autocast where
    ``use_autocast`` says so."""
    return Precision(weights=torch.float32,
                     autocast=torch.bfloat16 if use_autocast(mixed_precision, device) else None)
