"""Attention back-ends: flash-attn (when importable, CUDA, fp16/bf16), torch SDPA, and an eager math reference.

Notation: B batch, Hq query heads, Hkv key/value heads (GQA: Hq % Hkv == 0), T queries, S keys, D head_dim, N packed tokens.
Masks are boolean, True = may attend, shaped [B or 1, 1, T, S]. ``AttnMeta`` is built once per forward by the decoder and
shared by every layer; it carries the mask for SDPA/eager and the varlen bookkeeping for flash-attn.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional dependency; everything works without it
    from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
    HAVE_FLASH = True
    # decoding from a left-padded cache needs ``cache_leftpad`` (flash-attn >= 2.6)
    HAVE_FLASH_LEFTPAD = "cache_leftpad" in inspect.signature(flash_attn_with_kvcache).parameters
    FLASH_IMPORT_ERROR = None
except Exception as e:  # ImportError, or a build that does not match the installed torch / CUDA
    flash_attn_func = flash_attn_varlen_func = flash_attn_with_kvcache = None
    HAVE_FLASH = HAVE_FLASH_LEFTPAD = False
    FLASH_IMPORT_ERROR = f"{type(e).__name__}: {e}"

_log = logging.getLogger(__name__)
_told_no_flash = False


def _say_no_flash_once() -> None:
    """One log line per process when a CUDA run falls back to SDPA because flash_attn did not import."""
    global _told_no_flash
    if not _told_no_flash:
        _told_no_flash = True
        _log.warning("flash_attn is not usable (%s): attention uses torch SDPA", FLASH_IMPORT_ERROR)

ATTN_IMPLS = ("auto", "sdpa", "flash", "eager")
# Packed samples on SDPA: "repad" (q/k/v re-padded per sample, causal SDPA; the default, fastest measured on CPU) or
# "blockdiag" (one block-diagonal causal mask over the packed row; what "eager" always uses).
PACKED_SDPA = "repad"


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype, kv_cache: bool = False,
                 left_padded_cache: bool = False) -> str:
    """"auto": flash when importable on CUDA in fp16/bf16, else SDPA (said once in the log when flash_attn failed to
    import on a CUDA run).
    The KV-cache mask over slots is arbitrary in general; flash-attn's kv-cache kernel only expresses "valid slots of
    row b are [leftpad_b, cache_pos[-1]]" (left padding, no holes). With a KV cache, "auto" takes that path only when the
    cache's owner guarantees that layout (``left_padded_cache``: ``StaticKVCache.left_padded``, set by the hybrid
    engine), and attn_impl="flash" takes it whenever asked (the caller then guarantees the layout)."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"fastrlhf/models/attention.py: attn_impl={impl!r}; expected one of {ATTN_IMPLS}")
    if impl == "flash" and not HAVE_FLASH:
        raise ImportError("fastrlhf/models/attention.py: attn_impl='flash' but flash_attn is not importable")
    half = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if impl == "auto" and half and not HAVE_FLASH:
        _say_no_flash_once()
    flash_ok = HAVE_FLASH and half
    if kv_cache:
        flash_ok = flash_ok and HAVE_FLASH_LEFTPAD and (impl == "flash" or left_padded_cache)
    if impl == "auto":
        return "flash" if flash_ok else "sdpa"
    if impl == "flash" and not flash_ok:
        return "sdpa"  # CPU / fp32 / kv-cache: flash kernels cannot run these
    return impl


@dataclass
class AttnMeta:
    """Per-forward attention bookkeeping (built by ``build_meta``)."""
    impl: str
    mask: Tensor | None = None          # [B|1, 1, T, S] bool, full-attention layers (None = plain causal)
    mask_window: Tensor | None = None   # same, sliding-window layers
    window: int | None = None           # sliding window W: key allowed iff q - W < k <= q
    # flash varlen (packed or unpadded rows): token indices into the flat [B*T] layout, cumulative lengths, max length
    indices: Tensor | None = None
    cu_seqlens: Tensor | None = None
    max_seqlen: int = 0
    # flash kv-cache decode: per row, keys are the slots [cache_leftpad[b], cache_seqlens[b]) (int32 [B])
    cache_seqlens: Tensor | None = None
    cache_leftpad: Tensor | None = None
    cached: bool = False                # keys come from a KV cache (S slots, usually S >> T)
    # packed on SDPA: q/k/v re-padded per sample into [n, H, Tmax, D] (right padding) around the attention call only.
    # Samples are lists of packed tokens: sample s is the tokens seq_index[cu[s]:cu[s+1]] (seq_index None = the
    # identity, samples are contiguous); with shared prompts a prompt's tokens belong to each sample of its group.
    pad_index: Tensor | None = None     # [L] int64: row-major slot s·Tmax + (j − cu[s]) of each sample position j
    pad_rows: tuple[int, int] = (0, 0)  # (n samples, Tmax longest sample)
    pad_src: Tensor | None = None       # [L] packed token at each sample position (None = the identity, L = N)
    pad_take: Tensor | None = None      # [N] the slot each packed token's output is read from (None = pad_index)


def _causal(q_slot: Tensor, k_slot: Tensor, window: int | None) -> Tensor:
    """[T, S] bool: k <= q, and q - k < W under a sliding window W."""
    m = k_slot[None, :] <= q_slot[:, None]
    if window is not None:
        m = m & (k_slot[None, :] > q_slot[:, None] - window)
    return m


def build_meta(impl: str, T: int, device, *, attention_mask: Tensor | None = None, cache_pos: Tensor | None = None,
               S: int | None = None, cu_seqlens: Tensor | None = None, seq_index: Tensor | None = None,
               window: int | None = None, need_window: bool = False) -> AttnMeta:
    """Masks for one forward.
    - kv cache: ``cache_pos`` [T] slots of the queries, ``attention_mask`` [B, S] valid cache slots.
    - packed: ``cu_seqlens`` [n+1] over N = T tokens of one row; block-diagonal causal (SDPA: q/k/v re-padded per
      sample around the attention call, ``_attend_repadded``; eager: the block-diagonal mask).
    - packed with shared prompts: ``seq_index`` [L] lists each sample's packed tokens in order (a prompt's tokens
      appear once per sample of its group) and ``cu_seqlens`` [n+1] cuts it; each sample is causal over its own list.
      Always re-padded per sample (every impl; flash-attn's varlen kernels take contiguous samples only).
    - padded: ``attention_mask`` [B, T] (either side); causal and key-valid. A query row with no valid key (a pad
      query before any real token) may attend to itself, so no row is empty (its output is ignored by callers)."""
    meta = AttnMeta(impl=impl, window=window if need_window else None)
    wins = [None] + ([window] if need_window else [])
    if cache_pos is not None:  # ---- decode / prefill into the cache
        meta.cached = True
        if impl == "flash":  # no host sync: first valid slot by argmax, end = last written slot + 1
            if attention_mask is None:
                raise ValueError("fastrlhf/models/attention.py: the flash kv-cache path needs attention_mask [B, S]")
            B = attention_mask.shape[0]
            meta.cache_leftpad = attention_mask.int().argmax(-1).to(torch.int32)  # first valid slot of each row
            meta.cache_seqlens = (cache_pos[-1] + 1).to(torch.int32).expand(B).contiguous()
            return meta
        k_slot = torch.arange(S, device=device)
        for w in wins:
            m = _causal(cache_pos, k_slot, w)[None, None]  # [1, 1, T, S]
            if attention_mask is not None:
                valid = attention_mask[:, None, None, :].bool()  # [B, 1, 1, S]
                m = m & (valid | (k_slot[None, :] == cache_pos[:, None])[None, None])
            setattr(meta, "mask" if w is None else "mask_window", m)
        return meta
    if cu_seqlens is not None:  # ---- packed sequences
        cu = cu_seqlens.to(device=device, dtype=torch.int32)
        if impl == "flash" and seq_index is None:
            meta.cu_seqlens, meta.max_seqlen = cu, int((cu[1:] - cu[:-1]).max().item())
            return meta
        if seq_index is not None or (impl == "sdpa" and PACKED_SDPA == "repad"):
            # per-sample re-padding: no mask, or a window over [Tmax, Tmax]
            pos = torch.arange(int(cu[-1]), device=device)  # [L] positions in the concatenated samples
            seg = torch.bucketize(pos, cu[1:].long(), right=True)  # [L] sample of each position
            lens = cu[1:] - cu[:-1]
            tmax = int(lens.max().item())
            meta.impl = "eager" if impl == "eager" else "sdpa"
            meta.pad_rows = (lens.numel(), tmax)
            meta.pad_index = seg * tmax + (pos - cu.long()[seg])
            if seq_index is not None:
                src = seq_index.to(device=device, dtype=torch.long)
                meta.pad_src = src  # a token's output: its first slot (the same in every sample that holds it)
                meta.pad_take = torch.full((T,), len(lens) * tmax, dtype=torch.long,  # n·Tmax = no slot yet
                                           device=device).scatter_reduce_(0, src, meta.pad_index, "amin")
            if need_window:
                t = torch.arange(tmax, device=device)
                meta.mask_window = _causal(t, t, window)[None, None]
            return meta
        tok = torch.arange(T, device=device)
        seg = torch.bucketize(tok, cu[1:].long(), right=True)  # [N] sample id of each token
        same = seg[:, None] == seg[None, :]
        for w in wins:
            setattr(meta, "mask" if w is None else "mask_window", (_causal(tok, tok, w) & same)[None, None])
        return meta
    if attention_mask is None:  # ---- plain causal
        if impl == "eager" or need_window:
            tok = torch.arange(T, device=device)
            for w in wins:
                setattr(meta, "mask" if w is None else "mask_window", _causal(tok, tok, w)[None, None])
        return meta
    am = attention_mask.bool()  # ---- padded [B, T]
    if impl == "flash":
        lens = am.sum(-1, dtype=torch.int32)
        meta.indices = am.flatten().nonzero().flatten()
        meta.cu_seqlens = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
        meta.max_seqlen = int(lens.max().item())
        return meta
    tok = torch.arange(T, device=device)
    for w in wins:
        m = _causal(tok, tok, w)[None, None] & (am[:, None, None, :] | torch.eye(T, dtype=torch.bool, device=device))
        setattr(meta, "mask" if w is None else "mask_window", m)
    return meta


def attend(q: Tensor, k: Tensor, v: Tensor, meta: AttnMeta, scale: float, sliding: bool) -> Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, S, D] -> [B, T, Hq, D]."""
    mask = meta.mask_window if sliding else meta.mask
    if meta.impl == "flash":
        return _flash(q, k, v, meta, scale, meta.window if sliding else None)
    if meta.pad_index is not None:
        return _attend_repadded(q, k, v, meta, scale, mask)
    B, Hq, T, D = q.shape
    if meta.impl == "eager":
        o = _eager(q, k, v, mask, scale)
    elif mask is None or q.device.type == "cpu":  # plain causal (SDPA's flash backend), or any mask on CPU (its CPU
        gqa = {"enable_gqa": True} if Hq != k.shape[1] else {}  # kernel takes the mask): GQA native, never a k/v copy
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, **gqa)
    else:
        o = masked_sdpa_equal_heads(q, k, v, mask, scale, meta.cached)
    return o.transpose(1, 2)


def _eager(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """softmax(q kᵀ · scale + mask) v with the softmax in fp32: q [B, Hq, T, D], k/v [B, Hkv, S, D], mask [B|1, 1, T, S]
    bool or None (causal) -> [B, Hq, T, D]."""
    T, rep = q.shape[2], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, Hq, S, D]
    s = (q @ k.transpose(-1, -2)) * scale  # [B, Hq, T, S]
    if mask is None:
        mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def masked_sdpa_equal_heads(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, cached: bool) -> Tensor:
    """Masked SDPA for CUDA's memory-efficient backend, which (torch <= 2.11) has no GQA: q [B, Hq, T, D], k/v
    [B, Hkv, S, D], mask [B|1, 1, T, S] bool -> [B, Hq, T, D], with equal head counts handed to SDPA.

    Decode (``cached``): the rep = Hq/Hkv query heads of a group fold into the query axis, so the cache is never
    copied: [B, Hkv, rep·T, D], row r·T + t = head g·rep + r. Training: k and v repeated per query head."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    rep = Hq // Hkv
    if rep > 1 and cached:
        qf = q.reshape(B, Hkv, rep * T, D)
        mf = mask[:, :, None].expand(-1, -1, rep, -1, -1).reshape(mask.shape[0], 1, rep * T, mask.shape[-1])
        return F.scaled_dot_product_attention(qf, k, v, attn_mask=mf, scale=scale).reshape(B, Hq, T, D)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, Hq, S, D]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _attend_repadded(q: Tensor, k: Tensor, v: Tensor, meta: AttnMeta, scale: float, mask: Tensor | None) -> Tensor:
    """Packed samples on SDPA: q [1, Hq, N, D], k/v [1, Hkv, N, D] -> [1, N, Hq, D].

    Only q, k and v are re-padded, per sample and on the right, into [n, H, Tmax, D]; every other op of the layer runs on
    the N packed tokens. Right padding makes plain causal attention exact for the valid queries (a sample's pad keys
    lie after all of its valid queries), so SDPA runs with ``is_causal`` (its fused CPU/CUDA kernel, GQA native) and no
    mask: n·Tmax² scores instead of the N² of a block-diagonal mask over the packed row. A pad query's output is
    dropped when the result is unpadded (so it gets no gradient).
    Shared prompts (``meta.pad_src``): a prompt token is copied into every sample of its group (the copies' gradients
    add up in backward), and its output is read from one of them (all are equal: a prompt token sees only its
    prompt)."""
    n, tmax = meta.pad_rows
    idx, src = meta.pad_index, meta.pad_src

    def repad(x: Tensor) -> Tensor:  # [1, H, N, D] -> [n, H, Tmax, D]
        flat = x[0].transpose(0, 1)  # [N, H, D]
        if src is not None:
            flat = flat.index_select(0, src)  # [L, H, D] the samples' tokens in order
        return flat.new_zeros(n * tmax, *flat.shape[1:]).index_copy(0, idx, flat).view(
            n, tmax, *flat.shape[1:]).transpose(1, 2)

    Hq, Hkv = q.shape[1], k.shape[1]
    qp, kp, vp = repad(q), repad(k), repad(v)
    take = meta.pad_take if meta.pad_take is not None else idx
    if meta.impl == "eager":
        o = _eager(qp, kp, vp, mask, scale)
    elif mask is None:
        gqa = {"enable_gqa": True} if Hq != Hkv else {}
        o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, **gqa)  # [n, Hq, Tmax, D]
    else:  # sliding window [1, 1, Tmax, Tmax] (causal included): the masked backend, k/v repeated per query head
        if Hq != Hkv:
            kp, vp = kp.repeat_interleave(Hq // Hkv, dim=1), vp.repeat_interleave(Hq // Hkv, dim=1)
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale)
    return o.transpose(1, 2).reshape(n * tmax, Hq, -1).index_select(0, take)[None]  # [1, N, Hq, D]


def _flash(q: Tensor, k: Tensor, v: Tensor, meta: AttnMeta, scale: float, window: int | None) -> Tensor:
    """flash-attn: dense causal, varlen over unpadded rows, or varlen over packed samples. Layout [B, T, H, D]."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, T, H, D]
    win = (window - 1, 0) if window is not None else (-1, -1)  # keys in [q - (W-1), q]
    B, T, H, D = q.shape
    if meta.cache_seqlens is not None:  # cache buffers viewed as [B, S, Hkv, D] (strided; last dim contiguous)
        return flash_attn_with_kvcache(q, k, v, cache_seqlens=meta.cache_seqlens, cache_leftpad=meta.cache_leftpad,
                                       softmax_scale=scale, causal=True, window_size=win)
    if meta.cu_seqlens is None:
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=win)
    flat = lambda x: x.reshape(B * T, x.shape[2], D)  # noqa: E731  [B*T, H, D]
    q, k, v = flat(q), flat(k), flat(v)
    if meta.indices is not None:  # padded rows -> varlen over the valid tokens only
        q, k, v = q[meta.indices], k[meta.indices], v[meta.indices]
    o = flash_attn_varlen_func(q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen,
                               softmax_scale=scale, causal=True, window_size=win)
    if meta.indices is not None:
        o = torch.zeros(B * T, H, D, dtype=o.dtype, device=o.device).index_copy_(0, meta.indices, o)
    return o.reshape(B, T, H, D)
