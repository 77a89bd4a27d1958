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


def test_fixed_floor_has_a_decode_chain_column(capsys):
    """The chain floor replaces the G − 1 per-shape decode steps by G − 1 timed chains; nothing else moves."""
    res = run_floor.measure("smoke", "cpu", rep_ms=0.0)
    extra = res["generation"]["chain_s"] - res["generation"]["floor_s"]
    assert res["total"]["chain_s"] == pytest.approx(res["total"]["floor_s"] + extra)
    assert res["generation"]["chain_s"] > 0
    assert run_floor.main(["--shape", "smoke", "--rep-ms", "0", "--threads", "1", "--baseline-tok-s", "100"]) == 0
    assert "decode as a chain" in capsys.readouterr().out


def test_sampled_response_lengths_follow_the_hazard():
    """P(L > k) = (1 − h)^k for k < G, every length in [1, G] (20,000 draws; 5-sigma binomial bounds)."""
    import math

    import torch
    from fastrlhf.benchmarks.workload import eos_hazard, sample_response_lengths
    G, n = 64, 20_000
    lens = torch.tensor(sample_response_lengths(n, G, torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))))
    assert int(lens.min()) >= 1 and int(lens.max()) <= G
    h = eos_hazard(G)
    for k in (1, 4, 16, 32, 63):
        p = (1 - h) ** k
        assert abs(float((lens > k).double().mean()) - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-9, k
    assert int((lens == G).sum()) > 0  # the cap is reached (6.25% of rows)


@pytest.mark.parametrize("stage", run_floor.STAGES)
def test_realistic_floor_counts_every_live_row_step(stage, capsys):
    """Each row is live for L − 1 decode steps, so Σ rows·steps over the decode_rows table = mean Σ (L − 1) per
    batch; the padding-free forwards carry the batches' mean token counts."""
    batches = run_floor.realistic_batches("smoke", stage, rollouts=50, seed=3)
    res = run_floor.realistic("smoke", "cpu", rep_ms=0.0, stage=stage, rollouts=50, seed=3)
    row_steps = sum(b * c for b, c in res["decode_rows"].items())
    assert row_steps == pytest.approx(sum(sum(n - 1 for n in r) for _, r in batches) / 50, rel=1e-12)
    assert res["response_tokens"] == round(sum(sum(r) for _, r in batches) / 50)
    assert all(res[p]["floor_s"] > 0 for p in ("generation", "training", "total"))
    assert run_floor.main(["--stage", stage, "--shape", "smoke", "--rep-ms", "0", "--threads", "1", "--workload", "realistic",
                          "--rollouts", "20", "--baseline-s", "1", "--baseline-tok-s", "100"]) == 0
    out = capsys.readouterr().out
    assert "response tok/s" in out and "at most" in out


def test_padding_free_gemms_scale_with_the_token_counts():
    """gemms(tokens=...) runs the prefill on the prompt tokens and every forward on the given counts (PPO, smoke)."""
    tk = {"prompt": 17, "all": 41, "response": 24}
    per_phase = run_floor.gemms("smoke", "ppo", tk)
    m = run_ppo.SHAPES["smoke"]["model"]
    L, H, V = m["num_hidden_layers"], m["hidden_size"], m["vocab_size"]
    B, E, mb = run_ppo.SHAPES["smoke"]["B"], run_ppo.SHAPES["smoke"]["epochs"], run_ppo.SHAPES["smoke"]["minibatch"]
    body = 2.0 * L * sum(i * o for i, o in run_floor.linears(m))
    head = 2.0 * H * V
    per_epoch = B // mb
    assert run_floor.gemm_flops(per_phase["generation"]) == pytest.approx(17 * body + B * head, rel=1e-12)
    assert run_floor.gemm_flops(per_phase["experience"]) == pytest.approx(4 * 41 * body + 2 * 24 * head, rel=1e-12)
    steps = E * per_epoch
    want = 3 * steps * (2 * round(41 / per_epoch) * body + round(24 / per_epoch) * head)
    assert run_floor.gemm_flops(per_phase["training"]) == pytest.approx(want, rel=1e-12)


def test_generation_floor_uses_the_generate_runners_shapes():
    """``run_generate --floor`` takes the generation floor of run_ppo's shape of the same name: they must agree."""
    from fastrlhf.benchmarks import run_generate
    for name, S in run_generate.SHAPES.items():
        P = run_ppo.SHAPES[name]
        assert (S["model"], S["B"], S["P"], S["G"]) == (P["model"], P["B"], P["P"], P["G"]), name
