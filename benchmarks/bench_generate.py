"""pytest-benchmark at the ``smoke`` shape: HybridEngine.generate beside transformers' generate on the same random model.

    python -m pytest benchmarks/bench_generate.py            (--benchmark-disable: checks only)

Each test checks before it times, so it can fail: greedy decoding of the engine must equal transformers' greedy
``generate`` token for token on the same weights, and sampled rollouts must be well formed (G tokens, ids in range,
finite log-probs ≤ 0). The CPU timings here are smoke numbers (few rounds, shared machine); the runner
``benchmarks.run_generate`` is the benchmark.
"""
from __future__ import annotations

import pytest
import torch

from fastrlhf.engine.hybrid import HybridEngine

from .run_generate import SHAPES, build_models

ROUNDS = dict(rounds=3, iterations=1, warmup_rounds=1)
SHAPE = SHAPES["smoke"]
B, P, G = SHAPE["B"], SHAPE["P"], SHAPE["G"]
V = SHAPE["model"]["vocab_size"]


@pytest.fixture(scope="module")
def models():
    hf, ours = build_models("smoke", "cpu", torch.float32, seed=0)
    ids = torch.randint(0, V - 2, (B, P), generator=torch.Generator().manual_seed(1))
    return hf, ours, ids


def _hf(hf, ids, **kw):
    with torch.no_grad():
        return hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=G, min_new_tokens=G,
                           pad_token_id=V - 2, **kw)[:, P:]


def test_generate_fastrlhf(benchmark, models):
    hf, ours, ids = models
    eng = HybridEngine(ours)
    with eng.generation(max_batch_size=B, max_seq_len=P + G):
        greedy = eng.generate(ids, max_new_tokens=G, temperature=0)
        assert torch.equal(greedy.response_ids, _hf(hf, ids, do_sample=False, top_k=None, top_p=None, temperature=None))
        r = benchmark.pedantic(lambda: eng.generate(ids, max_new_tokens=G, temperature=1.0, seed=0), **ROUNDS)
    assert r.response_ids.shape == (B, G) and bool((r.response_mask == 1).all())
    assert int(r.response_ids.min()) >= 0 and int(r.response_ids.max()) < V
    assert bool(torch.isfinite(r.logprobs).all()) and bool((r.logprobs <= 0).all())


def test_generate_hf_dynamic(benchmark, models):
    hf, _, ids = models
    out = benchmark.pedantic(lambda: _hf(hf, ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0), **ROUNDS)
    assert out.shape == (B, G)
