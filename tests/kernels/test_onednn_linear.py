"""onednn_linear (packed-weight fp32 GEMM on CPU, the engine's decode path) against its float64 reference on fresh
random inputs: row counts 1..97 (the batch hint is only a hint), 3-D and strided inputs, with and without bias.

Tolerance: an fp32 dot product of length K = 256 against float64: |err| ≤ K · eps32 · Σ|x_k w_k| (the classical
bound for recursive summation; blocked sums do better). ``linear`` has no backward: it refuses to run where autograd
would need one, which is tested too. ``train_linear`` (the training path, unpacked weight) is checked the same way,
forward and gradients (dX, dW, db each a sum over M, N and N terms), and the model's ``Linear`` against ``F.linear``."""
import pytest
import torch

from fastrlhf.kernels import onednn_linear
from fastrlhf.kernels.onednn_linear import linear, linear_ref, pack, train_linear

pytestmark = pytest.mark.skipif(not onednn_linear.available(), reason="this torch build has no oneDNN")
EPS32 = torch.finfo(torch.float32).eps


def _check(y, x, w, b):
    ref = linear_ref(x.double(), w.double(), None if b is None else b.double())
    bound = x.shape[-1] * EPS32 * (x.double().abs() @ w.double().abs().t() + (0 if b is None else b.double().abs()))
    _within(y, ref, bound)


def _within(y, ref, bound):
    assert y.dtype == torch.float32 and y.shape == ref.shape
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"err {float(err.max()):.3e}"


@pytest.mark.parametrize("rows", [1, 5, 32, 97])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_against_float64(rows, bias):
    K, M = 256, 384
    w, x = torch.randn(M, K), torch.randn(rows, K)
    b = torch.randn(M) if bias else None
    packed = pack(w, 32)
    _check(linear(x, packed, b), x, w, b)
    # the copy is a snapshot: changing w afterwards does not reach it
    y0 = linear(x, packed, b)
    w.mul_(2)
    assert torch.equal(linear(x, packed, b), y0)


def test_linear_3d_and_strided_inputs():
    w, b = torch.randn(64, 48), torch.randn(64)
    packed = pack(w)
    x3 = torch.randn(3, 7, 48)
    _check(linear(x3, packed, b), x3, w, b)
    xs = torch.randn(48, 9).t()  # not contiguous
    _check(linear(xs, packed, b), xs, w, b)
    assert linear(torch.randn(0, 48), packed, b).shape == (0, 64)


def test_refuses_autograd_and_bad_inputs():
    w = torch.randn(8, 4)
    packed = pack(w)
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward"):
        linear(x, packed)
    with torch.no_grad():
        assert linear(x, packed).shape == (2, 8)
    with pytest.raises(ValueError, match="fp32 CPU input"):
        linear(torch.randn(2, 4, dtype=torch.float64), packed)
    for bad in (w.double(), w[None], w.to(torch.bfloat16)):
        with pytest.raises(ValueError, match="2-D fp32 CPU weight"):
            pack(bad)


def test_flop_counter_counts_it():
    """FlopCounterMode counts 2·N·M·K per call, as for aten.mm (FLOP profiles stay complete)."""
    from torch.utils.flop_counter import FlopCounterMode
    packed = pack(torch.randn(24, 16))
    with FlopCounterMode(display=False) as fc:
        linear(torch.randn(3, 5, 16), packed)
        torch.randn(15, 16) @ torch.randn(16, 24)
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    assert counts["mkldnn._linear_pointwise"] == counts["aten.mm"] == 2 * 15 * 24 * 16


@pytest.mark.parametrize("lead", [(37,), (3, 11)])
@pytest.mark.parametrize("bias", [False, True])
def test_train_linear_forward_and_gradients_against_float64(lead, bias):
    """y, dX = dY·W, dW = dYᵀ·X, db = Σ dY from fresh random fp32 inputs, each within the fp32 summation bound of its
    own reduction length against float64 (autograd through ``linear_ref``)."""
    K, M = 96, 160
    x = torch.randn(*lead, K, requires_grad=True)
    w = torch.randn(M, K, requires_grad=True)
    b = torch.randn(M, requires_grad=True) if bias else None
    g = torch.randn(*lead, M)
    y = train_linear(x, w, b)
    _check(y.detach(), x.detach(), w.detach(), None if b is None else b.detach())
    y.backward(g)
    xd, wd, gd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_(), g.double()
    bd = b.detach().double().requires_grad_() if bias else None
    linear_ref(xd, wd, bd).backward(gd)
    g2, x2 = gd.reshape(-1, M), xd.detach().reshape(-1, K)
    _within(x.grad, xd.grad, M * EPS32 * (g2.abs() @ wd.detach().abs()).view(*lead, K))
    _within(w.grad, wd.grad, g2.shape[0] * EPS32 * (g2.abs().t() @ x2.abs()))
    if bias:
        _within(b.grad, bd.grad, g2.shape[0] * EPS32 * g2.abs().sum(0))


def test_train_linear_only_the_needed_gradients_and_bad_inputs():
    x, w = torch.randn(5, 8), torch.randn(4, 8, requires_grad=True)
    train_linear(x, w).sum().backward()  # x needs no gradient
    assert x.grad is None and w.grad.shape == (4, 8)
    x.requires_grad_()
    w.requires_grad_(False)
    train_linear(x, w).sum().backward()  # a frozen weight (LoRA base, the reference): dX only
    assert x.grad.shape == (5, 8) and w.grad.shape == (4, 8)  # w.grad kept from the first call, not accumulated into
    for bad_x, bad_w in ((x.double(), w), (x, w.double()), (torch.randn(0, 8), w), (torch.randn(5, 7), w)):
        with pytest.raises(ValueError, match="train_linear"):
            train_linear(bad_x, bad_w)


def test_model_linear_uses_onednn_on_fp32_cpu_and_f_linear_elsewhere(monkeypatch):
    """``fastrlhf.models.linear.Linear``: the oneDNN path for plain fp32 CPU tensors from ``TRAIN_MIN_MACS``
    multiply-adds on (same values as ``F.linear`` up to fp32 summation order, same gradients likewise), ``F.linear``
    below that size, under CPU autocast, for 1-D inputs and when switched off (then bitwise ``F.linear``)."""
    import torch.nn.functional as F
    from fastrlhf.models.linear import Linear
    calls = []
    real = onednn_linear.train_linear
    monkeypatch.setattr(onednn_linear, "train_linear", lambda *a: calls.append(1) or real(*a))
    lin = Linear(32, 48, bias=True)
    x = torch.randn(2, 9, 32, requires_grad=True)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias)) and calls == []  # 27,648 multiply-adds: too small
    monkeypatch.setattr(onednn_linear, "TRAIN_MIN_MACS", 2 * 9 * 32 * 48)
    y = lin(x)
    assert calls == [1]
    y_ref = F.linear(x, lin.weight, lin.bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, lin.weight, lin.bias), g)
    grads_ref = torch.autograd.grad(y_ref, (x, lin.weight, lin.bias), g)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16
    lin(torch.randn(32))
    monkeypatch.setattr(Linear, "onednn", False)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    assert calls == [1]
