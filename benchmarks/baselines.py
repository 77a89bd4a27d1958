"""Comparison implementations: the eager PyTorch formulas RLHF frameworks use today (written here, from the formulas),
their ``torch.compile`` versions, optional adapters to TRL / Liger-Kernel kernels, and chunked float64 references.

Notation: B batch, T time, V vocabulary, H hidden size, N tokens. Every function returns fp32 (or float64 for the refs).

Eager providers (what TRL / verl do in plain PyTorch):
- ``lp_ent_logsoftmax_gather``  full fp32 log-softmax then gather (verl ``logprobs_from_logits``) + softmax entropy.
- ``lp_ent_logsumexp``          gather then subtract an fp32 logsumexp (TRL's fp32 path) + chunked entropy.
- ``lp_ent_rowloop``            one batch row at a time in the input dtype (TRL's bf16 path): low memory, bf16 error.
- ``linear_lp_eager``           hidden @ Wᵀ materialized as [N, V], then fp32 log-softmax and gather.
- ``gae_eager``                 reversed Python loop over T (verl-style) + masked whitening of the advantages.
- ``ppo_loss_eager``            clipped policy loss + k3 KL in the loss + clipped value loss, token-mean, with metrics.
The peer kernels (TRL 1.16, Liger 0.8.5) are used only when importable and only on CUDA (``peer_providers``).
"""
from __future__ import annotations

from typing import Callable

import torch


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Upcast to fp32 as the frameworks do, but keep float64 (so each eager formula run in float64 is a reference)."""
    return x if x.dtype == torch.float64 else x.float()


# ----------------------------------------------------------------------------------------------------------------------
# log-probs (+ entropy) from logits [B, T, V] with labels [B, T]
# ----------------------------------------------------------------------------------------------------------------------
def lp_ent_logsoftmax_gather(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
    """verl-style: z = logits/τ in fp32; logp = log_softmax(z)[y]; H = LSE(z) − Σ softmax(z)·z. Returns ([B,T], [B,T])."""
    z = _f32(logits) / temperature
    logp = torch.log_softmax(z, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    p = torch.softmax(z, dim=-1)
    ent = torch.logsumexp(z, dim=-1) - (p * z).sum(-1)  # H = LSE − Σ p·z
    return logp, ent


def lp_ent_logsumexp(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, chunk: int = 128):
    """TRL-style fp32 path: logp = z[y] − logsumexp(z); entropy over chunks of rows: H = −Σ p·log p."""
    z = _f32(logits) / temperature
    logp = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)  # logp = z_y − LSE(z)
    flat = z.reshape(-1, z.shape[-1])
    ents = []
    for c in flat.split(chunk):
        lp = torch.log_softmax(c, dim=-1)
        ents.append(-(lp.exp() * lp).sum(-1))  # H = −Σ p log p
    return logp, torch.cat(ents).view(logp.shape)


def lp_ent_rowloop(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
    """TRL-style low-precision path: one batch row at a time, log-softmax in the input dtype (bf16 error), then fp32."""
    lps, ents = [], []
    for row, y in zip(logits, labels):  # row [T, V]
        lp = torch.log_softmax(row / temperature, dim=-1)
        lps.append(lp.gather(-1, y.unsqueeze(-1)).squeeze(-1))
        ents.append(-(lp.exp() * lp).sum(-1))  # H = −Σ p log p, in the input dtype
    return _f32(torch.stack(lps)), _f32(torch.stack(ents))


def logprobs_max_err(logits, labels, temperature, outs, grads=None, g_logp=None, g_ent=None, chunk_rows=512) -> float:
    """Max |·| error of (logp, entropy[, dlogits]) against float64, computed chunk by chunk over the N = B·T rows
    (so a [32, 512, 151936] check never holds float64 logits at once). ``outs`` = (logp, entropy or None);
    ``grads`` = dlogits for upstream grads (g_logp, g_ent) (either may be None = 0)."""
    V = logits.shape[-1]
    x = logits.reshape(-1, V)
    y = labels.reshape(-1)
    flat_outs = [None if o is None else o.reshape(-1) for o in outs]
    gl = None if g_logp is None else g_logp.reshape(-1)
    ge = None if g_ent is None else g_ent.reshape(-1)
    gx = None if grads is None else grads.reshape(-1, V)
    err = 0.0
    for s in range(0, x.shape[0], chunk_rows):
        e = min(s + chunk_rows, x.shape[0])
        z = x[s:e].double() / temperature
        lse = torch.logsumexp(z, dim=-1)
        lp_all = z - lse[:, None]
        p = lp_all.exp()
        logp = lp_all.gather(-1, y[s:e, None]).squeeze(-1)
        ent = lse - (p * z).sum(-1)
        err = max(err, (flat_outs[0][s:e].double() - logp).abs().max().item())
        if len(flat_outs) > 1 and flat_outs[1] is not None:
            err = max(err, (flat_outs[1][s:e].double() - ent).abs().max().item())
        if gx is not None:
            # ∂logp/∂z = onehot(y) − p ; ∂H/∂z = −p ⊙ (log p + H) ; ×1/τ for ∂/∂logits
            dz = torch.zeros_like(z)
            if gl is not None:
                dz += gl[s:e, None].double() * (-p)
                dz.scatter_add_(-1, y[s:e, None], gl[s:e, None].double())
            if ge is not None:
                dz += ge[s:e, None].double() * (-p * (lp_all + ent[:, None]))
            err = max(err, (gx[s:e].double() - dz / temperature).abs().max().item())
    return err


# ----------------------------------------------------------------------------------------------------------------------
# fused linear log-probs: hidden [N, H], weight [V, H], labels [N]
# ----------------------------------------------------------------------------------------------------------------------
def linear_lp_eager(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
    """Naive: logits = hidden·Wᵀ as [N, V] (input dtype), fp32 log-softmax, gather. Returns logp [N]."""
    logits = hidden @ weight.t()
    return torch.log_softmax(_f32(logits) / temperature, dim=-1).gather(-1, labels[:, None]).squeeze(-1)


def linear_max_err(hidden, weight, labels, temperature, logp, dhidden=None, dweight=None, g_logp=None,
                   chunk_rows=1024) -> float:
    """Max |·| error of (logp[, dhidden, dweight]) against float64 for upstream grad g_logp, chunked over N."""
    Wd = weight.double()
    dW = torch.zeros_like(Wd) if dweight is not None else None
    err = 0.0
    for s in range(0, hidden.shape[0], chunk_rows):
        e = min(s + chunk_rows, hidden.shape[0])
        h = hidden[s:e].double()
        z = h @ Wd.t() / temperature
        lp_all = z - torch.logsumexp(z, dim=-1, keepdim=True)
        y = labels[s:e, None]
        err = max(err, (logp[s:e].double() - lp_all.gather(-1, y).squeeze(-1)).abs().max().item())
        if g_logp is not None and (dhidden is not None or dW is not None):
            g = g_logp[s:e, None].double()
            dz = -g * lp_all.exp()  # dZ = g·(onehot − p)
            dz.scatter_add_(-1, y, g)
            if dhidden is not None:
                err = max(err, (dhidden[s:e].double() - dz @ Wd / temperature).abs().max().item())  # dX = dZ·W/τ
            if dW is not None:
                dW += dz.t() @ h / temperature  # dW = dZᵀ·X/τ
    if dW is not None:
        err = max(err, (dweight.double() - dW).abs().max().item())
    return err


# ----------------------------------------------------------------------------------------------------------------------
# GAE over valid tokens + masked whitening: rewards, values, mask [B, T]
# ----------------------------------------------------------------------------------------------------------------------
def gae_eager(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95, whiten: bool = True):
    """verl-style reversed Python loop (one step of B rows per iteration; masked steps carry the state through).
    δ_t = r_t + γ·V_next − V_t ; A_t = δ_t + γλ·A_next ; R_t = A_t + V_t ; then A ← masked whiten(A). Returns (A, R)."""
    m = mask.to(rewards.dtype)
    B, T = rewards.shape
    next_v = rewards.new_zeros(B)
    next_a = rewards.new_zeros(B)
    adv_rev = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_v - values[:, t]  # δ_t = r_t + γ V_next − V_t
        a = delta + gamma * lam * next_a                       # A_t = δ_t + γλ A_next
        mt = m[:, t]
        next_a = a * mt + (1 - mt) * next_a                    # holes carry A_next through
        next_v = values[:, t] * mt + (1 - mt) * next_v         # and V_next
        adv_rev.append(a * mt)
    adv = torch.stack(adv_rev[::-1], dim=1)
    ret = (adv + values) * m                                   # R_t = A_t + V_t (0 where masked)
    if whiten:
        adv = whiten_eager(adv, m)
    return adv, ret


def whiten_eager(x, m, shift_mean: bool = True, eps: float = 1e-8):
    """μ = Σxm/Σm ; σ² = Σ(x−μ)²m/(Σm−1) (0 if Σm<2) ; (x−μ)·rsqrt(σ²+eps)·m (+μ back if not shift_mean)."""
    n = m.sum()
    mu = (x * m).sum() / n.clamp_min(1)
    var = ((x - mu) ** 2 * m).sum() / (n - 1) if n >= 2 else x.new_zeros(())
    out = (x - mu) * torch.rsqrt(var + eps) * m
    return out if shift_mean else out + mu * m


# ----------------------------------------------------------------------------------------------------------------------
# clipped PPO policy loss + k3 KL (in the loss) + clipped value loss, [B, T], token-mean
# ----------------------------------------------------------------------------------------------------------------------
def ppo_loss_eager(logp, old_logp, ref_logp, adv, mask, values, old_values, returns,
                   clip_eps: float = 0.2, kl_coef: float = 0.001, vf_clip: float = 0.2, vf_coef: float = 0.5):
    """Returns (pg_loss, vf_loss, metrics dict). Gradients flow to ``logp`` and ``values`` only."""
    m = mask.to(logp.dtype)
    n = m.sum().clamp_min(1)
    ratio = torch.exp(torch.clamp(logp - old_logp, -20, 20))            # ρ = exp(clamp(logp − old, ±20))
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    pg = torch.maximum(pg1, pg2)                                         # ℓ = max(−Aρ, −A·clip(ρ))
    d = torch.clamp(ref_logp - logp, -20, 20)
    kl = torch.exp(d) - d - 1                                            # k3 = exp(d) − d − 1
    pg_loss = ((pg + kl_coef * kl) * m).sum() / n
    v_clip = old_values + torch.clamp(values - old_values, -vf_clip, vf_clip)
    vf = 0.5 * torch.maximum((values - returns) ** 2, (v_clip - returns) ** 2)  # ½ max((V−R)², (Vclip−R)²)
    vf_loss = (vf * m).sum() / n
    with torch.no_grad():
        metrics = {
            "clipfrac": ((pg2 > pg1).float() * m).sum() / n,
            "approx_kl": (0.5 * (logp - old_logp) ** 2 * m).sum() / n,
            "kl": (kl * m).sum() / n,
            "vf_clipfrac": (((v_clip - returns) ** 2 > (values - returns) ** 2).float() * m).sum() / n,
        }
    return pg_loss, vf_coef * vf_loss, metrics


# ----------------------------------------------------------------------------------------------------------------------
# torch.compile versions
# ----------------------------------------------------------------------------------------------------------------------
_COMPILED: dict = {}


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)`` once per function (dynamic=False: each benchmark shape is fixed)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


# ----------------------------------------------------------------------------------------------------------------------
# peer kernels (optional; CUDA only)
# ----------------------------------------------------------------------------------------------------------------------
def peer_providers(device: str) -> dict[str, Callable]:
    """Adapters to TRL 1.16 / Liger-Kernel 0.8.5 kernels that import here, keyed 'op/provider'. Empty off CUDA.

    Each adapter has our calling convention: logprobs -> (logp, entropy or None); linear -> logp [N]."""
    if device != "cuda":
        return {}
    out: dict[str, Callable] = {}
    try:
        from trl.kernels import selective_log_softmax_and_entropy as _trl_lpe

        def trl_lpe(logits, labels, temperature=1.0):
            lp, ent = _trl_lpe(logits / temperature if temperature != 1.0 else logits, labels)
            return lp.float(), ent.float()
        out["logprobs/trl"] = trl_lpe
    except Exception:  # noqa: BLE001 - optional dependency, any import failure means "not available"
        try:
            from trl.trainer.utils import entropy_from_logits as _trl_ent
            from trl.trainer.utils import selective_log_softmax as _trl_sls

            def trl_eager(logits, labels, temperature=1.0):
                z = logits / temperature
                return _trl_sls(z, labels).float(), _trl_ent(z).float()
            out["logprobs/trl"] = trl_eager
        except Exception:  # noqa: BLE001
            pass
    try:
        from trl.kernels import ChunkedLogProbFunction as _trl_chunked

        def trl_linear(hidden, weight, labels, temperature=1.0):
            r = _trl_chunked.apply(hidden, weight, None, labels, temperature, 4096)
            return (r[0] if isinstance(r, tuple) else r).float()
        out["linear/trl"] = trl_linear
    except Exception:  # noqa: BLE001
        pass
    try:
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax as _lig_sls

        def liger_lp(logits, labels, temperature=1.0):  # logp only (no entropy, no backward)
            lg = torch.cat([logits, logits[:, -1:]], dim=1)  # this kernel expects T+1 positions
            return _lig_sls(lg, labels, temperature=temperature).float(), None
        out["logprobs/liger"] = liger_lp
    except Exception:  # noqa: BLE001
        pass
    try:
        from liger_kernel.chunked_loss.fused_linear_ppo import _ChunkedSelectiveLogProbFunction as _lig_chunked

        def liger_linear(hidden, weight, labels, temperature=1.0):
            return _lig_chunked.apply(hidden, weight, labels, None, temperature, 4096).float()
        out["linear/liger"] = liger_linear
    except Exception:  # noqa: BLE001
        pass
    return out


def gae_ref64(rewards, values, mask, gamma=1.0, lam=0.95):
    """Float64 reference for (whitened A, R): the eager loop run in float64."""
    return gae_eager(rewards.double(), values.double(), mask.double(), gamma, lam, whiten=True)
