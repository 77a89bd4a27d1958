"""fastrlhf.tools.task: the embedded tokenizer, task generator and programmatic labeler."""
import json
import random

import pytest

from fastrlhf.runtime import data

from fastrlhf.tools import task


def test_tokenizer_round_trip_and_chat_template(tmp_path):
    tok = task.build_tokenizer()
    rng = random.Random(0)
    for _ in range(50):
        instr, ans = task.make_instruction(rng)
        ids = data.tokenize_prompt(tok, instr)
        assert tok.unk_token_id not in ids                       # every task word is in the vocabulary
        assert tok.decode(ids, skip_special_tokens=True) == instr
        assert task.solve(instr) == ans
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer
    t2 = AutoTokenizer.from_pretrained(tmp_path)
    assert t2("count from 1 to 3")["input_ids"] == tok("count from 1 to 3")["input_ids"] and t2.chat_template


def test_score_closed_form():
    assert task.score("count from 3 to 6", "3 4 5 6") == 1.0
    assert task.score("count from 3 to 6", "3 4 9 6") == 0.75
    assert task.score("count from 3 to 6", "3 4 5 6 7 8") == pytest.approx(4 / 6)
    assert task.score("what color is the sky", "") == 0.0
    assert task.score("reverse : cat dog", "dog cat") == 1.0
    assert task.score("count from 4 to 7", "5 6 7") == 0.75            # shifted: one deletion (position match: 0)
    assert task.score("count from 4 to 7", "4 5 7 6") == 0.5           # two substitutions
    assert task.score("reverse : cat dog", "dog dog cat") == pytest.approx(2 / 3)  # one insertion
    with pytest.raises(ValueError):
        task.solve("tell me a joke")


def test_word_edit_distance_against_brute_force():
    """Levenshtein distance against the shortest edit script found by breadth-first search over single-word edits."""
    rng = random.Random(0)
    alphabet = ["a", "b", "c"]

    def bfs(a, b):
        seen, frontier, d = {tuple(a)}, [tuple(a)], 0
        while tuple(b) not in seen:
            nxt = []
            for w in frontier:
                edits = [w[:i] + w[i + 1:] for i in range(len(w))]
                edits += [w[:i] + (x,) + w[i:] for i in range(len(w) + 1) for x in alphabet]
                edits += [w[:i] + (x,) + w[i + 1:] for i in range(len(w)) for x in alphabet if x != w[i]]
                for e in edits:
                    if e not in seen and len(e) <= max(len(a), len(b)):
                        seen.add(e)
                        nxt.append(e)
            frontier, d = nxt, d + 1
        return d

    for _ in range(60):
        a = [rng.choice(alphabet) for _ in range(rng.randint(0, 4))]
        b = [rng.choice(alphabet) for _ in range(rng.randint(0, 4))]
        assert task.word_edit_distance(a, b) == bfs(a, b) == task.word_edit_distance(b, a), (a, b)


def test_labeler_noise_rate_and_ranking():
    lab = task.Labeler(seed=0, noise=0.3)
    prompts = task.instructions(400, seed=1)
    bad = sum(lab.demonstrate(p) != task.solve(p) for p in prompts) / len(prompts)
    assert 0.2 < bad < 0.4                                        # the stated fraction, within sampling error
    p = "count from 1 to 3"
    resp = ["1 2", "1 2 3", "9 9 9", "1 2 4", "9"]               # scores 2/3, 1, 0, 2/3, 0
    assert lab.rank(p, resp) == [1, [0, 3], [2, 4]]


def test_written_files_load_through_user_code_paths(tmp_path):
    tok = task.build_tokenizer()
    sft = task.write_sft_data(str(tmp_path / "sft.jsonl"), 30, seed=0)
    ex = data.load_sft(sft)
    samples, _ = data.tokenize_sft(ex, tok, 48)
    assert len(samples) == 30
    prompts = task.instructions(3, seed=5)
    rm = task.write_rankings(str(tmp_path / "rm.jsonl"), prompts,
                             [[task.solve(p), "cat", task.solve(p) + " cat"] for p in prompts])
    pref = data.load_preferences(rm)
    assert len(pref) == 3 and all((0, 1) in e.pairs for e in pref)
    rows = [json.loads(line) for line in open(rm)]
    assert rows[0]["ranking"][0] == 0


def test_tiny_model_is_an_hf_folder(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    tok = task.build_tokenizer()
    task.build_tiny_model(str(tmp_path / "m"), tok)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert m.config.vocab_size >= len(tok)
    assert (tmp_path / "m" / "model.safetensors").exists()
    out = m(torch.tensor([data.tokenize_prompt(tok, "count from 1 to 2")])).logits
    assert out.shape[-1] == m.config.vocab_size
