"""PPO stage: experience math wiring, exact resume, bad input, and the optimizer actually moving the score."""
import json

import pytest
import torch

from fastrlhf import kernels
from fastrlhf.runtime.data import DataError
from fastrlhf.engine.hybrid import HybridEngine
from fastrlhf.models.hf_io import load_model
from fastrlhf.stages.ppo import PPOConfig, train
from fastrlhf.stages.ppo_core import make_experience, ppo_update, response_logprobs
from tests.helpers.models import RecordingLog, make_tiny_ppo_setup
from tests.helpers.tolerances import EXACT, FP32


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_tiny_ppo_setup(tmp_path_factory.mktemp("ppo"))


def _cfg(ckpts, out, **kw):
    base = dict(policy=ckpts["policy"], reward_model=ckpts["rm"], prompts=ckpts["prompts"], output_dir=str(out),
                iterations=2, batch_size=6, minibatch_size=3, ppo_epochs=2, max_new_tokens=6, lr=3e-4, value_lr=3e-4,
                seed=3, plots=False)
    base.update(kw)
    return PPOConfig(**base)


def test_experience_matches_kernel_composition(ckpts):
    """make_experience = kernels.kl_penalty -> shape_rewards -> gae -> whiten on the rollout's own forwards."""
    policy = load_model(ckpts["policy"], head="lm")
    ref = load_model(ckpts["policy"], head="lm")
    rm = load_model(ckpts["rm"], head="score")
    value = load_model(ckpts["rm"], head="score")
    eng = HybridEngine(policy)
    with eng.generation():
        ro = eng.generate([[1, 8, 9, 10], [1, 11], [1, 12, 13]], max_new_tokens=5, temperature=1.0, eos_token_id=2,
                          pad_token_id=0, seed=0)
    exp = make_experience(ro, policy=policy, ref_policy=ref, reward_model=rm, value_model=value, kl_coef=0.1,
                          gamma=1.0, lam=0.95, temperature=1.0, eos_token_id=2, missing_eos_penalty=None,
                          forward_batch_size=2, autocast=torch.no_grad)
    # reference == policy here, so the KL term is exactly 0 and the rewards are the score at the last valid token
    assert torch.equal(exp.kl, torch.zeros_like(exp.kl))
    ids, am = ro.sequences()
    scores = rm.score_last(ids, am)
    torch.testing.assert_close(exp.scores, scores, rtol=1e-5, atol=1e-5)
    last = ro.lengths - 1
    expect_r = torch.zeros_like(exp.rewards)
    expect_r[torch.arange(3), last] = scores
    torch.testing.assert_close(exp.rewards, expect_r, **FP32)
    # the experience's old log-probs are the sampling log-probs (same weights, temperature 1, no top-k/p)
    torch.testing.assert_close(exp.old_logprobs, ro.logprobs * exp.mask, rtol=1e-4, atol=1e-4)
    adv, ret = kernels.gae_ref(exp.rewards.double(), exp.old_values.double(), exp.mask.double(), gamma=1.0, lam=0.95)
    torch.testing.assert_close(exp.returns, ret.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exp.advantages, kernels.whiten_ref(adv, exp.mask.double()).float(), rtol=1e-4, atol=1e-4)


def test_first_minibatch_has_ratio_one(ckpts):
    """Before any update the new log-probs equal the old ones: no clipping, approx_kl 0 (one epoch, one minibatch)."""
    policy = load_model(ckpts["policy"], head="lm")
    value = load_model(ckpts["rm"], head="score")
    rm = load_model(ckpts["rm"], head="score")
    eng = HybridEngine(policy)
    with eng.generation():
        ro = eng.generate([[1, 8, 9], [1, 11, 12, 13]], max_new_tokens=4, eos_token_id=2, pad_token_id=0, seed=1)
    exp = make_experience(ro, policy=policy, ref_policy=policy, reward_model=rm, value_model=value, kl_coef=0.02,
                          gamma=1.0, lam=0.95, temperature=1.0, eos_token_id=2, missing_eos_penalty=None,
                          forward_batch_size=8, autocast=torch.no_grad)
    popt = torch.optim.SGD(policy.parameters(), lr=0.0)
    vopt = torch.optim.SGD(value.parameters(), lr=0.0)
    import contextlib
    st = ppo_update(exp, policy=policy, value_model=value, policy_opt=popt, value_opt=vopt, epochs=1,
                    minibatch_size=2, clip_eps=0.2, vf_clip_eps=0.2, temperature=1.0, max_grad_norm=None,
                    autocast=contextlib.nullcontext)
    assert st["clipfrac"] == 0.0 and st["vf_clipfrac"] == 0.0
    assert st["approx_kl"] < 1e-12
    # ratio 1 => policy loss = -mean(A) over valid tokens (whitened advantages have mean 0)
    assert abs(st["policy_loss"] - float(-(exp.advantages * exp.mask).sum() / exp.mask.sum())) < 1e-5


def test_resume_reaches_the_same_state(ckpts, tmp_path):
    """2 iterations straight == 1 iteration, stop, --resume, 1 more (same data order, RNG and optimizer state)."""
    full = train(_cfg(ckpts, tmp_path / "full"), log=RecordingLog())
    train(_cfg(ckpts, tmp_path / "split", iterations=1), log=RecordingLog())
    resumed = train(_cfg(ckpts, tmp_path / "split", iterations=2, resume="auto"), log=RecordingLog())
    a = load_model(full["checkpoint"], head="lm").state_dict()
    b = load_model(resumed["checkpoint"], head="lm").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")
    va = load_model(full["checkpoint"] + "/value_model", head="score").state_dict()
    vb = load_model(resumed["checkpoint"] + "/value_model", head="score").state_dict()
    for k in va:
        torch.testing.assert_close(va[k], vb[k], rtol=0, atol=1e-6)
    assert full["final"]["score"] == pytest.approx(resumed["final"]["score"], abs=1e-5)
    # and the weights did move
    p0 = load_model(ckpts["policy"], head="lm").state_dict()
    assert any((p0[k] - a[k]).abs().max() > 1e-4 for k in a)


def test_update_improves_the_surrogate(ckpts):
    """Successive PPO epochs on one experience lower the clipped surrogate loss (gradient sign and plumbing)."""
    import contextlib
    policy = load_model(ckpts["policy"], head="lm")
    value = load_model(ckpts["rm"], head="score")
    rm = load_model(ckpts["rm"], head="score")
    eng = HybridEngine(policy)
    with eng.generation():
        ro = eng.generate([[1, 8, 9], [1, 11, 12, 13], [1, 20], [1, 30, 31]], max_new_tokens=6, eos_token_id=2,
                          pad_token_id=0, seed=5)
    exp = make_experience(ro, policy=policy, ref_policy=policy, reward_model=rm, value_model=value, kl_coef=0.0,
                          gamma=1.0, lam=0.95, temperature=1.0, eos_token_id=2, missing_eos_penalty=None,
                          forward_batch_size=8, autocast=torch.no_grad)
    popt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    vopt = torch.optim.Adam(value.parameters(), lr=1e-3)
    losses, vlosses = [], []
    for _ in range(4):
        st = ppo_update(exp, policy=policy, value_model=value, policy_opt=popt, value_opt=vopt, epochs=1,
                        minibatch_size=4, clip_eps=0.2, vf_clip_eps=10.0, temperature=1.0, max_grad_norm=None,
                        autocast=contextlib.nullcontext)
        losses.append(st["policy_loss"])
        vlosses.append(st["value_loss"])
    assert losses[0] == pytest.approx(0.0, abs=1e-5)  # ratio 1 and whitened advantages: -mean(A) = 0
    assert losses[-1] < losses[0] - 0.05, losses
    assert vlosses[-1] < vlosses[0], vlosses
    # the new log-probs moved toward the positive-advantage tokens
    with torch.no_grad():
        ids, am, pos = exp.input_ids, exp.attention_mask, exp.position_ids
        new = response_logprobs(policy, ids, am, pos, exp.response_ids, exp.prompt_len)
    assert float(((new - exp.old_logprobs) * exp.advantages * exp.mask).sum()) > 0


def test_prompt_longer_than_context_names_the_line(ckpts, tmp_path):
    bad = tmp_path / "long.jsonl"
    bad.write_text(json.dumps({"prompt": "the cat"}) + "\n" + json.dumps({"prompt": " ".join(["cat"] * 200)}) + "\n")
    with pytest.raises(DataError, match=r"long\.jsonl:2"):
        train(_cfg(ckpts, tmp_path / "x", prompts=str(bad)), log=RecordingLog())


def test_missing_required_field(tmp_path):
    with pytest.raises(ValueError, match="reward_model"):
        train(PPOConfig(policy="x", prompts="y", output_dir=str(tmp_path)), log=RecordingLog())


def test_lora_policy_reference_is_the_adapter_disabled(ckpts, tmp_path):
    """LoRA: only adapters train; the reference (adapter off) is the SFT model; the export merges and loads in HF."""
    pytest.importorskip("peft", reason="LoRA is an optional extra (pip install peft)")
    from transformers import AutoModelForCausalLM

    from fastrlhf.runtime.lora import adapters_disabled, add_lora, merged_copy

    out = train(_cfg(ckpts, tmp_path / "lora", iterations=2, lora_rank=4, lora_alpha=8.0, lr=3e-3, save_every=1),
                log=RecordingLog())
    ids = torch.tensor([[1, 8, 9, 10, 11, 12]])
    base = load_model(ckpts["policy"], head="lm")
    tuned = load_model(out["checkpoint"], head="lm")
    hf = AutoModelForCausalLM.from_pretrained(out["checkpoint"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, tuned(ids), rtol=1e-4, atol=1e-4)  # the export is a plain HF model
        assert (tuned(ids) - base(ids)).abs().max() > 1e-4  # and the adapters moved it
    # the reference = adapters off == the SFT model exactly, also after the adapters got non-zero weights
    pol = add_lora(load_model(ckpts["policy"], head="lm"), rank=4, alpha=8.0)
    for n, p in pol.named_parameters():
        assert p.requires_grad == ("lora_" in n)
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        with adapters_disabled(pol):
            torch.testing.assert_close(pol(ids), base(ids), **EXACT)
        torch.testing.assert_close(merged_copy(pol)(ids), pol(ids), rtol=1e-5, atol=1e-5)
    # resume continues from the adapter file
    again = train(_cfg(ckpts, tmp_path / "lora", iterations=3, lora_rank=4, lora_alpha=8.0, lr=3e-3, resume="auto"),
                  log=RecordingLog())
    assert again["history"][0]["step"] == 3


def _tiny_experience(ckpts, seed: int):
    policy = load_model(ckpts["policy"], head="lm")
    value = load_model(ckpts["rm"], head="score")
    rm = load_model(ckpts["rm"], head="score")
    eng = HybridEngine(policy)
    with eng.generation():
        ro = eng.generate([[1, 8, 9], [1, 11, 12, 13], [1, 20]], max_new_tokens=5, eos_token_id=2, pad_token_id=0,
                          seed=seed)
    exp = make_experience(ro, policy=policy, ref_policy=policy, reward_model=rm, value_model=value, kl_coef=0.0,
                          gamma=1.0, lam=0.95, temperature=1.0, eos_token_id=2, missing_eos_penalty=None,
                          forward_batch_size=8, autocast=torch.no_grad)
    return policy, value, exp


def test_policy_backward_runs_before_the_value_forward(ckpts):
    """Peak memory holds one model's activations: by the time the value model's forward starts, the policy's
    backward has filled its gradients (so its graph is freed), in every minibatch."""
    import contextlib
    policy, value, exp = _tiny_experience(ckpts, seed=7)
    seen = []
    value.register_forward_pre_hook(lambda m, a: seen.append(policy.lm_head_weight.grad is not None))
    ppo_update(exp, policy=policy, value_model=value, policy_opt=torch.optim.SGD(policy.parameters(), lr=0.0),
               value_opt=torch.optim.SGD(value.parameters(), lr=0.0), epochs=2, minibatch_size=2, clip_eps=0.2,
               vf_clip_eps=0.2, temperature=1.0, max_grad_norm=1.0, autocast=contextlib.nullcontext)
    assert seen == [True] * 4, seen  # 2 epochs × 2 minibatches (3 rollouts in chunks of 2)


def test_non_finite_value_loss_stops_before_any_weight_moves(ckpts):
    """A NaN in the value targets: FloatingPointError before either optimizer steps (the policy's backward already
    ran, but no weight changed)."""
    import contextlib
    policy, value, exp = _tiny_experience(ckpts, seed=8)
    exp.returns[0, 0] = float("nan")
    before = [p.detach().clone() for p in list(policy.parameters()) + list(value.parameters())]
    with pytest.raises(FloatingPointError, match="non-finite PPO loss"):
        ppo_update(exp, policy=policy, value_model=value, policy_opt=torch.optim.Adam(policy.parameters(), lr=1e-2),
                   value_opt=torch.optim.Adam(value.parameters(), lr=1e-2), epochs=1, minibatch_size=3,
                   clip_eps=0.2, vf_clip_eps=0.2, temperature=1.0, max_grad_norm=1.0,
                   autocast=contextlib.nullcontext)
    after = list(policy.parameters()) + list(value.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after))
