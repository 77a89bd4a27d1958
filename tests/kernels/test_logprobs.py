"""logprobs_from_logits vs the float64 reference, on both backends (Triton — the interpreter on CPU — and PyTorch).

Tolerance rule (flash-attention style): for every output and gradient, our max-abs error against the float64 reference
(computed on float64 copies of the very same, already-rounded inputs) must be ≤ 2 × the error of plain PyTorch doing the same
computation in the input dtype (``log_softmax(x.float()/τ)`` + gather, autograd giving grads in the logits' dtype) + a small
atol. The atol covers a different fp32 evaluation order: logp/entropy are O(log V) ≈ 12 in size and an fp32 sum of V
terms has relative error ~√V·2⁻²⁴ in practice, so 2e-5 absolute. Gradients: grad_v = g·(δ − p_v) − g_H·p_v·(log p_v + H)
with log p = z − LSE formed in fp32 (we multiply by 1/τ, PyTorch divides by τ): an error ε in log p (a few roundings at
the scale of |z| + |LSE| ≤ max|z| + log V, so ε = 2⁻²²·(max|z| + log V)) changes grad_v by ≤ ε·p_v·(|g| + |g_H|·(1 +
|log p_v + H|)); the atol is ε times the max of that factor (from the float64 ref). For bf16/fp16 add half an ulp of the
written gradient (a rounding-direction flip vs PyTorch rounding a slightly different fp32 value): 2⁻⁸·max|grad| (bf16),
2⁻¹¹·max|grad| (fp16). Exception: Triton 3.6's *interpreter* truncates fp32→bf16 stores (it ignores round-to-nearest;
compiled kernels round), i.e. up to a full ulp, so under the interpreter the bf16 term is 2⁻⁷·max|grad|.
"""
import importlib

import pytest
import torch

from fastrlhf.kernels import backend, logprobs_from_logits, logprobs_from_logits_ref
from fastrlhf.kernels._backend import interpreting
from tests.conftest import pick
from tests.helpers.tolerances import FP32

LP = importlib.import_module("fastrlhf.kernels.logprobs")  # the module (the package attribute is the function)
BACKENDS = ("triton", "torch")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
VAL_ATOL = 2e-5
GRAD_ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _inputs(shape, V, dtype, device, scale=3.0, ignore_frac=0.2):
    logits = (torch.randn(*shape, V, device=device) * scale).to(dtype)
    labels = torch.randint(0, V, shape, device=device)
    labels[torch.rand(shape, device=device) < ignore_frac] = -100
    return logits, labels


def _run(fn, logits, labels, tau, g_lp, g_h):
    """Forward + backward with upstream grads (g_lp, g_h) → (logp, entropy, grad_logits)."""
    x = logits.detach().clone().requires_grad_()
    lp, h = fn(x, labels, tau)
    (lp * g_lp + h * g_h).sum().backward()
    return lp.detach(), h.detach(), x.grad


def _ours(x, y, tau):
    return logprobs_from_logits(x, y, temperature=tau, return_entropy=True)


def _plain(x, y, tau):  # plain PyTorch in the input dtype: fp32 upcast, gradient flows back in x.dtype
    lp, h = logprobs_from_logits_ref(x.float(), y, temperature=tau, return_entropy=True)
    return lp, h


def _ref64(x, y, tau):
    return logprobs_from_logits_ref(x.double(), y, temperature=tau, return_entropy=True)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _grad_atol(logits, tau, g_lp, g_h):
    """ε·max_v p_v·(|g| + |g_H|·(1 + |log p_v + H|)), ε = 2⁻²²·(max|z| + log V): fp32 error of log p through the grad."""
    if logits.numel() == 0:
        return 0.0
    z = logits.double() / tau
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    ent = -(p * log_p).sum(-1, keepdim=True)
    eps = 2.0**-22 * (z.abs().max().item() + torch.log(torch.tensor(float(z.shape[-1]))).item())
    factor = p * (g_lp.abs().double()[..., None] + g_h.abs().double()[..., None] * (1 + (log_p + ent).abs()))
    return eps * factor.max().item()


def check_against_ref(logits, labels, tau, be):
    """Compare ours (backend ``be``) with the float64 ref; tolerance relative to plain PyTorch's own error."""
    g_lp = torch.randn(labels.shape, device=logits.device)
    g_h = torch.randn(labels.shape, device=logits.device)
    with backend(be):
        ours = _run(_ours, logits, labels, tau, g_lp, g_h)
    plain = _run(_plain, logits, labels, tau, g_lp, g_h)
    ref = _run(_ref64, logits.double(), labels, tau, g_lp, g_h)  # float64 leaf: float64 gradient
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    assert ours[2].dtype == logits.dtype and ours[2].shape == logits.shape
    for name, o, p, r in zip(("logp", "entropy"), ours[:2], plain[:2], ref[:2]):
        err, base = _err(o, r), _err(p, r)
        assert err <= 2 * base + VAL_ATOL, f"{name}: err {err:.3g} > 2×plain {base:.3g} + {VAL_ATOL}"
    ulp = GRAD_ULP[logits.dtype]
    if be == "triton" and interpreting() and logits.dtype == torch.bfloat16:
        ulp = 2.0**-7  # the interpreter truncates fp32→bf16 (see module docstring)
    atol = _grad_atol(logits, tau, g_lp, g_h) + ulp * ref[2].abs().max().item()
    err, base = _err(ours[2], ref[2]), _err(plain[2], ref[2])
    assert err <= 2 * base + atol, f"grad: err {err:.3g} > 2×plain {base:.3g} + {atol:.3g}"
    assert torch.isfinite(ours[0]).all() and torch.isfinite(ours[1]).all() and torch.isfinite(ours[2].float()).all()
    return ours


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [pick(1000, 151936), 50257, 32001, 37])
def test_matches_float64_ref(be, dtype, V, device):
    shape = pick((3,), (4, 512)) if V > 1000 else pick((2, 5), (4, 512))
    logits, labels = _inputs(shape, V, dtype, device)
    check_against_ref(logits, labels, 0.7 if V % 2 else 1.0, be)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("tau", [0.3, 1.0, 2.5])
def test_temperature(be, tau, device):
    logits, labels = _inputs(pick((4,), (2, 256)), 4099, torch.float32, device)
    check_against_ref(logits, labels, tau, be)


@pytest.mark.parametrize("be", BACKENDS)
def test_noncontiguous_views(be, device):
    V = 1001
    # [T, B, V] storage seen as [B, T, V]: leading dims not collapsible, no copy needed (last dim unit-stride)
    base, labels = _inputs((pick(3, 64), 2), V, torch.bfloat16, device)
    check_against_ref(base.transpose(0, 1), labels.t(), 0.9, be)
    # a vocab slice of a wider tensor: row stride != V
    wide, labels = _inputs((2, pick(3, 64)), V + 37, torch.float32, device)
    check_against_ref(wide[..., 5:5 + V], labels.clamp(max=V - 1), 1.0, be)
    # last dim not unit-stride (copied by the wrapper)
    tr = torch.randn(2, V, pick(3, 64), device=device).transpose(1, 2)
    check_against_ref(tr, torch.randint(0, V, (2, pick(3, 64)), device=device), 1.0, be)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("shape", [(), (1,), (5,), (1, 1), (1, 4), (4, 1), (2, 3, 2)])
def test_leading_shapes(be, shape, device):
    logits, labels = _inputs(shape, 257, torch.float32, device, ignore_frac=0.0)
    lp, h, _ = check_against_ref(logits, labels, 1.0, be)
    assert lp.shape == labels.shape == h.shape


@pytest.mark.parametrize("be", BACKENDS)
def test_closed_forms(be, device):
    for V in (1, 7, 4099):
        # uniform logits: logp = −log V, H = log V for any label and temperature
        logits = torch.full((3, V), 2.5, device=device)
        labels = torch.randint(0, V, (3,), device=device)
        with backend(be):
            lp, h = logprobs_from_logits(logits, labels, temperature=0.6, return_entropy=True)
        logv = torch.log(torch.tensor(float(V)))
        torch.testing.assert_close(lp, torch.full_like(lp, -logv.item()), atol=1e-6, rtol=0)
        torch.testing.assert_close(h, torch.full_like(h, logv.item()), atol=1e-5, rtol=0)
    # one logit 40 above the rest (V=10): p(y) = 1/(1 + 9e^{-40}) → logp ≈ −9e^{-40} ≈ 0, H ≈ 0
    logits = torch.zeros(2, 10, device=device)
    logits[:, 3] = 40.0
    with backend(be):
        lp, h = logprobs_from_logits(logits, torch.tensor([3, 4], device=device), return_entropy=True)
    torch.testing.assert_close(lp, torch.tensor([0.0, -40.0], device=device), atol=1e-5, rtol=0)
    torch.testing.assert_close(h, torch.zeros(2, device=device), atol=1e-5, rtol=0)


@pytest.mark.parametrize("be", BACKENDS)
def test_ignore_index(be, device):
    V = 300
    logits = torch.randn(6, V, device=device, requires_grad=True)
    labels = torch.tensor([-100, 5, -1, 299, 0, -100], device=device)
    with backend(be):
        lp, h = logprobs_from_logits(logits, labels, return_entropy=True)
        lp.sum().backward()  # logp only: ignored rows get exactly zero gradient
    ign = labels < 0
    assert (lp[ign] == 0).all() and (lp[~ign] < 0).all()
    assert (logits.grad[ign] == 0).all() and (logits.grad[~ign] != 0).any()
    assert (h[ign] > 0).all()  # entropy is still computed on ignored rows
    ref_h = logprobs_from_logits_ref(logits.detach().double(), labels, return_entropy=True)[1]
    torch.testing.assert_close(h.double(), ref_h, atol=2e-5, rtol=0)


@pytest.mark.parametrize("be", BACKENDS)
def test_single_output_grads(be, device):
    """Backward through logp only and through entropy only (the other upstream grad is None)."""
    logits, labels = _inputs((5,), 513, torch.float32, device)
    for which in (0, 1):
        x = logits.clone().requires_grad_()
        xr = logits.double().requires_grad_()
        with backend(be):
            out = logprobs_from_logits(x, labels, temperature=1.3, return_entropy=True)[which]
        g = torch.randn_like(out)
        (out * g).sum().backward()
        (logprobs_from_logits_ref(xr, labels, temperature=1.3, return_entropy=True)[which] * g).sum().backward()
        torch.testing.assert_close(x.grad.double(), xr.grad, **FP32)


@pytest.mark.parametrize("be", BACKENDS)
def test_without_entropy_returns_logp(be, device):
    logits, labels = _inputs((4,), 100, torch.float32, device)
    with backend(be):
        lp = logprobs_from_logits(logits, labels)
    assert isinstance(lp, torch.Tensor) and lp.shape == (4,)
    torch.testing.assert_close(lp.double(), logprobs_from_logits_ref(logits.double(), labels), atol=2e-6, rtol=0)


def test_cpu_path_chunks_rows(monkeypatch):
    """The CPU path works over row chunks (here 1 row at a time) with identical results."""
    logits, labels = _inputs((7,), 1000, torch.float32, "cpu")
    with backend("torch"):
        full = _run(_ours, logits, labels, 0.8, torch.ones(7), torch.ones(7))
        monkeypatch.setattr(LP, "CHUNK_BYTES", 4 * 1000)
        chunked = _run(_ours, logits, labels, 0.8, torch.ones(7), torch.ones(7))
    for a, b in zip(full, chunked):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("be", BACKENDS)
def test_bad_input_errors(be):
    x = torch.randn(2, 3, 10)
    with backend(be):
        with pytest.raises(ValueError, match="labels contain 10 >= V=10"):
            logprobs_from_logits(x, torch.full((2, 3), 10))
        with pytest.raises(TypeError, match="labels must be an integer"):
            logprobs_from_logits(x, torch.zeros(2, 3))
        with pytest.raises(ValueError, match="labels shape"):
            logprobs_from_logits(x, torch.zeros(3, 2, dtype=torch.long))
        with pytest.raises(ValueError, match="temperature"):
            logprobs_from_logits(x, torch.zeros(2, 3, dtype=torch.long), temperature=0.0)
        with pytest.raises(TypeError, match="logits"):
            logprobs_from_logits(x.long(), torch.zeros(2, 3, dtype=torch.long))



@pytest.mark.parametrize("be", BACKENDS)
def test_no_tokens(be, device):
    x = torch.randn(0, 5, 10, device=device, requires_grad=True)
    with backend(be):
        lp, h = logprobs_from_logits(x, torch.zeros(0, 5, dtype=torch.long, device=device), return_entropy=True)
        (lp.sum() + h.sum()).backward()
    assert lp.shape == h.shape == (0, 5) and x.grad.shape == x.shape


@pytest.mark.parametrize("triton_path", (True, False))
def test_unchecked_out_of_range_labels_act_as_ignored(triton_path, device):
    """What CUDA does with labels ≥ V (not checked there: no host sync): like ignored labels. Calls the autograd Function
    directly to bypass the CPU-side check."""
    x = torch.randn(4, 50, device=device, requires_grad=True)
    y = torch.tensor([3, 50, 77, -100], device=device)
    lp, h = LP._LogProbs.apply(x, y, 1.0, triton_path)
    lp.sum().backward()
    assert (lp[1:] == 0).all() and lp[0] < 0
    assert (x.grad[1:] == 0).all() and (x.grad[0] != 0).all()
