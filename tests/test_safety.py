"""Bad input and faults against the real ``fastrlhf`` command (a subprocess): tampered checkpoints never run pickled
code, output folders never lose what a run wrote, and every user error is one line with exit status 2.

The tests build tiny checkpoints offline (tests.helpers.models.tiny_checkpoint) and talk to fastrlhf only through its command line.
"""
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.models import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SFT_ROWS = [("what color is the star", "star"), ("repeat the word apple four times", "apple apple apple apple"),
            ("what color is the moon", "white"), ("count from 1 to 3", "1 2 3"), ("reverse : cat dog", "dog cat"),
            ("what color is the sky", "blue")]
FAST = ["--batch_tokens", "128", "--device", "cpu", "--plots", "false"]


def fastrlhf(*args, progress=False, timeout=240, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TRITON_INTERPRET="1", FASTRLHF_DEBUG="0")
    env.pop("FASTRLHF_NO_PROGRESS", None)
    if not progress:
        env["FASTRLHF_NO_PROGRESS"] = "1"
    return subprocess.run([sys.executable, "-m", "fastrlhf", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def error_line(r, cmd: str, status: int = 2) -> str:
    """The one error line of a failed run (asserting the exit status, no traceback, and nothing after it)."""
    assert r.returncode == status, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.split("\n") if line.strip()]
    errors = [line for line in lines if f"fastrlhf {cmd}: error: " in line]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr[-3000:]
    assert errors[0].startswith(f"fastrlhf {cmd}: error: "), repr(errors[0])  # on a line of its own
    return errors[0][len(f"fastrlhf {cmd}: error: "):]


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


class Evil:
    """Unpickling it calls os.makedirs(marker): a file that runs code when loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny policy, a reward model, SFT rows, prompts, and an SFT run (checkpoints 1 and 2) made by the CLI."""
    d = tmp_path_factory.mktemp("safety")
    b = {"dir": d, "model": tiny_checkpoint(d / "m"), "rm": tiny_checkpoint(d / "rm", head="score", seed=1),
         "sft": write_jsonl(d / "sft.jsonl", [{"prompt": p, "response": a} for p, a in SFT_ROWS * 4]),
         "prompts": write_jsonl(d / "prompts.jsonl", [{"prompt": p} for p, _ in SFT_ROWS * 2])}
    r = fastrlhf("sft", "--model", b["model"], "--data", b["sft"], "--output_dir", d / "run", "--max_steps", 2,
                 "--save_every", 1, "--keep_checkpoints", 3, *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    b["run"] = d / "run"
    return b


def sft(b, out, *extra, model=None, data=None, **kw):
    return fastrlhf("sft", "--model", model or b["model"], "--data", data or b["sft"], "--output_dir", out, *FAST,
                    *extra, **kw)


def copy_run(b, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(b["run"], out)
    return out


# ----------------------------------------------------------------------- 1. no pickled code runs from a checkpoint

def test_resume_refuses_code_in_state_metadata(base, tmp_path):
    run = copy_run(base, tmp_path)
    meta = run / "checkpoint-0000002" / "state" / ".metadata"
    marker = tmp_path / "pwned"
    meta.write_bytes(pickle.dumps(Evil(marker)))
    line = error_line(sft(base, run, "--resume", "auto", "--max_steps", 3), "sft")
    assert not marker.exists()
    assert line.startswith(f"{meta}: ") and "os.makedirs" in line and "refused" in line, line


def test_resume_refuses_metadata_that_is_not_checkpoint_metadata(base, tmp_path):
    run = copy_run(base, tmp_path)
    meta = run / "checkpoint-0000002" / "state" / ".metadata"
    meta.write_bytes(pickle.dumps({"state_dict_metadata": {}}))  # only plain types, but not a checkpoint's metadata
    line = error_line(sft(base, run, "--resume", "auto", "--max_steps", 3), "sft")
    assert line.startswith(f"{meta}: ") and "dict" in line, line


def _point_item_at(state: Path, suffix: str, payload: bytes) -> str:
    """Append ``payload`` to the state's shard file and rewrite .metadata (with its own, legitimate types) so that
    the item whose name ends in ``suffix`` is read from it. Returns the item's name."""
    meta_file = state / ".metadata"
    meta = pickle.loads(meta_file.read_bytes())  # the test's own file, written by fastrlhf a moment ago
    key = next(k for k in meta.storage_data if k.fqn.endswith(suffix))
    info = meta.storage_data[key]
    shard = state / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as fh:
        fh.write(payload)
    info.offset, info.length = offset, len(payload)
    meta_file.write_bytes(pickle.dumps(meta))
    return key.fqn


@pytest.mark.parametrize("suffix", ["param_groups.0.lr", "embed_tokens.weight"])
def test_resume_refuses_code_in_state_shards(base, tmp_path, suffix):
    """Non-tensor items (optimizer hyper-parameters) and tensors of the sharded state are both pickles inside
    __0_0.distcp; neither may run code."""
    run = copy_run(base, tmp_path)
    state = run / "checkpoint-0000002" / "state"
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(Evil(marker), buf)
    _point_item_at(state, suffix, buf.getvalue())
    line = error_line(sft(base, run, "--resume", "auto", "--max_steps", 3), "sft")
    assert not marker.exists()
    assert line.startswith(f"{state}") and "os.makedirs" in line and "refused" in line, line


def test_resume_refuses_code_in_trainer_state_in_one_line(base, tmp_path):
    run = copy_run(base, tmp_path)
    f = run / "checkpoint-0000002" / "trainer_state.pt"
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "evil": Evil(marker)}, f)
    line = error_line(sft(base, run, "--resume", "auto", "--max_steps", 3), "sft")
    assert not marker.exists()
    assert line.startswith(f"{f}: ") and "os.makedirs" in line and "refused" in line, line
    assert "weights_only=False" not in line and "weights_only` set to `False" not in line  # no advice to load unsafely


def test_model_weights_that_are_a_pickle_are_refused(base, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(base["model"], m)
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": Evil(marker)}, m / "model.safetensors")  # a pickle named .safetensors
    line = error_line(sft(base, tmp_path / "o", model=m), "sft")
    assert not marker.exists()
    assert line.startswith(f"{m / 'model.safetensors'}: "), line


def test_value_model_weights_of_a_checkpoint_are_never_unpickled(base, tmp_path):
    """PPO's checkpoint holds a value_model/ folder; a pickle there is refused like anywhere else."""
    out = tmp_path / "ppo"
    r = fastrlhf("ppo", "--policy", base["model"], "--reward_model", base["rm"], "--prompts", base["prompts"],
                 "--output_dir", out, "--iterations", 1, "--batch_size", 2, "--minibatch_size", 2, "--ppo_epochs", 1,
                 "--max_new_tokens", 2, "--device", "cpu", "--plots", "false")
    assert r.returncode == 0, r.stderr[-3000:]
    ck = out / "checkpoint-0000001"
    marker = tmp_path / "pwned"
    torch.save({"x": Evil(marker)}, ck / "value_model" / "model.safetensors")
    shutil.rmtree(ck / "state")  # an older checkpoint layout: the value model's weights come from its HF folder
    r = fastrlhf("ppo", "--policy", base["model"], "--reward_model", base["rm"], "--prompts", base["prompts"],
                 "--output_dir", out, "--iterations", 2, "--batch_size", 2, "--minibatch_size", 2, "--ppo_epochs", 1,
                 "--max_new_tokens", 2, "--device", "cpu", "--plots", "false", "--resume", "auto")
    assert not marker.exists()
    line = error_line(r, "ppo")
    assert line.startswith(f"{ck / 'value_model' / 'model.safetensors'}: "), line


# ---------------------------------------------------------------------------------- 2. output folders lose nothing

def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


def test_rerun_into_a_used_output_folder_is_refused_and_changes_nothing(base, tmp_path):
    run = copy_run(base, tmp_path)
    before = _tree(run)
    line = error_line(sft(base, run, "--max_steps", 1), "sft")
    assert line.startswith(f"{run}: ") and "--resume" in line and "--overwrite" in line, line
    assert _tree(run) == before


def test_used_output_folder_is_checked_before_loading(base, tmp_path):
    run = copy_run(base, tmp_path)
    line = error_line(sft(base, run, model=tmp_path / "no_such_model"), "sft")
    assert line.startswith(f"{run}: "), line


def test_overwrite_starts_a_fresh_run_and_keeps_its_checkpoints(base, tmp_path):
    """The issue's case: a 2-step run into a folder holding checkpoint-3 and checkpoint-6 of an older run."""
    run = copy_run(base, tmp_path)
    for old, new in (("checkpoint-0000001", "checkpoint-0000003"), ("checkpoint-0000002", "checkpoint-0000006")):
        os.rename(run / old, run / new)
    r = sft(base, run, "--max_steps", 2, "--save_every", 1, "--keep_checkpoints", 2, "--overwrite", "true",
            "--plots", "true")
    assert r.returncode == 0, r.stderr[-3000:]
    cks = sorted(p.name for p in run.glob("checkpoint-*"))
    assert cks == ["checkpoint-0000001", "checkpoint-0000002"], cks
    assert (run / "checkpoint-0000002" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [row["step"] for row in rows] == [1, 2]  # the old run's rows are gone, not mixed in


def test_resume_from_an_older_checkpoint_never_deletes_what_it_writes(base, tmp_path):
    """Resuming from checkpoint-1 in a folder that also holds a later checkpoint: rotation removes only checkpoints
    older than the newest ``keep`` this run wrote; the run's own newest checkpoints survive."""
    run = copy_run(base, tmp_path)
    os.rename(run / "checkpoint-0000002", run / "checkpoint-0000009")
    r = sft(base, run, "--resume", run / "checkpoint-0000001", "--max_steps", 4, "--save_every", 1,
            "--keep_checkpoints", 2)
    assert r.returncode == 0, r.stderr[-3000:]
    cks = sorted(p.name for p in run.glob("checkpoint-*"))
    assert "checkpoint-0000003" in cks and "checkpoint-0000004" in cks, cks
    assert "checkpoint-0000001" not in cks and "checkpoint-0000002" not in cks, cks
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]


def test_stale_temporary_folders_of_killed_saves_are_removed(base, tmp_path):
    run = copy_run(base, tmp_path)
    for name in (".checkpoint-0000003.tmp-0123abcd", ".checkpoint-0000002.old-89abcdef",
                 "..checkpoint-0000003.tmp-0123abcd.tmp-4567cdef"):  # the last: the HF folder's own temporary one
        (run / name / "state").mkdir(parents=True)
        (run / name / "model.safetensors").write_bytes(b"x" * 1000)
    keep = run / ".my-notes.tmp-keepme"  # not a checkpoint's temporary folder: left alone
    keep.mkdir()
    r = sft(base, run, "--resume", "auto", "--max_steps", 3)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not list(run.glob(".checkpoint-*")) and not list(run.glob("..checkpoint-*")) and keep.is_dir()
    assert (run / "checkpoint-0000003").is_dir()


def test_pipeline_refuses_a_used_output_folder_before_any_work(tmp_path):
    root = tmp_path / "pipe"
    (root / "sft").mkdir(parents=True)
    (root / "summary.json").write_text("{}")
    line = error_line(fastrlhf("pipeline", "--output_dir", root, "--device", "cpu"), "pipeline")
    assert line.startswith(f"{root}: ") and "--overwrite" in line, line
    assert sorted(p.name for p in root.iterdir()) == ["sft", "summary.json"]
    f = tmp_path / "afile"
    f.write_text("mine")
    line = error_line(fastrlhf("pipeline", "--output_dir", f, "--device", "cpu"), "pipeline")
    assert line == f"{f}: --output_dir is a file, not a folder" and f.read_text() == "mine", line


# ------------------------------------------------------------------------------------------ 3-13. one clear line

def test_truncated_state_shard(base, tmp_path):
    run = copy_run(base, tmp_path)
    state = run / "checkpoint-0000002" / "state"
    shard = state / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    line = error_line(sft(base, run, "--resume", "auto", "--max_steps", 3), "sft")
    assert line.startswith(f"{state}: cannot load the training state"), line


def test_truncated_config_json(base, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(base["model"], m)
    (m / "config.json").write_text((m / "config.json").read_text()[:50])
    line = error_line(sft(base, tmp_path / "o", model=m), "sft")
    assert line.startswith(f"{m / 'config.json'}: not valid JSON"), line


def test_truncated_tokenizer_json(base, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(base["model"], m)
    (m / "tokenizer.json").write_text((m / "tokenizer.json").read_text()[:200])
    line = error_line(sft(base, tmp_path / "o", model=m), "sft")
    assert line.startswith(f"{m}: cannot load the tokenizer ("), line


def test_truncated_safetensors_names_the_file(base, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(base["model"], m)
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[:3000])
    line = error_line(sft(base, tmp_path / "o", model=m), "sft")
    assert line.startswith(f"{f}: not a readable safetensors file"), line


def test_config_json_that_does_not_match_the_weights(base, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(base["model"], m)
    cfg = json.loads((m / "config.json").read_text())
    cfg["intermediate_size"] += 32
    (m / "config.json").write_text(json.dumps(cfg))
    line = error_line(sft(base, tmp_path / "o", model=m), "sft")
    assert line.startswith(f"{m}: ") and "mlp" in line and "config.json" in line, line


def test_output_dir_that_is_a_file_is_checked_first(base, tmp_path):
    f = tmp_path / "afile"
    f.write_text("mine")
    line = error_line(sft(base, f, model=tmp_path / "no_such_model"), "sft")
    assert line == f"{f}: --output_dir is a file, not a folder", line
    assert f.read_text() == "mine"


def test_generate_prompt_longer_than_the_context(base, tmp_path):
    long = " ".join(["1"] * 70)  # the tiny model's context is 64 tokens
    line = error_line(fastrlhf("generate", "--model", base["model"], "--prompt", long, "--max_new_tokens", 4,
                               "--device", "cpu"), "generate")
    assert line.startswith("--prompt has ") and "context" in line, line
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "count from 1 to 3"}, {"prompt": long}])
    line = error_line(fastrlhf("generate", "--model", base["model"], "--prompts", p, "--max_new_tokens", 4,
                               "--device", "cpu"), "generate")
    assert line.startswith(f"{p}:2: field 'prompt' has "), line


def _ppo(b, out, *extra):
    return fastrlhf("ppo", "--policy", b["model"], "--prompts", b["prompts"], "--output_dir", out, "--iterations", 1,
                    "--batch_size", 2, "--minibatch_size", 2, "--ppo_epochs", 1, "--max_new_tokens", 2,
                    "--device", "cpu", "--plots", "false", *extra)


def test_ppo_refuses_a_reward_model_without_a_score_head(base, tmp_path):
    line = error_line(_ppo(base, tmp_path / "o", "--reward_model", base["model"]), "ppo")
    assert line.startswith(f"{base['model']}: --reward_model ") and "score head" in line, line
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    r = _ppo(base, tmp_path / "o2", "--reward_model", base["model"], "--random_reward_head", "true")
    assert r.returncode == 0, r.stderr[-3000:]  # the explicit opt-in


@pytest.mark.parametrize("cmd,flag,value,rule", [
    ("sft", "eval_fraction", "2", ">= 0 and < 1"), ("sft", "batch_tokens", "0", ">= 1"), ("sft", "lr", "-1", "> 0"),
    ("sft", "grad_accum", "0", ">= 1"), ("sft", "keep_checkpoints", "-1", ">= 0"), ("rm", "batch_size", "0", ">= 1"),
    ("rm", "eval_fraction", "1", ">= 0 and < 1"), ("ppo", "max_new_tokens", "0", ">= 1"), ("ppo", "lr", "0", "> 0"),
    ("ppo", "clip_eps", "0", "> 0"), ("ppo", "top_p", "1.5", "> 0 and <= 1"), ("ppo", "temperature", "0", "> 0"),
    ("generate", "max_new_tokens", "0", ">= 1"), ("generate", "num_samples", "0", ">= 1"),
    ("generate", "temperature", "-1", ">= 0"), ("eval", "batch_size", "0", ">= 1"), ("pipeline", "k", "1", ">= 2 and <= 9"),
])
def test_out_of_range_values_are_refused_before_any_work(tmp_path, cmd, flag, value, rule):
    """Every range is checked when the config is read: nothing is loaded (the model paths do not even exist)."""
    missing = str(tmp_path / "no_such_model")
    args = {"sft": ["--model", missing, "--data", missing], "rm": ["--model", missing, "--data", missing],
            "ppo": ["--policy", missing, "--reward_model", missing, "--prompts", missing],
            "generate": ["--model", missing, "--prompt", "x"], "eval": ["--policy", missing, "--prompts", missing],
            "pipeline": []}[cmd]
    out = [] if cmd in ("generate", "eval") else ["--output_dir", tmp_path / "o"]
    line = error_line(fastrlhf(cmd, *args, *out, f"--{flag}", value), cmd)
    assert line.startswith(f"command line: --{flag}: ") and f"must be {rule}" in line, line
    assert not (tmp_path / "o").exists()


def test_out_of_range_value_in_a_config_file(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("eval_fraction: 2.0\n")
    line = error_line(fastrlhf("sft", "--config", cfg), "sft")
    assert line.startswith(f"{cfg}: field 'eval_fraction': ") and "must be >= 0 and < 1" in line, line


def test_ctrl_c_saves_then_exits_130(base, tmp_path):
    out = tmp_path / "o"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1", FASTRLHF_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "fastrlhf", "sft", "--model", base["model"], "--data", base["sft"],
                          "--output_dir", str(out), "--max_steps", "100000", *FAST], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in p.stdout:
            if line.startswith("[sft] step 2/"):
                break
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    cks = list(out.glob("checkpoint-*"))
    assert len(cks) == 1 and (cks[0] / "trainer_state.pt").is_file()


# ------------------------------------------------------------------------------------------------- also noticed

def test_missing_model_folder_is_reported_as_missing(base, tmp_path):
    line = error_line(sft(base, tmp_path / "o", model=tmp_path / "nowhere"), "sft")
    assert line == f"{tmp_path / 'nowhere'}: --model: no such folder", line


def test_directory_given_as_data(base, tmp_path):
    d = tmp_path / "data_dir"
    d.mkdir()
    line = error_line(sft(base, tmp_path / "o", data=d), "sft")
    assert line == f"{d}: is a folder, not a jsonl file", line


def test_directory_given_as_config(tmp_path):
    line = error_line(fastrlhf("sft", "--config", tmp_path), "sft")
    assert line == f"{tmp_path}: --config is a folder, not a YAML/TOML file", line


def test_malformed_json_names_the_right_column(base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    row = '{"prompt": "count from 1 to 3", "response": "1 2 3"'
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + row + "\n")
    line = error_line(sft(base, tmp_path / "o", data=bad), "sft")
    assert line == f"{bad}:2: malformed JSON (Expecting ',' delimiter at column {len(row) + 1})", line


def test_value_error_from_a_bad_combination_exits_2(base):
    line = error_line(fastrlhf("generate", "--model", base["model"], "--prompt", "x", "--prompts", base["prompts"]),
                      "generate")
    assert "exactly one of 'prompt'" in line, line


def test_error_after_a_progress_bar_starts_on_a_fresh_line(tmp_path):
    m = tiny_checkpoint(tmp_path / "m", nan=True)  # non-finite loss at step 1, after the progress bar is drawn
    d = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "response": a} for p, a in SFT_ROWS * 4])
    r = fastrlhf("sft", "--model", m, "--data", d, "--output_dir", tmp_path / "o", "--max_steps", 3, *FAST,
                 progress=True)
    assert "sft:   0%|" in r.stderr  # a bar was drawn
    line = error_line(r, "sft", status=1)
    assert line.startswith("FloatingPointError: sft") and "non-finite" in line, line
