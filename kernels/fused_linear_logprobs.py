"""Fused LM-head log-probs: logp / entropy of z = (hidden · Wᵀ + b) / τ without ever holding [N, V] logits.

Notation: N tokens (leading shape [...] flattened), H hidden size, V vocabulary. Math (docs/kernels.md):
    z = (x·Wᵀ + b)/τ;  logp = z[y] − LSE(z);  H = LSE(z) − Σ_v softmax(z)_v·z_v
    G = ∂L/∂(x·Wᵀ + b) = (g_logp·(onehot(y) − p) − g_H·p ⊙ (log p + H)) / τ      (per token: g_logp, g_H are [N])
    dX = G·W,  dW = Gᵀ·X,  db = Σ_n G         (G rounded to the input dtype; every product and sum accumulated in fp32)

Design (sizes quoted for N=16384, H=896, V=151936, bf16: 2·N·H·V = 4.46 TFLOP per matmul)
- Forward = one Triton kernel ``_linear_fwd_kernel``. A program owns BLOCK_N tokens and one of S vocab splits; it streams
  [BLOCK_V, H] tiles of W through tl.dot (bf16 tensor cores, fp32 accumulators; fp32 inputs use "ieee" precision like
  PyTorch's default fp32 matmul), adds b, scales by 1/τ and folds the tile into the online (max, Σexp, Σ(z−m)exp) of
  ``_lse.lse_tile_update`` and picks z[y]. Nothing [N, V] is ever written: the partial stats are [S, N] fp32 and merged in
  PyTorch (``_lse.merge_partials``). S (vocab splits) is chosen so that ≥ 2 programs per SM run even for small N
  (N=16384 → 128 token blocks, S=3); W (272 MB) is re-read from L2 by concurrent token blocks, and HBM sees it ~once per wave.
- Backward = loop over vocab chunks (and token chunks only if N alone is bigger than the budget) of at most ``CHUNK_BYTES``
  (256 MiB) of G in the input dtype: ``_linear_dz_kernel`` recomputes the chunk's logits with tl.dot and writes G directly
  (the recompute matmul and the dZ epilogue are fused: no logits round-trip through HBM, and p uses the same fp32 z the forward
  used), then cuBLAS: dX += G·W_chunk (fp32 buffer [N, H], 58 MB), dW_chunk = Gᵀ·X (complete over all N at once, fp32
  accumulation inside the matmul, written once in the weight dtype — no [V, H] fp32 buffer in the common case), db += Σ G.
  Extra memory: G chunk 256 MiB + dX fp32 N·H·4 (58 MB) + the [N, H] product G·W_chunk before it is added (29 MB); dW is
  written in place by the GEMM (out=); ≈ 0.35 GiB at that shape, and no term grows with N·V. If
  N·min(V, 2048)·bytes > budget, tokens are chunked too and dW goes through a [V, H] fp32 buffer.
- CPU auto/"torch": the same chunked algorithm with PyTorch ops in place of the two Triton kernels (fp32 math per chunk).
  When the whole [N, V] fp32 logits fit in ``CPU_KEEP_BYTES`` (32 MiB) and a gradient is needed, the forward keeps its
  logit chunks and the backward reads them instead of recomputing: the same values, one GEMM of four saved.
- Labels < 0 give logp = 0 and no gradient through logp; labels ≥ V raise ValueError on CPU (not checked on CUDA: they
  behave like ignored labels: logp = 0, no logp gradient).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._backend import interpreting, use_triton
from ._lse import M_INIT, lse_tile_update, merge_partials
from ._utils import check_float, no_autocast
from .logprobs import check_labels, logprobs_from_logits_ref

# Backward chunk budget: bytes of G (input dtype) per chunk; CPU-path fp32 temporaries use the same element count × 4 B.
CHUNK_BYTES = 256 * 2**20
# CPU path: fp32 logits per chunk. Small chunks stay in cache and reuse the heap's free blocks (glibc maps a fresh,
# zero-filled block for each large one): at the tiny benchmark head (N 2048, H 256, V 4096, 2 threads) 2 MiB chunks
# of 512 vocab columns take 0.72-0.77× the time of 16 MiB chunks of 2048, forward and backward alike (RESULTS.md)
CPU_CHUNK_BYTES = 2 * 2**20
CPU_MIN_V_CHUNK = 512  # CPU: prefer all tokens × a narrow vocab chunk (dW of a chunk complete in one GEMM)
# CPU path, training: when all N·V fp32 logits fit in this many bytes, the forward keeps its logit chunks for the
# backward, which then skips recomputing them (one GEMM of four); above it the backward recomputes, as on CUDA
CPU_KEEP_BYTES = 32 * 2**20
MIN_V_CHUNK = 2048  # narrowest vocab chunk before token chunking kicks in

# (BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages): the only configs the launcher picks (see ``launch_config``).
CONFIGS = {
    "16bit": (128, 128, 64, 8, 3),
    "16bit_small_n": (64, 128, 64, 4, 3),
    "fp32": (64, 64, 16, 4, 3),  # FMA path (no tensor cores); BLOCK_K 32 spilled in the forward (sm_90 compile)
}


def launch_config(N: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages) for N tokens of ``dtype`` (same for fwd and the dZ kernel)."""
    if dtype == torch.float32:
        return CONFIGS["fp32"]
    return CONFIGS["16bit_small_n"] if N <= 64 else CONFIGS["16bit"]


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: full fp32 ("ieee", like torch's default fp32 matmul) for fp32 inputs.

    "upcast" (interpreter only): Triton 3.6's interpreter computes bf16 tl.dot wrongly (garbage ~1e10), so there the
    bf16 operands are upcast to fp32 and multiplied with "ieee" — the same math as the tensor cores (bf16·bf16 products are
    exact in fp32, fp32 accumulation). Compiled kernels never take this branch.
    """
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for bf16/fp16 operands


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_vocab_splits(N: int, V: int, block_n: int, block_v: int, device: torch.device) -> int:
    """S vocab splits of the forward so that ≥ 2 programs per SM run: S = clamp(⌈2·SMs / token blocks⌉, 1, V tiles).
    (On CPU — the interpreter — an H100's 132 SMs are assumed, so tests exercise the same split logic.)"""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 132
    n_blocks = triton.cdiv(N, block_n)
    return max(1, min(triton.cdiv(V, block_v), triton.cdiv(2 * sms, n_blocks)))


@triton.jit
def _logits_tile(
    x_ptr, w_ptr, rows, row_ok, cols, col_ok,
    stride_xn, stride_xk, stride_wv, stride_wk,
    H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """acc [BLOCK_N, BLOCK_V] fp32 = x[rows, :] · W[cols, :]ᵀ, K-loop over H in BLOCK_K steps on tensor cores."""
    r64 = rows.to(tl.int64)
    c64 = cols.to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        k_ok = k < H
        xt = tl.load(x_ptr + r64[:, None] * stride_xn + k[None, :] * stride_xk,
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        wt = tl.load(w_ptr + c64[:, None] * stride_wv + k[None, :] * stride_wk,
                     mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_V, BLOCK_K]
        if DOT_PREC == "upcast":  # interpreter-only workaround (see dot_precision)
            acc = tl.dot(xt.to(tl.float32), tl.trans(wt.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision=DOT_PREC)  # acc += x·Wᵀ
    return acc


@triton.jit
def _linear_fwd_kernel(
    # data ptrs
    x_ptr, w_ptr, b_ptr, y_ptr, m_ptr, s_ptr, t_ptr, zy_ptr,
    # shapes
    N, V, S,
    # strides
    stride_xn, stride_xk, stride_wv, stride_wk,
    # constants
    inv_tau,
    H: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Program (token block i, split j) → partial m, s, t, z[y] [S, N] over vocab tiles j, j+S, j+2S, ..."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    m = tl.full([BLOCK_N], M_INIT, tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    zy = tl.zeros([BLOCK_N], tl.float32)
    v0 = pid_s * BLOCK_V
    while v0 < V:  # (a while loop: runtime-bounded for-loops break the interpreter under NumPy 2.4)
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        acc = _logits_tile(x_ptr, w_ptr, rows, row_ok, cols, col_ok, stride_xn, stride_xk, stride_wv, stride_wk,
                           H, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PREC)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]  # x·Wᵀ + b
        z = acc * inv_tau  # z = (x·Wᵀ + b)/τ
        valid = row_ok[:, None] & col_ok[None, :]
        m, s, t = lse_tile_update(m, s, t, z, valid)
        zy += tl.sum(tl.where(valid & (cols[None, :].to(tl.int64) == y[:, None]), z, 0.0), axis=1)  # z[y]
        v0 += S * BLOCK_V
    out = pid_s * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(t_ptr + out, t, mask=row_ok)
    tl.store(zy_ptr + out, zy, mask=row_ok)


@triton.jit
def _linear_dz_kernel(
    # data ptrs (x, w, b, y, lse, ent, g_* already offset to this chunk)
    x_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, dz_ptr,
    # shapes: chunk of NC tokens × VC vocab entries starting at vocab column v_start
    NC, VC, v_start,
    # strides
    stride_xn, stride_xk, stride_wv, stride_wk, stride_dzn,
    # constants
    inv_tau,
    H: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """G [NC, VC] (input dtype) = (g_logp·(onehot − p) − g_H·p ⊙ (log p + H))/τ, recomputing z = (x·Wᵀ + b)/τ per tile."""
    pid_n = tl.program_id(0)  # fastest-varying: consecutive programs share the W tile (L2 reuse)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < NC
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < VC
    acc = _logits_tile(x_ptr, w_ptr, rows, row_ok, cols, col_ok, stride_xn, stride_xk, stride_wv, stride_wk,
                       H, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    z = acc * inv_tau  # z = (x·Wᵀ + b)/τ
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.where(y >= 0, tl.load(g_logp_ptr + rows, mask=row_ok, other=0.0), 0.0)  # ignored: no logp gradient
    g_h = tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0)
    log_p = z - lse[:, None]  # log p = z − LSE
    p = tl.exp(log_p)
    onehot = ((cols[None, :] + v_start).to(tl.int64) == y[:, None]).to(tl.float32)
    dz = g_lp[:, None] * (onehot - p) - g_h[:, None] * p * (log_p + ent[:, None])  # ∂L/∂z
    g = dz * inv_tau  # ∂L/∂(x·Wᵀ + b) = ∂L/∂z / τ
    r64 = rows.to(tl.int64)
    tl.store(dz_ptr + r64[:, None] * stride_dzn + cols[None, :], g.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _chunks(N: int, V: int, elem_bytes: int, budget: int | None = None, min_v: int | None = None) -> tuple[int, int]:
    """(n_c, v_c): chunk of tokens × vocab with n_c·v_c·elem_bytes ≤ budget (default CHUNK_BYTES; at least 1 × 1).

    Prefer all N tokens at once (then dW of a vocab chunk is complete in one GEMM); chunk tokens only if
    N·min(V, min_v) elements do not fit (min_v: default MIN_V_CHUNK).
    """
    max_elems = max(1, (CHUNK_BYTES if budget is None else budget) // elem_bytes)
    min_v = MIN_V_CHUNK if min_v is None else min_v
    if N * min(V, min_v) <= max_elems:
        return max(N, 1), max(1, min(V, max_elems // max(N, 1)))
    v_c = min(V, min_v)
    return max(1, max_elems // v_c), v_c


def cpu_chunks(N: int, V: int, buffers: int = 1) -> tuple[int, int]:
    """(n_c, v_c) of the CPU path: ``buffers`` fp32 chunk buffers live at once within ``CPU_CHUNK_BYTES``."""
    return _chunks(N, V, 4, min(CHUNK_BYTES, CPU_CHUNK_BYTES) // buffers, min(MIN_V_CHUNK, CPU_MIN_V_CHUNK))


# ---------------------------------------------------------------- forward

def _fwd_triton(x, w, b, y, inv_tau):
    N, H = x.shape
    V = w.shape[0]
    bn, bv, bk, nw, ns = launch_config(N, x.dtype)
    S = num_vocab_splits(N, V, bn, bv, x.device)
    part = torch.empty(4, S, N, dtype=torch.float32, device=x.device)  # m, s, t, z[y] per split
    _linear_fwd_kernel[(triton.cdiv(N, bn), S)](
        x, w, b if b is not None else x, y, part[0], part[1], part[2], part[3],
        N, V, S, x.stride(0), x.stride(1), w.stride(0), w.stride(1), inv_tau,
        H=H, HAS_BIAS=b is not None, BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, DOT_PREC=dot_precision(x.dtype),
        num_warps=nw, num_stages=ns)
    lse, ent = merge_partials(part[0], part[1], part[2])
    logp = torch.where((y >= 0) & (y < V), part[3].sum(0) - lse, 0.0)  # logp = z[y] − LSE (z[y] is in one split)
    return logp, lse, ent


def _logits_chunk_torch(xc, wv, bv, inv_tau):
    """z [n_c, v_c] fp32 = (x·Wᵀ + b)/τ for one chunk (CPU path)."""
    z = xc.float() @ wv.float().t()
    if bv is not None:
        z += bv.float()
    return z if inv_tau == 1.0 else z.mul_(inv_tau)  # τ = 1: z/τ = z exactly, no pass over the chunk


def _fwd_torch(x, w, b, y, inv_tau, kept: dict | None = None):
    """CPU path: the same token × vocab chunk loop, merging (m, s, t) across vocab chunks like the kernel's tiles.
    ``kept``: a dict that receives each chunk's logits z [n_c, v_c] fp32 under its (n0, v0), for the backward."""
    N, V = x.shape[0], w.shape[0]
    n_c, v_c = cpu_chunks(N, V)
    logp = torch.empty(N, dtype=torch.float32, device=x.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp)
    for n0 in range(0, N, n_c):
        n1 = min(N, n0 + n_c)
        yc = y[n0:n1]
        m = torch.full((n1 - n0,), M_INIT.value, device=x.device)
        s = torch.zeros_like(m)
        t = torch.zeros_like(m)
        zy = torch.zeros_like(m)
        for v0 in range(0, V, v_c):
            v1 = min(V, v0 + v_c)
            z = _logits_chunk_torch(x[n0:n1], w[v0:v1], None if b is None else b[v0:v1], inv_tau)
            if kept is not None:
                kept[n0, v0] = z
            mc = z.amax(dim=1)  # (amax: the max without its argmax, ~10× faster on CPU)
            d = z - mc[:, None]  # z − m_chunk
            e = d.exp()
            m, s, t = merge_stats(m, s, t, mc, e.sum(1), d.mul_(e).sum(1))  # Σ e, Σ d·e (d's buffer reused)
            del d, e
            local = yc - v0
            hit = (local >= 0) & (local < v1 - v0)
            zy = torch.where(hit, z.gather(1, local.clamp(0, v1 - v0 - 1)[:, None]).squeeze(1), zy)  # z[y]
            del z  # at most three tiles live at once: z, d, e (the next chunk's z is allocated after these are freed)
        log_s = torch.log(s)
        lse[n0:n1] = m + log_s  # LSE = m + log s
        ent[n0:n1] = log_s - t / s  # H = log s − t/s
        logp[n0:n1] = torch.where((yc >= 0) & (yc < V), zy - lse[n0:n1], 0.0)  # logp = z[y] − LSE
    return logp, lse, ent


def merge_stats(m1, s1, t1, m2, s2, t2):
    """Merge two (m, s, t) running stats [N] (see ``_lse``).

    M = max(m1, m2);  s = Σ_i e^{m_i−M}·s_i;  t = Σ_i e^{m_i−M}·(t_i + (m_i−M)·s_i)."""
    big_m = torch.maximum(m1, m2)
    a1, a2 = torch.exp(m1 - big_m), torch.exp(m2 - big_m)
    return big_m, a1 * s1 + a2 * s2, a1 * (t1 + (m1 - big_m) * s1) + a2 * (t2 + (m2 - big_m) * s2)


# ---------------------------------------------------------------- backward

_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(..., out_dtype=) exists (CUDA kernels)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b as fp32 [n, m] with fp32 accumulation, for a chunk's product that is summed into an fp32 buffer.

    16-bit CUDA operands stay 16-bit (tensor cores) and only the output is fp32 (``torch.mm(out_dtype=)``, torch ≥ 2.8);
    elsewhere (CPU, older torch) the operands are upcast. A plain ``a @ b`` would round each chunk's product to bf16."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and a.dtype == b.dtype and _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _dz_triton(xc, wv, bv, yc, lse, ent, g_lp, g_h, v_start, inv_tau):
    nc, H = xc.shape
    vc = wv.shape[0]
    bn, bv_, bk, nw, ns = launch_config(nc, xc.dtype)
    g = torch.empty(nc, vc, dtype=xc.dtype, device=xc.device)
    _linear_dz_kernel[(triton.cdiv(nc, bn), triton.cdiv(vc, bv_))](
        xc, wv, bv if bv is not None else xc, yc, lse, ent, g_lp, g_h, g,
        nc, vc, v_start, xc.stride(0), xc.stride(1), wv.stride(0), wv.stride(1), g.stride(0), inv_tau,
        H=H, HAS_BIAS=bv is not None, BLOCK_N=bn, BLOCK_V=bv_, BLOCK_K=bk, DOT_PREC=dot_precision(xc.dtype),
        num_warps=nw, num_stages=ns)
    return g


def _dz_torch(xc, wv, bv, yc, lse, ent, g_lp, g_h, v_start, inv_tau, z=None):
    """G for one chunk (CPU path); ``z``: the chunk's logits kept by the forward (else recomputed, the same GEMM);
    ``g_h`` None: the entropy gets no gradient (its term is skipped, not multiplied by zero)."""
    if z is None:
        z = _logits_chunk_torch(xc, wv, bv, inv_tau)  # z = (x·Wᵀ + b)/τ
        log_p = z.sub_(lse[:, None])  # log p = z − LSE
    else:
        log_p = z.sub(lse[:, None])  # the kept z stays as it is (a second backward reads it again)
    g_lp = torch.where(yc >= 0, g_lp, 0.0)  # ignored labels: no gradient through logp
    if g_h is None:  # dz = −g·p, in the log p buffer
        dz = log_p.exp_().mul_(-g_lp[:, None])
    else:  # dz = −g·p − g_H·p(log p + H), reusing the log p buffer: (log p + H)·(−g_H·p) − g·p
        p = log_p.exp()
        dz = log_p.add_(ent[:, None]).mul_(p).mul_(-g_h[:, None]).sub_(p.mul_(g_lp[:, None]))
    local = yc - v_start
    hit = (local >= 0) & (local < wv.shape[0])
    rows = torch.arange(xc.shape[0], device=xc.device)[hit]
    dz[rows, local[hit]] += g_lp[hit]  # + g·onehot(y)
    return (dz if inv_tau == 1.0 else dz.mul_(inv_tau)).to(xc.dtype)  # G = ∂L/∂z / τ (τ = 1: no pass)


def _backward(x, w, b, y, lse, ent, g_lp, g_h, inv_tau, triton_path, need, kept=None):
    """x [N, H], w [V, H], b [V]|None, y/lse/ent/g_lp/g_h [N] → (dx [N, H], dw [V, H], db [V]) (None where not needed).
    ``kept``: the CPU forward's logit chunks by (n0, v0), or None (recompute); g_h None (CPU path): no entropy gradient."""
    dz_fn = _dz_triton if triton_path else _dz_torch

    def dz_chunk(n0, n1, v0, v1):
        z = {} if kept is None else {"z": kept[n0, v0]}
        return dz_fn(x[n0:n1], w[v0:v1], None if b is None else b[v0:v1], y[n0:n1], lse[n0:n1], ent[n0:n1],
                     g_lp[n0:n1], None if g_h is None else g_h[n0:n1], v0, inv_tau, **z)

    return head_backward(x, w, b, dz_chunk, triton_path, need)


def head_backward(x, w, b, dz_chunk, triton_path, need):
    """The chunked head backward shared by the fused head kernels: for each token × vocab chunk, G = ``dz_chunk(n0, n1,
    v0, v1)`` ([n1−n0, v1−v0], x's dtype, = ∂L/∂(x·Wᵀ + b)), then dX += G·W_chunk, dW_chunk = Gᵀ·X, db += Σ_n G (fp32
    accumulation). x [N, H], w [V, H], b [V]|None; need = (dx, dw, db) flags → (dx, dw, db) (None where not needed)."""
    N, V = x.shape[0], w.shape[0]
    n_c, v_c = _chunks(N, V, x.element_size()) if triton_path else cpu_chunks(N, V)
    need_dx, need_dw, need_db = need
    dx32 = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need_dx else None
    one_token_chunk = n_c >= N
    dw = None
    if N == 0:
        return (torch.zeros_like(x) if need_dx else None, torch.zeros_like(w) if need_dw else None,
                torch.zeros_like(b) if need_db else None)
    if need_dw:  # complete per vocab chunk when all tokens are in one chunk; else accumulate in fp32
        dw = torch.empty(w.shape, dtype=w.dtype if one_token_chunk else torch.float32, device=w.device)  # contiguous
        if not one_token_chunk:
            dw.zero_()
    db32 = torch.zeros(V, dtype=torch.float32, device=x.device) if need_db else None
    for n0 in range(0, N, n_c):
        n1 = min(N, n0 + n_c)
        xc = x[n0:n1]
        for v0 in range(0, V, v_c):
            v1 = min(V, v0 + v_c)
            wv = w[v0:v1]
            g = dz_chunk(n0, n1, v0, v1)  # G [n_c, v_c], input dtype
            if need_dx:
                dx32[n0:n1] += _mm_fp32(g, wv)  # dX += G·W_chunk (fp32 product)
            if need_dw:
                if one_token_chunk:
                    torch.mm(g.t(), xc, out=dw[v0:v1])  # dW_chunk = Gᵀ·X (fp32 accumulation inside the GEMM over all N)
                else:
                    dw[v0:v1] += _mm_fp32(g.t(), xc)  # dW_chunk += Gᵀ·X_chunk (fp32 product, fp32 buffer)
            if need_db:
                db32[v0:v1] += g.sum(0, dtype=torch.float32)  # db = Σ_n G
            del g
    dx = dx32.to(x.dtype) if need_dx else None
    if need_dw and dw.dtype != w.dtype:
        dw = dw.to(w.dtype)
    db = db32.to(b.dtype) if need_db else None
    return dx, dw, db


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, y, inv_tau, triton_path, keep):
        ctx.kept = {} if keep else None  # CPU, training, logits small: the backward reuses the forward's logits
        ctx.set_materialize_grads(False)  # an output without a gradient (usually the entropy) arrives as None
        if x.shape[0] == 0:  # no tokens: empty outputs (and zero gradients)
            logp = lse = ent = x.new_zeros(0, dtype=torch.float32)
        else:
            with no_autocast(x):
                logp, lse, ent = (_fwd_triton(x, w, b, y, inv_tau) if triton_path
                                  else _fwd_torch(x, w, b, y, inv_tau, ctx.kept))
        ctx.save_for_backward(x, w, b, y, lse, ent)
        ctx.inv_tau, ctx.triton_path = inv_tau, triton_path
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        x, w, b, y, lse, ent = ctx.saved_tensors
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float()
        g_logp = torch.where((y >= 0) & (y < w.shape[0]), g_logp, 0.0).contiguous()  # ignored (or, on CUDA, unchecked ≥ V)
        if g_ent is not None:
            g_ent = g_ent.float().contiguous()
        elif ctx.triton_path:  # the kernel reads a gradient; the CPU path skips the entropy term (``_dz_torch``)
            g_ent = torch.zeros_like(lse)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])
        with no_autocast(x):
            dx, dw, db = _backward(x, w, b, y, lse, ent, g_logp, g_ent, ctx.inv_tau, ctx.triton_path, need, ctx.kept)
        return dx, dw, db, None, None, None, None


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias: torch.Tensor | None = None,
                    temperature: float = 1.0, return_entropy: bool = False):
    """log p(y | z) (and entropy) for z = (hidden·weightᵀ + bias)/τ, never materializing [N, V] logits.

    hidden: [..., H]; weight: [V, H]; bias: [V] or None (same dtype as weight); labels: [...] integer (< 0 = ignore,
    ≥ V is an error, checked on CPU). Returns logp [...] fp32, or (logp, entropy) [...] fp32 if ``return_entropy``.
    Differentiable w.r.t. hidden, weight and bias (fp32 accumulation).
    """
    fn = "linear_logprobs"
    check_float(f"{fn}: hidden", hidden)
    check_float(f"{fn}: weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be [V, H], got {list(weight.shape)}")
    V, H = weight.shape
    if hidden.dim() < 1 or hidden.shape[-1] != H:
        raise ValueError(f"{fn}: hidden must be [..., H={H}] to match weight [V, H], got {list(hidden.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{fn}: hidden dtype {hidden.dtype} != weight dtype {weight.dtype}")
    if bias is not None:
        check_float(f"{fn}: bias", bias)
        if tuple(bias.shape) != (V,) or bias.dtype != weight.dtype:
            raise ValueError(f"{fn}: bias must be [V={V}] of dtype {weight.dtype}, got {list(bias.shape)} {bias.dtype}")
    if not temperature > 0:
        raise ValueError(f"{fn}: temperature must be > 0, got {temperature}")
    lead = tuple(hidden.shape[:-1])
    check_labels(fn, labels, lead, V)
    x = hidden.reshape(-1, H)  # a view when possible; strides are passed to the kernel
    y = labels.reshape(-1).contiguous()
    triton_path = use_triton(hidden)
    if triton_path and bias is not None:
        bias = bias.contiguous()
    keep = (not triton_path and torch.is_grad_enabled() and x.shape[0] * V * 4 <= CPU_KEEP_BYTES
            and any(t is not None and t.requires_grad for t in (hidden, weight, bias)))
    logp, ent = _LinearLogProbs.apply(x, weight, bias, y, 1.0 / float(temperature), triton_path, keep)
    logp, ent = logp.view(lead), ent.view(lead)
    return (logp, ent) if return_entropy else logp


def linear_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                        bias: torch.Tensor | None = None, temperature: float = 1.0, return_entropy: bool = False):
    """Plain PyTorch reference (materializes [..., V] logits; use float64 inputs for ground truth)."""
    logits = hidden @ weight.t()  # x·Wᵀ
    if bias is not None:
        logits = logits + bias  # + b
    return logprobs_from_logits_ref(logits, labels, temperature=temperature, return_entropy=return_entropy)
