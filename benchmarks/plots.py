"""PNG pictures of the benchmark runners' results (``--plot PATH.png`` on each runner); matplotlib, Agg backend.

- ``generate_png``: tokens/s per provider, one group of bars per workload (fixed, realistic)
- ``phases_png``:   seconds per iteration split into its phases (stacked bars), one bar per arm
- ``memory_png``:   peak extra memory against N·V per provider (the linear log-prob memory scaling)
- ``lines_png``:    one line per series of (x, y) points, e.g. seconds per PPO iteration against response length
Each takes already-measured numbers and only draws; the title names the device and shape.
"""
from __future__ import annotations

import textwrap
from pathlib import Path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def generate_png(path, tps: dict[str, dict[str, float]], title: str, extra: dict[str, dict[str, str]] | None = None):
    """tps: {workload: {provider: tokens/s}}; extra: {workload: {provider: label under the bar}} (e.g. p50/p90 lengths).
    Grouped bars: one group per workload, one bar per provider, value printed on each bar."""
    plt = _plt()
    workloads = list(tps)
    providers = sorted({p for w in tps.values() for p in w}, key=lambda p: (not p.startswith("fastrlhf"), p))
    fig, ax = plt.subplots(figsize=(2.2 + 2.2 * len(workloads) * max(1, len(providers)) / 3, 4.2))
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        xs = [k + (i - (len(providers) - 1) / 2) * width for k, w in enumerate(workloads) if p in tps[w]]
        ys = [tps[w][p] for w in workloads if p in tps[w]]
        bars = ax.bar(xs, ys, width, label=p)
        for b, y in zip(bars, ys):
            ax.annotate(f"{y:.0f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels([w + ("\n" + "\n".join(f"{p}: {s}" for p, s in extra[w].items()) if extra and w in extra
                             else "") for w in workloads], fontsize=7)
    ax.set_ylabel("response tokens / s")
    ax.set_title(textwrap.fill(title, 60), fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def phases_png(path, phases: dict[str, dict[str, float]], title: str):
    """phases: {arm: {phase: seconds}} (phases in drawing order). Stacked bars, total printed on top."""
    plt = _plt()
    arms = list(phases)
    names = list(dict.fromkeys(k for a in arms for k in phases[a]))
    fig, ax = plt.subplots(figsize=(2.5 + 1.4 * len(arms), 4.2))
    bottom = [0.0] * len(arms)
    for name in names:
        ys = [phases[a].get(name, 0.0) for a in arms]
        ax.bar(range(len(arms)), ys, 0.6, bottom=bottom, label=name)
        bottom = [b + y for b, y in zip(bottom, ys)]
    for i, tot in enumerate(bottom):
        ax.annotate(f"{tot:.3g} s", (i, tot), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(arms)))
    ax.set_xticklabels(arms)
    ax.set_ylabel("seconds per iteration (median)")
    ax.set_title(textwrap.fill(title, 60), fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def lines_png(path, series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str,
              loglog: bool = False):
    """series: {label: [(x, y), ...]}; one line with markers per label."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, pts in series.items():
        pts = sorted(pts)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    if loglog:
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, 60), fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def memory_png(path, peak_mib: dict[tuple[str, int], float], V: int, title: str):
    """peak_mib: {(provider, N): MiB} at vocabulary V -> peak extra memory against N·V, one line per provider."""
    series: dict[str, list[tuple[float, float]]] = {}
    for (p, n), mib in peak_mib.items():
        series.setdefault(p, []).append((float(n) * V, float(mib)))
    return lines_png(path, series, title, "N·V (logit elements)", "peak extra memory (MiB)")
