"""benchmarks/run_ppo.py: the FLOP model behind its GFLOP/s and MFU columns, the time-split summary, the CSV writer."""
from __future__ import annotations

import csv

import pytest
import torch

from benchmarks.run_ppo import (CSV_COLUMNS, SHAPES, _summary, _write_csv, build_checkpoints, merge_rounds, model_flops,
                            run_fastrlhf)


def test_model_flops_match_counted_matmuls(tmp_path):
    """torch's FlopCounterMode over real iterations (warm-up + 1) counts every mm/addmm our PPO core runs. It must equal
    model_flops without the attention term (CPU SDPA is not counted by FlopCounterMode), up to the logits that
    linear_logprobs may recompute in backward (at most 2·N·H·V per trained response token batch), the engine's second
    head pass per decode step for the sampled token's log-prob (2·B·G·H·V: the training head's kernel) and the 1-wide
    score heads (2·H per token, < 0.1 %)."""
    from torch.utils.flop_counter import FlopCounterMode
    ck = build_checkpoints("smoke", tmp_path, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with FlopCounterMode(display=False) as fc:
            run_fastrlhf("smoke", ck, "cpu", 1, profile=False)
    finally:
        torch.set_num_threads(threads)
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    gemms = ("aten.mm", "aten.addmm", "aten.bmm", "mkldnn._linear_pointwise")  # the last: the engine's CPU decode
    counted = sum(v for k, v in counts.items() if k in gemms) / 2  # per iteration
    mf = model_flops("smoke")
    S = SHAPES["smoke"]
    m = S["model"]
    recompute = S["epochs"] * S["B"] * S["G"] * 2 * m["hidden_size"] * m["vocab_size"]
    expected = mf["total"] - mf["attention"]
    assert expected * 0.999 <= counted <= (expected + recompute) * 1.01, (counted, expected, recompute)


def test_model_flops_tiny_closed_form():
    """The 'tiny' shape by hand: body 2·4·(256·(256+2·2·64) + 256·256 + 3·256·768) = 6,291,456 FLOP/token, head 2·256·4096."""
    mf = model_flops("tiny")
    body, head = 6_291_456, 2 * 256 * 4096
    B, P, G, T = 16, 32, 64, 96
    no_attn = (B * P * body + B * head + B * (G - 1) * (body + head)  # generation
               + 4 * B * T * body + 2 * B * G * head  # experience
               + 4 * 3 * (2 * B * T * body + B * G * head))  # 4 epochs of policy + value fwd+bwd
    assert mf["total"] - mf["attention"] == pytest.approx(no_attn, rel=1e-12)
    assert mf["generation"] + mf["experience"] + mf["training"] == pytest.approx(mf["total"], rel=1e-12)


def test_summary_drops_warmup():
    times = [(5.0, 1.0, 4.0), (1.0, 0.5, 2.0), (1.2, 0.4, 2.2), (0.9, 0.6, 1.8)]
    s = _summary(times, B=2, G=10)
    assert s["s_per_iter"] == pytest.approx(3.5)  # median of 3.5, 3.8, 3.3 — the 10 s warm-up is not in it
    assert s["gen_s"] == pytest.approx(1.0) and s["exp_s"] == pytest.approx(0.5) and s["train_s"] == pytest.approx(2.0)
    assert s["resp_tok_s"] == pytest.approx(20 / 3.5)
    assert s["setup_s"] == pytest.approx(10.0 - 3.5)


def test_write_csv_appends_and_keeps_foreign_header(tmp_path):
    rows = [dict(provider="fastrlhf", metric="s_per_iter", median=1.25, unit="s")]
    meta = dict(date="d", device="cpu", bench="ppo", shape="smoke", torch="t", commit="c")
    p = tmp_path / "results.csv"
    assert _write_csv(p, rows, meta) == p
    _write_csv(p, rows, meta)
    with open(p, newline="") as fh:
        got = list(csv.reader(fh))
    assert got[0] == CSV_COLUMNS and len(got) == 3 and got[1][CSV_COLUMNS.index("median")] == "1.25"
    other = tmp_path / "kernels.csv"
    other.write_text("date,op\nx,y\n")
    used = _write_csv(other, rows, meta)
    assert used.name == "kernels_ppo.csv" and other.read_text() == "date,op\nx,y\n"


def test_merge_rounds_pools_timed_iterations():
    r1 = _summary([(9.0, 1.0, 1.0), (1.0, 1.0, 1.0), (1.0, 1.0, 2.0)], B=2, G=10)
    r2 = _summary([(9.0, 9.0, 9.0), (2.0, 1.0, 1.0), (1.0, 1.0, 5.0)], B=2, G=10)
    r1.update(peak_mem=5.0)
    r2.update(peak_mem=7.0)
    m = merge_rounds([r1, r2], B=2, G=10)
    assert m["iter_times"] == [11.0, 3.0, 4.0, 4.0, 7.0]  # both rounds' warm-ups gone except the first, for setup_s
    assert m["s_per_iter"] == pytest.approx(4.0) and m["peak_mem"] == 7.0 and m["rounds"] == 2
    assert merge_rounds([r1, {"error": "boom"}], B=2, G=10) == {"error": "boom"}


def test_summary_and_merge_count_valid_tokens_of_the_realistic_workload():
    """Realistic workload: tokens/s = median valid response tokens per timed iteration / median seconds; merging
    rounds pools the timed iterations' tokens, lengths and padding fractions (warm-ups dropped, as the times)."""
    r1 = _summary([(9.0, 1.0, 1.0), (1.0, 1.0, 1.0), (1.0, 1.0, 2.0)], B=2, G=10, resp_tokens=[20, 6, 10])
    assert r1["resp_tok_s"] == pytest.approx(8.0 / 3.5)  # median(6, 10) / median(3, 4); the warm-up's 20 ignored
    r2 = _summary([(9.0, 9.0, 9.0), (2.0, 1.0, 1.0), (1.0, 1.0, 5.0)], B=2, G=10, resp_tokens=[20, 4, 12])
    for r, lens in ((r1, [[9, 9], [3, 3], [5, 5]]), (r2, [[9, 9], [2, 2], [6, 6]])):
        r.update(peak_mem=1.0, resp_tokens=[sum(x) for x in lens], resp_lens=lens, pad_frac=[0.0, 0.5, 0.25])
    m = merge_rounds([r1, r2], B=2, G=10)
    assert m["resp_lens"] == [[9, 9], [3, 3], [5, 5], [2, 2], [6, 6]] and m["pad_frac"] == [0.0, 0.5, 0.25, 0.5, 0.25]
    assert m["resp_tok_s"] == pytest.approx(8.0 / 4.0)  # median(6, 10, 4, 12) / median(3, 4, 4, 7)
