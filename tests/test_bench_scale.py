"""benchmarks/run_scale.py: the scale-out runner end to end at the smoke shape (a plain process and a 2-rank torchrun job
of the real PPO stage), its CSV rows and the efficiency arithmetic. Timings are printed, never asserted."""
import csv

import pytest

from fastrlhf.benchmarks import run_scale as scale

pytestmark = pytest.mark.distributed


def test_summarize_skips_the_warmup_iteration():
    rows = [{"time/generate": 9.0, "time/experience": 9.0, "time/train": 9.0, "tokens_per_s": 1.0},
            {"time/generate": 1.0, "time/experience": 0.5, "time/train": 0.5, "tokens_per_s": 10.0, "peak_mem_gb": 0.5},
            {"time/generate": 2.0, "time/experience": 1.0, "time/train": 1.0, "tokens_per_s": 20.0, "peak_mem_gb": 0.7}]
    s = scale.summarize(rows)
    assert s["s_per_iter"] == pytest.approx(3.0) and s["resp_tok_s"] == pytest.approx(15.0)
    assert s["peak_mem_gb"] == 0.7 and s["iters"] == 2


def test_scale_runner_end_to_end(tmp_path, capsys):
    out = tmp_path / "r.csv"
    assert scale.main(["--shape", "smoke", "--device", "cpu", "--nproc", "2", "--iters", "1", "--csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert "plain" in text and "fsdp-2" in text
    rows = list(csv.DictReader(open(out)))
    got = {(r["provider"], r["metric"]): float(r["median"]) for r in rows}
    assert {p for p, _ in got} == {"plain", "fsdp-2"} and all(r["bench"] == "scale" for r in rows)
    assert got[("plain", "efficiency")] == pytest.approx(1.0)
    # efficiency = tok/s(2 ranks) / (2 · tok/s(plain)), from the same run's rows
    assert got[("fsdp-2", "efficiency")] == pytest.approx(got[("fsdp-2", "resp_tok_s")] / (2 * got[("plain", "resp_tok_s")]),
                                                          rel=1e-4)
    assert all(got[(p, "resp_tok_s")] > 0 and got[(p, "s_per_iter")] > 0 for p in ("plain", "fsdp-2"))


def test_scale_runner_response_lengths_plot(tmp_path, capsys):
    """--nproc 0 (plain arm only) at two response lengths: one row set per G and a PNG of s/iteration against G."""
    out, png = tmp_path / "r.csv", tmp_path / "scale.png"
    assert scale.main(["--shape", "smoke", "--device", "cpu", "--nproc", "0", "--iters", "1", "--response-lengths",
                       "4", "8", "--csv", str(out), "--plot", str(png)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert {r["provider"] for r in rows} == {"plain@G4", "plain@G8"}
    eff = {r["provider"]: float(r["median"]) for r in rows if r["metric"] == "efficiency"}
    assert eff == {"plain@G4": pytest.approx(1.0), "plain@G8": pytest.approx(1.0)}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
