"""fastrlhf.tools.cli: commands, --help of every field, one-line errors naming the field/file, bench dispatch, selfcheck."""
import json
import subprocess
import sys
import types

import pytest

from fastrlhf.tools import cli, task
from tests.helpers.models import tiny_checkpoint


def test_usage_and_unknown_command(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("sft", "rm", "ppo", "pipeline", "generate", "eval", "bench", "selfcheck"):
        assert f"  {cmd}" in out
    assert cli.main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err


@pytest.mark.parametrize("cmd,field,default", [("sft", "--batch_tokens", "4096"), ("rm", "--sft_data", "''"),
                                               ("generate", "--max_new_tokens", "64")])
def test_help_lists_fields_with_defaults(capsys, cmd, field, default):
    assert cli.main([cmd, "--help"]) == 0
    out = capsys.readouterr().out
    assert field in out and f"default: {default}" in out


def test_errors_are_one_line_naming_field_and_file(tmp_path, capsys):
    assert cli.main(["sft", "--lr", "fast"]) == 2
    assert "fastrlhf sft: error: command line: --lr: expected a number" in capsys.readouterr().err
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 0.1\nlearning_rate: 0.2\n")
    assert cli.main(["sft", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "run.yaml" in err and "'learning_rate'" in err and "Traceback" not in err
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    model = tiny_checkpoint(tmp_path / "m")
    assert cli.main(["sft", "--model", model, "--data", str(bad), "--output_dir", str(tmp_path / "o")]) == 2
    assert f"{bad}:2: malformed JSON" in capsys.readouterr().err


def test_sft_from_toml_config(tmp_path, capsys):
    model = tiny_checkpoint(tmp_path / "m")
    d = task.write_sft_data(str(tmp_path / "sft.jsonl"), 12, seed=0)
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "{model}"\ndata = "{d}"\noutput_dir = "{tmp_path / "o"}"\nbatch_tokens = 128\n'
                   f'device = "cpu"\nplots = false\n')
    assert cli.main(["sft", "--config", str(cfg), "--max_steps", "2"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert (tmp_path / "o" / "checkpoint-0000002" / "run_config.yaml").exists()


def test_bench_dispatch(monkeypatch, capsys):
    seen = {}
    fake = types.ModuleType("fastrlhf.benchmarks.run_fake")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "fastrlhf.benchmarks.run_fake", fake)
    monkeypatch.setattr(cli, "bench_names", lambda: ["fake", "kernels"])
    assert cli.main(["bench", "fake", "--size", "3"]) == 0 and seen["argv"] == ["--size", "3"]
    assert cli.main(["bench", "nope"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_real_bench_names():
    names = cli.bench_names()
    assert "kernels" in names and "generate" in names
    assert "plots" not in names and "workload" not in names and "timing" not in names  # helpers, not runners


def test_selfcheck_table(capsys):
    assert cli.main(["selfcheck"]) == 0
    out = capsys.readouterr().out
    assert "9/9 ops pass" in out and "linear_logprobs" in out and "ppo_value_loss" in out


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "fastrlhf", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "selfcheck" in r.stdout


def test_selfcheck_catches_a_wrong_kernel(monkeypatch, capsys):
    from fastrlhf import kernels
    real = kernels.whiten
    monkeypatch.setattr(kernels, "whiten", lambda x, mask=None, **kw: real(x, mask, **kw) * (1 + 1e-4))  # 1e-4 relative off
    assert cli.main(["selfcheck"]) == 1
    out = capsys.readouterr().out
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("whiten")] == ["FAIL"]
    assert "8/9 ops pass" in out


def test_generate(tmp_path, capsys):
    model = tiny_checkpoint(tmp_path / "m")
    assert cli.main(["generate", "--model", model, "--prompt", "count from 1 to 3", "--max_new_tokens", "4",
                     "--device", "cpu"]) == 0
    assert "count from 1 to 3\n  -> " in capsys.readouterr().out
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "reverse : cat dog"}\n{"messages": [{"role": "user", "content": "count from 2 to 3"}]}\n')
    out = tmp_path / "out.jsonl"
    assert cli.main(["generate", "--model", model, "--prompts", str(prompts), "--num_samples", "2", "--temperature",
                     "1.0", "--max_new_tokens", "3", "--output", str(out), "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 2 and all(len(r["responses"]) == 2 for r in rows)
    assert cli.main(["generate", "--model", model, "--prompt", "x", "--prompts", str(prompts)]) == 2  # bad input
    assert "exactly one of 'prompt'" in capsys.readouterr().err
