"""veRL's and OpenRLHF's own math for one PPO / GRPO step, on their functions and on ours (``integrations.<peer>.apply()``).

    python -m benchmarks.run_peers [--peer verl openrlhf] [--algo ppo grpo] [--shape smoke|tiny|qwen2-0.5b]
    fastrlhf bench peers ...                 (the CLI calls ``main(argv)``)

One step = what the peer computes after the model forward, for one micro-batch whose logits [B, T, V] are given (a leaf
tensor standing in for the LM head output), through the names the peer's trainer calls, then backward to the logits
and value predictions:
- veRL, ``ppo``: logprobs_from_logits + entropy_from_logits; compute_gae_advantage_return; the "vanilla" policy loss
  (dual clip c = 3); kl_penalty "low_var_kl" as KL loss and the entropy bonus through agg_loss; compute_value_loss.
  ``grpo``: the same without GAE and value loss, advantages from compute_grpo_outcome_advantage (not patched).
- OpenRLHF, ``ppo``: log_probs_from_logits; compute_approx_kl k1 into compute_reward, the experience maker's GAE and
  its inline whitening; PolicyLoss; KL loss compute_approx_kl k3 with unbiased_gradient; ValueLoss (clip 0.2).
  ``grpo``: group-normalized rewards (inline in OpenRLHF, not patched) instead of GAE, no value loss.
Both arms run the same step function on the same inputs; only the functions behind the peer's names differ. Functions
the patch does not replace (agg_loss, compute_reward, GRPO advantages, whitening) run in both arms.

Shapes (B sequences × T response tokens, vocabulary V): ``smoke`` 4 × 16, V 257 (seconds, for the runner's test);
``tiny`` (CPU default) 8 × 128, V 8192, fp32; ``qwen2-0.5b`` (CUDA default) 16 × 512, V 151936, bf16 logits.

Prints per peer and algorithm the median step time of each arm (CPU: interleaved round robin, see benchmarks.timing),
their ratio, the peak extra memory of one step, and the largest loss / gradient difference between the arms (a sanity
check). Appends CSV rows (columns as benchmarks/run_trl.py). Timings taken on a loaded machine are not speed claims.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import functools
import importlib
import importlib.metadata
from dataclasses import dataclass

import torch

from .timing import bench, bench_interleaved, peak_extra_mib
from .run_trl import DEFAULT_CSV, _commit, _device_name, _write_csv

PEERS = ("verl", "openrlhf")
ALGOS = ("ppo", "grpo")


@dataclass
class Shape:
    batch: int
    resp_len: int
    vocab: int
    dtype: torch.dtype


SHAPES = {
    "smoke": Shape(4, 16, 257, torch.float32),
    "tiny": Shape(8, 128, 8192, torch.float32),
    "qwen2-0.5b": Shape(16, 512, 151936, torch.bfloat16),
}


def make_inputs(shape: Shape, device: str, seed: int = 0) -> dict:
    """Random rollout tensors: logits [B, T, V], response ids, masks with right padding, log-probs, values, rewards."""
    g = torch.Generator().manual_seed(seed)
    B, T, V = shape.batch, shape.resp_len, shape.vocab
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()          # response, then padding
    logits = torch.randn(B, T, V, generator=g) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        logp = torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]
    t = {
        "logits": logits.to(shape.dtype), "ids": ids, "mask": mask,
        "old_logp": logp + 0.05 * torch.randn(B, T, generator=g),
        "ref_logp": logp + 0.1 * torch.randn(B, T, generator=g),
        "values": torch.randn(B, T, generator=g), "vpreds": torch.randn(B, T, generator=g),
        "score": torch.randn(B, generator=g),
        "group": torch.arange(B) // 2,                                     # 2 responses per prompt (GRPO)
    }
    return {k: v.to(device) for k, v in t.items()}


# --- one step per peer ------------------------------------------------------------------------------------------------


def verl_step(fns: dict, t: dict, algo: str):
    """veRL's math for one step through the functions in ``fns`` (names as in veRL). Returns (loss, leaves)."""
    import numpy as np

    ca = fns["core_algos"]
    logits = t["logits"].detach().requires_grad_(True)
    mask = t["mask"]
    B, T = mask.shape
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)     # the last response token of each row
    rewards = t["score"][:, None] * last                                      # outcome reward on the last token
    cfg = fns["actor_config"]
    log_prob = fns["logprobs_from_logits"](logits, t["ids"])
    entropy = fns["entropy_from_logits"](logits)
    leaves = [logits]
    if algo == "ppo":
        adv, ret = fns["compute_gae_advantage_return"](rewards, t["values"], mask, 1.0, 0.95)
    else:
        adv, _ = ca.compute_grpo_outcome_advantage(rewards, mask, np.asarray(t["group"].cpu()))
    pg_loss, _ = fns["compute_policy_loss_vanilla"](t["old_logp"], log_prob, adv, mask, "token-mean", cfg)
    kld = fns["kl_penalty"](log_prob, t["ref_logp"], "low_var_kl")
    loss = (pg_loss + 0.001 * ca.agg_loss(kld, mask, "token-mean")
            - 0.001 * ca.agg_loss(entropy, mask, "token-mean"))
    if algo == "ppo":
        vpreds = t["vpreds"].detach().requires_grad_(True)
        vf_loss, _ = fns["compute_value_loss"](vpreds, ret, t["values"], mask, 0.2)
        loss = loss + vf_loss
        leaves.append(vpreds)
    loss.backward()
    return loss.detach(), leaves


def openrlhf_step(fns: dict, t: dict, algo: str):
    """OpenRLHF's math for one step through the functions in ``fns``. Returns (loss, leaves)."""
    utils = fns["utils"]
    logits = t["logits"].detach().requires_grad_(True)
    mask = t["mask"]
    leaves = [logits]
    with torch.no_grad():  # experience maker
        kl = fns["compute_approx_kl"](t["old_logp"], t["ref_logp"], kl_estimator="k1")
        if algo == "ppo":
            reward = utils.compute_reward(t["score"], 0.01, kl, action_mask=mask)
            adv, ret = fns["get_advantages_and_returns"](None, t["values"], reward, mask, 1.0, 0.95)
            n = mask.sum()                                                    # inline whitening (biased variance)
            mean = (adv * mask).sum() / n
            adv = (adv - mean) * ((adv - mean).pow(2) * mask).sum().div(n).clamp(min=1e-8).rsqrt()
        else:
            r = t["score"].reshape(-1, 2)
            r = (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-9)   # group_norm
            adv = r.reshape(-1, 1) * mask
    log_probs = fns["log_probs_from_logits"](logits, t["ids"]) * mask
    actor_loss = fns["policy_loss"](log_probs, t["old_logp"], adv, action_mask=mask)[0]
    kl_loss = fns["compute_approx_kl"](log_probs, t["ref_logp"], log_probs_old=t["old_logp"], kl_estimator="k3",
                                       unbiased_gradient=True)
    loss = actor_loss + 0.01 * fns["aggregate_loss"](kl_loss, mask)
    if algo == "ppo":
        vpreds = t["vpreds"].detach().requires_grad_(True)
        loss = loss + fns["value_loss"](vpreds, t["values"], ret, action_mask=mask)
        leaves.append(vpreds)
    loss.backward()
    return loss.detach(), leaves


def _verl_fns():
    tf = importlib.import_module("verl.utils.torch_functional")
    ca = importlib.import_module("verl.trainer.ppo.core_algos")
    from verl.workers.config import ActorConfig

    cfg = ActorConfig(strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, rollout_n=2,
                      clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28)
    return {"core_algos": ca, "actor_config": cfg,
            "logprobs_from_logits": tf.logprobs_from_logits, "entropy_from_logits": tf.entropy_from_logits,
            "compute_gae_advantage_return": ca.get_adv_estimator_fn("gae"),
            "compute_policy_loss_vanilla": ca.get_policy_loss_fn("vanilla"),
            "kl_penalty": ca.kl_penalty, "compute_value_loss": ca.compute_value_loss}


def _openrlhf_fns():
    utils = importlib.import_module("openrlhf.models.utils")
    loss = importlib.import_module("openrlhf.models.loss")
    exp = importlib.import_module("openrlhf.trainer.ppo_utils.experience_maker")
    return {"utils": utils, "compute_approx_kl": utils.compute_approx_kl,
            "log_probs_from_logits": utils.log_probs_from_logits,
            "get_advantages_and_returns": exp.RemoteExperienceMaker.get_advantages_and_returns,
            # the forward methods bound now (the patch replaces them on the class)
            "policy_loss": functools.partial(loss.PolicyLoss.forward, loss.PolicyLoss(clip_eps_low=0.2,
                                                                                      clip_eps_high=0.28)),
            "value_loss": functools.partial(loss.ValueLoss.forward, loss.ValueLoss(clip_eps=0.2)),
            "aggregate_loss": loss.aggregate_loss}


_PEER = {"verl": (_verl_fns, verl_step), "openrlhf": (_openrlhf_fns, openrlhf_step)}


def run_peer(peer: str, algos, shape: Shape, device: str, warmup_ms: float, rep_ms: float, seed: int = 0) -> dict:
    """Both arms of ``peer`` for each algorithm: {algo: {arm: {"step_ms", "peak_mib"}, "dloss", "dgrad", "calls"}}."""
    integration = importlib.import_module(f"fastrlhf.integrations.{peer}")
    get_fns, step = _PEER[peer]
    theirs = get_fns()
    patch = integration.apply()
    if not patch.applied:
        raise RuntimeError(patch.reason)
    try:
        ours = get_fns()  # the same names, now bound to our functions
    finally:
        patch.undo()
    out = {}
    t = make_inputs(shape, device, seed)
    for algo in algos:
        res = {}
        before = patch.calls.copy()
        (l0, g0), (l1, g1) = step(theirs, t, algo), step(ours, t, algo)
        res["dloss"] = abs(float(l0) - float(l1))
        res["dgrad"] = max(float((a.grad.float() - b.grad.float()).abs().max()) for a, b in zip(g0, g1))
        res["calls"] = dict(patch.calls - before)  # our kernels behind the ours-arm's one step
        fns = [lambda f=theirs: step(f, t, algo), lambda f=ours: step(f, t, algo)]
        if device == "cpu":
            timings = bench_interleaved(fns, warmup_ms=warmup_ms, rep_ms=rep_ms)
        else:
            timings = [bench(fn, device, warmup_ms=warmup_ms, rep_ms=rep_ms) for fn in fns]
        for arm, fn, tm in zip((peer, f"{peer}+fastrlhf"), fns, timings):
            res[arm] = {"step_ms": tm.median_ms, "peak_mib": peak_extra_mib(fn, device)}
        out[algo] = res
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run_peers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer", nargs="+", default=list(PEERS), help="verl and/or openrlhf (default: both)")
    ap.add_argument("--algo", nargs="+", default=list(ALGOS), help="ppo and/or grpo (default: both)")
    ap.add_argument("--shape", default=None, help="smoke | tiny | qwen2-0.5b (default: qwen2-0.5b on CUDA, tiny on CPU)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--warmup-ms", type=float, default=200.0)
    ap.add_argument("--rep-ms", type=float, default=2000.0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--csv", default=str(DEFAULT_CSV), help="CSV to append rows to (default: %(default)s)")
    ap.add_argument("--no-csv", action="store_true", help="print only")
    a = ap.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    shape_name = a.shape or ("qwen2-0.5b" if device == "cuda" else "tiny")
    for flag, values, allowed in (("peer", a.peer, PEERS), ("algo", a.algo, ALGOS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            ap.error(f"--{flag} {bad}: expected some of {list(allowed)}")
    if shape_name not in SHAPES:
        ap.error(f"--shape {shape_name!r}: expected one of {sorted(SHAPES)}")
    if a.warmup_ms < 0 or a.rep_ms < 0:
        ap.error("--warmup-ms and --rep-ms must be >= 0")
    if device == "cpu":
        torch.set_num_threads(a.threads)
    shape, dev = SHAPES[shape_name], _device_name(device)
    rows, status = [], 0
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for peer in a.peer:
        try:
            version = importlib.metadata.version(peer)
            results = run_peer(peer, a.algo, shape, device, a.warmup_ms, a.rep_ms)
        except Exception as e:  # not installed, or its GPU-only imports missing: say so, go on with the other peer
            print(f"benchmarks.run_peers: {peer}: cannot run ({type(e).__name__}: {e})")
            status = 2
            continue
        print(f"\n{peer} {version}, shape {shape_name} (B={shape.batch}, T={shape.resp_len}, V={shape.vocab}, "
              f"{str(shape.dtype).replace('torch.', '')}), {dev}, torch {torch.__version__}")
        print(f"{'algo':<6}{'arm':<20}{'step_ms':>10}{'peak_mib':>10}{'ratio':>8}")
        for algo, res in results.items():
            base = res[peer]["step_ms"]
            for arm in (peer, f"{peer}+fastrlhf"):
                r = res[arm]
                print(f"{algo:<6}{arm:<20}{r['step_ms']:>10.2f}{r['peak_mib']:>10.1f}{base / r['step_ms']:>8.2f}")
                for m, unit in (("step_ms", "ms"), ("peak_mib", "MiB")):
                    rows.append(dict(date=date, device=dev, bench=f"{peer}-{algo} ({version})", shape=shape_name,
                                     provider=arm, metric=m, median=f"{r[m]:.4g}", unit=unit, torch=torch.__version__,
                                     commit=_commit()))
            print(f"{'':<6}|loss diff| {res['dloss']:.2e}, max |grad diff| {res['dgrad']:.2e}; "
                  f"fastrlhf calls: {res['calls']}")
    if rows and not a.no_csv:
        _write_csv(a.csv, rows)
        print(f"appended {len(rows)} rows to {a.csv}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
