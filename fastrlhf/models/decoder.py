"""A compact decoder for the Llama family (Llama 2/3, Qwen2/2.5, Mistral) with an LM head or a scalar head.

Notation: B batch, T tokens, H hidden size, V vocab, Hq/Hkv query/key-value heads, D head_dim, S KV-cache slots.
Parameter names follow the HF checkpoints (model.embed_tokens, model.layers.N.self_attn.o_proj, ..., lm_head / score),
except the fused projections: self_attn.qkv_proj (HF's q/k/v_proj, rows concatenated) and mlp.gate_up_proj (gate/up_proj).
HF state dicts load as they are (a pre-hook fuses them); ``split_fused_state`` gives HF's names back (hf_io saves that).
RMSNorm, RoPE and SwiGLU are fastrlhf.kernels ops: Triton on CUDA, the plain PyTorch code on CPU.

Precision (default for training): parameters stay fp32 (the master weights, what the optimizer updates); the forward runs
under ``autocast_context(device, enabled=True)`` = torch.autocast(device_type, dtype=torch.bfloat16), so matmuls run in
bf16 while RMSNorm statistics, RoPE tables and the attention softmax stay fp32. For inference, load with dtype=bf16.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fastrlhf.models.kv_cache import StaticKVCache
from fastrlhf.models.linear import Linear
from fastrlhf.models.attention import ATTN_IMPLS, attend, build_meta, resolve_impl
from fastrlhf.kernels import rms_norm, rope, swiglu
from fastrlhf.models.rope import dynamic_inv_freq, rope_cos_sin, rope_init, rope_kind

FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
SUPPORTED = tuple(f"{p}For{h}" for p in FAMILIES.values() for h in ("CausalLM", "SequenceClassification"))


@dataclass
class ModelConfig:
    """Mirrors the HF config fields of the Llama family (same names, same meaning)."""
    vocab_size: int
    hidden_size: int                    # H
    intermediate_size: int              # SwiGLU inner width
    num_hidden_layers: int
    num_attention_heads: int            # Hq
    num_key_value_heads: int            # Hkv (GQA groups = Hq / Hkv)
    head_dim: int | None = None         # D; None = H / Hq
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None    # {"rope_type": "linear"|"dynamic"|"llama3"|"yarn", "factor": ..., ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False        # q/k/v projections with bias (Qwen2)
    model_type: str = "llama"           # "llama" | "qwen2" | "mistral"
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    sliding_window: int | None = None   # W tokens (Mistral; Qwen2 with use_sliding_window)
    sliding_layers: list | None = None  # indices of the layers that use the window (None = all when W is set)
    initializer_range: float = 0.02
    attn_impl: str = "auto"             # "auto" | "sdpa" | "flash" | "eager"
    gradient_checkpointing: bool = False
    reward_bias: float = 0.0            # subtracted from scalar-head outputs ("fastrlhf_reward_bias" in config.json)
    extra: dict = field(default_factory=dict, repr=False)  # other HF keys, written back unchanged by to_hf

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"fastrlhf/models/decoder.py: num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"fastrlhf/models/decoder.py: attn_impl={self.attn_impl!r}; expected one of {ATTN_IMPLS}")
        rope_kind(self.rope_scaling)  # validates the kind
        if self.model_type in ("qwen2", "mistral"):  # HF: Qwen2 always has q/k/v bias, Mistral never
            self.attention_bias = self.model_type == "qwen2"

    def uses_window(self, layer: int) -> bool:
        return self.sliding_window is not None and (self.sliding_layers is None or layer in self.sliding_layers)

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """From an HF config dict (transformers 4.x "rope_theta"/"rope_scaling" or 5.x "rope_parameters")."""
        mt = d.get("model_type")
        if mt not in FAMILIES:
            raise ValueError(f"{source}: model_type={mt!r} is not supported; supported: {tuple(FAMILIES)} "
                             f"(architectures {SUPPORTED})")
        for key, ok in (("hidden_act", "silu"), ("mlp_bias", False)):
            if d.get(key, ok) != ok:
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported (fastrlhf/models/decoder.py needs {ok!r})")
        rp = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = float(rp.pop("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = rp if rope_kind(rp) != "default" else None
        W, layers = None, None
        n = d["num_hidden_layers"]
        if mt == "mistral":
            W = d.get("sliding_window", 4096)  # HF's MistralConfig default when the key is absent
        elif mt == "qwen2" and d.get("use_sliding_window", False):
            W = d.get("sliding_window", 4096)
            types = d.get("layer_types")
            layers = ([i for i, t in enumerate(types) if t == "sliding_attention"] if types else
                      list(range(d.get("max_window_layers", 28), n)))
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_scaling", "rope_theta", "sliding_window",
                                                            "sliding_layers"}
        kw = {k: d[k] for k in known if k in d and k not in ("attn_impl", "gradient_checkpointing", "reward_bias")}
        kw.setdefault("tie_word_embeddings", False)
        extra = {k: v for k, v in d.items() if k not in known and k not in (
            "rope_parameters", "rope_scaling", "rope_theta", "sliding_window", "use_sliding_window", "layer_types",
            "max_window_layers", "architectures", "fastrlhf_reward_bias", "dtype", "torch_dtype",
            "transformers_version", "num_labels", "id2label", "label2id")}
        return cls(**kw, rope_theta=theta, rope_scaling=scaling, sliding_window=W, sliding_layers=layers,
                   reward_bias=float(d.get("fastrlhf_reward_bias", 0.0)), extra=extra)

    def to_hf(self, arch: str) -> dict:
        """HF config.json dict for ``arch`` (one of SUPPORTED), readable by transformers 4.x and 5.x."""
        if arch not in SUPPORTED:
            raise ValueError(f"fastrlhf/models/decoder.py: to_hf(arch={arch!r}); supported: {SUPPORTED}")
        d = dict(self.extra)
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in (
            "extra", "attn_impl", "gradient_checkpointing", "reward_bias", "sliding_window", "sliding_layers",
            "rope_scaling")})
        d.update(architectures=[arch], hidden_act="silu", fastrlhf_reward_bias=self.reward_bias)
        if self.rope_scaling:
            d["rope_scaling"] = dict(self.rope_scaling)
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        elif self.model_type == "qwen2":
            n = self.num_hidden_layers
            layers = list(range(n)) if self.sliding_layers is None else list(self.sliding_layers)
            d.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                     max_window_layers=min(layers) if (self.sliding_window and layers) else n,
                     layer_types=["sliding_attention" if (self.sliding_window and i in layers) else "full_attention"
                                  for i in range(n)])
        if arch.endswith("SequenceClassification"):
            d.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        return d


def autocast_context(device: str | torch.device, enabled: bool = True, dtype: torch.dtype = torch.bfloat16):
    """bf16 autocast over fp32 master weights (the default training precision); a no-op context when disabled."""
    dev = torch.device(device).type
    return torch.autocast(dev, dtype=dtype) if enabled else contextlib.nullcontext()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: Tensor) -> Tensor:  # y = w * x / sqrt(mean(x^2) + eps), statistics in fp32
        return rms_norm(x, self.weight, self.eps)


def _split_linear(fused: nn.Linear, sizes: list[int]) -> list[nn.Linear]:
    """Rows [s_0 | s_1 | ...] of a fused projection as separate nn.Linear modules (copies; works on the meta device)."""
    out, start = [], 0
    w, b = fused.weight, fused.bias
    for n in sizes:
        lin = Linear(fused.in_features, n, bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w[start:start + n])
            if b is not None:
                lin.bias.copy_(b[start:start + n])
        out.append(lin)
        start += n
    return out


def _merge_hf_keys(state: dict, prefix: str, fused: str, parts: tuple[str, ...]) -> None:
    """load_state_dict pre-hook body: HF's separate ``parts`` (e.g. q_proj/k_proj/v_proj) under ``prefix`` become the
    rows of the fused ``fused`` projection, concatenated in that order (weight and bias)."""
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{p}.{kind}" for p in parts]
        if all(k in state for k in keys) and f"{prefix}{fused}.{kind}" not in state:
            state[f"{prefix}{fused}.{kind}"] = torch.cat([state.pop(k) for k in keys], dim=0)


def _fuse_on_load(module, state, prefix, *_) -> None:
    """Pre-hook of Attention / MLP: HF's separate projections in ``state`` load into the fused one."""
    if module.fused:
        fused, parts = ("qkv_proj", QKV_PARTS) if isinstance(module, Attention) else ("gate_up_proj", GATE_UP_PARTS)
        _merge_hf_keys(state, prefix, fused, parts)


class Attention(nn.Module):
    """Causal self-attention with one fused QKV projection ``qkv_proj`` [(Hq + 2·Hkv)·D, H] (rows: q, then k, then v).

    Loads HF's separate q_proj / k_proj / v_proj weights (a load_state_dict pre-hook concatenates them); hf_io writes
    them back separately (``split_fused_state``). ``unfuse()`` switches to three nn.Linear (e.g. for LoRA adapters on
    q_proj / v_proj); the forward runs either layout."""

    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.sliding = layer, c.uses_window(layer)
        self.nq, self.nkv, self.d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.qkv_proj = Linear(c.hidden_size, (self.nq + 2 * self.nkv) * self.d, bias=c.attention_bias)
        self.o_proj = Linear(self.nq * self.d, c.hidden_size, bias=c.attention_bias and c.model_type == "llama")
        self.register_load_state_dict_pre_hook(_fuse_on_load)

    @property
    def fused(self) -> bool:
        return hasattr(self, "qkv_proj")

    def unfuse(self) -> None:
        """Replace ``qkv_proj`` by q_proj, k_proj, v_proj holding the same weights (in place)."""
        if self.fused:
            parts = _split_linear(self.qkv_proj, [self.nq * self.d, self.nkv * self.d, self.nkv * self.d])
            del self.qkv_proj
            self.q_proj, self.k_proj, self.v_proj = parts

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, meta, kv_cache, cache_pos) -> Tensor:
        B, T, _ = x.shape
        if self.fused:
            qkv = self.qkv_proj(x).view(B, T, self.nq + 2 * self.nkv, self.d)  # [B, T, Hq + 2·Hkv, D]
            q, k, v = qkv.split([self.nq, self.nkv, self.nkv], dim=2)  # views
        else:
            q = self.q_proj(x).view(B, T, self.nq, self.d)
            k = self.k_proj(x).view(B, T, self.nkv, self.d)
            v = self.v_proj(x).view(B, T, self.nkv, self.d)
        q, k = rope(q, k, cos, sin)  # [B, T, Hq, D], [B, T, Hkv, D]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        if kv_cache is not None:  # attend in the cache dtype: cast the few new queries, never the whole cache
            k, v = kv_cache.update(self.layer, k, v, cache_pos)  # [B, Hkv, S, D]
            q = q.to(k.dtype)
        o = attend(q, k, v, meta, self.d ** -0.5, self.sliding)  # [B, T, Hq, D]
        return self.o_proj(o.reshape(B, T, self.nq * self.d).to(x.dtype))


class MLP(nn.Module):
    """SwiGLU MLP with one fused gate/up projection ``gate_up_proj`` [2F, H] (rows: gate, then up); HF's gate_proj /
    up_proj load into it and are written back separately, as for ``Attention``; ``unfuse()`` splits it."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.f = c.intermediate_size
        self.gate_up_proj = Linear(c.hidden_size, 2 * self.f, bias=False)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.register_load_state_dict_pre_hook(_fuse_on_load)

    @property
    def fused(self) -> bool:
        return hasattr(self, "gate_up_proj")

    def unfuse(self) -> None:
        """Replace ``gate_up_proj`` by gate_proj, up_proj holding the same weights (in place)."""
        if self.fused:
            parts = _split_linear(self.gate_up_proj, [self.f, self.f])
            del self.gate_up_proj
            self.gate_proj, self.up_proj = parts

    def forward(self, x: Tensor) -> Tensor:  # SwiGLU: W_down (silu(W_gate x) * W_up x)
        if self.fused:
            return self.down_proj(swiglu(self.gate_up_proj(x)))
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


QKV_PARTS, GATE_UP_PARTS = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")
FUSED_PARTS = {"qkv_proj": QKV_PARTS, "gate_up_proj": GATE_UP_PARTS}  # fused module -> HF's modules, in row order


def part_names(key: str) -> list[str]:
    """HF's names for the rows of a fused parameter, in row order ("…self_attn.qkv_proj.weight" -> […q_proj.weight,
    …k_proj.weight, …v_proj.weight]); ``[key]`` for any other name."""
    module, _, kind = key.rpartition(".")
    base, _, proj = module.rpartition(".")
    parts = FUSED_PARTS.get(proj)
    return [key] if parts is None else [f"{base}.{p}.{kind}".lstrip(".") for p in parts]


def split_fused_state(state: dict, c: ModelConfig) -> dict:
    """A state dict with the fused projections split back into HF's names (qkv_proj -> q/k/v_proj, gate_up_proj ->
    gate/up_proj, weight and bias rows); other keys (and already separate projections) unchanged, order kept."""
    q, kv, f = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size
    sizes = {"qkv_proj": [q, kv, kv], "gate_up_proj": [f, f]}
    out = {}
    for k, v in state.items():
        names = part_names(k)
        rows = v.split(sizes[k.rpartition(".")[0].rpartition(".")[2]], dim=0) if len(names) > 1 else [v]
        out.update(zip(names, rows))
    return out


def unfuse_projections(model: nn.Module, names) -> int:
    """Split the fused projections of ``model`` whose HF parts appear in ``names`` (e.g. LoRA targets such as
    "q_proj", "up_proj"); returns how many modules were split."""
    names = set(names)
    n = 0
    for m in model.modules():
        if isinstance(m, Attention) and m.fused and names & set(QKV_PARTS):
            m.unfuse()
            n += 1
        elif isinstance(m, MLP) and m.fused and names & set(GATE_UP_PARTS):
            m.unfuse()
            n += 1
    return n


class Block(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.self_attn, self.mlp = Attention(c, layer), MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, meta, kv_cache=None, cache_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, kv_cache, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Token embedding, N pre-norm blocks, final RMSNorm."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        inv_freq, self.rope_scale = rope_init(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [D/2] fp32

    def _apply(self, fn, recurse=True):
        """Keep the RoPE table fp32 and exact whatever .to(dtype)/.to_empty() does to the module (follow the device)."""
        super()._apply(fn, recurse)
        c = self.config
        inv = rope_init(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)[0]
        self.inv_freq = inv.to(self.embed_tokens.weight.device)
        return self

    def forward(self, input_ids: Tensor, *, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                kv_cache: StaticKVCache | None = None, cache_pos: Tensor | None = None,
                cu_seqlens: Tensor | None = None, seq_index: Tensor | None = None) -> Tensor:
        """input_ids [B, T] -> hidden [B, T, H] after the final norm.
        - training/scoring: ``attention_mask`` [B, T] (1 = real token, padding on either side), causal attention;
          default positions = cumsum(mask) - 1.
        - packed: B = 1, ``cu_seqlens`` [n+1] (int32 cumulative lengths); positions restart per sample, no attention
          across samples.
        - packed with shared prompts: also ``seq_index`` [L]: sample s is the tokens ``seq_index[cu[s]:cu[s+1]]`` (a
          prompt stored once, listed in each sample that continues it); ``position_ids`` [1, N] required.
        - kv cache: ``cache_pos`` [T] slots to write, ``attention_mask`` [B, S] valid cache slots, ``position_ids``
          [B, T] (required); a query at slot s sees valid keys at slots <= s."""
        c, (B, T), dev = self.config, input_ids.shape, input_ids.device
        if kv_cache is not None and (cache_pos is None or position_ids is None):
            raise ValueError("fastrlhf/models/decoder.py: Decoder.forward with kv_cache needs cache_pos [T] and position_ids [B, T]")
        if cu_seqlens is not None and (B != 1 or kv_cache is not None or attention_mask is not None):
            raise ValueError(f"fastrlhf/models/decoder.py: cu_seqlens needs input_ids [1, N] and no kv_cache/attention_mask; "
                             f"got input_ids {(B, T)}")
        if seq_index is not None and (cu_seqlens is None or position_ids is None):
            raise ValueError("fastrlhf/models/decoder.py: seq_index needs cu_seqlens and position_ids")
        if position_ids is None:
            if cu_seqlens is not None:
                cu = cu_seqlens.to(dev).long()
                tok = torch.arange(T, device=dev)
                position_ids = (tok - cu[torch.bucketize(tok, cu[1:], right=True)])[None]  # restart per sample
            elif attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]
            else:
                position_ids = torch.arange(T, device=dev)[None].expand(B, T)
        h = self.embed_tokens(input_ids)  # [B, T, H]
        impl = resolve_impl(c.attn_impl, h.device, torch.get_autocast_dtype(dev.type)
                            if torch.is_autocast_enabled(dev.type) else h.dtype, kv_cache is not None,
                            left_padded_cache=kv_cache is not None and kv_cache.left_padded)
        need_w = any(c.uses_window(i) for i in range(c.num_hidden_layers))
        meta = build_meta(impl, T, dev, attention_mask=attention_mask, cache_pos=cache_pos,
                          S=kv_cache.max_seq if kv_cache is not None else None, cu_seqlens=cu_seqlens,
                          seq_index=seq_index, window=c.sliding_window, need_window=need_w)
        inv_freq = self.inv_freq
        if (c.rope_scaling or {}).get("rope_type", (c.rope_scaling or {}).get("type")) == "dynamic":
            inv_freq = dynamic_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling["factor"],
                                        c.max_position_embeddings, position_ids)
        cos, sin = rope_cos_sin(inv_freq, position_ids, self.rope_scale)  # [B, T, D] fp32
        ckpt = c.gradient_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None
        for layer in self.layers:
            if ckpt:  # recompute the block in backward: activation memory O(1 block) instead of O(N blocks)
                h = checkpoint(layer, h, cos, sin, meta, use_reentrant=False)
            else:
                h = layer(h, cos, sin, meta, kv_cache, cache_pos)
        return self.norm(h)


class CausalLM(nn.Module):
    """Decoder + LM head: logits [B, T, V] (in the compute dtype; upcast where needed)."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.config = c
        self.model = Decoder(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def lm_head_weight(self) -> Tensor:  # [V, H]
        return self.lm_head.weight

    def hidden_states(self, input_ids: Tensor, **kw) -> Tensor:  # [B, T, H]
        return self.model(input_ids, **kw)

    def forward(self, input_ids: Tensor, **kw) -> Tensor:  # [B, T, V]
        return self.lm_head(self.model(input_ids, **kw))

    def new_kv_cache(self, max_batch: int, max_seq: int, dtype: torch.dtype | None = None, device=None) -> StaticKVCache:
        """A StaticKVCache sized for this model (dtype/device default to the parameters')."""
        c, p = self.config, self.lm_head.weight
        return StaticKVCache(c.num_hidden_layers, max_batch, max_seq, c.num_key_value_heads, c.head_dim,
                             dtype or p.dtype, device or p.device)


class ScoreModel(nn.Module):
    """Decoder + scalar head ``score`` (as HF *ForSequenceClassification with num_labels=1): reward or value model."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.config = c
        self.model = Decoder(c)
        self.score = nn.Linear(c.hidden_size, 1, bias=False)

    def forward(self, input_ids: Tensor, **kw) -> Tensor:
        """Per-token values [B, T] fp32: score(h_t) - reward_bias."""
        return self.score(self.model(input_ids, **kw)).squeeze(-1).float() - self.config.reward_bias

    def score_last(self, input_ids: Tensor, attention_mask: Tensor, **kw) -> Tensor:
        """[B] value at the last valid (mask = 1) token of each row (padding on either side)."""
        values = self(input_ids, attention_mask=attention_mask, **kw)  # [B, T]
        T = attention_mask.shape[-1]
        last = (torch.arange(T, device=values.device) * attention_mask.bool()).argmax(-1)  # rightmost valid index
        return values.gather(1, last[:, None]).squeeze(1)


__all__ = ["SUPPORTED", "FAMILIES", "ModelConfig", "Decoder", "CausalLM", "ScoreModel", "autocast_context",
           "split_fused_state", "unfuse_projections"]
