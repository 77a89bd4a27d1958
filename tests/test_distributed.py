"""Data parallel on CPU: torchrun + FSDP2 over gloo, 2 processes against 1 with the same global batch.

Every run here is a real ``torchrun --standalone`` job (a free port, OMP_NUM_THREADS=1, a collective timeout of 60 s,
and a wall-clock bound per job). Tolerances: the 2-process runs reduce gradients in another order (reduce-scatter of
fp32 sums), so losses agree to float32 rounding (~1e-6 relative) per step; after a few AdamW steps, whose update
Δ = lr·m/(√v+ε) amplifies tiny differences in near-zero gradient coordinates, weights agree to ~1e-5 absolute.
"""
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastrlhf.runtime import checkpoint as ck
from fastrlhf.stages import sft
from fastrlhf.tools import task
from tests.helpers.models import tiny_checkpoint

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 240
FASTRLHF_EXE = str(Path(sysconfig.get_path("scripts")) / "fastrlhf")  # the console script `pip install` wrote


def job_env(extra: dict | None = None) -> dict:
    """The environment of a test job: one thread per rank, no progress bars, collectives time out after 60 s, gloo
    over loopback (no dependence on the host name resolving), this checkout importable."""
    e = dict(os.environ, OMP_NUM_THREADS="1", FASTRLHF_NO_PROGRESS="1", FASTRLHF_DIST_TIMEOUT_S="60",
             PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra or {}))
    e.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return e


def torchrun(nproc: int, args: list[str], *, script: list[str] | None = None, env: dict | None = None,
             timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc -m fastrlhf args`` (or ``script``), output captured."""
    e = job_env(env)
    target = script if script is not None else ["-m", "fastrlhf"]
    opts, target = [t for t in target if t == "--no-python"], [t for t in target if t != "--no-python"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *opts, *target,
           *args]
    return subprocess.run(cmd, env=e, cwd=str(ROOT), capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"
    return proc


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def weights(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_weights_close(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def as_args(cfg: dict) -> list[str]:
    out = []
    for k, v in cfg.items():
        out += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return out


# ------------------------------------------------------------------------------------------------------------- SFT

@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist_sft")
    model = tiny_checkpoint(d / "m", layers=2)
    data = task.write_sft_data(str(d / "sft.jsonl"), 48, seed=0, noise=0.0)
    base = dict(model=model, data=data, batch_tokens=96, lr=1e-2, warmup_ratio=0.0, device="cpu", log_every=100,
                plots=False, eval_fraction=0.1, max_steps=4, save_every=2, keep_checkpoints=3, seed=5)
    # the reference: ONE plain process, global batch = 2 budgets per step
    one = sft.train(sft.SFTConfig(**base, grad_accum=2, output_dir=str(d / "one")))
    two = ok(torchrun(2, ["sft", *as_args(dict(base, grad_accum=1, output_dir=str(d / "two")))]))
    return {"dir": d, "base": base, "one": one, "two_proc": two}


def test_sft_two_processes_match_one(sft_setup):
    d = sft_setup["dir"]
    one, two = metrics(d / "one"), metrics(d / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert two[-1]["eval_loss"] == pytest.approx(one[-1]["eval_loss"], rel=1e-4)
    assert_weights_close(weights(d / "one" / "checkpoint-0000004"), weights(d / "two" / "checkpoint-0000004"))
    # the checkpoint: an HF folder transformers loads + the optimizer state written by both ranks with DCP
    ckpt = d / "two" / "checkpoint-0000004"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= {p.name for p in (ckpt / ck.STATE_DIR).iterdir()}
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(ckpt)
    # only rank 0 wrote logs: one row per step
    assert len(two) == 4


def test_failing_rank_stops_the_job_and_resume_at_two_and_one_process(sft_setup, tmp_path):
    """Rank 1 raises at step 3 (after the step-2 checkpoint): the job ends with that rank's error, not a hang, and
    the checkpoint resumes with 2 processes and with 1 process to the state of the uninterrupted run."""
    d, base = sft_setup["dir"], sft_setup["base"]
    killed = tmp_path / "killed"
    t0 = time.monotonic()
    proc = torchrun(2, ["sft", *as_args(dict(base, grad_accum=1, output_dir=str(killed)))],
                    script=[str(ROOT / "tests" / "helpers" / "fault.py")], env={"FASTRLHF_TEST_FAULT": "1:3"})
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "injected fault on rank 1 at step 3" in out, out[-6000:]
    assert elapsed < 150, f"the job took {elapsed:.0f} s to stop after a rank failed"
    assert [p.name for p in ck.list_checkpoints(killed)] == ["checkpoint-0000002"]
    resume = str(killed / "checkpoint-0000002")
    ok(torchrun(2, ["sft", *as_args(dict(base, grad_accum=1, output_dir=str(tmp_path / "r2"), resume=resume))]))
    r1 = sft.train(sft.SFTConfig(**dict(base, grad_accum=2, output_dir=str(tmp_path / "r1"), resume=resume)))
    assert r1["history"][0]["step"] == 3
    full = weights(d / "two" / "checkpoint-0000004")
    assert_weights_close(full, weights(tmp_path / "r2" / "checkpoint-0000004"))
    assert_weights_close(full, weights(tmp_path / "r1" / "checkpoint-0000004"))
    rows = metrics(tmp_path / "r2")
    assert [r["step"] for r in rows] == [3, 4]
    assert rows[-1]["loss"] == pytest.approx(metrics(d / "two")[-1]["loss"], rel=1e-5)


def test_one_process_checkpoint_resumes_with_two(sft_setup, tmp_path):
    """Scale out mid-run: the plain single-process run's step-2 checkpoint continues on 2 ranks (optimizer state
    resharded by DCP) to the single-process run's final weights."""
    d, base = sft_setup["dir"], sft_setup["base"]
    ok(torchrun(2, ["sft", *as_args(dict(base, grad_accum=1, output_dir=str(tmp_path / "r2"),
                                         resume=str(d / "one" / "checkpoint-0000002")))]))
    assert [r["step"] for r in metrics(tmp_path / "r2")] == [3, 4]
    assert_weights_close(weights(d / "one" / "checkpoint-0000004"), weights(tmp_path / "r2" / "checkpoint-0000004"))


def test_ctrl_c_under_torchrun_saves_on_every_rank_then_stops(sft_setup, tmp_path):
    """SIGINT to torchrun (what Ctrl-C does): it forwards the signal to the workers, every rank finishes its step,
    they save one checkpoint together and exit."""
    import signal
    base, out = sft_setup["base"], tmp_path / "int"
    e = job_env()
    args = as_args(dict(base, grad_accum=1, max_steps=100000, save_every=0, output_dir=str(out)))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "fastrlhf", "sft", *args], env=e, cwd=str(ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").is_file() and len(metrics(out)) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpts = ck.list_checkpoints(out)
    assert len(ckpts) == 1, log[-4000:]
    step = int(ckpts[0].name.split("-")[1])
    assert step == len(metrics(out)) >= 3                             # saved at the step both ranks had finished
    assert {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in (ckpts[0] / ck.STATE_DIR).iterdir()}
    assert f"interrupted at step {step}" in log


# ------------------------------------------------------------------------------------------------------------- PPO

@pytest.fixture(scope="module")
def ppo_setup(tmp_path_factory):
    """The embedded task's tokenizer and prompts, a tiny policy and reward model. Rollouts with top_k = 1 (the argmax
    token: the same rollouts whatever the batch split), so that the comparison isolates the distributed parts: sharded
    forwards, the gathered policy in generation, whitening with all ranks' statistics, global token-mean normalizers,
    reduced metrics and the adaptive KL controller's global update."""
    d = tmp_path_factory.mktemp("dist_ppo")
    policy = tiny_checkpoint(d / "policy", layers=2, seed=1)
    rm = tiny_checkpoint(d / "rm", layers=2, seed=2, head="score")
    prompts = task.write_prompts(str(d / "prompts.jsonl"), 24, seed=3)
    base = dict(policy=policy, reward_model=rm, prompts=prompts, iterations=3, ppo_epochs=2,
                max_new_tokens=6, top_k=1, lr=3e-4, value_lr=3e-4, seed=3, plots=False, device="cpu",
                adaptive_kl=True, kl_target=0.5, kl_horizon=100, save_every=2, keep_checkpoints=3)
    from fastrlhf.stages.ppo import PPOConfig, train
    train(PPOConfig(**base, batch_size=8, minibatch_size=8, output_dir=str(d / "one")))
    ok(torchrun(2, ["ppo", *as_args(dict(base, batch_size=4, minibatch_size=4, output_dir=str(d / "two")))]))
    return {"dir": d, "base": base}


PPO_KEYS = ("score", "kl", "kl_coef", "policy_loss", "value_loss", "response_length", "entropy", "clipfrac")


def _assert_ppo_runs_match(one: list[dict], two: list[dict]):
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two):
        for k in PPO_KEYS:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k, a[k], b[k])


def test_ppo_two_processes_match_one(ppo_setup):
    d = ppo_setup["dir"]
    _assert_ppo_runs_match(metrics(d / "one"), metrics(d / "two"))
    for sub in ("", "value_model"):
        assert_weights_close(weights(d / "one" / "checkpoint-0000003" / sub),
                             weights(d / "two" / "checkpoint-0000003" / sub))
    p0 = weights(Path(ppo_setup["base"]["policy"]))
    assert any((p0[k] - v).abs().max() > 1e-4 for k, v in weights(d / "two" / "checkpoint-0000003").items())


def test_ppo_per_block_generation_matches(ppo_setup, tmp_path):
    """generation_gather=per_block (each decode step all-gathers block by block; the ranks agree when to stop)."""
    d, base = ppo_setup["dir"], ppo_setup["base"]
    ok(torchrun(2, ["ppo", *as_args(dict(base, batch_size=4, minibatch_size=4, iterations=2, save_every=0,
                                         generation_gather="per_block", output_dir=str(tmp_path / "pb")))]))
    _assert_ppo_runs_match(metrics(d / "two")[:2], metrics(tmp_path / "pb"))


def test_ppo_two_process_checkpoint_resumes_in_one(ppo_setup, tmp_path):
    """The 2-process iteration-2 checkpoint (policy + value optimizers sharded by DCP) resumes in one process."""
    from fastrlhf.stages.ppo import PPOConfig, train
    d, base = ppo_setup["dir"], ppo_setup["base"]
    out = train(PPOConfig(**dict(base, batch_size=8, minibatch_size=8, output_dir=str(tmp_path / "r1"),
                                 resume=str(d / "two" / "checkpoint-0000002"))))
    assert out["history"][0]["step"] == 3
    _assert_ppo_runs_match(metrics(d / "two")[2:], metrics(tmp_path / "r1"))
    for sub in ("", "value_model"):
        assert_weights_close(weights(d / "two" / "checkpoint-0000003" / sub),
                             weights(tmp_path / "r1" / "checkpoint-0000003" / sub))


def test_ppo_lora_two_processes_match_one_and_resume(ppo_setup, tmp_path):
    """LoRA policy under FSDP2 (frozen base, sharded adapters; the reference = adapters off): 2 ranks match 1 process,
    the export merges the gathered adapters into an HF folder, and the adapter checkpoint resumes on 2 ranks."""
    pytest.importorskip("peft", reason="LoRA is an optional extra (pip install peft)")
    from fastrlhf.stages.ppo import LORA_FILE, PPOConfig, train
    base = dict(ppo_setup["base"], iterations=2, save_every=1, lora_rank=4, lora_alpha=8.0, lr=3e-3)
    train(PPOConfig(**dict(base, batch_size=8, minibatch_size=8, output_dir=str(tmp_path / "one"))))
    two = dict(base, batch_size=4, minibatch_size=4)
    ok(torchrun(2, ["ppo", *as_args(dict(two, output_dir=str(tmp_path / "two")))]))
    _assert_ppo_runs_match(metrics(tmp_path / "one"), metrics(tmp_path / "two"))
    final = tmp_path / "two" / "checkpoint-0000002"
    for name in ("model.safetensors", LORA_FILE):
        a, b = load_file(str(tmp_path / "one" / "checkpoint-0000002" / name)), load_file(str(final / name))
        assert_weights_close(a, b)
    assert all("lora_" in k for k in load_file(str(final / LORA_FILE)))
    assert not any("lora_" in k or "base_layer" in k for k in weights(final))      # a plain merged model
    ok(torchrun(2, ["ppo", *as_args(dict(two, output_dir=str(tmp_path / "r2"),
                                         resume=str(tmp_path / "two" / "checkpoint-0000001")))]))
    assert [r["step"] for r in metrics(tmp_path / "r2")] == [2]
    assert_weights_close(weights(final), weights(tmp_path / "r2" / "checkpoint-0000002"))


# -------------------------------------------------------------------------------------------------- reward model

def _write_pairs(path, prompts: list[str], seed: int) -> str:
    rng = __import__("random").Random(seed)
    with open(path, "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p, "chosen": task.solve(p), "rejected": task.perturb(task.solve(p), rng)}) + "\n")
    return str(path)


def test_reward_model_two_processes_match_one(tmp_path):
    """9 training comparisons in global batches of 4: the third batch has 1 comparison, so rank 1 has none and runs a
    weight-0 forward (FSDP needs the same forwards on every rank); 5 held-out ones in batches of 2 per rank leave
    rank 1 one padded evaluation batch. The sums still match one process."""
    from fastrlhf.stages import reward
    model = tiny_checkpoint(tmp_path / "m", layers=2)
    prompts = task.instructions(14, seed=4)
    train_data = _write_pairs(tmp_path / "train.jsonl", prompts[:9], seed=0)
    eval_data = _write_pairs(tmp_path / "eval.jsonl", prompts[9:], seed=1)
    base = dict(model=model, data=train_data, eval_data=eval_data, lr=1e-3, warmup_ratio=0.0, device="cpu",
                plots=False, max_steps=3, seed=1, log_every=100)
    reward.train(reward.RewardConfig(**base, batch_size=4, output_dir=str(tmp_path / "one")))
    # through the installed `fastrlhf` command (torchrun --no-python), with gradient checkpointing under FSDP
    ok(torchrun(2, ["rm", *as_args(dict(base, batch_size=2, gradient_checkpointing=True,
                                        output_dir=str(tmp_path / "two")))], script=["--no-python", FASTRLHF_EXE]))
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
    assert two[-1]["eval_accuracy"] == pytest.approx(one[-1]["eval_accuracy"], abs=1e-9)
    assert two[-1]["eval_loss"] == pytest.approx(one[-1]["eval_loss"], rel=1e-4)
    assert_weights_close(weights(tmp_path / "one" / "checkpoint-0000003"), weights(tmp_path / "two" / "checkpoint-0000003"))


# ------------------------------------------------------------------------------------------------- NCCL (2+ GPUs)

@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL data parallel needs 2 or more GPUs")
def test_sft_two_gpus_nccl_match_one_gpu(sft_setup, tmp_path):
    """The SFT comparison on CUDA: 2 ranks over NCCL (one GPU each) against one process on one GPU, fp32 compute."""
    base = dict(sft_setup["base"], device="cuda", mixed_precision="no")
    sft.train(sft.SFTConfig(**dict(base, grad_accum=2, output_dir=str(tmp_path / "one"))))
    ok(torchrun(2, ["sft", *as_args(dict(base, grad_accum=1, output_dir=str(tmp_path / "two")))]))
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])
    assert_weights_close(weights(tmp_path / "one" / "checkpoint-0000004"),
                         weights(tmp_path / "two" / "checkpoint-0000004"), atol=1e-4)


def test_ppo_ptx_runs_under_torchrun(ppo_setup, tmp_path):
    """PPO-ptx with 2 ranks: each rank takes its own packed budget of the ptx data per minibatch; the ptx term divides
    by the global ptx token count. Checked: the job runs and logs a finite ptx loss."""
    base = ppo_setup["base"]
    ptx = task.write_sft_data(str(tmp_path / "ptx.jsonl"), 12, seed=5)
    ok(torchrun(2, ["ppo", *as_args(dict(base, batch_size=4, minibatch_size=4, iterations=1, save_every=0,
                                         ptx_coef=0.5, ptx_data=ptx, ptx_batch_tokens=64,
                                         output_dir=str(tmp_path / "ptx")))]))
    rows = metrics(tmp_path / "ptx")
    assert [r["step"] for r in rows] == [1] and 0 < rows[0]["ptx_loss"] < 50


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL data parallel needs 2 or more GPUs")
def test_ppo_two_gpus_nccl_match_one_gpu(ppo_setup, tmp_path):
    """The PPO comparison on CUDA over NCCL (fp32 policy/value compute; the frozen models are bf16 in both runs)."""
    from fastrlhf.stages.ppo import PPOConfig, train
    base = dict(ppo_setup["base"], device="cuda", mixed_precision="no", save_every=0)
    train(PPOConfig(**dict(base, batch_size=8, minibatch_size=8, output_dir=str(tmp_path / "one"))))
    ok(torchrun(2, ["ppo", *as_args(dict(base, batch_size=4, minibatch_size=4, output_dir=str(tmp_path / "two")))]))
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for a, b in zip(one, two):
        for k in ("score", "kl", "policy_loss", "value_loss"):
            assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-4), (a["step"], k, a[k], b[k])
