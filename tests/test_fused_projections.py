"""The fused QKV and gate/up projections of fastrlhf/models/decoder.py: HF checkpoints in and out under HF's names,
HF state dicts loading as they are, unfused layers computing the same function, and LoRA on either layout.

Tolerance: unfused vs fused runs the same products as separate matmuls (a different blocking of the same fp32 sums):
max abs error 1e-5 on logits of magnitude ~3; a wrong row order of the fused weight moves them by > 1e-1.
"""
import pytest
import torch

from fastrlhf.models.decoder import CausalLM, ModelConfig, split_fused_state, unfuse_projections
from fastrlhf.models.hf_io import load_model, save_model
from tests.helpers.models import make_tiny_checkpoint, make_tiny_hf_model

FAMILIES = ["llama", "qwen2"]  # qwen2: q/k/v with bias


def _ids(B=2, T=7, V=160):
    return torch.randint(4, V, (B, T))


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_state_dict_loads_into_the_fused_layout_and_splits_back(family):
    hf = make_tiny_hf_model(family, "lm")
    hf_state = hf.state_dict()
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    model = CausalLM(cfg)
    model.load_state_dict(hf_state, strict=True)  # q/k/v_proj and gate/up_proj are concatenated by the pre-hook
    sd = model.state_dict()
    a0 = "model.layers.0.self_attn."
    assert f"{a0}qkv_proj.weight" in sd and f"{a0}q_proj.weight" not in sd
    assert "model.layers.0.mlp.gate_up_proj.weight" in sd
    q, k = hf_state[f"{a0}q_proj.weight"], hf_state[f"{a0}k_proj.weight"]
    assert torch.equal(sd[f"{a0}qkv_proj.weight"][q.shape[0]:q.shape[0] + k.shape[0]], k)  # rows: q, k, v
    back = split_fused_state(sd, cfg)
    assert set(back) == set(hf_state)
    for key, t in hf_state.items():
        assert torch.equal(back[key], t), key
    with torch.no_grad():
        ids = _ids()
        assert (model(ids) - hf(input_ids=ids).logits).abs().max().item() < 2e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_unfused_layers_compute_the_same_function(tmp_path, family):
    model = load_model(make_tiny_checkpoint(tmp_path, family, "lm", tokenizer=False))
    ids = _ids()
    with torch.no_grad():
        fused = model(ids)
        assert unfuse_projections(model, ["q_proj"]) == model.config.num_hidden_layers  # attention only
        assert model.model.layers[0].mlp.fused and not model.model.layers[0].self_attn.fused
        assert unfuse_projections(model, ["up_proj"]) == model.config.num_hidden_layers
        unfused = model(ids)
    assert (fused - unfused).abs().max().item() < 1e-5
    save_model(model, tmp_path / "out")  # an unfused model saves the same HF names
    again = load_model(tmp_path / "out")
    assert again.model.layers[0].self_attn.fused
    with torch.no_grad():
        assert (again(ids) - unfused).abs().max().item() < 1e-5


def test_unfuse_on_the_meta_device(tmp_path):
    """load_model(weights=False) builds on meta (the non-zero ranks under torchrun); LoRA's unfuse must work there."""
    model = load_model(make_tiny_checkpoint(tmp_path, "llama", "lm", tokenizer=False), weights=False)
    unfuse_projections(model, ["v_proj", "gate_proj"])
    assert model.model.layers[0].self_attn.q_proj.weight.is_meta
    assert model.model.layers[0].mlp.up_proj.weight.shape == (model.config.intermediate_size, model.config.hidden_size)


@pytest.mark.parametrize("targets,fused_attn,fused_mlp", [(None, False, False), (["q_proj", "v_proj"], False, True),
                                                          (["qkv_proj", "gate_up_proj"], True, True)])
def test_lora_targets_on_either_layout(tmp_path, targets, fused_attn, fused_mlp):
    pytest.importorskip("peft")
    from fastrlhf.runtime.lora import add_lora, adapters_disabled, lora_state_dict, merged_copy

    model = load_model(make_tiny_checkpoint(tmp_path, "qwen2", "lm", tokenizer=False))
    ids = _ids()
    with torch.no_grad():
        base = model(ids)
    kw = {} if targets is None else {"targets": targets}
    model = add_lora(model, rank=4, alpha=8.0, **kw)
    layer = model.model.layers[0]
    assert layer.self_attn.fused == fused_attn and layer.mlp.fused == fused_mlp
    names = set(lora_state_dict(model))
    if targets is None:  # the default: HF's names, as peft on an HF model names them
        assert any(".self_attn.q_proj.lora_A." in n for n in names) and any(".mlp.up_proj.lora_B." in n for n in names)
    with torch.no_grad():
        assert (model(ids) - base).abs().max().item() < 1e-5  # B = 0: the adapters start as the identity
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
        moved = model(ids)
        assert (moved - base).abs().max().item() > 1e-3
        with adapters_disabled(model):
            assert (model(ids) - base).abs().max().item() < 1e-5
        merged = merged_copy(model)  # a plain (fused) CausalLM with W + ΔW
        assert merged.model.layers[0].self_attn.fused
        assert (merged(ids) - moved).abs().max().item() < 1e-4
    save_model(merged, tmp_path / "merged")
    with torch.no_grad():
        assert (load_model(tmp_path / "merged")(ids) - moved).abs().max().item() < 1e-4


def test_gradients_reach_the_fused_weights(tmp_path):
    model = load_model(make_tiny_checkpoint(tmp_path, "llama", "lm", tokenizer=False))
    model(_ids()).float().logsumexp(-1).sum().backward()
    for n in ("self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight", "input_layernorm.weight"):
        g = model.model.layers[0].get_parameter(n).grad
        assert g is not None and g.abs().sum() > 0, n


@pytest.mark.parametrize("family", FAMILIES)
def test_model_on_the_triton_kernels_matches_the_torch_path(tmp_path, family):
    """The CUDA dispatch (Triton RMSNorm / RoPE / SwiGLU on strided slices of the fused projections), run by the
    interpreter at a tiny size: logits and every weight gradient equal the CPU (PyTorch) path up to fp32 rounding."""
    from fastrlhf import kernels
    from fastrlhf.kernels._backend import interpreting

    if not interpreting() and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without CUDA)")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(make_tiny_checkpoint(tmp_path, family, "lm", tokenizer=False), device=dev)
    ids = _ids(2, 5).to(dev)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: positions differ per row
    grads, logits = [], []
    for name in ("torch", "triton"):
        model.zero_grad()
        with kernels.backend(name):
            out = model(ids, attention_mask=mask)
            (out.float().logsumexp(-1) * mask).sum().backward()
        logits.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert (logits[0] - logits[1]).abs().max().item() < 1e-5
    for n, g in grads[0].items():
        assert (g - grads[1][n]).abs().max().item() <= 1e-5 * max(1.0, g.abs().max().item()), n
