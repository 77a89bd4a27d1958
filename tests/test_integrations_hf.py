"""fastrlhf.integrations.hf.linear_logprobs_forward on tiny random transformers causal LMs (Qwen2 with an untied head,
Llama with tied embeddings), against the model's own logits in float64, values and every parameter's gradient.

Tolerance (the project rule: relative to plain PyTorch's own error in the same dtype): plain PyTorch in fp32
(``model(...).logits`` -> log_softmax -> gather) is measured against the float64 model on the same inputs; ours may be at most
2x that error plus a floor of 1e-6 (values) / 1e-6·max|grad| (gradients) for the case where fp32 happens to be exact.
"""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastrlhf.integrations.hf import linear_logprobs_forward  # noqa: E402
from tests.helpers.tolerances import EXACT


def _tiny(kind: str):
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(tie_word_embeddings=False, **common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(tie_word_embeddings=True, **common))
    return model.float().eval()


def _batch(B: int, L: int, V: int):
    """Left-padded rows of different lengths; labels −100 on padding and on a 3-token prompt."""
    ids = torch.randint(1, V, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    for b in range(B):
        mask[b, : b * 2] = 0  # row b has 2b left-padding tokens
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    return ids, mask, labels


def _plain(model, ids, mask, labels, tau):
    """The unfused computation: full logits, / τ, log-softmax, gather (shifted), 0 where the label is ignored."""
    z = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1] / tau
    y = labels[:, 1:]
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (y >= 0)
    ent = -(logp_all.exp() * logp_all).sum(-1) * (y >= 0)  # H = −Σ p log p
    return logp, ent


def _grads(model, outs, gs):
    model.zero_grad(set_to_none=True)
    sum((o * g.to(o.dtype)).sum() for o, g in zip(outs, gs)).backward()
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_linear_logprobs_forward_matches_float64_model(kind):
    model = _tiny(kind)
    model64 = copy.deepcopy(model).double()
    B, L, tau = 3, 11, 0.7
    ids, mask, labels = _batch(B, L, model.config.vocab_size)

    def boom(*a, **k):
        raise AssertionError("the LM head module was called: logits were materialized")

    model.get_output_embeddings().forward = boom
    logp, ent = linear_logprobs_forward(model, ids, labels, attention_mask=mask, temperature=tau, return_entropy=True)
    del model.get_output_embeddings().forward  # back to the class's forward for the plain-PyTorch baseline
    assert logp.shape == ent.shape == (B, L - 1) and logp.dtype == ent.dtype == torch.float32
    assert (logp[labels[:, 1:] < 0] == 0).all() and (ent[labels[:, 1:] < 0] == 0).all()

    ref_logp, ref_ent = _plain(model64, ids, mask, labels, tau)
    base_logp, base_ent = _plain(model, ids, mask, labels, tau)
    for ours, base, ref in ((logp, base_logp, ref_logp), (ent, base_ent, ref_ent)):
        base_err = (base.double() - ref).abs().max().item()
        err = (ours.double() - ref).abs().max().item()
        assert err <= 2 * base_err + 1e-6, (err, base_err)

    gs = (torch.randn(B, L - 1), torch.randn(B, L - 1))  # non-unit upstream gradients
    logp, ent = linear_logprobs_forward(model, ids, labels, attention_mask=mask, temperature=tau, return_entropy=True)
    ours_g = _grads(model, (logp, ent), gs)
    base_g = _grads(model, _plain(model, ids, mask, labels, tau), gs)
    ref_g = _grads(model64, _plain(model64, ids, mask, labels, tau), gs)
    assert set(ours_g) == set(ref_g) and len(ref_g) > 10
    for name, ref in ref_g.items():
        scale = ref.abs().max().item()
        base_err = (base_g[name] - ref).abs().max().item()
        err = (ours_g[name] - ref).abs().max().item()
        assert err <= 2 * base_err + 1e-6 * scale, (name, err, base_err)


def test_linear_logprobs_forward_unshifted_and_logp_only():
    model = _tiny("qwen2")
    ids, mask, labels = _batch(2, 9, model.config.vocab_size)
    aligned = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)  # labels[t] = token t+1, last ignored
    a = linear_logprobs_forward(model, ids, labels, attention_mask=mask)
    b = linear_logprobs_forward(model, ids, aligned, attention_mask=mask, shift=False)
    assert b.shape == (2, 9) and (b[:, -1] == 0).all()
    torch.testing.assert_close(a, b[:, :-1], **EXACT)


def test_linear_logprobs_forward_all_ignored_gives_zero_and_zero_grad():
    model = _tiny("llama")
    ids = torch.randint(1, 97, (2, 5))
    logp = linear_logprobs_forward(model, ids, torch.full_like(ids, -100))
    assert logp.shape == (2, 4) and (logp == 0).all()
    logp.sum().backward()  # still connected to the model
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())


def test_linear_logprobs_forward_rejects_bad_input():
    model = _tiny("qwen2")
    ids = torch.randint(1, 97, (2, 5))
    with pytest.raises(ValueError, match="labels"):
        linear_logprobs_forward(model, ids, ids[:, :4])
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs_forward(model, ids, ids, temperature=0.0)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        linear_logprobs_forward(model, ids, ids)
