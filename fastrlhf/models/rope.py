"""Rotary position embeddings (RoPE) with the scaling kinds shipped by Llama 2/3, Qwen2/2.5 and Mistral configs.

Notation: D = head_dim, B batch, T tokens. ``inv_freq`` [D/2] holds the angular frequency of each rotated pair;
a token at position p rotates pair i by angle ``p * inv_freq[i]``. The layout is "rotate half": pair i is (x[i], x[i + D/2]).

Kinds (``rope_scaling["rope_type"]``, legacy key ``"type"``), following the definitions in the HF config docs / papers:
  default : inv_freq_i = theta^(-2i/D)
  linear  : inv_freq_i / factor                                   (position interpolation, Chen et al. 2023)
  dynamic : theta' = theta * (factor * L / L0 - (factor - 1))^(D/(D-2)), L = max(positions)+1 clamped >= L0 (NTK-aware)
  llama3  : per-wavelength interpolation between inv_freq and inv_freq/factor (Llama 3.1 release notes)
  yarn    : NTK-by-parts ramp between interpolated and extrapolated frequencies, cos/sin scaled by
            attention_factor = 0.1 ln(factor) + 1 (Peng et al. 2023, "YaRN")
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

ROPE_KINDS = ("default", "linear", "dynamic", "llama3", "yarn")


def rope_kind(scaling: dict | None) -> str:
    if not scaling:
        return "default"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_KINDS:
        raise ValueError(f"fastrlhf/models/rope.py: rope_scaling type {kind!r} is not supported; supported: {ROPE_KINDS}")
    return kind


def _base_inv_freq(theta: float | Tensor, dim: int) -> Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # [D/2]: theta^(-2i/D)


def rope_init(head_dim: int, theta: float, scaling: dict | None, max_pos: int) -> tuple[Tensor, float]:
    """Static ``(inv_freq [D/2] fp32, attention_scaling)``; for "dynamic" this is the unscaled table (see dynamic_inv_freq)."""
    kind, s, dim = rope_kind(scaling), scaling or {}, head_dim
    if s.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("fastrlhf/models/rope.py: partial_rotary_factor != 1 is not supported")
    inv = _base_inv_freq(theta, dim)
    if kind in ("default", "dynamic"):
        return inv, 1.0
    if kind == "linear":
        return inv / s["factor"], 1.0  # p / factor * inv_freq == p * (inv_freq / factor)
    if kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        l0 = s.get("original_max_position_embeddings", max_pos)
        wavelen = 2 * math.pi / inv
        out = torch.where(wavelen > l0 / lo, inv / factor, inv)  # long wavelengths: interpolate fully
        smooth = (l0 / wavelen - lo) / (hi - lo)  # in (0, 1) for the medium band
        medium = (wavelen >= l0 / hi) & (wavelen <= l0 / lo)
        out = torch.where(medium, (1 - smooth) * out / factor + smooth * out, out)
        return out, 1.0
    # yarn
    l0 = s.get("original_max_position_embeddings", max_pos)
    factor = s.get("factor") or max_pos / l0

    def mscale(scale: float, m: float = 1.0) -> float:  # YaRN eq. 22: sqrt(1/t) = 0.1 ln(s) + 1
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn = float(mscale(factor, m) / mscale(factor, m_all)) if (m and m_all) else mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def corr_dim(n_rot: float) -> float:  # dimension whose wavelength makes n_rot turns over l0 tokens
        return dim * math.log(l0 / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # 0 -> extrapolate
    extrap = 1 - ramp
    inv = (inv / factor) * (1 - extrap) + inv * extrap
    return inv, attn


def dynamic_inv_freq(head_dim: int, theta: float, factor: float, max_pos: int, position_ids: Tensor) -> Tensor:
    """NTK-aware dynamic scaling, recomputed from the positions in this call (a tensor op, no host sync). [D/2] fp32."""
    L = torch.clamp(position_ids.max() + 1, min=max_pos).float()
    base = theta * ((factor * L / max_pos) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return _base_inv_freq(base, head_dim).to(position_ids.device)


def rope_cos_sin(inv_freq: Tensor, position_ids: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """``position_ids`` [B, T] -> ``cos, sin`` [B, T, D] fp32 (already multiplied by the attention scaling)."""
    freqs = position_ids[..., None].float() * inv_freq.float().to(position_ids.device)  # [B, T, D/2]: p * inv_freq_i
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
    return emb.cos() * scaling, emb.sin() * scaling
