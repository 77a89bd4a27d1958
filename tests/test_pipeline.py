"""The embedded pipeline end to end on CPU (smaller than the default preset, fixed seed)."""
import json

import pytest
import torch

from fastrlhf.pipeline import PipelineConfig, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    cfg = PipelineConfig(output_dir=str(out), seed=0, device="cpu", n_sft=1000, sft_steps=400,
                         n_rm_prompts=800, rm_epochs=2, n_ppo_prompts=256, ppo_iterations=8, ppo_batch=32,
                         ppo_minibatch=16, n_eval=96)
    s = run(cfg)
    s["_dir"] = out
    return s


def test_stages_learn_what_they_are_trained_for(summary):
    # SFT learned the task well above chance (an untrained model scores ~0 with the judge)
    assert summary["judge_score_sft"] > 0.3
    # the reward model ranks held-out comparisons of SFT samples better than chance
    assert summary["rm_heldout_accuracy"] > 0.6
    # PPO raises the reward-model score of the policy's samples on held-out prompts, at a bounded KL
    assert summary["rm_score_ppo"] > summary["rm_score_sft"] + 0.05
    assert 0.0 < summary["final_kl"] < 10.0


def test_outputs_are_hf_folders_and_a_summary(summary):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    on_disk = json.loads((summary["_dir"] / "summary.json").read_text())
    assert on_disk["win_rate_ppo_over_sft"] == pytest.approx(summary["win_rate_ppo_over_sft"])
    ids = torch.tensor([[1, 5, 6, 7]])
    for stage in ("sft", "ppo"):
        AutoModelForCausalLM.from_pretrained(summary["checkpoints"][stage])(ids)
    rm = AutoModelForSequenceClassification.from_pretrained(summary["checkpoints"]["rm"])
    assert rm.config.num_labels == 1
    for f in ("sft/metrics.jsonl", "rm/metrics.jsonl", "ppo/metrics.jsonl", "data/rm.jsonl", "data/sft.jsonl"):
        assert (summary["_dir"] / f).stat().st_size > 0, f
