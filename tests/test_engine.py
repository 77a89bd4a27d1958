"""HybridEngine and sampling: greedy parity with transformers, sampling log-probs, EOS handling, mode switching, cache reuse.

Models are tiny random checkpoints (tests/helpers/models.py), fp32 on CPU. Tolerance for log-probs: 1e-4 absolute. The
engine computes them from KV-cached decode steps, the reference from one full teacher-forced forward; the two differ only
in the order of fp32 sums (attention over cache slots vs a causal mask, [1]-row vs [T]-row matmuls). At these sizes
(logits |z| < ~20, H = 32) the observed difference is ~1e-6; 1e-4 is ~100 fp32 ulps of log-probs of magnitude ~5 and
still far below what any indexing error (a wrong token or position changes a log-prob by O(1)) would produce.
"""
from __future__ import annotations

import pytest
import torch

from fastrlhf.engine.hybrid import HybridEngine, Rollout
from fastrlhf.kernels import logprobs_from_logits_ref, onednn_linear
from fastrlhf.models.hf_io import load_model
from fastrlhf.engine.sampling import SamplingParams, filter_logits, sample
from tests.helpers.models import EOS_ID, PAD_ID, make_tiny_checkpoint

ATOL_LOGP = 1e-4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("engine"), family="qwen2", tie=True, seed=1234)


@pytest.fixture
def model(ckpt):
    return load_model(ckpt)


def ragged_prompts(n=5, lo=1, hi=9, V=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    lens[0], lens[-1] = lo, hi  # shortest and longest both present
    return [torch.randint(4, V, (L,), generator=g).tolist() for L in lens]


def teacher_forced_logits(model, r: Rollout) -> torch.Tensor:
    """Logits [B, G, V] predicting each response token, from one full forward over prompt + response."""
    ids, mask = r.sequences()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)  # [B, P+G, V]
    P = r.prompt_ids.shape[1]
    return logits[:, P - 1:-1].double()


def reference_greedy(model, prompts, G, eos=None):
    """Greedy decoding one row at a time with a full forward per token (no cache, no padding): the plain definition.
    eos: an id or a list of ids."""
    out = []
    with torch.no_grad():
        for p in prompts:
            ids, gen = torch.tensor([p]), []
            for _ in range(G):
                nxt = int(model(ids)[0, -1].argmax())
                gen.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
                if nxt == eos or (isinstance(eos, (list, tuple)) and nxt in eos):
                    break
            out.append(gen)
    return out


# ---------------------------------------------------------------------------------------------------- parity with HF
@pytest.mark.parametrize("family,tie", [("qwen2", True), ("llama", False)])
def test_greedy_matches_transformers_generate(tmp_path, family, tie):
    from transformers import AutoModelForCausalLM
    path = make_tiny_checkpoint(tmp_path, family=family, tie=tie, seed=7)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ours = load_model(path)
    prompts = ragged_prompts(6, seed=3)
    eng = HybridEngine(ours)
    G = 20
    with eng.generation():
        free = eng.generate(prompts, max_new_tokens=G, temperature=0, pad_token_id=PAD_ID)
    # pick an EOS that row 0 emits at step 4 (so at least one row stops early, others may run on)
    eos = int(free.response_ids[0, 4])
    with eng.generation():
        r = eng.generate(prompts, max_new_tokens=G, temperature=0, eos_token_id=eos, pad_token_id=PAD_ID)
    with torch.no_grad():
        out = hf.generate(input_ids=r.prompt_ids, attention_mask=r.prompt_mask, max_new_tokens=G, do_sample=False,
                          eos_token_id=eos, pad_token_id=PAD_ID, top_k=None, top_p=None, temperature=None)
    P = r.prompt_ids.shape[1]
    hf_resp = out[:, P:]
    assert free.response_ids.shape == (6, G)
    assert r.response_ids.shape == hf_resp.shape
    assert torch.equal(r.response_ids, hf_resp)
    assert int(r.lengths[0]) == int((free.response_ids[0] == eos).nonzero()[0]) + 1 <= 5
    # and the plain definition, row by row without padding
    ref = reference_greedy(ours, prompts, G, eos=eos)
    for i, row in enumerate(ref):
        assert r.response_ids[i, :len(row)].tolist() == row
        assert int(r.lengths[i]) == len(row)


# ---------------------------------------------------------------------------------------------------- sampling
def test_seed_determinism(model):
    eng = HybridEngine(model)
    prompts = ragged_prompts(4, seed=1)
    with eng.generation():
        a = eng.generate(prompts, max_new_tokens=12, temperature=1.0, seed=11)
        b = eng.generate(prompts, max_new_tokens=12, temperature=1.0, seed=11)
        c = eng.generate(prompts, max_new_tokens=12, temperature=1.0, seed=12)
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)
    # a different seed must not only permute: most positions differ for a high-entropy random model
    assert (a.response_ids != c.response_ids).float().mean() > 0.5


def test_top_k1_and_tiny_top_p_equal_greedy(model):
    eng = HybridEngine(model)
    prompts = ragged_prompts(5, seed=2)
    with eng.generation():
        greedy = eng.generate(prompts, max_new_tokens=10, temperature=0)
        k1 = eng.generate(prompts, max_new_tokens=10, temperature=0.7, top_k=1, seed=3)
        p0 = eng.generate(prompts, max_new_tokens=10, temperature=1.3, top_p=1e-6, seed=4)
    assert torch.equal(k1.response_ids, greedy.response_ids)
    assert torch.equal(p0.response_ids, greedy.response_ids)
    # one token kept -> renormalised probability 1 -> log-prob 0
    assert k1.logprobs.abs().max() < 1e-6 and p0.logprobs.abs().max() < 1e-6


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 20, 1.0),
                                                     (0.9, 0, 0.8), (1.2, 30, 0.9)])
def test_logprobs_match_teacher_forced(model, temperature, top_k, top_p):
    eng = HybridEngine(model)
    prompts = ragged_prompts(6, seed=5)
    with eng.generation():
        r = eng.generate(prompts, max_new_tokens=16, temperature=temperature, top_k=top_k, top_p=top_p, seed=9)
    logits = teacher_forced_logits(model, r)  # [B, G, V] float64
    B, G, V = logits.shape
    if temperature == 0:
        ref = logprobs_from_logits_ref(logits, r.response_ids)  # log_softmax of the raw logits
        assert torch.equal(r.response_ids, logits.argmax(-1))
    else:
        z = filter_logits((logits / temperature).reshape(B * G, V), top_k, top_p).reshape(B, G, V)
        ref = torch.log_softmax(z, -1).gather(-1, r.response_ids[..., None]).squeeze(-1)
        assert torch.isfinite(ref).all(), "a sampled token was outside the kept set"
    assert r.logprobs.dtype == torch.float32
    torch.testing.assert_close(r.logprobs.double(), ref * r.response_mask, atol=ATOL_LOGP, rtol=0)


def test_sample_distribution_and_filtering():
    """Inverse-CDF sampling reproduces the (filtered) softmax; removed tokens are never drawn."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, -3.0])
    N = 40000
    u = torch.rand(N)
    for params in (SamplingParams(1.0), SamplingParams(0.5), SamplingParams(1.0, top_k=3),
                   SamplingParams(1.0, top_p=0.7), SamplingParams(2.0, top_k=4, top_p=0.9)):
        z = filter_logits(logits[None] / params.temperature, params.top_k, params.top_p)[0]
        p = torch.softmax(z, -1)
        tok, lp = sample(logits.expand(N, -1), params, u)
        freq = torch.bincount(tok, minlength=6).double() / N
        # binomial std ≤ sqrt(0.25 / N) = 0.0025; 0.015 is 6 std
        assert (freq - p.double()).abs().max() < 0.015, (params, freq, p)
        assert (freq[p == 0] == 0).all()
        torch.testing.assert_close(lp, torch.log(p)[tok], atol=1e-6, rtol=0)
    # the hand-computed kept sets: top_k=3 keeps {0, 1, 4}; top_p keeps the most likely tokens until their mass
    # reaches top_p: p = softmax = [.561, .206, .076, .028, .125, .004], sorted 0, 1, 4, 2, ...
    kept = lambda k, p: torch.isfinite(filter_logits(logits[None], k, p)[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(3, 1.0) == [0, 1, 4]
    assert kept(0, 0.5) == [0]  # mass before token 1 is .561 >= .5
    assert kept(0, 0.7) == [0, 1]  # .561 < .7, then .767 >= .7
    assert kept(0, 0.8) == [0, 1, 4]  # .767 < .8, then .892
    assert kept(2, 0.99) == [0, 1]  # top-k first, then top-p within the kept set


def test_sampled_logprob_is_exact_at_a_large_vocabulary():
    """The engine takes the sampled token's log-prob from the sampler (one pass over the head per step), so it must be
    as exact as the fused kernel at a real vocabulary (V = 65536): within fp32 rounding of the result against float64,
    also with top-k. log p = z_y − LSE is a difference of two fp32 values of size up to |z_y| and |LSE| (about 13 here),
    so its rounding is a few eps32 of those, not of |log p| (which cancellation makes small for likely tokens):
    4 · eps32 · (1 + |z_y| + |LSE|)."""
    V, B = 65536, 8
    logits = torch.randn(B, V) * 2
    u = torch.rand(B)
    for params in (SamplingParams(1.0), SamplingParams(0.7), SamplingParams(1.0, top_k=30000)):
        tok, lp = sample(logits, params, u)
        z = filter_logits(logits.double() / params.temperature, params.top_k, params.top_p)
        want = torch.log_softmax(z, -1).gather(-1, tok[:, None])[:, 0]
        zy, lse = z.gather(-1, tok[:, None])[:, 0], torch.logsumexp(z, -1)
        bound = 4 * torch.finfo(torch.float32).eps * (1 + zy.abs() + lse.abs())
        assert ((lp.double() - want).abs() <= bound).all(), (params, float((lp.double() - want).abs().max()))


def test_sampling_params_validation():
    for bad in (dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError, match="sampling"):
            SamplingParams(**bad)


# ---------------------------------------------------------------------------------------------------- EOS, early exit
def test_mask_and_padding_after_eos(model):
    eng = HybridEngine(model)
    prompts = ragged_prompts(6, seed=6)
    G = 24
    with eng.generation():
        free = eng.generate(prompts, max_new_tokens=G, temperature=1.0, seed=21)
        eos = int(free.response_ids[1, 3])  # row 1 stops at step 3 at the latest
        r = eng.generate(prompts, max_new_tokens=G, temperature=1.0, seed=21, eos_token_id=eos, pad_token_id=PAD_ID)
    assert r.response_ids.shape[1] == int(r.lengths.max())
    for i in range(6):
        row = free.response_ids[i]
        hits = (row == eos).nonzero().flatten()
        L = int(hits[0]) + 1 if len(hits) else G
        assert int(r.lengths[i]) == L
        # same seed, same tokens up to and including EOS; then pad, mask 0, log-prob 0
        assert torch.equal(r.response_ids[i, :L], row[:L])
        torch.testing.assert_close(r.logprobs[i, :L], free.logprobs[i, :L], atol=1e-6, rtol=0)
        assert (r.response_mask[i, :L] == 1).all() and (r.response_mask[i, L:] == 0).all()
        assert (r.response_ids[i, L:] == PAD_ID).all() and (r.logprobs[i, L:] == 0).all()
        assert (r.logprobs[i, :L] < 0).all()
    assert int(r.lengths[1]) <= 4
    ids, mask = r.sequences()
    assert ids.shape == mask.shape == (6, r.prompt_ids.shape[1] + r.response_ids.shape[1])
    assert torch.equal(mask.sum(-1), r.prompt_mask.sum(-1) + r.lengths)


def test_early_exit_when_all_rows_done(model):
    eng = HybridEngine(model, check_every=4)
    prompts = ragged_prompts(4, seed=8)
    with eng.generation():
        free = eng.generate(prompts, max_new_tokens=6, temperature=0)
    eos = sorted(set(free.response_ids[:, 2].tolist()))  # every row emits one of these by step 2
    calls = []
    hook = model.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with eng.generation():
            r = eng.generate(prompts, max_new_tokens=200, temperature=0, eos_token_id=eos)
    finally:
        hook.remove()
    assert int(r.lengths.max()) <= 3 and r.response_ids.shape[1] <= 3
    # prefill + decode steps until the first "all done" check after every row stopped (steps 4 -> 3 decode forwards)
    assert 2 <= len(calls) <= 1 + 4, len(calls)


# ---------------------------------------------------------------------------------------------------- inputs
def test_tensor_prompts_with_mask_equal_list_prompts(model):
    eng = HybridEngine(model)
    prompts = ragged_prompts(4, seed=9)
    with eng.generation():
        a = eng.generate(prompts, max_new_tokens=8, temperature=1.0, seed=5)
        ids = a.prompt_ids.clone()
        ids[a.prompt_mask == 0] = 77  # whatever sits under the mask must not matter
        b = eng.generate(ids, attention_mask=a.prompt_mask, max_new_tokens=8, temperature=1.0, seed=5)
        with pytest.raises(ValueError, match="left-padded"):
            eng.generate(ids, attention_mask=a.prompt_mask.flip(1), max_new_tokens=2)
        with pytest.raises(ValueError, match="max_new_tokens"):
            eng.generate(prompts, max_new_tokens=0)
        with pytest.raises(ValueError, match="non-empty"):
            eng.generate([[1, 2], []], max_new_tokens=2)
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.response_ids, b.response_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------- modes
def test_mode_errors(model):
    eng = HybridEngine(model)
    with pytest.raises(RuntimeError, match="inside `with engine.generation"):
        eng.generate([[5, 6]], max_new_tokens=2)
    with eng.generation():
        with pytest.raises(RuntimeError, match="nesting"):
            with eng.generation():
                pass
        eng.generate([[5, 6]], max_new_tokens=2)  # the failed nested entry left the outer block usable
    with pytest.raises(RuntimeError, match="inside `with engine.generation"):
        eng.generate([[5, 6]], max_new_tokens=2)
    with pytest.raises(ValueError, match="memory_policy"):
        HybridEngine(model, memory_policy="drop")
    with pytest.raises(ValueError, match="cuda_graphs=True"):
        if not torch.cuda.is_available():
            HybridEngine(model, cuda_graphs=True)
        else:
            raise ValueError("cuda_graphs=True (skipped check on CUDA)")


@pytest.mark.parametrize("start_training", [True, False])
def test_train_flags_restored_even_after_exceptions(model, start_training):
    model.train(start_training)
    model.model.layers[0].training = not start_training  # a submodule with its own flag must come back as it was
    model.config.gradient_checkpointing = True
    before = {name: m.training for name, m in model.named_modules()}
    eng = HybridEngine(model)
    assert torch.is_grad_enabled()
    with eng.generation():
        assert not model.training and not any(m.training for m in model.modules())
        assert not model.config.gradient_checkpointing and not torch.is_grad_enabled()
    assert {name: m.training for name, m in model.named_modules()} == before
    assert model.config.gradient_checkpointing and torch.is_grad_enabled()
    with pytest.raises(KeyError):
        with eng.generation():
            eng.generate([[5, 6, 7]], max_new_tokens=3)
            raise KeyError("boom")
    assert {name: m.training for name, m in model.named_modules()} == before
    assert model.config.gradient_checkpointing and torch.is_grad_enabled()
    with eng.generation():  # not stuck in "active" after the exception
        eng.generate([[5, 6, 7]], max_new_tokens=3)
    # gradients flow again after the switch back (the no_grad of generation did not leak)
    loss = model(torch.tensor([[5, 6, 7]])).float().square().mean()
    loss.backward()
    assert model.lm_head.weight.grad is not None


def test_weights_not_copied_and_updates_are_seen(model):
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    eng = HybridEngine(model)
    prompts = ragged_prompts(3, seed=10)
    with eng.generation():
        a = eng.generate(prompts, max_new_tokens=8, temperature=0)
    assert eng.model is model
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    with torch.no_grad():  # an "optimizer step": in place, same storage
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    with eng.generation():
        b = eng.generate(prompts, max_new_tokens=8, temperature=0)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    assert not torch.equal(a.response_ids, b.response_ids)
    ref = reference_greedy(model, prompts, 8)
    assert b.response_ids.tolist() == ref


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_decode_runs_in_inference_mode_and_the_rollout_trains(model, monkeypatch, compute_dtype):
    """The prefill and every decode step run under torch.inference_mode; the Rollout's tensors are ordinary ones, so a
    training forward may save them for backward (an inference tensor saved for backward raises); a second rollout
    (reusing the buffers and, with a compute dtype, the low-precision weight copies) works after an update."""
    modes = []
    step = HybridEngine._step

    def spy(self, *a, **k):
        modes.append(torch.is_inference_mode_enabled())
        return step(self, *a, **k)

    monkeypatch.setattr(HybridEngine, "_step", spy)
    eng = HybridEngine(model, compute_dtype=compute_dtype)
    for _ in range(2):
        with eng.generation():
            r = eng.generate(ragged_prompts(3, seed=11), max_new_tokens=6, temperature=1.0, seed=0)
        assert modes and all(modes) and not torch.is_inference_mode_enabled()
        for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "logprobs", "lengths"):
            assert not getattr(r, name).is_inference(), name
        ids, mask = r.sequences()
        P = r.prompt_ids.shape[1]
        logits = model(ids, attention_mask=mask)[:, P - 1:-1]  # [B, G, V] predicting each response token
        new = logits.float().log_softmax(-1).gather(-1, r.response_ids[..., None]).squeeze(-1)  # saves the ids
        loss = -(torch.exp(new - r.logprobs) * r.response_mask).sum()  # saves the response mask
        loss.backward()
        assert model.lm_head.weight.grad is not None
        with torch.no_grad():  # an optimizer step, in place
            for p in model.parameters():
                p.add_(1e-3 * torch.randn_like(p))
        model.zero_grad(set_to_none=True)


def test_cache_reused_grown_and_freed(model):
    eng = HybridEngine(model, memory_policy="keep")
    with eng.generation(max_batch_size=4, max_seq_len=32):
        ptr = eng.cache.k[0].data_ptr()
        assert eng.cache.max_batch == 4 and eng.cache.max_seq == 32
        eng.generate(ragged_prompts(4, seed=1), max_new_tokens=10)
        eng.generate(ragged_prompts(2, seed=2), max_new_tokens=5)
        assert eng.cache.k[0].data_ptr() == ptr and eng.stats["cache_allocs"] == 1
    with eng.generation(max_batch_size=3, max_seq_len=20):  # fits: kept across blocks
        assert eng.cache.k[0].data_ptr() == ptr
        r = eng.generate(ragged_prompts(6, seed=3), max_new_tokens=30)  # does not fit: grown
        assert eng.cache.fits(6, r.prompt_ids.shape[1] + 30) and eng.stats["cache_allocs"] == 2
    assert eng.cache is not None
    eng_free = HybridEngine(model, memory_policy="free")
    with eng_free.generation(max_batch_size=2, max_seq_len=16):
        eng_free.generate([[4, 5]], max_new_tokens=3)
        assert eng_free.cache is not None
    assert eng_free.cache is None and not eng_free._buffers


def test_compute_dtype_autocast(model):
    """compute_dtype=bf16 over fp32 weights: bf16 cache, fp32 log-probs, and the same greedy tokens as a bf16-autocast
    teacher-forced forward on most positions (bf16 rounding may flip near-ties, so not all)."""
    eng = HybridEngine(model, compute_dtype=torch.bfloat16)
    prompts = ragged_prompts(4, seed=13)
    with eng.generation():
        r = eng.generate(prompts, max_new_tokens=8, temperature=0)
    assert eng.cache.dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    assert r.logprobs.dtype == torch.float32 and bool(torch.isfinite(r.logprobs).all())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = teacher_forced_logits(model, r)
    assert (logits.argmax(-1) == r.response_ids).float().mean() >= 0.75


@pytest.mark.slow
def test_compiled_step_equals_eager_and_sees_weight_updates(model):
    """compile_step=True (torch.compile of the eager decode step): same samples as eager for the same seed, and an
    in-place weight update reaches the compiled step without a re-compile (parameters are graph inputs, not constants).
    Slow: one inductor compile (~20-90 s on 2 shared cores)."""
    eager, comp = HybridEngine(model), HybridEngine(model, compile_step=True)
    prompts = ragged_prompts(4, seed=12)
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=40, seed=3)

    def both():
        with eager.generation():
            a = eager.generate(prompts, **kw)
        with comp.generation():
            b = comp.generate(prompts, **kw)
        assert torch.equal(a.response_ids, b.response_ids)
        torch.testing.assert_close(b.logprobs, a.logprobs, atol=ATOL_LOGP, rtol=0)
        return a

    a = both()
    assert comp.stats["compile_s"] > 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    b = both()
    assert not torch.equal(a.response_ids, b.response_ids)


# ---------------------------------------------------------------------------------------------------- compaction
def _eos_spread(free: torch.Tensor) -> list[int]:
    """EOS ids that end the rows of a free-running greedy rollout at different steps: per row, the first occurrence
    of its last new token."""
    eos = set()
    for row in free.tolist():
        k = max(row.index(t) for t in set(row))
        eos.add(row[k])
    return sorted(eos)


def _lengths_with(free: torch.Tensor, eos: list[int]) -> list[int]:
    G = free.shape[1]
    hit = torch.isin(free, torch.tensor(eos))
    return [int(h.nonzero()[0]) + 1 if h.any() else G for h in hit]


def test_compaction_greedy_matches_transformers_rows_finishing_at_different_steps(tmp_path):
    """12 rows stop at EOS at several different steps; with a look every step the live rows move through several
    smaller buckets (12 -> 8 -> 4 -> ...). Output equals transformers' greedy generate, the row-by-row definition and
    the engine without compaction, token for token."""
    from transformers import AutoModelForCausalLM
    path = make_tiny_checkpoint(tmp_path, family="qwen2", tie=True, seed=7)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ours = load_model(path)
    prompts = ragged_prompts(12, seed=5)
    G = 24
    eng = HybridEngine(ours, check_every=1)
    off = HybridEngine(ours, check_every=1, compact=False)
    with eng.generation():
        free = eng.generate(prompts, max_new_tokens=G, temperature=0, pad_token_id=PAD_ID)
    eos = _eos_spread(free.response_ids)
    lens = _lengths_with(free.response_ids, eos)
    assert len(set(lens)) >= 4, lens  # the test's premise: rows finish at several different steps
    with eng.generation():
        n0 = eng.stats["compactions"]
        r = eng.generate(prompts, max_new_tokens=G, temperature=0, eos_token_id=eos, pad_token_id=PAD_ID)
        assert eng.stats["compactions"] - n0 >= 2
    with off.generation():
        r_off = off.generate(prompts, max_new_tokens=G, temperature=0, eos_token_id=eos, pad_token_id=PAD_ID)
    assert off.stats["compactions"] == 0
    assert r.lengths.tolist() == lens
    with torch.no_grad():
        out = hf.generate(input_ids=r.prompt_ids, attention_mask=r.prompt_mask, max_new_tokens=G, do_sample=False,
                          eos_token_id=eos, pad_token_id=PAD_ID, top_k=None, top_p=None, temperature=None)
    hf_resp = out[:, r.prompt_ids.shape[1]:]
    assert torch.equal(r.response_ids, hf_resp[:, :r.response_ids.shape[1]])
    assert torch.equal(r.response_ids, r_off.response_ids) and torch.equal(r.response_mask, r_off.response_mask)
    for i, row in enumerate(reference_greedy(ours, prompts, G, eos=eos)):
        assert r.response_ids[i, :len(row)].tolist() == row and int(r.lengths[i]) == len(row)


@pytest.mark.parametrize("check_every", [1, 3])
def test_compaction_sampling_same_rollout_as_without(model, check_every):
    """Sampling with the same seed, compaction (and the eager cache window, here much shorter than the cache) on and
    off: the same tokens, lengths and log-probs (each row keeps its own random numbers through the moves); the
    log-probs also match a teacher-forced forward."""
    prompts = ragged_prompts(10, seed=6)
    eos = list(range(100, 110))  # ~6% of the vocabulary: rows end at many different steps
    kw = dict(max_new_tokens=40, temperature=1.0, eos_token_id=eos, pad_token_id=PAD_ID, seed=21)
    on = HybridEngine(model, check_every=check_every)
    off = HybridEngine(model, check_every=check_every, compact=False)
    with on.generation(max_batch_size=10, max_seq_len=300):
        a = on.generate(prompts, **kw)
        a2 = on.generate(prompts, **kw)  # buffers of the smaller buckets reused by a second call
    with off.generation(max_batch_size=10, max_seq_len=300):
        b = off.generate(prompts, **kw)
    assert on.stats["compactions"] >= 2 and off.stats["compactions"] == 0
    assert on.stats["row_steps"] < off.stats["row_steps"] * 2  # two calls on, one off: fewer rows decoded per call
    assert len(set(a.lengths.tolist())) >= 3, a.lengths
    for x in (a, a2):
        assert torch.equal(x.response_ids, b.response_ids) and torch.equal(x.lengths, b.lengths)
        torch.testing.assert_close(x.logprobs, b.logprobs, atol=1e-5, rtol=0)
    ref = logprobs_from_logits_ref(teacher_forced_logits(model, a), a.response_ids).float()
    assert (ref - a.logprobs).mul(a.response_mask).abs().max() < ATOL_LOGP


# ---------------------------------------------------------------------------------------------------- oneDNN GEMMs
needs_onednn = pytest.mark.skipif(not onednn_linear.available(), reason="this torch build has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_onednn_gemms_same_rollout_as_torch_gemms(model, temperature):
    """onednn=True (packed weights for every linear and the head) against onednn=False (F.linear): the same tokens and
    log-probs up to fp32 summation order; the packed copies are made per call and no module keeps an override."""
    prompts = ragged_prompts(6, seed=21)
    kw = dict(max_new_tokens=12, temperature=temperature, seed=5)
    out = {}
    for flag in (False, True):
        eng = HybridEngine(model, onednn=flag)
        assert eng.use_onednn is flag
        with eng.generation():
            out[flag] = eng.generate(prompts, **kw)
        assert (eng.stats["pack_s"] > 0) is flag
    assert torch.equal(out[True].response_ids, out[False].response_ids)
    torch.testing.assert_close(out[True].logprobs, out[False].logprobs, atol=ATOL_LOGP, rtol=0)
    assert not any("forward" in m.__dict__ for m in model.modules())
    # and the packed copies follow weight updates between calls
    eng = HybridEngine(model, onednn=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    with eng.generation():
        moved = eng.generate(prompts, **kw)
    assert not torch.equal(moved.response_ids, out[True].response_ids)
    with HybridEngine(model, onednn=False).generation() as ref_eng:
        ref = ref_eng.generate(prompts, **kw)
    assert torch.equal(moved.response_ids, ref.response_ids)


@needs_onednn
def test_onednn_packs_every_projection_and_the_head(model, monkeypatch):
    """Every projection of the model (the models' ``Linear``, an ``nn.Linear`` subclass that says it is plain) and the
    head are packed once per generate call: a subclass must not fall back to the unpacked GEMMs."""
    from fastrlhf.engine import hybrid
    packed = []
    real = hybrid.onednn_linear.pack
    monkeypatch.setattr(hybrid.onednn_linear, "pack", lambda w, rows=None: packed.append(w) or real(w, rows))
    projections = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    assert projections and all(type(m) is not torch.nn.Linear for m in projections)
    with HybridEngine(model, onednn=True).generation() as eng:
        eng.generate(ragged_prompts(3, seed=2), max_new_tokens=3, seed=1)
    assert len(packed) == len(projections) + 1
    assert {id(w) for w in packed} == {id(m.weight) for m in projections} | {id(model.lm_head.weight)}


@needs_onednn
def test_onednn_overrides_removed_after_an_error_and_custom_forwards_kept(model, monkeypatch):
    """An exception inside generate leaves no packed override behind; a linear whose instance already has its own
    forward is not touched."""
    own = model.model.layers[0].mlp.down_proj
    marker = own.forward = lambda x: torch.nn.functional.linear(x, own.weight, own.bias)
    eng = HybridEngine(model, onednn=True)
    with eng.generation():
        eng.generate(ragged_prompts(2, seed=3), max_new_tokens=3, temperature=0)
        monkeypatch.setattr(eng, "_sample_head", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            eng.generate(ragged_prompts(2, seed=3), max_new_tokens=3, temperature=0)
    assert own.__dict__["forward"] is marker
    del own.forward
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert eng._head_packed is None


def test_onednn_option_validation(model):
    with pytest.raises(ValueError, match="onednn='yes'"):
        HybridEngine(model, onednn="yes")
    with pytest.raises(ValueError, match="compile_step is on"):
        HybridEngine(model, onednn=True, compile_step=True)
    assert not HybridEngine(model, compile_step=True).use_onednn  # auto steps aside for torch.compile
    assert not HybridEngine(model, onednn=False).use_onednn


# ---------------------------------------------------------------------------------------------------- shared prefill
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_repeated_prompts_prefill_once_with_the_same_rollout(model, monkeypatch, temperature):
    """GRPO-style rows (each prompt n times, in any order): the prefill runs on the distinct prompts only, and the
    rollout is the one of a prefill over every row (same tokens; log-probs up to fp32 summation order)."""
    import fastrlhf.engine.hybrid as hybrid
    base = ragged_prompts(3, seed=31)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(int(torch.randint(2**31, ()))))
    prompts = [base[i % 3] for i in order.tolist()]
    kw = dict(max_new_tokens=10, temperature=temperature, seed=7, eos_token_id=EOS_ID)
    batches = []
    real = model.hidden_states

    def spy(ids, **k):
        batches.append(ids.shape)
        return real(ids, **k)

    monkeypatch.setattr(model, "hidden_states", spy)
    eng = HybridEngine(model)
    with eng.generation():
        shared = eng.generate(prompts, **kw)
    assert batches[0][0] == 3 and all(b[0] <= 12 and b[1] == 1 for b in batches[1:])
    monkeypatch.setattr(hybrid, "distinct_rows", lambda ids, mask: (None, None))
    batches.clear()
    with eng.generation():
        every = eng.generate(prompts, **kw)
    assert batches[0][0] == 12
    assert torch.equal(shared.response_ids, every.response_ids) and torch.equal(shared.lengths, every.lengths)
    torch.testing.assert_close(shared.logprobs, every.logprobs, atol=ATOL_LOGP, rtol=0)
    # and the rows of one prompt were sampled independently
    if temperature > 0:
        rows = [i for i, p in enumerate(prompts) if p == base[0]]
        assert len({tuple(shared.response_ids[i].tolist()) for i in rows}) > 1


def test_distinct_rows():
    from fastrlhf.engine.hybrid import distinct_rows
    ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 5, 6], [9, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [0, 1, 1]])  # row 3 = row 0 once padding is ignored
    first, group = distinct_rows(ids, mask)
    assert ids[first][group].masked_fill(mask == 0, -1).tolist() == ids.masked_fill(mask == 0, -1).tolist()
    assert sorted(first.tolist()) == [0, 1] and group[0] == group[2] == group[3] != group[1]
    assert distinct_rows(ids[:2], mask[:2]) == (None, None) and distinct_rows(ids[:1], mask[:1]) == (None, None)
