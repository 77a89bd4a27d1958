"""A tiny random Llama checkpoint with the embedded tokenizer, for stage tests (built offline)."""
import torch

from fastrlhf.models.decoder import CausalLM, ModelConfig, ScoreModel

from fastrlhf.models.hf_io import save_model
from fastrlhf.tools.task import build_tokenizer


def tiny_checkpoint(path, *, hidden=32, layers=1, seed=0, nan=False, vocab=None, head="lm"):
    """head "lm": a causal LM (policy / SFT model); "score": a scalar-head model (reward / value model)."""
    tok = build_tokenizer()
    torch.manual_seed(seed)
    m = (CausalLM if head == "lm" else ScoreModel)(ModelConfig(vocab_size=vocab or len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id))
    if nan:
        with torch.no_grad():
            (m.lm_head if head == "lm" else m.score).weight.fill_(float("nan"))
    save_model(m, path, tokenizer=tok)
    return str(path)
