"""GRPO step benchmark: fastrlhf's ``grpo`` stage beside TRL's GRPOTrainer (no vLLM), same model, shapes and n, one run.

    python -m benchmarks.run_grpo [--shape tiny|qwen2-0.5b|smoke] [--iters 3] [--threads 2] [--arms fastrlhf,trl]
                                  [--workload fixed|realistic] [--rounds R] [--floor]
    fastrlhf bench grpo ...            (the CLI calls ``main(argv)``)

One step (both systems): Q prompts of P tokens, n completions of each (up to G tokens, sampling at T = 1), a Python
reward function of the completion texts, group advantages (r − mean)/std, one clipped-surrogate AdamW step on all
Q·n completions (μ = 1, β = 0 so no reference model, token-mean loss). Random Llama weights (Qwen2-0.5B-like shapes) and a word-level
tokenizer of V words, saved once as an HF folder and loaded by both (same weights, same prompts, same reward).

fastrlhf arm — ``fastrlhf.stages.grpo.train`` itself (hybrid-engine generation, fused linear log-probs and policy loss);
a step is the stage's own time split (generate + score + train) of one iteration.
TRL arm — ``trl.GRPOTrainer`` with per_device_train_batch_size = Q·n, num_generations = n, gradient accumulation 1,
steps_per_generation 1, loss_type "dapo" (token-mean), scale_rewards "group", constant learning rate and
gradient checkpointing off (TRL's GRPOConfig turns it on by default; fastrlhf's stage has it off); a step is one trainer step
(generation inside it), timed by a callback.
Each arm runs in a fresh process (``--threads`` torch threads); the fastrlhf arm also prints the medians of its
generate / score / train split. ``--workload fixed``: both sample EOS with probability ≈ 1/V per token, so a few rows
stop early; ``realistic``: prompts of varied length and the EOS hazard of ``benchmarks.workload`` in the weights
(completions end at EOS with a long tail; each arm draws its own, so the rates are compared too). The table reports
the mean completion length of each. Metric: median s/step after ``--warmup``
steps, and completion tokens per second. Nothing here is a result: the numbers belong in RESULTS.md only when
measured on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .timing import alternate, check_choice, check_choices, device_name, git_commit
from .workload import WORKLOADS

ARMS = ("fastrlhf", "trl")
# model: Llama config fields; Q prompts of P tokens, n completions each of up to G tokens
SHAPES = {
    "tiny": dict(model=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=4096), Q=4, n=8, P=32, G=64),
    "qwen2-0.5b": dict(model=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                  num_key_value_heads=2, vocab_size=151936), Q=8, n=8, P=128, G=256),
    "smoke": dict(model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512), Q=2, n=4, P=8, G=16),
}
LR, CLIP = 1e-6, 0.2


def reward_chars(prompts, completions, **kwargs) -> list[float]:
    """The benchmark's reward: completion length in characters / 100 (cheap, deterministic, with spread)."""
    return [len(c) / 100.0 for c in completions]


def build_checkpoint(shape: str, root: str | Path, seed: int = 0, workload: str = "fixed") -> dict:
    """``root/policy``: a random LlamaForCausalLM with a word-level tokenizer of V tokens (w0.., <pad>, <eos>) (with a
    Qwen2 config, transformers' AutoTokenizer would swap in Qwen2's byte-level pre-tokenizer);
    ``root/prompts.jsonl``: 64 prompts of P words. ``realistic`` (``benchmarks.workload``): prompt lengths uniform over
    [⌈P/8⌉, P] and the EOS hazard 1 − 0.5^(4/G) built into the policy's weights (median completion G/4, a long tail)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from .workload import check_workload, eos_hazard, install_eos_hazard, make_prompts

    check_workload(workload)
    S = SHAPES[shape]
    V = S["model"]["vocab_size"]
    root = Path(root)
    vocab = {f"w{i}": i for i in range(V - 2)} | {"<pad>": V - 2, "<eos>": V - 1}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<pad>")
    tok.padding_side = "left"
    cfg = LlamaConfig(**S["model"], max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=V - 2,
                      eos_token_id=V - 1, bos_token_id=V - 1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    if workload == "realistic":
        install_eos_hazard(model, V - 1, eos_hazard(S["G"]), seed=seed)
    model.save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    g = torch.Generator().manual_seed(seed + 1)
    with open(root / "prompts.jsonl", "w") as fh:
        for row in make_prompts(64, S["P"], V, workload, g):
            fh.write(json.dumps({"prompt": " ".join(f"w{i}" for i in row)}) + "\n")
    return {"policy": str(root / "policy"), "prompts": str(root / "prompts.jsonl")}


def _summary(step_s: list[float], tokens: list[float], warmup: int) -> dict:
    timed, toks = step_s[warmup:], tokens[warmup:]
    med = statistics.median(timed)
    return {"s_per_step": med, "completion_tokens": statistics.mean(toks), "tok_s": statistics.mean(toks) / med,
            "steps_s": step_s}


def merge_rounds(runs: list[dict], warmup: int) -> dict:
    """One arm's rounds pooled: the median over every timed step of every round (and of the rounds' split medians);
    the first error if any round failed."""
    bad = [r for r in runs if "error" in r]
    if bad:
        return bad[0]
    if len(runs) == 1:
        return runs[0]
    steps = [x for r in runs for x in r["steps_s"][warmup:]]
    med = statistics.median(steps)
    out = dict(runs[-1], s_per_step=med, steps_s=[x for r in runs for x in r["steps_s"]], rounds=len(runs),
               completion_tokens=statistics.mean(r["completion_tokens"] for r in runs))
    out["tok_s"] = out["completion_tokens"] / med
    if all("split_s" in r for r in runs):
        out["split_s"] = {k: statistics.median(r["split_s"][k] for r in runs) for k in runs[0]["split_s"]}
    return out


def run_fastrlhf(shape: str, ck: dict, warmup: int, iters: int, device: str) -> dict:
    """``warmup + iters`` iterations of the grpo stage; per-step time = its generate + score + train split."""
    from fastrlhf.stages.grpo import GRPOConfig, train

    S = SHAPES[shape]
    rows: list[dict] = []

    class _Log:
        def log(self, metrics, step=None, console=True):
            rows.append(dict(metrics))

        def close(self, **kw):
            return None

    spec = f"{__spec__.name if __spec__ else __name__}:reward_chars"
    with tempfile.TemporaryDirectory(prefix="fastrlhf_bench_grpo_") as out:
        train(GRPOConfig(policy=ck["policy"], prompts=ck["prompts"], reward_funcs=[spec], output_dir=out,
                         iterations=warmup + iters, batch_size=S["Q"], num_generations=S["n"], max_new_tokens=S["G"], lr=LR,
                         clip_eps_low=CLIP, clip_eps_high=CLIP, kl_coef=0.0, mu=1, loss_agg="token-mean",
                         device=device, plots=False, keep_checkpoints=1), log=_Log())
    step_s = [r["time/generate"] + r["time/score"] + r["time/train"] for r in rows]
    out = _summary(step_s, [r["response_length"] * S["Q"] * S["n"] for r in rows], warmup)
    out["split_s"] = {k: statistics.median(r[f"time/{k}"] for r in rows[warmup:]) for k in ("generate", "score", "train")}
    return out


def run_trl(shape: str, ck: dict, warmup: int, iters: int, device: str) -> dict:
    """``warmup + iters`` steps of ``trl.GRPOTrainer``, each timed by a callback (generation included)."""
    import datasets
    import trl
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    S = SHAPES[shape]
    tok = AutoTokenizer.from_pretrained(ck["policy"])
    with open(ck["prompts"]) as fh:
        ds = datasets.Dataset.from_list([json.loads(line) for line in fh])
    times: list[float] = []
    tokens: list[float] = []

    class _Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    class _Tokens(TrainerCallback):  # the trainer's logged mean completion length, one log per step
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                tokens.append(logs["completions/mean_length"] * S["Q"] * S["n"])

    with tempfile.TemporaryDirectory(prefix="fastrlhf_bench_trl_grpo_") as out:
        args = GRPOConfig(output_dir=out, per_device_train_batch_size=S["Q"] * S["n"], gradient_accumulation_steps=1,
                          steps_per_generation=1, num_generations=S["n"], max_completion_length=S["G"],
                          max_steps=warmup + iters, learning_rate=LR, beta=0.0, num_iterations=1, epsilon=CLIP,
                          loss_type="dapo", scale_rewards="group", temperature=1.0, logging_steps=1,
                          save_strategy="no", report_to="none", use_cpu=device == "cpu", bf16=device == "cuda",
                          disable_tqdm=True, shuffle_dataset=False, seed=0, dataloader_num_workers=0,
                          lr_scheduler_type="constant", gradient_checkpointing=False)
        trainer = GRPOTrainer(model=ck["policy"], reward_funcs=reward_chars, args=args, train_dataset=ds,
                              processing_class=tok, callbacks=[_Clock(), _Tokens()])
        trainer.train()
    if len(tokens) != len(times):
        tokens = [float("nan")] * len(times)
    out = _summary(times, tokens, warmup)
    out["trl_version"] = trl.__version__
    return out


def _arm_subprocess(arm: str, shape: str, root: str, warmup: int, iters: int, threads: int, device: str,
                    timeout: float) -> dict:
    out_json = os.path.join(root, f"{arm}.json")
    repo = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([repo] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "benchmarks.run_grpo", "--arm", arm, "--ckpt", root, "--json", out_json, "--shape", shape,
           "--warmup", str(warmup), "--iters", str(iters), "--threads", str(threads), "--device", device]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=repo)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if r.returncode != 0 or not os.path.exists(out_json):
        tail = (r.stderr or r.stdout or "").strip().splitlines()[-8:]
        return {"error": f"exit {r.returncode}: " + " | ".join(tail)}
    with open(out_json) as fh:
        return json.load(fh)


def format_table(shape: str, results: dict[str, dict], workload: str = "fixed") -> str:
    S = SHAPES[shape]
    P = f"P={S['P']}" if workload == "fixed" else f"P in [{-(-S['P'] // 8)}, {S['P']}] (realistic: EOS hazard)"
    lines = [f"GRPO step, shape {shape}: Q={S['Q']} prompts × n={S['n']}, {P}, G≤{S['G']}, "
             f"{S['model']['num_hidden_layers']} layers, H={S['model']['hidden_size']}, V={S['model']['vocab_size']}",
             "| arm | s/step (median) | completion tok/s | completion tokens/step |", "|---|---|---|---|"]
    for arm, res in results.items():
        if "error" in res:
            lines.append(f"| {arm} | error: {res['error'][:200]} | | |")
        else:
            lines.append(f"| {arm} | {res['s_per_step']:.4g} | {res['tok_s']:.4g} | {res['completion_tokens']:.1f} |")
    split = results.get("fastrlhf", {}).get("split_s")
    if split:
        lines.append("fastrlhf time split (medians, s): " + ", ".join(f"{k} {v:.3f}" for k, v in split.items()))
    ok = [a for a in ARMS if a in results and "error" not in results[a]]
    if len(ok) == 2:
        lines.append(f"speed-up of fastrlhf over TRL (s/step): "
                     f"{results['trl']['s_per_step'] / results['fastrlhf']['s_per_step']:.2f}x")
        if workload != "fixed":  # the arms draw their own completions: compare the rates too
            lines.append(f"speed-up of fastrlhf over TRL (completion tok/s): "
                         f"{results['fastrlhf']['tok_s'] / results['trl']['tok_s']:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastrlhf bench grpo", description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--arms", default="fastrlhf,trl", help="comma-separated: fastrlhf,trl")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    ap.add_argument("--iters", type=int, default=3, help="timed steps")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per arm")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the arms this many times (fresh processes each; "
                    "their timed steps pooled), so that a drifting machine load hits both alike")
    ap.add_argument("--floor", action="store_true", help="also time the step's GEMM floor in this run "
                    "(benchmarks/run_floor.py --stage grpo, decode as chains) and print what it leaves against TRL")
    ap.add_argument("--workload", default="fixed", help="fixed: P-token prompts, EOS ≈ never; realistic: prompt lengths "
                    "over P/8..P, EOS hazard 1-0.5^(4/G) in the policy's weights (benchmarks/workload.py)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per arm")
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--arm", default="", help=argparse.SUPPRESS)   # internal: run one arm in this process
    ap.add_argument("--ckpt", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    check_choice("shape", a.shape, SHAPES)
    check_choice("device", a.device, ("cpu", "cuda"))
    check_choice("workload", a.workload, WORKLOADS)
    arms = [x for x in a.arms.split(",") if x]
    check_choices("arms", arms, ARMS)
    if a.iters < 1 or a.warmup < 0 or a.rounds < 1:
        raise SystemExit("fastrlhf bench grpo: --iters and --rounds must be >= 1 and --warmup >= 0")
    if a.arm:  # one arm, in this (fresh) process
        torch.set_num_threads(a.threads)
        ck = {"policy": os.path.join(a.ckpt, "policy"), "prompts": os.path.join(a.ckpt, "prompts.jsonl")}
        res = (run_fastrlhf if a.arm == "fastrlhf" else run_trl)(a.shape, ck, a.warmup, a.iters, a.device)
        with open(a.json, "w") as fh:
            json.dump(res, fh)
        return 0
    with tempfile.TemporaryDirectory(prefix="fastrlhf_bench_grpo_ckpt_") as root:
        build_checkpoint(a.shape, root, workload=a.workload)
        rounds = alternate(arms, a.rounds, lambda arm, _: _arm_subprocess(arm, a.shape, root, a.warmup, a.iters,
                                                                          a.threads, a.device, a.timeout))
        results = {arm: merge_rounds(runs, a.warmup) for arm, runs in rounds.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device: {device_name(a.device)}, {a.threads} threads per arm, load average {load:.2f}, "
          f"commit {git_commit()}")
    print(format_table(a.shape, results, a.workload))
    if a.floor:
        from .run_floor import floor_note, floor_of
        fl = floor_of(a.shape, "grpo", a.workload, a.device, torch.bfloat16 if a.device == "cuda" else torch.float32)
        f, t = results.get("fastrlhf", {}), results.get("trl", {})
        print(floor_note(fl, "generation", peer=None, ours=f.get("split_s", {}).get("generate")))
        print(floor_note(fl, "total", peer=t.get("s_per_step"), ours=f.get("s_per_step")))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"shape": a.shape, "workload": a.workload, "results": results, "load": load}, fh, indent=2)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
