"""Packed forwards with shared prompts (GRPO's n completions of one prompt store it once) equal the padded forwards:
layout, log-probs, entropies, values, scores, full KL, every gradient, a grpo_update and the GRPO stage. Fresh random
groups each run (prompt lengths, response lengths down to 0, rows shuffled so a group's rows are not adjacent)."""

import pytest
import torch

from fastrlhf import kernels
from fastrlhf.engine.hybrid import Rollout
from fastrlhf.models.attention import build_meta
from fastrlhf.models.decoder import CausalLM, ModelConfig, ScoreModel
from fastrlhf.stages.ppo_core import ResponseBatch, pack_rows, positions_from_mask
from tests.helpers.models import randomize_
from tests.helpers.packed import response_outputs, same_grpo_updates
from tests.helpers.tolerances import FP32_MODEL, assert_close

V = 96
FAMILIES = {
    "llama": {},
    "llama-eager": {"attn_impl": "eager"},
    "qwen2": {"model_type": "qwen2"},
    "mistral-window": {"model_type": "mistral", "sliding_window": 3},
}


def _seed() -> int:
    return int(torch.randint(2**31, ()))


def _models(seed: int, **kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, attn_impl="sdpa") | kw
    torch.manual_seed(seed)
    pol, ref, val = CausalLM(ModelConfig(**base)), CausalLM(ModelConfig(**base)), ScoreModel(ModelConfig(**base))
    for m in (pol, ref, val):
        randomize_(m)
    return pol, ref, val


def _grouped_rollout(Q: int, n: int, P: int, G: int, seed: int, min_len: int = 0) -> Rollout:
    """Q distinct prompts (1..P tokens, left-padded) × n responses each (min_len..G tokens), rows in a random order."""
    g = torch.Generator().manual_seed(seed)
    p_len = torch.randint(1, P + 1, (Q,), generator=g)
    pm = (torch.arange(P)[None] >= P - p_len[:, None]).long()
    prompts = torch.randint(3, V, (Q, P), generator=g) * pm
    prompts[:, -1] = 3 + torch.randperm(V - 3, generator=g)[:Q]  # distinct prompts: equal ones would be stored once
    B = Q * n
    g_len = torch.randint(min_len, G + 1, (B,), generator=g)
    g_len[-1] = G
    rm = (torch.arange(G)[None] < g_len[:, None]).long()
    perm = torch.randperm(B, generator=g)
    return Rollout(prompt_ids=prompts.repeat_interleave(n, 0)[perm], prompt_mask=pm.repeat_interleave(n, 0)[perm],
                   response_ids=torch.randint(3, V, (B, G), generator=g) * rm, response_mask=rm,
                   logprobs=-torch.rand(B, G, generator=g) * rm, lengths=g_len)


def _batches(ro: Rollout):
    """(padded, packed unshared, packed shared) ResponseBatches of one rollout."""
    ids, am = ro.sequences()
    pos = positions_from_mask(am)
    P, mask = ro.prompt_ids.shape[1], ro.response_mask.float()
    return [ResponseBatch.build(ids, am, pos, ro.response_ids, mask, P, padding_free=pf, share_prompts=sh)
            for pf, sh in ((False, False), (True, False), (True, True))]


def test_shared_layout():
    """Each prompt once, then its rows' responses; each row's list (seq_index) is its own valid tokens and positions;
    src / dst / labels / last mean what they mean unshared."""
    Q, n, P, G = 3, 4, 5, 6
    ro = _grouped_rollout(Q, n, P, G, seed=_seed())
    ids, am = ro.sequences()
    pos = positions_from_mask(am)
    pk = pack_rows(ids, am, pos, ro.response_mask, P, share_prompts=True)
    unshared = pack_rows(ids, am, pos, ro.response_mask, P)
    assert unshared.seq_index is None and pk.seq_index is not None
    assert pk.input_ids.shape[1] == int(ro.prompt_mask[:, :].sum() // n) + int(ro.response_mask.sum())
    assert pk.cu_seqlens.tolist() == unshared.cu_seqlens.tolist()
    flat_ids, flat_pos = pk.input_ids[0], pk.position_ids[0]
    cu = pk.cu_seqlens.tolist()
    for b in range(Q * n):
        mine = pk.seq_index[cu[b]:cu[b + 1]]
        valid = am[b].bool()
        assert flat_ids[mine].tolist() == ids[b][valid].tolist()
        assert flat_pos[mine].tolist() == pos[b][valid].tolist()
        assert int(pk.last[b]) == int(mine[-1])
    # every packed token belongs to some row; each prompt is stored once
    assert sorted(set(pk.seq_index.tolist())) == list(range(pk.input_ids.shape[1]))
    assert pk.dst.tolist() == unshared.dst.tolist() and pk.labels.tolist() == unshared.labels.tolist()
    # the state predicting response token t of row b is the token before it in b's list
    b, t = ro.response_mask.bool().nonzero(as_tuple=True)
    nprompt = am[:, :P].sum(-1)
    want = torch.stack([pk.seq_index[cu[bb] + int(nprompt[bb]) + tt - 1] for bb, tt in zip(b.tolist(), t.tolist())])
    assert pk.src.tolist() == want.tolist()
    # all prompts distinct: no sharing, the plain layout
    ro1 = _grouped_rollout(4, 1, P, G, seed=_seed())
    ids1, am1 = ro1.sequences()
    pk1 = pack_rows(ids1, am1, positions_from_mask(am1), ro1.response_mask, P, share_prompts=True)
    assert pk1.seq_index is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shared_forwards_equal_padded(family):
    """Log-probs, entropies, values, RM scores, the full KL and the hidden states at every valid response token."""
    seed = _seed()
    pol, ref, val = _models(seed, **FAMILIES[family])
    ro = _grouped_rollout(3, 4, 6, 7, seed)
    mask = ro.response_mask.float()
    pad, _, shared = (response_outputs(rb, pol, ref, val, val, mask) for rb in _batches(ro))
    assert _batches(ro)[2].packed.seq_index is not None
    for k in pad:
        torch.testing.assert_close(shared[k], pad[k], **FP32_MODEL, msg=lambda m: f"{k} (seed {seed}): {m}")


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral-window", "llama-eager"])
def test_shared_gradients_equal_unshared(family):
    """PPO's policy loss + full-KL term + value loss: every gradient of both models, shared = unshared up to fp32
    rounding (a prompt's gradient is summed over its rows in another order). A wrong attention pattern moves them by
    O(1), far outside these bounds."""
    seed = _seed()
    pol, ref, val = _models(seed, **FAMILIES[family])
    ro = _grouped_rollout(3, 3, 5, 6, seed + 1)
    mask = ro.response_mask.float()
    g = torch.Generator().manual_seed(seed)
    old_lp = (-torch.rand(mask.shape, generator=g) * 3) * mask
    adv = torch.randn(mask.shape, generator=g) * mask
    ret = torch.randn(mask.shape, generator=g) * mask
    res = []
    for rb in _batches(ro)[1:]:
        pol.zero_grad(set_to_none=True), val.zero_grad(set_to_none=True)
        h = rb.hidden(pol)
        lp = rb.logprobs(pol, hidden=h)
        with torch.no_grad():
            h_ref = rb.hidden(ref)
        pg, _ = kernels.ppo_policy_loss(lp, old_lp, adv, mask, clip_eps=0.2)
        pg = pg + 0.1 * kernels.aggregate_ref(rb.full_kl(h, pol.lm_head_weight, h_ref, ref.lm_head_weight), mask,
                                              "token-mean")
        vf, _ = kernels.ppo_value_loss(rb.values(val), ret * 0.5, ret, mask, clip_eps=0.2)
        (pg + vf).backward()
        res.append({**{"pol." + k: p.grad.clone() for k, p in pol.named_parameters()},
                    **{"val." + k: p.grad.clone() for k, p in val.named_parameters()}})
    for k in res[0]:
        assert res[0][k].abs().max() > 0, k  # every parameter takes part
        assert_close(res[1][k], res[0][k], rtol=FP32_MODEL["rtol"], atol=1e-12, atol_rel=2e-5, what=f"{k} (seed {seed})")


def test_grpo_update_shared_equals_unshared():
    """One pass of grpo_update in 2 minibatches (a group's rows split between them; KL in the loss): the same statistics
    and updated weights with and without shared prompts, and the old / reference log-probs in chunks."""
    from fastrlhf.stages.grpo_core import GroupBatch, batch_logprobs
    seed = _seed()
    pol0, ref, _ = _models(seed, model_type="qwen2")
    ro = _grouped_rollout(2, 4, 5, 7, seed, min_len=1)
    ids, am = ro.sequences()
    pos = positions_from_mask(am)
    mask = ro.response_mask.float()
    fwd = dict(temperature=0.8, forward_batch_size=5, autocast=torch.no_grad, mask=mask, padding_free=True)
    lp = [batch_logprobs(ref, ids, am, pos, ro.response_ids, 5, **fwd, share_prompts=sh) * mask for sh in (False, True)]
    torch.testing.assert_close(lp[1], lp[0], **FP32_MODEL)
    adv = torch.randn(8, generator=torch.Generator().manual_seed(seed))
    batch = GroupBatch(input_ids=ids, attention_mask=am, position_ids=pos, response_ids=ro.response_ids, mask=mask,
                       advantages=adv, old_logprobs=lp[0] - 0.05 * mask, ref_logprobs=lp[0], prompt_len=5)
    same_grpo_updates(pol0, batch, [dict(share_prompts=False), dict(share_prompts=True)], seed, minibatch_size=4,
                      agg="token-mean", padding_free=True)


def test_seq_index_routes_to_repadded_attention_and_needs_positions():
    """flash-attn's varlen kernels take contiguous samples only: with seq_index every impl re-pads per sample; the
    decoder refuses seq_index without explicit positions."""
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    seq = torch.tensor([0, 1, 2, 0, 3])  # two rows sharing the prompt token 0
    for impl, want in (("flash", "sdpa"), ("sdpa", "sdpa"), ("eager", "eager")):
        meta = build_meta(impl, 4, "cpu", cu_seqlens=cu, seq_index=seq)
        assert meta.impl == want and meta.pad_rows == (2, 3)
        assert meta.pad_index.tolist() == [0, 1, 2, 3, 4]
        assert meta.pad_take.tolist() == [0, 1, 2, 4]  # token 0's output from row 0's slot
    pol, _, _ = _models(0)
    with pytest.raises(ValueError, match="seq_index needs cu_seqlens and position_ids"):
        pol.hidden_states(torch.tensor([[5, 6, 7, 8]]), cu_seqlens=cu, seq_index=seq)


def test_grpo_stage_share_prompts_on_equals_off(tmp_path):
    """``fastrlhf grpo`` with --share_prompts true / false: the same logged metrics over two iterations (μ = 2, KL in the
    loss against a reference)."""
    from fastrlhf.stages.grpo import GRPOConfig, train
    from tests.helpers.models import RecordingLog, make_tiny_ppo_setup
    ck = make_tiny_ppo_setup(tmp_path / "ck")
    rows = {}
    for share in (False, True):
        log = RecordingLog()
        train(GRPOConfig(policy=ck["policy"], prompts=ck["prompts"], output_dir=str(tmp_path / str(share)),
                         reward_model=ck["rm"], kl_coef=0.05, mu=2, iterations=2, batch_size=3, num_generations=4,
                         minibatch_size=6, max_new_tokens=6, lr=3e-3, seed=3, plots=False, device="cpu",
                         share_prompts=share), log=log)
        rows[share] = log.rows
    assert len(rows[True]) == len(rows[False]) == 2
    for ra, rb in zip(rows[False], rows[True]):
        for k in ("reward", "policy_loss", "kl", "entropy", "clipfrac"):
            assert rb[k] == pytest.approx(ra[k], rel=FP32_MODEL["rtol"], abs=FP32_MODEL["atol"]), (k, ra["step"])
