"""Static (preallocated) key/value cache for decoding.

Notation: L layers, Bm = max_batch, S = max_seq (cache slots), Hkv = key/value heads, D = head_dim, t = new tokens.

The buffers are allocated once; ``update`` writes in place with ``index_copy_`` at the slots ``cache_pos`` and returns views,
so a decode step allocates nothing and can be captured in a CUDA graph (the slot index is a tensor, not a Python int).
Which slots are valid keys for each row is the caller's business: it passes ``attention_mask [B, S]`` to the model.
A caller whose rows are always one run of valid slots [first valid, last written] (left padding, no holes) sets
``left_padded = True``; then "auto" attention may use flash-attn's KV-cache kernel (``models.attention.resolve_impl``).
"""
from __future__ import annotations

import torch
from torch import Tensor


class StaticKVCache:
    """Per-layer buffers ``k[l], v[l]`` of shape [Bm, Hkv, S, D]."""

    def __init__(self, n_layers: int, max_batch: int, max_seq: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
        for name, val in (("n_layers", n_layers), ("max_batch", max_batch), ("max_seq", max_seq),
                          ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
            if int(val) <= 0:
                raise ValueError(f"fastrlhf/models/kv_cache.py: StaticKVCache({name}={val}) must be a positive int")
        self.n_layers, self.max_batch, self.max_seq = int(n_layers), int(max_batch), int(max_seq)
        self.n_kv_heads, self.head_dim, self.dtype = int(n_kv_heads), int(head_dim), dtype
        shape = (self.max_batch, self.n_kv_heads, self.max_seq, self.head_dim)  # [Bm, Hkv, S, D]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.n_layers)]
        self.left_padded = False  # set by a caller that guarantees the left-padded, hole-free layout (see above)

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def fits(self, batch: int, seq: int) -> bool:
        """True if ``batch`` rows of ``seq`` slots (prompt + new tokens) fit the buffers."""
        return 0 < batch <= self.max_batch and 0 < seq <= self.max_seq

    def reset(self) -> None:
        """Zero every buffer in place (addresses are kept, so captured graphs stay valid)."""
        for buf in self.k + self.v:
            buf.zero_()

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.k + self.v)

    def update(self, layer: int, k_new: Tensor, v_new: Tensor, cache_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k_new, v_new`` [B, Hkv, t, D] at slots ``cache_pos`` [t] (LongTensor); return ``k_all, v_all`` views
        [B, Hkv, S, D] of rows ``:B``. In place, no allocation: safe inside a CUDA graph."""
        B = k_new.shape[0]
        if B > self.max_batch or k_new.shape[1:] != (self.n_kv_heads, cache_pos.shape[0], self.head_dim):
            raise ValueError(f"fastrlhf/models/kv_cache.py: update got k_new {tuple(k_new.shape)}, cache_pos "
                             f"{tuple(cache_pos.shape)}; expected [B<={self.max_batch}, {self.n_kv_heads}, t, "
                             f"{self.head_dim}] with t = len(cache_pos)")
        k_all, v_all = self.k[layer][:B], self.v[layer][:B]  # views [B, Hkv, S, D]
        k_all.index_copy_(2, cache_pos, k_new.to(self.dtype))
        v_all.index_copy_(2, cache_pos, v_new.to(self.dtype))
        return k_all, v_all

    def window(self, slots: int) -> "CacheWindow":
        """The first ``slots`` slots of every row: a view that writes into these buffers and whose ``update`` returns
        [B, Hkv, slots, D], so attention reads only the slots written so far (the caller keeps every slot it writes
        and every valid key below ``slots``, and passes ``attention_mask [B, slots]``)."""
        return CacheWindow(self, slots)

    def keep_rows(self, rows: Tensor, slots: int) -> None:
        """Rows 0..n−1, slots 0..slots−1, become rows ``rows`` [n] (any rows, repeats allowed: compaction keeps the live
        rows, a shared prefill copies a prompt to each row that repeats it), in every layer (a gather then an in-place
        copy: the buffers keep their addresses)."""
        n = rows.shape[0]
        for buf in self.k + self.v:
            buf[:n, :, :slots] = buf[:, :, :slots].index_select(0, rows)


class CacheWindow:
    """``StaticKVCache.window(slots)``: the same buffers, seen as a cache of ``slots`` slots."""

    def __init__(self, cache: StaticKVCache, slots: int):
        if not 0 < int(slots) <= cache.max_seq:
            raise ValueError(f"fastrlhf/models/kv_cache.py: window({slots}) outside 1..{cache.max_seq} slots")
        self.cache, self.max_seq = cache, int(slots)
        self.max_batch, self.left_padded, self.dtype = cache.max_batch, cache.left_padded, cache.dtype

    @property
    def device(self) -> torch.device:
        return self.cache.device

    def update(self, layer: int, k_new: Tensor, v_new: Tensor, cache_pos: Tensor) -> tuple[Tensor, Tensor]:
        """``StaticKVCache.update``, returning views [B, Hkv, slots, D] (``cache_pos`` must lie below ``slots``)."""
        k_all, v_all = self.cache.update(layer, k_new, v_new, cache_pos)
        return k_all[:, :, :self.max_seq], v_all[:, :, :self.max_seq]
