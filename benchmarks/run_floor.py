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
machine: attention, norms, activations, sampling, the optimizer and all framework overhead count as zero. It is the
peer's work through ``F.linear``'s BLAS: fastrlhf's oneDNN decode GEMMs and shared prompts (docs/benchmarks.md) do
less, so its time can fall below it. The score and
value heads (out = 1) are left out. ``--baseline-s`` (a peer's measured s/iteration, same shape, same machine) prints
the largest speed-up over it that the floor leaves: baseline / floor.

Decode as a chain. A per-shape timing runs one weight again and again, hot in cache. A decode step instead reads every
weight of the model once (L layers' four projections, then the head) for a few rows, and once the weights outgrow the
caches that read, not the arithmetic, sets its time. ``decode_chain`` times exactly that: one step's GEMMs back to back
over a whole model's worth of distinct weights. The generation floor "as a chain" is the prefill (per shape) plus G − 1
such steps; it is the tighter of the two bounds for generation and is printed beside the per-shape one.

``--workload realistic`` (``benchmarks.workload``: prompt lengths over [⌈P/8⌉, P], responses ending at EOS with the
hazard h = 1 − 0.5^(4/G), capped at G): the floor of an ideal engine on that workload, averaged over ``--rollouts``
simulated batches. Prefill and every training forward run on the valid tokens only (padding-free); decode step t runs
the rows still live at t (an ideal compaction), each step costing ``decode_chain`` at that row count. It prints the
floor in response tokens per second; ``--baseline-tok-s`` (a peer's measured rate on that workload) gives the largest
speed-up the floor leaves.
"""
from __future__ import annotations

import argparse
from collections import Counter

import torch
import torch.nn.functional as F

from .run_ppo import SHAPES, model_flops
from .timing import bench, check_choice, device_name

PHASES = ("generation", "experience", "training")
STAGES = ("ppo", "grpo")


def linears(model: dict) -> list[tuple[int, int]]:
    """(in, out) of one decoder layer's projections: fused q/k/v, o, fused gate/up, down."""
    H, I = model["hidden_size"], model["intermediate_size"]
    Hq, Hkv = model["num_attention_heads"], model["num_key_value_heads"]
    D = H // Hq
    return [(H, (Hq + 2 * Hkv) * D), (Hq * D, H), (H, 2 * I), (I, H)]


def _stage_shape(shape: str, stage: str) -> tuple[dict, int, int, int, int, int]:
    """(model, B rows generated, P, G, epochs E, minibatch rows) of ``run_ppo``'s iteration or ``run_grpo``'s step."""
    check_choice("stage", stage, STAGES)
    if stage == "grpo":
        from .run_grpo import SHAPES as GRPO_SHAPES
        S = GRPO_SHAPES[shape]
        return S["model"], S["Q"] * S["n"], S["P"], S["G"], 1, S["Q"] * S["n"]
    S = SHAPES[shape]
    return S["model"], S["B"], S["P"], S["G"], S["epochs"], S["minibatch"]


def gemms(shape: str, stage: str = "ppo", tokens: dict | None = None) -> dict[str, Counter]:
    """phase -> Counter{(layout, M, K, N): calls} of one iteration's GEMMs ([M, K]·[K, N]).

    stage "ppo": ``run_ppo``'s iteration (shapes from ``run_ppo.SHAPES``). stage "grpo": ``run_grpo``'s step (shapes
    from ``run_grpo.SHAPES``): B = Q·n completions generated, no experience forwards (μ = 1 and β = 0: the old
    log-probs are the update's own forward, no reference model), one forward and backward of the policy.
    ``tokens`` (padding-free work, as ``realistic`` passes): {"prompt": prompt tokens of the batch, "all": prompt +
    response tokens, "response": response tokens}; then the prefill and every forward run on those counts and the
    decode steps are left out (``realistic`` times them as chains). None = the fixed shape: B·P, B·(P + G), B·G and
    G − 1 decode steps of B rows."""
    m, B, P, G, E, mb = _stage_shape(shape, stage)
    L, H, V = m["num_hidden_layers"], m["hidden_size"], m["vocab_size"]
    fixed = tokens is None
    tk = tokens or {"prompt": B * P, "all": B * (P + G), "response": B * G}
    body = linears(m)
    out = {p: Counter() for p in PHASES}

    def fwd(phase, n, pairs, times=1, backward=False):
        for k_in, n_out in pairs:
            out[phase][("nt", n, k_in, n_out)] += times
            if backward:
                out[phase][("nn", n, n_out, k_in)] += times  # dX = dY·W
                out[phase][("tn", n_out, n, k_in)] += times  # dW = dYᵀ·X

    fwd("generation", tk["prompt"], body, L)
    fwd("generation", B, [(H, V)])
    if fixed:
        fwd("generation", B, body, L * (G - 1))
        fwd("generation", B, [(H, V)], G - 1)
    per_epoch = B // mb
    steps = E * per_epoch
    n_all, n_resp = round(tk["all"] / per_epoch), round(tk["response"] / per_epoch)  # tokens of one minibatch
    if stage == "grpo":
        fwd("training", n_all, body, L * steps, backward=True)  # the policy only
    else:
        fwd("experience", tk["all"], body, 4 * L)  # policy, reference, reward, value
        fwd("experience", tk["response"], [(H, V)], 2)  # policy and reference heads on the response
        fwd("training", n_all, body, 2 * L * steps, backward=True)  # policy and value bodies
    fwd("training", n_resp, [(H, V)], steps, backward=True)  # policy head on the response positions
    return out


def decode_flops(model: dict) -> float:
    """GEMM FLOPs of one decode step per row: the body's projections and the LM head."""
    body = model["num_hidden_layers"] * sum(k * n for k, n in linears(model))
    return 2.0 * (body + model["hidden_size"] * model["vocab_size"])


def decode_chain(model: dict, rows: int, device, dtype=torch.float32, rep_ms: float = 100.0) -> float:
    """Seconds of one decode step's GEMMs on ``rows`` rows: x·Wᵀ for every layer's four projections, then the LM head,
    back to back over distinct weights [out, in] (a whole model's worth, as a decode step reads them), median of
    ``timing.bench``. Activations are the same few rows throughout (their values do not change the time)."""
    L, H, V = model["num_hidden_layers"], model["hidden_size"], model["vocab_size"]
    weights = [torch.randn(n_out, k_in, dtype=dtype, device=device) for _ in range(L) for k_in, n_out in linears(model)]
    weights.append(torch.randn(V, H, dtype=dtype, device=device))
    xs = {k: torch.randn(rows, k, dtype=dtype, device=device) for k in {w.shape[1] for w in weights}}

    def step():
        for w in weights:
            F.linear(xs[w.shape[1]], w)

    return bench(step, device, rep_ms=rep_ms).median_ms / 1e3


def gemm_flops(counts: Counter) -> float:
    return sum(2.0 * M * K * N * c for (_, M, K, N), c in counts.items())


def _operands(layout: str, M: int, K: int, N: int, dtype, device):
    """a [M, K], b [K, N] stored as the layer's tensors are: "nt" b = Wᵀ (W [N, K]), "tn" a = dYᵀ (dY [K, M])."""
    a = torch.randn(K, M, dtype=dtype, device=device).t() if layout == "tn" else torch.randn(M, K, dtype=dtype, device=device)
    b = torch.randn(N, K, dtype=dtype, device=device).t() if layout == "nt" else torch.randn(K, N, dtype=dtype, device=device)
    return a, b


def _floors(per_phase: dict[str, Counter], device, dtype, rep_ms: float) -> dict:
    """phase -> {"flops", "floor_s"} plus "total", every distinct GEMM timed once (median) and times its calls."""
    timed: dict[tuple, float] = {}
    res = {}
    for phase, counts in per_phase.items():
        for key in counts:
            if key not in timed:
                a, b = _operands(*key, dtype, device)
                timed[key] = bench(lambda: a @ b, device, rep_ms=rep_ms).median_ms / 1e3
                del a, b
        res[phase] = {"flops": gemm_flops(counts), "floor_s": sum(timed[k] * c for k, c in counts.items())}
    res["total"] = {k: sum(res[p][k] for p in PHASES) for k in ("flops", "floor_s")}
    res["_timed"] = timed
    return res


def _gflops(res: dict) -> dict:
    for p in (*PHASES, "total"):
        r = res[p]
        r["gflops"] = r["flops"] / r["floor_s"] / 1e9 if r["floor_s"] > 0 else float("nan")
    return res


def measure(shape: str, device: str, dtype=torch.float32, rep_ms: float = 100.0, stage: str = "ppo") -> dict:
    """Fixed shape: phase -> {"flops", "floor_s", "gflops"} plus "total"; "chain_s" on "generation" and "total" (the
    same floor with the G − 1 decode steps timed as ``decode_chain`` instead of shape by shape); "response_tokens"."""
    m, B, P, G, _, _ = _stage_shape(shape, stage)
    res = _floors(gemms(shape, stage), device, dtype, rep_ms)
    timed = res.pop("_timed")
    L, H, V = m["num_hidden_layers"], m["hidden_size"], m["vocab_size"]
    hot_step = L * sum(timed[("nt", B, k, n)] for k, n in linears(m)) + timed[("nt", B, H, V)]
    chain = (G - 1) * (decode_chain(m, B, device, dtype, rep_ms) - hot_step)  # what the chain adds to the decode
    res["generation"]["chain_s"] = res["generation"]["floor_s"] + chain
    res["total"]["chain_s"] = res["total"]["floor_s"] + chain
    res["response_tokens"] = B * G
    return _gflops(res)


def realistic_batches(shape: str, stage: str = "ppo", rollouts: int = 200, seed: int = 0):
    """``rollouts`` simulated batches of the realistic workload: [(prompt lengths [B], response lengths [B])]."""
    from .workload import prompt_lengths, sample_response_lengths
    _, B, P, G, _, _ = _stage_shape(shape, stage)
    g = torch.Generator().manual_seed(seed)
    return [(prompt_lengths(B, P, g), sample_response_lengths(B, G, g)) for _ in range(rollouts)]


def realistic(shape: str, device: str, dtype=torch.float32, rep_ms: float = 100.0, stage: str = "ppo",
              rollouts: int = 200, seed: int = 0) -> dict:
    """The floor of an ideal engine on the realistic workload (module docstring), averaged over ``rollouts`` simulated
    batches: ``measure``'s phases (padding-free token counts; "generation" includes the decode steps, each a
    ``decode_chain`` at the rows still live) plus "response_tokens" per batch and "decode_rows" {rows: steps per batch}."""
    m = _stage_shape(shape, stage)[0]
    batches = realistic_batches(shape, stage, rollouts, seed)
    rows = Counter()  # live rows -> decode steps at that many rows, over all batches
    for _, lens in batches:
        for t in range(1, max(lens)):  # decode step t samples token t + 1 of the rows with length > t
            rows[sum(n > t for n in lens)] += 1
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    tokens = {"prompt": round(mean([sum(p) for p, _ in batches])),
              "all": round(mean([sum(p) + sum(r) for p, r in batches])),
              "response": round(mean([sum(r) for _, r in batches]))}
    res = _floors(gemms(shape, stage, tokens), device, dtype, rep_ms)
    res.pop("_timed")
    decode = sum(c * decode_chain(m, b, device, dtype, rep_ms) for b, c in sorted(rows.items())) / rollouts
    for p in ("generation", "total"):
        res[p]["floor_s"] += decode
        res[p]["flops"] += sum(c * b * decode_flops(m) for b, c in rows.items()) / rollouts
    res["response_tokens"] = tokens["response"]
    res["decode_rows"] = {b: c / rollouts for b, c in sorted(rows.items())}
    return _gflops(res)


def floor_of(shape: str, stage: str = "ppo", workload: str = "fixed", device: str = "cpu", dtype=torch.float32,
             rep_ms: float = 100.0) -> dict:
    """The floors a runner compares with (decode as chains): {"generation_s", "total_s", "response_tokens"} of one
    batch (realistic: the mean over simulated batches)."""
    res = (measure if workload == "fixed" else realistic)(shape, device, dtype, rep_ms, stage)
    return {"generation_s": tightest(res, "generation"), "total_s": tightest(res, "total"),
            "response_tokens": res["response_tokens"]}


def tightest(res: dict, phase: str) -> float:
    """The tighter floor of ``phase`` in a ``measure`` / ``realistic`` result: decode as chains where timed so."""
    return res[phase].get("chain_s", res[phase]["floor_s"])


def floor_note(floor: dict, what: str, *, peer: float | None, ours: float | None, rate: bool = False) -> str:
    """One line for a runner's ``--floor``: ``what`` is "generation" or "total"; ``peer`` / ``ours`` are seconds per
    batch, or response tokens/s of generation when ``rate``. Reports peer / floor (the most any engine doing these
    GEMMs could gain over the peer here) and ours / floor."""
    f = floor[f"{what}_s"]
    if rate:
        f_rate = floor["response_tokens"] / f
        head = f"GEMM floor, {what}, measured in this run: {f_rate:.0f} response tok/s ({f:.3f} s per batch)"
        gain = None if not peer else f_rate / peer
        ours_x = None if not ours else f_rate / ours
    else:
        head = f"GEMM floor, {what}, measured in this run: {f:.3f} s"
        gain = None if not peer else peer / f
        ours_x = None if not ours else ours / f
    parts = [head]
    if gain is not None:
        parts.append(f"the peer leaves at most {gain:.2f}x to any engine doing these GEMMs through torch here")
    if ours_x is not None:
        parts.append(f"fastrlhf takes {ours_x:.2f}x the floor's time")
    return "; ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastrlhf bench floor", description=__doc__.split("\n")[0])
    ap.add_argument("--stage", default="ppo", help="ppo (run_ppo's iteration) | grpo (run_grpo's step)")
    ap.add_argument("--shape", default=None, help="tiny | qwen2-0.5b | smoke (default: qwen2-0.5b on CUDA, tiny on CPU)")
    ap.add_argument("--workload", default="fixed", help="fixed | realistic (module docstring)")
    ap.add_argument("--rollouts", type=int, default=200, help="realistic: simulated batches averaged over")
    ap.add_argument("--device", default=None, help="cpu | cuda")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    ap.add_argument("--rep-ms", type=float, default=100.0, help="timing budget per GEMM shape / decode chain")
    ap.add_argument("--baseline-s", type=float, default=None, help="a peer's s/iteration at this shape on this machine")
    ap.add_argument("--baseline-tok-s", type=float, default=None,
                    help="a peer's generation rate (response tokens/s) at this shape and workload on this machine")
    a = ap.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_choice("device", device, ("cpu", "cuda"))
    shape = a.shape or ("qwen2-0.5b" if device == "cuda" else "tiny")
    check_choice("stage", a.stage, STAGES)
    check_choice("shape", shape, sorted(SHAPES))
    check_choice("workload", a.workload, ("fixed", "realistic"))
    check_choice("dtype", a.dtype, ("float32", "bfloat16"))
    if a.rollouts < 1:
        raise ValueError(f"--rollouts {a.rollouts}: expected >= 1")
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    fixed = a.workload == "fixed"
    res = (measure(shape, device, dtype, a.rep_ms, a.stage) if fixed else
           realistic(shape, device, dtype, a.rep_ms, a.stage, a.rollouts))
    what = "PPO iteration" if a.stage == "ppo" else "GRPO step"
    print(f"GEMM floor of one {what}, shape {shape}, {a.workload} workload, {a.dtype}, {device_name(device)}, "
          f"{a.threads if device == 'cpu' else '-'} threads")
    if fixed:
        print("| phase | GEMM GFLOP | floor s, per shape | floor s, decode as a chain | GEMM GFLOP/s (per shape) |\n"
              "|---|---|---|---|---|")
    else:
        print("| phase | GEMM GFLOP | floor s (decode as chains at the live rows) | GEMM GFLOP/s |\n|---|---|---|---|")
    for p in (*PHASES, "total"):
        r = res[p]
        if r["flops"]:
            chain = f" {tightest(res, p):.3f} |" if fixed else ""
            print(f"| {p} | {r['flops'] / 1e9:.1f} | {r['floor_s']:.3f} |{chain} {r['gflops']:.0f} |")
    if a.stage == "ppo" and fixed:
        mf = model_flops(shape)
        print(f"(model FLOPs with attention: {mf['total'] / 1e9:.1f} GFLOP; attention {mf['attention'] / 1e9:.1f})")
    floor, gen = tightest(res, "total"), tightest(res, "generation")
    resp = res["response_tokens"]  # of one batch
    if not fixed:
        steps = sum(res["decode_rows"].values())
        print(f"per batch: {resp} response tokens, {steps:.1f} decode steps; floor {resp / gen:.0f} response tok/s "
              "in generation")
    if a.baseline_s:
        print(f"baseline {a.baseline_s:.3f} s/{what.split()[1]} -> at most {a.baseline_s / floor:.2f}x "
              f"faster through these GEMMs on this machine")
    if a.baseline_tok_s:
        print(f"baseline {a.baseline_tok_s:.0f} response tok/s in generation -> at most "
              f"{resp / gen / a.baseline_tok_s:.2f}x "
              f"faster generation through these GEMMs on this machine")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
