"""fastrlhf.stages.reward: InstructGPT's ranking loss (closed form), learning, demonstration bias, bad rankings."""
import json
import math

import pytest
import torch

from fastrlhf.runtime import data

from fastrlhf.stages import reward

from fastrlhf.tools import task
from fastrlhf.models.hf_io import load_model
from tests.helpers.models import tiny_checkpoint


def test_ranking_loss_closed_form():
    # prompt 0: K=3 ranked [2, 0, 1]; prompt 1: K=4 with 0 and 3 tied -> 5 pairs
    r = torch.randn(7, dtype=torch.float64)
    p0 = data.ranking_pairs([2, 0, 1], 3, "x")
    p1 = [(w + 3, l + 3) for w, l in data.ranking_pairs([1, [0, 3], 2], 4, "x")]
    pairs = p0 + p1
    b = data.RMBatch(None, None, torch.tensor([0, 0, 0, 1, 1, 1, 1]), torch.tensor([w for w, _ in pairs]),
                     torch.tensor([l for _, l in pairs]), torch.tensor([0] * 3 + [1] * 5), 2)
    loss, acc = reward.ranking_loss(r, b)

    def ls(x):
        return math.log(1 / (1 + math.exp(-x)))

    want = -0.5 * (sum(ls(r[w] - r[l]) for w, l in p0) / 3 + sum(ls(r[w] - r[l]) for w, l in p1) / 5)
    assert math.isclose(float(loss), want, rel_tol=1e-12)
    assert float(acc) == sum(float(r[w] > r[l]) for w, l in pairs) / 8
    # gradient: −1/C_g · σ(−d) for the winner of each pair, opposite for the loser
    rr = r.clone().requires_grad_(True)
    g = torch.randn(())
    (reward.ranking_loss(rr, b)[0] * g).backward()
    want_g = torch.zeros(7, dtype=torch.float64)
    for (w, l), c in zip(pairs, [3] * 3 + [5] * 5):
        s = torch.sigmoid(-(r[w] - r[l])) / (2 * c)
        want_g[w] -= s
        want_g[l] += s
    torch.testing.assert_close(rr.grad, want_g * g)


def _rm_data(path, n, seed):
    """Rankings of 3 candidates per prompt: the right answer, a perturbed one, a wrong word."""
    import random
    rng = random.Random(seed)
    prompts = task.instructions(n, seed)
    samples = [[task.solve(p), task.perturb(task.solve(p), rng), "cat"] for p in prompts]
    return task.write_rankings(str(path), prompts, samples)


def test_learns_and_stores_demonstration_bias(tmp_path):
    model = tiny_checkpoint(tmp_path / "m")
    d = _rm_data(tmp_path / "rm.jsonl", 48, 0)
    demos = task.write_sft_data(str(tmp_path / "sft.jsonl"), 20, seed=3, noise=0.0)
    cfg = reward.RewardConfig(model=model, data=d, sft_data=demos, output_dir=str(tmp_path / "rm"), batch_size=8,
                              max_steps=15, lr=1e-2, warmup_ratio=0.0, device="cpu", plots=False, log_every=100)
    out = reward.train(cfg)
    losses = [h["loss"] for h in out["history"]]
    assert sum(losses[-3:]) < sum(losses[:3])                          # the ranking loss goes down
    assert 0 <= out["eval_accuracy"] <= 1
    rm = load_model(out["checkpoint"], head="score")
    assert json.loads(open(f"{out['checkpoint']}/config.json").read())["fastrlhf_reward_bias"] == pytest.approx(out["bias"])
    tok = task.build_tokenizer()
    rows = [data.tokenize_conversation(tok, e.messages, e.source)[0] for e in data.load_sft(demos)]
    ids, mask = data.pad_right(rows, tok.pad_token_id)
    with torch.no_grad():
        mean = float(rm.score_last(ids, mask).mean())
    assert abs(mean) < 1e-4                                            # demonstrations have mean reward 0


@pytest.mark.parametrize("row,needle", [
    ({"prompt": "count from 1 to 2", "responses": ["1 2", "1"], "ranking": [0, 0]}, "permutation"),
    ({"prompt": "count from 1 to 2", "responses": ["1 2"], "ranking": [0]}, "K=1"),
])
def test_bad_rankings_name_line(tmp_path, row, needle):
    model = tiny_checkpoint(tmp_path / "m")
    f = tmp_path / "rm.jsonl"
    f.write_text(json.dumps({"prompt": "count from 1 to 2", "chosen": "1 2", "rejected": "1"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(data.DataError, match=rf"rm.jsonl:2: .*{needle}"):
        reward.train(reward.RewardConfig(model=model, data=str(f), output_dir=str(tmp_path / "o"), device="cpu"))


def test_resume_is_exact(tmp_path):
    from safetensors.torch import load_file
    model = tiny_checkpoint(tmp_path / "m")
    d = _rm_data(tmp_path / "rm.jsonl", 24, 1)

    def cfg(out, **kw):
        return reward.RewardConfig(model=model, data=d, output_dir=str(out), batch_size=4, max_steps=4, save_every=2,
                                   lr=1e-2, device="cpu", plots=False, keep_checkpoints=3, **kw)

    a = reward.train(cfg(tmp_path / "a"))
    b = reward.train(cfg(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-0000002")))
    assert [h["step"] for h in b["history"]] == [3, 4]
    wa, wb = (load_file(f"{x['checkpoint']}/model.safetensors") for x in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert b["history"][-1]["loss"] == a["history"][-1]["loss"]
