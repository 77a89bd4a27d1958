"""The kernel benchmark runner (benchmarks/run_kernels.py) end to end on CPU, and its timing / memory helpers.

The runner's own timings are not checked (they are the benchmark's job); its plumbing is: every op yields a fastrlhf
and an eager row, the CSV is well formed and appends, the error column is small, and the memory probe is exact.
"""
import csv
import importlib
import math
import time

import pytest
import torch

from fastrlhf.benchmarks import run_kernels as runner
from fastrlhf.benchmarks.timing import bench, bench_interleaved, peak_extra_mib

OPS_IN_CSV = {"logprobs", "linear_logprobs", "kl_full_vs_estimators", "gae+whiten", "ppo_loss+k3+value"}


def _read(path):
    with open(path, newline="") as fh:
        rd = csv.reader(fh)
        header = next(rd)
        return header, [dict(zip(header, r)) for r in rd]


def test_runner_end_to_end_writes_wellformed_csv(tmp_path, capsys):
    """All ops at the 'smoke' preset with minimal timing budgets; then a second run appends to the same CSV."""
    path = tmp_path / "results.csv"
    assert runner.main(["--shape", "smoke", "--warmup-ms", "0", "--rep-ms", "0", "--csv", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "| op " in printed and "ceilings (this run)" in printed
    assert "peak extra memory vs N" in printed
    header, rows = _read(path)
    assert header == runner.CSV_COLUMNS
    assert {r["op"] for r in rows} == OPS_IN_CSV
    for op in OPS_IN_CSV:
        provs = {r["provider"] for r in rows if r["op"] == op}
        assert {"fastrlhf", "eager"} <= provs, (op, provs)
    assert {r["mode"] for r in rows if r["op"] == "logprobs"} == {"fwd", "fwd+bwd"}
    assert {r["provider"] for r in rows if r["op"] == "kl_full_vs_estimators"} == {
        "fastrlhf", "eager", "k1-logprobs", "k3-logprobs"}
    assert "mean |k3 − KL|" in printed
    for r in rows:
        assert len(r) == len(runner.CSV_COLUMNS) and all(r[c] != "" for c in runner.CSV_COLUMNS), r
        med, p20, p80 = float(r["median_ms"]), float(r["p20_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= med <= p80, r
        assert float(r["throughput"]) > 0 and math.isfinite(float(r["pct_ceiling"])), r
        assert r["unit"] in ("GB/s", "GFLOP/s"), r
        assert float(r["peak_extra_mib"]) >= 0, r
        # fp32 inputs: every provider agrees with float64 to far better than 1e-3 (bf16-level error would be ~1e-2)
        assert 0 <= float(r["max_abs_err"]) < 1e-3, r
        assert r["device"] and r["torch"] == torch.__version__ and r["commit"], r
        assert "fp32" in r["shape"], r
    n_first = len(rows)
    assert runner.main(["--shape", "smoke", "--ops", "ppo", "--warmup-ms", "0", "--rep-ms", "0",
                        "--csv", str(path)]) == 0
    header2, rows2 = _read(path)
    assert header2 == runner.CSV_COLUMNS and len(rows2) == n_first + 2  # appended, header not repeated


def test_runner_tiny_preset_cheap_ops():
    """The 'tiny' preset's GAE and PPO benches (the cheap ones) run and report both providers."""
    ctx = runner.run(["gae", "ppo"], "tiny", warmup_ms=0, rep_ms=0, min_reps=1)
    assert not [s for s in ctx.skipped if "fastrlhf" in s or "eager" in s], ctx.skipped
    assert {(r["op"], r["provider"]) for r in ctx.rows} == {
        ("gae+whiten", "fastrlhf"), ("gae+whiten", "eager"),
        ("ppo_loss+k3+value", "fastrlhf"), ("ppo_loss+k3+value", "eager")}
    assert all(r["shape"].startswith("B=64 T=1024") for r in ctx.rows)


def test_runner_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        runner.main(["--ops", "nope"])
    with pytest.raises(ValueError, match="shape"):
        runner.run(["gae"], "huge")
    other = tmp_path / "results.csv"  # shared file already holding another runner's columns
    other.write_text("a,b\n1,2\n")
    row = dict(op="gae+whiten", mode="fwd", provider="eager", shape="B=1 T=1 fp32", median_ms=1.0, p20_ms=1.0,
               p80_ms=1.0, throughput=1.0, unit="GB/s", pct_ceiling=1.0, peak_extra_mib=0.0, max_abs_err=0.0)
    meta = dict(date="d", device="cpu", torch="t", triton="tr", commit="c")
    used = runner.write_csv(other, [row], meta)
    assert used == tmp_path / "results_kernels.csv" and other.read_text() == "a,b\n1,2\n"
    header, rows = _read(used)
    assert header == runner.CSV_COLUMNS and len(rows) == 1
    assert {k: rows[0][k] for k in meta} == meta and rows[0]["op"] == "gae+whiten"
    assert float(rows[0]["median_ms"]) == 1.0 and float(rows[0]["max_abs_err"]) == 0.0
    (tmp_path / "results_kernels.csv").write_text("x\n")
    with pytest.raises(ValueError, match="header"):
        runner.write_csv(other, [row], meta)


def test_peak_extra_mib_cpu_sees_torch_allocations():
    """8 MiB then 4 MiB live together, the 8 MiB freed: the peak is 12 MiB (the returned 4 MiB counts, as on CUDA)."""
    def fn():
        a = torch.empty(2 * 2**20, dtype=torch.float32)
        b = torch.empty(2**20, dtype=torch.float32)
        a.fill_(1)
        del a
        return b
    assert peak_extra_mib(fn, "cpu") == pytest.approx(12.0, abs=0.01)
    assert peak_extra_mib(lambda: None, "cpu") == pytest.approx(0.0, abs=0.01)


def test_bench_cpu_orders_quantiles():
    t = bench(lambda: time.sleep(0.002), "cpu", warmup_ms=0, rep_ms=20, min_reps=5)
    assert t.n >= 5
    assert 1.9 <= t.p20_ms <= t.median_ms <= t.p80_ms


def test_bench_interleaved_times_each_fn_on_its_own_budget():
    calls = []
    fast = lambda: (calls.append("f"), time.sleep(0.001))  # noqa: E731
    slow = lambda: (calls.append("s"), time.sleep(0.02))  # noqa: E731  (20x apart: robust to a loaded machine)
    tf, ts = bench_interleaved([fast, slow], warmup_ms=0, rep_ms=60, min_reps=3)
    assert ts.n >= 3 and tf.n > ts.n  # the fast one gets more calls from the same budget
    assert 0.9 <= tf.median_ms < ts.median_ms and 19.9 <= ts.median_ms
    assert calls[2:4] == ["f", "s"]  # after one untimed call each, timed round robin


def test_linear_memory_scaling_eager_grows_ours_bounded(monkeypatch):
    """Eager holds [N, V] fp32 logits (≥ 8 bytes per N·V element counting its log-softmax); ours, with its chunk budget
    shrunk so that the smoke shape is chunked, grows only with N·H (the hidden gradient): < 1 byte per N·V element."""
    ll = importlib.import_module("fastrlhf.kernels.fused_linear_logprobs")
    monkeypatch.setattr(ll, "CHUNK_BYTES", 2**20)  # 1 MiB: the N=256 smoke case is chunked
    monkeypatch.setattr(ll, "CPU_KEEP_BYTES", 0)  # and its logits are not kept for the backward (they would fit)
    ctx = runner.Ctx(device="cpu", shape="smoke", dtype=torch.float32, providers=("fastrlhf", "eager"),
                     warmup_ms=0, rep_ms=0)
    runner.linear_memory_scaling(ctx, V=4099)
    mem = ctx.extra["linear_memory"]
    (n1, n2), V = runner.SHAPES["smoke"]["linear_mem"][1], mem["V"]
    per_nv = {p: (mem["peak_mib"][(p, n2)] - mem["peak_mib"][(p, n1)]) * 2**20 / ((n2 - n1) * V)
              for p in ("fastrlhf", "eager")}
    assert per_nv["eager"] >= 8, per_nv
    assert per_nv["fastrlhf"] < 1, per_nv


# ---------------------------------------------------------------------------------------------------------- pictures
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path, min_bytes=5_000):
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > min_bytes


def test_kernels_runner_plots_memory_against_nv(tmp_path):
    png = tmp_path / "mem.png"
    assert runner.main(["--shape", "smoke", "--ops", "linear", "--warmup-ms", "0", "--rep-ms", "0", "--no-csv",
                        "--plot", str(png)]) == 0
    assert _is_png(png)
    with pytest.raises(SystemExit) as e:  # the picture is the linear op's memory scaling: asked without it = exit 2
        runner.main(["--shape", "smoke", "--ops", "gae", "--plot", str(tmp_path / "x.png")])
    assert e.value.code == 2


def test_generate_runner_fixed_and_realistic_with_plot(tmp_path, capsys):
    """Both workloads in one call (two providers, 3 runs): realistic rows carry their own shape tag, stop at EOS
    (shorter responses than G, padding > 0), fixed rows have every response G long and no padding; the PNG is drawn."""
    from fastrlhf.benchmarks import run_generate as gen
    path, png = tmp_path / "gen.csv", tmp_path / "gen.png"
    assert gen.main(["--shape", "smoke", "--runs", "3", "--providers", "fastrlhf", "hf-dynamic", "--workload",
                     "fixed", "realistic", "--csv", str(path), "--plot", str(png), "--floor"]) == 0
    out = capsys.readouterr().out
    assert "realistic workload" in out
    assert out.count("GEMM floor, generation, measured in this run") == 2 and "the peer leaves at most" in out
    assert _is_png(png)
    G = gen.SHAPES["smoke"]["G"]
    _, rows = _read(path)
    got = {(r["shape"], r["provider"], r["metric"]): float(r["median"]) for r in rows}
    for p in ("fastrlhf", "hf-dynamic"):
        assert got[("smoke", p, "resp_len_p50")] == G and got[("smoke", p, "pad_frac")] == 0.0
        assert got[("smoke/realistic", p, "resp_len_p50")] < G
        assert 0.0 < got[("smoke/realistic", p, "pad_frac")] < 1.0
        assert got[("smoke/realistic", p, "tokens_per_s")] > 0
    B = gen.SHAPES["smoke"]["B"]
    assert got[("smoke", "fastrlhf", "decode_row_steps")] == B * (G - 1)  # nothing to compact: every row runs G tokens
    assert got[("smoke/realistic", "fastrlhf", "decode_row_steps")] < B * (G - 1)  # rows stop, buckets shrink


def test_generate_runner_onednn_ab(tmp_path):
    """fastrlhf-noonednn (the engine on F.linear) runs beside fastrlhf (oneDNN on CPU): the same work, both timed."""
    from fastrlhf.benchmarks import run_generate as gen
    path = tmp_path / "gen.csv"
    assert gen.main(["--shape", "smoke", "--runs", "3", "--providers", "fastrlhf", "fastrlhf-noonednn",
                     "--workload", "fixed", "--csv", str(path)]) == 0
    _, rows = _read(path)
    got = {(r["provider"], r["metric"]): float(r["median"]) for r in rows}
    for p in ("fastrlhf", "fastrlhf-noonednn"):
        assert got[(p, "tokens_per_s")] > 0 and got[(p, "resp_len_p50")] == gen.SHAPES["smoke"]["G"]


def test_ppo_runner_realistic_fastrlhf_arm_with_plot(tmp_path, capsys):
    """The PPO runner's fastrlhf arm on the realistic workload (1 timed iteration): lengths and padding reported,
    tokens/s over valid tokens, no FLOP rate (it counts fixed lengths), the phase picture drawn."""
    from fastrlhf.benchmarks import run_ppo as ppo
    path, png = tmp_path / "ppo.csv", tmp_path / "ppo.png"
    assert ppo.main(["--shape", "smoke", "--iters", "1", "--arms", "fastrlhf", "--no-profile", "--workload",
                     "realistic", "--csv", str(path), "--plot", str(png), "--floor"]) == 0
    assert "GEMM floor, total, measured in this run" in capsys.readouterr().out
    assert _is_png(png)
    _, rows = _read(path)
    got = {r["metric"]: float(r["median"]) for r in rows if r["shape"] == "smoke/realistic"}
    G = ppo.SHAPES["smoke"]["G"]
    assert 1 <= got["resp_len_p50"] <= got["resp_len_p90"] <= G and 0 < got["pad_frac"] < 1
    assert got["resp_tok_s"] > 0 and "gflops" not in got


def test_plot_helpers_draw_nontrivial_pngs(tmp_path):
    from fastrlhf.benchmarks import plots
    a = plots.phases_png(tmp_path / "a.png", {"fastrlhf": {"generation": 1.0, "experience": 0.5, "training": 2.0},
                                              "trl": {"generation": 2.0, "experience": 0.6, "training": 2.1}}, "t")
    b = plots.lines_png(tmp_path / "b.png", {"plain": [(32, 1.0), (64, 2.1), (128, 4.0)]}, "t", "G", "s")
    for p in (a, b):
        assert _is_png(p)


# ---------------------------------------------------------------------------------------------------------- workloads
def test_realistic_workload_lengths_follow_the_hazard():
    """The EOS hazard built into a random Qwen2's weights: the calibrated mean EOS probability is h = 1 − 0.5^(4/G),
    it varies little across positions, and 256 sampled responses have median ≈ G/4 and p90 ≈ 0.83·G; prompt lengths
    stay in [⌈P/8⌉, P]."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from fastrlhf.benchmarks import workload as wl
    V, G, P = 512, 32, 16
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=V, max_position_embeddings=256, tie_word_embeddings=True,
                      pad_token_id=V - 2, eos_token_id=V - 1, bos_token_id=V - 1)
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(cfg).eval()
    h = wl.eos_hazard(G)
    assert (1 - h) ** (G / 4) == pytest.approx(0.5)  # median G/4
    got = wl.install_eos_hazard(m, V - 1, h)
    assert got == pytest.approx(h, rel=1e-3)
    g = torch.Generator().manual_seed(3)
    prompts = wl.make_prompts(256, P, V, "realistic", g)
    lens = [len(p) for p in prompts]
    assert min(lens) >= 2 and max(lens) <= P and len(set(lens)) > P // 2
    Pw = max(lens)
    ids = torch.tensor([[V - 2] * (Pw - len(p)) + p for p in prompts])
    att = (ids != V - 2).long()
    with torch.no_grad():
        p_eos = torch.softmax(m(input_ids=ids, attention_mask=att).logits[att.bool()], -1)[:, V - 1]
        assert float(p_eos.min()) > 0.7 * h and float(p_eos.max()) < 1.3 * h  # a near-constant hazard
        torch.manual_seed(4)
        out = m.generate(input_ids=ids, attention_mask=att, max_new_tokens=G, do_sample=True, top_k=0, top_p=1.0,
                         temperature=1.0, pad_token_id=V - 2, eos_token_id=V - 1)
    st = wl.length_stats(wl.response_lengths(out[:, Pw:], V - 1).tolist())
    assert G / 4 - 3 <= st["median"] <= G / 4 + 3, st
    assert 0.83 * G - 6 <= st["p90"] <= G, st
    assert wl.pad_fraction([2, 4], [1, 3], 5) == pytest.approx(1 - 10 / 10) and wl.pad_fraction([2], [1], 5) == 0.4


def test_kernels_runner_adamw_step_matches_float64(capsys):
    """--ops adamw: make_adamw's step and torch's foreach step, both within fp32 rounding of a float64 AdamW step (an
    update is ~lr = 1e-3, so a wrong step shows far above the 1e-6 bound)."""
    ctx = runner.run(["adamw"], "smoke", device="cpu", warmup_ms=0, rep_ms=0)
    rows = {r["provider"]: r for r in ctx.rows if r["op"] == "adamw"}
    assert set(rows) == {"fastrlhf", "eager"}, ctx.skipped
    for r in rows.values():
        assert r["max_abs_err"] < 1e-6 and r["median_ms"] > 0


def test_alternate_runs_arms_in_turn_and_stops_a_failed_arm():
    """timing.alternate: A B A B order, results per arm in round order, no reruns of an arm after an error."""
    from fastrlhf.benchmarks.timing import alternate
    calls = []

    def run_one(arm, r):
        calls.append((arm, r))
        return {"error": "boom"} if (arm == "b" and r == 0) else {"round": r}
    out = alternate(["a", "b"], 3, run_one)
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("a", 2)]
    assert out == {"a": [{"round": 0}, {"round": 1}, {"round": 2}], "b": [{"error": "boom"}]}
