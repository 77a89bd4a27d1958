"""ppo_value_loss (fused Triton / vectorised torch) against ppo_value_loss_ref in float64 on fresh random inputs.

Both backends ("triton": the kernels, Triton's interpreter on CPU; "torch": the CPU path). Tolerances:
tests/helpers/tolerances.py. Shapes: [6, 21] under the interpreter (2 BLOCK_T tiles per row), [64, 1024] on CUDA.
"""
import pytest
import torch

from fastrlhf import kernels
from fastrlhf.kernels import ppo_value_loss, ppo_value_loss_ref
from tests.helpers.loss_cases import shape
from tests.helpers.masks import make_mask
from tests.helpers.tolerances import GRAD_TOL, LOSS_TOL, assert_close, count_tol

BACKENDS = ("triton", "torch")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
UPSTREAM = 3.7


def make_inputs(B, T, device, dtype=torch.float32, mask_layout="mixed"):
    """values, old_values, returns, mask: V − V_old ~ N(0, 0.3²) so |V − V_old| > ε = 0.2 on ~half the tokens, of which
    some have the clipped term larger (V moved toward R past the clip) and some smaller. Row 0 gets planted tokens of
    both kinds and one unclipped token."""
    old = torch.randn(B, T, device=device)
    values = (old + 0.3 * torch.randn(B, T, device=device)).to(dtype)
    returns = (old + torch.randn(B, T, device=device)).to(dtype)
    old = old.to(dtype)
    mask = make_mask(B, T, mask_layout, device)
    if T >= 3:
        old[0, :3] = 0.0
        values[0, :3] = torch.tensor([0.5, 0.5, 0.1], device=device).to(dtype)   # V − V_old: clipped, clipped, inside
        returns[0, :3] = torch.tensor([0.6, -1.0, 0.0], device=device).to(dtype)  # clipped larger, smaller, n/a
        mask[0, :3] = True
    return values, old, returns, mask


def run_both(backend, values, old, returns, mask, **kw):
    x = values.detach().clone().requires_grad_(True)
    with kernels.backend(backend):
        loss, metrics = ppo_value_loss(x, old, returns, mask, **kw)
        (loss * UPSTREAM).backward()
    x64 = values.detach().double().requires_grad_(True)
    loss64, metrics64 = ppo_value_loss_ref(x64, old.double(), returns.double(), mask, **kw)
    (loss64 * UPSTREAM).backward()
    return (loss, metrics, x.grad), (loss64, metrics64, x64.grad)


def check(got, want, mask, dtype=torch.float32):
    (loss, metrics, grad), (loss64, metrics64, grad64) = got, want
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, loss64, **LOSS_TOL, what="loss")
    assert set(metrics) == {"vf_clipfrac"} == set(metrics64)
    v = metrics["vf_clipfrac"]
    assert v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad
    assert_close(v, metrics64["vf_clipfrac"], rtol=0.0, atol=count_tol(mask), what="vf_clipfrac")
    assert grad.dtype == dtype
    assert_close(grad, grad64, **GRAD_TOL[dtype], what="grad")


def branch_fractions(values, old, returns, mask, eps):
    """Shares of valid tokens where the clip acts with the clipped term larger / smaller (float64, from the data)."""
    v, o, r, m = values.double(), old.double(), returns.double(), mask.bool()
    v_clip = o + (v - o).clamp(-eps, eps)
    acts = (v - o).abs() > eps
    larger = acts & ((v_clip - r) ** 2 > (v - r) ** 2) & m
    smaller = acts & ((v_clip - r) ** 2 < (v - r) ** 2) & m
    n = m.sum().clamp(min=1)
    return larger.sum() / n, smaller.sum() / n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_agg_modes_match_ref(backend, agg, device):
    B, T = shape()
    values, old, returns, mask = make_inputs(B, T, device)
    larger, smaller = branch_fractions(values, old, returns, mask, 0.2)
    assert larger > 0 and smaller > 0, "test data must exercise both sides of the max"
    got, want = run_both(backend, values, old, returns, mask, clip_eps=0.2, agg=agg)
    check(got, want, mask)
    assert got[1]["vf_clipfrac"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("kind", ("float", "tensor"))
def test_normalizer(backend, agg, kind, device):
    B, T = shape()
    values, old, returns, mask = make_inputs(B, T, device)
    norm = 2.0 * B * T + 1.0
    normalizer = norm if kind == "float" else torch.tensor(norm, device=device)
    got, want = run_both(backend, values, old, returns, mask, agg=agg, normalizer=normalizer)
    check(got, want, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ("left", "right", "holes"))
def test_padding_layouts(backend, layout, device):
    B, T = shape()
    values, old, returns, mask = make_inputs(B, T, device, mask_layout=layout)
    mask[-1] = False
    got, want = run_both(backend, values, old, returns, mask, agg="seq-mean-token-mean", clip_eps=0.1)
    check(got, want, mask)
    assert (got[2][~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_all_zero_mask(backend, agg, device):
    B, T = shape()
    values, old, returns, mask = make_inputs(B, T, device)
    x = values.clone().requires_grad_(True)
    with kernels.backend(backend):
        loss, metrics = ppo_value_loss(x, old, returns, torch.zeros_like(mask), agg=agg)
        (loss * UPSTREAM).backward()
    assert loss.item() == 0.0 and metrics["vf_clipfrac"].item() == 0.0
    assert torch.isfinite(x.grad).all() and (x.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token(backend, device):
    values, old, returns, mask = make_inputs(1, 1, device)
    mask[:] = True
    got, want = run_both(backend, values, old, returns, mask)
    check(got, want, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_low_precision_inputs(backend, dtype, device):
    B, T = shape()
    values, old, returns, mask = make_inputs(B, T, device, dtype=dtype)
    got, want = run_both(backend, values, old, returns, mask)
    check(got, want, mask, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend, device):
    B, T = shape()
    values, old, returns, mask = make_inputs(B, T, device)
    v_t = values.t().contiguous().t()
    old_s = torch.stack([old, old], -1)[..., 1]
    mask_i = torch.stack([mask.long(), mask.long()], -1)[..., 0]      # int64 mask, strided
    assert not v_t.is_contiguous() and not old_s.is_contiguous() and not mask_i.is_contiguous()
    got, want = run_both(backend, v_t, old_s, returns, mask_i)
    check(got, want, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_closed_form_unclipped(backend, device):
    """V == V_old (nothing clipped): loss = ½ mean (V − R)², grad = 3.7 (V − R) m / Σm, vf_clipfrac 0."""
    B, T = shape()
    values, _, returns, mask = make_inputs(B, T, device)
    x = values.clone().requires_grad_(True)
    with kernels.backend(backend):
        loss, metrics = ppo_value_loss(x, values, returns, mask)
        (loss * UPSTREAM).backward()
    n = mask.sum()
    assert_close(loss, 0.5 * ((values - returns) ** 2 * mask).sum() / n, **LOSS_TOL, what="loss")
    assert metrics["vf_clipfrac"].item() == 0.0
    assert_close(x.grad, UPSTREAM * (values - returns) * mask / n, **GRAD_TOL[torch.float32], what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_only_through_values(backend, device):
    B, T = shape()
    values, old, returns, mask = make_inputs(B, T, device)
    x = values.clone().requires_grad_(True)
    o, r = old.clone().requires_grad_(True), returns.clone().requires_grad_(True)
    with kernels.backend(backend):
        loss, metrics = ppo_value_loss(x, o, r, mask)
        loss.backward()
    assert x.grad is not None and o.grad is None and r.grad is None
    assert not metrics["vf_clipfrac"].requires_grad


def test_bad_arguments():
    values, old, returns, mask = make_inputs(2, 5, "cpu")
    with pytest.raises(ValueError, match="agg"):
        ppo_value_loss(values, old, returns, mask, agg="sum")
    with pytest.raises(ValueError, match="clip_eps"):
        ppo_value_loss(values, old, returns, mask, clip_eps=-0.1)
    with pytest.raises(ValueError, match="returns"):
        ppo_value_loss(values, old, returns[:1, :2], mask)
    with pytest.raises(ValueError, match="normalizer"):
        ppo_value_loss(values, old, returns, mask, normalizer=torch.ones(2))
