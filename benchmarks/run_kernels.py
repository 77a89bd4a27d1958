"""Kernel benchmark runner: fastrlhf.kernels beside the eager / compiled / peer implementations, in one run.

    python -m benchmarks.run_kernels [--ops logprobs linear gae ppo] [--shape tiny|h100|smoke] [--csv benchmarks/results.csv]
    fastrlhf bench kernels ...            (the CLI calls ``main(argv)``)

For every (op, mode, provider) it measures: median / p20 / p80 time (CUDA: ``timing.bench``, do_bench per provider;
CPU: ``timing.bench_interleaved``, the providers of one op and mode timed round robin), throughput (GB/s of the minimal
bytes, or FLOP/s of the minimal FLOPs) and its % of a ceiling measured at the start of the same run (device-to-device
copy and a matmul), peak extra memory (``timing.peak_extra_mib``), and the max abs error against a float64 reference
computed from the same inputs (forward outputs, and for fwd+bwd also the input gradients under random upstream grads).
It prints a table and appends one row per measurement to a CSV (columns: ``CSV_COLUMNS``).

Ops (shapes: ``SHAPES``; notation B batch, T time, V vocabulary, H hidden, N tokens):
- ``logprobs``  log-probs + entropy from logits [B, T, V]; modes ``fwd`` (no grad) and ``fwd+bwd`` (grads from both).
  Minimal bytes: fwd reads the logits once; fwd+bwd reads them once and writes dlogits once (2x).
- ``linear``    log-probs from hidden [N, H] and weight [V, H] without [N, V] logits; ``fwd+bwd``; FLOPs 6·N·H·V.
  Also prints (CPU and CUDA) peak extra memory at two N to show what grows with N·V.
- ``gae``       GAE over valid tokens + masked whitening of the advantages, [B, T] fp32; bytes: r, V, m read, A, R written.
- ``kl``        per-token KL(π ‖ π_ref) from both models' hidden [N, H] and heads [V, H], fwd+bwd (gradient to the policy):
  ``fastrlhf`` the exact full-vocabulary KL (``linear_kl``, no [N, V] logits), ``eager`` the same KL from materialized
  logits, ``k1-logprobs`` / ``k3-logprobs`` the sampled-token estimators from ``linear_logprobs`` of both models +
  ``kl_penalty`` (what the reward used before; a different, noisier quantity: their error column is against their own
  float64 value, and the printed gap is their mean |estimate − exact KL|). FLOPs counted 8·N·H·V for all (both heads
  forward, the policy's dX and dW).
- ``ppo``       clipped policy loss + k3 KL in the loss + clipped value loss, fwd+bwd, [B, T] fp32;
  bytes: logp, old, ref, A, m, V, V_old, R read, dlogp and dV written.
- ``decoder``   (opt-in: ``--ops decoder``) the decoder-layer ops, fwd+bwd each, in the compute dtype: RMSNorm [N, H],
  RoPE of q [N, Hq, D] and k [N, Hkv, D] (read from a fused QKV output), SwiGLU of a fused gate/up output [N, 2F];
  ``eager`` is the model's PyTorch code (the ``*_ref``). Bytes: inputs read + outputs written, forward and backward.
- ``adamw``     (opt-in: ``--ops adamw``) one AdamW step over a decoder's parameter shapes (fp32 masters):
  ``fastrlhf`` is ``runtime.optim.make_adamw`` (torch's fused kernel on CPU and CUDA), ``eager`` torch's default
  multi-tensor (foreach) AdamW. Error: the parameters after one step from the same state against a float64 AdamW step.
  Bytes: parameter, gradient and both moments read, parameter and moments written (7 × 4 bytes per parameter).
On CPU ``fastrlhf`` is the kernels' CPU path (backend "auto" -> PyTorch / C++); on CUDA it is the Triton kernels.
Providers: fastrlhf, eager (+ eager-lse, eager-rowloop variants for logprobs), compile (default on CUDA only: on CPU
inductor needs ~30 s to compile each function; ask with --providers), trl, liger (CUDA only, when importable).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import baselines as BL
from .timing import (append_csv, bench, bench_interleaved, check_choice, check_choices, device_name, git_commit,
                     peak_extra_mib)

CSV_COLUMNS = ["date", "device", "op", "mode", "provider", "shape", "median_ms", "p20_ms", "p80_ms", "throughput", "unit",
               "pct_ceiling", "peak_extra_mib", "max_abs_err", "torch", "triton", "commit"]
OPS = ("logprobs", "linear", "kl", "gae", "ppo")
PROVIDERS = ("fastrlhf", "eager", "eager-lse", "eager-rowloop", "compile", "trl", "liger", "k1-logprobs", "k3-logprobs")
DEFAULT_CSV = Path(__file__).resolve().parent / "results.csv"

# Shapes: docs/benchmarks.md ("h100"); a CPU-sized "tiny" (the whole runner in ≤ 2 min on 2 free cores); "smoke" for the
# runner's own test (seconds). linear_mem = (H, (N1, N2)): the memory-scaling check's hidden size and two token counts
# (tiny: N·V crosses the CPU path's 256 MiB chunk budget at both N, as the h100 shape does on the GPU).
SHAPES = {
    "h100": dict(logits=(32, 512, 151936), linear=(16384, 896, 151936), linear_mem=(896, (4096, 16384)),
                 kl=(8192, 896, 151936), gae=(64, 1024), ppo=(64, 1024), decoder=(16384, 896, 4864, 14, 2, 64),
                 adamw=(24, 896, 4864, 14, 2, 64, 151936)),
    "tiny": dict(logits=(4, 64, 32001), linear=(1024, 256, 32001), linear_mem=(64, (2048, 6144)),
                 kl=(512, 256, 32001), gae=(64, 1024), ppo=(64, 1024), decoder=(2048, 256, 704, 4, 2, 64),
                 adamw=(4, 256, 768, 4, 2, 64, 4096)),
    "smoke": dict(logits=(2, 16, 4099), linear=(128, 64, 4099), linear_mem=(64, (64, 256)), kl=(64, 64, 4099),
                  gae=(8, 256), ppo=(8, 256), decoder=(64, 64, 96, 4, 2, 16), adamw=(2, 64, 128, 4, 2, 16, 512)),
}
GAMMA, LAM, TAU = 1.0, 0.95, 1.0
CLIP_EPS, KL_COEF, VF_CLIP = 0.2, 0.001, 0.2


# ----------------------------------------------------------------------------------------------------------------------
# our kernels, called through their public API (fastrlhf.kernels)
# ----------------------------------------------------------------------------------------------------------------------
def _K():
    from fastrlhf import kernels
    return kernels


def ours_logprobs(logits, labels, temperature=TAU):
    lp, ent = _K().logprobs_from_logits(logits, labels, temperature=temperature, return_entropy=True)
    return lp, ent


def ours_linear(hidden, weight, labels, temperature=TAU):
    return _K().linear_logprobs(hidden, weight, labels, temperature=temperature)


def ours_full_kl(hidden, weight, ref_hidden, ref_weight, labels, temperature=TAU):
    return _K().linear_kl(hidden, weight, ref_hidden, ref_weight, temperature=temperature)


def estimator_kl(estimator: str):
    """k1 / k3 of the sampled tokens from both models' fused log-probs (the reference without gradient)."""
    def f(hidden, weight, ref_hidden, ref_weight, labels, temperature=TAU):
        K = _K()
        logp = K.linear_logprobs(hidden, weight, labels, temperature=temperature)
        with torch.no_grad():
            ref_logp = K.linear_logprobs(ref_hidden, ref_weight, labels, temperature=temperature)
        return K.kl_penalty(logp, ref_logp, estimator=estimator)
    return f


def eager_full_kl(hidden, weight, ref_hidden, ref_weight, labels, temperature=TAU):
    """Naive: both [N, V] logits in the input dtype, fp32 log-softmax, Σ p (log p − log q)."""
    log_p = torch.log_softmax((hidden @ weight.t()).float() / temperature, dim=-1)
    with torch.no_grad():
        log_q = torch.log_softmax((ref_hidden @ ref_weight.t()).float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def ours_gae(rewards, values, mask, gamma=GAMMA, lam=LAM):
    K = _K()
    adv, ret = K.gae(rewards, values, mask, gamma=gamma, lam=lam)
    return K.whiten(adv, mask), ret


def ours_ppo(logp, old_logp, ref_logp, adv, mask, values, old_values, returns):
    K = _K()
    pg_loss, _ = K.ppo_policy_loss(logp, old_logp, adv, mask, clip_eps=CLIP_EPS, ref_logprobs=ref_logp,
                                   kl_coef=KL_COEF, kl_estimator="k3")
    vf_loss, _ = K.ppo_value_loss(values, old_values, returns, mask, clip_eps=VF_CLIP)
    return pg_loss, 0.5 * vf_loss  # vf_coef 0.5, as the eager baseline


# ----------------------------------------------------------------------------------------------------------------------
# run context, one measurement, ceilings
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Ctx:
    device: str
    shape: str
    dtype: torch.dtype  # dtype of logits / hidden / weight
    providers: tuple[str, ...]
    warmup_ms: float
    rep_ms: float
    min_reps: int = 3  # timed calls at least (CPU)
    ceil_gbps: float = float("nan")
    ceil_flops: float = float("nan")  # FLOP/s
    rows: list = field(default_factory=list)
    pending: list = field(default_factory=list)  # measured (error, memory), waiting to be timed together by flush()
    skipped: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # anything else measured (memory scaling)

    def wants(self, provider: str) -> bool:
        return provider in self.providers


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_ceilings(ctx: Ctx) -> None:
    """Copy GB/s (bytes read + written) and matmul FLOP/s, measured now with the same timer."""
    if ctx.device == "cuda":
        a = torch.empty(1 << 29, device="cuda", dtype=torch.bfloat16).normal_()  # 1 GiB
        m_n, m_dtype = 8192, torch.bfloat16
    else:
        a = torch.randn(1 << 24, dtype=torch.float32)  # 64 MiB
        m_n, m_dtype = 1024, torch.float32
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a), ctx.device, warmup_ms=ctx.warmup_ms, rep_ms=ctx.rep_ms)
    ctx.ceil_gbps = 2 * a.numel() * a.element_size() / (t.median_ms * 1e-3) / 1e9
    del a, b
    x = torch.randn(m_n, m_n, device=ctx.device, dtype=m_dtype)
    y = torch.randn_like(x)
    t = bench(lambda: x @ y, ctx.device, warmup_ms=ctx.warmup_ms, rep_ms=ctx.rep_ms)
    ctx.ceil_flops = 2 * m_n**3 / (t.median_ms * 1e-3)
    ctx.extra["ceilings"] = dict(copy_gbps=ctx.ceil_gbps, matmul_flops=ctx.ceil_flops, matmul=f"{m_dtype} {m_n}^3")


def _flops_unit(device: str) -> tuple[str, float]:
    return ("TFLOP/s", 1e12) if device == "cuda" else ("GFLOP/s", 1e9)


def measure(ctx: Ctx, op: str, mode: str, provider: str, shape: str, fn: Callable[[], object],
            err_fn: Callable[[object], float], *, nbytes: float = 0.0, flops: float = 0.0,
            leaves: tuple = (), no_grad: bool = False) -> None:
    """Run ``fn`` once (error) and once more (peak memory); ``flush`` later times it beside the other providers of the
    same op and mode and appends the row. ``leaves``: tensors whose ``.grad`` ``fn`` fills (cleared before each call).
    nbytes / flops: the minimal work, for GB/s or FLOP/s."""
    def call():
        for t in leaves:
            t.grad = None
        if no_grad:
            with torch.no_grad():
                return fn()
        return fn()
    try:
        out = call()
        _sync(ctx.device)
        err = float(err_fn(out))
        del out
        for t in leaves:
            t.grad = None
        peak = peak_extra_mib(call, ctx.device)
    except NotImplementedError as e:
        ctx.skipped.append(f"{op}/{mode}/{provider}: not implemented yet ({e})")
        return
    except Exception as e:  # noqa: BLE001 - one provider failing must not hide the others; it is reported
        ctx.skipped.append(f"{op}/{mode}/{provider}: {type(e).__name__}: {str(e)[:200]}")
        return
    finally:
        for t in leaves:
            t.grad = None
    ctx.pending.append(dict(call=call, leaves=leaves, nbytes=nbytes, flops=flops,
                            row=dict(op=op, mode=mode, provider=provider, shape=shape, peak_extra_mib=peak,
                                     max_abs_err=err)))


def flush(ctx: Ctx) -> None:
    """Time the pending measurements (CUDA: do_bench each; CPU: round robin across them) and append their rows."""
    pend, ctx.pending = ctx.pending, []
    if not pend:
        return
    try:
        if ctx.device == "cuda":
            tms = [bench(p["call"], ctx.device, warmup_ms=ctx.warmup_ms, rep_ms=ctx.rep_ms) for p in pend]
        else:
            tms = bench_interleaved([p["call"] for p in pend], warmup_ms=ctx.warmup_ms, rep_ms=ctx.rep_ms,
                                    min_reps=ctx.min_reps)
    except Exception as e:  # noqa: BLE001 - reported
        names = ", ".join(f"{p['row']['op']}/{p['row']['mode']}/{p['row']['provider']}" for p in pend)
        ctx.skipped.append(f"timing {names}: {type(e).__name__}: {str(e)[:200]}")
        return
    finally:
        for p in pend:
            for t in p["leaves"]:
                t.grad = None
    for p, tm in zip(pend, tms):
        sec = tm.median_ms * 1e-3
        if p["flops"]:
            unit, scale = _flops_unit(ctx.device)
            thr, pct = p["flops"] / sec / scale, 100 * p["flops"] / sec / ctx.ceil_flops
        else:
            unit, thr, pct = "GB/s", p["nbytes"] / sec / 1e9, 100 * p["nbytes"] / sec / 1e9 / ctx.ceil_gbps
        r = p["row"]
        ctx.rows.append(dict(op=r["op"], mode=r["mode"], provider=r["provider"], shape=r["shape"],
                             median_ms=tm.median_ms, p20_ms=tm.p20_ms, p80_ms=tm.p80_ms, throughput=thr, unit=unit,
                             pct_ceiling=pct, peak_extra_mib=r["peak_extra_mib"], max_abs_err=r["max_abs_err"]))


def _dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32").replace(
        "float16", "fp16")


# ----------------------------------------------------------------------------------------------------------------------
# the ops
# ----------------------------------------------------------------------------------------------------------------------
def bench_logprobs(ctx: Ctx) -> None:
    B, T, V = SHAPES[ctx.shape]["logits"]
    dev = ctx.device
    shape = f"B={B} T={T} V={V} {_dname(ctx.dtype)}"
    logits = (torch.randn(B, T, V, device=dev, dtype=torch.float32) * 3).to(ctx.dtype)
    labels = torch.randint(0, V, (B, T), device=dev)
    g_lp = torch.randn(B, T, device=dev)
    g_ent = torch.randn(B, T, device=dev)
    nbytes = logits.numel() * logits.element_size()
    impls = _providers(ctx, "logprobs", ours_logprobs, BL.lp_ent_logsoftmax_gather,
                       {"eager-lse": BL.lp_ent_logsumexp, "eager-rowloop": BL.lp_ent_rowloop})
    for prov, f in impls.items():
        if not ctx.wants(prov):
            continue
        measure(ctx, "logprobs", "fwd", prov, shape, lambda f=f: f(logits, labels, TAU),
                lambda o: BL.logprobs_max_err(logits, labels, TAU, o), nbytes=nbytes, no_grad=True)
    flush(ctx)
    x = logits.clone().requires_grad_(True)
    for prov, f in impls.items():
        if not ctx.wants(prov) or prov == "liger":  # that Liger kernel has no backward
            continue

        def fb(f=f):
            lp, ent = f(x, labels, TAU)
            if ent is None:
                torch.autograd.backward([lp], [g_lp])
            else:
                torch.autograd.backward([lp, ent], [g_lp, g_ent])
            return lp.detach(), (None if ent is None else ent.detach()), x.grad, ent is not None

        def err(o):
            lp, ent, grad, has_ent = o
            return BL.logprobs_max_err(logits, labels, TAU, (lp, ent), grad, g_lp, g_ent if has_ent else None)
        measure(ctx, "logprobs", "fwd+bwd", prov, shape, fb, err, nbytes=2 * nbytes, leaves=(x,))
    flush(ctx)
    del logits, x


def _providers(ctx: Ctx, op: str, ours, eager, more_eager: dict | None = None) -> dict:
    """provider -> fn for one op: ours, the eager baseline (+ other eager forms), torch.compile of the eager one when
    wanted, and TRL's / Liger's kernels for ``op`` when importable (``BL.peer_providers``)."""
    impls = {"fastrlhf": ours, "eager": eager, **(more_eager or {})}
    if ctx.wants("compile"):
        impls["compile"] = BL.compiled(eager)
    peers = BL.peer_providers(ctx.device)
    for p in ("trl", "liger"):
        if f"{op}/{p}" in peers:
            impls[p] = peers[f"{op}/{p}"]
    return impls


def _linear_inputs(N, H, V, dev, dtype):
    hidden = (torch.randn(N, H, device=dev) / H**0.5).to(dtype).requires_grad_(True)
    weight = torch.randn(V, H, device=dev).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (N,), device=dev)
    g = torch.randn(N, device=dev)
    return hidden, weight, labels, g


def _linear_fb(f, hidden, weight, labels, g):
    def fb():
        lp = f(hidden, weight, labels, TAU)
        lp.backward(g)
        return lp.detach(), hidden.grad, weight.grad
    return fb


def bench_linear(ctx: Ctx) -> None:
    N, H, V = SHAPES[ctx.shape]["linear"]
    dev = ctx.device
    shape = f"N={N} H={H} V={V} {_dname(ctx.dtype)}"
    hidden, weight, labels, g = _linear_inputs(N, H, V, dev, ctx.dtype)
    impls = _providers(ctx, "linear", ours_linear, BL.linear_lp_eager)
    for prov, f in impls.items():
        if not ctx.wants(prov):
            continue
        measure(ctx, "linear_logprobs", "fwd+bwd", prov, shape, _linear_fb(f, hidden, weight, labels, g),
                lambda o: BL.linear_max_err(hidden.detach(), weight.detach(), labels, TAU, o[0], o[1], o[2], g),
                flops=6 * N * H * V, leaves=(hidden, weight))
    flush(ctx)
    del hidden, weight
    mem_h, _ = SHAPES[ctx.shape]["linear_mem"]
    known = {(r["provider"], N): r["peak_extra_mib"] for r in ctx.rows if r["op"] == "linear_logprobs"}
    linear_memory_scaling(ctx, V, known if mem_h == H else None)


def linear_memory_scaling(ctx: Ctx, V: int, known: dict | None = None) -> None:
    """Peak extra memory of fwd+bwd at two N (one measured call each; one warm call per provider first): the eager
    baseline grows with
    N·V (it holds [N, V] logits and their fp32 copies), ours should grow only with N·H (the hidden gradient; on CPU
    once the N·V fp32 logits pass the 32 MiB that the backward may keep, ``CPU_KEEP_BYTES``).
    ``known``: {(provider, N): MiB} already measured at the same H (the timed shape), not measured again."""
    H, ns = SHAPES[ctx.shape]["linear_mem"]
    res = dict(known or {})
    warmed = {p for p, _ in res}  # a provider already run at this H is warm
    for N in ns:
        if all((p, N) in res for p in ("fastrlhf", "eager")):
            continue
        hidden, weight, labels, g = _linear_inputs(N, H, V, ctx.device, ctx.dtype)
        for prov, f in (("fastrlhf", ours_linear), ("eager", BL.linear_lp_eager)):
            if not ctx.wants(prov) or (prov, N) in res:
                continue
            fb = _linear_fb(f, hidden, weight, labels, g)
            try:
                if prov not in warmed:  # one-time allocations (workspaces, caches) are not what we measure
                    fb()
                    warmed.add(prov)
                    hidden.grad = weight.grad = None
                res[(prov, N)] = peak_extra_mib(fb, ctx.device)
            except Exception as e:  # noqa: BLE001 - reported with the rest
                ctx.skipped.append(f"linear_logprobs/memory N={N}/{prov}: {type(e).__name__}: {str(e)[:200]}")
            hidden.grad = weight.grad = None
        del hidden, weight
    ctx.extra["linear_memory"] = dict(H=H, V=V, peak_mib={k: v for k, v in res.items() if k[1] in set(ns)},
                                      dtype=_dname(ctx.dtype))


def bench_gae(ctx: Ctx) -> None:
    B, T = SHAPES[ctx.shape]["gae"]
    dev = ctx.device
    shape = f"B={B} T={T} fp32"
    rewards = torch.randn(B, T, device=dev)
    values = torch.randn(B, T, device=dev)
    lengths = torch.randint(T // 2, T + 1, (B,), device=dev)
    mask = (torch.arange(T, device=dev)[None, :] < lengths[:, None]).float()  # right padding, lengths in [T/2, T]
    ref_a, ref_r = BL.gae_ref64(rewards, values, mask, GAMMA, LAM)

    def err(o):
        return max((o[0].double() - ref_a).abs().max().item(), (o[1].double() - ref_r).abs().max().item())
    nbytes = 5 * B * T * 4  # read r, V, m; write A, R (fp32)
    for prov, f in (("fastrlhf", ours_gae), ("eager", BL.gae_eager)):
        if ctx.wants(prov):
            measure(ctx, "gae+whiten", "fwd", prov, shape, lambda f=f: f(rewards, values, mask, GAMMA, LAM), err,
                    nbytes=nbytes, no_grad=True)
    flush(ctx)


def bench_ppo(ctx: Ctx) -> None:
    B, T = SHAPES[ctx.shape]["ppo"]
    dev = ctx.device
    shape = f"B={B} T={T} fp32"
    logp = (torch.randn(B, T, device=dev) - 2).requires_grad_(True)
    old = logp.detach() + 0.05 * torch.randn(B, T, device=dev)
    ref = logp.detach() + 0.05 * torch.randn(B, T, device=dev)
    adv = torch.randn(B, T, device=dev)
    lengths = torch.randint(T // 2, T + 1, (B,), device=dev)
    mask = (torch.arange(T, device=dev)[None, :] < lengths[:, None]).float()
    values = torch.randn(B, T, device=dev).requires_grad_(True)
    old_v = values.detach() + 0.1 * torch.randn(B, T, device=dev)
    returns = torch.randn(B, T, device=dev)
    g_pg, g_vf = 0.7, 1.3  # non-unit upstream grads of the two losses

    # float64 reference of (pg_loss, vf_loss, dlogp, dvalues)
    lp64 = logp.detach().double().requires_grad_(True)
    v64 = values.detach().double().requires_grad_(True)
    pg64, vf64, _ = BL.ppo_loss_eager(lp64, old.double(), ref.double(), adv.double(), mask.double(), v64,
                                      old_v.double(), returns.double(), CLIP_EPS, KL_COEF, VF_CLIP)
    torch.autograd.backward([pg64, vf64], [torch.tensor(g_pg, dtype=torch.float64, device=dev),
                                           torch.tensor(g_vf, dtype=torch.float64, device=dev)])
    refs = (pg64.detach(), vf64.detach(), lp64.grad, v64.grad)

    def eager(*a):
        pg, vf, _ = BL.ppo_loss_eager(*a, CLIP_EPS, KL_COEF, VF_CLIP)
        return pg, vf
    impls = {"fastrlhf": ours_ppo, "eager": eager}
    if ctx.wants("compile"):
        impls["compile"] = BL.compiled(eager)
    for prov, f in impls.items():
        if not ctx.wants(prov):
            continue

        def fb(f=f):
            pg, vf = f(logp, old, ref, adv, mask, values, old_v, returns)
            torch.autograd.backward([pg, vf], [torch.full_like(pg, g_pg), torch.full_like(vf, g_vf)])
            return pg.detach(), vf.detach(), logp.grad, values.grad

        def err(o):
            return max((a.double() - b).abs().max().item() for a, b in zip(o, refs))
        measure(ctx, "ppo_loss+k3+value", "fwd+bwd", prov, shape, fb, err, nbytes=10 * B * T * 4,
                leaves=(logp, values))
    flush(ctx)


def _kl64(hidden, weight, ref_hidden, ref_weight, labels, g, chunk_rows=512):
    """float64 per provider kind: exact KL and its (dhidden, dweight); k1/k3 of the sampled tokens and theirs."""
    out = {}
    for kind in ("full", "k1", "k3"):
        x = hidden.detach().double().requires_grad_(True)
        w = weight.detach().double().requires_grad_(True)
        vals = []
        for s in range(0, x.shape[0], chunk_rows):
            e = min(s + chunk_rows, x.shape[0])
            log_p = torch.log_softmax(x[s:e] @ w.t() / TAU, -1)
            log_q = torch.log_softmax(ref_hidden[s:e].double() @ ref_weight.double().t() / TAU, -1)
            if kind == "full":
                v = (log_p.exp() * (log_p - log_q)).sum(-1)
            else:
                d = (log_q - log_p).gather(-1, labels[s:e, None]).squeeze(-1)  # d = ref_logp − logp
                v = -d if kind == "k1" else torch.exp(d.clamp(-20, 20)) - d.clamp(-20, 20) - 1
            vals.append(v)
        v = torch.cat(vals)
        v.backward(g.double())
        out[kind] = (v.detach(), x.grad, w.grad)
    return out


def bench_kl(ctx: Ctx) -> None:
    N, H, V = SHAPES[ctx.shape]["kl"]
    dev = ctx.device
    shape = f"N={N} H={H} V={V} {_dname(ctx.dtype)}"
    hidden, weight, labels, g = _linear_inputs(N, H, V, dev, ctx.dtype)
    ref_hidden = (hidden.detach().float() + 0.1 * torch.randn(N, H, device=dev) / H**0.5).to(ctx.dtype)
    ref_weight = (weight.detach().float() + 0.1 * torch.randn(V, H, device=dev)).to(ctx.dtype)
    with torch.no_grad():  # sample the labels from π, as a rollout does (the estimators assume it)
        labels = torch.cat([torch.multinomial(torch.softmax((hidden[s:s + 256] @ weight.t()).float() / TAU, -1), 1)
                            for s in range(0, N, 256)]).squeeze(-1)
    ref = _kl64(hidden, weight, ref_hidden, ref_weight, labels, g)
    kinds = {"fastrlhf": "full", "eager": "full", "k1-logprobs": "k1", "k3-logprobs": "k3"}
    impls = {"fastrlhf": ours_full_kl, "eager": eager_full_kl, "k1-logprobs": estimator_kl("k1"),
             "k3-logprobs": estimator_kl("k3")}
    for prov, f in impls.items():
        if not ctx.wants(prov):
            continue

        def fb(f=f):
            kl = f(hidden, weight, ref_hidden, ref_weight, labels, TAU)
            kl.backward(g)
            return kl.detach(), hidden.grad, weight.grad

        def err(o, kind=kinds[prov]):
            return max((a.double() - b).abs().max().item() for a, b in zip(o, ref[kind]))
        measure(ctx, "kl_full_vs_estimators", "fwd+bwd", prov, shape, fb, err, flops=8 * N * H * V,
                leaves=(hidden, weight))
    flush(ctx)
    exact = ref["full"][0]
    ctx.extra["kl_estimator_gap"] = {k: (ref[k][0] - exact).abs().mean().item() for k in ("k1", "k3")}
    ctx.extra["kl_estimator_gap"]["mean_exact_kl"] = exact.mean().item()
    del hidden, weight, ref_hidden, ref_weight


def bench_decoder(ctx: Ctx) -> None:
    """RMSNorm, RoPE (q and k) and SwiGLU, fwd+bwd each: ours vs the model's PyTorch code (+ compile when wanted)."""
    N, H, F, hq, hkv, D = SHAPES[ctx.shape]["decoder"]
    dev, dt = ctx.device, ctx.dtype
    K = _K()
    x = torch.randn(N, H, device=dev).to(dt).requires_grad_(True)
    w = (torch.rand(H, device=dev) + 0.5).to(dt).requires_grad_(True)
    qkv = torch.randn(N, hq + 2 * hkv, D, device=dev).to(dt).requires_grad_(True)
    pos = torch.randint(0, 4096, (N,), device=dev)
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
    ang = torch.cat([pos[:, None].float() * inv] * 2, dim=-1)  # [N, D]
    cos, sin = ang.cos(), ang.sin()
    gu = (torch.randn(N, 2 * F, device=dev) * 2).to(dt).requires_grad_(True)
    g_x = torch.randn(N, H, device=dev).to(dt)
    g_q, g_k = torch.randn(N, hq, D, device=dev).to(dt), torch.randn(N, hkv, D, device=dev).to(dt)
    g_s = torch.randn(N, F, device=dev).to(dt)

    def rms(f):
        def fb():
            y = f(x, w, 1e-6)
            y.backward(g_x)
            return y.detach(), x.grad, w.grad
        return fb

    def rot(f):
        def fb():
            q, k = f(qkv[:, :hq], qkv[:, hq:hq + hkv], cos, sin)
            torch.autograd.backward([q, k], [g_q, g_k])
            return q.detach(), k.detach(), qkv.grad
        return fb

    def glu(f):
        def fb():
            y = f(gu)
            y.backward(g_s)
            return y.detach(), gu.grad
        return fb

    def ref64(fb, leaves):
        saved = [t.data for t in leaves]
        for t in leaves:
            t.data = t.data.double()
        try:
            return [o.double() for o in fb()]
        finally:
            for t, d in zip(leaves, saved):
                t.grad, t.data = None, d

    e = dt.itemsize if hasattr(dt, "itemsize") else torch.empty((), dtype=dt).element_size()
    cases = [("rms_norm", rms, K.rms_norm, K.rms_norm_ref, (x, w), 5 * N * H * e),
             ("rope_qk", rot, K.rope, K.rope_ref, (qkv,), 4 * N * (hq + hkv) * D * e + 4 * N * D * 4),
             ("swiglu", glu, K.swiglu, K.swiglu_ref, (gu,), 8 * N * F * e)]
    shape = f"N={N} H={H} F={F} heads={hq}/{hkv}x{D} {_dname(dt)}"
    for name, make, ours, eager, leaves, nbytes in cases:
        want = ref64(make(eager), leaves)
        impls = {"fastrlhf": ours, "eager": eager}
        if ctx.wants("compile"):
            impls["compile"] = BL.compiled(eager)
        for prov, f in impls.items():
            if ctx.wants(prov):
                measure(ctx, name, "fwd+bwd", prov, shape, make(f),
                        lambda o: max((a.double() - b).abs().max().item() for a, b in zip(o, want)),
                        nbytes=nbytes, leaves=leaves)
        flush(ctx)


def bench_adamw(ctx: Ctx) -> None:
    """One AdamW step over an L-layer decoder's parameters (tied head): ``make_adamw`` (fused) vs torch's foreach."""
    from fastrlhf.runtime.optim import adamw_groups, make_adamw
    L, H, F, hq, hkv, D, V = SHAPES[ctx.shape]["adamw"]
    dev = ctx.device
    shapes = [(V, H), (H,)] + [((hq + 2 * hkv) * D, H), (H, hq * D), (2 * F, H), (H, F), (H,), (H,)] * L
    init = [torch.randn(sh, device=dev) * 0.02 for sh in shapes]
    grads = [torch.randn(sh, device=dev) * 1e-3 for sh in shapes]
    hp = dict(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)

    def model(dtype=torch.float32):
        m = torch.nn.ParameterList([torch.nn.Parameter(t.to(dtype).clone()) for t in init])
        for p_, g in zip(m, grads):
            p_.grad = g.to(dtype).clone()
        return m

    adam = dict(lr=hp["lr"], betas=hp["betas"], eps=hp["eps"])
    ref = model(torch.float64)  # one float64 step from the same state: the reference parameters
    torch.optim.AdamW(adamw_groups(ref, hp["weight_decay"]), **adam, foreach=False).step()
    n = sum(t.numel() for t in init)
    shape = f"{L} layers H={H} F={F} V={V}: {n / 1e6:.2f}M fp32 params"
    mods = {"fastrlhf": model(), "eager": model()}
    opts = {"fastrlhf": make_adamw(mods["fastrlhf"], weight_decay=hp["weight_decay"], **adam),
            "eager": torch.optim.AdamW(adamw_groups(mods["eager"], hp["weight_decay"]), **adam, foreach=True)}
    for prov in ("fastrlhf", "eager"):
        if ctx.wants(prov):
            def step(o=opts[prov], m=mods[prov]):
                o.step()
                return [p_.detach() for p_ in m]
            measure(ctx, "adamw", "step", prov, shape, step,
                    lambda out: max((a.double() - b.detach()).abs().max().item() for a, b in zip(out, ref)),
                    nbytes=7 * 4 * n, no_grad=True)
    flush(ctx)


BENCHES = {"logprobs": bench_logprobs, "linear": bench_linear, "kl": bench_kl, "gae": bench_gae, "ppo": bench_ppo,
           "decoder": bench_decoder, "adamw": bench_adamw}


# ----------------------------------------------------------------------------------------------------------------------
# environment, output
# ----------------------------------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.4g}" if (abs(v) >= 1e-3 or v == 0) else f"{v:.2e}"
    return str(v)


def format_table(rows: list[dict]) -> str:
    cols = ["op", "mode", "provider", "shape", "median_ms", "p20_ms", "p80_ms", "throughput", "unit", "pct_ceiling",
            "peak_extra_mib", "max_abs_err"]
    heads = ["op", "mode", "provider", "shape", "median ms", "p20", "p80", "thrpt", "unit", "% ceil", "extra MiB",
             "max err"]
    cells = [[_fmt(r[c]) for c in cols] for r in rows]
    w = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    line = lambda vals: "| " + " | ".join(v.ljust(w[i]) for i, v in enumerate(vals)) + " |"  # noqa: E731
    out = [line(heads), "|" + "|".join("-" * (x + 2) for x in w) + "|"]
    out += [line(c) for c in cells]
    return "\n".join(out)


def write_csv(path: Path, rows: list[dict], meta: dict) -> Path:
    """Append rows to ``path`` (``timing.append_csv``: another runner's file is left alone, rows go to
    ``<stem>_kernels.csv`` beside it). Returns the path written."""
    return append_csv(path, rows, CSV_COLUMNS, meta=meta, suffix="_kernels")


# ----------------------------------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------------------------------
def run(ops=OPS, shape: str | None = None, device: str | None = None, dtype: torch.dtype | None = None,
        providers=None, warmup_ms: float | None = None, rep_ms: float | None = None, min_reps: int = 3) -> Ctx:
    """Run the benchmarks; returns the context (``.rows``, ``.skipped``, ``.extra``). Prints nothing."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = shape or ("h100" if device == "cuda" else "tiny")
    check_choice("shape", shape, SHAPES)
    check_choices("ops", ops, BENCHES)
    if providers is None:
        providers = tuple(p for p in PROVIDERS if device == "cuda" or p not in ("compile", "trl", "liger"))
    check_choices("providers", providers, PROVIDERS)
    if dtype is None:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ctx = Ctx(device=device, shape=shape, dtype=dtype, providers=tuple(providers),
              warmup_ms=warmup_ms if warmup_ms is not None else (25.0 if device == "cuda" else 50.0),
              rep_ms=rep_ms if rep_ms is not None else (100.0 if device == "cuda" else 400.0), min_reps=min_reps)
    torch.manual_seed(0)
    measure_ceilings(ctx)
    for op in ops:
        BENCHES[op](ctx)
        if device == "cuda":
            torch.cuda.empty_cache()
    return ctx


def env_meta(device: str) -> dict:
    import triton
    return dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), device=device_name(device),
                torch=torch.__version__, triton=triton.__version__, commit=git_commit())


def format_memory_scaling(mem: dict) -> str:
    pk = mem["peak_mib"]
    ns = sorted({n for _, n in pk})
    lines = [f"linear_logprobs fwd+bwd peak extra memory vs N (H={mem['H']}, V={mem['V']}, {mem['dtype']}):",
             "| N | N·V fp32 logits MiB | " + " | ".join(f"{p} MiB" for p in ("fastrlhf", "eager")) + " |",
             "|---|---|---|---|"]
    for n in ns:
        lines.append(f"| {n} | {n * mem['V'] * 4 / 2**20:.1f} | " + " | ".join(
            _fmt(pk.get((p, n), float("nan"))) for p in ("fastrlhf", "eager")) + " |")
    if len(ns) == 2:
        n1, n2 = ns
        for p in ("fastrlhf", "eager"):
            if (p, n1) in pk and (p, n2) in pk:
                grow = pk[(p, n2)] - pk[(p, n1)]
                per_nv = grow * 2**20 / ((n2 - n1) * mem["V"])
                lines.append(f"{p}: +{grow:.1f} MiB from N={n1} to N={n2} = {per_nv:.2f} bytes per added N·V element")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run_kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=list(BENCHES))
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: h100 on CUDA, tiny on CPU")
    ap.add_argument("--providers", nargs="+", default=None, choices=list(PROVIDERS),
                    help="default: all on CUDA; on CPU all but compile/trl/liger")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                    help="logits/hidden/weight dtype (default bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--csv", default=str(DEFAULT_CSV), help="CSV to append rows to (default: %(default)s)")
    ap.add_argument("--no-csv", action="store_true", help="print only")
    ap.add_argument("--warmup-ms", type=float, default=None)
    ap.add_argument("--rep-ms", type=float, default=None, help="time budget per measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--plot", default=None, metavar="PATH.png",
                    help="draw the linear log-prob's peak memory against N·V per provider (needs --ops linear)")
    a = ap.parse_args(argv)
    if a.plot and "linear" not in a.ops:
        ap.error("--plot draws the memory scaling of the 'linear' op: add linear to --ops")
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[a.dtype]
    ctx = run(a.ops, a.shape, dtype=dtype, providers=a.providers, warmup_ms=a.warmup_ms, rep_ms=a.rep_ms)
    meta = env_meta(ctx.device)
    c = ctx.extra["ceilings"]
    unit, scale = _flops_unit(ctx.device)
    load = f" | load avg {os.getloadavg()[0]:.1f} (1 min)" if hasattr(os, "getloadavg") else ""
    print(f"device: {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit']} | "
          f"shape preset {ctx.shape}{load}")
    print(f"ceilings (this run): copy {c['copy_gbps']:.1f} GB/s (read+write), matmul {c['matmul']} "
          f"{c['matmul_flops'] / scale:.1f} {unit}")
    print(format_table(ctx.rows))
    if "linear_memory" in ctx.extra:
        print()
        print(format_memory_scaling(ctx.extra["linear_memory"]))
    if "kl_estimator_gap" in ctx.extra:
        gap = ctx.extra["kl_estimator_gap"]
        print(f"\nper-token KL estimators vs the exact KL (float64, same tokens): mean exact KL "
              f"{gap['mean_exact_kl']:.4g}, mean |k1 − KL| {gap['k1']:.4g}, mean |k3 − KL| {gap['k3']:.4g}")
    for s in ctx.skipped:
        print("skipped:", s)
    if not a.no_csv:
        used = write_csv(Path(a.csv), ctx.rows, meta)
        print(f"appended {len(ctx.rows)} rows to {used}")
    if a.plot and "linear_memory" in ctx.extra:
        from .plots import memory_png
        m = ctx.extra["linear_memory"]
        out = memory_png(a.plot, m["peak_mib"], m["V"], f"linear log-probs fwd+bwd, {meta['device']}, H={m['H']}, "
                         f"V={m['V']}, {m['dtype']}: peak extra memory")
        print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
