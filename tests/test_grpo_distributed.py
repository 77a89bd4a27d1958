"""GRPO under torchrun + FSDP2 on CPU (gloo, 2 processes): each rank generates and scores whole groups; the job
trains, writes a sharded checkpoint, and that checkpoint resumes in one process at the next iteration."""
import pytest

from fastrlhf.tools import task
from tests.helpers.models import tiny_checkpoint
from tests.test_distributed import as_args, metrics, ok, torchrun, weights

pytestmark = pytest.mark.distributed


def test_grpo_two_processes_train_and_resume_in_one(tmp_path):
    from fastrlhf.stages.grpo import GRPOConfig, train
    policy = tiny_checkpoint(tmp_path / "policy", layers=2, seed=1)
    prompts = task.write_prompts(str(tmp_path / "prompts.jsonl"), 24, seed=3)
    base = dict(policy=policy, prompts=prompts, reward_funcs="fastrlhf.tools.task:reward", iterations=2, num_generations=4,
                max_new_tokens=6, lr=3e-3, seed=3, plots=False, device="cpu", mu=2, kl_coef=0.05, save_every=1,
                keep_checkpoints=3)
    ok(torchrun(2, ["grpo", *as_args(dict(base, batch_size=2, output_dir=str(tmp_path / "two")))]))
    rows = metrics(tmp_path / "two")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["policy_loss"] == r["policy_loss"] and r["approx_kl"] >= 0 for r in rows)  # finite
    p0 = weights(policy)
    w2 = weights(tmp_path / "two" / "checkpoint-0000002")
    assert any((p0[k] - v).abs().max() > 1e-5 for k, v in w2.items())
    out = train(GRPOConfig(**dict(base, batch_size=4, iterations=3, reward_funcs=[base["reward_funcs"]],
                                  output_dir=str(tmp_path / "one"),
                                  resume=str(tmp_path / "two" / "checkpoint-0000002"))))
    assert [r["step"] for r in out["history"]] == [3]
