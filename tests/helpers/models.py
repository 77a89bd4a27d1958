"""Tiny random HF checkpoints + a word-level tokenizer, built offline, for tests across fastrlhf.

    from tests.helpers.models import make_tiny_checkpoint, tiny_tokenizer
    path = make_tiny_checkpoint(tmp_path, family="qwen2", head="lm", tie=False, num_hidden_layers=3)
    path = tiny_checkpoint(tmp_path, hidden=32, layers=1)   # fastrlhf's own model + the embedded task's tokenizer

The folder holds what transformers' ``save_pretrained`` writes (config.json + model.safetensors) plus a
PreTrainedTokenizerFast (tokenizer.json, tokenizer_config.json with a chat template). Weights are the HF model's
random init, then every parameter is re-drawn with a larger spread (norm weights around 1, biases nonzero) so that
parity tests exercise every term (with HF's default init, biases are 0 and logits are nearly flat).

Tokenizer: whitespace-split words over WORDS; special tokens <pad>=0, <s>=1 (bos), </s>=2 (eos), <unk>=3.
Chat template: "<s>" then for each message "<|role|> content </s>" ("role" one of system/user/assistant), and
"<|assistant|>" when add_generation_prompt=True.
"""
from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = ("the a an of to and in is it that was for on are with as he she they be at one have this from or had by "
         "hot cold word but what some we can out other were all there when up use your how said each which do "
         "their time if will way about many then them write would like so these her long make thing see him two "
         "has look more day could go come did number sound no most people my over know water than call first "
         "who may down side been now find yes good bad cat dog red blue green 0 1 2 3 4 5 6 7 8 9 . , ? !").split()
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {{ eos_token }} "
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")

FAMILY_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "LlamaForSequenceClassification"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "mistral": ("MistralConfig", "MistralForCausalLM", "MistralForSequenceClassification"),
}


def tiny_tokenizer(vocab_words=WORDS):
    """A word-level PreTrainedTokenizerFast: len = len(SPECIALS) + len(vocab_words) (127 by default)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(SPECIALS + list(dict.fromkeys(vocab_words)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=SPECIALS[4:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(family: str = "llama", head: str = "lm", tie: bool = False, **cfg):
    """A transformers config object for a tiny model; ``cfg`` overrides any field (e.g. rope_scaling, sliding_window)."""
    import transformers
    if family not in FAMILY_CLASSES:
        raise ValueError(f"tests/helpers/models.py: family={family!r}; expected one of {tuple(FAMILY_CLASSES)}")
    if head not in ("lm", "score"):
        raise ValueError(f"tests/helpers/models.py: head={head!r}; expected 'lm' or 'score'")
    conf_cls = getattr(transformers, FAMILY_CLASSES[family][0])
    base = dict(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
                tie_word_embeddings=tie, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    if family == "mistral":
        base["sliding_window"] = None
    if head == "score":
        base["num_labels"] = 1
    base.update(cfg)
    rope_scaling = base.pop("rope_scaling", None)
    conf = conf_cls(**base)
    if rope_scaling is not None:  # transformers 5 keeps RoPE settings in rope_parameters (with rope_theta)
        rp = {"rope_theta": base["rope_theta"], **rope_scaling}
        rp.setdefault("rope_type", rp.pop("type", "default"))
        if hasattr(conf, "rope_parameters"):
            conf.rope_parameters = rp
            if hasattr(conf, "standardize_rope_params"):
                conf.standardize_rope_params()
        else:
            conf.rope_scaling = rope_scaling
    return conf


@torch.no_grad()
def randomize_(model, std: float = 0.15) -> None:
    """Re-draw every parameter: weights N(0, std), norm weights 1 + N(0, 0.1), biases N(0, 0.1)."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.1 * torch.randn_like(p))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn_like(p))
        else:
            p.copy_(std * torch.randn_like(p))


def make_tiny_hf_model(family: str = "llama", head: str = "lm", tie: bool = False, seed: int | None = None, **cfg):
    """The transformers model itself (fp32, eager attention, eval mode), randomized."""
    import transformers
    conf = tiny_config(family, head, tie, **cfg)
    cls = getattr(transformers, FAMILY_CLASSES[family][1 if head == "lm" else 2])
    if seed is not None:
        torch.manual_seed(seed)
    conf._attn_implementation = "eager"
    model = cls(conf).float().eval()
    randomize_(model)
    if tie and head == "lm":
        model.tie_weights()
    return model


def make_tiny_checkpoint(tmp_path, family: str = "llama", head: str = "lm", tie: bool = False, *,
                         name: str | None = None, tokenizer: bool = True, seed: int | None = None, **cfg) -> Path:
    """Save a tiny random HF ``family`` model ("llama" | "qwen2" | "mistral") with head "lm" (*ForCausalLM) or "score"
    (*ForSequenceClassification, num_labels=1) under ``tmp_path``; return the folder. ``tie`` ties lm_head to the
    embedding; ``cfg`` overrides config fields (vocab_size=160, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128 by default).
    The tokenizer (``tiny_tokenizer()``, 127 tokens) is saved beside it unless tokenizer=False."""
    model = make_tiny_hf_model(family, head, tie, seed=seed, **cfg)
    path = Path(tmp_path) / (name or f"tiny-{family}-{head}{'-tied' if tie else ''}")
    model.save_pretrained(str(path))
    if tokenizer:
        tiny_tokenizer().save_pretrained(str(path))
    return path


def make_tiny_ppo_setup(d: Path) -> dict:
    """Policy (llama, lm head, seed 1), reward model (llama, score head, seed 2) and 24 prompts over the tiny tokenizer's
    words in ``d``: the inputs of the PPO stage tests. Returns {"policy", "rm", "prompts", "dir"} (paths as str)."""
    import json
    d = Path(d)
    pol = make_tiny_checkpoint(d / "policy", family="llama", head="lm", seed=1)
    rm = make_tiny_checkpoint(d / "rm", family="llama", head="score", seed=2)
    prompts = d / "prompts.jsonl"
    words = ["the cat is", "a dog was", "red blue green", "what is the", "cold water", "hot day"]
    with open(prompts, "w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": words[i % len(words)] + " " + " ".join(["1"] * (i % 4))}) + "\n")
    return {"policy": str(pol), "rm": str(rm), "prompts": str(prompts), "dir": d}


class RecordingLog:
    """A stand-in for MetricsLogger that keeps every logged row (``rows``) and writes nothing."""

    def __init__(self):
        self.rows = []

    def log(self, metrics, step=None, console=True):
        self.rows.append(dict(metrics))

    def close(self, **kw):
        return None


def tiny_checkpoint(path, *, hidden=32, layers=1, seed=0, nan=False, vocab=None, head="lm"):
    """A tiny random fastrlhf model with the embedded task's tokenizer, for the stage tests.
    head "lm": a causal LM (policy / SFT model); "score": a scalar-head model (reward / value model)."""
    from fastrlhf.models.decoder import CausalLM, ModelConfig, ScoreModel
    from fastrlhf.models.hf_io import save_model
    from fastrlhf.tools.task import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab or len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    m = (CausalLM if head == "lm" else ScoreModel)(cfg)
    if nan:
        with torch.no_grad():
            (m.lm_head if head == "lm" else m.score).weight.fill_(float("nan"))
    save_model(m, path, tokenizer=tok)
    return str(path)
