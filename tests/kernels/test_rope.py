"""rope against its float64 reference: q and k in one launch, gradients, packed positions, strided (fused QKV) inputs,
odd head counts and head dims, fp32 / bf16.

Tolerance: the kernel rotates in fp32 and rounds once to q's / k's dtype, so per element
|out − ref64| ≤ rounding_bound(ref64, dtype) + 32·eps32·scale (one ulp: the interpreter
truncates where the GPU rounds to nearest), scale = max |ref64| of that output. The reference gets cos / sin
in float64 (the kernel reads them in fp32, as the model builds them).
"""
import pytest
import torch

from fastrlhf import kernels
from fastrlhf.kernels import rope, rope_ref
from fastrlhf.models.rope import rope_cos_sin, rope_init
from tests.conftest import pick
from tests.kernels.test_rmsnorm import assert_close


def _tables(pos, D, theta=10000.0):
    inv, scale = rope_init(D, theta, None, 4096)
    return rope_cos_sin(inv.to(pos.device), pos, scale)  # [..., D] fp32 each


def _check_rope(q, k, cos, sin, dtype, what, backend="triton"):
    with kernels.backend(backend):
        qo, ko = rope(q, k, cos, sin)
    gq = torch.randn(qo.shape, device=q.device).to(dtype)
    gk = torch.randn(ko.shape, device=q.device).to(dtype)
    ((qo.float() * gq.float()).sum() + (ko.float() * gk.float()).sum()).backward()
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    a, b = rope_ref(q64, k64, cos.double(), sin.double())
    ((a * gq.double()).sum() + (b * gk.double()).sum()).backward()
    for out, ref, name in ((qo, a, "q"), (ko, b, "k"), (q.grad, q64.grad, "dq"), (k.grad, k64.grad, "dk")):
        assert out.dtype == dtype and out.shape == ref.shape, f"{what} {name}"
        assert_close(out, ref, ref.abs().max(), dtype, f"{what} {name}")
    return qo, ko


@pytest.mark.parametrize("hq,hkv,D", [(14, 2, 64), (3, 1, 10), (4, 4, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64(hq, hkv, D, dtype, device):
    B, T = pick((2, 5), (8, 512))
    q = torch.randn(B, T, hq, D, device=device).to(dtype).requires_grad_()
    k = torch.randn(B, T, hkv, D, device=device).to(dtype).requires_grad_()
    pos = torch.randint(0, 3000, (B, T), device=device)  # any position per token
    cos, sin = _tables(pos, D)
    _check_rope(q, k, cos, sin, dtype, "padded")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_slices_of_a_fused_qkv(dtype, device):
    """q and k read in place from a fused projection [B, T, (Hq + 2·Hkv)·D]; gradients reach the fused tensor."""
    B, T = pick((2, 4), (8, 512))
    hq, hkv, D = 14, 2, 64
    qkv = torch.randn(B, T, (hq + 2 * hkv) * D, device=device).to(dtype).requires_grad_()
    heads = qkv.view(B, T, hq + 2 * hkv, D)
    q, k = heads[:, :, :hq], heads[:, :, hq:hq + hkv]
    assert not q.is_contiguous()
    cos, sin = _tables(torch.arange(T, device=device)[None].expand(B, T), D)
    with kernels.backend("triton"):
        qo, ko = rope(q, k, cos, sin)
    want_q, want_k = rope_ref(q.detach().double(), k.detach().double(), cos.double(), sin.double())
    assert_close(qo, want_q, want_q.abs().max(), dtype, "q")
    assert_close(ko, want_k, want_k.abs().max(), dtype, "k")
    (qo.float().sum() + 2 * ko.float().sum()).backward()
    g = qkv.grad.view(B, T, hq + 2 * hkv, D)
    assert torch.all(g[:, :, hq + hkv:] == 0)  # v untouched
    assert g[:, :, :hq + hkv].abs().sum() > 0


def test_packed_positions_equal_per_sample(device):
    """Packed [N] tokens with positions restarting per sample rotate exactly like each sample alone."""
    lens = [3, 5, 2]
    hq, hkv, D = 4, 2, 16
    N = sum(lens)
    q = torch.randn(N, hq, D, device=device)
    k = torch.randn(N, hkv, D, device=device)
    pos = torch.cat([torch.arange(n, device=device) for n in lens])
    cos, sin = _tables(pos, D)
    with kernels.backend("triton"):
        qo, ko = rope(q, k, cos, sin)
        s = 0
        for n in lens:
            c1, s1 = _tables(torch.arange(n, device=device), D)
            a, b = rope(q[s:s + n], k[s:s + n], c1, s1)
            assert torch.equal(qo[s:s + n], a) and torch.equal(ko[s:s + n], b)
            s += n
    assert not torch.equal(qo[3:5], rope_ref(q[3:5], k[3:5], *_tables(torch.arange(3, 5, device=device), D))[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real shapes need CUDA (the interpreter is too slow)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_shape_qwen2_05b(dtype):
    B, T, hq, hkv, D = 8, 1024, 14, 2, 64
    q = torch.randn(B, T, hq, D, device="cuda").to(dtype).requires_grad_()
    k = torch.randn(B, T, hkv, D, device="cuda").to(dtype).requires_grad_()
    cos, sin = _tables(torch.arange(T, device="cuda")[None].expand(B, T), D)
    _check_rope(q, k, cos, sin, dtype, "real")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path_matches_float64_and_rope_refs_bits(dtype):
    """The CPU path (``rope_cpu``; in training its transposed rotation as the backward) on strided slices of a fused
    QKV: bit for bit ``rope_ref`` with torch's autograd in the same dtype, and in fp32 within the bound of float64.
    (In bf16 the CPU path rounds the tables and each product to bf16, as the Llama family does: that is the tables
    test below, not the one-rounding bound of the kernel.)"""
    B, T, hq, hkv, D = 3, 7, 6, 2, 16
    qkv = torch.randn(B, T, hq + 2 * hkv, D).to(dtype)
    cos, sin = _tables(torch.randint(0, 3000, (B, T)), D)
    q = qkv[:, :, :hq].detach().requires_grad_()
    k = qkv[:, :, hq:hq + hkv].detach().requires_grad_()
    if dtype == torch.float32:
        _check_rope(q, k, cos, sin, dtype, "cpu", backend="torch")
    with kernels.backend("torch"):
        qo, ko = rope(q, k, cos, sin)
    gq, gk = torch.randn(qo.shape).to(dtype), torch.randn(ko.shape).to(dtype)
    grads = []
    for fn in (rope, rope_ref):
        q2, k2 = q.detach().requires_grad_(), k.detach().requires_grad_()
        with kernels.backend("torch"):
            a, b = fn(q2, k2, cos, sin)
        ((a * gq).sum() + (b * gk).sum()).backward()
        grads.append((a, b, q2.grad, k2.grad))
    for x, y in zip(*grads):
        assert torch.equal(x, y)
    with torch.no_grad(), kernels.backend("torch"):
        assert all(torch.equal(x, y) for x, y in zip(rope(q, k, cos, sin), grads[1][:2]))


def test_cpu_path_casts_the_tables_like_the_llama_family():
    q, k = torch.randn(2, 3, 4, 8).bfloat16(), torch.randn(2, 3, 1, 8).bfloat16()
    cos, sin = _tables(torch.arange(3)[None].expand(2, 3), 8)
    qo, _ = rope(q, k, cos, sin)
    c, s = cos[:, :, None].bfloat16(), sin[:, :, None].bfloat16()
    assert torch.equal(qo, q * c + torch.cat((-q[..., 4:], q[..., :4]), -1) * s)


def test_bad_input_is_named():
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 1, 8)
    with pytest.raises(ValueError, match="rope: cos"):
        rope(q, k, torch.randn(2, 3, 6), torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="even"):
        rope(torch.randn(2, 3, 4, 7), torch.randn(2, 3, 1, 7), torch.randn(2, 3, 7), torch.randn(2, 3, 7))
