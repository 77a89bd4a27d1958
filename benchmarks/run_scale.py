"""Scale-out benchmark: the real ``fastrlhf ppo`` stage as one plain process and under torchrun with N ranks (FSDP2),
the same per-rank batch (weak scaling), all in one run.

    python -m benchmarks.run_scale [--shape smoke|tiny|qwen2-0.5b] [--nproc 2 4 8] [--iters 3] [--threads-per-rank 1]
                               [--response-lengths 32 64 128 256] [--plot PATH.png]
    fastrlhf bench scale ...            (the CLI calls ``main(argv)``)

``--response-lengths``: run every arm once per response length G (``max_new_tokens``; default: the shape's G); with
more than one, the arms are named ``<arm>@G<G>``. ``--nproc 0``: the plain arm only. ``--plot``: seconds per
iteration against G, one line per arm.

Arms: ``plain`` = one process without torchrun (no sharding: the single-GPU path); ``fsdp-N`` = ``torchrun --standalone
--nproc_per_node N -m fastrlhf ppo`` (FSDP2; gloo on CPU, NCCL on CUDA with one GPU per rank). Every arm runs
``iters + 1`` PPO iterations and is timed by the stage's own timers (metrics.jsonl: generation / experience / training
seconds, each the max over ranks; response tokens summed over ranks); the first iteration is warm-up. Per arm:
- ``s_per_iter``   median seconds per iteration (generation + experience + training)
- ``resp_tok_s``   median response tokens per second, all ranks together
- ``efficiency``   weak-scaling efficiency: resp_tok_s(N) / (N · resp_tok_s(plain)) — 1.0 is perfect scaling
- ``peak_mem_gb``  CUDA: the largest ``max_memory_allocated`` of any rank (0 on CPU)
On CPU every rank (and the plain process) gets ``--threads-per-rank`` threads, so N ranks use N times the cores of
the plain arm, as N GPUs would. Models: the random Qwen2 checkpoints of ``benchmarks/run_ppo.py`` (policy; reward = value
init), the embedded task's tokenizer (its ids index the first rows of the vocabulary) and the task's prompts.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .run_generate import format_table, write_csv
from .run_ppo import SHAPES, build_checkpoints
from .timing import device_name, git_commit

DEFAULT_CSV = Path(__file__).resolve().parent / "results.csv"
ROOT = Path(__file__).resolve().parents[1]


def prepare(shape: str, root: Path, n_prompts: int) -> dict:
    """Checkpoints (+ the task tokenizer in the policy folder) and a prompts jsonl under ``root``."""
    from fastrlhf.tools import task
    ckpt = build_checkpoints(shape, root)
    task.build_tokenizer().save_pretrained(ckpt["policy"])
    ckpt["prompts"] = task.write_prompts(str(root / "prompts.jsonl"), n_prompts, seed=0)
    return ckpt


def stage_args(shape: str, ckpt: dict, out: Path, iters: int, device: str, G: int | None = None) -> list[str]:
    S = dict(SHAPES[shape])
    if G is not None:
        S["G"] = G
    cfg = dict(policy=ckpt["policy"], reward_model=ckpt["reward"], prompts=ckpt["prompts"], output_dir=str(out),
               iterations=iters + 1, batch_size=S["B"], minibatch_size=S["minibatch"], ppo_epochs=S["epochs"],
               max_new_tokens=S["G"], lr=1e-6, value_lr=1e-6, device=device, plots="false", log_every=1000)
    return [x for k, v in cfg.items() for x in (f"--{k}", str(v))]


def run_arm(nproc: int | None, args: list[str], threads: int, timeout: float) -> list[dict]:
    """One arm in fresh processes: plain (nproc None) or torchrun with nproc ranks. Returns metrics.jsonl rows."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), FASTRLHF_NO_PROGRESS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    launch = ([sys.executable, "-m", "fastrlhf"] if nproc is None else
              [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "fastrlhf"])
    proc = subprocess.run([*launch, "ppo", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{'plain' if nproc is None else f'fsdp-{nproc}'} failed (exit {proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    out = Path(args[args.index("--output_dir") + 1])
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def summarize(rows: list[dict]) -> dict:
    """Medians over the iterations after the first (warm-up)."""
    timed = rows[1:] or rows
    it = [r["time/generate"] + r["time/experience"] + r["time/train"] for r in timed]
    return {"s_per_iter": statistics.median(it), "resp_tok_s": statistics.median(r["tokens_per_s"] for r in timed),
            "peak_mem_gb": max(r.get("peak_mem_gb", 0.0) for r in timed), "iters": len(timed)}


def run(shape: str, device: str, nprocs: list[int], iters: int, threads: int, timeout: float,
        response_lengths: list[int] | None = None) -> tuple[list[dict], dict]:
    """Every arm at every response length; results {name: metrics (+ "arm", "G", "ranks")}."""
    S = SHAPES[shape]
    Gs = list(response_lengths or [S["G"]])
    nprocs = [n for n in nprocs if n > 0]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fastrlhf-scale-") as tmp:
        root = Path(tmp)
        ckpt = prepare(shape, root, n_prompts=S["B"] * max(nprocs + [1]) * 2)
        for G in Gs:
            for arm, n in [("plain", None)] + [(f"fsdp-{n}", n) for n in nprocs]:
                name = arm if len(Gs) == 1 else f"{arm}@G{G}"
                args = stage_args(shape, ckpt, root / name, iters, device, G)
                results[name] = {**summarize(run_arm(n, args, threads, timeout)), "ranks": n or 1, "arm": arm,
                                 "G": G}
    rows = []
    for name, r in results.items():
        base = results[name.replace(r["arm"], "plain", 1)]["resp_tok_s"]  # the plain arm at the same G
        r["efficiency"] = r["resp_tok_s"] / (r["ranks"] * base) if base > 0 else float("nan")
        for metric, unit in (("s_per_iter", "s"), ("resp_tok_s", "tok/s"), ("efficiency", "x"),
                             ("peak_mem_gb", "GiB")):
            rows.append({"provider": name, "metric": metric, "median": r[metric], "unit": unit})
    return rows, results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run_scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: qwen2-0.5b on CUDA, smoke on CPU")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--nproc", type=int, nargs="+", default=None,
                    help="rank counts to run under torchrun (default: 2, 4, ... up to the GPU count; 2 on CPU)")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations after one warm-up (median)")
    ap.add_argument("--threads-per-rank", type=int, default=1, help="CPU threads of each process (OMP_NUM_THREADS)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per arm")
    ap.add_argument("--csv", default=str(DEFAULT_CSV), help="CSV to append rows to (default: %(default)s)")
    ap.add_argument("--no-csv", action="store_true", help="print only")
    ap.add_argument("--response-lengths", type=int, nargs="+", default=None, metavar="G",
                    help="run every arm at each of these response lengths (default: the shape's G)")
    ap.add_argument("--plot", default=None, metavar="PATH.png", help="draw seconds per iteration against G per arm")
    a = ap.parse_args(argv)
    if a.response_lengths and min(a.response_lengths) < 1:
        ap.error(f"--response-lengths {a.response_lengths}: every G must be >= 1")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = a.shape or ("qwen2-0.5b" if device == "cuda" else "smoke")
    if a.nproc is None:
        gpus = torch.cuda.device_count() if device == "cuda" else 2
        a.nproc = [n for n in (2, 4, 8) if n <= gpus] or [1]
    if device == "cuda" and max(a.nproc) > torch.cuda.device_count():
        ap.error(f"--nproc {max(a.nproc)} needs that many GPUs; this machine has {torch.cuda.device_count()}")
    rows, results = run(shape, device, sorted(set(a.nproc)), a.iters, a.threads_per_rank, a.timeout,
                        a.response_lengths)
    S = SHAPES[shape]
    meta = dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), device=device_name(device),
                bench="scale", shape=shape, torch=torch.__version__, commit=git_commit())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device: {meta['device']} | torch {meta['torch']} | commit {meta['commit']} | shape {shape} (per rank: "
          f"B={S['B']} prompts, G={a.response_lengths or S['G']} new tokens, {S['epochs']} epochs, minibatch {S['minibatch']}) | "
          f"{a.threads_per_rank} thread(s) per process | median of {a.iters} iterations after 1 warm-up | "
          f"load avg (1 min) {load:.1f}")
    print(format_table(rows))
    if not a.no_csv:
        used = write_csv(Path(a.csv), rows, meta, suffix="_scale")
        print(f"appended {len(rows)} rows to {used}")
    if a.plot:
        from .plots import lines_png
        series: dict[str, list] = {}
        for r in results.values():
            series.setdefault(r["arm"], []).append((r["G"], r["s_per_iter"]))
        out = lines_png(a.plot, series, f"PPO iteration time vs response length, {meta['device']}, shape {shape} "
                        f"(B={S['B']} per rank)", "response length G (max_new_tokens)", "seconds per iteration")
        print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
