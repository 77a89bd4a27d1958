"""Tile configurations of the bf16 fused LM-head log-prob kernels, timed against each other at one shape in one run.

    python -m benchmarks.run_linear_configs [--shape h100|smoke] [--rep-ms 100] [--csv FILE]

Why: compiled for sm_90, the forward uses 254 of 255 registers per thread in every tile shape tried (the online
log-sum-exp epilogue over an fp32 tile), so the 8-warp 128×128 tile runs one CTA per SM and its epilogue does not
overlap another CTA's MMA; forcing fewer registers spills (128: ~400 B of stack). Which configuration is fastest is a
question for the GPU: each ``CANDIDATES`` entry (BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages) replaces the launcher's
16-bit config for large N (``linear_logprobs.CONFIGS["16bit"]``) and is timed on the same inputs: forward (log-probs and
entropy, no grad) and forward + backward (gradients of hidden and weight). Every candidate must give the log-probs of
the current config (max |Δ| printed). The candidates are compiled for sm_90 on CPU by tests/kernels/test_aot_logprobs.py
(no spills) so that the run cannot fail on a compile.
Prints a table; appends rows (bench "linear-configs", metric fwd_ms / fwd_bwd_ms / max_dlogp) to a CSV with the
generation runner's columns.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib
from pathlib import Path

import torch

from .timing import bench, check_choice, device_name, git_commit

CANDIDATES = {
    "current": None,  # linear_logprobs.CONFIGS["16bit"] as shipped
    "n64-w4": (64, 128, 64, 4, 3),  # 254 regs × 128 threads: 2 CTAs per SM, one's epilogue beside the other's MMA
    "n128-s4": (128, 128, 64, 8, 4),  # one more pipeline stage (128 KiB of shared memory)
    "v64-w4": (128, 64, 64, 4, 3),  # narrower vocabulary tile, 4 warps: 2 CTAs per SM
}
SHAPES = {"h100": (16384, 896, 151936), "smoke": (72, 16, 260)}  # smoke: > 64 tokens (the large-N config)
CSV_COLUMNS = ["date", "device", "bench", "shape", "provider", "metric", "median", "unit", "torch", "commit"]


def run(shape: str, device: str, rep_ms: float = 100.0) -> list[dict]:
    """[{provider, metric, median, unit}] for every candidate. Restores the shipped config afterwards."""
    check_choice("shape", shape, SHAPES)
    LL = importlib.import_module("fastrlhf.kernels.fused_linear_logprobs")
    N, H, V = SHAPES[shape]
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(N, H, generator=g) / H**0.5).to(device, torch.bfloat16)
    weight = torch.randn(V, H, generator=g).to(device, torch.bfloat16)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    g_lp = torch.randn(N, generator=g).to(device)
    shipped = LL.CONFIGS["16bit"]
    rows, ref = [], None
    x = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return LL.linear_logprobs(hidden, weight, labels, return_entropy=True)

    def fwd_bwd():
        x.grad = w.grad = None
        LL.linear_logprobs(x, w, labels).backward(g_lp)
    try:
        for name, cfg in CANDIDATES.items():
            LL.CONFIGS["16bit"] = shipped if cfg is None else cfg
            lp, _ = fwd()
            ref = lp if ref is None else ref
            rows.append(dict(provider=name, metric="max_dlogp", median=float((lp - ref).abs().max()), unit=""))
            for metric, fn in (("fwd_ms", fwd), ("fwd_bwd_ms", fwd_bwd)):
                t = bench(fn, device, warmup_ms=25.0, rep_ms=rep_ms)
                rows.append(dict(provider=name, metric=metric, median=t.median_ms, unit="ms"))
    finally:
        LL.CONFIGS["16bit"] = shipped
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run_linear_configs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="h100")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--rep-ms", type=float, default=100.0, help="do_bench time budget per measurement")
    ap.add_argument("--csv", default=None, help="CSV to append rows to (default: print only)")
    a = ap.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = run(a.shape, device, a.rep_ms)
    N, H, V = SHAPES[a.shape]
    print(f"linear_logprobs bf16 configs, N={N} H={H} V={V}, {device_name(device)}, torch {torch.__version__}")
    print("| config | (BLOCK_N, BLOCK_V, BLOCK_K, warps, stages) | fwd ms | fwd+bwd ms | max |Δ logp| |")
    print("|---|---|---|---|---|")
    by = {(r["provider"], r["metric"]): r["median"] for r in rows}
    for name, cfg in CANDIDATES.items():
        print(f"| {name} | {cfg or 'shipped'} | {by[(name, 'fwd_ms')]:.4g} | {by[(name, 'fwd_bwd_ms')]:.4g} | "
              f"{by[(name, 'max_dlogp')]:.2e} |")
    if a.csv:
        meta = dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), device=device_name(device),
                    bench="linear-configs", shape=f"N={N} H={H} V={V} bf16", torch=torch.__version__,
                    commit=git_commit())
        path = Path(a.csv)
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
            if new:
                w.writeheader()
            w.writerows({**meta, **r} for r in rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
