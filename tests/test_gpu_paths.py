"""CUDA-only code paths, checked on CPU with stand-ins where a CPU can check them.

- ``--device cuda:N``: ``resolve_device`` makes N the current CUDA device (Triton launches there);
- the engine captures its graphs on a stream of the model's device, into one shared memory pool;
- the engine's compute-dtype copies of the Linear weights: refreshed in place (same addresses), same outputs as
  autocast re-casting the fp32 weights, parameters (and the tied head) restored afterwards;
- "auto" attention takes flash-attn's KV-cache kernel for the engine's left-padded cache; a failed flash_attn import is
  said once in the log;
- bitsandbytes' AdamW8bit gets ``make_adamw``'s parameter groups (norm gains and biases not decayed).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import types

import pytest
import torch

from fastrlhf.engine import hybrid
from fastrlhf.engine.hybrid import HybridEngine, _StepKey
from fastrlhf.engine.sampling import SamplingParams
from fastrlhf.models import attention
from fastrlhf.models.hf_io import load_model
from fastrlhf.runtime import device as devmod
from fastrlhf.runtime.optim import adamw_groups, make_adamw
from tests.helpers.models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("gpu_paths"), family="qwen2", tie=True, seed=7)


def _fake_cuda(monkeypatch, n_devices=2):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_devices)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    return calls


def test_cuda_n_becomes_the_current_device(monkeypatch):
    calls = _fake_cuda(monkeypatch)
    assert devmod.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert calls == [("set_device", 1)]
    calls.clear()
    assert devmod.resolve_device("cuda") == torch.device("cuda")  # the current device: nothing to set
    assert devmod.resolve_device("cpu") == torch.device("cpu")
    assert calls == []
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        devmod.resolve_device("cuda:2")


def test_capture_uses_the_model_device_and_one_pool(monkeypatch, ckpt):
    model = load_model(ckpt)
    eng = HybridEngine(model, cuda_graphs=False)
    with eng.generation():
        eng.generate([[5, 6, 7]], max_new_tokens=2, temperature=0)  # buffers + cache on CPU
    eng.device = torch.device("cuda", 1)  # as if the model lived on GPU 1 (the CUDA calls below are stand-ins)
    seen = {"streams": [], "current": [], "pools": [], "sync": []}

    class Stream:
        def __init__(self, device=None):
            seen["streams"].append(device)

        def wait_stream(self, other):
            pass

    class Graph:
        pass

    @contextlib.contextmanager
    def graph(g, pool=None, **kw):
        seen["pools"].append(pool)
        yield

    handles = iter(range(100))
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: seen["current"].append(device) or Stream(device))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool", next(handles)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: seen["sync"].append(device))
    b = next(iter(eng._buffers))
    for t in eng.cache.k + eng.cache.v:  # a capture mid-rollout (compaction) must leave the cache as it was
        t.normal_()
    kv = [t.clone() for t in eng.cache.k + eng.cache.v]
    for temp in (0.0, 1.0):  # two graphs (two sampling settings)
        eng._capture(_StepKey(b, SamplingParams(temp, 0, 1.0), (), 0))
    assert all(torch.equal(t, s) for t, s in zip(eng.cache.k + eng.cache.v, kv))
    assert seen["streams"] and all(d == torch.device("cuda", 1) for d in seen["streams"])
    assert seen["current"] and all(d == torch.device("cuda", 1) for d in seen["current"])
    assert seen["sync"] == [torch.device("cuda", 1)] * 2
    assert seen["pools"] == [("pool", 0), ("pool", 0)]  # one pool, shared by both graphs
    eng.free()
    assert eng._pool is None


def _greedy(eng, prompts, n=6):
    with eng.generation():
        return eng.generate(prompts, max_new_tokens=n, temperature=0, seed=0)


def test_weight_copies_refreshed_in_place_same_outputs(ckpt):
    model = load_model(ckpt)  # fp32 master weights, tied head
    prompts = [[5, 6, 7, 8], [9, 10]]
    eng = HybridEngine(model, compute_dtype=torch.bfloat16)  # CPU: eager decode under bf16 autocast
    plain = HybridEngine(model, compute_dtype=torch.bfloat16)
    plain._lowp = None  # autocast re-casting the fp32 weights, as before
    assert eng._lowp is not None
    a, ref = _greedy(eng, prompts), _greedy(plain, prompts)
    assert torch.equal(a.response_ids, ref.response_ids) and torch.equal(a.logprobs, ref.logprobs)
    head = model.lm_head
    assert head.weight is model.model.embed_tokens.weight and head.weight.dtype == torch.float32  # restored, tied
    copies = dict(eng._lowp)
    assert head in copies and len(copies) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    ptrs = {m: c.data_ptr() for m, c in copies.items()}
    with torch.no_grad():  # a training step changes the masters in place
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b, ref2 = _greedy(eng, prompts), _greedy(plain, prompts)
    assert torch.equal(b.response_ids, ref2.response_ids) and torch.equal(b.logprobs, ref2.logprobs)
    assert not torch.equal(b.logprobs, a.logprobs)  # the new weights were used
    for m, c in eng._lowp.items():
        assert c.data_ptr() == ptrs[m]  # same addresses: captured graphs stay valid
        assert torch.equal(c, m.weight.detach().to(torch.bfloat16))  # refreshed from the masters
    assert eng.cache.left_padded


def test_no_copies_without_a_lower_compute_dtype(ckpt):
    model = load_model(ckpt)
    assert HybridEngine(model)._lowp is None
    assert HybridEngine(model, compute_dtype=torch.float32)._lowp is None


def test_auto_attention_takes_flash_kv_cache_for_a_left_padded_cache(monkeypatch):
    monkeypatch.setattr(attention, "HAVE_FLASH", True)
    monkeypatch.setattr(attention, "HAVE_FLASH_LEFTPAD", True)
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    assert attention.resolve_impl("auto", cuda, bf16, kv_cache=True, left_padded_cache=True) == "flash"
    assert attention.resolve_impl("auto", cuda, bf16, kv_cache=True) == "sdpa"  # arbitrary slot masks
    assert attention.resolve_impl("auto", torch.device("cpu"), bf16, kv_cache=True, left_padded_cache=True) == "sdpa"
    monkeypatch.setattr(attention, "HAVE_FLASH_LEFTPAD", False)  # flash-attn < 2.6: no cache_leftpad
    assert attention.resolve_impl("auto", cuda, bf16, kv_cache=True, left_padded_cache=True) == "sdpa"


def test_failed_flash_import_is_said_once(monkeypatch, caplog):
    monkeypatch.setattr(attention, "HAVE_FLASH", False)
    monkeypatch.setattr(attention, "FLASH_IMPORT_ERROR", "ImportError: undefined symbol _ZN3c10")
    monkeypatch.setattr(attention, "_told_no_flash", False)
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        for _ in range(3):
            assert attention.resolve_impl("auto", torch.device("cuda"), torch.bfloat16) == "sdpa"
        attention.resolve_impl("auto", torch.device("cpu"), torch.float32)
    msgs = [r.getMessage() for r in caplog.records if r.name == attention.__name__]
    assert len(msgs) == 1 and "undefined symbol" in msgs[0] and "SDPA" in msgs[0]


def test_adamw8bit_gets_the_no_decay_groups(monkeypatch, ckpt):
    made = {}

    class AdamW8bit:
        def __init__(self, params, **kw):
            made["params"], made["kw"] = params, kw

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    from fastrlhf.stages.ppo import make_optimizer
    model = load_model(ckpt)
    make_optimizer(model, kind="adamw8bit", lr=1e-5, weight_decay=0.1)
    ref = make_adamw(model, lr=1e-5, weight_decay=0.1)
    got = made["params"]
    assert [g["weight_decay"] for g in got] == [g["weight_decay"] for g in ref.param_groups] == [0.1, 0.0]
    for g, r in zip(got, ref.param_groups):
        assert [id(p) for p in g["params"]] == [id(p) for p in r["params"]]
    assert all(p.dim() == 1 for p in got[1]["params"]) and got[1]["params"]  # norm gains (and biases) undecayed
    assert made["kw"]["betas"] == ref.defaults["betas"] and made["kw"]["eps"] == ref.defaults["eps"]
    assert adamw_groups(model, 0.1)[0]["params"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: graphs over the weight copies")
def test_cuda_graphs_over_weight_copies_match_autocast(ckpt):
    """On the GPU: graph-captured decoding reading the bf16 copies gives autocast's tokens, before and after the fp32
    masters change in place (the copies are refreshed without re-capture), and both graphs share one pool."""
    model = load_model(ckpt, device=devmod.resolve_device("cuda:0"))
    prompts = [[5, 6, 7, 8], [9, 10], [11]]
    eng = HybridEngine(model, compute_dtype=torch.bfloat16, cuda_graphs=True)
    plain = HybridEngine(model, compute_dtype=torch.bfloat16, cuda_graphs=True)
    plain._lowp = None
    for step in range(2):
        a, ref = _greedy(eng, prompts, 8), _greedy(plain, prompts, 8)
        assert torch.equal(a.response_ids, ref.response_ids)
        torch.testing.assert_close(a.logprobs, ref.logprobs, rtol=0, atol=1e-5)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    with eng.generation():
        eng.generate(prompts, max_new_tokens=4, temperature=1.0, seed=1)  # a second graph (sampling)
    assert eng.stats["captures"] == 2 and eng._pool is not None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compaction across captured buckets")
def test_cuda_graph_compaction_equals_no_compaction(ckpt):
    """On the GPU with graphs: rows ending at different steps move through smaller buckets (graphs captured mid-
    rollout) and give the rollout of the same engine without compaction (greedy: tokens; sampling: tokens and
    log-probs)."""
    model = load_model(ckpt, device=devmod.resolve_device("cuda:0"))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 160, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (12,), generator=g)]
    eos = list(range(100, 110))
    on = HybridEngine(model, cuda_graphs=True, check_every=1)
    off = HybridEngine(model, cuda_graphs=True, check_every=1, compact=False)
    for temp in (0.0, 1.0):
        kw = dict(max_new_tokens=40, temperature=temp, eos_token_id=eos, pad_token_id=0, seed=5)
        with on.generation():
            a = on.generate(prompts, **kw)
        with off.generation():
            b = off.generate(prompts, **kw)
        assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.lengths, b.lengths)
        torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-5)
    assert on.stats["compactions"] >= 1 and off.stats["compactions"] == 0
