"""The GEMM floor of one PPO iteration on this machine: how long its matrix multiplies alone take, shape by shape.

    python -m benchmarks.run_floor [--stage ppo|grpo] [--shape tiny|qwen2-0.5b|smoke] [--threads 2] [--device cpu|cuda]
                                   [--baseline-s S]
    fastrlhf bench floor ...            (the CLI calls ``main(argv)``)

The iteration is ``benchmarks.run_ppo``'s on the fixed workload (B prompts of P tokens, G response tokens, T = P + G,
E epochs over minibatches of ``minibatch`` rollouts; policy, reference, reward and value models of the same shape).
Every linear layer y = x·Wᵀ (x [N, in], W [out, in]) it runs is listed as GEMMs, in the layouts ``F.linear`` and its
backward use: forward x·Wᵀ [N, in]·[in, out] ("nt"), dX = dY·W [N, out]·[out, in] ("nn"), dW = dYᵀ·X
[out, N]·[N, in] ("tn"). Per phase (the same FLOPs as ``run_ppo.model_flops``, attention left out):
- generation: prefill of B·P tokens through the body and the head on B rows, then G − 1 decode steps of B rows through
  body and head;
- experience: four body forwards over B·T tokens, the head on the B·G response positions of policy and reference;
- training: E × (B / minibatch) steps, each a forward and backward of the policy (body + head on the response) and of
  the value model (body) over minibatch·T tokens.
``--stage grpo``: ``run_grpo``'s step instead (Q·n completions; generation as above, no experience forwards since
μ = 1 and β = 0, one forward and backward of the policy).
Each distinct GEMM is timed with torch (median, ``timing.bench``) and multiplied by how often the iteration runs it.

The sum is a lower bound for any trainer that does this iteration's FLOPs through torch's GEMMs in that dtype on this
machine: attention, norms, activations, sampling, the optimizer and all framework overhead count as zero. The score and
value heads (out = 1) are left out. ``--baseline-s`` (a peer's measured s/iteration, same shape, same machine) prints
the largest speed-up over it that the floor leaves: baseline / floor.
"""
from __future__ import annotations

import argparse
from collections import Counter

import torch

from .run_ppo import SHAPES, model_flops
from .timing import bench, check_choice, device_name

PHASES = ("generation", "experience", "training")


def linears(model: dict) -> list[tuple[int, int]]:
    """(in, out) of one decoder layer's projections: fused q/k/v, o, fused gate/up, down."""
    H, I = model["hidden_size"], model["intermediate_size"]
    Hq, Hkv = model["num_attention_heads"], model["num_key_value_heads"]
    D = H // Hq
    return [(H, (Hq + 2 * Hkv) * D), (Hq * D, H), (H, 2 * I), (I, H)]


def gemms(shape: str, stage: str = "ppo") -> dict[str, Counter]:
    """phase -> Counter{(layout, M, K, N): calls} of one iteration's GEMMs ([M, K]·[K, N]).

    stage "ppo": ``run_ppo``'s iteration (shapes from ``run_ppo.SHAPES``). stage "grpo": ``run_grpo``'s step (shapes
    from ``run_grpo.SHAPES``): B = Q·n completions generated, no experience forwards (μ = 1 and β = 0: the old
    log-probs are the update's own forward, no reference model), one forward and backward of the policy."""
    if stage == "grpo":
        from .run_grpo import SHAPES as GRPO_SHAPES
        S = GRPO_SHAPES[shape]
        B, P, G, E, mb = S["Q"] * S["n"], S["P"], S["G"], 1, S["Q"] * S["n"]
    else:
        S = SHAPES[shape]
        B, P, G, E, mb = S["B"], S["P"], S["G"], S["epochs"], S["minibatch"]
    m = S["model"]
    L, H, V, T = m["num_hidden_layers"], m["hidden_size"], m["vocab_size"], P + G
    body = linears(m)
    out = {p: Counter() for p in PHASES}

    def fwd(phase, n, pairs, times=1, backward=False):
        for k_in, n_out in pairs:
            out[phase][("nt", n, k_in, n_out)] += times
            if backward:
                out[phase][("nn", n, n_out, k_in)] += times  # dX = dY·W
                out[phase][("tn", n_out, n, k_in)] += times  # dW = dYᵀ·X

    fwd("generation", B * P, body, L)
    fwd("generation", B, [(H, V)])
    fwd("generation", B, body, L * (G - 1))
    fwd("generation", B, [(H, V)], G - 1)
    steps = E * (B // mb)
    if stage == "grpo":
        fwd("training", mb * T, body, L * steps, backward=True)  # the policy only
    else:
        fwd("experience", B * T, body, 4 * L)  # policy, reference, reward, value
        fwd("experience", B * G, [(H, V)], 2)  # policy and reference heads on the response
        fwd("training", mb * T, body, 2 * L * steps, backward=True)  # policy and value bodies
    fwd("training", mb * G, [(H, V)], steps, backward=True)  # policy head on the response positions
    return out


def gemm_flops(counts: Counter) -> float:
    return sum(2.0 * M * K * N * c for (_, M, K, N), c in counts.items())


def _operands(layout: str, M: int, K: int, N: int, dtype, device):
    """a [M, K], b [K, N] stored as the layer's tensors are: "nt" b = Wᵀ (W [N, K]), "tn" a = dYᵀ (dY [K, M])."""
    a = torch.randn(K, M, dtype=dtype, device=device).t() if layout == "tn" else torch.randn(M, K, dtype=dtype, device=device)
    b = torch.randn(N, K, dtype=dtype, device=device).t() if layout == "nt" else torch.randn(K, N, dtype=dtype, device=device)
    return a, b


def measure(shape: str, device: str, dtype=torch.float32, rep_ms: float = 100.0, stage: str = "ppo") -> dict:
    """phase -> {"flops", "floor_s", "gflops"} plus "total"; every distinct GEMM timed once (median)."""
    per_phase = gemms(shape, stage)
    timed: dict[tuple, float] = {}
    for counts in per_phase.values():
        for key in counts:
            if key not in timed:
                a, b = _operands(*key, dtype, device)
                timed[key] = bench(lambda: a @ b, device, rep_ms=rep_ms).median_ms / 1e3
                del a, b
    res = {}
    for phase, counts in per_phase.items():
        s = sum(timed[k] * c for k, c in counts.items())
        res[phase] = {"flops": gemm_flops(counts), "floor_s": s}
    res["total"] = {k: sum(res[p][k] for p in PHASES) for k in ("flops", "floor_s")}
    for r in res.values():
        r["gflops"] = r["flops"] / r["floor_s"] / 1e9 if r["floor_s"] > 0 else float("nan")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastrlhf bench floor", description=__doc__.split("\n")[0])
    ap.add_argument("--stage", default="ppo", help="ppo (run_ppo's iteration) | grpo (run_grpo's step)")
    ap.add_argument("--shape", default=None, help="tiny | qwen2-0.5b | smoke (default: qwen2-0.5b on CUDA, tiny on CPU)")
    ap.add_argument("--device", default=None, help="cpu | cuda")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    ap.add_argument("--rep-ms", type=float, default=100.0, help="timing budget per GEMM shape")
    ap.add_argument("--baseline-s", type=float, default=None, help="a peer's s/iteration at this shape on this machine")
    a = ap.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_choice("device", device, ("cpu", "cuda"))
    shape = a.shape or ("qwen2-0.5b" if device == "cuda" else "tiny")
    check_choice("stage", a.stage, ("ppo", "grpo"))
    check_choice("shape", shape, sorted(SHAPES))
    check_choice("dtype", a.dtype, ("float32", "bfloat16"))
    torch.set_num_threads(a.threads)
    res = measure(shape, device, getattr(torch, a.dtype), a.rep_ms, a.stage)
    what = "PPO iteration" if a.stage == "ppo" else "GRPO step"
    print(f"GEMM floor of one {what}, shape {shape}, {a.dtype}, {device_name(device)}, "
          f"{a.threads if device == 'cpu' else '-'} threads")
    print("| phase | GEMM GFLOP | floor s | GEMM GFLOP/s |\n|---|---|---|---|")
    for p in (*PHASES, "total"):
        r = res[p]
        if r["flops"]:
            print(f"| {p} | {r['flops'] / 1e9:.1f} | {r['floor_s']:.3f} | {r['gflops']:.0f} |")
    if a.stage == "ppo":
        mf = model_flops(shape)
        print(f"(model FLOPs with attention: {mf['total'] / 1e9:.1f} GFLOP; attention {mf['attention'] / 1e9:.1f})")
    if a.baseline_s:
        print(f"baseline {a.baseline_s:.3f} s/{what.split()[1]} -> at most {a.baseline_s / res['total']['floor_s']:.2f}x "
              f"faster through these GEMMs on this machine")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
