"""Datasets of the three stages: validated jsonl readers, tokenization, packing and reproducible resumable ordering.

Notation: N sequences, T tokens, K responses per prompt (2..9), P pairs.

File formats (one JSON object per line; blank lines are skipped):
- SFT:         {"prompt": str, "response": str}   or   {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
- preferences: {"prompt": str, "responses": [str] * K, "ranking": [...]}  or  {"prompt": str, "chosen": str, "rejected": str}
               ``ranking`` lists response indices best first; an element may be a list of indices that are tied
               (e.g. [2, [0, 3], 1]); flattened it must be a permutation of 0..K-1. Pairs inside a tie are dropped.
- prompts:     {"prompt": str}   or   {"messages": [...]} (PPO; the last message is a user turn)
Every error names ``file:line`` and the field.

Tokenization: with a chat template the conversation is rendered turn by turn and each rendered piece is tokenized on its own,
so the prompt tokens of a sample are exactly the tokens a prompt gets at generation time (PPO) and the response tokens are what
the policy would generate. Without a chat template: ``prompt_ids = tokenizer(prompt)`` (with the tokenizer's BOS) and
``response_ids = tokenizer(response, no specials) + [eos]``. The loss mask covers response tokens (and the EOS) only.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from fastrlhf.kernels._native import native

MAX_K = 9


class DataError(ValueError):
    """Bad input data; the message starts with ``file:line:`` and names the field."""


# ---------------------------------------------------------------------------------------------------------- records

@dataclass
class SFTExample:
    messages: list[dict]          # [{"role", "content"}], the last one an assistant turn
    source: str                   # "file:line" for error messages


@dataclass
class PreferenceExample:
    prompt: str | list[dict]      # a string, or chat messages ending in a user turn
    responses: list[str]          # K responses
    pairs: list[tuple[int, int]]  # (winner, loser) response indices, ties dropped; C(K,2) when there are no ties
    source: str


@dataclass
class PromptExample:
    prompt: str | list[dict]
    source: str


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """Yield ("file:line", object) for each non-blank line; malformed JSON or a non-object raises DataError."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, not a jsonl file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))  # an error at the end of the line names its column
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def _str_field(obj: dict, key: str, where: str, allow_empty: bool = False) -> str:
    if key not in obj:
        raise DataError(f"{where}: missing field '{key}' (has: {sorted(obj)})")
    v = obj[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return v


def _messages(obj: dict, where: str) -> list[dict]:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{'role', 'content'}}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: field 'messages[{i}]' must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{where}: field 'messages[{i}].role' must be system/user/assistant, got {role!r}")
        content = m.get("content")
        if not isinstance(content, str):
            raise DataError(f"{where}: field 'messages[{i}].content' must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _nonempty(items: list, path, what: str) -> list:
    if not items:
        raise DataError(f"{os.fspath(path)}: empty dataset (no {what} records)")
    return items


def load_sft(path) -> list[SFTExample]:
    """SFT demonstrations: {"prompt","response"} or {"messages"} whose last message is the assistant's."""
    out = []
    for where, obj in read_jsonl(path):
        if "messages" in obj:
            msgs = _messages(obj, where)
            if msgs[-1]["role"] != "assistant":
                raise DataError(f"{where}: field 'messages': the last message must be an assistant turn")
            if not any(m["role"] == "user" for m in msgs):
                raise DataError(f"{where}: field 'messages': no user turn")
        elif "prompt" in obj or "response" in obj:
            msgs = [{"role": "user", "content": _str_field(obj, "prompt", where)},
                    {"role": "assistant", "content": _str_field(obj, "response", where)}]
        else:
            raise DataError(f"{where}: missing field 'prompt'/'response' or 'messages' (has: {sorted(obj)})")
        out.append(SFTExample(msgs, where))
    return _nonempty(out, path, "SFT")


def ranking_pairs(ranking: Any, k: int, where: str) -> list[tuple[int, int]]:
    """(winner, loser) pairs from a best-first ranking with optional tie groups; validates it is a permutation of 0..k-1.

    [2, [0, 3], 1] -> 2 beats 0, 3, 1; 0 and 3 beat 1; the pair (0, 3) is a tie and dropped.
    """
    if not isinstance(ranking, list):
        raise DataError(f"{where}: field 'ranking' must be a list of response indices (best first)")
    groups: list[list[int]] = []
    for g in ranking:
        members = g if isinstance(g, list) else [g]
        if not members or not all(isinstance(x, int) and not isinstance(x, bool) for x in members):
            raise DataError(f"{where}: field 'ranking' must hold integers or lists of tied integers, got {g!r}")
        groups.append(members)
    flat = [x for g in groups for x in g]
    if sorted(flat) != list(range(k)):
        raise DataError(f"{where}: field 'ranking' must be a permutation of 0..{k - 1} (K={k} responses), got {ranking!r}")
    pairs = []
    for gi, g in enumerate(groups):
        for lower in groups[gi + 1:]:
            pairs.extend((w, l) for w in g for l in lower)
    return pairs


def load_preferences(path) -> list[PreferenceExample]:
    """Ranked (K = 2..9) or pairwise comparisons. Records whose responses are all tied are dropped (no pairs)."""
    out = []
    for where, obj in read_jsonl(path):
        prompt: str | list[dict]
        if "messages" in obj:
            prompt = _messages(obj, where)
            if prompt[-1]["role"] != "user":
                raise DataError(f"{where}: field 'messages': the prompt's last message must be a user turn")
        else:
            prompt = _str_field(obj, "prompt", where)
        if "responses" in obj:
            resp = obj["responses"]
            if not isinstance(resp, list) or not all(isinstance(r, str) for r in resp):
                raise DataError(f"{where}: field 'responses' must be a list of strings")
            k = len(resp)
            if k < 2:
                raise DataError(f"{where}: field 'responses' has K={k}; a ranking needs K >= 2")
            if k > MAX_K:
                raise DataError(f"{where}: field 'responses' has K={k}; at most K={MAX_K} are supported")
            if "ranking" not in obj:
                raise DataError(f"{where}: missing field 'ranking'")
            pairs = ranking_pairs(obj["ranking"], k, where)
        elif "chosen" in obj or "rejected" in obj:
            resp = [_str_field(obj, "chosen", where, True), _str_field(obj, "rejected", where, True)]
            pairs = [(0, 1)]
        else:
            raise DataError(f"{where}: missing field 'responses'+'ranking' or 'chosen'+'rejected' (has: {sorted(obj)})")
        if pairs:
            out.append(PreferenceExample(prompt, list(resp), pairs, where))
    return _nonempty(out, path, "preference (with at least one untied pair)")


def read_table(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """Yield ("file:row N", row dict) of a ``.parquet`` file (pyarrow, else ``datasets``) or of a folder written by
    ``datasets``' ``save_to_disk`` (its "train" split when it holds several). Both need the optional package."""
    path = os.fspath(path)
    if os.path.isdir(path):
        try:
            import datasets
        except ImportError:
            raise DataError(f"{path}: a folder of prompts needs the optional package 'datasets' "
                            "(pip install datasets), or give a .jsonl / .parquet file") from None
        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:  # not a save_to_disk folder
            raise DataError(f"{path}: not a datasets folder saved with save_to_disk ({type(e).__name__}: {e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {sorted(ds)}); "
                                "save the split you want on its own")
            ds = ds["train"]
        rows = iter(ds)
    elif not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    else:
        try:
            import pyarrow.parquet as pq
            rows = iter(pq.read_table(path).to_pylist())
        except ImportError:
            try:
                import datasets
            except ImportError:
                raise DataError(f"{path}: reading parquet needs the optional package 'pyarrow' or 'datasets'") from None
            rows = iter(datasets.Dataset.from_parquet(path))
        except Exception as e:  # pyarrow's own errors: not a parquet file, corrupt footer, ...
            raise DataError(f"{path}: cannot read parquet ({type(e).__name__}: {e})") from None
    for i, row in enumerate(rows, 1):  # a missing value of a column (null) is a missing key, as in jsonl
        yield f"{path}:row {i}", {k: v for k, v in dict(row).items() if v is not None}


def load_prompts(path) -> list[PromptExample]:
    """PPO / eval prompts: {"prompt"} or {"messages"} (extra keys such as reference answers are allowed), from jsonl,
    parquet (``*.parquet``) or a ``datasets`` folder saved with ``save_to_disk``."""
    out = []
    p = os.fspath(path)
    for where, obj in (read_table(p) if p.endswith(".parquet") or os.path.isdir(p) else read_jsonl(p)):
        if "messages" in obj:
            msgs = _messages(obj, where)
            if msgs[-1]["role"] != "user":
                raise DataError(f"{where}: field 'messages': the last message must be a user turn")
            out.append(PromptExample(msgs, where))
        else:
            out.append(PromptExample(_str_field(obj, "prompt", where), where))
    return _nonempty(out, path, "prompt")


# ------------------------------------------------------------------------------------------------------ tokenization

def _as_messages(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def tokenize_prompt(tokenizer, prompt: str | list[dict], source: str = "<prompt>") -> list[int]:
    """Prompt ids as the policy sees them before generating (chat template with the generation prompt, or BOS + text)."""
    if has_chat_template(tokenizer):
        return _encode(tokenizer, _render(tokenizer, _as_messages(prompt), True))
    if not isinstance(prompt, str):
        raise DataError(f"{source}: field 'messages' needs a tokenizer with a chat template (this one has none)")
    return list(tokenizer(prompt)["input_ids"])


def tokenize_response(tokenizer, response: str) -> list[int]:
    """Response ids without a chat template: the text's tokens then EOS."""
    ids = _encode(tokenizer, response)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def tokenize_conversation(tokenizer, messages: list[dict], source: str) -> tuple[list[int], list[int]]:
    """(ids [T], loss_mask [T]) with 1 on assistant tokens; each rendered turn is tokenized separately (see module doc)."""
    if not has_chat_template(tokenizer):
        if len(messages) != 2 or messages[0]["role"] != "user":
            raise DataError(f"{source}: field 'messages': multi-turn data needs a tokenizer with a chat template")
        p = tokenize_prompt(tokenizer, messages[0]["content"], source)
        r = tokenize_response(tokenizer, messages[1]["content"])
        return p + r, [0] * len(p) + [1] * len(r)
    ids: list[int] = []
    mask: list[int] = []
    prev = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":  # everything up to the generation prompt is context, the rest is the response
            ctx = _render(tokenizer, messages[:i], True)
            if not ctx.startswith(prev):
                raise DataError(f"{source}: the tokenizer's chat template does not render turns as prefixes of each other")
            piece = _encode(tokenizer, ctx[len(prev):])
            ids += piece
            mask += [0] * len(piece)
            prev = ctx
        full = _render(tokenizer, messages[: i + 1], False)
        if not full.startswith(prev):
            raise DataError(f"{source}: the tokenizer's chat template does not render turns as prefixes of each other")
        piece = _encode(tokenizer, full[len(prev):])
        ids += piece
        mask += [1 if m["role"] == "assistant" else 0] * len(piece)
        prev = full
    return ids, mask


def tokenize_pair(tokenizer, prompt: str | list[dict], response: str, source: str) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) of one (prompt, response) for the reward model; response ends with the EOS token."""
    ids, mask = tokenize_conversation(tokenizer, _as_messages(prompt) + [{"role": "assistant", "content": response}],
                                      source)
    first = mask.index(1) if 1 in mask else len(ids)
    resp = ids[first:]
    # the chat template may add text after the EOS (e.g. a newline); the scalar head reads the last token, keep it at EOS
    eos = tokenizer.eos_token_id
    if eos is not None and eos in resp:
        resp = resp[: len(resp) - resp[::-1].index(eos)]
    return ids[:first], resp


@dataclass
class TokenizedSFT:
    ids: list[int]
    loss_mask: list[int]          # 1 on response tokens (the tokens the loss predicts)
    source: str


def check_prompt_length(n_prompt: int, limit: int, source: str) -> None:
    """Error (naming file:line) when a prompt has more than ``limit`` tokens: the context minus the room the response
    needs (at least 1 token for SFT/RM, max_new_tokens for generation)."""
    if n_prompt > limit:
        raise DataError(f"{source}: field 'prompt' has {n_prompt} tokens; at most {limit} fit the context with room "
                        f"for the response (raise max_seq_len / the model's context, or shorten the prompt)")


def tokenize_sft(examples: Sequence[SFTExample], tokenizer, max_len: int) -> tuple[list[TokenizedSFT], int]:
    """Tokenize and check lengths. Returns (samples, n_truncated): responses are cut to fit ``max_len``; a prompt that
    leaves no room for a response token is an error naming its file:line."""
    out, truncated = [], 0
    for ex in examples:
        ids, mask = tokenize_conversation(tokenizer, ex.messages, ex.source)
        first = mask.index(1) if 1 in mask else len(ids)
        check_prompt_length(first, max_len - 1, ex.source)  # room for at least one response token
        if len(ids) > max_len:
            ids, mask, truncated = ids[:max_len], mask[:max_len], truncated + 1
        if sum(mask) == 0:
            raise DataError(f"{ex.source}: field 'response' tokenizes to nothing")
        out.append(TokenizedSFT(ids, mask, ex.source))
    return out, truncated


def check_vocab(tokenizer, vocab_size: int, where: str = "tokenizer") -> None:
    """Every token id the tokenizer can produce must index the model's embedding."""
    n = len(tokenizer)
    if n > vocab_size:
        raise DataError(f"{where}: the tokenizer has {n} tokens but the model's vocab_size is {vocab_size} "
                        f"(tokenizer and model do not match)")


# ----------------------------------------------------------------------------------------------------------- packing

def pack_sequences_ref(lengths: np.ndarray, budget: int) -> np.ndarray:
    """First-fit decreasing: lengths int64[N] -> bin index int64[N]; each bin holds at most ``budget`` tokens.
    (The contract of fastrlhf.kernels._C.pack_sequences; used when the extension is not built.)"""
    lengths = np.asarray(lengths, dtype=np.int64)
    if (lengths > budget).any():
        i = int(np.argmax(lengths > budget))
        raise ValueError(f"pack_sequences: sequence {i} has length {int(lengths[i])} > budget {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    room: list[int] = []
    out = np.zeros(len(lengths), dtype=np.int64)
    for i in order:
        for b, r in enumerate(room):
            if r >= lengths[i]:
                room[b] -= int(lengths[i])
                out[i] = b
                break
        else:
            room.append(budget - int(lengths[i]))
            out[i] = len(room) - 1
    return out


def pack_sequences(lengths: np.ndarray, budget: int) -> np.ndarray:
    """Bin index per sequence (C++ when built, else the Python reference with the same contract)."""
    C = native()
    fn = C.pack_sequences if C is not None else pack_sequences_ref
    return np.asarray(fn(np.ascontiguousarray(lengths, dtype=np.int64), int(budget)), dtype=np.int64)


@dataclass
class PackedBatch:
    """One fixed token budget of packed samples (shape [1, T], T = budget, padded with a final pad segment).

    input_ids [1, T]; position_ids [1, T] restart at 0 for every sample; cu_seqlens int32[S+1] sample boundaries (the pad
    tail is its own segment); targets [1, T] = the next token of the same sample (0 where none); loss_mask [1, T] float:
    1 where ``targets`` is a response token; n_samples, n_tokens (real tokens).
    """
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    n_samples: int
    n_tokens: int

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.cu_seqlens.to(device),
                           self.targets.to(device), self.loss_mask.to(device), self.n_samples, self.n_tokens)


def make_packed_batch(samples: Sequence[TokenizedSFT], budget: int, pad_id: int) -> PackedBatch:
    ids, pos, tgt, lm, cu = [], [], [], [], [0]
    for s in samples:
        n = len(s.ids)
        ids += s.ids
        pos += list(range(n))
        tgt += s.ids[1:] + [0]                       # token t predicts token t+1 of the same sample
        lm += [float(x) for x in s.loss_mask[1:]] + [0.0]
        cu.append(cu[-1] + n)
    used = cu[-1]
    if used > budget:
        raise ValueError(f"packed samples hold {used} tokens > budget {budget}")
    if used < budget:                                # a pad segment keeps the shape fixed at [1, budget]
        pad = budget - used
        ids += [pad_id] * pad
        pos += list(range(pad))
        tgt += [0] * pad
        lm += [0.0] * pad
        cu.append(budget)
    return PackedBatch(torch.tensor([ids]), torch.tensor([pos]), torch.tensor(cu, dtype=torch.int32),
                       torch.tensor([tgt]), torch.tensor([lm]), len(samples), used)


# ------------------------------------------------------------------------------------------- order, epochs, resuming

def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of epoch ``epoch``: a pure function of (seed, epoch), so resuming needs only (epoch, index)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class PackedLoader:
    """Epochs of packed token budgets over tokenized samples, in a seeded order, resumable at (epoch, index).

    Each epoch: shuffle the samples (seed, epoch), pack them into bins of ``budget`` tokens (first-fit decreasing),
    then shuffle the bins (seed, epoch) so long and short bins mix. ``state_dict()`` is the position of the next batch.
    """

    def __init__(self, samples: Sequence[TokenizedSFT], budget: int, pad_id: int, seed: int = 0):
        if not samples:
            raise DataError("no samples to pack (empty dataset)")
        self.samples, self.budget, self.pad_id, self.seed = list(samples), int(budget), int(pad_id), int(seed)
        too_long = [s for s in self.samples if len(s.ids) > budget]
        if too_long:
            s = too_long[0]
            raise DataError(f"{s.source}: sample has {len(s.ids)} tokens > the packing budget of {budget} tokens")
        self.epoch, self.index = 0, 0
        self._bins_epoch, self._bins = -1, []

    def bins(self, epoch: int) -> list[list[int]]:
        """Sample indices of each bin of ``epoch`` (deterministic)."""
        if epoch != self._bins_epoch:
            order = epoch_permutation(len(self.samples), self.seed, epoch)
            lengths = np.array([len(self.samples[i].ids) for i in order], dtype=np.int64)
            which = pack_sequences(lengths, self.budget)
            bins: list[list[int]] = [[] for _ in range(int(which.max()) + 1)]
            for j, b in enumerate(which):
                bins[int(b)].append(int(order[j]))
            shuffle = np.random.default_rng([self.seed, epoch, 1]).permutation(len(bins))
            self._bins, self._bins_epoch = [bins[i] for i in shuffle], epoch
        return self._bins

    def batches_per_epoch(self) -> int:
        return len(self.bins(0))

    def __iter__(self) -> Iterator[PackedBatch]:
        """Endless: yields the next batch and advances (epoch, index)."""
        while True:
            bins = self.bins(self.epoch)
            if self.index >= len(bins):
                self.epoch, self.index = self.epoch + 1, 0
                continue
            b = bins[self.index]
            self.index += 1
            yield make_packed_batch([self.samples[i] for i in b], self.budget, self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, d: dict) -> None:
        if int(d["seed"]) != self.seed:
            raise DataError(f"resume: the checkpoint's data seed {d['seed']} differs from this run's seed {self.seed}")
        self.epoch, self.index = int(d["epoch"]), int(d["index"])


class EpochSampler:
    """Seeded epochs of shuffled indices in batches of ``batch_size``, resumable at (epoch, index).

    ``drop_last``: skip the last short batch of each epoch (fixed batch shapes, e.g. for PPO rollouts); it needs
    n >= batch_size. Otherwise the short batch is kept.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = False):
        if n <= 0:
            raise DataError("no samples (empty dataset)")
        if batch_size <= 0:
            raise ValueError(f"EpochSampler: batch_size must be > 0, got {batch_size}")
        if drop_last and n < batch_size:
            raise DataError(f"{n} samples are fewer than one batch of {batch_size} (drop_last=True)")
        self.n, self.batch_size, self.seed, self.shuffle, self.drop_last = n, batch_size, seed, shuffle, drop_last
        self.epoch, self.index = 0, 0

    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            if self.index >= self.batches_per_epoch():
                self.epoch, self.index = self.epoch + 1, 0
            order = epoch_permutation(self.n, self.seed, self.epoch) if self.shuffle else np.arange(self.n)
            lo = self.index * self.batch_size
            self.index += 1
            yield [int(i) for i in order[lo: lo + self.batch_size]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, d: dict) -> None:
        if int(d["seed"]) != self.seed:
            raise DataError(f"resume: the checkpoint's data seed {d['seed']} differs from this run's seed {self.seed}")
        self.epoch, self.index = int(d["epoch"]), int(d["index"])


def split_holdout(items: list, fraction: float, seed: int, min_train: int = 1) -> tuple[list, list]:
    """(train, held_out): a seeded ``fraction`` of ``items`` held out (at least 1 when fraction > 0 and n >= 2)."""
    n = len(items)
    k = int(round(n * fraction)) if fraction > 0 else 0
    if fraction > 0 and n >= 2:
        k = max(1, k)
    k = min(k, n - min_train)
    perm = np.random.default_rng([seed, 12345]).permutation(n)
    held = set(int(i) for i in perm[:k])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged rows -> (ids [B, T] right-padded, attention_mask [B, T])."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


@dataclass
class RMBatch:
    """Reward-model batch: G prompts, M = Σ K_g sequences (each response once), P pairs.

    input_ids / attention_mask [M, T] right-padded prompt+response; group [M] prompt index of each sequence;
    win / lose [P] row indices into M of each pair; pair_group [P] prompt index of each pair.
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    group: torch.Tensor
    win: torch.Tensor
    lose: torch.Tensor
    pair_group: torch.Tensor
    n_groups: int

    def to(self, device) -> "RMBatch":
        return RMBatch(self.input_ids.to(device), self.attention_mask.to(device), self.group.to(device),
                       self.win.to(device), self.lose.to(device), self.pair_group.to(device), self.n_groups)


@dataclass
class TokenizedPreference:
    sequences: list[list[int]]    # K prompt+response id lists
    pairs: list[tuple[int, int]]
    source: str
    extra: dict = field(default_factory=dict)


def tokenize_preferences(examples: Sequence[PreferenceExample], tokenizer, max_len: int) -> tuple[list[TokenizedPreference], int]:
    """Prompt+response ids per response; responses longer than the context are cut (count returned) keeping the EOS last."""
    out, truncated = [], 0
    for ex in examples:
        seqs = []
        for r in ex.responses:
            p, resp = tokenize_pair(tokenizer, ex.prompt, r, ex.source)
            check_prompt_length(len(p), max_len - 1, ex.source)
            ids = p + resp
            if len(ids) > max_len:
                truncated += 1
                ids = ids[: max_len - 1] + ids[-1:]  # keep the final (EOS) token the scalar head reads
            seqs.append(ids)
        out.append(TokenizedPreference(seqs, list(ex.pairs), ex.source))
    return out, truncated


def collate_rm(items: Sequence[TokenizedPreference], pad_id: int) -> RMBatch:
    rows, group, win, lose, pg = [], [], [], [], []
    for g, it in enumerate(items):
        base = len(rows)
        rows += it.sequences
        group += [g] * len(it.sequences)
        for w, l in it.pairs:
            win.append(base + w)
            lose.append(base + l)
            pg.append(g)
    ids, mask = pad_right(rows, pad_id)
    return RMBatch(ids, mask, torch.tensor(group), torch.tensor(win), torch.tensor(lose), torch.tensor(pg), len(items))
