"""onednn_linear (packed-weight fp32 GEMM on CPU, the engine's decode path) against its float64 reference on fresh
random inputs: row counts 1..97 (the batch hint is only a hint), 3-D and strided inputs, with and without bias.

Tolerance: an fp32 dot product of length K = 256 against float64: |err| ≤ K · eps32 · Σ|x_k w_k| (the classical
bound for recursive summation; blocked sums do better). No backward exists: the op refuses to run where autograd
would need one, which is tested too."""
import pytest
import torch

from fastrlhf.kernels import onednn_linear
from fastrlhf.kernels.onednn_linear import linear, linear_ref, pack

pytestmark = pytest.mark.skipif(not onednn_linear.available(), reason="this torch build has no oneDNN")
EPS32 = torch.finfo(torch.float32).eps


def _check(y, x, w, b):
    ref = linear_ref(x.double(), w.double(), None if b is None else b.double())
    bound = x.shape[-1] * EPS32 * (x.double().abs() @ w.double().abs().t() + (0 if b is None else b.double().abs()))
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
