"""Shared inputs and tolerances for the PPO policy / value loss tests.

Tolerances (each relative to a float64 reference fed the very same input values):
- Loss and metrics, every input dtype: the kernels read fp32 / bf16 / fp16 inputs exactly and compute and accumulate in
  fp32, so they are held to fp32 rounding of a sum of O(1) terms over ≤ 64K tokens: rtol 1e-5, atol 1e-6.
  (Plain PyTorch in bf16 / fp16 arithmetic is off by ~1e-3 / ~1e-4 relative on the same data; we are not.)
- Counting metrics (clipfrac, vf_clipfrac): a token whose ratio sits within fp32 rounding of a clip boundary may be
  classified differently by fp32 and float64: up to 2 tokens, atol 2 / #valid tokens.
- Gradient: fp32 math as above, then stored in the input's dtype (autograd hands each input a gradient of its own
  dtype), a single rounding: rtol = 2 · unit roundoff of that dtype (fp32 1e-5 for accumulation), atol 2⁻²⁴ for
  fp16's subnormal spacing (token-mean gradients at [64, 1024] are ~1e-5), 1e-9 otherwise; plus 1e-6 · max|grad|:
  an element can be a near-cancellation of the clipped-loss term and the KL term (each of the size of the largest
  elements), which leaves fp32 rounding of those terms (≈ 16 · 6e-8 of them) as its absolute error.
"""
from __future__ import annotations

import torch

from tests.conftest import pick

LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-9, atol_rel=1e-6),
    torch.bfloat16: dict(rtol=2 * 2.0 ** -8, atol=1e-9, atol_rel=1e-6),   # bf16: 8 significand bits, unit roundoff 2⁻⁸
    torch.float16: dict(rtol=2 * 2.0 ** -11, atol=2.0 ** -24, atol_rel=1e-6),   # fp16: 11 bits, unit roundoff 2⁻¹¹
}


def shape():
    """(B, T): small under the interpreter (T = 21 → two BLOCK_T = 16 tiles per row), [64, 1024] on CUDA."""
    return pick((6, 21), (64, 1024))


def make_mask(B: int, T: int, layout: str = "mixed", device="cpu") -> torch.Tensor:
    """Bool mask [B, T]. layout: "right" (padding after), "left" (padding before), "holes" (random gaps), "mixed"
    (all three over the rows, with row 1 entirely masked and row 0 fully valid)."""
    lengths = torch.randint(1, T + 1, (B,))
    pos = torch.arange(T)[None, :]
    right = pos < lengths[:, None]
    left = pos >= (T - lengths)[:, None]
    holes = torch.rand(B, T) > 0.3
    if layout == "right":
        m = right
    elif layout == "left":
        m = left
    elif layout == "holes":
        m = holes
    else:
        kind = torch.arange(B)[:, None] % 3
        m = torch.where(kind == 0, right, torch.where(kind == 1, left, holes))
        m[0] = True
        if B > 1:
            m[1] = False
    return m.to(device)


def assert_close(got: torch.Tensor, ref: torch.Tensor, *, rtol: float, atol: float, what: str, atol_rel: float = 0.0):
    """allclose(got, ref) with atol + atol_rel · max|ref| as the absolute tolerance."""
    got64, ref64 = got.detach().double().cpu(), ref.detach().double().cpu()
    atol = atol + atol_rel * (ref64.abs().max().item() if ref64.numel() else 0.0)
    assert torch.isfinite(got64).all(), f"{what}: non-finite values"
    torch.testing.assert_close(got64, ref64, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def count_tol(mask: torch.Tensor) -> float:
    """atol for a fraction-of-valid-tokens metric: 2 tokens may sit within rounding of a boundary."""
    return 2.0 / max(int((mask != 0).sum()), 1) + 1e-7
