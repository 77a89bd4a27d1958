"""``fastrlhf eval``: the win rate of one policy over another (stages.eval), with the embedded task's labeler as the
programmatic judge when ``--judge task``."""
from __future__ import annotations

from fastrlhf.runtime.config import parse_config
from fastrlhf.stages.eval import EvalConfig, evaluate


def main(argv=None) -> dict:
    cfg = parse_config(EvalConfig, argv, prog="fastrlhf eval")
    judge = None
    if cfg.judge == "task":
        from fastrlhf.tools.task import Labeler

        judge = Labeler().judge
    r = evaluate(cfg, judge=judge)
    print(f"win rate of {cfg.policy} over {cfg.baseline}: {r['win_rate']:.3f} ± {r['ci95']:.3f} "
          f"(n={r['n']}: {r['wins']} wins, {r['ties']} ties, {r['losses']} losses); "
          f"mean score {r['score_policy']:.4f} vs {r['score_baseline']:.4f}", flush=True)
    return r
