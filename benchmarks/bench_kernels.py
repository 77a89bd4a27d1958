"""pytest-benchmark at tiny shapes: fastrlhf.kernels and the eager baseline side by side, per op.

    python -m pytest benchmarks/bench_kernels.py                  (timings grouped per op; --benchmark-disable: checks only)

Every test first checks numerics, so it can fail: on the same fresh random inputs, ours and the eager baseline are both
compared with a float64 reference (forward outputs and, for fwd+bwd, input gradients under random upstream grads) and
ours must be within ``2 x (eager's own error) + 8 fp32 ulps of the reference's magnitude`` (the flash-attention rule:
the kernel may be at most about twice as far from float64 as plain PyTorch in the same dtype; the ulp floor covers
outputs where eager happens to be exact to the last bit), and within the same bound of eager itself.
The CPU timings here are smoke numbers (few rounds, shared machine); the runner ``benchmarks.run_kernels`` is the benchmark.
"""
from __future__ import annotations

import pytest
import torch

from . import baselines as BL
from . import run_kernels as R

EPS32 = torch.finfo(torch.float32).eps
ROUNDS = dict(rounds=3, iterations=1, warmup_rounds=1)


def _err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def _check(ours, eager, ref, what: str) -> None:
    """ours/eager/ref: sequences of tensors (same order). Asserts the bound of the module docstring per tensor."""
    for i, (o, e, r) in enumerate(zip(ours, eager, ref)):
        floor = 8 * EPS32 * max(r.double().abs().max().item(), 1.0)
        e_err = _err(e, r)
        bound = 2 * e_err + floor
        o_err = _err(o, r)
        assert o_err <= bound, f"{what}[{i}]: fastrlhf error {o_err:.3e} vs float64 > 2 x eager's {e_err:.3e} + {floor:.1e}"
        assert _err(o, e) <= bound + e_err, f"{what}[{i}]: fastrlhf vs eager differ by {_err(o, e):.3e}"


# ----------------------------------------------------------------------------------------------------------------------
# logprobs (+ entropy) from logits [B, T, V]
# ----------------------------------------------------------------------------------------------------------------------
B_LP, T_LP, V_LP = 2, 24, 32001  # odd vocab


def _lp_inputs():
    logits = torch.randn(B_LP, T_LP, V_LP) * 3
    labels = torch.randint(0, V_LP, (B_LP, T_LP))
    return logits, labels


def _lp_ref64(logits, labels, g_lp=None, g_ent=None):
    x = logits.double().requires_grad_(g_lp is not None)
    lp, ent = BL.lp_ent_logsoftmax_gather(x, labels)  # float64 in, float64 ops: the reference
    lp, ent = lp.double(), ent.double()
    if g_lp is None:
        return lp.detach(), ent.detach()
    torch.autograd.backward([lp, ent], [g_lp.double(), g_ent.double()])
    return lp.detach(), ent.detach(), x.grad


@pytest.mark.parametrize("provider", ["fastrlhf", "eager"])
def test_logprobs_fwd(benchmark, provider):
    logits, labels = _lp_inputs()
    with torch.no_grad():
        ours = R.ours_logprobs(logits, labels, 1.0)
        eager = BL.lp_ent_logsoftmax_gather(logits, labels)
    _check(ours, eager, _lp_ref64(logits, labels), "logprobs fwd (logp, entropy)")
    fn = R.ours_logprobs if provider == "fastrlhf" else BL.lp_ent_logsoftmax_gather
    benchmark.group = f"logprobs fwd B={B_LP} T={T_LP} V={V_LP}"
    with torch.no_grad():
        benchmark.pedantic(fn, args=(logits, labels, 1.0), **ROUNDS)


@pytest.mark.parametrize("provider", ["fastrlhf", "eager"])
def test_logprobs_fwd_bwd(benchmark, provider):
    logits, labels = _lp_inputs()
    g_lp, g_ent = torch.randn(B_LP, T_LP), torch.randn(B_LP, T_LP)

    def fb(f):
        x = logits.clone().requires_grad_(True)
        lp, ent = f(x, labels, 1.0)
        torch.autograd.backward([lp, ent], [g_lp, g_ent])
        return lp.detach(), ent.detach(), x.grad
    _check(fb(R.ours_logprobs), fb(BL.lp_ent_logsoftmax_gather), _lp_ref64(logits, labels, g_lp, g_ent),
           "logprobs fwd+bwd (logp, entropy, dlogits)")
    fn = R.ours_logprobs if provider == "fastrlhf" else BL.lp_ent_logsoftmax_gather
    benchmark.group = f"logprobs fwd+bwd B={B_LP} T={T_LP} V={V_LP}"
    benchmark.pedantic(fb, args=(fn,), **ROUNDS)


# ----------------------------------------------------------------------------------------------------------------------
# linear log-probs: hidden [N, H], weight [V, H]
# ----------------------------------------------------------------------------------------------------------------------
N_LIN, H_LIN, V_LIN = 200, 64, 32001


@pytest.mark.parametrize("provider", ["fastrlhf", "eager"])
def test_linear_logprobs_fwd_bwd(benchmark, provider):
    hidden = torch.randn(N_LIN, H_LIN) / H_LIN**0.5
    weight = torch.randn(V_LIN, H_LIN)
    labels = torch.randint(0, V_LIN, (N_LIN,))
    g = torch.randn(N_LIN)

    def fb(f, dtype=torch.float32):
        h = hidden.to(dtype, copy=True).requires_grad_(True)  # a fresh leaf per call
        w = weight.to(dtype, copy=True).requires_grad_(True)
        lp = f(h, w, labels, 1.0)
        lp.backward(g.to(lp.dtype))
        return lp.detach(), h.grad, w.grad
    ref = fb(BL.linear_lp_eager, torch.float64)
    _check(fb(R.ours_linear), fb(BL.linear_lp_eager), ref, "linear_logprobs fwd+bwd (logp, dhidden, dweight)")
    fn = R.ours_linear if provider == "fastrlhf" else BL.linear_lp_eager
    benchmark.group = f"linear_logprobs fwd+bwd N={N_LIN} H={H_LIN} V={V_LIN}"
    benchmark.pedantic(fb, args=(fn,), **ROUNDS)


# ----------------------------------------------------------------------------------------------------------------------
# GAE + whitening, [B, T] fp32, right padding and holes
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("provider", ["fastrlhf", "eager"])
def test_gae_whiten(benchmark, provider):
    B, T = 16, 257
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    lengths = torch.randint(1, T + 1, (B,))
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    mask[0, 3:7] = 0  # a hole inside a row
    mask[1] = 0       # an empty row
    ours = R.ours_gae(rewards, values, mask, 0.99, 0.95)
    eager = BL.gae_eager(rewards, values, mask, 0.99, 0.95)
    _check(ours, eager, BL.gae_ref64(rewards, values, mask, 0.99, 0.95), "gae+whiten (A, R)")
    fn = R.ours_gae if provider == "fastrlhf" else BL.gae_eager
    benchmark.group = f"gae+whiten B={B} T={T}"
    benchmark.pedantic(fn, args=(rewards, values, mask, 0.99, 0.95), **ROUNDS)


# ----------------------------------------------------------------------------------------------------------------------
# PPO policy loss + k3 KL + value loss, fwd+bwd, [B, T] fp32
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("provider", ["fastrlhf", "eager"])
def test_ppo_loss_fwd_bwd(benchmark, provider):
    B, T = 32, 129
    logp = torch.randn(B, T) - 2
    old = logp + 0.3 * torch.randn(B, T)  # wide enough that some ratios are clipped
    ref = logp + 0.1 * torch.randn(B, T)
    adv = torch.randn(B, T)
    mask = (torch.rand(B, T) > 0.2).float()
    values = torch.randn(B, T)
    old_v = values + 0.3 * torch.randn(B, T)
    returns = torch.randn(B, T)

    def eager(*a):
        pg, vf, _ = BL.ppo_loss_eager(*a, R.CLIP_EPS, R.KL_COEF, R.VF_CLIP)
        return pg, vf

    def fb(f, dtype=torch.float32):
        lp = logp.to(dtype, copy=True).requires_grad_(True)  # a fresh leaf per call
        v = values.to(dtype, copy=True).requires_grad_(True)
        pg, vf = f(lp, old.to(dtype), ref.to(dtype), adv.to(dtype), mask.to(dtype), v, old_v.to(dtype),
                   returns.to(dtype))
        torch.autograd.backward([pg, vf], [torch.full_like(pg, 0.7), torch.full_like(vf, 1.3)])
        return pg.detach(), vf.detach(), lp.grad, v.grad
    _check(fb(R.ours_ppo), fb(eager), fb(eager, torch.float64), "ppo (pg_loss, vf_loss, dlogp, dvalues)")
    fn = R.ours_ppo if provider == "fastrlhf" else eager
    benchmark.group = f"ppo_loss+k3+value fwd+bwd B={B} T={T}"
    benchmark.pedantic(fb, args=(fn,), **ROUNDS)


# ----------------------------------------------------------------------------------------------------------------------
# decoder-layer ops: RMSNorm [N, H], RoPE of q [N, Hq, D] / k [N, Hkv, D], SwiGLU of [N, 2F]; fwd+bwd each
# ----------------------------------------------------------------------------------------------------------------------
N_DEC, H_DEC, F_DEC, HQ_DEC, HKV_DEC, D_DEC = 256, 896, 4864 // 8, 14, 2, 64  # qwen2-0.5b hidden / heads, odd sizes


def _decoder_cases():
    """{op: (fwd+bwd(f) -> tensors, ours, eager, leaves)} on fresh random inputs."""
    from fastrlhf import kernels

    x = torch.randn(N_DEC, H_DEC) * 2
    w = torch.rand(H_DEC) + 0.5
    qkv = torch.randn(N_DEC, HQ_DEC + 2 * HKV_DEC, D_DEC)
    ang = torch.randint(0, 4096, (N_DEC, 1)).float() * (1e4 ** (-torch.arange(0, D_DEC, 2).float() / D_DEC))
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    gu = torch.randn(N_DEC, 2 * F_DEC) * 3
    g_x, g_q, g_k, g_s = (torch.randn(N_DEC, H_DEC), torch.randn(N_DEC, HQ_DEC, D_DEC),
                          torch.randn(N_DEC, HKV_DEC, D_DEC), torch.randn(N_DEC, F_DEC))

    def rms(f, dt=torch.float32):
        xx, ww = x.detach().to(dt).requires_grad_(True), w.detach().to(dt).requires_grad_(True)
        y = f(xx, ww, 1e-6)
        y.backward(g_x.to(dt))
        return y.detach(), xx.grad, ww.grad

    def rot(f, dt=torch.float32):
        t = qkv.detach().to(dt).requires_grad_(True)
        q, k = f(t[:, :HQ_DEC], t[:, HQ_DEC:HQ_DEC + HKV_DEC], cos.to(dt), sin.to(dt))
        torch.autograd.backward([q, k], [g_q.to(dt), g_k.to(dt)])
        return q.detach(), k.detach(), t.grad

    def glu(f, dt=torch.float32):
        t = gu.detach().to(dt).requires_grad_(True)
        y = f(t)
        y.backward(g_s.to(dt))
        return y.detach(), t.grad
    return {"rms_norm": (rms, kernels.rms_norm, kernels.rms_norm_ref), "rope_qk": (rot, kernels.rope, kernels.rope_ref),
            "swiglu": (glu, kernels.swiglu, kernels.swiglu_ref)}


@pytest.mark.parametrize("op", ["rms_norm", "rope_qk", "swiglu"])
@pytest.mark.parametrize("provider", ["fastrlhf", "eager"])
def test_decoder_op_fwd_bwd(benchmark, op, provider):
    fb, ours, eager = _decoder_cases()[op]
    _check(fb(ours), fb(eager), fb(eager, torch.float64), f"{op} fwd+bwd")
    benchmark.group = f"{op} fwd+bwd N={N_DEC} H={H_DEC} F={F_DEC} heads={HQ_DEC}/{HKV_DEC}x{D_DEC}"
    benchmark.pedantic(fb, args=(ours if provider == "fastrlhf" else eager,), **ROUNDS)
