"""Exact per-token KL(π ‖ π_ref) over the whole vocabulary from both models' hidden states and LM heads, fused.

Notation: N tokens (leading shape [...] flattened), H / HR the policy / reference hidden sizes, V the vocabulary.
    z = x·Wᵀ/τ,  z_ref = x_ref·W_refᵀ/τ,  log p = z − LSE(z),  log q = z_ref − LSE(z_ref)
    KL = Σ_v p_v (log p_v − log q_v) = Σ_v p_v (z_v − z_ref,v) − LSE(z) + LSE(z_ref)
    ∂KL/∂z_v = p_v ((log p_v − log q_v) − KL) = p_v ((z_v − z_ref,v) − μ),  μ = Σ_v p_v (z_v − z_ref,v)  (the LSEs cancel)
    G = ∂L/∂(x·Wᵀ) = g · p ⊙ ((z − z_ref) − μ) / τ   (g: [N]; only LSE(z) and μ are saved for the backward)
    dX = G·W,  dW = Gᵀ·X  (the reference gets no gradient)
Nothing [N, V] is held: vocab tiles are streamed with an online max and, per row, s = Σ exp(z − m),
a = Σ exp(z − m)·(z − z_ref) (rescaled by exp(m_old − m_new) like s) and the reference's own (m_ref, s_ref); then
μ = a/s and KL = μ − (m + log s) + (m_ref + log s_ref). Identical models give a = 0 and equal LSEs: KL = 0 exactly.
- CUDA: ``_linear_kl_fwd_kernel`` (token block × vocab split programs, two tl.dot tiles per vocab tile, partial stats
  [5, S, N] merged in PyTorch) and ``_linear_kl_dz_kernel`` (recomputes both tiles, writes G per chunk), then the shared
  chunked head backward of ``linear_logprobs`` (cuBLAS dX / dW). Same tiles, splits and chunk budget as linear_logprobs.
- CPU: the same token × vocab chunk loop in PyTorch (fp32 per chunk); extra memory is bounded by the chunk budget.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import use_triton
from ._lse import M_INIT, max_sum_update
from ._utils import check_float, no_autocast
from .fused_linear_logprobs import (_logits_chunk_torch, _logits_tile, cpu_chunks, dot_precision, head_backward,
                                    num_vocab_splits)


# Two logits tiles (policy and reference) are live at once, so the tiles are half the log-prob kernel's in V: as
# launched on sm_90 the forward then needs 152-174 registers, no spills (the log-prob tiles spill here).
KL_CONFIGS = {
    "16bit": (128, 64, 64, 8, 3),
    "16bit_small_n": (64, 64, 64, 4, 3),
    "fp32": (64, 32, 16, 4, 3),
}


def kl_launch_config(N: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages) of the KL kernels for N tokens of ``dtype``."""
    if dtype == torch.float32:
        return KL_CONFIGS["fp32"]
    return KL_CONFIGS["16bit_small_n"] if N <= 64 else KL_CONFIGS["16bit"]


@triton.jit
def _linear_kl_fwd_kernel(
    # data ptrs
    x_ptr, w_ptr, xr_ptr, wr_ptr, part_ptr,
    # shapes
    N, V, S,
    # strides
    stride_xn, stride_xk, stride_wv, stride_wk, stride_rn, stride_rk, stride_rv, stride_rwk,
    # constants
    inv_tau,
    H: tl.constexpr, HR: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Program (token block i, split j) → part[:, j, rows] = (m, s, a, m_ref, s_ref) over vocab tiles j, j+S, ..."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    m = tl.full([BLOCK_N], M_INIT, tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    a = tl.zeros([BLOCK_N], tl.float32)
    mr = tl.full([BLOCK_N], M_INIT, tl.float32)
    sr = tl.zeros([BLOCK_N], tl.float32)
    v0 = pid_s * BLOCK_V
    while v0 < V:  # (a while loop: runtime-bounded for-loops break the interpreter under NumPy 2.4)
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        valid = row_ok[:, None] & col_ok[None, :]
        z = _logits_tile(x_ptr, w_ptr, rows, row_ok, cols, col_ok, stride_xn, stride_xk, stride_wv, stride_wk,
                         H, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PREC) * inv_tau  # z = x·Wᵀ/τ
        zr = _logits_tile(xr_ptr, wr_ptr, rows, row_ok, cols, col_ok, stride_rn, stride_rk, stride_rv, stride_rwk,
                          HR, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PREC) * inv_tau  # z_ref = x_ref·W_refᵀ/τ
        m, s, alpha, e = max_sum_update(m, s, z, valid)  # running max and Σ e^{z−m} of the policy
        a = alpha * a + tl.sum(e * tl.where(valid, z - zr, 0.0), axis=1)  # a' = e^{m−m'}·a + Σ e^{z−m'}(z − z_ref)
        mr, sr, _, _ = max_sum_update(mr, sr, zr, valid)  # and of the reference
        v0 += S * BLOCK_V
    out = pid_s * N + rows
    tl.store(part_ptr + out, m, mask=row_ok)
    tl.store(part_ptr + S * N + out, s, mask=row_ok)
    tl.store(part_ptr + 2 * S * N + out, a, mask=row_ok)
    tl.store(part_ptr + 3 * S * N + out, mr, mask=row_ok)
    tl.store(part_ptr + 4 * S * N + out, sr, mask=row_ok)


@triton.jit
def _linear_kl_dz_kernel(
    # data ptrs (x, xr, lse, lse_ref, kl, g already offset to this chunk's tokens; w, wr to its vocab rows)
    x_ptr, w_ptr, xr_ptr, wr_ptr, lse_ptr, mu_ptr, g_ptr, dz_ptr,
    # shapes: chunk of NC tokens × VC vocab entries
    NC, VC,
    # strides
    stride_xn, stride_xk, stride_wv, stride_wk, stride_rn, stride_rk, stride_rv, stride_rwk, stride_dzn,
    # constants
    inv_tau,
    H: tl.constexpr, HR: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """G [NC, VC] (x's dtype) = g·p ⊙ ((z − z_ref) − μ)/τ, recomputing z and z_ref per tile."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < NC
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < VC
    z = _logits_tile(x_ptr, w_ptr, rows, row_ok, cols, col_ok, stride_xn, stride_xk, stride_wv, stride_wk,
                     H, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PREC) * inv_tau
    zr = _logits_tile(xr_ptr, wr_ptr, rows, row_ok, cols, col_ok, stride_rn, stride_rk, stride_rv, stride_rwk,
                      HR, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PREC) * inv_tau
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    mu = tl.load(mu_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])  # p = exp(z − LSE(z))
    dz = g[:, None] * p * ((z - zr) - mu[:, None])  # g·∂KL/∂z = g·p((z − z_ref) − μ)
    r64 = rows.to(tl.int64)
    tl.store(dz_ptr + r64[:, None] * stride_dzn + cols[None, :], (dz * inv_tau).to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------- forward

def _merge(m, s, a, mr, sr):
    """Per-split stats [S, N] → (kl, lse, μ) [N]."""
    m, s, a, mr, sr = _merge_stats(m, s, a, mr, sr)
    lse, lser = m + torch.log(s), mr + torch.log(sr)  # LSE = m + log s
    mu = a / s  # μ = Σ p(z − z_ref)
    return mu - lse + lser, lse, mu  # KL = μ − LSE(z) + LSE(z_ref)


def _fwd_triton(x, w, xr, wr, inv_tau):
    N, H = x.shape
    V = w.shape[0]
    bn, bv, bk, nw, ns = kl_launch_config(N, x.dtype)
    S = num_vocab_splits(N, V, bn, bv, x.device)
    part = torch.empty(5, S, N, dtype=torch.float32, device=x.device)  # m, s, a, m_ref, s_ref per split
    _linear_kl_fwd_kernel[(triton.cdiv(N, bn), S)](
        x, w, xr, wr, part, N, V, S,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), xr.stride(0), xr.stride(1), wr.stride(0), wr.stride(1),
        inv_tau, H=H, HR=xr.shape[1], BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, DOT_PREC=dot_precision(x.dtype),
        num_warps=nw, num_stages=ns)
    return _merge(*part.unbind(0))


def _fwd_torch(x, w, xr, wr, inv_tau):
    """CPU path: token × vocab chunks in fp32; each chunk's stats are merged into the running ones like a split."""
    N, V = x.shape[0], w.shape[0]
    n_c, v_c = cpu_chunks(N, V, buffers=3)  # three fp32 chunk buffers live at once
    kl = torch.empty(N, dtype=torch.float32, device=x.device)
    lse, mu = torch.empty_like(kl), torch.empty_like(kl)
    for n0 in range(0, N, n_c):
        n1 = min(N, n0 + n_c)
        run = None  # running (m, s, a, m_ref, s_ref), each [n_c]
        for v0 in range(0, V, v_c):
            v1 = min(V, v0 + v_c)
            z = _logits_chunk_torch(x[n0:n1], w[v0:v1], None, inv_tau)  # z = x·Wᵀ/τ
            zr = _logits_chunk_torch(xr[n0:n1], wr[v0:v1], None, inv_tau)  # z_ref = x_ref·W_refᵀ/τ
            diff = z - zr  # z − z_ref
            mc, mrc = z.amax(dim=1), zr.amax(dim=1)
            e = z.sub_(mc[:, None]).exp_()  # e^{z − m_chunk}
            sc = e.sum(1)  # Σ e^{z − m}
            ac = e.mul_(diff).sum(1)  # Σ e^{z − m}(z − z_ref)
            src = zr.sub_(mrc[:, None]).exp_().sum(1)  # Σ e^{z_ref − m_ref}
            chunk = torch.stack([mc, sc, ac, mrc, src])[:, None]  # [5, 1, n_c]
            run = chunk if run is None else torch.cat([run, chunk], dim=1)
            if run.shape[1] > 1:
                run = torch.stack(_merge_stats(*run.unbind(0)))[:, None]
            del z, zr, diff, e
        kl[n0:n1], lse[n0:n1], mu[n0:n1] = _merge(*run.unbind(0))
    return kl, lse, mu


def _merge_stats(m, s, a, mr, sr):
    """Merge stats [S, N] into one (m, s, a, m_ref, s_ref) [N] (the rescaling of the kernel's tile update)."""
    big_m, big_mr = m.amax(dim=0), mr.amax(dim=0)
    w, wr = torch.exp(m - big_m), torch.exp(mr - big_mr)  # e^{m_i − M}
    return big_m, (w * s).sum(0), (w * a).sum(0), big_mr, (wr * sr).sum(0)


# ---------------------------------------------------------------- backward

def _dz_triton(xc, wv, xrc, wrv, lse, mu, g, inv_tau):
    nc = xc.shape[0]
    vc = wv.shape[0]
    bn, bv, bk, nw, ns = kl_launch_config(nc, xc.dtype)
    out = torch.empty(nc, vc, dtype=xc.dtype, device=xc.device)
    _linear_kl_dz_kernel[(triton.cdiv(nc, bn), triton.cdiv(vc, bv))](
        xc, wv, xrc, wrv, lse, mu, g, out, nc, vc,
        xc.stride(0), xc.stride(1), wv.stride(0), wv.stride(1), xrc.stride(0), xrc.stride(1), wrv.stride(0),
        wrv.stride(1), out.stride(0), inv_tau,
        H=xc.shape[1], HR=xrc.shape[1], BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, DOT_PREC=dot_precision(xc.dtype),
        num_warps=nw, num_stages=ns)
    return out


def _dz_torch(xc, wv, xrc, wrv, lse, mu, g, inv_tau):
    z = _logits_chunk_torch(xc, wv, None, inv_tau)  # z = x·Wᵀ/τ
    diff = (z - _logits_chunk_torch(xrc, wrv, None, inv_tau)).sub_(mu[:, None])  # (z − z_ref) − μ
    p = z.sub_(lse[:, None]).exp_()  # p = exp(z − LSE(z))
    return diff.mul_(p).mul_(g[:, None] * inv_tau).to(xc.dtype)  # G = g·p((z − z_ref) − μ)/τ


class _LinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, xr, wr, inv_tau, triton_path):
        if x.shape[0] == 0:
            kl = lse = mu = x.new_zeros(0, dtype=torch.float32)
        else:
            with no_autocast(x):
                kl, lse, mu = (_fwd_triton if triton_path else _fwd_torch)(x, w, xr, wr, inv_tau)
        ctx.save_for_backward(x, w, xr, wr, lse, mu)
        ctx.inv_tau, ctx.triton_path = inv_tau, triton_path
        return kl

    @staticmethod
    def backward(ctx, g_kl):
        x, w, xr, wr, lse, mu = ctx.saved_tensors
        g = g_kl.float().contiguous()
        dz_fn = _dz_triton if ctx.triton_path else _dz_torch

        def dz_chunk(n0, n1, v0, v1):
            return dz_fn(x[n0:n1], w[v0:v1], xr[n0:n1], wr[v0:v1], lse[n0:n1], mu[n0:n1], g[n0:n1], ctx.inv_tau)

        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], False)
        with no_autocast(x):
            dx, dw, _ = head_backward(x, w, None, dz_chunk, ctx.triton_path, need)
        return dx, dw, None, None, None, None


def _check(hidden, weight, ref_hidden, ref_weight, mask, temperature):
    fn = "linear_kl"
    for name, t in (("hidden", hidden), ("weight", weight), ("ref_hidden", ref_hidden), ("ref_weight", ref_weight)):
        check_float(f"{fn}: {name}", t)
    if weight.dim() != 2 or ref_weight.dim() != 2 or weight.shape[0] != ref_weight.shape[0]:
        raise ValueError(f"{fn}: weight [V, H] and ref_weight [V, HR] must share V, got {list(weight.shape)} and "
                         f"{list(ref_weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1] or ref_hidden.shape[-1] != ref_weight.shape[1]:
        raise ValueError(f"{fn}: hidden [..., H] / ref_hidden [..., HR] must match their heads, got "
                         f"{list(hidden.shape)} / {list(ref_hidden.shape)}")
    if hidden.shape[:-1] != ref_hidden.shape[:-1]:
        raise ValueError(f"{fn}: hidden and ref_hidden leading shapes differ: {list(hidden.shape[:-1])} vs "
                         f"{list(ref_hidden.shape[:-1])}")
    if len({hidden.dtype, weight.dtype, ref_hidden.dtype, ref_weight.dtype}) != 1:
        raise TypeError(f"{fn}: hidden, weight, ref_hidden and ref_weight must share one dtype, got {hidden.dtype}, "
                        f"{weight.dtype}, {ref_hidden.dtype}, {ref_weight.dtype}")
    if mask is not None and tuple(mask.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{fn}: mask must be {list(hidden.shape[:-1])}, got {list(mask.shape)}")
    if not temperature > 0:
        raise ValueError(f"{fn}: temperature must be > 0, got {temperature}")


def linear_kl(hidden: torch.Tensor, weight: torch.Tensor, ref_hidden: torch.Tensor, ref_weight: torch.Tensor, *,
              mask: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Exact KL(π ‖ π_ref) per token over the whole vocabulary, fp32, never materializing [N, V] logits.

    hidden: [..., H], weight: [V, H] (the policy); ref_hidden: [..., HR], ref_weight: [V, HR] (the reference); all
    four of one float dtype. mask: [...] bool/int/float or None: tokens with mask 0 are not computed (KL 0, no
    gradient). Returns [...] fp32, differentiable w.r.t. hidden and weight (the reference gets no gradient).
    """
    _check(hidden, weight, ref_hidden, ref_weight, mask, temperature)
    lead = tuple(hidden.shape[:-1])
    x = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    xr = ref_hidden.detach().reshape(-1, ref_hidden.shape[-1])  # [N, HR]
    wr = ref_weight.detach()
    triton_path = use_triton(hidden)
    if mask is None:
        return _LinearKL.apply(x, weight, xr, wr, 1.0 / float(temperature), triton_path).view(lead)
    idx = (mask.reshape(-1) != 0).nonzero().squeeze(1)  # valid tokens only
    kl_valid = _LinearKL.apply(x.index_select(0, idx), weight, xr.index_select(0, idx), wr,
                               1.0 / float(temperature), triton_path)
    return torch.zeros(x.shape[0], dtype=torch.float32, device=x.device).index_put((idx,), kl_valid).view(lead)


def linear_kl_ref(hidden, weight, ref_hidden, ref_weight, *, mask=None, temperature: float = 1.0) -> torch.Tensor:
    """Plain PyTorch reference (materializes both [..., V] logits; float64 inputs for ground truth)."""
    log_p = torch.log_softmax(hidden @ weight.t() / temperature, dim=-1)  # log p
    log_q = torch.log_softmax(ref_hidden @ ref_weight.t() / temperature, dim=-1)  # log q
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # Σ_v p_v (log p_v − log q_v)
    return kl if mask is None else torch.where(mask != 0, kl, 0.0)
