"""Per-token log-probs (and entropy) of the labels under softmax(logits / τ), read in one pass.

Notation: N tokens (any leading shape [...] flattened), V vocabulary.  Math (docs/kernels.md):
    z = logits / τ;   logp = z[y] − LSE(z);   H = LSE(z) − Σ_v softmax(z)_v · z_v
    ∂logp/∂z = onehot(y) − p;   ∂H/∂z = −p ⊙ (log p + H);   ∂/∂logits = ∂/∂z · 1/τ

Design
- Forward (Triton): one program per ``BLOCK_R`` rows streams the row in ``BLOCK_V`` tiles, keeping the online max, Σexp and
  Σ(z−m)·exp in fp32 (``_lse.lse_tile_update``): the logits are read once, nothing [N, V] is written. Only LSE and H per
  row are saved for the backward (8 bytes/token).
- Backward (Triton): one more read of the logits and one write of grad_logits in the logits' dtype:
  dlogits = (g_logp·(onehot − p) − g_H·p ⊙ (log p + H)) / τ, with p = exp(z − LSE) recomputed per tile.
  On H100 at [32·512, 151936] bf16 this is 5.0 GB read (fwd) and 5.0 GB read + 5.0 GB written (bwd): 1.66 ms + 3.3 ms at
  3 TB/s; the kernels do one exp per element (SFU cost ~0.7 ms for 2.5 G elements, below the memory time).
- CPU auto/"torch": PyTorch over row chunks of ``CHUNK_BYTES`` fp32, with a custom autograd that recomputes in backward.
- Labels < 0 (e.g. −100) give logp = 0 and no gradient through logp (entropy is still computed).
  Labels ≥ V raise ValueError for CPU tensors; on CUDA they are not checked (that would need a host sync) and behave like
  ignored labels (logp = 0, no logp gradient).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import use_triton
from ._lse import M_INIT, lse_tile_update
from ._utils import check_float

# Row chunk of the CPU path: at most this many bytes of fp32 [rows, V] temporaries at a time (small: stays in cache).
CHUNK_BYTES = 4 * 2**20

# (BLOCK_R, BLOCK_V, num_warps) — the only configs the launcher picks (see ``launch_config``).
CONFIGS = ((16, 256, 4), (4, 1024, 4), (1, 4096, 8))


def launch_config(V: int) -> tuple[int, int, int]:
    """(BLOCK_R rows per program, BLOCK_V tile width, num_warps) for vocab size V; the same for every dtype."""
    if V <= 256:
        return CONFIGS[0]
    if V <= 1024:
        return CONFIGS[1]
    return CONFIGS[2]


@triton.jit
def _logprobs_fwd_kernel(
    # data ptrs
    x_ptr, y_ptr, logp_ptr, lse_ptr, ent_ptr,
    # shapes (V is a constexpr: one compile per vocabulary; runtime loop bounds break the interpreter under NumPy 2.4)
    N, D1,
    # strides (row r sits at (r // D1)·stride_x0 + (r % D1)·stride_x1; the vocab dim is unit-stride)
    stride_x0, stride_x1,
    # constants
    inv_tau,
    V: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """x [N, V] (2 leading strides), y [N] int → logp, lse, ent [N] fp32."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    r64 = rows.to(tl.int64)
    row_off = (r64 // D1) * stride_x0 + (r64 % D1) * stride_x1
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_R], M_INIT, tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    t = tl.zeros([BLOCK_R], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        valid = row_ok[:, None] & (c < V)[None, :]
        x = tl.load(x_ptr + row_off[:, None] + c[None, :], mask=valid, other=0.0)
        z = x.to(tl.float32) * inv_tau  # z = logits / τ
        m, s, t = lse_tile_update(m, s, t, z, valid)
    y = tl.load(y_ptr + r64, mask=row_ok, other=-1).to(tl.int64)
    has_y = row_ok & (y >= 0) & (y < V)
    zy = tl.load(x_ptr + row_off + y, mask=has_y, other=0.0).to(tl.float32) * inv_tau  # z[y]
    s = tl.where(row_ok, s, 1.0)  # padding rows: keep log finite (not stored)
    log_s = tl.log(s)
    lse = m + log_s  # LSE = m + log Σ e^{z−m}
    tl.store(logp_ptr + r64, tl.where(has_y, zy - lse, 0.0), mask=row_ok)  # logp = z[y] − LSE
    tl.store(lse_ptr + r64, lse, mask=row_ok)
    tl.store(ent_ptr + r64, log_s - t / s, mask=row_ok)  # H = log s − Σ(z−m)e^{z−m} / s


@triton.jit
def _logprobs_bwd_kernel(
    # data ptrs
    x_ptr, y_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, dx_ptr,
    # shapes (V is a constexpr: one compile per vocabulary; runtime loop bounds break the interpreter under NumPy 2.4)
    N, D1,
    # strides (dx is contiguous [N, V])
    stride_x0, stride_x1,
    # constants
    inv_tau,
    V: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """dx [N, V] (logits' dtype) = (g_logp·(onehot − p) − g_H·p ⊙ (log p + H)) / τ."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    r64 = rows.to(tl.int64)
    row_off = (r64 // D1) * stride_x0 + (r64 % D1) * stride_x1
    y = tl.load(y_ptr + r64, mask=row_ok, other=-1).to(tl.int64)
    lse = tl.load(lse_ptr + r64, mask=row_ok, other=0.0)
    ent = tl.load(ent_ptr + r64, mask=row_ok, other=0.0)
    g_lp = tl.load(g_logp_ptr + r64, mask=row_ok, other=0.0)
    g_lp = tl.where(y >= 0, g_lp, 0.0)  # ignored labels: no gradient through logp
    g_h = tl.load(g_ent_ptr + r64, mask=row_ok, other=0.0)
    cols = tl.arange(0, BLOCK_V)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        valid = row_ok[:, None] & (c < V)[None, :]
        x = tl.load(x_ptr + row_off[:, None] + c[None, :], mask=valid, other=0.0)
        log_p = x.to(tl.float32) * inv_tau - lse[:, None]  # log p = z − LSE
        p = tl.exp(log_p)
        onehot = (c[None, :] == y[:, None]).to(tl.float32)
        dz = g_lp[:, None] * (onehot - p) - g_h[:, None] * p * (log_p + ent[:, None])  # ∂L/∂z
        dx = dz * inv_tau  # ∂L/∂logits = ∂L/∂z / τ
        tl.store(dx_ptr + r64[:, None] * V + c[None, :], dx.to(dx_ptr.dtype.element_ty), mask=valid)


def _rows_view(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """x [..., V] with unit-stride last dim → (tensor, D1, stride_x0, stride_x1) so row r is at (r//D1)·s0 + (r%D1)·s1."""
    lead = x.shape[:-1]
    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if len(lead) == 0:
        return x, 1, 0, 0
    if len(lead) == 1:
        return x, max(n, 1), 0, x.stride(0)
    try:
        x2 = x.view(-1, x.shape[-1])
        return x2, max(n, 1), 0, x2.stride(0)
    except RuntimeError:
        pass
    if len(lead) == 2:  # e.g. a [B, T, V] slice/transposed view: use both strides, no copy
        return x, max(lead[1], 1), x.stride(0), x.stride(1)
    x2 = x.reshape(-1, x.shape[-1])  # rarer layouts with > 2 leading dims: copy
    return x2, max(n, 1), 0, x2.stride(0)


def _fwd_triton(x: torch.Tensor, y: torch.Tensor, inv_tau: float):
    n, V = y.numel(), x.shape[-1]
    xv, d1, s0, s1 = _rows_view(x)
    logp = torch.empty(n, dtype=torch.float32, device=x.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp)
    br, bv, nw = launch_config(V)
    if n:
        _logprobs_fwd_kernel[(triton.cdiv(n, br),)](
            xv, y, logp, lse, ent, n, d1, s0, s1, inv_tau, V=V, BLOCK_R=br, BLOCK_V=bv, num_warps=nw)
    return logp, lse, ent


def _bwd_triton(x, y, lse, ent, g_logp, g_ent, inv_tau):
    n, V = y.numel(), x.shape[-1]
    xv, d1, s0, s1 = _rows_view(x)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous [..., V]
    br, bv, nw = launch_config(V)
    if n:
        _logprobs_bwd_kernel[(triton.cdiv(n, br),)](
            xv, y, lse, ent, g_logp, g_ent, dx, n, d1, s0, s1, inv_tau, V=V, BLOCK_R=br, BLOCK_V=bv, num_warps=nw)
    return dx


def _row_chunks(n: int, V: int):
    step = max(1, CHUNK_BYTES // (4 * max(V, 1)))
    for r0 in range(0, n, step):
        yield r0, min(n, r0 + step)


def _fwd_torch(x2: torch.Tensor, y: torch.Tensor, inv_tau: float):
    """CPU path. x2 [N, V], y [N] → logp, lse, ent [N] fp32, over row chunks (fp32 temporaries ≤ CHUNK_BYTES)."""
    n, V = x2.shape
    logp = torch.empty(n, dtype=torch.float32, device=x2.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp)
    for r0, r1 in _row_chunks(n, V):
        z = x2[r0:r1].float() * inv_tau  # z = logits / τ
        l = torch.logsumexp(z, dim=-1)  # LSE
        yc = y[r0:r1]
        zy = z.gather(1, yc.clamp(0, V - 1).unsqueeze(1)).squeeze(1)
        logp[r0:r1] = torch.where((yc >= 0) & (yc < V), zy - l, 0.0)  # logp = z[y] − LSE (unchecked ≥ V: 0)
        log_p = z.sub_(l[:, None])  # log p = z − LSE (in place: z is not needed any more)
        ent[r0:r1] = -(log_p.exp().mul_(log_p)).sum(-1)  # H = LSE − Σ p·z = −Σ p log p
        lse[r0:r1] = l
    return logp, lse, ent


def _bwd_torch(x2, y, lse, ent, g_logp, g_ent, inv_tau):
    n, V = x2.shape
    dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
    g_lp = torch.where((y >= 0) & (y < V), g_logp, 0.0)  # ignored labels: no gradient through logp
    for r0, r1 in _row_chunks(n, V):
        log_p = (x2[r0:r1].float() * inv_tau).sub_(lse[r0:r1, None])  # log p = z − LSE
        p = torch.exp(log_p)
        # dz = −g·p − g_H·p(log p + H), reusing the log p buffer
        dz = log_p.add_(ent[r0:r1, None]).mul_(p).mul_(-g_ent[r0:r1, None]).sub_(p.mul_(g_lp[r0:r1, None]))
        yc = y[r0:r1]
        ok = (yc >= 0) & (yc < V)
        rows = torch.arange(r1 - r0, device=x2.device)[ok]
        dz[rows, yc[ok]] += g_lp[r0:r1][ok]  # + g·onehot(y)
        dx[r0:r1] = (dz * inv_tau).to(x2.dtype)  # ∂L/∂logits = ∂L/∂z / τ
    return dx


class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, inv_tau, triton_path):
        if triton_path:
            logp, lse, ent = _fwd_triton(logits, labels, inv_tau)
        else:
            logp, lse, ent = _fwd_torch(logits.reshape(-1, logits.shape[-1]), labels, inv_tau)
        ctx.save_for_backward(logits, labels, lse, ent)
        ctx.inv_tau, ctx.triton_path = inv_tau, triton_path
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, labels, lse, ent = ctx.saved_tensors
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.reshape(-1).float()
        g_logp = torch.where((labels >= 0) & (labels < logits.shape[-1]), g_logp, 0.0).contiguous()  # ignored / ≥ V
        g_ent = torch.zeros_like(lse) if g_ent is None else g_ent.reshape(-1).float().contiguous()
        if ctx.triton_path:
            dx = _bwd_triton(logits, labels, lse, ent, g_logp, g_ent, ctx.inv_tau)
        else:
            dx = _bwd_torch(logits.reshape(-1, logits.shape[-1]), labels, lse, ent, g_logp, g_ent, ctx.inv_tau)
            dx = dx.view(logits.shape)
        return dx, None, None, None


def check_labels(fn: str, labels: torch.Tensor, lead: tuple, V: int) -> None:
    """Shared argument checks for labels [...] against V (CPU tensors: also the range, which needs their values)."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{fn}: labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(lead):
        raise ValueError(f"{fn}: labels shape {list(labels.shape)} must equal the leading shape {list(lead)}")
    if not labels.is_cuda and labels.numel():
        top = int(labels.max())
        if top >= V:
            raise ValueError(f"{fn}: labels contain {top} >= V={V} (use a negative index such as -100 to ignore a token)")


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                         return_entropy: bool = False):
    """log p(y | logits/τ) per token (and the entropy of softmax(logits/τ)).

    logits: [..., V] fp32/bf16/fp16 (any strides; copied only if the last dim is not unit-stride).
    labels: [...] integer; < 0 means ignore (logp = 0, no gradient); ≥ V is an error (checked on CPU only).
    Returns logp [...] fp32, or (logp [...], entropy [...]) fp32 if ``return_entropy``. Differentiable w.r.t. logits.
    """
    check_float("logprobs_from_logits: logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logprobs_from_logits: logits must be [..., V] with V >= 1, got {list(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"logprobs_from_logits: temperature must be > 0, got {temperature}")
    lead, V = tuple(logits.shape[:-1]), logits.shape[-1]
    check_labels("logprobs_from_logits", labels, lead, V)
    if labels.device != logits.device:
        raise ValueError(f"logprobs_from_logits: labels on {labels.device}, logits on {logits.device}")
    if logits.stride(-1) != 1 and V > 1:
        logits = logits.contiguous()
    y = labels.reshape(-1).contiguous()
    logp, ent = _LogProbs.apply(logits, y, 1.0 / float(temperature), use_triton(logits))
    logp, ent = logp.view(lead), ent.view(lead)
    return (logp, ent) if return_entropy else logp


def logprobs_from_logits_ref(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                             return_entropy: bool = False):
    """Plain PyTorch reference (use float64 inputs for ground truth). Shapes as ``logprobs_from_logits``."""
    z = logits / temperature  # z = logits / τ
    log_p = torch.log_softmax(z, dim=-1)  # log p = z − LSE(z)
    ok = labels >= 0
    logp = torch.where(ok, log_p.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1), 0.0)  # logp = log p[y]
    if not return_entropy:
        return logp
    ent = -(log_p.exp() * log_p).sum(-1)  # H = −Σ p log p (= LSE − Σ p·z)
    return logp, ent
