"""The C++ ops in fastrlhf.kernels._C called directly on numpy buffers: GAE, masked whitening, sequence packing.

Tolerance: the C++ loops accumulate in double and round once to fp32 at the store, so they are held to a few fp32 ulps of
the float64 reference (rtol = 4·eps32, plus atol = 4·eps32 × the output's scale for values near 0).
"""
import threading

import numpy as np
import pytest
import torch

from fastrlhf.kernels import _C
from fastrlhf.kernels import gae_ref, whiten_ref

EPS32 = float(np.finfo(np.float32).eps)


def _mask(rng, B, T):
    m = rng.random((B, T)) < 0.7
    m[0, :] = True
    m[-1, :] = False  # an empty row
    m[1, : T // 2] = False  # left padding
    return m


def _close(got, want):
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=4 * EPS32, atol=4 * EPS32 * scale)


@pytest.mark.parametrize("mask_dtype", [np.bool_, np.uint8, np.float32])
def test_gae_matches_float64(mask_dtype):
    rng = np.random.default_rng(torch.randint(0, 2**31, ()).item())
    B, T = 6, 257
    r = rng.standard_normal((B, T)).astype(np.float32)
    v = rng.standard_normal((B, T)).astype(np.float32)
    m = _mask(rng, B, T)
    adv, ret = _C.gae(r, v, m.astype(mask_dtype), 0.99, 0.95)
    assert adv.dtype == np.float32 and adv.shape == (B, T) and ret.shape == (B, T)
    A, R = gae_ref(torch.from_numpy(r).double(), torch.from_numpy(v).double(), torch.from_numpy(m), gamma=0.99, lam=0.95)
    _close(adv, A.numpy())
    _close(ret, R.numpy())
    assert (adv[~m] == 0).all() and (ret[~m] == 0).all()


def test_gae_closed_form_and_casts():
    # float64 inputs are accepted (forcecast to fp32); rewards [0, 0, 0, 1], values 0 → [(γλ)³, (γλ)², γλ, 1]
    adv, ret = _C.gae(np.array([[0, 0, 0, 1.0]]), np.zeros((1, 4)), np.ones((1, 4), np.uint8), 0.9, 0.5)
    want = np.array([[0.45**3, 0.45**2, 0.45, 1.0]])
    _close(adv, want)
    _close(ret, want)


def test_gae_errors():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"gae: shape mismatch.*values\[3, 2\]"):
        _C.gae(x, np.zeros((3, 2), np.float32), np.ones((2, 3), np.uint8), 1.0, 0.95)
    with pytest.raises(ValueError, match=r"rewards must be 2-D"):
        _C.gae(np.zeros(3, np.float32), np.zeros(3, np.float32), np.ones(3, np.uint8), 1.0, 0.95)
    with pytest.raises(TypeError, match=r"gae: mask must be bool/uint8 or float32, got dtype int64"):
        _C.gae(x, x, np.ones((2, 3), np.int64), 1.0, 0.95)
    with pytest.raises(ValueError, match="finite"):
        _C.gae(x, x, np.ones((2, 3), np.uint8), float("inf"), 0.95)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_float64(shift_mean):
    rng = np.random.default_rng(torch.randint(0, 2**31, ()).item())
    x = (rng.standard_normal((5, 83)) * 4 + 100).astype(np.float32)  # offset: needs the two-pass variance
    m = _mask(rng, 5, 83)
    out = _C.whiten(x, m, shift_mean, 1e-8)
    want = whiten_ref(torch.from_numpy(x).double(), torch.from_numpy(m), shift_mean=shift_mean).numpy()
    _close(out, want)
    assert (out[~m] == 0).all()
    out3 = _C.whiten(x.reshape(5, 83, 1), m.reshape(5, 83, 1).astype(np.float32), shift_mean, 1e-8)  # any shape
    np.testing.assert_array_equal(out3.reshape(5, 83), out)


def test_whiten_edge_cases_and_errors():
    x = np.full((3, 4), 2.5, np.float32)
    assert (_C.whiten(x, np.ones((3, 4), bool), True, 1e-8) == 0).all()  # constant → 0
    assert (_C.whiten(x, np.zeros((3, 4), bool), False, 1e-8) == 0).all()  # empty mask → 0, finite
    with pytest.raises(ValueError, match=r"whiten: shape mismatch: x\[3, 4\], mask\[4, 3\]"):
        _C.whiten(x, np.ones((4, 3), bool), True, 1e-8)
    with pytest.raises(TypeError, match="whiten: mask must be"):
        _C.whiten(x, np.ones((3, 4), np.int32), True, 1e-8)
    with pytest.raises(ValueError, match="eps"):
        _C.whiten(x, np.ones((3, 4), bool), True, -1.0)


def _ffd_python(lengths, budget):
    """Reference first-fit-decreasing: longest first (ties by index), first bin with room, bins numbered as opened."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    room, out = [], [None] * len(lengths)
    for i in order:
        k = next((j for j, free in enumerate(room) if free >= lengths[i]), len(room))
        if k == len(room):
            room.append(budget)
        room[k] -= lengths[i]
        out[i] = k
    return out


@pytest.mark.parametrize("n,budget", [(1, 10), (37, 64), (500, 4096)])
def test_pack_sequences(n, budget):
    lengths = torch.randint(0, budget + 1, (n,)).numpy().astype(np.int64)
    bins = _C.pack_sequences(lengths, budget)
    assert bins.dtype == np.int64 and bins.shape == (n,)
    nbins = int(bins.max()) + 1
    assert bins.min() >= 0 and set(bins.tolist()) == set(range(nbins))  # every sequence in exactly one bin, no gaps
    loads = np.bincount(bins, weights=lengths, minlength=nbins)
    assert (loads <= budget).all()  # every bin within the budget
    assert nbins >= -(-int(lengths.sum()) // budget)  # sanity: at least the lower bound
    assert bins.tolist() == _ffd_python(lengths.tolist(), budget)  # exactly first-fit-decreasing
    np.testing.assert_array_equal(_C.pack_sequences(lengths, budget), bins)  # deterministic


def test_pack_sequences_known_answer_and_errors():
    np.testing.assert_array_equal(_C.pack_sequences(np.array([5, 3, 7, 2, 8]), 10), [2, 1, 1, 0, 0])
    assert _C.pack_sequences(np.zeros(0, np.int64), 8).shape == (0,)
    with pytest.raises(ValueError, match=r"sequence 2 has length 11 > budget 10"):
        _C.pack_sequences(np.array([5, 3, 11, 2]), 10)
    with pytest.raises(ValueError, match=r"sequence 1 has negative length -1"):
        _C.pack_sequences(np.array([5, -1]), 10)
    with pytest.raises(ValueError, match="budget must be > 0"):
        _C.pack_sequences(np.array([1]), 0)
    with pytest.raises(ValueError, match="1-D"):
        _C.pack_sequences(np.ones((2, 2), np.int64), 10)


def test_ops_run_concurrently_from_threads():
    """Thread safety: several threads calling the op at once (its loops run without the GIL, on private buffers) get the
    same answer as a serial call. (This checks correctness under concurrency, not that the GIL is released.)"""
    rng = np.random.default_rng(0)
    r = rng.standard_normal((64, 2048)).astype(np.float32)
    m = rng.random((64, 2048)) < 0.8
    want = _C.gae(r, r, m, 0.99, 0.95)[0]
    got = [None] * 4

    def work(k):
        got[k] = _C.gae(r, r, m, 0.99, 0.95)[0]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g in got:
        np.testing.assert_array_equal(g, want)
