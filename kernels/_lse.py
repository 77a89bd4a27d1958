"""Shared Triton helper: the online log-sum-exp / entropy update used by ``logprobs.py``, ``fused_linear_logprobs.py``
and ``fused_linear_kl.py``.

For a row of z streamed in tiles we keep three fp32 numbers (per row):
    m = max_v z_v,   s = Σ_v exp(z_v − m),   t = Σ_v (z_v − m)·exp(z_v − m)
and at the end  LSE = m + log s  and  H = LSE − Σ_v softmax_v·z_v = log s − t / s
(because Σ softmax·z = m + t/s). Keeping t relative to m avoids the cancellation of LSE − E[z] when |z| is large.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Initial running max: finite (not -inf) so that (m_old − m_new)·s stays 0·finite = 0 on the first tile.
M_INIT = tl.constexpr(-1.0e30)


@triton.jit
def max_sum_update(m, s, z, valid):
    """Merge a tile into the running max and Σ exp: m, s [R] fp32; z [R, C] fp32; valid [R, C] bool.
    Returns (m', s', α = e^{m − m'} the rescale of the old sums, e = e^{z − m'} the tile's terms, 0 on padding)."""
    m_new = tl.maximum(m, tl.max(tl.where(valid, z, float("-inf")), axis=1))  # m' = max(m, max_c z_c)
    alpha = tl.exp(m - m_new)  # rescale of the old sums: e^{m − m'}
    e = tl.where(valid, tl.exp(tl.where(valid, z - m_new[:, None], 0.0)), 0.0)  # e^{z − m'} (0 on padding)
    return m_new, alpha * s + tl.sum(e, axis=1), alpha, e  # s' = e^{m−m'}·s + Σ e^{z−m'}


@triton.jit
def lse_tile_update(m, s, t, z, valid):
    """Merge a tile into the running (m, s, t).

    m, s, t: [R] fp32 running stats; z: [R, C] fp32 tile; valid: [R, C] bool (False for padding columns/rows).
    Returns the updated (m, s, t).
    """
    m_new, s_new, alpha, e = max_sum_update(m, s, z, valid)
    d = tl.where(valid, z - m_new[:, None], 0.0)  # z − m' (0 on padding)
    # t' = Σ (z − m')e^{z−m'} over old and new: e^{m−m'}·(t + (m − m')·s) + Σ_tile (z − m')e^{z−m'}
    t_new = alpha * (t + (m - m_new) * s) + tl.sum(d * e, axis=1)
    return m_new, s_new, t_new


def merge_partials(m: torch.Tensor, s: torch.Tensor, t: torch.Tensor):
    """Merge per-split stats along dim 0 (PyTorch, fp32). m, s, t: [S, N] → (lse [N], entropy [N]).

    M = max_i m_i;  s = Σ_i e^{m_i − M}·s_i;  t = Σ_i e^{m_i − M}·(t_i + (m_i − M)·s_i);  LSE = M + log s;  H = log s − t/s.
    """
    big_m = m.amax(dim=0)
    a = torch.exp(m - big_m)  # e^{m_i − M}
    s_tot = (a * s).sum(dim=0)
    t_tot = (a * (t + (m - big_m) * s)).sum(dim=0)
    log_s = torch.log(s_tot)
    return big_m + log_s, log_s - t_tot / s_tot
