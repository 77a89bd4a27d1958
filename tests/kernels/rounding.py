"""How far one rounding of an exact value to a test dtype can move it (for gradients that autograd returns in the
input's dtype): |x̂ − x| ≤ ULP[dtype]·|x| + SUBNORMAL_STEP[dtype].

ULP: one unit in the last place, relative: 2⁻⁷ bf16, 2⁻¹⁰ fp16 (a full ulp, not the half of round-to-nearest, because
Triton's interpreter truncates where the GPU rounds); fp32 gradients are not rounded again (0). SUBNORMAL_STEP: below
the smallest normal number the grid spacing is fixed, so a relative bound fails there; one step of that grid
(smallest_normal · eps: 2⁻²⁴ fp16, 2⁻¹³³ bf16) bounds the error absolutely — fp16 gradients under 2⁻¹⁴ do occur.
"""
import torch

ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
SUBNORMAL_STEP = {dt: (0.0 if dt == torch.float32 else torch.finfo(dt).smallest_normal * torch.finfo(dt).eps)
                  for dt in ULP}


def rounding_bound(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest error of rounding ``exact`` once to ``dtype`` (elementwise)."""
    return ULP[dtype] * exact.abs() + SUBNORMAL_STEP[dtype]
