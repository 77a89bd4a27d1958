"""benchmarks/run_grpo.py: the checkpoint both arms load, and both arms running end to end at the smoke shape (no timing
is checked: unit tests never judge speed)."""
import json

import pytest

from benchmarks.run_grpo import SHAPES, build_checkpoint, main, reward_chars
from fastrlhf.models.hf_io import load_model, load_tokenizer
from fastrlhf.runtime.data import load_prompts, tokenize_prompt
from fastrlhf.tools import cli


def test_checkpoint_prompts_are_P_tokens_for_both_tokenizers(tmp_path):
    from transformers import AutoTokenizer
    ck = build_checkpoint("smoke", tmp_path)
    S = SHAPES["smoke"]
    ours, hf = load_tokenizer(ck["policy"]), AutoTokenizer.from_pretrained(ck["policy"])
    for ex in load_prompts(ck["prompts"])[:4]:
        ids = tokenize_prompt(ours, ex.prompt, ex.source)
        assert len(ids) == S["P"] and ids == hf(ex.prompt, add_special_tokens=False)["input_ids"]
    assert load_model(ck["policy"], head="lm").config.vocab_size == S["model"]["vocab_size"]
    assert reward_chars(["p"], ["ab", "abcd"]) == [0.02, 0.04]


def test_both_arms_run_at_the_smoke_shape(tmp_path, capsys):
    assert "grpo" in cli.bench_names()
    out = tmp_path / "r.json"
    rc = main(["--shape", "smoke", "--warmup", "0", "--iters", "1", "--threads", "1", "--json", str(out), "--floor"])
    text = capsys.readouterr().out
    res = json.loads(out.read_text())["results"]
    assert rc == 0, res
    S = SHAPES["smoke"]
    for arm in ("fastrlhf", "trl"):
        assert res[arm]["s_per_step"] > 0 and len(res[arm]["steps_s"]) == 1
        # every completion has 1..G tokens
        assert S["Q"] * S["n"] <= res[arm]["completion_tokens"] <= S["Q"] * S["n"] * S["G"]
    assert "speed-up of fastrlhf over TRL" in text and res["trl"]["trl_version"].startswith("1.")
    split = res["fastrlhf"]["split_s"]  # the step is the sum of its generate / score / train split
    assert sum(split.values()) == pytest.approx(res["fastrlhf"]["s_per_step"], rel=1e-9)
    assert "fastrlhf time split" in text
    assert "GEMM floor, total, measured in this run" in text and "the peer leaves at most" in text


def test_rounds_pool_every_timed_step():
    """--rounds: one arm's rounds pooled (warm-up steps dropped per round); an error in any round wins."""
    from fastrlhf.benchmarks.run_grpo import merge_rounds
    r1 = {"steps_s": [9.0, 1.0, 3.0], "completion_tokens": 10.0, "split_s": {"generate": 0.4, "train": 0.6}}
    r2 = {"steps_s": [8.0, 2.0, 5.0], "completion_tokens": 20.0, "split_s": {"generate": 0.6, "train": 1.0}}
    m = merge_rounds([r1, r2], warmup=1)
    assert m["s_per_step"] == pytest.approx(2.5) and m["rounds"] == 2  # median of 1, 3, 2, 5
    assert m["completion_tokens"] == 15.0 and m["tok_s"] == pytest.approx(6.0)
    assert m["split_s"] == {"generate": pytest.approx(0.5), "train": pytest.approx(0.8)}
    assert merge_rounds([r1, {"error": "exit 1"}], warmup=1) == {"error": "exit 1"}


def test_realistic_checkpoint_varies_prompts_and_ends_responses_early(tmp_path):
    """--workload realistic: prompt lengths over [⌈P/8⌉, P] (not all equal), and the policy's built-in EOS hazard ends
    sampled completions early (median near G/4) where the fixed checkpoint runs them to G."""
    from fastrlhf.engine.hybrid import HybridEngine
    S = SHAPES["tiny"]
    lens, medians = {}, {}
    for workload in ("fixed", "realistic"):
        ck = build_checkpoint("tiny", tmp_path / workload, workload=workload)
        tok = load_tokenizer(ck["policy"])
        prompts = [tokenize_prompt(tok, ex.prompt, ex.source) for ex in load_prompts(ck["prompts"])]
        lens[workload] = sorted({len(p) for p in prompts})
        eng = HybridEngine(load_model(ck["policy"], head="lm"))
        with eng.generation():
            r = eng.generate(prompts[:32], max_new_tokens=S["G"], eos_token_id=tok.eos_token_id, seed=0)
        medians[workload] = float(r.lengths.float().median())
    assert lens["fixed"] == [S["P"]]
    assert len(lens["realistic"]) > 5 and min(lens["realistic"]) >= -(-S["P"] // 8) and max(lens["realistic"]) <= S["P"]
    assert medians["fixed"] == S["G"]
    assert S["G"] / 8 <= medians["realistic"] <= S["G"] / 2
    with pytest.raises(ValueError, match="--workload 'typical'"):
        main(["--workload", "typical"])
