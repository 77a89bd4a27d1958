"""Per-token KL estimators between the policy and the reference policy: the one definition of their value and gradient.

Notation: N = number of tokens; inputs may have any shape (e.g. [B, T]), the output has the same shape, fp32.
With d = ref_logp − logp (tokens sampled from π, estimating KL(π ‖ π_ref)) and d' = clamp(d, −20, 20):
    k1 = −d,   k2 = ½ d²,   k3 = exp(d') − d' − 1,   abs = |d|;   optionally clamp(result, lo, hi).
k3 is evaluated at d' (not only its exp), so it stays ≥ 0 and monotone in |d| with a zero gradient beyond |d| = 20, like
the ratio clamp of the PPO loss. ``kl_estimate`` (Triton) and ``kl_estimator_ref`` (PyTorch) are the only places the
estimators are written; ``kl_penalty`` and the fused PPO loss (``ppo_loss.py``) both use them, with one code table.
CUDA: one elementwise Triton kernel forward, one backward (gradients for both inputs). CPU: the PyTorch reference in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import use_triton
from ._utils import check_float, check_same_shape

ESTIMATORS = ("k1", "k2", "k3", "abs")
KL_CODE = {"k1": 1, "k2": 2, "k3": 3, "abs": 4}  # constexpr EST / KL_EST of the kernels; 0 means "no KL term"
KL_NAME = {code: name for name, code in KL_CODE.items()}
D_CLAMP = 20.0  # |d| bound of k3 (exp(20) ≈ 4.9e8: finite in fp32)
BLOCK = 1024  # elements per program; the only config the launcher picks (num_warps=4)
NUM_WARPS = 4


@triton.jit
def kl_estimate(d, EST: tl.constexpr):
    """Per-token estimator of d = ref_logp − logp (fp32 tensor) -> (k, ∂k/∂d); EST is a ``KL_CODE`` value (1..4)."""
    if EST == 1:
        k = -d  # k1 = −d
        dk_dd = tl.full(d.shape, -1.0, tl.float32)  # ∂k1/∂d = −1
    elif EST == 2:
        k = 0.5 * d * d  # k2 = ½ d²
        dk_dd = d  # ∂k2/∂d = d
    elif EST == 3:
        dc = tl.minimum(tl.maximum(d, -20.0), 20.0)  # d' = clamp(d, −20, 20)
        e = tl.exp(dc)
        k = e - dc - 1.0  # k3 = exp(d') − d' − 1
        dk_dd = tl.where((d >= -20.0) & (d <= 20.0), e - 1.0, 0.0)  # ∂k3/∂d = (exp(d) − 1)·1[|d| ≤ 20] (bounds: as torch)
    else:
        k = tl.abs(d)  # abs = |d|
        dk_dd = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))  # ∂|d|/∂d = sign(d) (0 at d = 0, as torch)
    return k, dk_dd


def kl_estimator_ref(d: torch.Tensor, estimator: str) -> torch.Tensor:
    """PyTorch definition of the estimators of d = ref_logp − logp, [...] -> [...] in d's dtype (float64 in the tests);
    autograd gives the reference gradient."""
    if estimator == "k1":
        return -d  # k1 = −d
    if estimator == "k2":
        return 0.5 * d * d  # k2 = ½ d²
    if estimator == "k3":
        dc = d.clamp(-D_CLAMP, D_CLAMP)  # d' = clamp(d, −20, 20)
        return torch.exp(dc) - dc - 1.0  # k3 = exp(d') − d' − 1
    if estimator == "abs":
        return d.abs()  # abs = |d|
    raise ValueError(f"kl estimator {estimator!r}: valid estimators are {ESTIMATORS}")


def kl_value_and_grad_torch(d: torch.Tensor, estimator: str):
    """(k, ∂k/∂d) of ``kl_estimator_ref`` for the CPU paths that need the derivative as a tensor (e.g. the PPO loss);
    the derivative comes from autograd on the one PyTorch definition. d: [...] -> ([...], [...])."""
    with torch.enable_grad():
        dd = d.detach().requires_grad_(True)
        k = kl_estimator_ref(dd, estimator)
        (dk_dd,) = torch.autograd.grad(k, dd, torch.ones_like(k))
    return k.detach(), dk_dd


def _check_args(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str, clamp) -> None:
    if estimator not in KL_CODE:
        raise ValueError(f"kl_penalty: unknown estimator {estimator!r}; valid estimators are {ESTIMATORS}")
    check_float("kl_penalty: logprobs", logprobs)
    check_float("kl_penalty: ref_logprobs", ref_logprobs)
    check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    if logprobs.device != ref_logprobs.device:
        raise ValueError(f"kl_penalty: logprobs on {logprobs.device} but ref_logprobs on {ref_logprobs.device}")
    if clamp is not None:
        if len(clamp) != 2 or not float(clamp[0]) <= float(clamp[1]):
            raise ValueError(f"kl_penalty: clamp must be (lo, hi) with lo <= hi, got {clamp!r}")


def kl_penalty_ref(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, estimator: str = "k1", clamp=None) -> torch.Tensor:
    """Plain PyTorch reference in the inputs' (promoted) dtype; float64 in the tests. Differentiable by autograd.

    logprobs, ref_logprobs: [...] (same shape) -> [...].
    """
    _check_args(logprobs, ref_logprobs, estimator, clamp)
    k = kl_estimator_ref(ref_logprobs - logprobs, estimator)  # d = ref_logp − logp
    if clamp is not None:
        k = k.clamp(float(clamp[0]), float(clamp[1]))
    return k


@triton.jit
def _kl_fwd_kernel(
    # data ptrs
    logp_ptr, ref_ptr, out_ptr,
    # shapes
    n,
    # constants
    lo, hi,
    EST: tl.constexpr, HAS_CLAMP: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    logp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    k, _ = kl_estimate(ref - logp, EST)  # d = ref_logp − logp
    if HAS_CLAMP:
        k = tl.minimum(tl.maximum(k, lo), hi)  # clamp(k, lo, hi)
    tl.store(out_ptr + offs, k, mask=valid)


@triton.jit
def _kl_bwd_kernel(
    # data ptrs
    logp_ptr, ref_ptr, grad_out_ptr, grad_logp_ptr, grad_ref_ptr,
    # shapes
    n,
    # constants
    lo, hi,
    EST: tl.constexpr, HAS_CLAMP: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    logp = tl.load(logp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(grad_out_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    k, dk_dd = kl_estimate(ref - logp, EST)
    if HAS_CLAMP:
        g = tl.where((k >= lo) & (k <= hi), g, 0.0)  # result clamp: gradient only where lo ≤ k ≤ hi
    gd = g * dk_dd  # ∂L/∂d
    tl.store(grad_logp_ptr + offs, -gd, mask=valid)  # ∂d/∂logp = −1
    tl.store(grad_ref_ptr + offs, gd, mask=valid)  # ∂d/∂ref_logp = +1


def _launch_args(clamp):
    has_clamp = clamp is not None
    lo, hi = (float(clamp[0]), float(clamp[1])) if has_clamp else (0.0, 0.0)
    return lo, hi, has_clamp


class _KLPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs, ref_logprobs, estimator, clamp):
        logp = logprobs.detach().contiguous().view(-1)  # [N]
        ref = ref_logprobs.detach().contiguous().view(-1)  # [N]
        n = logp.numel()
        out = torch.empty(n, dtype=torch.float32, device=logp.device)
        lo, hi, has_clamp = _launch_args(clamp)
        if n > 0:
            _kl_fwd_kernel[(triton.cdiv(n, BLOCK),)](
                logp, ref, out, n, lo, hi,
                EST=KL_CODE[estimator], HAS_CLAMP=has_clamp, BLOCK=BLOCK, num_warps=NUM_WARPS,
            )
        ctx.save_for_backward(logp, ref)
        ctx.estimator, ctx.clamp, ctx.shape = estimator, clamp, logprobs.shape
        return out.view(logprobs.shape)

    @staticmethod
    def backward(ctx, grad_out):
        logp, ref = ctx.saved_tensors
        n = logp.numel()
        g = grad_out.contiguous().view(-1)
        grad_logp = torch.empty_like(logp)  # input dtype: the store rounds the fp32 gradient (to nearest on GPUs)
        grad_ref = torch.empty_like(ref)
        lo, hi, has_clamp = _launch_args(ctx.clamp)
        if n > 0:
            _kl_bwd_kernel[(triton.cdiv(n, BLOCK),)](
                logp, ref, g, grad_logp, grad_ref, n, lo, hi,
                EST=KL_CODE[ctx.estimator], HAS_CLAMP=has_clamp, BLOCK=BLOCK, num_warps=NUM_WARPS,
            )
        return grad_logp.view(ctx.shape), grad_ref.view(ctx.shape), None, None


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, estimator: str = "k1", clamp=None) -> torch.Tensor:
    """Per-token KL estimate, fp32, differentiable w.r.t. both inputs.

    logprobs, ref_logprobs: [...] (e.g. [B, T]; same shape; fp32/bf16/fp16, any strides) -> fp32 [...].
    estimator: "k1" | "k2" | "k3" | "abs"; clamp: optional (lo, hi) applied to the result.
    """
    _check_args(logprobs, ref_logprobs, estimator, clamp)
    if use_triton(logprobs):
        return _KLPenalty.apply(logprobs, ref_logprobs, estimator, clamp)
    # CPU path: the reference in fp32 (autograd casts the gradients back to the input dtypes).
    return kl_penalty_ref(logprobs.float(), ref_logprobs.float(), estimator=estimator, clamp=clamp)
