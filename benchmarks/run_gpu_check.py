"""One GPU check in one call: the CUDA tests, then the kernels, generate, ppo and trl runners at the H100 shapes, each
beside its baselines measured in the same run; one summary table and the raw logs in an output folder.

    bash benchmarks/gpu_check.sh [--out DIR] [--budget-s 440] [--dry-run]      (installs wheels, builds, then this)
    python -m benchmarks.run_gpu_check [--out DIR] [--budget-s 440] [--dry-run]

Stages (``STAGES``; each a fresh process with its own time limit, killed with its children when it runs over, so one
slow stage cannot take the whole budget; a stage is skipped when less than its minimum is left):
- ``tests``     pytest on CUDA: the kernel tests at real shapes (``tests/kernels``, the AOT compiles excluded), the
                engine / model tests (CUDA graphs, flash-attn when importable) and the CUDA paths
                (``tests/test_gpu_paths.py``: graphs over the engine's weight copies). The first compiled Triton launch
                here also shows whether the driver loads the cubins of Triton's bundled ptxas (see gpu_check.sh).
- ``kernels``   ``benchmarks.run_kernels`` at the ``h100`` shape, bf16: fastrlhf beside eager, TRL's and Liger's kernels.
- ``linear_configs``  ``benchmarks.run_linear_configs``: candidate tile configs of the bf16 LM-head log-prob kernels
                against the shipped one (which to ship is decided from this).
- ``generate``  ``benchmarks.run_generate`` at ``qwen2-0.5b``: the hybrid engine beside transformers' static-cache generate
  (``--floor``: the generation's GEMM floor, decode as chains, timed in the same run).
- ``ppo``       ``benchmarks.run_ppo`` at ``qwen2-0.5b``: fastrlhf's PPO iteration beside TRL 0.29's PPOTrainer
                (``--trl-path`` from ``FASTRLHF_TRL_PATH``, which gpu_check.sh sets when the wheels are there); one
                timed iteration after one warm-up per arm (TRL's takes ~31 s on an H100).
- ``trl``       ``benchmarks.run_trl`` at ``qwen2-0.5b``: TRL's GRPO trainer with and without fastrlhf's kernels.
Left out to fit the budget (stated in the summary): torch.compile providers of the kernel runner (~30 s of compile per
function) and transformers' dynamic-cache generate (~26 s per call at this shape).

Output (``--out``, default ``$OUT``; at most 8 files, what a device call brings back): ``summary.md`` (stage status and
wall time, the device, one table of every measured row, the targets, gpu_check.sh's set-up log), ``<stage>.log`` for each
stage (raw output), ``results.csv`` (every runner's rows, one column set). ``--dry-run`` runs no stage: it parses each runner's exact flags with the runner's own argument parser
(stopping right after parsing), checks the shapes they name, and checks that pytest collects the test selection.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 440.0  # the stages; with gpu_check.sh's ~30 s of set-up the call stays within 8 minutes
SLACK_S = 90  # the stage limits may sum to this much over the budget (most stages end well before their limit)
GEN_COLUMNS = ["date", "device", "bench", "shape", "provider", "metric", "median", "unit", "torch", "commit"]


@dataclass(frozen=True)
class Stage:
    name: str
    argv: tuple          # the command after ``python -m`` (a runner module and its flags, or pytest's)
    limit_s: int         # killed after this long
    min_s: int           # skipped when less than this is left of the budget
    runner: str | None = None  # the benchmark module whose parser checks ``argv`` in a dry run
    shapes: dict = field(default_factory=dict)  # flag → the runner's shape table (attribute name) it must name


TEST_PATHS = ("tests/kernels", "tests/test_engine.py", "tests/test_model.py", "tests/test_gpu_paths.py")


def stages(out: Path) -> list[Stage]:
    """The stages in run order, with the flags each runner gets (CSV rows go to files under ``out``)."""
    csv_k, csv_g = str(out / "kernels.csv"), str(out / "results.csv")
    return [
        Stage("tests", ("pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-m", "not distributed", *TEST_PATHS,
                        "--ignore-glob=tests/kernels/test_aot_*.py"), 90, 30),  # the AOT compiles run on CPU CI
        Stage("kernels", ("benchmarks.run_kernels", "--shape", "h100", "--dtype", "bf16", "--ops", "logprobs", "linear",
                          "gae", "ppo", "--providers", "fastrlhf", "eager", "eager-lse", "trl", "liger",
                          "--warmup-ms", "25", "--rep-ms", "100", "--csv", csv_k), 90, 45,
              runner="benchmarks.run_kernels", shapes={"shape": "SHAPES"}),
        Stage("linear_configs", ("benchmarks.run_linear_configs", "--shape", "h100", "--device", "cuda", "--csv", csv_g),
              40, 25, runner="benchmarks.run_linear_configs", shapes={"shape": "SHAPES"}),
        Stage("generate", ("benchmarks.run_generate", "--shape", "qwen2-0.5b", "--device", "cuda", "--providers",
                           "fastrlhf", "hf-static", "--runs", "3", "--floor", "--csv", csv_g), 90, 45,
              runner="benchmarks.run_generate", shapes={"shape": "SHAPES"}),
        Stage("ppo", ("benchmarks.run_ppo", "--shape", "qwen2-0.5b", "--device", "cuda", "--iters", "1", "--arms",
                      "fastrlhf", "trl", "--timeout", "100", "--floor", "--csv", csv_g), 140, 60,
              runner="benchmarks.run_ppo", shapes={"shape": "SHAPES"}),
        Stage("trl", ("benchmarks.run_trl", "--shape", "qwen2-0.5b", "--device", "cuda", "--steps", "2", "--warmup", "1",
                      "--csv", csv_g), 80, 40, runner="benchmarks.run_trl", shapes={"shape": "SHAPES"}),
    ]


# Targets of the project brief for the H100 shapes (what "done" means; printed beside the measurements).
TARGETS = [
    ("kernels", "logprobs fwd (with entropy), [32,512,151936] bf16", "≤ 1.6 ms"),
    ("kernels", "logprobs fwd+bwd, same", "≤ 4.0 ms"),
    ("kernels", "linear log-prob fwd+bwd, N=16384 H=896 V=151936 bf16", "≤ 25 ms, ≤ 1 GiB extra"),
    ("kernels", "GAE [64,1024] / PPO loss + k3 KL fwd+bwd [64,1024]", "≤ 50 µs each"),
    ("generate", "hybrid engine, B=64 P=128 G=256 bf16", "≥ 40,000 tok/s; set-up ≤ 10 s"),
    ("ppo", "PPO iteration, 4 models, 4 epochs", "≤ 3.1 s / iteration; ≤ 28 GiB"),
]


class _Parsed(Exception):
    def __init__(self, ns):
        super().__init__("parsed")
        self.ns = ns


@contextlib.contextmanager
def _stop_after_parse():
    """Inside: ``ArgumentParser.parse_args`` parses as usual (errors exit 2), then raises ``_Parsed(namespace)``."""
    orig = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        raise _Parsed(orig(self, args, namespace))
    argparse.ArgumentParser.parse_args = parse
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = orig


def dry_run_stage(st: Stage) -> str:
    """Check one stage without running it; returns a line saying what was checked (raises on a bad flag / shape)."""
    if st.runner is None:  # pytest: collection of the exact selection, no test runs
        cmd = [sys.executable, "-m", *st.argv, "--collect-only", "-q"]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"{st.name}: pytest cannot collect {st.argv}:\n{(p.stdout + p.stderr)[-2000:]}")
        n = 0  # "-q" lists node ids; "-qq" lists "path: count"
        for line in p.stdout.splitlines():
            head, _, count = line.rpartition(": ")
            n += 1 if "::" in line else (int(count) if head.endswith(".py") and count.isdigit() else 0)
        if n == 0:
            raise RuntimeError(f"{st.name}: the test selection collects no test")
        return f"{st.name}: pytest collects {n} tests"
    mod = importlib.import_module(st.runner)
    assert st.argv[0] == st.runner, f"{st.name}: argv must start with its runner {st.runner}"
    try:
        with _stop_after_parse():
            mod.main(list(st.argv[1:]))
    except _Parsed as p:
        ns = p.ns
    except SystemExit as e:
        raise RuntimeError(f"{st.name}: {st.runner} rejects its flags {st.argv[1:]} (exit {e.code})") from e
    else:
        raise RuntimeError(f"{st.name}: {st.runner}.main returned without parsing its arguments")
    shapes = []
    for flag, table in st.shapes.items():
        value, known = getattr(ns, flag), getattr(mod, table)
        if value not in known:
            raise RuntimeError(f"{st.name}: --{flag} {value!r} is not in {st.runner}.{table}")
        shapes.append(f"--{flag} {value} = {known[value]}")
    return f"{st.name}: {st.runner} parses {' '.join(st.argv[1:])}; " + "; ".join(shapes)


def _run_stage(st: Stage, out: Path, limit_s: float, env: dict) -> tuple[str, float]:
    """Run one stage in its own process group, output to ``out/<name>.log``; returns (status, seconds)."""
    log = out / f"{st.name}.log"
    cmd = [sys.executable, "-m", *st.argv]
    t0 = time.monotonic()
    with open(log, "w") as fh:
        fh.write(f"$ {' '.join(cmd)}\n(limit {limit_s:.0f} s)\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit_s)
            status = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"TIMEOUT after {limit_s:.0f} s"
    return status, time.monotonic() - t0


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def merge_results(out: Path) -> list[dict]:
    """Every runner's rows in one column set (``GEN_COLUMNS``): the kernel runner's rows become one row per metric
    (median ms, throughput, % of the ceiling, extra MiB, max error). Writes ``out/results.csv``; removes kernels.csv."""
    rows = _read_csv(out / "results.csv")
    for r in _read_csv(out / "kernels.csv"):
        base = dict(date=r["date"], device=r["device"], bench="kernels", shape=r["shape"], provider=r["provider"],
                    torch=r["torch"], commit=r["commit"])
        what = f"{r['op']} {r['mode']}"
        for metric, value, unit in ((f"{what} time", r["median_ms"], "ms"), (f"{what} throughput", r["throughput"],
                                                                              r["unit"]),
                                    (f"{what} % of ceiling", r["pct_ceiling"], "%"),
                                    (f"{what} extra memory", r["peak_extra_mib"], "MiB"),
                                    (f"{what} max abs err", r["max_abs_err"], "")):
            rows.append({**base, "metric": metric, "median": value, "unit": unit})
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=GEN_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with contextlib.suppress(FileNotFoundError):
        (out / "kernels.csv").unlink()
    return rows


def summary(status: list[tuple[str, str, float]], rows: list[dict], env_line: str, total_s: float) -> str:
    lines = ["# fastrlhf GPU check", "", env_line, f"total {total_s:.0f} s", "", "| stage | status | seconds |",
             "|---|---|---|"]
    lines += [f"| {n} | {s} | {t:.0f} |" for n, s, t in status]
    lines += ["", "Left out to fit the budget: torch.compile providers (kernels), transformers dynamic-cache generate.",
              "", "## Measurements (median; every row of the runners, baselines of the same run beside ours)", "",
              "| bench | shape | provider | metric | value | unit |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.get('bench', '')} | {r.get('shape', '')} | {r.get('provider', '')} | {r.get('metric', '')} "
                     f"| {r.get('median', '')} | {r.get('unit', '')} |")
    lines += ["", "## Targets", "", "| bench | what | target |", "|---|---|---|"]
    lines += [f"| {b} | {w} | {t} |" for b, w, t in TARGETS]
    return "\n".join(lines) + "\n"


def _env_line() -> str:
    import torch
    import triton
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    return (f"device: {dev} | torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {triton.__version__} | "
            f"python {sys.version.split()[0]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run_gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                    help="seconds for all stages together (default %(default)s)")
    ap.add_argument("--only", nargs="+", default=None, help="run only these stages (names of STAGES)")
    ap.add_argument("--dry-run", action="store_true", help="check every stage's command and shapes; run nothing")
    a = ap.parse_args(argv)
    if not a.out:
        ap.error("--out DIR is needed (or $OUT set)")
    out = Path(a.out)
    all_stages = stages(out)
    names = [s.name for s in all_stages]
    if a.only and any(n not in names for n in a.only):
        ap.error(f"--only {a.only}: stages are {names}")
    chosen = [s for s in all_stages if not a.only or s.name in a.only]
    if a.dry_run:
        for st in chosen:
            print("dry run:", dry_run_stage(st), flush=True)
        total = sum(s.limit_s for s in chosen)
        print(f"dry run: {len(chosen)} stages, limits sum to {total} s (budget {a.budget_s:.0f} s)")
        if total > a.budget_s + SLACK_S:
            print(f"dry run: the stage limits exceed the budget by more than {SLACK_S} s", file=sys.stderr)
            return 1
        return 0
    import torch
    if not torch.cuda.is_available():
        print("benchmarks.run_gpu_check: no CUDA device (use --dry-run on a CPU machine)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    t_start = time.monotonic()
    status = []
    for st in chosen:
        left = a.budget_s - (time.monotonic() - t_start)
        if left < st.min_s:
            status.append((st.name, f"skipped: {left:.0f} s left < {st.min_s} s", 0.0))
            continue
        s, secs = _run_stage(st, out, min(st.limit_s, left), env)
        status.append((st.name, s, secs))
        print(f"[gpu_check] {st.name}: {s} ({secs:.0f} s)", flush=True)
    rows = merge_results(out)
    text = summary(status, rows, _env_line(), time.monotonic() - t_start)
    setup = out / "setup.log"  # gpu_check.sh's log: folded in, so that $OUT holds at most 8 files
    if setup.exists():
        text += "\n## Set-up (gpu_check.sh)\n\n```\n" + setup.read_text()[-20000:] + "```\n"
        setup.unlink()
    (out / "summary.md").write_text(text)
    print(text)
    return 0 if all(s == "ok" for _, s, _ in status) else 1


if __name__ == "__main__":
    raise SystemExit(main())
