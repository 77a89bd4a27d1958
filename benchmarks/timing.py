"""Timing and peak-memory measurement for the kernel benchmarks.

- ``bench(fn, device)`` -> ``Timing`` (median, p20, p80 in ms); ``bench_interleaved(fns)`` the same for several
  implementations of one op timed round robin on CPU (fair under load drifting on a shared machine).
  CUDA: ``triton.testing.do_bench`` (CUDA events, warm-up, and an L2 flush — a 256 MB buffer zeroed before every call).
  CPU: ``time.perf_counter`` around each call after warm-up calls; no cache flush (the CPU numbers are warm-cache numbers).
- ``peak_extra_mib(fn, device)`` -> MiB allocated by torch above what was live before the call, at the call's peak
  (outputs and gradients the call leaves behind count, as with ``torch.cuda.max_memory_allocated``).
  CUDA: ``torch.cuda.max_memory_allocated()`` delta after ``reset_peak_memory_stats()``.
  CPU: torch has no CPU peak counter, so the call runs once under ``torch.profiler`` with ``profile_memory=True``; the
  allocation (+bytes) and free (−bytes) events of torch's CPU allocator are summed in time order and the running maximum
  is the peak. What this does NOT see: memory malloc'ed outside torch's allocator (numpy buffers inside C++ extensions,
  oneDNN/BLAS scratch space). It is the CPU analogue of the CUDA number, not a process RSS.
"""
from __future__ import annotations

import contextlib
import csv
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int  # number of timed calls on CPU; -1 on CUDA (do_bench does not report it)


def _quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated quantile q in [0, 1] of xs (same convention as torch.quantile)."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def bench(fn: Callable[[], object], device: str, *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
          min_reps: int = 3, max_reps: int = 200, grad_to_none=None) -> Timing:
    """Time ``fn()`` on ``device`` ("cuda" or "cpu"). ``warmup_ms``/``rep_ms`` are time budgets as in do_bench."""
    if device == "cuda":
        from triton.testing import do_bench
        med, p20, p80 = do_bench(fn, warmup=int(warmup_ms), rep=int(rep_ms), grad_to_none=grad_to_none,
                                 quantiles=[0.5, 0.2, 0.8])
        return Timing(float(med), float(p20), float(p80), -1)
    # CPU: one untimed call (a warm-up that also estimates the cost), more warm-up calls to fill warmup_ms, then
    # timed calls to fill rep_ms (at least min_reps).
    t0 = time.perf_counter()
    fn()
    est = max(time.perf_counter() - t0, 1e-7) * 1e3  # ms
    for _ in range(min(int(warmup_ms / est), 100)):
        fn()
    n = max(min_reps, min(int(rep_ms / est), max_reps))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), n)


def bench_interleaved(fns: list[Callable[[], object]], *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
                      min_reps: int = 3, max_reps: int = 200) -> list[Timing]:
    """CPU timing of several implementations of one op, round robin: each round times every ``fn`` once (until it has
    its own count of calls, from its rep_ms budget), so load drifting on a shared machine hits all of them alike.
    One untimed call each first (warm-up + cost estimate), then warm-up calls to fill warmup_ms."""
    est = []
    for fn in fns:
        t0 = time.perf_counter()
        fn()
        est.append(max(time.perf_counter() - t0, 1e-7) * 1e3)  # ms
    for fn, e in zip(fns, est):
        for _ in range(min(int(warmup_ms / e), 100)):
            fn()
    want = [max(min_reps, min(int(rep_ms / e), max_reps)) for e in est]
    times: list[list[float]] = [[] for _ in fns]
    for r in range(max(want)):
        for i, fn in enumerate(fns):
            if r < want[i]:
                t0 = time.perf_counter()
                fn()
                times[i].append((time.perf_counter() - t0) * 1e3)
    return [Timing(statistics.median(t), _quantile(t, 0.2), _quantile(t, 0.8), len(t)) for t in times]


def alternate(arms, rounds: int, run_one: Callable[[str, int], dict]) -> dict[str, list[dict]]:
    """Run every arm ``rounds`` times, alternating (A B A B ...) so that a drifting machine load hits them alike:
    arm -> its results in round order. ``run_one(arm, round)`` returns a dict; an arm whose last result has an
    "error" key is not run again."""
    out: dict[str, list[dict]] = {arm: [] for arm in arms}
    for r in range(rounds):
        for arm in arms:
            if not (out[arm] and "error" in out[arm][-1]):
                out[arm].append(run_one(arm, r))
    return out


def peak_extra_mib(fn: Callable[[], object], device: str) -> float:
    """Peak bytes (MiB) torch allocated during one ``fn()`` call above what was live before it (see module doc)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak / 2**20
    return _cpu_peak_bytes(fn) / 2**20


@contextlib.contextmanager
def _quiet_fd2():
    """Silence file descriptor 2 (kineto prints a 'profiler_start/stop' line per profile from C++). Python-level
    exceptions still propagate and are reported by the caller."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile
    with _quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out  # freeing the outputs after the peak does not change the peak; it keeps the event list balanced
    # "[memory]" events carry a signed byte count (+ allocation, − free); keep the CPU ones, in time order
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and "CPU" in str(e.device_type())]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()  # + on allocation, − on free
        peak = max(peak, live)
    return peak


# ----------------------------------------------------------------------------------------------------------------------
# environment (shared by the runners' table headers and CSV rows)
# ----------------------------------------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    """The GPU's name, or the CPU model with the torch thread count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    """Short HEAD hash of the checkout the benchmarks run from (+dirty with uncommitted changes), or "unknown"."""
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent
    try:
        h = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                           timeout=10)
        if h.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=here, timeout=10).returncode != 0
        return h.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_choice(flag: str, value, allowed) -> None:
    """A runner argument that must be one of ``allowed`` (e.g. --shape)."""
    if value not in allowed:
        raise ValueError(f"--{flag} {value!r}: expected one of {sorted(allowed)}")


def check_choices(flag: str, values, allowed) -> None:
    """A runner argument whose every entry must be in ``allowed`` (e.g. --providers)."""
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"--{flag} {bad}: expected some of {list(allowed)}")


def _csv_header(path: Path):
    with open(path, newline="") as fh:
        return next(csv.reader(fh), None)


def append_csv(path, rows: list[dict], columns: list[str], *, meta: dict | None = None, suffix: str) -> Path:
    """Append ``rows`` (each merged over ``meta``; floats written as %.6g) to the CSV ``path`` with header ``columns``,
    written when the file is new or empty. ``benchmarks/results.csv`` is shared by the runners: a file holding another
    runner's columns is left alone and the rows go to ``<stem><suffix>.csv`` beside it; if that one holds other columns
    too, ValueError names it. Returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0 and _csv_header(path) != columns:
        path = path.with_name(f"{path.stem}{suffix}{path.suffix or '.csv'}")
        if path.exists() and path.stat().st_size > 0 and _csv_header(path) != columns:
            raise ValueError(f"{path}: existing CSV header is not {columns}; pass another --csv path")
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**(meta or {}), **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()}})
    return path
