"""Metrics of a run: a compact console line per step, progress bars, metrics.jsonl, optional TensorBoard, PNG curves.

Only rank 0 writes (console, files, TensorBoard); other ranks get a logger whose methods do nothing. Standard names
(cleanrl / summarize-from-feedback): ``score``, ``kl``, ``entropy``, ``clipfrac``, ``approx_kl``, ``value_loss``,
``explained_variance``, ``response_length``, ``tokens_per_s``, ``time/generate``, ``time/score``, ``time/train``,
``peak_mem_gb``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

# the order and short names of the console line; other keys follow in insertion order
_SHORT = {"loss": "loss", "score": "score", "kl": "kl", "entropy": "ent", "clipfrac": "clip", "approx_kl": "akl",
          "value_loss": "vloss", "explained_variance": "ev", "accuracy": "acc", "response_length": "len", "lr": "lr",
          "grad_norm": "gnorm", "tokens_per_s": "tok/s", "peak_mem_gb": "mem"}


def is_rank0() -> bool:
    """Whether this process writes logs, plots and progress bars (rank 0, or the only process)."""
    from fastrlhf.runtime.distributed import rank
    return rank() == 0


def explained_variance(y_pred: torch.Tensor, y_true: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """1 − Var[y − ŷ] / Var[y] over the (masked) elements; nan when Var[y] = 0 or nothing is valid. Any shape."""
    y_pred, y_true = y_pred.detach().double(), y_true.detach().double()
    m = torch.ones_like(y_true) if mask is None else mask.detach().double()
    n = m.sum()
    if n < 2:
        return float("nan")

    def var(x):  # masked population variance
        mu = (x * m).sum() / n
        return (((x - mu) ** 2) * m).sum() / n

    vy = var(y_true)
    return float("nan") if vy == 0 else float(1.0 - var(y_true - y_pred) / vy)


def peak_memory_gb(device: str | torch.device | None = None) -> float:
    """Peak allocated GPU memory since the last reset (0.0 on CPU)."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    return 0.0


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", leave: bool = False,
             disable: bool | None = None, **kw):
    """A tqdm progress bar on rank 0 (to stderr); a silent pass-through elsewhere or when tqdm is missing."""
    if disable is None:
        disable = not is_rank0() or os.environ.get("FASTRLHF_NO_PROGRESS") == "1"
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a core dependency
        disable = True
    if disable:
        return _Silent(iterable)
    return tqdm(iterable, total=total, desc=desc, leave=leave, dynamic_ncols=True, file=sys.stderr, **kw)


class _Silent:
    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else ())

    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v / 1e3:.1f}k" if abs(v) >= 10_000 else str(v)
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return f"{v:.2e}"
    if a >= 1000:
        return f"{v / 1e3:.1f}k"
    return f"{v:.4g}"


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().float().item()
    if hasattr(v, "item") and not isinstance(v, (int, float)):
        return v.item()
    return v


class MetricsLogger:
    """``log(step, {name: value})`` -> console line + ``run_dir/metrics.jsonl`` (+ TensorBoard); ``close()`` -> PNG curves.

    console_keys: the keys shown on the console line (default: the standard ones present, then up to 4 others).
    Both call styles work: ``log(step, metrics)`` and ``log(metrics, step=..., console=...)``; ``name`` = ``stage``.
    """

    def __init__(self, run_dir, *, stage: str = "", name: str = "", total_steps: int | None = None,
                 tensorboard: bool = False, console: bool = True, console_keys: Sequence[str] | None = None,
                 plots: bool = True, resume_step: int | None = None):
        """``resume_step``: continuing a run from that step: earlier rows of metrics.jsonl are kept (and plotted), rows
        of this stage after it (logged after the checkpoint by the interrupted run) are dropped."""
        stage = stage or name
        self.enabled = is_rank0()
        self.run_dir = Path(run_dir)
        self.stage, self.total_steps, self.console, self.plots = stage, total_steps, console, plots
        self.console_keys = list(console_keys) if console_keys else None
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._fh = None
        self._tb = None
        self._t0 = time.perf_counter()
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            self._truncate(int(resume_step))
        self._fh = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except Exception as e:  # tensorboard is optional
                print(f"[fastrlhf] TensorBoard disabled ({type(e).__name__}: {e}); pip install tensorboard", flush=True)

    def _truncate(self, resume_step: int) -> None:
        keep = []
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a torn last line of a killed run
                    continue
                mine = row.get("stage", "") == self.stage
                if mine and row.get("step", 0) > resume_step:
                    continue
                keep.append(line if line.endswith("\n") else line + "\n")
                if mine:
                    for k, v in row.items():
                        if k not in ("step", "time", "stage") and isinstance(v, (int, float)) and not isinstance(v, bool):
                            self.history.setdefault(k, []).append((int(row["step"]), float(v)))
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, step_or_metrics: int | dict | None = None, metrics: dict[str, Any] | None = None, *,
            step: int | None = None, echo: bool = True, console: bool | None = None) -> None:
        """Append one row; ``echo``/``console`` = False skips the console line (the row is still written)."""
        if isinstance(step_or_metrics, dict):
            metrics = step_or_metrics
        elif step_or_metrics is not None:
            step = step_or_metrics
        metrics = dict(metrics or {})
        if step is None:
            step = metrics.get("step", 0)
        metrics.pop("step", None)
        echo = echo if console is None else console
        if not self.enabled:
            return
        clean = {k: _scalar(v) for k, v in metrics.items()}
        row = {"step": int(step), "time": round(time.perf_counter() - self._t0, 3), **clean}
        if self.stage:
            row["stage"] = self.stage
        self._fh.write(json.dumps(row, allow_nan=True) + "\n")
        self._fh.flush()
        for k, v in clean.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.history.setdefault(k, []).append((int(step), float(v)))
                if self._tb is not None:
                    self._tb.add_scalar(f"{self.stage}/{k}" if self.stage else k, v, step)
        if self.console and echo:
            self._print(self.format_line(step, clean))

    def format_line(self, step: int, metrics: dict[str, Any]) -> str:
        """``[sft] step 12/100 | loss 1.234 | lr 1.00e-04 | tok/s 1.2k`` (numbers compact)."""
        keys = self.console_keys or ([k for k in _SHORT if k in metrics]
                                     + [k for k in metrics if k not in _SHORT][:4])
        head = f"[{self.stage}] " if self.stage else ""
        total = f"/{self.total_steps}" if self.total_steps else ""
        parts = [f"{head}step {step}{total}"] + [f"{_SHORT.get(k, k)} {_fmt(metrics[k])}" for k in keys if k in metrics]
        return " | ".join(parts)

    def _print(self, line: str) -> None:
        try:  # print above any active tqdm bar
            from tqdm import tqdm
            tqdm.write(line, file=sys.stdout)
        except ImportError:  # pragma: no cover
            print(line, flush=True)

    def plot(self, out_dir=None, name: str = "curves.png") -> Path | None:
        """One PNG with a small panel per numeric metric (matplotlib Agg); None when matplotlib is missing or no data."""
        if not self.enabled or not self.history:
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("[fastrlhf] plots skipped: pip install matplotlib", flush=True)
            return None
        keys = [k for k, v in self.history.items() if v]
        cols = min(4, len(keys))
        rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
        for ax, k in zip(axes.flat, keys):
            xs, ys = zip(*self.history[k])
            ax.plot(xs, ys, lw=1.2, marker="o" if len(xs) < 20 else None, ms=3)  # sparse series (eval) visible
            ax.set_title(k, fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.suptitle(f"{self.stage} metrics" if self.stage else "metrics", fontsize=10)
        fig.tight_layout()
        out = Path(out_dir) if out_dir is not None else self.run_dir
        out.mkdir(parents=True, exist_ok=True)
        path = out / (f"{self.stage}_{name}" if self.stage else name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self, plot_dir=None, *, plots: bool | None = None) -> Path | None:
        """Flush and close files; write the PNG curves (beside the checkpoint when ``plot_dir`` is given)."""
        plots = self.plots if plots is None else plots
        path = self.plot(plot_dir) if plots else None
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        return path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class Timer:
    """Accumulates wall time per phase: ``with timer("generate"): ...``; ``timer.pop()`` -> {"time/generate": s, ...}.
    Synchronizes CUDA at the edges so GPU work is counted in its phase."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    torch.cuda.synchronize()
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    torch.cuda.synchronize()
                timer.totals[name] = timer.totals.get(name, 0.0) + time.perf_counter() - self.t
                return False

        return _Phase()

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.totals.items()}
        self.totals = {}
        return out
