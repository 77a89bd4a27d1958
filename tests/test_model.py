"""fastrlhf/models/decoder.py against transformers' own Llama / Qwen2 / Mistral on tiny random checkpoints (built offline).

Tolerance: fp32 everywhere, max abs error 2e-5 on logits of magnitude ~3. Our forward performs the same operations as
transformers' eager path in a different order (fused SDPA, RoPE table computed once, GQA via broadcasting), so
differences are fp32 rounding: ~1e-6 observed; 2e-5 leaves headroom yet catches any real bug (a wrong RoPE frequency,
mask or bias term moves logits by >1e-2).
"""
import json
import math

import pytest
import torch
import transformers

from fastrlhf.models.kv_cache import StaticKVCache
from fastrlhf.models.decoder import SUPPORTED, CausalLM, ModelConfig, ScoreModel, autocast_context, split_fused_state
from fastrlhf.models.hf_io import config_from_tokenizer_check, load_model, load_tokenizer, save_model
from fastrlhf.models.attention import HAVE_FLASH
from fastrlhf.models.rope import rope_init
from tests.helpers.models import PAD_ID, make_tiny_checkpoint, make_tiny_hf_model, tiny_tokenizer
from tests.helpers.tolerances import EXACT, FP32, FP32_MODEL

ATOL = 2e-5
FAMILIES = ["llama", "qwen2", "mistral"]
V = 160  # tiny vocab (helpers default)


def _batch(B, T, padding, vocab=V):
    """Random ids in [4, V) (never the pad id) with a [B, T] mask padded on ``padding`` side (row lengths differ)."""
    ids = torch.randint(4, vocab, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        n_pad = (b * 3) % T if padding != "none" else 0
        if n_pad:
            if padding == "left":
                mask[b, :n_pad] = 0
            else:
                mask[b, T - n_pad:] = 0
    ids = ids.masked_fill(mask == 0, PAD_ID)
    return ids, mask


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _hf_logits(hf, ids, mask):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits


# ---------------------------------------------------------------------------------------------------- parity vs HF
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie", [False, True])
def test_causal_lm_parity(tmp_path, family, tie):
    path = make_tiny_checkpoint(tmp_path, family, "lm", tie, tokenizer=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    model = load_model(path).eval()
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    for padding in ("none", "left", "right"):
        ids, mask = _batch(4, 11, padding)
        with torch.no_grad():
            ours = model(ids, attention_mask=mask)
        ref = _hf_logits(hf, ids, mask)
        valid = mask.bool()
        err = (ours - ref)[valid].abs().max().item()
        assert err < ATOL, (padding, err)
        assert ours.shape == (4, 11, V)


@pytest.mark.parametrize("cfg", [
    {"attention_bias": True},                                            # Llama with q/k/v/o biases
    {"head_dim": 24, "num_attention_heads": 4, "num_key_value_heads": 1},  # D != H / Hq (as Mistral-Nemo), MQA
    {"num_key_value_heads": 4, "rms_norm_eps": 1e-5, "rope_theta": 500000.0},  # MHA, Llama-3 style theta
])
def test_llama_variants_parity(tmp_path, cfg):
    path = make_tiny_checkpoint(tmp_path, "llama", "lm", tokenizer=False, **cfg)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    model = load_model(path).eval()
    if cfg.get("attention_bias"):
        assert model.model.layers[0].self_attn.o_proj.bias is not None
    ids, mask = _batch(3, 10, "left")
    with torch.no_grad():
        err = (model(ids, attention_mask=mask) - _hf_logits(hf, ids, mask))[mask.bool()].abs().max().item()
    assert err < ATOL, err


@pytest.mark.parametrize("family", FAMILIES)
def test_score_head_parity(tmp_path, family):
    """ScoreModel.score_last == HF *ForSequenceClassification pooled logit (last non-pad token), both paddings."""
    path = make_tiny_checkpoint(tmp_path, family, "score", tokenizer=False)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager").eval()
    model = load_model(path, head="score").eval()
    for padding in ("left", "right"):
        ids, mask = _batch(4, 9, padding)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits[:, 0]
            ours = model.score_last(ids, mask)
            per_token = model(ids, attention_mask=mask)
        assert ours.dtype == torch.float32 and ours.shape == (4,) and per_token.shape == (4, 9)
        assert (ours - ref).abs().max().item() < ATOL, padding


ROPE_CASES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "yarn_mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 16,
                    "mscale": 0.8, "mscale_all_dim": 0.5},
}


@pytest.mark.parametrize("kind", list(ROPE_CASES))
def test_rope_scaling_logits_vs_hf(tmp_path, kind):
    """Logit parity with rope scaling; max_position_embeddings=16 < T=24 so "dynamic" actually rescales."""
    path = make_tiny_checkpoint(tmp_path, "llama", "lm", tokenizer=False, rope_scaling=dict(ROPE_CASES[kind]),
                                max_position_embeddings=16, head_dim=16, num_attention_heads=2,
                                num_key_value_heads=1, rope_theta=500.0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    model = load_model(path).eval()
    assert model.config.rope_scaling["rope_type"] == ROPE_CASES[kind]["rope_type"]
    ids, mask = _batch(2, 24, "none")
    with torch.no_grad():
        err = (model(ids) - hf(input_ids=ids).logits).abs().max().item()
    assert err < ATOL, err


@pytest.mark.parametrize("kind", ["linear", "llama3", "yarn", "yarn_mscale"])
def test_rope_tables_vs_hf_real_sizes(kind):
    """inv_freq and attention scaling at a real head size (D=128, theta=5e5, original context 8192) vs HF's table."""
    scaling = dict(ROPE_CASES[kind])
    if "original_max_position_embeddings" in scaling:
        scaling["original_max_position_embeddings"] = 8192
    conf = transformers.LlamaConfig(hidden_size=1024, num_attention_heads=8, head_dim=128,
                                    max_position_embeddings=32768)
    conf.rope_parameters = {"rope_theta": 5e5, **scaling}
    conf.standardize_rope_params()
    rot = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(conf)
    inv, scale = rope_init(128, 5e5, scaling, 32768)
    torch.testing.assert_close(inv, rot.inv_freq, rtol=1e-6, atol=0)
    assert math.isclose(scale, rot.attention_scaling, rel_tol=1e-12)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_parity(tmp_path, family):
    """Mistral window on every layer; Qwen2 window on layers >= max_window_layers only."""
    extra = {"sliding_window": 3} if family == "mistral" else {
        "use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}
    path = make_tiny_checkpoint(tmp_path, family, "lm", tokenizer=False, **extra)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    model = load_model(path).eval()
    assert model.config.sliding_window == 3
    if family == "qwen2":
        assert [model.config.uses_window(i) for i in range(2)] == [False, True]
    for padding in ("none", "right"):
        ids, mask = _batch(3, 10, padding)
        with torch.no_grad():
            err = (model(ids, attention_mask=mask) - _hf_logits(hf, ids, mask))[mask.bool()].abs().max().item()
        assert err < ATOL, (padding, err)


# ---------------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("family,head,tie", [("llama", "lm", True), ("qwen2", "lm", False), ("mistral", "score", False)])
def test_save_then_transformers_loads(tmp_path, family, head, tie):
    src = make_tiny_checkpoint(tmp_path, family, head, tie, rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                                                        "original_max_position_embeddings": 64})
    model = load_model(src, head=head)
    with torch.no_grad():  # change the weights so the test sees what save_model wrote, not the source files
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = tmp_path / "saved"
    save_model(model, out, tokenizer=load_tokenizer(src))
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".saved*"))  # no temp folder left
    auto = transformers.AutoModelForCausalLM if head == "lm" else transformers.AutoModelForSequenceClassification
    hf = auto.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask = _batch(3, 10, "left")
    with torch.no_grad():
        if head == "lm":
            ours, ref = model(ids, attention_mask=mask), _hf_logits(hf, ids, mask)
            ours, ref = ours[mask.bool()], ref[mask.bool()]
        else:
            ours = model.score_last(ids, mask)
            ref = hf(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits[:, 0]
    assert (ours - ref).abs().max().item() < ATOL
    again = load_model(out, head=head)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_sharded_save_and_load(tmp_path):
    src = make_tiny_checkpoint(tmp_path, "qwen2", "lm", tokenizer=False)
    model = load_model(src)
    save_model(model, tmp_path / "sharded", max_shard_size_bytes=30_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and set(index["weight_map"]) == set(split_fused_state(model.state_dict(), model.config))
    assert "model.layers.0.self_attn.q_proj.weight" in index["weight_map"]  # HF's names on disk, not the fused ones
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in index["weight_map"])
    again = load_model(tmp_path / "sharded")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", attn_implementation="eager").eval()
    ids, _ = _batch(2, 7, "none")
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), **EXACT)
        assert (hf(input_ids=ids).logits - model(ids)).abs().max().item() < ATOL


def test_load_sharded_hf_checkpoint(tmp_path):
    hf = make_tiny_hf_model("llama", "lm")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model = load_model(tmp_path / "hf")
    ids, _ = _batch(2, 8, "none")
    with torch.no_grad():
        assert (model(ids) - hf(input_ids=ids).logits).abs().max().item() < ATOL


def test_save_overwrites_atomically(tmp_path):
    src = make_tiny_checkpoint(tmp_path, "llama", "lm", tokenizer=False)
    model = load_model(src)
    save_model(model, tmp_path / "out")
    with torch.no_grad():
        model.model.norm.weight.fill_(2.0)
    save_model(model, tmp_path / "out")
    assert torch.equal(load_model(tmp_path / "out").model.norm.weight, model.model.norm.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, "out"])


def test_unsupported_architecture_error(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                                 "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported.*LlamaForCausalLM") as e:
        load_model(tmp_path / "gpt2")
    assert "config.json" in str(e.value) and "MistralForSequenceClassification" in str(e.value)
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        ModelConfig.from_hf({"model_type": "gpt2", "num_hidden_layers": 1})
    with pytest.raises(ValueError, match="rope_scaling type 'longrope' is not supported"):
        ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, rope_scaling={"rope_type": "longrope"})
    assert len(SUPPORTED) == 6


def test_pickle_only_checkpoint_refused(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "llama", "lm", tokenizer=False)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors only"):
        load_model(path)


def test_vocab_mismatch_error(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "llama", "lm", vocab_size=100)  # tokenizer has 127 tokens
    tok, model = load_tokenizer(path), load_model(path)
    assert len(tok) == 127
    with pytest.raises(ValueError, match="tokenizer has 127 tokens but the model's vocab_size is 100"):
        config_from_tokenizer_check(model, tok)
    config_from_tokenizer_check(load_model(make_tiny_checkpoint(tmp_path, "qwen2", "lm", tokenizer=False)), tok)


def test_tokenizer_helper(tmp_path):
    tok = load_tokenizer(make_tiny_checkpoint(tmp_path, "llama", "lm"))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = tok.apply_chat_template([{"role": "user", "content": "the cat"}], tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|> the cat </s> <|assistant|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == [1, 5, tok.convert_tokens_to_ids("the"), tok.convert_tokens_to_ids("cat"), 2, 6]
    batch = tok(["the cat", "a red dog is hot"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 5) and batch["attention_mask"].sum().item() == 7


def test_score_head_from_causal_checkpoint(tmp_path):
    """Value model from an SFT checkpoint: body identical, score head fresh N(0, initializer_range)."""
    path = make_tiny_checkpoint(tmp_path, "llama", "lm", tokenizer=False, hidden_size=256, num_attention_heads=4,
                                intermediate_size=32, num_hidden_layers=1, initializer_range=0.05)
    lm, value = load_model(path), load_model(path, head="score")
    assert isinstance(value, ScoreModel) and value.score.weight.shape == (1, 256)
    assert abs(value.score.weight.std().item() - 0.05) < 0.015
    ids, mask = _batch(2, 6, "left")
    with torch.no_grad():
        torch.testing.assert_close(value.model(ids, attention_mask=mask), lm.hidden_states(ids, attention_mask=mask),
                                   **EXACT)
        h = lm.hidden_states(ids, attention_mask=mask)
        torch.testing.assert_close(value(ids, attention_mask=mask), (h @ value.score.weight.T).squeeze(-1))
    with pytest.raises(ValueError, match="lacks.*lm_head.weight"):  # untied score checkpoint has no LM head
        load_model(make_tiny_checkpoint(tmp_path, "llama", "score", tokenizer=False), head="lm")


def test_value_model_from_reward_checkpoint_and_reward_bias(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "qwen2", "score", tokenizer=False)
    rm = load_model(path, head="score")
    rm.config.reward_bias = 0.75
    save_model(rm, tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["fastrlhf_reward_bias"] == 0.75
    value = load_model(tmp_path / "rm", head="score")
    assert value.config.reward_bias == 0.75 and torch.equal(value.score.weight, rm.score.weight)
    ids, mask = _batch(3, 7, "right")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", attn_implementation="eager")
    with torch.no_grad():
        ref = hf.eval()(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits[:, 0]
        assert (value.score_last(ids, mask) - (ref - 0.75)).abs().max().item() < ATOL


# ---------------------------------------------------------------------------------------------------- kv cache
def test_static_kv_cache_update_in_place():
    c = StaticKVCache(2, 4, 10, 2, 8, torch.float32, "cpu")
    ptr = c.k[1].data_ptr()
    k, v = torch.randn(3, 2, 2, 8), torch.randn(3, 2, 2, 8)
    k_all, v_all = c.update(1, k, v, torch.tensor([5, 6]))
    assert k_all.shape == (3, 2, 10, 8) and k_all.data_ptr() == ptr
    assert torch.equal(c.k[1][:3, :, 5:7], k) and torch.equal(v_all[:, :, 5:7], v)
    assert c.k[1][:, :, :5].abs().sum() == 0 and c.k[1][3].abs().sum() == 0 and c.k[0].abs().sum() == 0
    assert c.fits(4, 10) and not c.fits(5, 10) and not c.fits(1, 11)
    c.reset()
    assert c.k[1].abs().sum() == 0 and c.k[1].data_ptr() == ptr
    with pytest.raises(ValueError, match="kv_cache.py"):
        c.update(0, torch.randn(5, 2, 1, 8), torch.randn(5, 2, 1, 8), torch.tensor([0]))


@pytest.mark.parametrize("family,extra", [("llama", {}), ("qwen2", {}), ("mistral", {"sliding_window": 4})])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_kv_cache_decode_matches_full_forward(tmp_path, family, extra, impl):
    """Prefill a left-padded prompt, then decode one token at a time: logits equal the full padded forward."""
    model = load_model(make_tiny_checkpoint(tmp_path, family, "lm", tokenizer=False, **extra), attn_impl=impl).eval()
    B, P, G, S = 3, 6, 5, 16
    ids, mask = _batch(B, P + G, "left")
    mask[:, P:] = 1
    ids = torch.where(mask.bool(), ids, PAD_ID)
    pos = _positions(mask)
    cache = model.new_kv_cache(4, S)
    slot_mask = torch.zeros(B, S, dtype=torch.long)
    slot_mask[:, :P] = mask[:, :P]
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        steps = [model(ids[:, :P], attention_mask=slot_mask, position_ids=pos[:, :P], kv_cache=cache,
                       cache_pos=torch.arange(P))]
        for t in range(P, P + G):
            slot_mask[:, t] = 1
            steps.append(model(ids[:, t:t + 1], attention_mask=slot_mask, position_ids=pos[:, t:t + 1],
                               kv_cache=cache, cache_pos=torch.tensor([t])))
    inc = torch.cat(steps, 1)
    assert (inc - full)[mask.bool()].abs().max().item() < ATOL


# ---------------------------------------------------------------------------------------------------- training paths
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_packed_equals_per_sample(tmp_path, family):
    extra = {"sliding_window": 4} if family == "mistral" else {}
    model = load_model(make_tiny_checkpoint(tmp_path, family, "lm", tokenizer=False, **extra)).eval()
    lens = [5, 3, 8, 1]
    seqs = [torch.randint(4, V, (n,)) for n in lens]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(seqs)[None], cu_seqlens=cu)[0]  # [N, V]
        for i, s in enumerate(seqs):
            one = model(s[None])[0]
            assert (packed[cu[i]:cu[i + 1]] - one).abs().max().item() < ATOL, i


def test_sdpa_equals_eager(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "qwen2", "lm", tokenizer=False)
    sdpa, eager = load_model(path, attn_impl="sdpa").eval(), load_model(path, attn_impl="eager").eval()
    ids, mask = _batch(4, 9, "left")
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    with torch.no_grad():
        for kw in ({}, {"attention_mask": mask}):
            torch.testing.assert_close(sdpa(ids, **kw), eager(ids, **kw), rtol=0, atol=ATOL)
        torch.testing.assert_close(sdpa(ids[:1], cu_seqlens=cu), eager(ids[:1], cu_seqlens=cu), rtol=0, atol=ATOL)


def _grads(model, ids, mask, upstream):
    model.zero_grad(set_to_none=True)
    (model(ids, attention_mask=mask) * upstream).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_same_grads(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "qwen2", "lm", tokenizer=False, num_hidden_layers=3)
    model = load_model(path).train()
    ids, mask = _batch(2, 8, "right")
    upstream = torch.randn(2, 8, V)  # non-unit upstream gradient
    ref = _grads(model, ids, mask, upstream)
    model.config.gradient_checkpointing = True
    ckpt = _grads(model, ids, mask, upstream)
    assert ref.keys() == ckpt.keys()
    for n in ref:
        torch.testing.assert_close(ckpt[n], ref[n], rtol=0, atol=1e-6, msg=n)
    assert all(ref[n].abs().sum() > 0 for n in ref if "embed" not in n)


def test_bf16_autocast_fp32_master_weights(tmp_path):
    """Default training precision: fp32 params, bf16 matmuls under autocast; grads land in fp32.
    Tolerance: bf16 has 8 mantissa bits (rel. 4e-3 per op); through 2 blocks logits of size ~3 move by <0.15."""
    model = load_model(make_tiny_checkpoint(tmp_path, "llama", "lm", tokenizer=False)).train()
    ids, mask = _batch(2, 8, "left")
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
    with autocast_context("cpu", enabled=True):
        out = model(ids, attention_mask=mask)
    assert out.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in model.parameters())
    assert (out.float() - ref)[mask.bool()].abs().max().item() < 0.15
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    with autocast_context("cpu", enabled=False):
        assert model(ids).dtype == torch.float32


def test_load_in_bf16_keeps_rope_fp32(tmp_path):
    model = load_model(make_tiny_checkpoint(tmp_path, "llama", "lm", tokenizer=False), dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.inv_freq.dtype == torch.float32
    ids, _ = _batch(2, 5, "none")
    assert model(ids).dtype == torch.bfloat16


def test_config_roundtrip():
    c = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
                    num_key_value_heads=1, model_type="qwen2", sliding_window=5, sliding_layers=[2],
                    rope_scaling={"rope_type": "linear", "factor": 2.0}, reward_bias=0.5)
    d = c.to_hf("Qwen2ForCausalLM")
    assert d["use_sliding_window"] and d["max_window_layers"] == 2 and d["attention_bias"] is True
    c2 = ModelConfig.from_hf(json.loads(json.dumps(d)))
    for f in ("sliding_window", "sliding_layers", "rope_scaling", "reward_bias", "head_dim", "rope_theta"):
        assert getattr(c2, f) == getattr(c, f), f
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        ModelConfig.from_hf({**d, "hidden_act": "gelu"})


@pytest.mark.skipif(not (HAVE_FLASH and torch.cuda.is_available()), reason="flash-attn not importable / no CUDA")
def test_flash_matches_sdpa(tmp_path):
    path = make_tiny_checkpoint(tmp_path, "llama", "lm", tokenizer=False, head_dim=64, hidden_size=128)
    flash = load_model(path, dtype=torch.bfloat16, device="cuda", attn_impl="flash").eval()
    sdpa = load_model(path, dtype=torch.bfloat16, device="cuda", attn_impl="sdpa").eval()
    ids, mask = _batch(3, 17, "left")
    ids, mask = ids.cuda(), mask.cuda()
    cu = torch.tensor([0, 5, 17], dtype=torch.int32, device="cuda")
    with torch.no_grad():
        for kw in ({}, {"attention_mask": mask}):
            a, b = flash(ids, **kw).float(), sdpa(ids, **kw).float()
            valid = mask.bool() if kw else torch.ones_like(mask, dtype=torch.bool)
            assert (a - b)[valid].abs().max().item() < 0.05
        a, b = flash(ids[:1], cu_seqlens=cu).float(), sdpa(ids[:1], cu_seqlens=cu).float()
        assert (a - b).abs().max().item() < 0.05
        # kv-cache decode (flash_attn_with_kvcache with cache_leftpad) vs SDPA on the same left-padded prompt
        P, S = 9, 24
        outs = []
        for m in (flash, sdpa):
            cache, slot = m.new_kv_cache(3, S), torch.zeros(3, S, dtype=torch.long, device="cuda")
            slot[:, :P] = mask[:, :P]
            pos = _positions(mask)
            steps = [m(ids[:, :P], attention_mask=slot, position_ids=pos[:, :P], kv_cache=cache,
                       cache_pos=torch.arange(P, device="cuda"))[:, -1:]]
            for t in range(P, 17):
                slot[:, t] = 1
                steps.append(m(ids[:, t:t + 1], attention_mask=slot, position_ids=pos[:, t:t + 1], kv_cache=cache,
                               cache_pos=torch.tensor([t], device="cuda")))
            outs.append(torch.cat(steps, 1).float())
        assert (outs[0] - outs[1]).abs().max().item() < 0.05


# Reference versions of the three flash-attn entry points, written from flash-attn's documented semantics (layout
# [B, T, H, D]; causal mask aligned to the bottom-right corner; window_size=(left, right) keys in [i-left, i+right];
# varlen = independent sequences cut by cu_seqlens; kv-cache keys of row b are slots [cache_leftpad[b], cache_seqlens[b])).
# They let the CPU run check our flash bookkeeping (unpadding indices, cu_seqlens, window conversion, left-pad offsets).
def _ref_flash_func(q, k, v, softmax_scale, causal, window_size=(-1, -1)):
    T, S = q.shape[1], k.shape[1]
    i, j = torch.arange(T)[:, None] + (S - T), torch.arange(S)[None, :]  # bottom-right aligned query positions
    allowed = (j <= i) if causal else torch.ones(T, S, dtype=torch.bool)
    if window_size[0] >= 0:
        allowed = allowed & (j >= i - window_size[0])
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bthd,bshd->bhts", q, k) * softmax_scale
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    return torch.einsum("bhts,bshd->bthd", p, v)


def _ref_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window_size=(-1, -1)):
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        out[a:b] = _ref_flash_func(q[None, a:b], k[None, a:b], v[None, a:b], softmax_scale, causal, window_size)[0]
    return out


def _ref_flash_kvcache(q, k_cache, v_cache, cache_seqlens, cache_leftpad, softmax_scale, causal, window_size=(-1, -1)):
    assert k_cache.stride(-1) == 1 and cache_seqlens.dtype == cache_leftpad.dtype == torch.int32
    rows = [_ref_flash_func(q[b:b + 1], k_cache[b:b + 1, lo:hi], v_cache[b:b + 1, lo:hi], softmax_scale, causal,
                            window_size) for b, (lo, hi) in enumerate(zip(cache_leftpad.tolist(), cache_seqlens.tolist()))]
    return torch.cat(rows)


@pytest.mark.parametrize("family,extra", [("llama", {}), ("mistral", {"sliding_window": 4})])
def test_flash_bookkeeping_with_reference_kernels(tmp_path, monkeypatch, family, extra):
    """The flash code path (dense, unpadded varlen, packed varlen, left-padded kv-cache decode) with the flash kernels
    replaced by plain-torch references equals the SDPA path, on CPU in fp32."""
    import fastrlhf.models.decoder as M
    import fastrlhf.models.attention as A
    monkeypatch.setattr(A, "flash_attn_func", _ref_flash_func)
    monkeypatch.setattr(A, "flash_attn_varlen_func", _ref_flash_varlen)
    monkeypatch.setattr(A, "flash_attn_with_kvcache", _ref_flash_kvcache)
    monkeypatch.setattr(M, "resolve_impl", lambda impl, *a, **k: impl)
    path = make_tiny_checkpoint(tmp_path, family, "lm", tokenizer=False, **extra)
    flash, sdpa = load_model(path, attn_impl="flash").eval(), load_model(path, attn_impl="sdpa").eval()
    ids, mask = _batch(3, 11, "left")
    cu = torch.tensor([0, 4, 5, 11], dtype=torch.int32)
    with torch.no_grad():
        torch.testing.assert_close(flash(ids), sdpa(ids), rtol=0, atol=ATOL)
        for padding in ("left", "right"):
            ids, mask = _batch(3, 11, padding)
            a, b = flash(ids, attention_mask=mask), sdpa(ids, attention_mask=mask)
            assert (a - b)[mask.bool()].abs().max().item() < ATOL
        torch.testing.assert_close(flash(ids[:1], cu_seqlens=cu), sdpa(ids[:1], cu_seqlens=cu), rtol=0, atol=ATOL)
        ids, mask = _batch(3, 11, "left")
        mask[:, 6:] = 1
        ids = torch.where(mask.bool(), ids, PAD_ID)
        full, pos = sdpa(ids, attention_mask=mask), _positions(mask)
        cache, slot = flash.new_kv_cache(4, 16), torch.zeros(3, 16, dtype=torch.long)
        slot[:, :6] = mask[:, :6]
        steps = [flash(ids[:, :6], attention_mask=slot, position_ids=pos[:, :6], kv_cache=cache,
                       cache_pos=torch.arange(6))]
        for t in range(6, 11):
            slot[:, t] = 1
            steps.append(flash(ids[:, t:t + 1], attention_mask=slot, position_ids=pos[:, t:t + 1], kv_cache=cache,
                               cache_pos=torch.tensor([t])))
        assert (torch.cat(steps, 1) - full)[mask.bool()].abs().max().item() < ATOL


def test_tokenizer_without_pad_gets_eos(tmp_path):
    from tests.helpers.models import tiny_tokenizer
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.pad_token_id == loaded.eos_token_id == 2
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("cached", (True, False))
def test_masked_sdpa_equal_heads_matches_native_gqa(cached):
    """The CUDA-only masked path (query heads folded into the query axis for decode; k/v repeated in training) equals
    SDPA with native GQA on the same mask, checked here on CPU so it is covered without a GPU."""
    from fastrlhf.models.attention import masked_sdpa_equal_heads
    B, Hq, Hkv, T, S, D = 3, 6, 2, (1 if cached else 7), 9, 8
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    mask = torch.rand(B, 1, T, S) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    ours = masked_sdpa_equal_heads(q, k, v, mask, 0.3, cached)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                                           scale=0.3, enable_gqa=True)
    torch.testing.assert_close(ours.double(), ref, **FP32)


# ------------------------------------------------------------------------------------------- oneDNN projections
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_onednn_projections_match_f_linear_in_training(tmp_path, family, monkeypatch):
    """The whole model in training with every projection on oneDNN (``TRAIN_MIN_MACS`` at 0, so these tiny products
    take it) against ``F.linear``: the same logits and every parameter's gradient up to fp32 summation order
    (left-padded batch; Qwen2's q/k/v biases included)."""
    from fastrlhf.kernels import onednn_linear
    from fastrlhf.models.linear import Linear
    if not onednn_linear.available():
        pytest.skip("this torch build has no oneDNN")
    path = make_tiny_checkpoint(tmp_path, family, "lm", False, tokenizer=False)
    model = load_model(path).train()
    assert any(isinstance(m, Linear) for m in model.modules())
    ids, mask = _batch(3, 9, "left")
    calls = []
    real = onednn_linear.train_linear
    monkeypatch.setattr(onednn_linear, "train_linear", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(onednn_linear, "TRAIN_MIN_MACS", 0)
    out = {}
    for flag in (False, True):
        monkeypatch.setattr(Linear, "onednn", flag)
        model.zero_grad(set_to_none=True)
        logits = model(ids, attention_mask=mask, position_ids=_positions(mask))
        (logits.float().logsumexp(-1) * mask).sum().backward()
        out[flag] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert len(calls) > 0
    torch.testing.assert_close(out[True][0], out[False][0], **FP32)
    for name, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], g, **FP32_MODEL, msg=lambda m, n=name: f"{n}: {m}")
