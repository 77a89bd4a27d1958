"""The tests' tolerances, in one place: named tiers for allclose comparisons and the rounding bounds they come from.

Every comparison is against a reference fed the very same input values (usually float64), so a tolerance only has
to cover the rounding of the code under test:

- ``EXACT``: bit-identical (the same ops in the same order, or integer results).
- ``FP64``: float64 against float64 written differently (closed forms, a reference of a reference).
- ``FP32``: one fp32 op or fused kernel against float64 (fp32 arithmetic, fp32 accumulation of O(1) terms).
- ``FP32_MODEL``: fp32 through a model's layers (matmuls of width H, softmax, norms) against float64 or another
  implementation (Hugging Face transformers, the padded path): rounding compounds per layer.
- ``rounding_bound``: one rounding of an exact value to a low-precision dtype (gradients autograd returns in the
  input's dtype).

Fused-loss tolerances (``LOSS_TOL``, ``GRAD_TOL``, ``count_tol``):

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

Rounding bounds (``rounding_bound``): |x̂ − x| ≤ ULP[dtype]·|x| + SUBNORMAL_STEP[dtype].

ULP: one unit in the last place, relative: 2⁻⁷ bf16, 2⁻¹⁰ fp16 (a full ulp, not the half of round-to-nearest, because
Triton's interpreter truncates where the GPU rounds); fp32 gradients are not rounded again (0). SUBNORMAL_STEP: below
the smallest normal number the grid spacing is fixed, so a relative bound fails there; one step of that grid
(smallest_normal · eps: 2⁻²⁴ fp16, 2⁻¹³³ bf16) bounds the error absolutely — fp16 gradients under 2⁻¹⁴ do occur.
"""
from __future__ import annotations

import torch

EXACT = dict(rtol=0.0, atol=0.0)
FP64 = dict(rtol=1e-12, atol=1e-12)
FP32 = dict(rtol=1e-5, atol=1e-6)
FP32_MODEL = dict(rtol=1e-4, atol=1e-5)

ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
SUBNORMAL_STEP = {dt: (0.0 if dt == torch.float32 else torch.finfo(dt).smallest_normal * torch.finfo(dt).eps)
                  for dt in ULP}


def rounding_bound(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest error of rounding ``exact`` once to ``dtype`` (elementwise)."""
    return ULP[dtype] * exact.abs() + SUBNORMAL_STEP[dtype]


LOSS_TOL = FP32
GRAD_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-9, atol_rel=1e-6),
    torch.bfloat16: dict(rtol=2 * 2.0 ** -8, atol=1e-9, atol_rel=1e-6),   # bf16: 8 significand bits, unit roundoff 2⁻⁸
    torch.float16: dict(rtol=2 * 2.0 ** -11, atol=2.0 ** -24, atol_rel=1e-6),   # fp16: 11 bits, unit roundoff 2⁻¹¹
}


def assert_close(got: torch.Tensor, ref: torch.Tensor, *, rtol: float, atol: float, what: str, atol_rel: float = 0.0):
    """allclose(got, ref) with atol + atol_rel · max|ref| as the absolute tolerance."""
    got64, ref64 = got.detach().double().cpu(), ref.detach().double().cpu()
    atol = atol + atol_rel * (ref64.abs().max().item() if ref64.numel() else 0.0)
    assert torch.isfinite(got64).all(), f"{what}: non-finite values"
    torch.testing.assert_close(got64, ref64, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def count_tol(mask: torch.Tensor) -> float:
    """atol for a fraction-of-valid-tokens metric: 2 tokens may sit within rounding of a boundary."""
    return 2.0 / max(int((mask != 0).sum()), 1) + 1e-7
