"""The embedded task of ``fastrlhf pipeline``: a built-in tokenizer, a tiny Llama, a generated instruction-following task and a
programmatic labeler standing in for the human raters (InstructGPT's data flow, at toy scale, offline).

Instructions (all generated from a seed; answers are words separated by spaces):
  "repeat the word cat three times"  -> "cat cat cat"
  "count from 4 to 7"                -> "4 5 6 7"
  "reverse : sun tree cat"           -> "cat tree sun"
  "what color is the banana"         -> "yellow"
The labeler (``Labeler``) knows the right answer of every instruction. It
  - writes SFT demonstrations, a stated fraction of them imperfect (a word dropped, doubled or swapped), as human ones are;
  - ranks K samples of the SFT policy per prompt by ``score`` (equal scores are ties) to make the reward-model data;
  - judges final outputs: ``score(prompt, output)`` in [0, 1] = 1 − word edit distance / max(len(output), len(answer)).
All data goes through the same jsonl files a user's data would.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<assistant>"]
NOUNS = ["cat", "dog", "bird", "fish", "tree", "sun", "moon", "star", "apple", "banana", "grass", "sky", "snow", "coal",
         "rose", "lemon", "frog", "cloud", "milk", "carrot"]
COLOR_OF = {"banana": "yellow", "apple": "red", "grass": "green", "sky": "blue", "snow": "white", "coal": "black",
            "rose": "red", "lemon": "yellow", "frog": "green", "sun": "yellow", "cloud": "white", "milk": "white",
            "carrot": "orange", "moon": "white", "tree": "green", "star": "yellow"}
COLORS = sorted(set(COLOR_OF.values()) | {"brown", "pink"})
NUMBER_WORDS = ["one", "two", "three", "four"]
MAX_NUMBER = 20
WORDS = (["repeat", "the", "word", "times", "count", "from", "to", "reverse", ":", "what", "color", "is"]
         + NUMBER_WORDS + NOUNS + COLORS + [str(i) for i in range(MAX_NUMBER + 1)])
KINDS = ("repeat", "count", "reverse", "color")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<assistant> {{ m['content'] }} {{ eos_token }} "
    "{% else %}<user> {{ m['content'] }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
)


# ------------------------------------------------------------------------------------------------------- tokenizer

def build_tokenizer():
    """A word-level tokenizer (~80 tokens) with <pad>/<bos>/<eos>/<unk> and a two-role chat template; no downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                 unk_token="<unk>", additional_special_tokens=["<user>", "<assistant>"])
    hf.chat_template = CHAT_TEMPLATE
    hf.model_max_length = 10**6
    return hf


@dataclass
class TinyModelSpec:
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 64


def build_tiny_model(path: str, tokenizer=None, spec: TinyModelSpec = TinyModelSpec(), seed: int = 0) -> str:
    """Randomly initialised tiny Llama + the built-in tokenizer, saved as an HF folder (safetensors) at ``path``."""
    import torch

    from fastrlhf.models.decoder import CausalLM, ModelConfig

    from fastrlhf.models.hf_io import save_model

    tokenizer = tokenizer or build_tokenizer()
    vocab = (len(tokenizer) + 7) // 8 * 8  # rounded up like real checkpoints; ids >= len(tokenizer) are never produced
    cfg = ModelConfig(vocab_size=vocab, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                      num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
                      num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    model = CausalLM(cfg)
    std = cfg.initializer_range  # HF Llama init: N(0, 0.02) for every linear / embedding weight, norms at 1
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
    save_model(model, path, tokenizer=tokenizer)
    return path


# ------------------------------------------------------------------------------------------------------------ task

def make_instruction(rng: random.Random) -> tuple[str, str]:
    """(instruction, correct answer) of a random kind."""
    kind = rng.choice(KINDS)
    if kind == "repeat":
        w, n = rng.choice(NOUNS), rng.randint(1, 4)
        return f"repeat the word {w} {NUMBER_WORDS[n - 1]} times", " ".join([w] * n)
    if kind == "count":
        a = rng.randint(0, MAX_NUMBER - 4)
        b = a + rng.randint(1, 4)
        return f"count from {a} to {b}", " ".join(str(i) for i in range(a, b + 1))
    if kind == "reverse":
        items = rng.sample(NOUNS, rng.randint(2, 4))
        return "reverse : " + " ".join(items), " ".join(reversed(items))
    obj = rng.choice(sorted(COLOR_OF))
    return f"what color is the {obj}", COLOR_OF[obj]


def solve(instruction: str) -> str:
    """The correct answer of a generated instruction (the labeler's knowledge). Unknown text -> ValueError."""
    w = instruction.split()
    if len(w) == 6 and w[:3] == ["repeat", "the", "word"] and w[5] == "times" and w[4] in NUMBER_WORDS:
        return " ".join([w[3]] * (NUMBER_WORDS.index(w[4]) + 1))
    if len(w) == 5 and w[0] == "count" and w[1] == "from" and w[3] == "to":
        return " ".join(str(i) for i in range(int(w[2]), int(w[4]) + 1))
    if len(w) >= 3 and w[:2] == ["reverse", ":"]:
        return " ".join(reversed(w[2:]))
    if len(w) == 5 and w[:4] == ["what", "color", "is", "the"] and w[4] in COLOR_OF:
        return COLOR_OF[w[4]]
    raise ValueError(f"not an instruction of the embedded task: {instruction!r}")


def word_edit_distance(a: list[str], b: list[str]) -> int:
    """Levenshtein distance between two word lists: the fewest word insertions, deletions and substitutions."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))  # delete, insert, substitute
        prev = cur
    return prev[-1]


def score(instruction: str, output: str) -> float:
    """Judge score in [0, 1]: 1 − word edit distance(output, answer) / max(len(output), len(answer)) (0 for an empty
    output). A shifted answer ("5 6 7" for "4 5 6 7") keeps its partial credit (0.75), unlike position matching."""
    ref, out = solve(instruction).split(), output.split()
    if not out:
        return 0.0
    return 1.0 - word_edit_distance(ref, out) / max(len(ref), len(out))


def perturb(answer: str, rng: random.Random) -> str:
    """An imperfect demonstration: one word dropped, doubled or replaced by another vocabulary word."""
    w = answer.split()
    i = rng.randrange(len(w))
    op = rng.choice(("drop", "double", "swap")) if len(w) > 1 else rng.choice(("double", "swap"))
    if op == "drop":
        w.pop(i)
    elif op == "double":
        w.insert(i, w[i])
    else:
        w[i] = rng.choice([x for x in NOUNS + COLORS + [str(k) for k in range(MAX_NUMBER + 1)] if x != w[i]])
    return " ".join(w)


def reward(prompts: list, completions: list[str]) -> list[float]:
    """The labeler's score as a programmatic reward function (``fastrlhf grpo --reward_funcs fastrlhf.tools.task:reward``).
    A prompt may be the instruction or chat messages (the last user turn is the instruction)."""
    return [score(p if isinstance(p, str) else p[-1]["content"], c) for p, c in zip(prompts, completions)]


class Labeler:
    """Programmatic stand-in for the human raters: demonstrations, rankings, judgments."""

    def __init__(self, seed: int = 0, noise: float = 0.15):
        self.rng = random.Random(seed)
        self.noise = noise

    def demonstrate(self, instruction: str) -> str:
        """A demonstration; with probability ``noise`` an imperfect one."""
        ans = solve(instruction)
        return perturb(ans, self.rng) if self.rng.random() < self.noise else ans

    def rank(self, instruction: str, responses: list[str]) -> list:
        """Best-first ranking with tie groups (equal scores tie): e.g. [2, [0, 3], 1]."""
        scores = [score(instruction, r) for r in responses]
        ranking: list = []
        for s in sorted(set(scores), reverse=True):
            group = [i for i, x in enumerate(scores) if x == s]
            ranking.append(group[0] if len(group) == 1 else group)
        return ranking

    def judge(self, instruction: str, output: str) -> float:
        return score(instruction, output)


def instructions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [make_instruction(rng)[0] for _ in range(n)]


def _write_jsonl(path: str, rows: list[dict]) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return path


def write_sft_data(path: str, n: int, seed: int = 0, noise: float = 0.15) -> str:
    """SFT demonstrations {"prompt","response"} written by the labeler."""
    lab = Labeler(seed + 1, noise)
    return _write_jsonl(path, [{"prompt": p, "response": lab.demonstrate(p)} for p in instructions(n, seed)])


def write_prompts(path: str, n: int, seed: int) -> str:
    """Prompts {"prompt"} for the RM sampling step, PPO and evaluation (use a different seed per split)."""
    return _write_jsonl(path, [{"prompt": p} for p in instructions(n, seed)])


def write_rankings(path: str, prompts: list[str], samples: list[list[str]], seed: int = 0) -> str:
    """RM data {"prompt","responses","ranking"} from K policy samples per prompt, ranked by the labeler (ties grouped).
    Prompts whose samples all tie are skipped (they carry no comparison)."""
    lab = Labeler(seed)
    rows = []
    for p, resp in zip(prompts, samples):
        ranking = lab.rank(p, resp)
        if len(ranking) > 1:
            rows.append({"prompt": p, "responses": resp, "ranking": ranking})
    return _write_jsonl(path, rows)
