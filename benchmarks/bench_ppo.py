"""pytest-benchmark at the ``smoke`` shape: full PPO iterations of fastrlhf's trainer core (``benchmarks.run_ppo``).

    python -m pytest benchmarks/bench_ppo.py            (--benchmark-disable: checks only)

The test checks what it times, so it can fail: the run must complete (warm-up + timed iterations), every rollout must
have exactly G response tokens (no EOS stop), the time split must add up to the iteration time, and the losses, entropy,
gradient norm, KL and reward-model score must be finite (entropy > 0, gradient norm > 0: the update really ran).
The timing here is a smoke number (one round, shared machine); the runner ``python -m benchmarks.run_ppo`` is the benchmark.
"""
from __future__ import annotations

import math

import pytest
import torch

from .run_ppo import SHAPES, build_checkpoints, run_fastrlhf

ITERS = 1  # warm-up + 1 timed iteration: a smoke check, not a measurement


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoints("smoke", tmp_path_factory.mktemp("bench_ppo"), seed=0)


def test_ppo_iteration_fastrlhf(benchmark, ckpt):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # smoke shape: one thread is fastest and steadiest on a shared 2-core machine
    try:
        res = benchmark.pedantic(lambda: run_fastrlhf("smoke", ckpt, "cpu", ITERS, profile=False), rounds=1,
                                 iterations=1)
    finally:
        torch.set_num_threads(threads)
    S = SHAPES["smoke"]
    assert len(res["iter_times"]) == ITERS + 1
    assert res["response_len"] == S["G"]  # eos_token_id=None: every row runs the full length
    for k in ("s_per_iter", "resp_tok_s", "gen_s", "exp_s", "train_s", "peak_mem", "policy_loss", "value_loss",
              "entropy", "grad_norm", "approx_kl", "kl", "score"):
        assert math.isfinite(res[k]), (k, res[k])
    assert res["s_per_iter"] > 0 and res["gen_s"] > 0 and res["exp_s"] > 0 and res["train_s"] > 0
    assert res["resp_tok_s"] == pytest.approx(S["B"] * S["G"] / res["s_per_iter"])
    assert res["entropy"] > 0 and res["grad_norm"] > 0
    # the three phases are the iteration: their medians add up to the median iteration (exactly with one timed one)
    spread = max(res["iter_times"][1:]) - min(res["iter_times"][1:])
    assert abs(res["gen_s"] + res["exp_s"] + res["train_s"] - res["s_per_iter"]) <= spread + 1e-6
