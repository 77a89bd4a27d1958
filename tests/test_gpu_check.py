"""benchmarks/gpu_check.sh / benchmarks.run_gpu_check: the one-call GPU check cannot rot on a CPU machine.

The dry run parses every runner's exact flags with the runner's own parser, checks the shapes they name and that pytest
collects the test selection; the stage machinery (time limits, the merged CSV, the summary) runs here on tiny stand-ins.
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastrlhf.benchmarks import run_gpu_check as gc

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def test_dry_run_of_the_script_checks_every_stage(tmp_path):
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for st in gc.stages(tmp_path):
        assert f"dry run: {st.name}: " in p.stdout, p.stdout
    assert "pytest collects" in p.stdout
    assert "--shape h100 = {'logits': (32, 512, 151936)" in p.stdout  # the H100 kernel shapes
    assert (tmp_path / "setup.log").exists()


def test_dry_run_rejects_a_bad_flag_or_shape(tmp_path):
    st = next(s for s in gc.stages(tmp_path) if s.name == "generate")
    bad_flag = gc.Stage(st.name, (*st.argv, "--no-such-flag"), st.limit_s, st.min_s, st.runner, st.shapes)
    with pytest.raises(RuntimeError, match="rejects its flags"):
        gc.dry_run_stage(bad_flag)
    bad_shape = gc.Stage("kernels", ("benchmarks.run_kernels", "--shape", "h200"), 10, 1, "benchmarks.run_kernels",
                         {"shape": "SHAPES"})
    with pytest.raises(RuntimeError, match="rejects its flags"):  # argparse choices catch it first
        gc.dry_run_stage(bad_shape)


def test_stage_over_its_limit_is_killed_and_reported(tmp_path):
    st = gc.Stage("sleepy", ("timeit", "-n", "1", "import time; time.sleep(60)"), 1, 0)
    status, secs = gc._run_stage(st, tmp_path, 1.5, _env())
    assert status.startswith("TIMEOUT") and secs < 30
    assert (tmp_path / "sleepy.log").read_text().startswith("$ ")


def test_results_merge_into_one_csv_and_summary(tmp_path):
    k_cols = ["date", "device", "op", "mode", "provider", "shape", "median_ms", "p20_ms", "p80_ms", "throughput", "unit",
              "pct_ceiling", "peak_extra_mib", "max_abs_err", "torch", "triton", "commit"]
    with open(tmp_path / "kernels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=k_cols)
        w.writeheader()
        w.writerow(dict(date="d", device="H200", op="linear_logprobs", mode="fwd+bwd", provider="fastrlhf",
                        shape="N=16384", median_ms="27.5", p20_ms="27", p80_ms="28", throughput="600", unit="TFLOP/s",
                        pct_ceiling="80", peak_extra_mib="400", max_abs_err="1e-3", torch="t", triton="3.6",
                        commit="c"))
    with open(tmp_path / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=gc.GEN_COLUMNS)
        w.writeheader()
        w.writerow(dict(date="d", device="H200", bench="generate", shape="qwen2-0.5b", provider="fastrlhf",
                        metric="tokens_per_s", median="41000", unit="tok/s", torch="t", commit="c"))
    rows = gc.merge_results(tmp_path)
    assert not (tmp_path / "kernels.csv").exists()
    assert len(rows) == 1 + 5
    again = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["metric"] for r in again][:2] == ["tokens_per_s", "linear_logprobs fwd+bwd time"]
    assert again[1]["median"] == "27.5" and again[1]["unit"] == "ms"
    text = gc.summary([("kernels", "ok", 50.0), ("ppo", "TIMEOUT after 150 s", 150.0)], rows, "device: H200", 200.0)
    assert "| ppo | TIMEOUT after 150 s | 150 |" in text
    assert "| generate | qwen2-0.5b | fastrlhf | tokens_per_s | 41000 | tok/s |" in text


def test_stage_limits_fit_one_device_call():
    """The stage limits sum to at most the default budget + the slack, the budget leaves the set-up room within 8
    minutes, and even the worst case (every stage at its limit) ends inside one 10-minute device command."""
    total = sum(s.limit_s for s in gc.stages(Path("/tmp")))
    assert total <= gc.DEFAULT_BUDGET_S + gc.SLACK_S
    assert len(gc.stages(Path("/tmp"))) + 2 <= 8  # <stage>.log each + summary.md + results.csv: a device call returns 8
    assert gc.DEFAULT_BUDGET_S + 40 <= 8 * 60 and total + 40 <= 600


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_to_run_without_cuda(tmp_path):
    assert gc.main(["--out", str(tmp_path)]) == 2


@pytest.mark.slow
def test_linear_configs_runner_smoke(tmp_path):
    """The candidate configs run (interpreted Triton on CPU) and give the shipped config's log-probs."""
    out = tmp_path / "lc.csv"
    env = dict(_env(), TRITON_INTERPRET="1", FASTRLHF_KERNEL_BACKEND="triton")
    p = subprocess.run([sys.executable, "-m", "benchmarks.run_linear_configs", "--shape", "smoke", "--device", "cpu",
                        "--rep-ms", "1", "--csv", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = list(csv.DictReader(open(out)))
    from fastrlhf.benchmarks.run_linear_configs import CANDIDATES
    assert {r["provider"] for r in rows} == set(CANDIDATES) and len(rows) == 3 * len(CANDIDATES)
    assert all(float(r["median"]) <= 1e-5 for r in rows if r["metric"] == "max_dlogp")
    assert all(float(r["median"]) > 0 for r in rows if r["metric"].endswith("_ms"))
