"""fastrlhf.stages.sft: response-only packed loss against an unpacked reference, learning, exact resume, failure handling."""
import json

import pytest
import torch
from safetensors.torch import load_file

from fastrlhf.runtime import data

from fastrlhf.stages import sft

from fastrlhf.tools import task
from fastrlhf.models.hf_io import ModelFolderError, load_model
from tests.helpers.models import tiny_checkpoint


def test_packed_loss_matches_unpacked_reference(tmp_path):
    tok = task.build_tokenizer()
    m = load_model(tiny_checkpoint(tmp_path / "m"))
    ex = [data.SFTExample([{"role": "user", "content": p}, {"role": "assistant", "content": task.solve(p)}], f"f:{i}")
          for i, p in enumerate(task.instructions(5, seed=1))]
    samples, _ = data.tokenize_sft(ex, tok, 64)
    batch = data.make_packed_batch(samples, 96, tok.pad_token_id)
    got = sft.packed_lm_loss(m, batch)
    total, count = torch.zeros((), dtype=torch.float64), 0
    for s in samples:  # each sample alone, full logits in float64: −log p(y_{t+1} | y_≤t) on response tokens
        logits = m(torch.tensor([s.ids])).double()[0]
        logp = logits.log_softmax(-1)[:-1].gather(-1, torch.tensor(s.ids[1:])[:, None]).squeeze(-1)
        mask = torch.tensor(s.loss_mask[1:], dtype=torch.float64)
        total += -(logp * mask).sum()
        count += int(mask.sum())
    # fp32 forward vs float64 reference on ~30 tokens: a few ulps of fp32 per token
    torch.testing.assert_close(got.double(), total / count, rtol=1e-5, atol=1e-5)


def _cfg(tmp_path, model, data_path, out, **kw):
    base = dict(model=model, data=data_path, output_dir=str(out), batch_tokens=128, lr=1e-2, warmup_ratio=0.0,
                device="cpu", log_every=100, plots=False, eval_fraction=0.1)
    base.update(kw)
    return sft.SFTConfig(**base)


def test_learns_and_resumes_exactly(tmp_path):
    model = tiny_checkpoint(tmp_path / "m")
    d = task.write_sft_data(str(tmp_path / "sft.jsonl"), 40, seed=0, noise=0.0)
    a = sft.train(_cfg(tmp_path, model, d, tmp_path / "a", max_steps=12, save_every=6, keep_checkpoints=3))
    losses = [h["loss"] for h in a["history"]]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3        # it learns
    assert a["eval_loss"] == a["history"][-1]["eval_loss"] and a["eval_loss"] < losses[0]
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 13))
    # resume from the middle checkpoint in another folder: bit-identical weights at the end
    b = sft.train(_cfg(tmp_path, model, d, tmp_path / "b", max_steps=12, save_every=6,
                       resume=str(tmp_path / "a" / "checkpoint-0000006")))
    assert b["history"][0]["step"] == 7
    wa = load_file(tmp_path / "a" / "checkpoint-0000012" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "checkpoint-0000012" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "checkpoint-0000012")   # loads in transformers


def test_non_finite_loss_stops_without_saving(tmp_path):
    model = tiny_checkpoint(tmp_path / "m", nan=True)
    d = task.write_sft_data(str(tmp_path / "sft.jsonl"), 10, seed=0)
    with pytest.raises(FloatingPointError, match="non-finite loss .* step 1"):
        sft.train(_cfg(tmp_path, model, d, tmp_path / "o", max_steps=3))
    assert not list((tmp_path / "o").glob("checkpoint-*"))


def test_bad_data_and_missing_fields(tmp_path):
    model = tiny_checkpoint(tmp_path / "m")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "count from 1 to 2", "response": "1 2"}\n{"prompt": "x", "respons": "y"}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:2: missing field 'response'"):
        sft.train(_cfg(tmp_path, model, str(bad), tmp_path / "o"))
    with pytest.raises(ValueError, match="'data'"):
        sft.train(_cfg(tmp_path, model, "", tmp_path / "o"))
    with pytest.raises(ModelFolderError, match="nowhere: --model: no such folder"):
        sft.train(_cfg(tmp_path, str(tmp_path / "nowhere"), str(bad), tmp_path / "o"))


def test_ctrl_c_saves_then_resume_auto_finishes(tmp_path, monkeypatch):
    import os
    import signal
    model = tiny_checkpoint(tmp_path / "m")
    d = task.write_sft_data(str(tmp_path / "sft.jsonl"), 20, seed=0)
    from fastrlhf.runtime import optim
    real_lr_at = optim.lr_at  # the schedule sft's optimizer step (optim.apply_step) calls

    def lr_at_with_ctrl_c(step, **kw):  # a real SIGINT arrives during the 2nd step
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr_at(step, **kw)

    monkeypatch.setattr(optim, "lr_at", lr_at_with_ctrl_c)
    out = sft.train(_cfg(tmp_path, model, d, tmp_path / "o", max_steps=4))
    assert out["steps"] == 2 and out["checkpoint"].endswith("checkpoint-0000002")
    monkeypatch.setattr(optim, "lr_at", real_lr_at)
    again = sft.train(_cfg(tmp_path, model, d, tmp_path / "o", max_steps=4, resume="auto"))
    assert [h["step"] for h in again["history"]] == [3, 4] and again["checkpoint"].endswith("checkpoint-0000004")


def test_tokenizer_model_vocab_mismatch(tmp_path):
    model = tiny_checkpoint(tmp_path / "m", vocab=16)
    d = task.write_sft_data(str(tmp_path / "sft.jsonl"), 4, seed=0)
    with pytest.raises(data.DataError, match=r"tokenizer has \d+ tokens but the model's vocab_size is 16"):
        sft.train(_cfg(tmp_path, model, d, tmp_path / "o"))
