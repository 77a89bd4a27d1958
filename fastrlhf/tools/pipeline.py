"""``fastrlhf pipeline``: the three InstructGPT stages end to end on the embedded task, on whatever device is present.

Data flow (InstructGPT Fig. 2, at toy scale; every arrow goes through the same jsonl files and code a user's data takes):

    labeler demonstrations ──► sft.jsonl ──► [1. SFT] ──► SFT policy
    SFT policy samples K responses per prompt ──► labeler ranks them ──► rm.jsonl ──► [2. RM] ──► reward model
    SFT policy + reward model + ppo_prompts.jsonl ──► [3. PPO] ──► PPO policy
                                    + ptx.jsonl (γ × LM loss) ──► [3b. PPO-ptx] ──► PPO-ptx policy
    [4. eval] PPO (and PPO-ptx) vs SFT on held-out prompts: the labeler's judge score and the win rate over SFT
              (wins + ½ ties); the held-out LM loss on pretraining-like text (lm_eval.jsonl): the alignment tax
    plots/over_optimisation.png: proxy RM score and judge score of each PPO iteration's rollouts against their KL
    plots/alignment_tax.png: held-out LM loss and judge score of SFT, PPO and PPO-ptx

"Pretraining-like text" at this scale: labeler demonstrations (imperfect ones included, as in sft.jsonl) of prompts
that no stage trains on; the tiny model's only "pretraining" is SFT on such text.

With no arguments it runs a preset sized for ≤ 5 minutes on 2 CPU cores. Every field can be overridden (``--help``).

``--rl grpo``: the critic-free variant with a verifiable reward. No reward model: after SFT, GRPO optimises the
labeler's exact-match score itself (``task.reward`` as a Python reward function, n samples per prompt), then the same
evaluation (GRPO vs SFT):   sft.jsonl ──► [1. SFT] ──► [2. GRPO, reward = task.reward] ──► [3. eval]
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from fastrlhf.runtime.config import flat_kwargs, param, section


@dataclass
class TaskSection:
    """The embedded task's data: how many demonstrations, rankings and prompts the labeler makes."""

    n_sft: int = param(2000, "labeler demonstrations for SFT", ge=2)
    demo_noise: float = param(0.3, "fraction of imperfect demonstrations (as human ones are)", ge=0, le=1)
    n_rm_prompts: int = param(3000, "prompts whose K SFT samples the labeler ranks", ge=2)
    k: int = param(8, "responses ranked per prompt (K, 2..9; InstructGPT: 4..9)", ge=2, le=9)
    n_ppo_prompts: int = param(1024, "PPO / GRPO prompts", ge=1)
    n_eval: int = param(1024, "held-out prompts for the final evaluation", ge=1)


@dataclass
class PipeSFT:
    """Stage 1 of the pipeline."""

    steps: int = param(300, "SFT optimizer steps", ge=1, flat="sft_steps")
    batch_tokens: int = param(256, "SFT tokens per step (packed)", ge=1, flat="sft_batch_tokens")
    lr: float = param(3e-3, "SFT peak learning rate", gt=0, flat="sft_lr")


@dataclass
class PipeRM:
    """Stage 2 of the pipeline (--rl ppo)."""

    epochs: int = param(3, "reward-model epochs", ge=1, flat="rm_epochs")
    lr: float = param(5e-4, "reward-model learning rate", gt=0, flat="rm_lr")


@dataclass
class PipePPO:
    """Stage 3 of the pipeline with --rl ppo."""

    iterations: int = param(120, "PPO iterations", ge=1, flat="ppo_iterations")
    batch: int = param(64, "PPO rollouts per iteration", ge=1, flat="ppo_batch")
    minibatch: int = param(32, "PPO rollouts per optimizer step", ge=1, flat="ppo_minibatch")
    lr: float = param(5e-5, "PPO policy learning rate", gt=0, flat="ppo_lr")
    value_lr: float = param(1e-3, "PPO value learning rate", gt=0)
    kl_coef: float = param(0.1, "β, the per-token KL penalty (the start value when kl_target > 0)", ge=0)
    kl_target: float = param(0.0, "adapt β toward this KL (nats per sequence; 0 = fixed β)", ge=0)
    missing_eos_penalty: float = param(2.0, "score penalty for responses that hit max_new_tokens without EOS", ge=0)


@dataclass
class PipePtx:
    """PPO-ptx (InstructGPT): a second PPO run with γ × the LM loss on pretraining-like text mixed into each update, and
    the alignment tax: the held-out LM loss on that kind of text for SFT, PPO and PPO-ptx."""

    coef: float = param(1.0, "γ of PPO-ptx (0 = no PPO-ptx run)", ge=0, flat="ptx_coef")
    n_docs: int = param(2000, "pretraining-like documents for the ptx term (labeler demonstrations of other prompts)",
                        ge=1)
    n_lm_eval: int = param(500, "held-out documents for the LM loss (the alignment tax)", ge=1)


@dataclass
class PipeGRPO:
    """Stage 3 of the pipeline with --rl grpo (no reward model: GRPO on the labeler's score)."""

    iterations: int = param(30, "GRPO iterations", ge=1, flat="grpo_iterations")
    batch: int = param(16, "GRPO prompts per iteration (each sampled n times)", ge=1, flat="grpo_batch")
    n: int = param(8, "GRPO completions per prompt (the group)", ge=2, flat="grpo_n")
    lr: float = param(2e-4, "GRPO policy learning rate", gt=0, flat="grpo_lr")
    advantage: str = param("grpo", "GRPO advantages: grpo | drgrpo | rloo", choices=("grpo", "drgrpo", "rloo"),
                           flat="grpo_advantage")
    kl_coef: float = param(0.0, "GRPO β (KL-in-loss, k3); 0 = no reference model", ge=0, flat="grpo_kl_coef")


@flat_kwargs
@dataclass
class PipelineConfig:
    """SFT -> reward model -> PPO (or GRPO) -> evaluation on the embedded instruction-following task (no downloads)."""

    output_dir: str = param("runs/pipeline", "root folder: data/, sft/, rm/, ppo/ and summary.json go here")
    seed: int = param(0, "seed of the task, the labeler, the model init and every stage")
    device: str = param("auto", "auto | cpu | cuda | cuda:N")
    overwrite: bool = param(False, "start over in a used output_dir (each stage's checkpoints and metrics are deleted)")
    base_model: str = param("", "start from this HF folder instead of the built-in tiny Llama (needs the task's words)")
    hidden_size: int = param(128, "built-in model: hidden size", ge=32)
    num_layers: int = param(2, "built-in model: decoder blocks", ge=1)
    max_new_tokens: int = param(8, "response length cap (tokens)", ge=1)
    temperature: float = param(1.0, "sampling temperature for RM data, PPO and the evaluation", gt=0)
    rl: str = param("ppo", "the RL stage: ppo (reward model + PPO) | grpo (no RM: GRPO on the labeler's score)",
                    choices=("ppo", "grpo"))
    task: TaskSection = section(TaskSection, "the embedded task's data")
    sft: PipeSFT = section(PipeSFT, "stage 1: SFT")
    rm: PipeRM = section(PipeRM, "stage 2: reward model")
    ppo: PipePPO = section(PipePPO, "stage 3: PPO")
    grpo: PipeGRPO = section(PipeGRPO, "stage 3 with --rl grpo: GRPO")
    ptx: PipePtx = section(PipePtx, "PPO-ptx and the alignment tax (--rl ppo)")
    plots: bool = param(True, "PNG plots (over-optimisation, alignment tax) in output_dir/plots")


def _banner(msg: str) -> None:
    print(f"\n[fastrlhf pipeline] {msg}", flush=True)


def run(cfg: PipelineConfig) -> dict:
    from fastrlhf.tools import task
    from fastrlhf.stages.eval import reward_scores, sample_responses, win_rate
    from fastrlhf.models.hf_io import load_model, load_tokenizer
    from fastrlhf.runtime.device import resolve_device
    from fastrlhf.stages.ppo import train as train_ppo
    from fastrlhf.stages.reward import RewardConfig, train as train_rm
    from fastrlhf.stages.sft import SFTConfig, train as train_sft
    from fastrlhf.runtime.checkpoint import CheckpointError
    from fastrlhf.runtime.config import check_ranges

    check_ranges(cfg)
    root = Path(cfg.output_dir)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root}: --output_dir is a file, not a folder")
    if root.is_dir() and any(root.iterdir()) and not cfg.overwrite:
        raise CheckpointError(f"{root}: --output_dir already holds a pipeline run; start it over with --overwrite, "
                              f"or choose another --output_dir")
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    # 0. the task: a built-in tokenizer + tiny Llama, labeler demonstrations, prompt splits (distinct seeds)
    t0 = time.perf_counter()
    if cfg.base_model:
        base = cfg.base_model
    else:
        spec = task.TinyModelSpec(hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 8 // 3 // 8 * 8,
                                  num_hidden_layers=cfg.num_layers,
                                  num_attention_heads=max(2, cfg.hidden_size // 32),
                                  num_key_value_heads=max(1, cfg.hidden_size // 64))
        base = task.build_tiny_model(str(root / "base"), spec=spec, seed=cfg.seed)
    task.write_sft_data(str(data / "sft.jsonl"), cfg.task.n_sft, seed=cfg.seed, noise=cfg.task.demo_noise)
    task.write_prompts(str(data / "rm_prompts.jsonl"), cfg.task.n_rm_prompts, seed=cfg.seed + 1)
    task.write_prompts(str(data / "ppo_prompts.jsonl"), cfg.task.n_ppo_prompts, seed=cfg.seed + 2)
    task.write_prompts(str(data / "eval_prompts.jsonl"), cfg.task.n_eval, seed=cfg.seed + 3)
    if cfg.rl == "ppo":  # pretraining-like text: labeler demonstrations of other prompts (ptx term; held-out LM loss)
        task.write_sft_data(str(data / "ptx.jsonl"), cfg.ptx.n_docs, seed=cfg.seed + 1000, noise=cfg.task.demo_noise)
        task.write_sft_data(str(data / "lm_eval.jsonl"), cfg.ptx.n_lm_eval, seed=cfg.seed + 2000,
                            noise=cfg.task.demo_noise)
    times["data"] = time.perf_counter() - t0

    # 1. SFT on the labeler's demonstrations
    _banner(f"1/{3 if cfg.rl == 'grpo' else 4} supervised fine-tuning on the labeler's demonstrations")
    t0 = time.perf_counter()
    sft = train_sft(SFTConfig(model=base, data=str(data / "sft.jsonl"), output_dir=str(root / "sft"), seed=cfg.seed,
                              device=cfg.device, max_steps=cfg.sft.steps, lr=cfg.sft.lr,
                              batch_tokens=cfg.sft.batch_tokens, warmup_ratio=0.05, log_every=50,
                              overwrite=cfg.overwrite))
    if sft["interrupted"]:
        return sft
    sft_path = sft["checkpoint"]
    times["sft"] = time.perf_counter() - t0

    if cfg.rl == "grpo":
        return _run_grpo(cfg, root, data, device, sft, times, t_all)

    # 2. reward-model data: K samples of the SFT policy per prompt, ranked by the labeler; then RM training
    _banner(f"2/4 reward model: the labeler ranks K={cfg.task.k} SFT samples per prompt")
    t0 = time.perf_counter()
    tok = load_tokenizer(sft_path)
    policy = load_model(sft_path, head="lm", device=device)
    rm_prompts = task.instructions(cfg.task.n_rm_prompts, seed=cfg.seed + 1)
    samples = sample_responses(policy, tok, rm_prompts, max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, seed=cfg.seed + 11, n_samples=cfg.task.k)
    task.write_rankings(str(data / "rm.jsonl"), rm_prompts, samples, seed=cfg.seed)
    del policy
    rm = train_rm(RewardConfig(model=sft_path, data=str(data / "rm.jsonl"), sft_data=str(data / "sft.jsonl"),
                           output_dir=str(root / "rm"), seed=cfg.seed, device=cfg.device, epochs=cfg.rm.epochs,
                           lr=cfg.rm.lr, log_every=20, overwrite=cfg.overwrite))
    if rm["interrupted"]:
        return rm
    rm_path = rm["checkpoint"]
    times["rm"] = time.perf_counter() - t0

    # 3. PPO against the reward model with the per-token KL penalty to the SFT policy (3b: PPO-ptx, the same run with
    #    γ × the LM loss on pretraining-like text in each update); each iteration's rollouts are also judged by the
    #    labeler, for the over-optimisation curve (proxy RM score and judge score against KL)
    _banner("3/4 PPO against the reward model (KL penalty to the SFT policy)"
            + (f", then PPO-ptx (γ = {cfg.ptx.coef:g})" if cfg.ptx.coef > 0 else ""))
    t0 = time.perf_counter()
    judge = task.Labeler(seed=cfg.seed)
    curves: dict[str, list[dict]] = {}
    ckpts = {"sft": sft_path, "rm": rm_path}
    for name, ptx in (("ppo", 0.0), ("ppo_ptx", cfg.ptx.coef)):
        if name == "ppo_ptx" and ptx <= 0:
            continue
        curves[name] = []
        ppo = train_ppo(_ppo_config(cfg, root / name, sft_path, rm_path, data, ptx),
                        on_iteration=_curve_recorder(curves[name], tok, judge))
        if ppo["interrupted"]:
            return ppo
        ckpts[name] = ppo["checkpoint"]
        if name == "ppo":
            final = ppo["final"]
    times["ppo"] = time.perf_counter() - t0

    # 4. evaluation on held-out prompts: the labeler's judge (the stand-in for human preference) and the RM; the
    #    held-out LM loss on pretraining-like text (the alignment tax)
    _banner("4/4 evaluation on held-out prompts: PPO vs SFT" + (", PPO-ptx vs SFT" if "ppo_ptx" in ckpts else ""))
    t0 = time.perf_counter()
    eval_prompts = task.instructions(cfg.task.n_eval, seed=cfg.seed + 3)
    policies = [k for k in ("sft", "ppo", "ppo_ptx") if k in ckpts]
    outs, judged, lm_loss = {}, {}, {}
    for name in policies:
        model = load_model(ckpts[name], head="lm", device=device)
        outs[name] = [r[0] for r in sample_responses(model, tok, eval_prompts, max_new_tokens=cfg.max_new_tokens,
                                                     temperature=cfg.temperature, seed=cfg.seed + 99)]
        judged[name] = [judge.judge(p, o) for p, o in zip(eval_prompts, outs[name])]
        lm_loss[name] = heldout_lm_loss(model, tok, str(data / "lm_eval.jsonl"), device)
        del model
    rm_model = load_model(rm_path, head="score", device=device).eval()
    rm_sft = reward_scores(rm_model, tok, eval_prompts, outs["sft"]).tolist()
    rm_ppo = reward_scores(rm_model, tok, eval_prompts, outs["ppo"]).tolist()
    wr = win_rate(judged["ppo"], judged["sft"])
    times["eval"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - t_all

    summary = {
        "judge_score_sft": sum(judged["sft"]) / len(judged["sft"]),
        "judge_score_ppo": sum(judged["ppo"]) / len(judged["ppo"]),
        "win_rate_ppo_over_sft": wr["win_rate"], "win_rate_ci95": wr["ci95"],
        "wins": wr["wins"], "ties": wr["ties"], "losses": wr["losses"],
        "rm_score_sft": sum(rm_sft) / len(rm_sft), "rm_score_ppo": sum(rm_ppo) / len(rm_ppo),
        "rm_heldout_accuracy": rm.get("eval_accuracy", float("nan")),
        "sft_heldout_loss": sft.get("eval_loss", float("nan")),
        "final_kl": final.get("kl", float("nan")),
        "lm_loss_sft": lm_loss["sft"], "lm_loss_ppo": lm_loss["ppo"],
        "times_s": times, "checkpoints": ckpts, "device": str(device),
        "curves": curves,
        "examples": [{"prompt": p, "sft": a, "ppo": b} for p, a, b in
                     list(zip(eval_prompts, outs["sft"], outs["ppo"]))[:4]],
    }
    if "ppo_ptx" in ckpts:
        wx = win_rate(judged["ppo_ptx"], judged["sft"])
        summary.update({"judge_score_ppo_ptx": sum(judged["ppo_ptx"]) / len(judged["ppo_ptx"]),
                        "win_rate_ppo_ptx_over_sft": wx["win_rate"], "win_rate_ppo_ptx_ci95": wx["ci95"],
                        "lm_loss_ppo_ptx": lm_loss["ppo_ptx"], "ptx_coef": cfg.ptx.coef,
                        "final_kl_ppo_ptx": curves["ppo_ptx"][-1]["kl"] if curves["ppo_ptx"] else float("nan")})
    if cfg.plots:
        try:
            summary["plots"] = write_plots(summary, root / "plots")
        except ImportError:  # matplotlib is a dependency of fastrlhf; an install without it still gets the table
            print("[fastrlhf pipeline] plots skipped: matplotlib is not installed (pip install matplotlib)", flush=True)
    with open(root / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(format_summary(summary), flush=True)
    return summary


def _ppo_config(cfg: PipelineConfig, out: Path, sft_path: str, rm_path: str, data: Path, ptx_coef: float):
    """The PPO stage's config of the pipeline (PPO, or PPO-ptx when ``ptx_coef`` > 0)."""
    from fastrlhf.stages.ppo import PPOConfig

    return PPOConfig(policy=sft_path, reward_model=rm_path, prompts=str(data / "ppo_prompts.jsonl"),
                     output_dir=str(out), seed=cfg.seed, device=cfg.device, iterations=cfg.ppo.iterations,
                     batch_size=cfg.ppo.batch, minibatch_size=cfg.ppo.minibatch, max_new_tokens=cfg.max_new_tokens,
                     temperature=cfg.temperature, lr=cfg.ppo.lr, value_lr=cfg.ppo.value_lr, kl_coef=cfg.ppo.kl_coef,
                     adaptive_kl=cfg.ppo.kl_target > 0, kl_target=cfg.ppo.kl_target or 6.0,
                     kl_horizon=cfg.ppo.batch * 10, missing_eos_penalty=cfg.ppo.missing_eos_penalty,
                     ptx_coef=ptx_coef, ptx_data=str(data / "ptx.jsonl") if ptx_coef > 0 else "", log_every=4,
                     overwrite=cfg.overwrite)


def _curve_recorder(points: list, tok, judge):
    """A PPO ``on_iteration`` hook appending {iteration, kl, rm_score, judge_score} of each iteration's rollouts:
    KL to the SFT policy (nats per sequence), the proxy reward (RM score) and the labeler's judge score."""
    def record(step, rollout, exp, metrics):
        prompts = tok.batch_decode(rollout.prompt_ids.tolist(), skip_special_tokens=True)
        outs = [tok.decode(r[: int(n)].tolist(), skip_special_tokens=True).strip()
                for r, n in zip(rollout.response_ids, rollout.lengths)]
        scores = [judge.judge(p.strip(), o) for p, o in zip(prompts, outs)]
        points.append({"iteration": step, "kl": metrics["kl"], "rm_score": metrics["score"],
                       "judge_score": sum(scores) / len(scores)})
    return record


def heldout_lm_loss(model, tok, path: str, device, batch_tokens: int = 512) -> float:
    """Token-mean NLL (nats/token) of the response tokens of the documents in ``path`` (SFT-format jsonl)."""
    from fastrlhf.runtime.data import PackedLoader, load_sft, tokenize_sft
    from fastrlhf.stages.sft import evaluate

    samples, _ = tokenize_sft(load_sft(path), tok, model.config.max_position_embeddings)
    loader = PackedLoader(samples, batch_tokens, tok.pad_token_id, seed=0)
    return evaluate(model, loader, device, autocast=device.type == "cuda")


def _kl_bins(kl: list[float], n: int = 8) -> list[list[int]]:
    """Indices of ``kl`` sorted by value, cut into min(n, len) consecutive groups of (nearly) equal size."""
    order = sorted(range(len(kl)), key=lambda i: kl[i])
    n = min(n, len(order))
    return [order[len(order) * j // n: len(order) * (j + 1) // n] for j in range(n)]


def write_plots(s: dict, out: Path) -> dict:
    """Two PNGs (matplotlib, Agg): the over-optimisation curve (Gao et al. 2022: proxy RM score and judge score of
    each PPO iteration's rollouts against their KL to the SFT policy) and the alignment tax (held-out LM loss on
    pretraining-like text and judge score of SFT, PPO and PPO-ptx). Returns {name: path}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax2 = ax.twinx()
    styles = {"ppo": ("PPO", "-"), "ppo_ptx": ("PPO-ptx", "--")}
    for name, pts in s["curves"].items():
        if not pts:
            continue
        label, ls = styles[name]
        kl, rm, jd = ([p[k] for p in pts] for k in ("kl", "rm_score", "judge_score"))
        ax.scatter(kl, rm, s=4, color="tab:blue", alpha=0.25)
        ax2.scatter(kl, jd, s=4, color="tab:red", alpha=0.25)
        bins = _kl_bins(kl)  # the iterations in order of KL, in 8 groups of equal size: one mean point each
        mean = lambda xs, b: sum(xs[i] for i in b) / len(b)  # noqa: E731
        x = [mean(kl, b) for b in bins]
        ax.plot(x, [mean(rm, b) for b in bins], ls, marker="o", ms=3, color="tab:blue",
                label=f"{label}: proxy (RM score)")
        ax2.plot(x, [mean(jd, b) for b in bins], ls, marker="o", ms=3, color="tab:red",
                 label=f"{label}: judge (labeler)")
    ax.set_xlabel("KL to the SFT policy (nats per sequence)")
    ax.set_ylabel("reward-model score (proxy)", color="tab:blue")
    ax2.set_ylabel("judge score (ground truth)", color="tab:red")
    ax2.axhline(s["judge_score_sft"], color="tab:red", lw=0.8, ls=":", label="SFT judge score")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="lower right")
    ax.set_title("Over-optimisation: each dot one PPO iteration's rollouts; lines: means of 8 KL bins", fontsize=9)
    fig.tight_layout()
    paths["over_optimisation"] = str(out / "over_optimisation.png")
    fig.savefig(paths["over_optimisation"], dpi=110)
    plt.close(fig)

    names = [k for k in ("sft", "ppo", "ppo_ptx") if f"lm_loss_{k}" in s]
    labels = {"sft": "SFT", "ppo": "PPO", "ppo_ptx": "PPO-ptx"}
    colors = {"sft": "gray", "ppo": "tab:blue", "ppo_ptx": "tab:green"}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.6))
    a1.bar([labels[k] for k in names], [s[f"lm_loss_{k}"] for k in names], color=[colors[k] for k in names])
    a1.set_ylabel("held-out LM loss (nats/token)")
    a1.set_title("Alignment tax: pretraining-like text", fontsize=10)
    lo = min(s[f"lm_loss_{k}"] for k in names)
    a1.set_ylim(lo * 0.9, max(s[f"lm_loss_{k}"] for k in names) * 1.03)
    a2.bar([labels[k] for k in names], [s[f"judge_score_{k}"] for k in names], color=[colors[k] for k in names])
    a2.set_ylabel("judge score (held-out prompts)")
    a2.set_ylim(min(s[f"judge_score_{k}"] for k in names) * 0.9, 1.0)
    a2.set_title("What the labeler prefers", fontsize=10)
    fig.tight_layout()
    paths["alignment_tax"] = str(out / "alignment_tax.png")
    fig.savefig(paths["alignment_tax"], dpi=110)
    plt.close(fig)
    return paths


def _run_grpo(cfg: PipelineConfig, root: Path, data: Path, device, sft: dict, times: dict, t_all: float) -> dict:
    """Steps 2-3 of ``--rl grpo``: GRPO on the labeler's score, then GRPO vs SFT on held-out prompts."""
    from fastrlhf.models.hf_io import load_model, load_tokenizer
    from fastrlhf.stages.eval import sample_responses, win_rate
    from fastrlhf.stages.grpo import GRPOConfig, train as train_grpo
    from fastrlhf.tools import task

    sft_path = sft["checkpoint"]
    # 2. GRPO: n samples per prompt, reward = the labeler's exact-match score (a Python reward function)
    _banner(f"2/3 GRPO on the labeler's score ({cfg.grpo.advantage}, n={cfg.grpo.n} samples per prompt, no reward model)")
    t0 = time.perf_counter()
    grpo = train_grpo(GRPOConfig(policy=sft_path, prompts=str(data / "ppo_prompts.jsonl"),
                                 reward_funcs=["fastrlhf.tools.task:reward"], output_dir=str(root / "grpo"),
                                 seed=cfg.seed, device=cfg.device, iterations=cfg.grpo.iterations,
                                 batch_size=cfg.grpo.batch, num_generations=cfg.grpo.n, max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature, lr=cfg.grpo.lr, advantage=cfg.grpo.advantage,
                                 kl_coef=cfg.grpo.kl_coef, log_every=5, plots=False))
    grpo_path = grpo["checkpoint"]
    times["grpo"] = time.perf_counter() - t0

    # 3. evaluation on held-out prompts: the labeler's judge score of GRPO vs SFT
    _banner("3/3 evaluation on held-out prompts: GRPO vs SFT")
    t0 = time.perf_counter()
    tok = load_tokenizer(sft_path)
    eval_prompts = task.instructions(cfg.task.n_eval, seed=cfg.seed + 3)
    judge = task.Labeler(seed=cfg.seed)
    outs, judged = {}, {}
    for name, path in (("sft", sft_path), ("grpo", grpo_path)):
        model = load_model(path, head="lm", device=device)
        outs[name] = [r[0] for r in sample_responses(model, tok, eval_prompts, max_new_tokens=cfg.max_new_tokens,
                                                     temperature=cfg.temperature, seed=cfg.seed + 99)]
        judged[name] = [judge.judge(p, o) for p, o in zip(eval_prompts, outs[name])]
        del model
    wr = win_rate(judged["grpo"], judged["sft"])
    times["eval"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - t_all
    hist = grpo["history"]
    k = max(1, len(hist) // 5)  # training reward: mean of the first and of the last fifth of the iterations
    summary = {
        "rl": "grpo",
        "judge_score_sft": sum(judged["sft"]) / len(judged["sft"]),
        "judge_score_grpo": sum(judged["grpo"]) / len(judged["grpo"]),
        "win_rate_grpo_over_sft": wr["win_rate"], "win_rate_ci95": wr["ci95"],
        "wins": wr["wins"], "ties": wr["ties"], "losses": wr["losses"],
        "train_reward_first": sum(h["reward"] for h in hist[:k]) / k if hist else float("nan"),
        "train_reward_last": sum(h["reward"] for h in hist[-k:]) / k if hist else float("nan"),
        "sft_heldout_loss": sft.get("eval_loss", float("nan")),
        "times_s": times, "checkpoints": {"sft": sft_path, "grpo": grpo_path}, "device": str(device),
        "examples": [{"prompt": p, "sft": a, "grpo": b} for p, a, b in
                     list(zip(eval_prompts, outs["sft"], outs["grpo"]))[:4]],
    }
    with open(root / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(format_summary(summary), flush=True)
    return summary


def format_summary(s: dict) -> str:
    if s.get("rl") == "grpo":
        return _format_grpo_summary(s)
    t = s["times_s"]
    rows = [
        ("judge score (labeler), SFT", f"{s['judge_score_sft']:.3f}"),
        ("judge score (labeler), PPO", f"{s['judge_score_ppo']:.3f}"),
        ("win rate of PPO over SFT (judge)", f"{s['win_rate_ppo_over_sft']:.3f} ± {s['win_rate_ci95']:.3f} "
                                             f"({s['wins']}W/{s['ties']}T/{s['losses']}L)"),
        ("reward-model score, SFT -> PPO", f"{s['rm_score_sft']:.3f} -> {s['rm_score_ppo']:.3f}"),
        ("RM held-out pairwise accuracy", f"{s['rm_heldout_accuracy']:.3f}"),
        ("SFT held-out loss (nats/token)", f"{s['sft_heldout_loss']:.3f}"),
        ("final KL to the reference (nats/seq)", f"{s['final_kl']:.3f}"),
    ]
    if "judge_score_ppo_ptx" in s:
        rows += [
            (f"PPO-ptx (γ = {s['ptx_coef']:g}): judge score, win rate over SFT",
             f"{s['judge_score_ppo_ptx']:.3f}, {s['win_rate_ppo_ptx_over_sft']:.3f} ± {s['win_rate_ppo_ptx_ci95']:.3f}"),
        ]
    tax = " / ".join(f"{s[k]:.3f}" for k in ("lm_loss_sft", "lm_loss_ppo", "lm_loss_ppo_ptx") if k in s)
    rows += [
        ("alignment tax: held-out LM loss SFT / PPO" + (" / PPO-ptx" if "lm_loss_ppo_ptx" in s else ""), tax),
        ("wall time: data / SFT / RM / PPO / eval", " / ".join(f"{t[k]:.1f}s" for k in ("data", "sft", "rm", "ppo", "eval"))),
        ("wall time: total", f"{t['total']:.1f}s on {s['device']}"),
    ]
    w = max(len(a) for a, _ in rows)
    lines = ["", "fastrlhf pipeline: summary", "-" * (w + 30)] + [f"{a:<{w}}  {b}" for a, b in rows]
    for ex in s["examples"]:
        lines.append(f"  {ex['prompt']!r}: SFT {ex['sft']!r} | PPO {ex['ppo']!r}")
    for name, path in s.get("plots", {}).items():
        lines.append(f"plot ({name.replace('_', '-')}): {path}")
    return "\n".join(lines)


def _format_grpo_summary(s: dict) -> str:
    t = s["times_s"]
    rows = [
        ("judge score (labeler), SFT", f"{s['judge_score_sft']:.3f}"),
        ("judge score (labeler), GRPO", f"{s['judge_score_grpo']:.3f}"),
        ("win rate of GRPO over SFT (judge)", f"{s['win_rate_grpo_over_sft']:.3f} ± {s['win_rate_ci95']:.3f} "
                                              f"({s['wins']}W/{s['ties']}T/{s['losses']}L)"),
        ("GRPO training reward, first -> last fifth", f"{s['train_reward_first']:.3f} -> {s['train_reward_last']:.3f}"),
        ("SFT held-out loss (nats/token)", f"{s['sft_heldout_loss']:.3f}"),
        ("wall time: data / SFT / GRPO / eval", " / ".join(f"{t[k]:.1f}s" for k in ("data", "sft", "grpo", "eval"))),
        ("wall time: total", f"{t['total']:.1f}s on {s['device']}"),
    ]
    w = max(len(a) for a, _ in rows)
    lines = ["", "fastrlhf pipeline --rl grpo: summary", "-" * (w + 30)] + [f"{a:<{w}}  {b}" for a, b in rows]
    for ex in s["examples"]:
        lines.append(f"  {ex['prompt']!r}: SFT {ex['sft']!r} | GRPO {ex['grpo']!r}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    from fastrlhf.runtime.config import parse_config

    return run(parse_config(PipelineConfig, argv, prog="fastrlhf pipeline"))
