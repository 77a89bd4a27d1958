"""End-to-end PPO benchmark: full iterations of fastrlhf's trainer core beside TRL's PPOTrainer, same shapes, one run.

    python -m benchmarks.run_ppo [--shape tiny|qwen2-0.5b|smoke] [--iters 4] [--threads 2] [--trl-path DIR] [--csv ...]
                             [--workload fixed|realistic] [--plot PATH.png]
    fastrlhf bench ppo ...            (the CLI calls ``main(argv)``)

Workloads (``benchmarks/workload.py``): ``fixed`` (default) = every prompt P tokens, every response exactly G tokens (no
EOS stop); ``realistic`` = prompt lengths uniform over [⌈P/8⌉, P], and the policy checkpoint carries a per-step EOS
probability 1 − 0.5^(4/G) in its weights (median response G/4, p90 ≈ 0.83·G, capped at G), so both arms sample their
EOS from the same model (TRL with ``stop_token="eos"``; same length distribution, not the same rows). Both arms print
their response-length p50 / p90 and padding fraction.

One iteration (both systems): generate B responses of up to G tokens (sampling at T = 1), score them with
the reward model, old / reference log-probs and values (one forward each), per-token KL-shaped rewards, GAE, whitened
advantages, then ``epochs`` passes of clipped policy + clipped value loss over ``B / minibatch`` minibatches with AdamW.
Four models: policy and value (trained), reference and reward (frozen). Random Qwen2-style weights, saved once as HF
folders and loaded by both systems (same weights, same prompts).

fastrlhf arm — exactly the pieces ``fastrlhf/stages/ppo.py``'s train loop uses: ``fastrlhf.models.hf_io.load_model`` (head "lm" /
"score"), ``engine.HybridEngine.generate`` (step 2; fixed workload: ``eos_token_id=None`` so every row runs G tokens),
``ppo_core.ppo_iteration`` (steps 2-8: the function the PPO stage runs) with ``optim.make_adamw`` optimizers.
Like ppo.py: fp32 on CPU; on CUDA fp32 weights for all four models (``runtime.device.model_precision``), bf16 autocast.

TRL arm — ``trl.experimental.ppo.PPOTrainer`` (exists in trl 0.29.x; trl 1.x removed it). It runs in a subprocess whose
``sys.path`` starts with ``--trl-path`` when given (e.g. ``pip install --no-deps --target DIR trl==0.29.1``), so the
installed trl is left alone. If PPOTrainer cannot be imported, the TRL rows are left out and the reason is printed.
Same shapes, ``num_ppo_epochs``, ``num_mini_batches``, ``stop_token=None`` (realistic: "eos"), fp32 on CPU / bf16 on CUDA.

Every arm runs in its own fresh process (clean peak-memory counters, its own thread setting). ``--rounds R`` runs the
arms R times alternately (fastrlhf, TRL, fastrlhf, TRL, ...) and pools the timed iterations of all rounds, so a
machine load that drifts during the run hits both arms alike. Metrics per arm:
- ``s_per_iter``      median seconds per iteration over ``--iters`` iterations after one warm-up iteration
                      (per process; × rounds)
- ``resp_tok_s``      valid response tokens per iteration (median; B·G on the fixed workload) / s_per_iter
- ``resp_len_p50`` / ``resp_len_p90``  response lengths (EOS included) over the timed iterations
- ``pad_frac``        share of the [B, prompt width + response width] grid the experience / training forwards spend
                      on pad tokens (median over iterations)
- ``gen_s`` / ``exp_s`` / ``train_s``  medians of the time split: generation (step 2) / experience (steps 3-7) /
                      PPO epochs (step 8). TRL: generation = its ``batch_generation`` call; experience ends when its
                      advantage whitening returns; training = the rest of the step.
- ``peak_mem``        CUDA: ``torch.cuda.max_memory_allocated`` over the iterations (GiB, weights included).
                      CPU: peak RSS delta (MiB) = peak resident set size during all iterations (Linux VmHWM, reset through
                      /proc/self/clear_refs just before the first iteration) minus the RSS at that moment (models already
                      loaded). It includes optimizer state, KV cache, activations and whatever the C allocator keeps.
                      Fallback where clear_refs is not writable: ``resource.getrusage`` ru_maxrss delta (a lower bound).
- ``tflops`` / ``mfu`` (fixed workload only) model FLOPs per iteration (``model_flops``) / s_per_iter; MFU = that over the dense bf16 peak of
                      the GPU (CUDA, known GPUs only). On CPU the achieved GFLOP/s is printed instead of an MFU.
- ``setup_s``         first (warm-up) iteration minus the median.
fastrlhf only: the top-10 ops by self time (torch.profiler) of one extra iteration, printed below the table.
Prints a table (device named, load average) and appends one CSV row per metric (columns ``CSV_COLUMNS``, as the
generation / TRL runners use).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .run_generate import CSV_COLUMNS, format_table, write_csv
from .timing import _quantile, alternate, check_choice, check_choices, device_name, git_commit
from .workload import WORKLOADS, check_workload, length_stats, pad_fraction, response_lengths

DEFAULT_CSV = Path(__file__).resolve().parent / "results.csv"
ARMS = ("fastrlhf", "trl")
# model: Qwen2 config fields. B prompts of P tokens, G response tokens, epochs, minibatch (rollouts per optimizer step),
# trl_micro: TRL's per-device micro-batch (TRL: batch = micro × gradient_accumulation_steps; the H100 reference run used 8).
SHAPES = {
    "tiny": dict(model=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=4096), B=16, P=32, G=64, epochs=4, minibatch=16,
                 trl_micro=16),
    "qwen2-0.5b": dict(model=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                  num_key_value_heads=2, vocab_size=151936), B=64, P=128, G=256, epochs=4, minibatch=64,
                       trl_micro=8),
    "smoke": dict(model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512), B=4, P=8, G=16, epochs=2, minibatch=2, trl_micro=2),
}
KL_COEF, CLIP, VF_CLIP, GAMMA, LAM, LR = 0.02, 0.2, 0.2, 1.0, 0.95, 1e-6
# dense bf16 tensor-core peak (no sparsity), FLOP/s, by device-name substring
GPU_PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12}


# ----------------------------------------------------------------------------------------------------------------------
# shared set-up
# ----------------------------------------------------------------------------------------------------------------------
def hf_config(shape: str):
    from transformers import Qwen2Config
    m = SHAPES[shape]["model"]
    V = m["vocab_size"]
    return Qwen2Config(**m, max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=V - 2,
                       eos_token_id=V - 1, bos_token_id=V - 1, num_labels=1)


def build_checkpoints(shape: str, root: str | Path, seed: int = 0, workload: str = "fixed") -> dict:
    """Random HF checkpoints ``root/policy`` (Qwen2ForCausalLM; ``realistic``: with the EOS hazard of
    ``benchmarks.workload`` in its weights) and ``root/reward`` (Qwen2ForSequenceClassification, also the value
    model's init, as in InstructGPT)."""
    from transformers import Qwen2ForCausalLM, Qwen2ForSequenceClassification
    root = Path(root)
    cfg = hf_config(shape)
    torch.manual_seed(seed)
    policy = Qwen2ForCausalLM(cfg)
    if workload == "realistic":
        from .workload import eos_hazard, install_eos_hazard
        install_eos_hazard(policy, cfg.eos_token_id, eos_hazard(SHAPES[shape]["G"]), seed=seed)
    policy.save_pretrained(root / "policy")
    Qwen2ForSequenceClassification(cfg).save_pretrained(root / "reward")
    return {"policy": str(root / "policy"), "reward": str(root / "reward")}


def make_prompts(shape: str, n_iters: int, seed: int = 1, workload: str = "fixed") -> list[list[list[int]]]:
    """Prompts per iteration: n_iters lists of B token-id lists (ids below the pad/eos ids) of length P (``fixed``) or
    of lengths uniform over [⌈P/8⌉, P] (``realistic``, ``benchmarks.workload.make_prompts``)."""
    from .workload import make_prompts as draw
    S = SHAPES[shape]
    V = S["model"]["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    return [draw(S["B"], S["P"], V, workload, g) for _ in range(n_iters)]


def model_flops(shape: str) -> dict:
    """Model FLOPs of one iteration (matmuls only; 2 FLOPs per multiply-add; backward = 2x forward).

    Per token, one decoder forward: 2·L·(H·(H + 2·Hkv·D) + H·H + 3·H·I) (q, k, v, o projections, gated MLP);
    LM head 2·H·V per scored token; attention 4·L·Hq·D·t per token attending over t keys (QKᵀ and AV).
    generation: prefill B·P tokens (+ head on the last) + B·(G−1) decode steps (+ head each);
    experience: policy, reference, reward, value forwards over B·(P+G) tokens (+ head on the G response positions for
    policy and reference); training: epochs × 3 × (policy + value forwards).
    """
    S = SHAPES[shape]
    m = S["model"]
    H, I, L, V = m["hidden_size"], m["intermediate_size"], m["num_hidden_layers"], m["vocab_size"]
    Hq, Hkv = m["num_attention_heads"], m["num_key_value_heads"]
    D = H // Hq
    B, P, G, E = S["B"], S["P"], S["G"], S["epochs"]
    T = P + G
    body = 2 * L * (H * (H + 2 * Hkv * D) + H * Hq * D + 3 * H * I)  # per token
    head = 2 * H * V  # per scored token
    attn_full = 4 * L * Hq * D * (T * (T + 1) / 2)  # one causal sequence of T tokens
    attn_prefill = 4 * L * Hq * D * (P * (P + 1) / 2)
    attn_decode = 4 * L * Hq * D * sum(P + i + 1 for i in range(1, G))
    fwd_seq_body = B * (T * body + attn_full)  # one model over the rollout batch
    gen = B * (P * body + attn_prefill + head) + B * ((G - 1) * (body + head)) + B * attn_decode
    exp = 4 * fwd_seq_body + 2 * B * G * head
    train = E * 3 * (2 * fwd_seq_body + B * G * head)
    attention = B * (attn_prefill + attn_decode) + (4 + E * 3 * 2) * B * attn_full
    return {"generation": gen, "experience": exp, "training": train, "total": gen + exp + train,
            "attention": attention}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _PeakMemory:
    """Peak memory over a block. CUDA: max_memory_allocated (GiB, absolute). CPU: peak RSS delta (MiB, see module doc)."""

    def __init__(self, device: str):
        self.device = device
        self.how = ""

    @staticmethod
    def _status_kib(field: str) -> int | None:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.how = "torch.cuda.max_memory_allocated (GiB)"
            return
        import resource
        self.rss0 = self._status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset the peak-RSS high-water mark (VmHWM) to the current RSS
            self.how = "peak RSS delta (MiB): VmHWM reset via /proc/self/clear_refs"
            self.use_hwm = self.rss0 is not None
        except OSError:
            self.use_hwm = False
        if not self.use_hwm:
            self.ru0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            self.how = "ru_maxrss delta (MiB, lower bound)"

    def stop(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**30
        if self.use_hwm:
            return (self._status_kib("VmHWM") - self.rss0) / 1024
        import resource
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.ru0) / 1024


def _summary(times: list[tuple[float, float, float]], B: int, G: int, resp_tokens: list[int] | None = None) -> dict:
    """times: (generation, experience, training) seconds per iteration, warm-up first; resp_tokens: valid response
    tokens per iteration, warm-up first (None = B·G each: the fixed workload)."""
    tot = [sum(t) for t in times]
    steady = tot[1:] or tot
    med = statistics.median(steady)
    part = lambda i: statistics.median([t[i] for t in (times[1:] or times)])  # noqa: E731
    ntok = statistics.median((resp_tokens[1:] or resp_tokens)) if resp_tokens else B * G
    return {"s_per_iter": med, "p20_s": _quantile(steady, 0.2), "p80_s": _quantile(steady, 0.8),
            "resp_tok_s": ntok / med, "gen_s": part(0), "exp_s": part(1), "train_s": part(2),
            "setup_s": max(tot[0] - med, 0.0), "iter_times": tot, "phase_times": [list(t) for t in times]}


def merge_rounds(results: list[dict], B: int, G: int) -> dict:
    """One arm's results from several rounds (fresh processes) -> one: the warm-up of each round dropped, the timed
    iterations of all rounds pooled for the medians, the largest peak memory, the rest from the first round."""
    bad = [r["error"] for r in results if "error" in r]
    if bad:
        return {"error": bad[0]}
    steady = [tuple(t) for r in results for t in r["phase_times"][1:]]
    out = dict(results[0])
    ntok = None
    if all(r.get("resp_tokens") for r in results):
        ntok = [results[0]["resp_tokens"][0]] + [n for r in results for n in r["resp_tokens"][1:]]
        for key in ("resp_lens", "pad_frac"):
            out[key] = [results[0][key][0]] + [x for r in results for x in r[key][1:]]
    out.update(_summary([tuple(results[0]["phase_times"][0])] + steady, B, G, ntok))
    out["peak_mem"] = max(r["peak_mem"] for r in results)
    out["rounds"] = len(results)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# fastrlhf arm
# ----------------------------------------------------------------------------------------------------------------------
def run_fastrlhf(shape: str, ckpt: dict, device: str, iters: int, *, profile: bool = True, seed: int = 0,
                 old_logprobs: str = "recompute", lr: float = LR, workload: str = "fixed",
                 padding_free: bool = True) -> dict:
    """Warm-up + ``iters`` timed iterations of fastrlhf's PPO core (+ one profiled iteration). Returns the metrics
    (``scores`` / ``kls``: per iteration, warm-up first). old_logprobs, lr, padding_free: as the PPO stage's options."""
    from fastrlhf.engine.hybrid import HybridEngine
    from fastrlhf.models.decoder import autocast_context
    from fastrlhf.models.hf_io import load_model
    from fastrlhf.runtime.device import model_precision
    from fastrlhf.runtime.optim import make_adamw
    from fastrlhf.stages.ppo_core import logprob_mismatch, ppo_iteration

    S = SHAPES[shape]
    B, G, V = S["B"], S["G"], S["model"]["vocab_size"]
    dev = torch.device(device)
    prec = model_precision("auto", dev)  # ppo.py's mixed_precision="auto": one rule for all four models
    compute_dtype = prec.autocast
    policy = load_model(ckpt["policy"], head="lm", device=dev, dtype=prec.weights)
    ref = load_model(ckpt["policy"], head="lm", device=dev, dtype=prec.weights)
    reward = load_model(ckpt["reward"], head="score", device=dev, dtype=prec.weights)
    value = load_model(ckpt["reward"], head="score", device=dev, dtype=prec.weights)
    for m in (ref, reward):
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    policy.train(), value.train()
    policy_opt = make_adamw(policy, lr=lr, weight_decay=0.0)
    value_opt = make_adamw(value, lr=lr, weight_decay=0.0)
    autocast = lambda: autocast_context(dev, enabled=compute_dtype is not None)  # noqa: E731
    engine = HybridEngine(policy, memory_policy="keep", compute_dtype=compute_dtype)
    n_total = iters + 1 + (1 if profile else 0)
    prompts = make_prompts(shape, n_total, seed=seed + 1, workload=workload)
    gen = torch.Generator(device="cpu")
    pad = V - 2
    eos = V - 1 if workload == "realistic" else None
    last = {}
    curves = {"scores": [], "kls": [], "mismatch_max": [], "resp_lens": [], "pad_frac": [], "resp_tokens": []}

    # the trainer's own iteration (ppo_core.ppo_iteration), with this benchmark's fixed settings
    sampling = dict(max_new_tokens=G, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=pad)
    experience = dict(gamma=GAMMA, lam=LAM, temperature=1.0, eos_token_id=eos, missing_eos_penalty=None,
                      forward_batch_size=64, autocast=autocast, whiten_advantages=True, old_logprobs=old_logprobs,
                      padding_free=padding_free)
    update = dict(epochs=S["epochs"], minibatch_size=S["minibatch"], clip_eps=CLIP, vf_clip_eps=VF_CLIP,
                  temperature=1.0, max_grad_norm=1.0, autocast=autocast, padding_free=padding_free)

    def iteration(step: int) -> tuple[float, float, float]:
        _sync(device)
        it = ppo_iteration(prompts[step], engine=engine, policy=policy, ref_policy=ref, reward_model=reward,
                           value_model=value, policy_opt=policy_opt, value_opt=value_opt, kl_coef=KL_COEF,
                           sampling=sampling, experience=experience, update=update,
                           rollout_seed=seed * 100003 + step, generator=gen, update_seed=seed * 7919 + step,
                           sync=lambda: _sync(device))
        rollout, exp, stats = it.rollout, it.experience, it.stats
        last.update(stats=stats, resp_len=float(rollout.lengths.float().mean()), G=int(rollout.response_ids.shape[1]),
                    score=float(exp.scores.mean()), kl=float((exp.kl * exp.mask).sum(-1).mean()))
        lens = rollout.lengths.tolist()
        curves["resp_lens"].append(lens)
        curves["resp_tokens"].append(sum(lens))
        curves["pad_frac"].append(pad_fraction([len(p) for p in prompts[step]], lens,
                                               rollout.prompt_ids.shape[1] + rollout.response_ids.shape[1]))
        curves["scores"].append(last["score"])
        curves["kls"].append(last["kl"])
        curves["mismatch_max"].append(logprob_mismatch(exp.rollout_logprobs, exp.old_logprobs, exp.mask)[1]
                                      if old_logprobs == "recompute" else stats["first_forward_mismatch_max"])
        return it.time_generate, it.time_experience, it.time_train

    mem = _PeakMemory(device)
    mem.start()
    times = [iteration(i) for i in range(iters + 1)]
    peak = mem.stop()
    out = _summary(times, B, G, curves["resp_tokens"])
    out.update(curves)
    out.update(peak_mem=peak, peak_mem_how=mem.how, response_len=last["resp_len"], score=last["score"],
               kl=last["kl"], **{k: last["stats"][k] for k in ("policy_loss", "value_loss", "entropy", "grad_norm",
                                                               "approx_kl")})
    if last["G"] != G and workload == "fixed":
        raise RuntimeError(f"benchmarks/run_ppo.py: fastrlhf rollout has {last['G']} response tokens, expected {G}")
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile
        from .timing import _quiet_fd2
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with _quiet_fd2(), tprofile(activities=acts) as prof:
            iteration(iters + 1)
        key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        out["profile_table"] = prof.key_averages().table(sort_by=key, row_limit=10, max_name_column_width=48)
        phases = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages() if e.key.startswith("ppo/")}
        out["profile_phases_ms"] = phases
    return out


# ----------------------------------------------------------------------------------------------------------------------
# TRL arm
# ----------------------------------------------------------------------------------------------------------------------
def trl_importable() -> tuple[bool, str]:
    """(True, version) when ``trl.experimental.ppo.PPOTrainer`` imports in this process, else (False, why)."""
    try:
        import trl
    except Exception as e:  # noqa: BLE001
        return False, f"trl not importable ({type(e).__name__}: {e})"
    try:
        from trl.experimental.ppo import PPOTrainer  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return False, f"trl {trl.__version__} has no trl.experimental.ppo.PPOTrainer ({type(e).__name__})"
    return True, trl.__version__


def run_trl(shape: str, ckpt: dict, device: str, iters: int, *, seed: int = 0, workload: str = "fixed") -> dict:
    """Warm-up + ``iters`` timed steps of TRL's PPOTrainer on the same checkpoints and prompts. Returns the metrics."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM, Qwen2ForSequenceClassification, TrainerCallback
    import trl
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    import trl.experimental.ppo.ppo_trainer as trl_ppo_mod

    S = SHAPES[shape]
    B, P, G, V = S["B"], S["P"], S["G"], S["model"]["vocab_size"]
    cuda = device == "cuda"
    # word-level tokenizer over the model's vocabulary: w0..w{V-3}, [PAD] = V-2, [EOS] = V-1 (prompts are ids anyway)
    vocab = {f"w{i}": i for i in range(V - 2)}
    vocab.update({"[PAD]": V - 2, "[EOS]": V - 1})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", eos_token="[EOS]")
    tok.padding_side = "left"
    dt = torch.bfloat16 if cuda else torch.float32
    policy = Qwen2ForCausalLM.from_pretrained(ckpt["policy"], dtype=torch.float32)
    ref = Qwen2ForCausalLM.from_pretrained(ckpt["policy"], dtype=torch.float32)
    rm = Qwen2ForSequenceClassification.from_pretrained(ckpt["reward"], dtype=torch.float32)
    vm = Qwen2ForSequenceClassification.from_pretrained(ckpt["reward"], dtype=torch.float32)
    del dt  # TRL's own mixed precision (bf16=True on CUDA) handles the dtypes, as in the H100 reference run
    prompts = [row for it in make_prompts(shape, iters + 1, seed=seed + 1, workload=workload) for row in it]
    eos = V - 1 if workload == "realistic" else None
    ds = Dataset.from_list([{"input_ids": r} for r in prompts])
    micro = S["trl_micro"]
    args = PPOConfig(output_dir=tempfile.mkdtemp(prefix="fastrlhf_bench_trl_ppo_"), per_device_train_batch_size=micro,
                     gradient_accumulation_steps=B // micro, num_mini_batches=B // S["minibatch"],
                     num_ppo_epochs=S["epochs"], total_episodes=B * (iters + 1), response_length=G,
                     stop_token="eos" if eos is not None else None,
                     temperature=1.0, local_rollout_forward_batch_size=min(B, 16 if cuda else B), learning_rate=LR,
                     report_to=[], logging_steps=1, save_strategy="no", num_sample_generations=0, kl_coef=KL_COEF,
                     missing_eos_penalty=None, use_cpu=not cuda, gradient_checkpointing=False, bf16=cuda, fp16=False,
                     dataloader_num_workers=0, seed=seed, cliprange=CLIP, cliprange_value=VF_CLIP, gamma=GAMMA,
                     lam=LAM, max_grad_norm=1.0, disable_tqdm=True)

    marks: dict[str, list[float]] = {"gen0": [], "gen1": [], "whiten": [], "end": []}
    curves = {"resp_lens": [], "pad_frac": [], "resp_tokens": []}  # per generation call (= per step: one batch)
    real_gen, real_whiten = trl_ppo_mod.batch_generation, trl_ppo_mod.masked_whiten

    def timed_gen(*a, **k):
        _sync(device)
        marks["gen0"].append(time.perf_counter())
        out = real_gen(*a, **k)
        _sync(device)
        marks["gen1"].append(time.perf_counter())
        queries = a[1] if len(a) > 1 else k["queries"]  # batch_generation(model, queries, fwd_bs, pad_id, config)
        Pw = queries.shape[1]
        lens = response_lengths(out[0][:, Pw:].cpu(), eos).tolist()  # TRL truncates after its stop token (EOS)
        curves["resp_lens"].append(lens)
        curves["resp_tokens"].append(sum(lens))
        curves["pad_frac"].append(pad_fraction((queries != V - 2).sum(-1).tolist(), lens, out[0].shape[1]))
        return out

    def timed_whiten(*a, **k):
        out = real_whiten(*a, **k)
        _sync(device)
        marks["whiten"].append(time.perf_counter())  # the last call of a step = end of the experience phase
        return out

    class _Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            _sync(device)
            marks["end"].append(time.perf_counter())

    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                         train_dataset=ds, value_model=vm, callbacks=[_Clock()])
    if args.batch_size != B:  # set by PPOTrainer: micro × accumulation × mini-batches × processes
        raise RuntimeError(f"benchmarks/run_ppo.py: TRL batch size {args.batch_size} != B = {B}")
    mem = _PeakMemory(device)
    trl_ppo_mod.batch_generation, trl_ppo_mod.masked_whiten = timed_gen, timed_whiten
    try:
        mem.start()
        _sync(device)
        t_start = time.perf_counter()
        trainer.train()
        peak = mem.stop()
    finally:
        trl_ppo_mod.batch_generation, trl_ppo_mod.masked_whiten = real_gen, real_whiten
    n = len(marks["end"])
    if n != iters + 1 or len(marks["gen0"]) != n:
        raise RuntimeError(f"benchmarks/run_ppo.py: TRL ran {n} steps / {len(marks['gen0'])} generations, expected {iters + 1}")
    starts = [t_start] + marks["end"][:-1]
    times = []
    for i in range(n):
        w = max(t for t in marks["whiten"] if marks["gen1"][i] <= t <= marks["end"][i])
        times.append((marks["gen1"][i] - starts[i], w - marks["gen1"][i], marks["end"][i] - w))
    out = _summary(times, B, G, curves["resp_tokens"])
    out.update(curves)
    out.update(peak_mem=peak, peak_mem_how=mem.how, trl_version=trl.__version__, trl_micro_batch=micro)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# runner
# ----------------------------------------------------------------------------------------------------------------------
def _arm_subprocess(arm: str, shape: str, ckpt_root: str, device: str, iters: int, threads: int, profile: bool,
                    trl_path: str | None, timeout: float, workload: str = "fixed") -> dict:
    """Run one arm in a fresh ``python -m benchmarks.run_ppo --arm ...`` process; returns its metrics (or {"error": ...})."""
    out_json = os.path.join(ckpt_root, f"{arm}.json")
    cmd = [sys.executable, "-m", "benchmarks.run_ppo", "--arm", arm, "--ckpt", ckpt_root, "--json", out_json,
           "--shape", shape, "--device", device, "--iters", str(iters), "--threads", str(threads),
           "--workload", workload]
    if not profile:
        cmd.append("--no-profile")
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parent.parent)
    paths = ([trl_path] if (arm == "trl" and trl_path) else []) + [repo] + \
        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=repo)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if r.returncode != 0 or not os.path.exists(out_json):
        tail = (r.stderr or r.stdout or "").strip().splitlines()[-15:]
        return {"error": f"exit {r.returncode}: " + " | ".join(tail)}
    with open(out_json) as fh:
        return json.load(fh)


def _rows(arm: str, res: dict, device: str, flops: dict | None) -> list[dict]:
    """Metric rows of one arm; flops None (realistic workload: ``model_flops`` counts fixed lengths) = no FLOP rates."""
    rows = []

    def add(metric, value, unit):
        rows.append(dict(provider=arm, metric=metric, median=float(value), unit=unit))

    add("s_per_iter", res["s_per_iter"], "s")
    add("resp_tok_s", res["resp_tok_s"], "tok/s")
    add("gen_s", res["gen_s"], "s")
    add("exp_s", res["exp_s"], "s")
    add("train_s", res["train_s"], "s")
    add("setup_s", res["setup_s"], "s")
    if res.get("resp_lens"):  # over the timed iterations (warm-up dropped)
        timed = res["resp_lens"][1:] or res["resp_lens"]
        st = length_stats([n for x in timed for n in x])
        add("resp_len_p50", st["median"], "tok")
        add("resp_len_p90", st["p90"], "tok")
        add("pad_frac", statistics.median(res["pad_frac"][1:] or res["pad_frac"]), "frac")
    if device == "cuda":
        add("peak_mem", res["peak_mem"], "GiB")
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
        if flops is not None:
            add("tflops", flops["total"] / res["s_per_iter"] / 1e12, "TFLOP/s")
            if peak is not None:
                add("mfu", 100 * flops["total"] / res["s_per_iter"] / peak, "%")
    else:
        add("peak_rss_delta", res["peak_mem"], "MiB")
        if flops is not None:
            add("gflops", flops["total"] / res["s_per_iter"] / 1e9, "GFLOP/s")
    return rows


def _write_csv(path: Path, rows: list[dict], meta: dict) -> Path:
    """Append rows (header when new); a file with another runner's header is left alone and the rows go to
    ``<stem>_ppo.csv`` beside it. Returns the path used."""
    return write_csv(path, rows, meta, suffix="_ppo")


def run(shape: str | None = None, device: str | None = None, iters: int = 4, threads: int = 2, arms=ARMS,
        profile: bool = True, trl_path: str | None = None, timeout: float = 1800.0, seed: int = 0, rounds: int = 1,
        workload: str = "fixed"):
    """Both arms, one fresh process each, on the same checkpoints; ``rounds`` > 1 alternates the arms (A B A B ...) so
    that a drifting machine load hits both alike, and pools their timed iterations. Returns (rows, info, results)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = shape or ("qwen2-0.5b" if device == "cuda" else "tiny")
    check_choice("shape", shape, SHAPES)
    if iters < 1:
        raise ValueError(f"--iters {iters}: at least 1 timed iteration (after the warm-up)")
    if rounds < 1:
        raise ValueError(f"--rounds {rounds}: at least 1")
    check_choices("arms", arms, ARMS)
    check_workload(workload)
    S = SHAPES[shape]
    flops = model_flops(shape)
    with tempfile.TemporaryDirectory(prefix="fastrlhf_bench_ppo_") as root:
        build_checkpoints(shape, root, seed=seed, workload=workload)
        per_round = alternate(arms, rounds, lambda arm, r: _arm_subprocess(
            arm, shape, root, device, iters, threads, profile and r == 0, trl_path, timeout, workload))
    results = {a: merge_rounds(per_round[a], S["B"], S["G"]) for a in arms}
    rows = []
    for arm in arms:
        if "error" not in results[arm]:
            rows += _rows(arm, results[arm], device, flops if workload == "fixed" else None)
    ok = {a: r for a, r in results.items() if "error" not in r}
    if "fastrlhf" in ok and "trl" in ok:
        f, t = ok["fastrlhf"], ok["trl"]
        rows.append(dict(provider="fastrlhf", metric="speedup_vs_trl", median=t["s_per_iter"] / f["s_per_iter"],
                         unit="x"))
        rows.append(dict(provider="fastrlhf", metric="mem_ratio_vs_trl",
                         median=f["peak_mem"] / t["peak_mem"] if t["peak_mem"] > 0 else math.nan, unit="x"))
    info = dict(device=device, shape=shape, dtype="bf16 autocast" if device == "cuda" else "fp32", B=S["B"], P=S["P"],
                G=S["G"], epochs=S["epochs"], minibatch=S["minibatch"], iters=iters, threads=threads, rounds=rounds,
                gflop_per_iter=flops["total"] / 1e9, workload=workload)
    return rows, info, results


def side_by_side(results: dict, device: str) -> str:
    """fastrlhf | TRL | ratio for the headline metrics."""
    f, t = results.get("fastrlhf", {}), results.get("trl", {})
    mem_unit = "GiB" if device == "cuda" else "MiB"
    lines = ["| metric | fastrlhf | TRL PPOTrainer | TRL / fastrlhf |", "|---|---|---|---|"]
    for key, label in (("s_per_iter", "s / iteration"), ("resp_tok_s", "response tok/s"), ("gen_s", "generation s"),
                       ("exp_s", "experience s"), ("train_s", "training s"),
                       ("peak_mem", f"peak mem ({mem_unit})")):
        if key == "resp_tok_s" and (f.get("resp_lens") or t.get("resp_lens")):  # lengths first, then speeds
            for r_key, r_label in (("median", "response length p50"), ("p90", "response length p90")):
                vals = [length_stats([n for x in (d.get("resp_lens") or [[]])[1:] for n in x])[r_key] if d.get(
                    "resp_lens") else None for d in (f, t)]
                lines.append(f"| {r_label} | " + " | ".join("–" if v is None else f"{v:.0f}" for v in vals) + " | |")
        a, b = f.get(key), t.get(key)
        fmt = lambda v: "–" if v is None else f"{v:.4g}"  # noqa: E731
        ratio = f"{b / a:.2f}x" if (a and b) else "–"
        lines.append(f"| {label} | {fmt(a)} | {fmt(b)} | {ratio} |")
    return "\n".join(lines)


def _arm_main(a) -> int:
    torch.set_num_threads(a.threads)
    root = Path(a.ckpt)
    ckpt = {"policy": str(root / "policy"), "reward": str(root / "reward")}
    if a.arm == "fastrlhf":
        res = run_fastrlhf(a.shape, ckpt, a.device, a.iters, profile=not a.no_profile, workload=a.workload)
    else:
        ok, why = trl_importable()
        if not ok:
            raise SystemExit(f"benchmarks/run_ppo.py --arm trl: {why}; install trl==0.29.1 into a folder "
                             f"(pip install --no-deps --target DIR trl==0.29.1) and pass --trl-path DIR")
        res = run_trl(a.shape, ckpt, a.device, a.iters, workload=a.workload)
    res["threads"] = torch.get_num_threads()
    with open(a.json, "w") as fh:
        json.dump(res, fh)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run_ppo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: qwen2-0.5b on CUDA, tiny on CPU")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--iters", type=int, default=4, help="timed iterations after one warm-up (median)")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the arms this many times (fresh processes; "
                    "pooled timed iterations)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads per arm (the reference CPU runs: 2)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--trl-path", default=os.environ.get("FASTRLHF_TRL_PATH"),
                    help="folder with a trl that has trl.experimental.ppo (e.g. trl==0.29.1 installed with "
                         "pip --target); prepended to the TRL arm's sys.path (env FASTRLHF_TRL_PATH)")
    ap.add_argument("--no-profile", action="store_true", help="skip the torch.profiler iteration")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per arm")
    ap.add_argument("--csv", default=str(DEFAULT_CSV), help="CSV to append rows to (default: %(default)s)")
    ap.add_argument("--no-csv", action="store_true", help="print only")
    ap.add_argument("--workload", choices=list(WORKLOADS), default="fixed",
                    help="fixed: P-token prompts, exactly G response tokens; realistic: prompt lengths over P/8..P, "
                         "EOS hazard 1-0.5^(4/G) built into the policy's weights (benchmarks/workload.py)")
    ap.add_argument("--plot", default=None, metavar="PATH.png", help="draw the time split per phase and arm")
    ap.add_argument("--floor", action="store_true", help="also time the iteration's GEMM floor in this run "
                    "(benchmarks/run_floor.py, decode as chains) and print what it leaves against TRL")
    # internal: one arm in this process (the runner starts these)
    ap.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.arm:
        a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        a.shape = a.shape or ("qwen2-0.5b" if a.device == "cuda" else "tiny")
        return _arm_main(a)
    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    rows, info, results = run(a.shape, a.device, a.iters, a.threads, tuple(a.arms), not a.no_profile, a.trl_path,
                              a.timeout, rounds=a.rounds, workload=a.workload)
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    meta = dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), device=device_name(info["device"]),
                bench="ppo", shape=info["shape"] + ("" if a.workload == "fixed" else f"/{a.workload}"),
                torch=torch.__version__, commit=git_commit())
    print(f"device: {meta['device']} | torch {meta['torch']} | commit {meta['commit']} | shape {info['shape']} "
          f"(B={info['B']}, P={info['P']}, G={info['G']}, {info['epochs']} epochs, minibatch {info['minibatch']}, "
          f"{info['dtype']}, 4 models, {info['workload']} workload) | median of {info['rounds']}x{info['iters']} iterations (1 warm-up per "
          f"process; arms alternate per round) | "
          f"{info['gflop_per_iter']:.0f} GFLOP/iter | load avg (1 min) {load0:.1f} before, {load1:.1f} after")
    for arm, res in results.items():
        if "error" in res:
            print(f"[{arm}] not measured: {res['error']}")
        elif arm == "trl":
            print(f"[trl] trl {res['trl_version']}, micro-batch {res['trl_micro_batch']}")
    if results.get("fastrlhf", {}).get("peak_mem_how"):
        print(f"peak memory: {results['fastrlhf']['peak_mem_how']}")
    print(side_by_side(results, info["device"]))
    if a.floor:
        from .run_floor import floor_note, floor_of
        fl = floor_of(info["shape"], "ppo", a.workload, info["device"],
                      torch.bfloat16 if info["device"] == "cuda" else torch.float32)
        f, t = results.get("fastrlhf", {}), results.get("trl", {})
        for what, key in (("generation", "gen_s"), ("total", "s_per_iter")):
            print(floor_note(fl, what, peer=t.get(key), ours=f.get(key)))
    print(format_table(rows))
    prof = results.get("fastrlhf", {}).get("profile_table")
    if prof:
        print("\nfastrlhf: top 10 ops by self time, one profiled iteration (torch.profiler; phases: "
              + ", ".join(f"{k} {v:.0f} ms" for k, v in results["fastrlhf"].get("profile_phases_ms", {}).items())
              + ")")
        print(prof)
    if not a.no_csv and rows:
        used = _write_csv(Path(a.csv), rows, meta)
        print(f"appended {len(rows)} rows to {used}")
    ok = {arm: r for arm, r in results.items() if "error" not in r}
    if a.plot and ok:
        from .plots import phases_png
        phases = {arm: {"generation": r["gen_s"], "experience": r["exp_s"], "training": r["train_s"]}
                  for arm, r in ok.items()}
        out = phases_png(a.plot, phases, f"PPO iteration, {meta['device']}, shape {info['shape']} (B={info['B']}, "
                         f"P={info['P']}, G={info['G']}), {info['workload']} workload")
        print(f"plot: {out}")
    return 0 if all("error" not in r for a_, r in results.items() if a_ == "fastrlhf") else 1


if __name__ == "__main__":
    raise SystemExit(main())
