"""Decoder-layer variants side by side in one run: separate vs fused projections, and torch.compile of each block.

    python -m benchmarks.run_decoder_layer [--shape tiny|smoke] [--threads 2] [--rep-ms 2000] [--compile] [--rmsnorm]

Model: the generation benchmark's Qwen2-style ``tiny`` shape (hidden 256, 4 layers, 4 / 2 heads, MLP 768, vocab 4096),
random weights, fp32. Two workloads:
- ``train``: forward + backward of the LM (logits' logsumexp summed) on [B, T] tokens, bf16 autocast as training runs;
- ``decode``: one decode step of B rows (one new token each, static KV cache of P + G slots, no grad).
Arms: ``unfused`` (q/k/v and gate/up as separate matmuls, the layout before the fusion), ``fused`` (the model's
default), and with ``--compile`` ``fused+compile`` (``torch.compile`` of every block; its compile time is printed
apart). CPU timings are interleaved round robin (``timing.bench_interleaved``) so load drift hits every arm alike; the
ratios are against ``unfused`` in the same run. Every arm is checked against ``unfused`` (max abs logit difference).
``--rmsnorm``: the CPU RMSNorm alone, fwd+bwd on [B·T, H] fp32 and a no-grad decode-sized [B, H]: ``rms_norm_ref``
(the Llama family's six ops) against torch's fused ``F.rms_norm`` (what ``kernels.rms_norm`` takes on CPU for fp32).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

from .timing import bench_interleaved

SHAPES = {
    "tiny": dict(model=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=4096), B=16, T=96, P=32, G=64),
    "smoke": dict(model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512), B=4, T=16, P=8, G=8),
}


def build(shape: str):
    from fastrlhf.models.decoder import CausalLM, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(model_type="qwen2", max_position_embeddings=1024, **SHAPES[shape]["model"])
    return CausalLM(cfg).eval()


def arms(base, with_compile: bool) -> dict:
    from fastrlhf.models.decoder import unfuse_projections

    unfused = copy.deepcopy(base)
    unfuse_projections(unfused, ["q_proj", "gate_proj"])
    out = {"unfused": unfused, "fused": base}
    if with_compile:
        comp = copy.deepcopy(base)
        for blk in comp.model.layers:
            blk.forward = torch.compile(blk.forward, dynamic=False)
        out["fused+compile"] = comp
    return out


def workloads(shape: str, device: str):
    s = SHAPES[shape]
    V = s["model"]["vocab_size"]
    ids = torch.randint(0, V, (s["B"], s["T"]), device=device)
    step = torch.randint(0, V, (s["B"], 1), device=device)

    def train(model):
        def f():
            model.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16):
                out = model(ids)
            out.float().logsumexp(-1).sum().backward()
            return out.detach()
        return f

    def decode(model):
        S = s["P"] + s["G"]
        cache = model.new_kv_cache(s["B"], S)
        mask = torch.zeros(s["B"], S, dtype=torch.long, device=device)
        mask[:, : s["P"] + 1] = 1
        pos = torch.full((s["B"], 1), s["P"], device=device)
        slot = torch.tensor([s["P"]], device=device)

        def f():
            with torch.no_grad():
                return model(step, attention_mask=mask, position_ids=pos, kv_cache=cache, cache_pos=slot)
        return f
    return {"train": train, "decode": decode}


def run(shape: str = "tiny", device: str = "cpu", with_compile: bool = False, rep_ms: float = 2000.0,
        warmup_ms: float = 200.0) -> list[dict]:
    models = arms(build(shape), with_compile)
    rows = []
    for wname, make in workloads(shape, device).items():
        fns = {a: make(m.to(device)) for a, m in models.items()}
        compile_s = {}
        outs = {}
        for a, f in fns.items():  # first call: compiles (timed apart), and the outputs to compare
            t0 = time.perf_counter()
            outs[a] = f().float()
            compile_s[a] = time.perf_counter() - t0
        tms = bench_interleaved(list(fns.values()), warmup_ms=warmup_ms, rep_ms=rep_ms, min_reps=5)
        base = tms[0].median_ms
        for (a, _), tm in zip(fns.items(), tms):
            rows.append(dict(workload=wname, arm=a, median_ms=tm.median_ms, p20_ms=tm.p20_ms, p80_ms=tm.p80_ms,
                             vs_unfused=base / tm.median_ms, first_call_s=compile_s[a],
                             max_abs_diff=(outs[a] - outs["unfused"]).abs().max().item()))
    return rows


def rmsnorm_cpu(shape: str = "tiny", rep_ms: float = 2000.0) -> list[dict]:
    import torch.nn.functional as F

    from fastrlhf.kernels import rms_norm_ref

    s = SHAPES[shape]
    H = s["model"]["hidden_size"]
    x = torch.randn(s["B"] * s["T"], H, requires_grad=True)
    w = torch.rand(H, requires_grad=True)
    g = torch.randn(s["B"] * s["T"], H)
    xd = x.detach()[: s["B"]]

    def fb(f):
        def call():
            x.grad = w.grad = None
            y = f(x)
            y.backward(g)
            return y.detach()
        return call

    def nograd(f):
        def call():
            with torch.no_grad():
                return f(xd)
        return call
    ref, fused = (lambda t: rms_norm_ref(t, w, 1e-6)), (lambda t: F.rms_norm(t, (H,), w, 1e-6))
    fns = [fb(ref), fb(fused), nograd(ref), nograd(fused)]
    diff = (fns[0]() - fns[1]()).abs().max().item()
    tms = bench_interleaved(fns, warmup_ms=200.0, rep_ms=rep_ms, min_reps=10)
    rows = []
    for i, (name, wl) in enumerate((("rms_norm_ref", "fwd+bwd"), ("F.rms_norm", "fwd+bwd"), ("rms_norm_ref", "decode"),
                                    ("F.rms_norm", "decode"))):
        base = tms[i - i % 2].median_ms
        rows.append(dict(workload=f"rmsnorm {wl}", arm=name, median_ms=tms[i].median_ms, p20_ms=tms[i].p20_ms,
                         p80_ms=tms[i].p80_ms, vs_unfused=base / tms[i].median_ms, first_call_s=0.0,
                         max_abs_diff=diff))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run_decoder_layer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rep-ms", type=float, default=2000.0, help="time budget per arm and workload")
    ap.add_argument("--compile", action="store_true", help="also torch.compile every block (compile time printed)")
    ap.add_argument("--rmsnorm", action="store_true", help="only the CPU RMSNorm: reference ops vs F.rms_norm")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = (rmsnorm_cpu(a.shape, a.rep_ms) if a.rmsnorm else run(a.shape, with_compile=a.compile, rep_ms=a.rep_ms))
    load = f"load avg {os.getloadavg()[0]:.1f} (1 min)" if hasattr(os, "getloadavg") else ""
    print(f"shape {a.shape} | threads {torch.get_num_threads()} | torch {torch.__version__} | {load}")
    print("| workload | arm | median ms | p20 | p80 | speed vs first arm | first call s | max abs diff vs first arm |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['arm']} | {r['median_ms']:.3f} | {r['p20_ms']:.3f} | {r['p80_ms']:.3f} | "
              f"{r['vs_unfused']:.3f}x | {r['first_call_s']:.2f} | {r['max_abs_diff']:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
