"""fastrlhf.runtime.metrics: jsonl rows, console line, PNG curves, explained variance, timers."""
import json
import math
import time

import numpy as np
import torch

from fastrlhf.runtime import metrics


def test_jsonl_console_and_plot(tmp_path, capsys):
    log = metrics.MetricsLogger(tmp_path, stage="sft", total_steps=3)
    for s in range(1, 4):
        log.log(s, {"loss": torch.tensor(2.0 / s), "lr": 1e-4 * s, "tokens_per_s": 12345.0, "note": "x"})
    png = log.close(tmp_path / "ckpt")
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["loss"] == 1.0 and rows[0]["stage"] == "sft"
    out = capsys.readouterr().out
    assert "[sft] step 2/3 | loss 1 | lr 2.00e-04 | tok/s 12.3k" in out
    assert png is not None and png.exists() and png.parent.name == "ckpt" and png.read_bytes()[:4] == b"\x89PNG"
    # appending continues the same file (resume)
    with metrics.MetricsLogger(tmp_path, stage="sft", plots=False) as log2:
        log2.log(4, {"loss": 0.1}, echo=False)
    assert len(open(tmp_path / "metrics.jsonl").readlines()) == 4


def test_explained_variance_against_numpy():
    y = torch.randn(7, 9)
    p = y + 0.3 * torch.randn(7, 9)
    m = (torch.rand(7, 9) > 0.3).float()
    yy, pp = y[m.bool()].double().numpy(), p[m.bool()].double().numpy()
    assert math.isclose(metrics.explained_variance(p, y, m), 1 - np.var(yy - pp) / np.var(yy), rel_tol=1e-9)
    assert metrics.explained_variance(y, y) == 1.0
    assert math.isnan(metrics.explained_variance(y, torch.ones_like(y)))


def test_timer_and_progress():
    t = metrics.Timer()
    with t("generate"):
        time.sleep(0.01)
    with t("generate"):
        time.sleep(0.01)
    d = t.pop()
    assert d["time/generate"] >= 0.02 and t.pop() == {}
    assert list(metrics.progress(range(3), desc="x", disable=True)) == [0, 1, 2]
    assert sum(metrics.progress(range(4), total=4, desc="y")) == 6


def test_dict_first_call_style(tmp_path, capsys):
    log = metrics.MetricsLogger(tmp_path, name="ppo")
    log.log({"step": 2, "score": 0.5, "kl": 0.1}, step=2, console=False)
    log.log({"step": 3, "score": 0.75}, step=3)
    assert log.close(plots=False) is None
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["score"], r["stage"]) for r in rows] == [(2, 0.5, "ppo"), (3, 0.75, "ppo")]
    out = capsys.readouterr().out
    assert "[ppo] step 3 | score 0.75" in out and "step 2" not in out


def test_resume_drops_rows_after_the_checkpoint_and_keeps_history(tmp_path):
    with metrics.MetricsLogger(tmp_path, stage="sft", plots=False) as log:
        for s in range(1, 6):
            log.log(s, {"loss": float(s)}, echo=False)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "loss"')                                  # torn line of a killed run
    log = metrics.MetricsLogger(tmp_path, stage="sft", resume_step=3, plots=False)
    assert log.history["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    log.log(4, {"loss": 40.0}, echo=False)
    log.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
