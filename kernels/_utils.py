"""Small helpers shared by the kernel files (shape flattening, dtype checks)."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float tensor (fp32/bf16/fp16), got {t.dtype}")


def check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError("shape mismatch: " + ", ".join(f"{k}{list(s)}" for k, s in shapes.items()))


def as_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Mask as fp32 0/1 of ``like``'s shape (None -> all ones). Accepts bool/int/float masks."""
    if mask is None:
        return torch.ones(like.shape, dtype=torch.float32, device=like.device)
    if tuple(mask.shape) != tuple(like.shape):
        raise ValueError(f"mask shape {list(mask.shape)} != {list(like.shape)}")
    return (mask != 0).to(torch.float32)


def no_autocast(t: torch.Tensor):
    """A context that turns autocast off on ``t``'s device: the fused ops choose their own precision (fp32
    accumulation), and their CPU paths' torch matmuls must not be recast to bf16 (rounded logits) by an outer autocast."""
    return torch.autocast(t.device.type, enabled=False)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
