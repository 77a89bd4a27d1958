"""Padding-free (packed) forwards of PPO / GRPO equal the padded ones: log-probs, entropies, values, scores, full KL,
losses, parameter gradients, and a whole PPO iteration. fp32, fresh random lengths (left-padded prompts of different
lengths, responses down to one token)."""
import copy
import random

import pytest
import torch

from fastrlhf import kernels
from fastrlhf.engine.hybrid import HybridEngine, Rollout
from fastrlhf.models.decoder import CausalLM, ModelConfig, ScoreModel
from fastrlhf.stages.ppo_core import (ResponseBatch, make_experience, pack_rows, positions_from_mask, ppo_iteration,
                                      sequence_scores)
from tests.helpers.models import randomize_
from tests.helpers.packed import response_outputs, same_grpo_updates
from tests.helpers.tolerances import FP32_MODEL, assert_close

V = 96
APPROX = dict(rel=FP32_MODEL["rtol"], abs=FP32_MODEL["atol"])  # scalar statistics of fp32 model outputs
FAMILIES = {  # name -> ModelConfig overrides
    "llama": {},
    "llama-eager": {"attn_impl": "eager"},
    "qwen2": {"model_type": "qwen2"},  # q/k/v biases
    "mistral-window": {"model_type": "mistral", "sliding_window": 3},  # sliding-window mask inside each sample
}


def _seed() -> int:
    """A seed drawn from torch's generator (seeded per test by conftest: FASTRLHF_TEST_SEED replays it)."""
    return int(torch.randint(2**31, ()))


def _close(got, want, what="", scale=2e-5):
    """fp32 equality up to rounding: relative 1e-4, absolute ``scale`` × the tensor's largest entry (a gradient entry
    is a sum of many terms, so its rounding scales with the tensor, not with the entry)."""
    assert_close(got, want, rtol=FP32_MODEL["rtol"], atol=1e-12, atol_rel=scale, what=what)


def _close_update(new, want_new, start, what=""):
    """Weight updates (new − start) compared like gradients, plus one fp32 ulp of the weights (storing the updated
    weight rounds it)."""
    start = start.detach()
    assert_close(new - start, want_new - start, rtol=FP32_MODEL["rtol"], atol=2.0**-23 * float(start.abs().max()),
                 atol_rel=2e-5, what=what)


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, attn_impl="sdpa")
    base.update(kw)
    return ModelConfig(**base)


def _models(seed: int, **kw):
    torch.manual_seed(seed)
    pol, ref, rm, val = CausalLM(_cfg(**kw)), CausalLM(_cfg(**kw)), ScoreModel(_cfg(**kw)), ScoreModel(_cfg(**kw))
    for m in (pol, ref, rm, val):
        randomize_(m)
    return pol, ref, rm, val


def _rollout(B: int, P: int, G: int, seed: int) -> Rollout:
    """Random left-padded prompts (1..P tokens) and right-padded responses (1..G tokens; one of length 1, one full)."""
    g = torch.Generator().manual_seed(seed)
    p_len = torch.randint(1, P + 1, (B,), generator=g)
    g_len = torch.randint(1, G + 1, (B,), generator=g)
    g_len[0], g_len[-1] = 1, G
    t_p, t_g = torch.arange(P), torch.arange(G)
    pm = (t_p[None] >= P - p_len[:, None]).long()
    rm = (t_g[None] < g_len[:, None]).long()
    return Rollout(prompt_ids=torch.randint(3, V, (B, P), generator=g) * pm, prompt_mask=pm,
                   response_ids=torch.randint(3, V, (B, G), generator=g) * rm, response_mask=rm,
                   logprobs=-torch.rand(B, G, generator=g) * rm, lengths=g_len)


def _batches(ro: Rollout):
    ids, am = ro.sequences()
    pos = positions_from_mask(am)
    P = ro.prompt_ids.shape[1]
    return [ResponseBatch.build(ids, am, pos, ro.response_ids, ro.response_mask.float(), P, padding_free=pf)
            for pf in (False, True)]


def test_pack_rows_layout():
    """Packed ids / positions / cu_seqlens and the response locations against a loop over rows."""
    ro = _rollout(5, 4, 6, seed=_seed())
    ids, am = ro.sequences()
    pos = positions_from_mask(am)
    P, G = 4, 6
    pk = pack_rows(ids, am, pos, ro.response_mask, P)
    flat_ids, flat_pos, cu, src, dst, lab = [], [], [0], [], [], []
    for b in range(5):
        row = [t for t in range(P + G) if am[b, t]]
        start = len(flat_ids)
        flat_ids += [int(ids[b, t]) for t in row]
        flat_pos += list(range(len(row)))
        cu.append(cu[-1] + len(row))
        for t in range(G):
            if ro.response_mask[b, t]:
                src.append(start + row.index(P - 1 + t))
                dst.append(b * G + t)
                lab.append(int(ro.response_ids[b, t]))
    assert pk.input_ids.tolist() == [flat_ids] and pk.position_ids.tolist() == [flat_pos]
    assert pk.cu_seqlens.tolist() == cu and pk.cu_seqlens.dtype == torch.int32
    assert pk.last.tolist() == [c - 1 for c in cu[1:]]
    assert (pk.src.tolist(), pk.dst.tolist(), pk.labels.tolist()) == (src, dst, lab)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_forwards_equal_padded(family):
    """Log-probs, entropies, values, RM scores and the full KL: packed = padded at every valid response token."""
    seed = _seed()
    pol, ref, rm, val = _models(seed, **FAMILIES[family])
    ro = _rollout(6, 7, 9, seed)
    mask = ro.response_mask.float()
    pad, packed = (response_outputs(rb, pol, ref, val, rm, mask) for rb in _batches(ro))
    for k in pad:
        torch.testing.assert_close(packed[k], pad[k], **FP32_MODEL, msg=lambda m: f"{k} (seed {seed}): {m}")
    # invalid response tokens are exactly 0 when packed
    assert torch.equal(packed["lp"], packed["lp"] * mask)
    # the reward model's score standalone (pack=True) is the same
    ids, am = ro.sequences()
    with torch.no_grad():
        torch.testing.assert_close(sequence_scores(rm, ids, am, positions_from_mask(am), packed=True), pad["score"],
                                   **FP32_MODEL)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral-window"])
def test_packed_losses_and_gradients_equal_padded(family):
    """PPO's clipped policy loss (+ full-KL term) and value loss, and every parameter gradient of both models."""
    seed = _seed()
    pol, ref, _, val = _models(seed, **FAMILIES[family])
    ro = _rollout(5, 6, 8, seed + 1)
    mask = ro.response_mask.float()
    g = torch.Generator().manual_seed(seed)
    old_lp = (-torch.rand(mask.shape, generator=g) * 3) * mask
    adv, ret = torch.randn(mask.shape, generator=g) * mask, torch.randn(mask.shape, generator=g) * mask
    old_v = torch.randn(mask.shape, generator=g) * mask
    res = []
    for rb in _batches(ro):
        pol.zero_grad(set_to_none=True), val.zero_grad(set_to_none=True)
        h = rb.hidden(pol)
        lp, ent = rb.logprobs(pol, return_entropy=True, hidden=h)
        with torch.no_grad():
            h_ref = rb.from_grid(rb.to_grid(rb.hidden(ref)))
        pg, pm = kernels.ppo_policy_loss(lp, old_lp, adv, mask, clip_eps=0.2)
        kl = rb.full_kl(h, pol.lm_head_weight, h_ref, ref.lm_head_weight)
        pg = pg + 0.1 * kernels.aggregate_ref(kl, mask, "token-mean")
        vf, _ = kernels.ppo_value_loss(rb.values(val), old_v, ret, mask, clip_eps=0.2)
        (pg + vf + 0.01 * (ent * mask).sum()).backward()
        res.append((pg.detach(), vf.detach(), pm["clipfrac"], {n: p.grad.clone() for n, p in pol.named_parameters()},
                    {n: p.grad.clone() for n, p in val.named_parameters()}))
    (pg0, vf0, cf0, gp0, gv0), (pg1, vf1, cf1, gp1, gv1) = res
    torch.testing.assert_close(pg1, pg0, **FP32_MODEL)
    torch.testing.assert_close(vf1, vf0, **FP32_MODEL)
    torch.testing.assert_close(cf1, cf0)
    for grads1, grads0 in ((gp1, gp0), (gv1, gv0)):
        assert grads1.keys() == grads0.keys()
        for n in grads0:
            assert grads0[n].abs().max() > 0, n  # every parameter takes part
            _close(grads1[n], grads0[n], f"{n} (seed {seed})")


def test_make_experience_packed_equals_padded():
    """Every field of the experience (old/ref log-probs, values, scores, KL, rewards, GAE, whitened advantages, the
    kept reference hidden states) is the same either way, in chunks of forward_batch_size."""
    seed = _seed()
    pol, ref, rm, val = _models(seed)
    ro = _rollout(7, 5, 8, seed)
    kw = dict(policy=pol, ref_policy=ref, reward_model=rm, value_model=val, kl_coef=0.05, gamma=1.0, lam=0.95,
              temperature=0.9, eos_token_id=None, missing_eos_penalty=None, forward_batch_size=3,
              autocast=torch.no_grad, kl_estimator="full", keep_ref_hidden=True)
    pad = make_experience(ro, padding_free=False, **kw)
    packed = make_experience(ro, padding_free=True, **kw)
    for name in ("old_logprobs", "ref_logprobs", "old_values", "scores", "kl", "rewards", "advantages", "returns"):
        torch.testing.assert_close(getattr(packed, name), getattr(pad, name), **FP32_MODEL,
                                   msg=lambda m: f"{name} (seed {seed}): {m}")
    torch.testing.assert_close(packed.ref_hidden, pad.ref_hidden * pad.mask[..., None], **FP32_MODEL)


def test_ppo_iteration_packed_equals_padded():
    """One whole PPO iteration (generation with EOS, experience, 2 epochs × 2 minibatches with the full-KL loss term)
    from the same weights: the same rollout, experience, statistics and updated weights either way."""
    seed = _seed()
    runs = []
    pol0, ref, rm, val0 = _models(seed % 1000, vocab_size=8, eos_token_id=2)  # 8 tokens: EOS (2) ends rows early
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, 8) for _ in range(rng.randrange(0, 6))] for _ in range(6)]
    for pf in (False, True):
        pol, val = copy.deepcopy(pol0), copy.deepcopy(val0)
        # SGD: the update is linear in the gradient (Adam's first steps are ≈ lr · sign(g), which flips for an entry whose
        # gradient is at rounding level, so Adam updates cannot be compared entry by entry)
        popt = torch.optim.SGD(pol.parameters(), lr=0.05)
        vopt = torch.optim.SGD(val.parameters(), lr=0.05)
        it = ppo_iteration(
            prompts, engine=HybridEngine(pol), policy=pol, ref_policy=ref, reward_model=rm, value_model=val,
            policy_opt=popt, value_opt=vopt, kl_coef=0.05,
            sampling=dict(max_new_tokens=10, temperature=1.5, top_k=0, top_p=1.0, eos_token_id=2, pad_token_id=0),
            experience=dict(gamma=1.0, lam=0.95, temperature=1.5, eos_token_id=2, missing_eos_penalty=1.0,
                            forward_batch_size=4, autocast=torch.no_grad, keep_ref_hidden=True, padding_free=pf),
            update=dict(epochs=2, minibatch_size=3, clip_eps=0.2, vf_clip_eps=0.2, temperature=1.5, max_grad_norm=1.0,
                        autocast=torch.enable_grad, kl_loss_coef=0.1, kl_loss_estimator="full",
                        ref_head_weight=ref.lm_head_weight, padding_free=pf),
            rollout_seed=seed, generator=torch.Generator(), update_seed=seed + 1)
        runs.append((it, pol, val))
    (a, pol_a, val_a), (b, pol_b, val_b) = runs
    assert torch.equal(a.rollout.response_ids, b.rollout.response_ids)
    assert len(set(a.rollout.lengths.tolist())) > 1, "responses of one length: the test would not test packing"
    for name in ("old_logprobs", "ref_logprobs", "old_values", "scores", "advantages", "returns"):
        torch.testing.assert_close(getattr(b.experience, name), getattr(a.experience, name), **FP32_MODEL)
    for k in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "entropy", "kl_loss", "grad_norm"):
        assert b.stats[k] == pytest.approx(a.stats[k], **APPROX), k
    for start, ma, mb in ((pol0, pol_a, pol_b), (val0, val_a, val_b)):  # the updates (weights − initial weights)
        for (n, p0), p, q in zip(start.named_parameters(), ma.parameters(), mb.parameters()):
            _close_update(q, p, p0, f"{n} (seed {seed})")


def test_grpo_packed_equals_padded():
    """GRPO's frozen forwards (old / reference log-probs, full KL) and one pass of grpo_update (2 minibatches, KL in the
    loss): the same log-probs, statistics and updated weights either way."""
    from fastrlhf.stages.grpo_core import GroupBatch, batch_full_kl, batch_logprobs
    seed = _seed()
    pol0, ref, _, _ = _models(seed, model_type="qwen2")
    ro = _rollout(6, 5, 7, seed)
    ids, am = ro.sequences()
    pos = positions_from_mask(am)
    mask = ro.response_mask.float()
    args = (ids, am, pos, ro.response_ids, 5)
    fwd = dict(temperature=0.8, forward_batch_size=4, autocast=torch.no_grad, mask=mask)
    lp = [batch_logprobs(ref, *args, **fwd, padding_free=pf) * mask for pf in (False, True)]
    torch.testing.assert_close(lp[1], lp[0], **FP32_MODEL)
    kl = [batch_full_kl(pol0, ref, ids, am, pos, mask, 5, temperature=0.8, forward_batch_size=4,
                        autocast=torch.no_grad, padding_free=pf) for pf in (False, True)]
    torch.testing.assert_close(kl[1], kl[0], **FP32_MODEL)
    adv = torch.randn(6, generator=torch.Generator().manual_seed(seed))
    batch = GroupBatch(input_ids=ids, attention_mask=am, position_ids=pos, response_ids=ro.response_ids, mask=mask,
                       advantages=adv, old_logprobs=lp[0] - 0.05 * mask, ref_logprobs=lp[0], prompt_len=5)
    same_grpo_updates(pol0, batch, [dict(padding_free=False), dict(padding_free=True)], seed, minibatch_size=3,
                      agg="seq-mean-token-mean")


@pytest.mark.parametrize("cls_path", ["fastrlhf.stages.ppo:PPOConfig", "fastrlhf.stages.grpo:GRPOConfig"])
def test_padding_free_switch(cls_path):
    """``padding_free`` accepts auto | on | off (default auto) and names the field on anything else."""
    import importlib

    from fastrlhf.runtime.config import ConfigError, check_ranges
    mod, name = cls_path.split(":")
    cls = getattr(importlib.import_module(mod), name)
    assert cls().padding_free == "auto"
    for ok in ("auto", "on", "off"):
        check_ranges(cls(padding_free=ok))
    with pytest.raises(ConfigError, match="padding_free"):
        check_ranges(cls(padding_free="yes"))


@pytest.fixture(scope="module")
def stage_ckpts(tmp_path_factory):
    from tests.helpers.models import make_tiny_ppo_setup
    return make_tiny_ppo_setup(tmp_path_factory.mktemp("packed"))


def _same_runs(rows_a, rows_b, keys):
    assert len(rows_a) == len(rows_b) > 0
    for ra, rb in zip(rows_a, rows_b):
        for k in keys:
            assert rb[k] == pytest.approx(ra[k], **APPROX), (k, ra["step"])


def test_ppo_stage_padding_free_on_equals_off(stage_ckpts, tmp_path):
    """``fastrlhf ppo`` with --padding_free on / off: the same logged metrics in both iterations (the second one's come
    from the weights the first one trained). Weights are not compared entry by entry: the stage's AdamW steps by
    ≈ lr · sign(g) at first, which flips for an entry whose gradient is at rounding level."""
    from fastrlhf.stages.ppo import PPOConfig, train
    from tests.helpers.models import RecordingLog
    runs = {}
    for mode in ("off", "on"):
        log = RecordingLog()
        train(PPOConfig(policy=stage_ckpts["policy"], reward_model=stage_ckpts["rm"], prompts=stage_ckpts["prompts"],
                        output_dir=str(tmp_path / mode), iterations=2, batch_size=6, minibatch_size=3, ppo_epochs=2,
                        max_new_tokens=6, lr=3e-4, value_lr=3e-4, seed=3, plots=False, padding_free=mode,
                        missing_eos_penalty=0.5), log=log)
        runs[mode] = log.rows
    rows_a, rows_b = runs["off"], runs["on"]
    _same_runs(rows_a, rows_b, ("score", "kl", "policy_loss", "value_loss", "entropy", "approx_kl", "response_length",
                                "explained_variance", "grad_norm"))


@pytest.mark.parametrize("kl_estimator", ["k3", "full"])
def test_grpo_stage_padding_free_on_equals_off(stage_ckpts, tmp_path, kl_estimator):
    """``fastrlhf grpo`` (reward model, reference with KL in the loss: an estimator of the sampled tokens' log-probs or
    the exact full-vocabulary KL from the kept reference states, μ = 2) with --padding_free on / off: the same logged
    metrics."""
    from fastrlhf.stages.grpo import GRPOConfig, train
    from tests.helpers.models import RecordingLog
    rows = {}
    for mode in ("off", "on"):
        log = RecordingLog()
        train(GRPOConfig(policy=stage_ckpts["policy"], prompts=stage_ckpts["prompts"], output_dir=str(tmp_path / mode),
                         reward_model=stage_ckpts["rm"], kl_coef=0.05, kl_estimator=kl_estimator, mu=2, iterations=2,
                         batch_size=3, num_generations=4, minibatch_size=6, max_new_tokens=6, lr=3e-3, seed=3,
                         plots=False, device="cpu", padding_free=mode), log=log)
        rows[mode] = log.rows
    _same_runs(rows["off"], rows["on"], ("reward", "policy_loss", "kl", "entropy", "clipfrac"))


def test_packed_flash_varlen_bookkeeping(monkeypatch):
    """The CUDA path (flash-attn varlen over the packed row), with the flash kernels replaced by plain-torch references
    on CPU: log-probs, values and gradients equal the padded SDPA path."""
    import fastrlhf.models.attention as A
    import fastrlhf.models.decoder as M
    from tests.test_model import _ref_flash_func, _ref_flash_varlen
    monkeypatch.setattr(A, "flash_attn_func", _ref_flash_func)
    monkeypatch.setattr(A, "flash_attn_varlen_func", _ref_flash_varlen)
    monkeypatch.setattr(M, "resolve_impl", lambda impl, *a, **k: impl)
    seed = _seed()
    pol, _, _, val = _models(seed, model_type="mistral", sliding_window=3)
    ro = _rollout(5, 6, 7, seed)
    mask = ro.response_mask.float()
    res = []
    for rb in _batches(ro):
        for m in (pol, val):
            m.config.attn_impl = "flash" if rb.packed is not None else "sdpa"
            m.zero_grad(set_to_none=True)
        lp, v = rb.logprobs(pol) * mask, rb.values(val) * mask
        (lp.sum() + (v * v).sum()).backward()
        res.append((lp.detach(), v.detach(), [p.grad.clone() for p in (*pol.parameters(), *val.parameters())]))
    (lp0, v0, g0), (lp1, v1, g1) = res
    torch.testing.assert_close(lp1, lp0, **FP32_MODEL)
    torch.testing.assert_close(v1, v0, **FP32_MODEL)
    for i, (a, b) in enumerate(zip(g0, g1)):
        _close(b, a, f"parameter {i} (seed {seed})")


def test_packed_attention_benchmark_runs():
    """``python -m benchmarks.run_packed_attention``: three arms, same log-probs, positive times (smoke, 1 pass)."""
    from benchmarks.run_packed_attention import main
    threads = torch.get_num_threads()
    try:
        res = main(["--iters", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert res["max_logp_diff"] < 1e-4
    assert all(res[k] > 0 for k in ("padded", "packed/repad", "packed/blockdiag"))
