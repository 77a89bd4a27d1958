"""Generation benchmark: fastrlhf's HybridEngine beside transformers' ``generate`` on the same random model, in one run.

    python -m benchmarks.run_generate [--shape tiny|qwen2-0.5b|smoke] [--runs 5] [--threads 2] [--csv benchmarks/results.csv]
                                  [--workload fixed [realistic]] [--plot PATH.png]
    fastrlhf bench generate ...            (the CLI calls ``main(argv)``)

Shapes (docs/benchmarks.md): ``tiny`` (CPU default) = Qwen2-style hidden 256, 4 layers, 4 heads / 2 KV, MLP 768, vocab 4096,
tied; batch 16, prompt 32, 64 new tokens, fp32. ``qwen2-0.5b`` (CUDA default) = hidden 896, 24 layers, 14 heads / 2 KV,
MLP 4864, vocab 151936, tied; batch 64, prompt 128, 256 new tokens, bf16. ``smoke``: seconds, for the runner's own test.
All providers sample at temperature 1 (top-k/top-p off). Workloads (``benchmarks/workload.py``; several run in turn):
- ``fixed`` (default): every prompt P tokens, exactly G new tokens (no EOS stop; transformers gets ``min_new_tokens=G``),
  so every provider does the same work;
- ``realistic``: prompt lengths uniform over [⌈P/8⌉, P] (left-padded), and the checkpoint carries a per-step EOS
  probability 1 − 0.5^(4/G) in its weights (median response G/4, p90 ≈ 0.83·G, capped at G); every provider stops a
  row at EOS. The providers sample with their own random streams from the same model, so they get the same length
  distribution, not the same rows; each call is seeded by its index (fastrlhf: ``seed``, transformers:
  ``torch.manual_seed``), so reruns give the same lengths. ``resp_len_p50/p90`` and ``pad_frac`` show what each got.

Providers:
- ``fastrlhf``     HybridEngine (static KV cache; CUDA: decode step captured as CUDA graphs), ``memory_policy="keep"``
- ``fastrlhf-compile``  CPU only: the same with ``compile_step=True`` (the eager decode step through torch.compile;
                   its compile time is in ``setup_s``). On CUDA the graphs already remove the per-op overhead.
- ``fastrlhf-nocompact``  the engine with ``compact=False`` (finished rows keep their batch rows, attention reads every
                   cache slot): what compaction saves (not run by default)
- ``fastrlhf-noonednn``  CPU only: the engine with ``onednn=False`` (``F.linear``'s BLAS for the decode GEMMs instead
                   of oneDNN with packed weights): what the GEMM backend gives (not run by default)
- ``hf-dynamic``   transformers ``generate`` with its default dynamic cache
- ``hf-static``    transformers ``generate(cache_implementation="static")`` (on CUDA transformers also compiles the
                   forward with torch.compile automatically: that is the "+ compile" baseline of docs/benchmarks.md)

Metrics (median of ``--runs`` timed runs after a warm-up, interleaved across providers so that load drift on a shared
machine hits all alike; B batch, P prompt, G new tokens):
- ``tokens_per_s``   valid response tokens (EOS included; B·G on the fixed workload) / time of one full generate call,
                     median over calls
- ``prefill_tok_s``  prompt tokens / (time of a generate call with 1 new token: prefill + first sample)
- ``decode_tok_s``   (valid response tokens − B) / (full call − 1-token call)
- ``resp_len_p50`` / ``resp_len_p90``  response lengths over the timed calls
- ``pad_frac``       share of the returned [B, prompt width + response width] grid that is padding (median over calls)
- ``decode_row_steps``  fastrlhf: batch rows × decode steps run per full call (B·(G−1) without compaction; with it,
                     the rows of the bucket each step ran in) — a count, independent of machine load
- ``setup_s``        first call − steady-state call (fastrlhf: cache allocation + graph capture; hf-static: compile)
- ``capture_s``      fastrlhf on CUDA: time spent capturing graphs
- ``switch_ms``      fastrlhf: leaving ``generation()`` for training and entering it again (cache kept), per round trip
- ``peak_mib``       memory allocated by torch during a first ``with generation(): generate`` / a generate call above what
                     was live before (CUDA: ``torch.cuda.max_memory_allocated``; CPU: torch's CPU allocator events via
                     the profiler, ``benchmarks.timing.peak_extra_mib`` — not a process RSS)
Prints a table (device named, load average on CPU) and appends one CSV row per measurement
(columns ``CSV_COLUMNS``).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from .timing import append_csv, check_choice, check_choices, device_name, git_commit
from .workload import WORKLOADS

CSV_COLUMNS = ["date", "device", "bench", "shape", "provider", "metric", "median", "unit", "torch", "commit"]
DEFAULT_CSV = Path(__file__).resolve().parent / "results.csv"
PROVIDERS = ("fastrlhf", "fastrlhf-compile", "hf-dynamic", "hf-static", "fastrlhf-nocompact", "fastrlhf-noonednn")

# model: Qwen2 config fields; run: batch B, prompt P, new tokens G
SHAPES = {
    "tiny": dict(model=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=4096), B=16, P=32, G=64),
    "qwen2-0.5b": dict(model=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                  num_key_value_heads=2, vocab_size=151936), B=64, P=128, G=256),
    "smoke": dict(model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512), B=4, P=8, G=16),
}


def build_models(shape: str, device: str, dtype: torch.dtype, seed: int = 0, workload: str = "fixed"):
    """(hf_model, fastrlhf_model): one random Qwen2 checkpoint, loaded by both (same weights). ``realistic``: the EOS
    hazard of ``benchmarks.workload`` is built into the weights before saving."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from fastrlhf.models.hf_io import load_model
    m = SHAPES[shape]["model"]
    V = m["vocab_size"]
    cfg = Qwen2Config(**m, max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=V - 2,
                      eos_token_id=V - 1, bos_token_id=V - 1)
    torch.manual_seed(seed)
    hf = Qwen2ForCausalLM(cfg).eval()
    if workload == "realistic":
        from .workload import eos_hazard, install_eos_hazard
        install_eos_hazard(hf, V - 1, eos_hazard(SHAPES[shape]["G"]), seed=seed)
    with tempfile.TemporaryDirectory(prefix="fastrlhf_bench_gen_") as d:
        hf.save_pretrained(d)
        ours = load_model(d, dtype=dtype, device=device)
    hf = hf.to(device=device, dtype=dtype).eval()
    return hf, ours


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _peak_mib(fn, device: str) -> float:
    from .timing import peak_extra_mib
    return peak_extra_mib(fn, device)


def run(shape: str | None = None, device: str | None = None, runs: int = 5, providers=PROVIDERS[:4], seed: int = 0,
        workload: str = "fixed"):
    """Measure every provider; returns (rows [dict(provider, metric, median, unit)], info dict). Prints nothing."""
    from fastrlhf.engine.hybrid import HybridEngine
    from .workload import check_workload, length_stats, make_prompts, pad_fraction, response_lengths
    check_workload(workload)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = shape or ("qwen2-0.5b" if device == "cuda" else "tiny")
    check_choice("shape", shape, SHAPES)
    check_choices("providers", providers, PROVIDERS)
    if runs < 3:
        raise ValueError(f"--runs {runs}: at least 3 (medians)")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    S = SHAPES[shape]
    B, P, G = S["B"], S["P"], S["G"]
    V = S["model"]["vocab_size"]
    realistic = workload == "realistic"
    eos = V - 1 if realistic else None
    hf, ours = build_models(shape, device, dtype, seed, workload)
    g = torch.Generator().manual_seed(seed + 1)
    prompts = make_prompts(B, P, V, workload, g)
    plen = [len(p) for p in prompts]
    Pw = max(plen)  # left-padded width
    ids = torch.tensor([[V - 2] * (Pw - len(p)) + p for p in prompts]).to(device)
    att = torch.tensor([[0] * (Pw - len(p)) + [1] * len(p) for p in prompts]).to(device)
    rows: list[dict] = []

    def add(provider, metric, value, unit):
        rows.append(dict(provider=provider, metric=metric, median=float(value), unit=unit))

    # 1. set-up of every provider: first call (set-up included), then warm both call shapes
    calls: dict[str, tuple] = {}  # provider -> (gen_full, gen_one)
    first: dict[str, float] = {}
    engines: dict[str, HybridEngine] = {}
    stack = contextlib.ExitStack()
    kw = dict(temperature=1.0, top_k=0, top_p=1.0, eos_token_id=eos)
    n_calls: dict[str, int] = {}  # provider -> generate calls so far: the seed of the next call (realistic)

    def next_seed(provider):
        n_calls[provider] = n_calls.get(provider, 0) + 1
        return n_calls[provider] if realistic else 0

    def hf_gen(n, provider="hf", **extra):
        stop = dict(eos_token_id=eos) if realistic else dict(min_new_tokens=n)
        if realistic:
            torch.manual_seed(10_000 + next_seed(provider))
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=att, max_new_tokens=n, do_sample=True, temperature=1.0,
                              top_k=0, top_p=1.0, pad_token_id=V - 2, **stop, **extra)
        return response_lengths(out[:, Pw:].cpu(), eos).tolist()

    def ours_gen(e, provider, n):
        r = e.generate(ids, attention_mask=att, max_new_tokens=n, seed=next_seed(provider), **kw)
        return r.lengths.tolist()

    with stack:
        for provider in providers:
            if provider in ("fastrlhf-compile", "fastrlhf-noonednn") and device == "cuda":
                continue  # on CUDA the graphs already remove the per-op overhead; oneDNN is a CPU library
            if provider == "fastrlhf":
                # peak memory of a first rollout from scratch (cache + buffers + graphs), on a throw-away engine
                def first_rollout():
                    e = HybridEngine(ours, memory_policy="free")
                    with e.generation(max_batch_size=B, max_seq_len=Pw + G):
                        return e.generate(ids, attention_mask=att, max_new_tokens=G, seed=0, **kw)
                add(provider, "peak_mib", _peak_mib(first_rollout, device), "MiB")
            if provider == "hf-dynamic":
                add(provider, "peak_mib", _peak_mib(lambda: hf_gen(G), device), "MiB")
            t0 = time.perf_counter()
            if provider.startswith("fastrlhf"):
                eng = engines[provider] = HybridEngine(ours, memory_policy="keep",
                                                       compile_step=provider == "fastrlhf-compile",
                                                       compact=provider != "fastrlhf-nocompact",
                                                       onednn=False if provider == "fastrlhf-noonednn" else "auto")
                stack.enter_context(eng.generation(max_batch_size=B, max_seq_len=Pw + G))
                full = (lambda e, p: lambda: ours_gen(e, p, G))(eng, provider)
                one = (lambda e, p: lambda: ours_gen(e, p, 1))(eng, provider)
            else:
                extra = dict(cache_implementation="static") if provider == "hf-static" else {}
                full = (lambda x, p: lambda: hf_gen(G, p, **x))(extra, provider)
                one = (lambda x, p: lambda: hf_gen(1, p, **x))(extra, provider)
            full()
            _sync(device)
            first[provider] = time.perf_counter() - t0
            one()
            calls[provider] = (full, one)
        # 2. timed runs, interleaved across providers (run r of every provider, then run r+1, ...) so that a change
        #    in machine load during the run hits every provider alike
        t_full = {p: [] for p in calls}
        t_one = {p: [] for p in calls}
        lens = {p: [] for p in calls}  # response lengths of every timed full call, per provider
        row_steps0 = {p: e.stats["row_steps"] for p, e in engines.items()}
        for _ in range(runs):
            for p, (full, one) in calls.items():
                res = []
                t_full[p].append(_timed(lambda: res.append(full()), device))
                lens[p].append(res[0])
                t_one[p].append(_timed(one, device))
    # 3. metrics (tokens = valid response tokens, EOS included; fixed workload: B·G per call)
    row_steps = {p: (e.stats["row_steps"] - row_steps0[p]) / runs for p, e in engines.items()}
    for p in calls:
        tf, to = statistics.median(t_full[p]), statistics.median(t_one[p])
        ntok = [sum(x) for x in lens[p]]
        add(p, "tokens_per_s", statistics.median(n / t for n, t in zip(ntok, t_full[p])), "tok/s")
        add(p, "prefill_tok_s", sum(plen) / to, "tok/s")
        add(p, "decode_tok_s", (statistics.median(ntok) - B) / max(tf - to, 1e-9), "tok/s")
        st = length_stats([n for x in lens[p] for n in x])
        add(p, "resp_len_p50", st["median"], "tok")
        add(p, "resp_len_p90", st["p90"], "tok")
        add(p, "pad_frac", statistics.median(pad_fraction(plen, x, Pw + max(x)) for x in lens[p]), "frac")
        if p in row_steps:  # batch rows × decode steps the engine ran per full call (what compaction cuts)
            add(p, "decode_row_steps", row_steps[p], "rows·steps")
        if p != "hf-dynamic":
            add(p, "setup_s", max(first[p] - tf, 0.0), "s")
        if p in engines and device == "cuda":
            add(p, "capture_s", engines[p].stats["capture_s"], "s")
        if p == "fastrlhf-compile":
            add(p, "compile_s", engines[p].stats["compile_s"], "s")
    if "fastrlhf" in engines:  # generation -> training -> generation round trip, cache kept
        eng = engines["fastrlhf"]
        ours.train()
        sw = []
        cm = eng.generation(max_batch_size=B, max_seq_len=Pw + G)
        cm.__enter__()
        for _ in range(max(runs, 10)):
            _sync(device)
            t = time.perf_counter()
            cm.__exit__(None, None, None)
            cm = eng.generation(max_batch_size=B, max_seq_len=Pw + G)
            cm.__enter__()
            _sync(device)
            sw.append(time.perf_counter() - t)
        cm.__exit__(None, None, None)
        add("fastrlhf", "switch_ms", 1e3 * statistics.median(sw), "ms")
    for e in engines.values():
        e.free()

    # speed-up of fastrlhf end to end over each baseline, same run
    tps = {r["provider"]: r["median"] for r in rows if r["metric"] == "tokens_per_s"}
    for ours_p in ("fastrlhf", "fastrlhf-compile", "fastrlhf-nocompact", "fastrlhf-noonednn"):
        for p in ("hf-dynamic", "hf-static"):
            if ours_p in tps and p in tps:
                add(ours_p, f"speedup_vs_{p}", tps[ours_p] / tps[p], "x")
    info = dict(device=device, shape=shape, dtype=str(dtype).replace("torch.", ""), B=B, P=P, G=G, runs=runs,
                workload=workload, prompt_tokens=sum(plen))
    return rows, info


def format_table(rows: list[dict]) -> str:
    heads = ["provider", "metric", "median", "unit"]
    cells = [[r["provider"], r["metric"], f"{r['median']:.4g}", r["unit"]] for r in rows]
    w = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    line = lambda vals: "| " + " | ".join(v.ljust(w[i]) for i, v in enumerate(vals)) + " |"  # noqa: E731
    return "\n".join([line(heads), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(c) for c in cells])


def write_csv(path: Path, rows: list[dict], meta: dict, suffix: str = "_generate") -> Path:
    """Append rows to ``path`` (``timing.append_csv``: another runner's file is left alone, rows go beside it)."""
    return append_csv(path, rows, CSV_COLUMNS, meta=meta, suffix=suffix)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run_generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: qwen2-0.5b on CUDA, tiny on CPU")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--providers", nargs="+", default=[p for p in PROVIDERS if p not in ("fastrlhf-nocompact",
                                                                                       "fastrlhf-noonednn")],
                    choices=list(PROVIDERS))
    ap.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median; >= 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the reference CPU runs: 2)")
    ap.add_argument("--csv", default=str(DEFAULT_CSV), help="CSV to append rows to (default: %(default)s)")
    ap.add_argument("--no-csv", action="store_true", help="print only")
    ap.add_argument("--workload", nargs="+", default=["fixed"], choices=list(WORKLOADS),
                    help="fixed: P-token prompts, exactly G new tokens; realistic: prompt lengths over P/8..P, EOS "
                         "hazard built into the weights (benchmarks/workload.py). Several: run each in turn")
    ap.add_argument("--plot", default=None, metavar="PATH.png", help="draw tokens/s per provider and workload")
    ap.add_argument("--floor", action="store_true", help="also time the generation's GEMM floor in this run "
                    "(benchmarks/run_floor.py, decode as chains) and print what it leaves against transformers' "
                    "generate (hf-dynamic, else hf-static)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    tps: dict[str, dict[str, float]] = {}
    lens: dict[str, dict[str, str]] = {}
    for workload in dict.fromkeys(a.workload):
        rows, info = run(a.shape, a.device, a.runs, tuple(a.providers), workload=workload)
        shape_col = info["shape"] + ("" if workload == "fixed" else f"/{workload}")
        meta = dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    device=device_name(info["device"]), bench="generate", shape=shape_col, torch=torch.__version__,
                    commit=git_commit())
        load = f" | load avg {os.getloadavg()[0]:.1f} (1 min)" if hasattr(os, "getloadavg") else ""
        wl = ("fixed workload: every prompt P tokens, exactly G new tokens" if workload == "fixed" else
              f"realistic workload: prompt lengths uniform over [{max(1, -(-info['P'] // 8))}, {info['P']}] "
              f"({info['prompt_tokens']} prompt tokens), EOS hazard 1-0.5^(4/G) in the weights")
        print(f"device: {meta['device']} | torch {meta['torch']} | commit {meta['commit']} | shape {info['shape']} "
              f"(B={info['B']}, P={info['P']}, G={info['G']}, {info['dtype']}, sampling T=1) | {wl} | "
              f"median of {info['runs']}{load}")
        print(format_table(rows))
        get = lambda p, m: next((r["median"] for r in rows if r["provider"] == p and r["metric"] == m), None)  # noqa
        tps[workload] = {r["provider"]: r["median"] for r in rows if r["metric"] == "tokens_per_s"}
        lens[workload] = {p: f"p50 {get(p, 'resp_len_p50'):.0f}/p90 {get(p, 'resp_len_p90'):.0f}"
                          for p in tps[workload]} if workload != "fixed" else {}
        if a.floor:
            from .run_floor import floor_note, floor_of
            fl = floor_of(info["shape"], "ppo", workload, info["device"], getattr(torch, info["dtype"]))
            peer = tps[workload].get("hf-dynamic", tps[workload].get("hf-static"))  # transformers' generate
            print(floor_note(fl, "generation", peer=peer, ours=tps[workload].get("fastrlhf"), rate=True))
        if not a.no_csv:
            used = write_csv(Path(a.csv), rows, meta)
            print(f"appended {len(rows)} rows to {used}")
    if a.plot:
        from .plots import generate_png
        out = generate_png(a.plot, tps, f"generation, {meta['device']}, shape {info['shape']} (B={info['B']}, "
                           f"P={info['P']}, G={info['G']})", extra=lens)
        print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
