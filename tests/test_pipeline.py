"""The embedded pipeline end to end on CPU: the default preset (what `fastrlhf pipeline` runs), fixed seed, ~75 s."""
import json

import pytest
import torch

from fastrlhf.tools.pipeline import PipelineConfig, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    cfg = PipelineConfig(output_dir=str(out), seed=0, device="cpu")
    s = run(cfg)
    s["_dir"] = out
    return s


def test_ppo_beats_sft_on_the_judge(summary):
    """InstructGPT's headline result at toy scale: the labeler prefers PPO's samples over SFT's (1024 held-out prompts,
    both sampled at T=1 with the same seed). Seed 0 measured: judge 0.715 -> 0.794, win rate 0.568 +- 0.030 (231W/91L)."""
    assert summary["judge_score_ppo"] > summary["judge_score_sft"] + 0.03
    assert summary["win_rate_ppo_over_sft"] - summary["win_rate_ci95"] > 0.5  # the 95% interval excludes a tie
    assert summary["wins"] > 1.5 * summary["losses"]


def test_stages_learn_what_they_are_trained_for(summary):
    # SFT learned the task well above chance (an untrained model scores ~0 with the judge)
    assert summary["judge_score_sft"] > 0.5
    # the reward model ranks held-out comparisons of SFT samples well above chance
    assert summary["rm_heldout_accuracy"] > 0.7
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
