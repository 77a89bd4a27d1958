"""GRPO stage: group advantages against closed forms, reward-function specs, the update's ratio/KL plumbing, rewards
from a reward model, exact resume, prompts from parquet / datasets folders, and bad input as one line with status 2."""
import json
import sys

import pytest
import torch

from fastrlhf.models.hf_io import load_model
from fastrlhf.runtime.config import ConfigError
from fastrlhf.runtime.data import DataError, load_prompts
from fastrlhf.stages.grpo import GRPOConfig, train
from fastrlhf.stages.grpo_core import (ADVANTAGE_MODES, RewardFunctions, group_advantages, group_advantages_ref,
                                       load_reward_function)
from fastrlhf.tools import cli
from tests.helpers.models import RecordingLog, make_tiny_ppo_setup
from tests.helpers.tolerances import FP64

REWARD_FILE = '''
def length(prompts, completions):
    return [float(len(c.split())) for c in completions]

def has_cat(prompts, completions):
    return [1.0 if "cat" in c.split() else 0.0 for c in completions]

def chars(prompts, completions):
    return [len(c) / 10.0 for c in completions]

NOT_CALLABLE = 3

def one_arg(prompts):
    return []

def wrong_length(prompts, completions):
    return [0.0]
'''


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("grpo")
    out = make_tiny_ppo_setup(d)
    (d / "rewards.py").write_text(REWARD_FILE)
    out["rewards"] = str(d / "rewards.py")
    return out


def _cfg(ckpts, out, **kw):
    base = dict(policy=ckpts["policy"], prompts=ckpts["prompts"], output_dir=str(out),
                reward_funcs=[f"{ckpts['rewards']}:chars"], iterations=2, batch_size=3, num_generations=4, max_new_tokens=6,
                lr=3e-3, seed=3, plots=False, device="cpu")
    base.update(kw)
    return GRPOConfig(**base)


# ------------------------------------------------------------------------------------------------- advantages

def test_group_advantages_closed_form():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]], dtype=torch.float64)
    std = (5.0 / 3.0) ** 0.5  # Bessel-corrected std of 1..4
    expect = {
        "grpo": [[(x - 2.5) / (std + 1e-4) for x in (1, 2, 3, 4)], [0.0] * 4],
        "drgrpo": [[-1.5, -0.5, 0.5, 1.5], [0.0] * 4],
        "rloo": [[1 - 3.0, 2 - 8 / 3, 3 - 7 / 3, 4 - 2.0], [0.0] * 4],  # r_i − mean of the other three
    }
    for mode in ADVANTAGE_MODES:
        out = group_advantages(r, mode, eps=1e-4)
        torch.testing.assert_close(out, torch.tensor(expect[mode], dtype=torch.float64), **FP64)
        torch.testing.assert_close(group_advantages_ref(r, mode, eps=1e-4), out, **FP64)


@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
@pytest.mark.parametrize("n", [2, 3, 8])
def test_group_advantages_match_reference(mode, n):
    g = torch.Generator().manual_seed(n)
    r = torch.randn(5, n, generator=g, dtype=torch.float64) * 3 + 1
    ref = group_advantages_ref(r, mode)
    torch.testing.assert_close(group_advantages(r, mode), ref, **FP64)
    torch.testing.assert_close(group_advantages(r.float(), mode).double(), ref, rtol=1e-5, atol=1e-5)
    if mode != "grpo":  # baselines: rloo and drgrpo sum to 0 over each group
        torch.testing.assert_close(ref.sum(1), torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0)


def test_group_advantages_reject_bad_shapes():
    with pytest.raises(ValueError, match="n >= 2"):
        group_advantages(torch.ones(4, 1))
    with pytest.raises(ValueError, match="mode"):
        group_advantages(torch.ones(2, 2), "ppo")


# ---------------------------------------------------------------------------------------------------- rewards

def test_reward_function_specs(ckpts):
    from fastrlhf.tools import task
    assert load_reward_function("fastrlhf.tools.task:reward") is task.reward
    fn = load_reward_function(f"{ckpts['rewards']}:length")
    assert fn(["p"], ["a b c"]) == [3.0]
    bad = {"no_colon": "--reward_funcs", "nosuch.module.xyz:f": "cannot import", "fastrlhf.tools.task:nope": "no attribute",
           f"{ckpts['rewards']}:NOT_CALLABLE": "not callable", f"{ckpts['rewards']}:one_arg": "(prompts, completions)",
           "missing/file.py:f": "not found", ":f": "--reward_funcs"}
    for spec, msg in bad.items():
        with pytest.raises(ConfigError, match="--reward_funcs") as e:
            load_reward_function(spec)
        assert msg in str(e.value) and "\n" not in str(e.value)


def test_reward_functions_combine_with_weights(ckpts):
    rf = RewardFunctions.from_config([f"{ckpts['rewards']}:length", f"{ckpts['rewards']}:has_cat"], [0.5, -2.0])
    r, parts = rf(["p", "q"], ["cat dog", "a b c d"])
    torch.testing.assert_close(r, torch.tensor([0.5 * 2 - 2.0, 0.5 * 4 + 0.0]))
    assert parts == {"reward/length": 3.0, "reward/has_cat": 0.5}
    with pytest.raises(ConfigError, match="--reward_weights"):
        RewardFunctions.from_config([f"{ckpts['rewards']}:length"], [1.0, 2.0])
    with pytest.raises(ConfigError, match="returned 1 rewards for 2"):
        RewardFunctions.from_config([f"{ckpts['rewards']}:wrong_length"], [])(["p", "q"], ["a", "b"])


def test_task_reward_is_the_labeler_score():
    from fastrlhf.tools import task
    assert task.reward(["count from 3 to 5", [{"role": "user", "content": "what color is the sky"}]],
                       ["3 4 5", "red"]) == [1.0, 0.0]


# ------------------------------------------------------------------------------------------------- the stage

def test_mu1_ratio_is_one_and_no_reference_without_kl(ckpts, tmp_path):
    out = train(_cfg(ckpts, tmp_path, mu=1, kl_coef=0.0), log=RecordingLog())
    assert out["reference_loaded"] is False
    for row in out["history"]:  # old = current log-probs: ratio 1, nothing clipped
        assert row["clipfrac"] == 0.0 and row["approx_kl"] == 0.0 and row["kl"] == 0.0
    p0 = load_model(ckpts["policy"], head="lm").state_dict()
    p1 = load_model(out["checkpoint"], head="lm").state_dict()
    assert any((p0[k] - p1[k]).abs().max() > 1e-5 for k in p0)  # a reward with spread moved the weights


def test_mu2_uses_old_logprobs_and_kl_in_loss(ckpts, tmp_path):
    """μ = 2: the second pass sees ρ ≠ 1 (approx_kl > 0); β > 0 loads the reference and reports a KL ≥ 0."""
    out = train(_cfg(ckpts, tmp_path, mu=2, kl_coef=0.05, kl_in="loss", clip_eps_low=0.1, clip_eps_high=0.3,
                     iterations=2), log=RecordingLog())
    assert out["reference_loaded"] is True
    assert out["history"][-1]["approx_kl"] > 0
    assert out["history"][-1]["kl"] > 0  # after one iteration of updates the policy differs from the reference


@pytest.mark.parametrize("adv,agg", [("drgrpo", "seq-mean-token-sum"), ("rloo", "seq-mean-token-mean")])
def test_modes_and_reward_model_and_kl_in_reward(ckpts, tmp_path, adv, agg):
    log = RecordingLog()
    out = train(_cfg(ckpts, tmp_path, advantage=adv, loss_agg=agg, reward_funcs=[], reward_model=ckpts["rm"],
                     reward_model_weight=2.0, kl_coef=0.1, kl_in="reward", minibatch_size=6), log=log)
    row = out["history"][-1]
    assert "reward/reward_model" in row and row["kl"] > 0
    # reward = 2 · RM score − β · KL per sequence, averaged
    assert row["reward"] == pytest.approx(2.0 * row["reward/reward_model"] - 0.1 * row["kl_seq"], abs=1e-4)


def test_resume_reaches_the_same_state(ckpts, tmp_path):
    """2 iterations straight == 1 iteration, stop, --resume auto, 1 more."""
    full = train(_cfg(ckpts, tmp_path / "full", mu=2), log=RecordingLog())
    train(_cfg(ckpts, tmp_path / "split", mu=2, iterations=1), log=RecordingLog())
    resumed = train(_cfg(ckpts, tmp_path / "split", mu=2, iterations=2, resume="auto"), log=RecordingLog())
    a = load_model(full["checkpoint"], head="lm").state_dict()
    b = load_model(resumed["checkpoint"], head="lm").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert full["final"]["reward"] == pytest.approx(resumed["final"]["reward"], abs=1e-6)


# --------------------------------------------------------------------------------------------------------- data

def test_prompts_from_parquet_and_datasets_folder(tmp_path):
    rows = [{"prompt": "count from 1 to 3", "answer": "1 2 3"}, {"prompt": "what color is the sky", "answer": "blue"}]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    got = load_prompts(str(tmp_path / "p.parquet"))
    assert [e.prompt for e in got] == [r["prompt"] for r in rows] and got[1].source.endswith("p.parquet:row 2")
    pq.write_table(pa.Table.from_pylist([{"text": "x"}]), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet:row 1: .*'prompt'"):
        load_prompts(str(tmp_path / "bad.parquet"))
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert [e.prompt for e in load_prompts(str(tmp_path / "ds"))] == [r["prompt"] for r in rows]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="without a 'train' split"):
        load_prompts(str(tmp_path / "dd"))


def test_datasets_folder_without_datasets_installed(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match="optional package 'datasets'"):
        load_prompts(str(tmp_path / "ds"))


# ---------------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args,needle", [
    (["--reward_funcs", "not_a_spec"], "--reward_funcs"),
    (["--reward_funcs", "nosuch_module_xyz:f"], "cannot import 'nosuch_module_xyz'"),
    (["--reward_funcs", "fastrlhf.tools.task:reward", "--num_generations", "1"], "--num_generations: 1 is out of range"),
    (["--reward_funcs", "fastrlhf.tools.task:reward", "--advantage", "ppo"], "advantage"),
    ([], "no reward"),
])
def test_cli_bad_input_is_one_line_status_2(ckpts, tmp_path, capsys, args, needle):
    rc = cli.main(["grpo", "--policy", ckpts["policy"], "--prompts", ckpts["prompts"], "--output_dir",
                   str(tmp_path), "--device", "cpu"] + args)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1, err


def test_cli_bad_prompts_file_names_the_line(ckpts, tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"prompt": "the cat"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    rc = cli.main(["grpo", "--policy", ckpts["policy"], "--prompts", str(bad), "--output_dir", str(tmp_path / "o"),
                   "--device", "cpu", "--reward_funcs", "fastrlhf.tools.task:reward"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"{bad}:2" in err and len(err.splitlines()) == 1, err


# ------------------------------------------------------------------------------------------- the full-vocabulary KL

def test_batch_full_kl_matches_float64_logits(ckpts):
    """``batch_full_kl`` = Σ_v p_v (log p_v − log q_v) per response token, from both models' hidden states and heads,
    against the same sum over explicit float64 logits; 0 where the mask is 0."""
    from fastrlhf.stages.grpo_core import batch_full_kl
    from fastrlhf.stages.ppo_core import positions_from_mask, response_hidden
    import contextlib

    pol = load_model(ckpts["policy"], head="lm").eval()
    ref = load_model(ckpts["policy"], head="lm").eval()
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    B, P, G, V = 5, 4, 6, pol.config.vocab_size
    ids = torch.randint(3, V, (B, P + G), generator=g)
    attn = torch.ones(B, P + G, dtype=torch.long)
    attn[0, :2] = 0  # left padding in one prompt
    pos = positions_from_mask(attn)
    mask = (torch.rand(B, G, generator=g) > 0.3).float()
    got = batch_full_kl(pol, ref, ids, attn, pos, mask, P, temperature=0.7, forward_batch_size=2,
                        autocast=contextlib.nullcontext)
    with torch.no_grad():
        z = response_hidden(pol, ids, attn, pos, P).double() @ pol.lm_head_weight.double().t() / 0.7
        zr = response_hidden(ref, ids, attn, pos, P).double() @ ref.lm_head_weight.double().t() / 0.7
        lp, lq = torch.log_softmax(z, -1), torch.log_softmax(zr, -1)
        want = (lp.exp() * (lp - lq)).sum(-1) * mask.double()
    assert (got[mask == 0] == 0).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    assert float(want.abs().max()) > 1e-4  # the perturbed reference really differs


def test_full_kl_in_the_reward_and_in_the_loss(ckpts, tmp_path):
    """Both placements run end to end; the reference starts as the policy, so the first iteration's KL (measured
    before its one update: μ = 1, one minibatch) is 0."""
    for kl_in in ("reward", "loss"):
        log = RecordingLog()
        out = train(_cfg(ckpts, tmp_path / kl_in, kl_coef=0.1, kl_in=kl_in, kl_estimator="full", iterations=2),
                    log=log)
        assert out["reference_loaded"] and abs(log.rows[0]["kl"]) < 1e-6, kl_in
        assert log.rows[1]["kl"] > 0, kl_in  # after an update the policy has moved away from the reference


def test_full_kl_loss_term_gradient_matches_float64_logits(ckpts):
    """One ``grpo_update`` step with the exact KL in the loss (μ = 1, one minibatch: ρ = 1) moves the weights by −lr·∇ℓ
    of ℓ = token-mean(−A·ρ) + β·token-mean(Σ_v p_v (log p_v − log q_v)), computed here from explicit float64 logits."""
    import contextlib
    from fastrlhf.stages.grpo_core import GroupBatch, batch_response_hidden, grpo_update
    from fastrlhf.stages.ppo_core import positions_from_mask, response_hidden

    pol = load_model(ckpts["policy"], head="lm").train()
    ref = load_model(ckpts["policy"], head="lm").eval()
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    B, P, G, V, beta, tau = 4, 3, 5, pol.config.vocab_size, 2.0, 0.8
    ids = torch.randint(3, V, (B, P + G), generator=g)
    attn = torch.ones(B, P + G, dtype=torch.long)
    attn[1, :2] = 0
    pos = positions_from_mask(attn)
    mask = (torch.rand(B, G, generator=g) > 0.25).float()
    mask[:, 0] = 1
    adv = torch.randn(B, generator=g)
    ref_h = batch_response_hidden(ref, ids, attn, pos, P, forward_batch_size=3, autocast=contextlib.nullcontext)
    batch = GroupBatch(input_ids=ids, attention_mask=attn, position_ids=pos, response_ids=ids[:, P:], mask=mask,
                       advantages=adv, old_logprobs=None, ref_logprobs=None, prompt_len=P, ref_hidden=ref_h)

    pol64 = load_model(ckpts["policy"], head="lm").double()
    z = response_hidden(pol64, ids, attn, pos, P) @ pol64.lm_head_weight.t() / tau  # [B, G, V] float64
    lp = torch.log_softmax(z, -1)
    with torch.no_grad():
        lq = torch.log_softmax(response_hidden(ref.double(), ids, attn, pos, P) @ ref.lm_head_weight.t() / tau, -1)
    logp = lp.gather(-1, ids[:, P:, None])[..., 0]
    kl = (lp.exp() * (lp - lq)).sum(-1)
    n = mask.sum()
    loss = (-adv.double()[:, None] * torch.exp(logp - logp.detach()) * mask).sum() / n + beta * (kl * mask).sum() / n
    loss.backward()
    want = {k: -p.grad for k, p in pol64.named_parameters()}  # SGD, lr 1: Δw = −∇ℓ

    before = {k: p.detach().clone() for k, p in pol.named_parameters()}
    stats = grpo_update(batch, policy=pol, optimizer=torch.optim.SGD(pol.parameters(), lr=1.0), mu=1,
                        minibatch_size=B, clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=beta, kl_estimator="k3",
                        agg="token-mean", temperature=tau, max_grad_norm=None, autocast=contextlib.nullcontext,
                        ref_head_weight=ref.lm_head_weight)
    assert stats["kl"] == pytest.approx(float((kl * mask).sum() / n), rel=1e-4)
    for k, p in pol.named_parameters():
        torch.testing.assert_close((p.detach() - before[k]).double(), want[k], rtol=1e-4, atol=1e-6, msg=k)
    assert float(kl.max()) > 1e-3  # the perturbed reference really differs, so the term shapes the step
