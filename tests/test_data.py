"""fastrlhf.runtime.data: jsonl validation (errors name file:line:field), tokenization masks, packing, resumable order."""
import json

import numpy as np
import pytest
import torch

from fastrlhf.runtime import data
from fastrlhf.runtime.data import DataError
from fastrlhf.tools.task import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("rows,line,needle", [
    ([{"prompt": "a", "response": "b"}, "{not json"], 2, "malformed JSON"),
    ([{"prompt": "a"}], 1, "'response'"),
    ([{"prompt": "a", "response": 3}], 1, "'response'"),
    ([{"prompt": "", "response": "x"}], 1, "'prompt'"),
    ([{"text": "a"}], 1, "'prompt'"),
    ([{"prompt": "a", "response": "b"}, {"messages": [{"role": "user", "content": "x"}]}], 2, "'messages'"),
    ([{"messages": [{"role": "bot", "content": "x"}]}], 1, "'messages[0].role'"),
    ([{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "y"}]}], 1, "'messages[0].content'"),
    (["[1, 2]"], 1, "JSON object"),
])
def test_sft_errors_name_file_line_field(tmp_path, rows, line, needle):
    f = write(tmp_path / "sft.jsonl", rows)
    with pytest.raises(DataError) as e:
        data.load_sft(f)
    assert f"{f}:{line}:" in str(e.value) and needle in str(e.value)


def test_not_utf8(tmp_path):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(DataError, match=rf"{f}:2: not valid UTF-8"):
        data.load_sft(f)


def test_empty_and_missing_files(tmp_path):
    f = write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="empty dataset") as e:
        data.load_sft(f)
    assert "empty.jsonl" in str(e.value)
    with pytest.raises(DataError, match="not found"):
        data.load_prompts(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("row,needle", [
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1]}, "permutation"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1, 1]}, "permutation"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 2]}, "permutation"),
    ({"prompt": "p", "responses": ["a"], "ranking": [0]}, "K=1"),
    ({"prompt": "p", "responses": [str(i) for i in range(10)], "ranking": list(range(10))}, "K=10"),
    ({"prompt": "p", "responses": ["a", "b"]}, "'ranking'"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": "0,1"}, "'ranking'"),
    ({"prompt": "p", "responses": ["a", 2], "ranking": [0, 1]}, "'responses'"),
    ({"prompt": "p", "chosen": "a"}, "'rejected'"),
    ({"responses": ["a", "b"], "ranking": [0, 1]}, "'prompt'"),
])
def test_preference_errors(tmp_path, row, needle):
    f = write(tmp_path / "rm.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(DataError) as e:
        data.load_preferences(f)
    assert f"{f}:2:" in str(e.value) and needle in str(e.value)


def test_ranking_pairs_and_ties(tmp_path):
    assert sorted(data.ranking_pairs([2, 0, 1], 3, "x")) == sorted([(2, 0), (2, 1), (0, 1)])
    # 0 and 3 tie: their pair is dropped, all others kept
    pairs = data.ranking_pairs([2, [0, 3], 1], 4, "x")
    assert sorted(pairs) == sorted([(2, 0), (2, 3), (2, 1), (0, 1), (3, 1)])
    f = write(tmp_path / "rm.jsonl", [
        {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 0, 2]},
        {"prompt": "p", "responses": ["a", "b"], "ranking": [[0, 1]]},     # all tied: dropped
        {"prompt": "p", "chosen": "a", "rejected": "b"},
    ])
    ex = data.load_preferences(f)
    assert len(ex) == 2 and len(ex[0].pairs) == 3 and ex[1].pairs == [(0, 1)]
    g = write(tmp_path / "ties.jsonl", [{"prompt": "p", "responses": ["a", "b"], "ranking": [[0, 1]]}])
    with pytest.raises(DataError, match="empty dataset"):
        data.load_preferences(g)


# ---------------------------------------------------------------------------------------------------- tokenization

def test_sft_mask_covers_response_only(tok):
    msgs = [{"role": "user", "content": "count from 3 to 5"}, {"role": "assistant", "content": "3 4 5"}]
    ids, mask = data.tokenize_conversation(tok, msgs, "x:1")
    p = data.tokenize_prompt(tok, "count from 3 to 5")
    assert ids[: len(p)] == p and mask[: len(p)] == [0] * len(p)          # prompt tokens == generation-time prompt
    resp = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(resp) == "3 4 5 <eos>" and resp[-1] == tok.eos_token_id


def test_multiturn_masks_each_assistant_turn(tok):
    msgs = [{"role": "user", "content": "count from 1 to 2"}, {"role": "assistant", "content": "1 2"},
            {"role": "user", "content": "reverse : cat dog"}, {"role": "assistant", "content": "dog cat"}]
    ids, mask = data.tokenize_conversation(tok, msgs, "x:1")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "1 2 <eos> dog cat <eos>"


def test_no_chat_template(tok):
    t = build_tokenizer()
    t.chat_template = None
    ids, mask = data.tokenize_conversation(t, [{"role": "user", "content": "reverse : cat dog"},
                                               {"role": "assistant", "content": "dog cat"}], "x:1")
    assert ids[0] == t.bos_token_id and t.decode([i for i, m in zip(ids, mask) if m]) == "dog cat <eos>"
    with pytest.raises(DataError, match="x:3: .*chat template"):
        data.tokenize_prompt(t, [{"role": "user", "content": "a"}], "x:3")


def test_prompt_longer_than_context(tmp_path, tok):
    f = write(tmp_path / "sft.jsonl", [{"prompt": "count from 1 to 2", "response": "1 2"},
                                       {"prompt": "reverse : " + " ".join(["cat"] * 40), "response": "cat"}])
    with pytest.raises(DataError) as e:
        data.tokenize_sft(data.load_sft(f), tok, max_len=32)
    assert f"{f}:2:" in str(e.value) and "'prompt'" in str(e.value) and "context" in str(e.value)


def test_long_response_truncated_and_vocab_check(tmp_path, tok):
    f = write(tmp_path / "sft.jsonl", [{"prompt": "count from 1 to 2", "response": " ".join(["1"] * 50)}])
    samples, n_trunc = data.tokenize_sft(data.load_sft(f), tok, max_len=20)
    assert n_trunc == 1 and len(samples[0].ids) == 20
    with pytest.raises(DataError, match="vocab_size is 10"):
        data.check_vocab(tok, 10)
    data.check_vocab(tok, len(tok))


# --------------------------------------------------------------------------------------------------------- packing

def test_pack_sequences_valid_and_matches_ref():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=97)
    for fn in (data.pack_sequences, data.pack_sequences_ref):
        bins = fn(lengths, 64)
        assert bins.shape == (97,)
        for b in np.unique(bins):
            assert lengths[bins == b].sum() <= 64
        assert set(np.unique(bins)) == set(range(bins.max() + 1))
    # first-fit decreasing stays within 11/9 OPT + 1 bins; OPT >= ceil(sum / budget)
    assert data.pack_sequences(lengths, 64).max() + 1 <= 11 / 9 * np.ceil(lengths.sum() / 64) + 1
    with pytest.raises(ValueError, match="budget"):
        data.pack_sequences(np.array([5, 70]), 64)


def test_packed_batch_layout():
    s = [data.TokenizedSFT([1, 2, 3, 4], [0, 0, 1, 1], "a"), data.TokenizedSFT([5, 6, 7], [0, 1, 1], "b")]
    b = data.make_packed_batch(s, 10, pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 0, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]]
    assert b.cu_seqlens.tolist() == [0, 4, 7, 10]
    # position t predicts token t+1 of the same sample; the loss covers predicted response tokens only
    assert b.targets.tolist() == [[2, 3, 4, 0, 6, 7, 0, 0, 0, 0]]
    assert b.loss_mask.tolist() == [[0, 1, 1, 0, 1, 1, 0, 0, 0, 0]]
    assert (b.n_samples, b.n_tokens) == (2, 7)


def _samples(n, seed=0):
    rng = np.random.default_rng(seed)
    return [data.TokenizedSFT(list(range(1, int(k) + 1)), [0] + [1] * (int(k) - 1), f"f:{i}")
            for i, k in enumerate(rng.integers(2, 20, size=n))]


def test_loader_covers_every_sample_each_epoch_and_resumes():
    samples = _samples(50)
    ld = data.PackedLoader(samples, 48, pad_id=0, seed=3)
    per = ld.batches_per_epoch()
    it = iter(ld)
    seen = sum(next(it).n_samples for _ in range(per))
    assert seen == 50 and ld.state_dict()["epoch"] == 0 and ld.state_dict()["index"] == per
    for _ in range(3):
        next(it)
    state = ld.state_dict()
    expect = [next(it).input_ids for _ in range(per + 2)]   # crosses an epoch boundary
    ld2 = data.PackedLoader(samples, 48, pad_id=0, seed=3)
    ld2.load_state_dict(state)
    it2 = iter(ld2)
    for e in expect:
        assert torch.equal(next(it2).input_ids, e)
    # epochs differ in order; another seed differs
    assert data.epoch_permutation(50, 3, 0).tolist() != data.epoch_permutation(50, 3, 1).tolist()
    with pytest.raises(DataError, match="seed"):
        data.PackedLoader(samples, 48, 0, seed=4).load_state_dict(state)


def test_loader_rejects_sample_over_budget():
    with pytest.raises(DataError, match="f:0"):
        data.PackedLoader([data.TokenizedSFT([1] * 30, [1] * 30, "f:0")], 16, 0)


def test_epoch_sampler_resume_and_split():
    s = data.EpochSampler(10, 3, seed=1)
    it = iter(s)
    first = [next(it) for _ in range(4)]
    assert sorted(i for b in first for i in b) == list(range(10))
    next(it)
    st = s.state_dict()
    want = [next(it) for _ in range(5)]
    s2 = data.EpochSampler(10, 3, seed=1)
    s2.load_state_dict(st)
    it2 = iter(s2)
    assert [next(it2) for _ in range(5)] == want
    tr, ho = data.split_holdout(list(range(20)), 0.1, seed=0)
    assert len(ho) == 2 and sorted(tr + ho) == list(range(20))


def test_rm_collate(tok):
    ex = [data.PreferenceExample("count from 1 to 3", ["1 2 3", "1 2", "3"], [(0, 1), (0, 2), (1, 2)], "f:1"),
          data.PreferenceExample("what color is the sky", ["blue", "red"], [(0, 1)], "f:2")]
    items, n_trunc = data.tokenize_preferences(ex, tok, 64)
    b = data.collate_rm(items, tok.pad_token_id)
    assert b.input_ids.shape[0] == 5 and b.n_groups == 2 and n_trunc == 0
    assert b.win.tolist() == [0, 0, 1, 3] and b.lose.tolist() == [1, 2, 2, 4] and b.pair_group.tolist() == [0, 0, 0, 1]
    last = b.attention_mask.sum(1) - 1
    assert (b.input_ids[torch.arange(5), last] == tok.eos_token_id).all()   # the scalar head reads the EOS


def test_prompt_length_boundary():
    data.check_prompt_length(10, 10, "f:1")             # exactly fits (e.g. P + max_new_tokens == context)
    with pytest.raises(DataError, match=r"f:1: field 'prompt' has 11 tokens; at most 10"):
        data.check_prompt_length(11, 10, "f:1")


def test_epoch_sampler_drop_last():
    s = data.EpochSampler(10, 4, seed=2, drop_last=True)
    it = iter(s)
    batches = [next(it) for _ in range(4)]                       # 2 full batches per epoch, 2 epochs
    assert all(len(b) == 4 for b in batches) and s.state_dict()["epoch"] == 1
    assert len(set(batches[0] + batches[1])) == 8
    with pytest.raises(DataError, match="fewer than one batch"):
        data.EpochSampler(3, 4, drop_last=True)
