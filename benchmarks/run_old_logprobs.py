"""``old_logprobs: recompute`` vs ``rollout``: time of the experience step and effect on learning, same runs otherwise.

    python -m benchmarks.run_old_logprobs [--shape smoke|tiny] [--iters 8] [--seeds 0 1 2] [--lr 1e-4] [--threads 2]

For each seed, both modes run ``benchmarks.run_ppo.run_fastrlhf`` (the PPO stage's core: engine rollout, make_experience,
ppo_update) on the same random checkpoints and prompts, alternately (recompute, rollout, recompute, ...) so that a
drifting machine load hits both alike. Printed per mode: median experience seconds (steps 3-7: where rollout mode skips
the old-policy forward) and seconds per iteration over all seeds' timed iterations, the mean reward-model score of the
last iteration over seeds (and its spread), the mean per-sequence KL of the last iteration, and the largest
rollout-vs-first-forward log-prob mismatch seen. Timings from a loaded machine are not speed claims.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch

from .run_ppo import SHAPES, build_checkpoints, run_fastrlhf
from .timing import check_choice

MODES = ("recompute", "rollout")


def run(shape: str = "smoke", iters: int = 8, seeds=(0, 1, 2), lr: float = 1e-4, device: str = "cpu") -> dict:
    """{mode: {"exp_s": [...], "iter_s": [...], "final_score": [...], "final_kl": [...], "mismatch_max": float}}"""
    check_choice("shape", shape, SHAPES)
    out = {m: {"exp_s": [], "iter_s": [], "final_score": [], "final_kl": [], "mismatch_max": 0.0} for m in MODES}
    with tempfile.TemporaryDirectory() as d:
        ckpt = build_checkpoints(shape, d)
        for seed in seeds:
            for mode in MODES:
                r = run_fastrlhf(shape, ckpt, device, iters, profile=False, seed=seed, old_logprobs=mode, lr=lr)
                o = out[mode]
                o["exp_s"] += [t[1] for t in r["phase_times"][1:]]
                o["iter_s"] += [sum(t) for t in r["phase_times"][1:]]
                o["final_score"].append(r["scores"][-1])
                o["final_kl"].append(r["kls"][-1])
                o["mismatch_max"] = max(o["mismatch_max"], max(r["mismatch_max"]))
    return out


def format_results(res: dict) -> str:
    lines = ["| mode | median experience s | median s/iter | final score mean ± sd (seeds) | final KL mean | "
             "max |Δ logp| rollout vs first forward |", "|---|---|---|---|---|---|"]
    for mode, o in res.items():
        sd = statistics.stdev(o["final_score"]) if len(o["final_score"]) > 1 else 0.0
        lines.append(f"| {mode} | {statistics.median(o['exp_s']):.4g} | {statistics.median(o['iter_s']):.4g} | "
                     f"{statistics.mean(o['final_score']):.4g} ± {sd:.2g} | {statistics.mean(o['final_kl']):.4g} | "
                     f"{o['mismatch_max']:.2e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run_old_logprobs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smoke")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = run(a.shape, a.iters, tuple(a.seeds), a.lr, a.device)
    load = f"load avg {os.getloadavg()[0]:.1f} (1 min)" if hasattr(os, "getloadavg") else ""
    print(f"shape {a.shape}, {a.iters} timed iterations + 1 warm-up per run, seeds {a.seeds}, lr {a.lr}, "
          f"{a.device}, {load}")
    print(format_results(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
