"""TRL's GRPO trainer with and without fastrlhf's kernels (``fastrlhf.integrations.trl.patched()``), in one run.

    python -m benchmarks.run_trl [--shape tiny|smoke|qwen2-0.5b] [--steps 5] [--warmup 1] [--csv benchmarks/results.csv]
    fastrlhf bench trl ...                 (the CLI calls ``main(argv)``)

Both arms train the same random checkpoint with the same seed, data and config; only the log-prob / entropy helpers TRL
calls differ (TRL 0.29: ``selective_log_softmax`` / ``entropy_from_logits`` on full logits; TRL 1.16: the fused LM head's
``_ChunkedLogProbFunction``; see fastrlhf/integrations/trl.py).

Shapes (random weights, word-level tokenizer, reward = completion length; B = prompts × generations):
- ``tiny`` (CPU default): Qwen2-style hidden 128, 2 layers, 4 heads / 2 KV, MLP 256, vocab 16384; 4 prompts × 2
  generations, prompt 16 tokens, 32 new tokens, fp32.
- ``qwen2-0.5b`` (CUDA default): hidden 896, 24 layers, 14 heads / 2 KV, MLP 4864, vocab 151936, tied; 2 prompts × 8
  generations, prompt 64 tokens, 128 new tokens, bf16.
- ``smoke``: seconds, for the runner's own test.

Metrics per arm (median over ``--steps`` optimizer steps after ``--warmup`` steps; every step generates, scores and
updates; β = 0.04 so the reference model is scored too):
- ``step_ms``      wall time of one trainer step (generation + old/ref scoring + loss + backward + optimizer)
- ``score_ms``     wall time of one ``_get_per_token_logps_and_entropies`` call (forward only; where our kernels run)
- ``score_peak_mib``  memory torch allocated during one scoring forward+backward on the last batch above what was live
                   before (CUDA: ``torch.cuda.max_memory_allocated``; CPU: torch's CPU allocator events via the profiler,
                   ``benchmarks.timing.peak_extra_mib``, not a process RSS)
- ``train_peak_mib``  CUDA only: ``torch.cuda.max_memory_allocated`` over the arm's whole training run
- ``max_abs_dloss``   the largest difference between the two arms' logged losses (a sanity check, not a speed)
Prints a table (device and TRL version named) and appends one CSV row per measurement (columns ``CSV_COLUMNS``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .timing import append_csv

CSV_COLUMNS = ["date", "device", "bench", "shape", "provider", "metric", "median", "unit", "torch", "commit"]
DEFAULT_CSV = Path(__file__).resolve().parent / "results.csv"


@dataclass
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    tied: bool
    prompts: int        # distinct prompts per step
    generations: int    # completions per prompt (GRPO group size)
    prompt_len: int     # tokens per prompt
    new_tokens: int     # max_completion_length
    dtype: torch.dtype


SHAPES = {
    "smoke": Shape(32, 2, 4, 2, 64, 257, False, 2, 2, 6, 4, torch.float32),
    "tiny": Shape(128, 2, 4, 2, 256, 16384, False, 4, 2, 16, 32, torch.float32),
    "qwen2-0.5b": Shape(896, 24, 14, 2, 4864, 151936, True, 2, 8, 64, 128, torch.bfloat16),
}


def build_checkpoint(shape: Shape, path: str, seed: int = 0):
    """A random Qwen2 checkpoint and a word-level tokenizer (tokens ``w0 … w{V−4}``) saved under ``path``; returns
    (tokenizer, list of prompt strings)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = [f"w{i}" for i in range(shape.vocab - 3)]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    cfg = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.mlp,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.prompt_len + shape.new_tokens + 8,
                      pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=shape.tied)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(cfg).to(shape.dtype).save_pretrained(path)
    tok.save_pretrained(path)
    g = torch.Generator().manual_seed(seed)
    n_prompts = 64 * shape.prompts
    idx = torch.randint(0, len(words), (n_prompts, shape.prompt_len), generator=g)
    prompts = [" ".join(words[i] for i in row) for row in idx.tolist()]
    return tok, prompts


def run_arm(shape: Shape, ckpt: str, tok, prompts, out_dir: str, steps: int, warmup: int, device: str, seed: int):
    """Train GRPO for warmup + steps steps; returns dict of per-step / per-call timings, losses and peaks."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from .timing import peak_extra_mib

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    step_s, score_s, last = [], [], {}

    class Timed(GRPOTrainer):
        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *a, **k):
            sync()
            t0 = time.perf_counter()
            out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *a, **k)
            sync()
            score_s.append(time.perf_counter() - t0)
            if model is self.model or model is getattr(self, "model_wrapped", None):
                last.update(model=model, args=(input_ids, attention_mask, logits_to_keep))
            return out

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            step_s.append(time.perf_counter() - self.t0)

    def reward(completions, **kw):
        return [len(c) / 100.0 for c in completions]

    bf16 = shape.dtype == torch.bfloat16
    args = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=shape.prompts * shape.generations,
        num_generations=shape.generations, max_completion_length=shape.new_tokens, max_steps=warmup + steps,
        use_cpu=device == "cpu", bf16=bf16, fp16=False, report_to=[], logging_steps=1, seed=seed, beta=0.04,
        temperature=1.0, save_strategy="no", learning_rate=1e-5, disable_tqdm=True,
        model_init_kwargs={"dtype": shape.dtype},
    )
    trainer = Timed(model=ckpt, reward_funcs=reward, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
                    processing_class=tok, callbacks=[StepTimer()])
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts; the table below is the output
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    train_peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")

    def score_fwd_bwd():
        logps, _ = trainer._get_per_token_logps_and_entropies(last["model"], *last["args"], compute_entropy=True)[:2]
        logps.sum().backward()

    trainer.model.zero_grad(set_to_none=True)
    score_peak = peak_extra_mib(score_fwd_bwd, device)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    n_score_per_step = max(1, len(score_s) // max(1, len(step_s)))
    return {
        "step_ms": 1e3 * statistics.median(step_s[warmup:]),
        "score_ms": 1e3 * statistics.median(score_s[warmup * n_score_per_step:] or score_s),
        "score_peak_mib": score_peak,
        "train_peak_mib": train_peak,
        "losses": losses,
    }


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
    except Exception:
        return ""


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"cpu ({torch.get_num_threads()} threads, load {load:.1f})"


def _write_csv(path: str, rows: list[dict]) -> Path:
    """Append rows to ``path`` (``timing.append_csv``: another runner's file is left alone, rows go beside it)."""
    return append_csv(path, rows, CSV_COLUMNS, suffix="_trl")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run_trl", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: qwen2-0.5b on CUDA, tiny on CPU")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps per arm (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--csv", default=str(DEFAULT_CSV), help="CSV to append rows to (default: %(default)s)")
    ap.add_argument("--no-csv", action="store_true", help="print only")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    shape_name = a.shape or ("qwen2-0.5b" if device == "cuda" else "tiny")
    shape = SHAPES[shape_name]
    if device == "cpu":
        torch.set_num_threads(a.threads)

    try:
        import trl
    except ImportError:
        print("benchmarks.run_trl: TRL is not installed (pip install trl)")
        return 2
    from fastrlhf.integrations import trl as fast_trl

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        tok, prompts = build_checkpoint(shape, ckpt, a.seed)
        results["trl"] = run_arm(shape, ckpt, tok, prompts, os.path.join(tmp, "trl"), a.steps, a.warmup, device, a.seed)
        with fast_trl.patched() as patch:
            if not patch.applied:
                print(f"benchmarks.run_trl: {patch.reason}")
                return 2
            results["trl+fastrlhf"] = run_arm(shape, ckpt, tok, prompts, os.path.join(tmp, "fast"), a.steps, a.warmup,
                                              device, a.seed)
        calls = dict(patch.calls)

    dloss = max((abs(x - y) for x, y in zip(results["trl"]["losses"], results["trl+fastrlhf"]["losses"])), default=0.0)
    dev = _device_name(device)
    print(f"\nTRL {trl.__version__} GRPO, shape {shape_name}, {dev}, torch {torch.__version__}")
    print(f"steps: {a.warmup} warm-up + {a.steps} timed; fastrlhf kernel calls: {calls}")
    metrics = [("step_ms", "ms"), ("score_ms", "ms"), ("score_peak_mib", "MiB"), ("train_peak_mib", "MiB")]
    print(f"{'metric':<16}{'trl':>14}{'trl+fastrlhf':>16}{'ratio':>9}")
    for m, unit in metrics:
        x, y = results["trl"][m], results["trl+fastrlhf"][m]
        ratio = x / y if y and y == y and x == x else float("nan")
        print(f"{m:<16}{x:>14.2f}{y:>16.2f}{ratio:>9.2f}  ({unit})")
    print(f"max |loss(trl) - loss(trl+fastrlhf)| over {len(results['trl']['losses'])} steps: {dloss:.2e}")

    if not a.no_csv:
        date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        rows = [dict(date=date, device=dev, bench=f"trl-grpo ({trl.__version__})", shape=shape_name, provider=prov,
                     metric=m, median=f"{results[prov][m]:.4g}", unit=unit, torch=torch.__version__, commit=_commit())
                for prov in results for m, unit in metrics if results[prov][m] == results[prov][m]]
        _write_csv(a.csv, rows)
        print(f"appended {len(rows)} rows to {a.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
