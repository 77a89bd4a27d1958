"""The GEMM-floor runner (benchmarks/run_floor.py): its GEMM list has the iteration's FLOPs, and it runs end to end."""
import pytest

from fastrlhf.benchmarks import run_floor, run_ppo


@pytest.mark.parametrize("shape", ("smoke", "tiny", "qwen2-0.5b"))
def test_gemm_list_has_the_iterations_flops(shape):
    """Per phase, the listed GEMMs + attention = run_ppo.model_flops (computed independently, by formula)."""
    mf = run_ppo.model_flops(shape)
    per_phase = run_floor.gemms(shape)
    gemm = {p: run_floor.gemm_flops(c) for p, c in per_phase.items()}
    assert sum(gemm.values()) + mf["attention"] == pytest.approx(mf["total"], rel=1e-12)
    for p in run_floor.PHASES:
        assert 0 < gemm[p] < mf[p]  # each phase also has attention FLOPs
    # the backward of each training GEMM: twice its forward FLOPs
    tr = per_phase["training"]
    fwd = sum(2.0 * M * K * N * c for (lay, M, K, N), c in tr.items() if lay == "nt")
    assert gemm["training"] == pytest.approx(3 * fwd, rel=1e-12)


def test_runner_prints_a_floor(capsys):
    assert run_floor.main(["--shape", "smoke", "--rep-ms", "0", "--threads", "1", "--baseline-s", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "| total |" in out and "at most" in out
    res = run_floor.measure("smoke", "cpu", rep_ms=0.0)
    assert all(res[p]["floor_s"] > 0 for p in (*run_floor.PHASES, "total"))
    assert res["total"]["floor_s"] == pytest.approx(sum(res[p]["floor_s"] for p in run_floor.PHASES))


def test_bad_flag_value_is_refused():
    with pytest.raises(ValueError, match="--shape"):
        run_floor.main(["--shape", "huge"])


@pytest.mark.parametrize("shape", ("smoke", "tiny"))
def test_grpo_step_gemms(shape):
    """GRPO's step (μ = 1, β = 0): generation as the decode loop of B = Q·n rows, no experience forwards, training one
    forward (+ twice its FLOPs in backward) of the policy body over B·(P + G) tokens and its head on B·G."""
    from fastrlhf.benchmarks import run_grpo
    S = run_grpo.SHAPES[shape]
    m = S["model"]
    B, P, G, L, H, V = S["Q"] * S["n"], S["P"], S["G"], m["num_hidden_layers"], m["hidden_size"], m["vocab_size"]
    body = 2.0 * L * sum(i * o for i, o in run_floor.linears(m))  # per token
    head = 2.0 * H * V
    flops = {p: run_floor.gemm_flops(c) for p, c in run_floor.gemms(shape, "grpo").items()}
    assert flops["generation"] == pytest.approx(B * (P * body + head) + B * (G - 1) * (body + head), rel=1e-12)
    assert flops["experience"] == 0
    assert flops["training"] == pytest.approx(3 * (B * (P + G) * body + B * G * head), rel=1e-12)
    assert run_floor.main(["--stage", "grpo", "--shape", "smoke", "--rep-ms", "0", "--threads", "1"]) == 0
