"""Hybrid engine: one model that trains and generates, switching modes without copying weights.

Notation: B batch (prompts), b = batch bucket (B rounded up; b = B without CUDA graphs), P prompt length (left-padded),
G new tokens, S KV-cache slots (≥ P + G), V vocabulary, H hidden size.

    engine = HybridEngine(policy)                      # wraps the model; never copies its weights
    with engine.generation(max_batch_size=64, max_seq_len=384):
        rollout = engine.generate(prompts, max_new_tokens=256, temperature=1.0, eos_token_id=eos, seed=0)
    ... train on rollout (the optimizer updates the same parameters in place) ...

``generation()`` switches to inference (eval mode, no_grad, no gradient checkpointing) over a static KV cache;
``generate()`` prefills once and decodes one token per step on static buffers (on CUDA one captured graph per batch
bucket), all under ``torch.inference_mode``, compacts the live rows into smaller buckets as rows finish, and returns a
``Rollout`` made outside inference mode. The full design (graph reuse and memory pool, low-precision weight copies,
compaction, the used-slot window, sharded models) is in docs/engine.md.
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from fastrlhf.engine.sampling import SamplingParams, sample
from fastrlhf.kernels import onednn_linear
from fastrlhf.kernels.head import compute_dtype, head_logits

MEMORY_POLICIES = ("keep", "free")
WINDOW_ROUND = 32  # eager decode attention reads the first ceil((slot + 1) / 32) * 32 cache slots


def _plain_linear(m: torch.nn.Module) -> bool:
    """An ``nn.Linear`` computing exactly x·Wᵀ + b: the class itself, or a subclass that says so (``plain_linear``,
    e.g. ``fastrlhf.models.linear.Linear``, which only picks another GEMM library)."""
    return type(m) is torch.nn.Linear or (isinstance(m, torch.nn.Linear) and getattr(type(m), "plain_linear", False))


@dataclass
class Rollout:
    """One batch of generations (all tensors on the model's device).

    prompt_ids    [B, P] int64, left-padded with the pad id
    prompt_mask   [B, P] int64, 1 = real token
    response_ids  [B, G] int64, padded after EOS with the pad id (the EOS itself is kept and is a valid token)
    response_mask [B, G] int64, 1 = generated token up to and including EOS
    logprobs      [B, G] fp32 log-probs of the sampled tokens under the sampling distribution (0 where masked), from
                  fp32 logits of the training head's operands (``fastrlhf.kernels.head.head_logits``)
    lengths       [B] int64, number of valid response tokens
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    logprobs: Tensor
    lengths: Tensor

    def sequences(self) -> tuple[Tensor, Tensor]:
        """(input_ids [B, P+G], attention_mask [B, P+G]): prompt then response, for a teacher-forced forward."""
        return (torch.cat([self.prompt_ids, self.response_ids], dim=1),
                torch.cat([self.prompt_mask, self.response_mask], dim=1))


class _Buffers:
    """Static per-bucket decode state (b rows, S slots); the decode step reads and writes only these.

    tokens  [b, S] int64  token at each cache slot (prompt, then generated tokens at slots P, P+1, ...)
    logp    [b, S] fp32   log-prob of the generated token at each slot
    mask    [b, S] int64  1 = slot holds a valid key
    uniform [b, S] fp32   random number used to sample the token *after* each slot
    pos     [b, 1] int64  position id of the token being fed
    cache_pos [1] int64   slot of the token being fed
    done    [b] bool      row has emitted EOS (or is a padding row of the bucket)
    """

    def __init__(self, b: int, S: int, device):
        self.b, self.S = b, S
        self.tokens = torch.zeros(b, S, dtype=torch.long, device=device)
        self.logp = torch.zeros(b, S, dtype=torch.float32, device=device)
        self.mask = torch.zeros(b, S, dtype=torch.long, device=device)
        self.uniform = torch.zeros(b, S, dtype=torch.float32, device=device)
        self.pos = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.cache_pos = torch.zeros(1, dtype=torch.long, device=device)
        self.done = torch.ones(b, dtype=torch.bool, device=device)

    def mutable(self) -> list[Tensor]:
        return [self.tokens, self.logp, self.mask, self.pos, self.cache_pos, self.done]


class _Live:
    """The rows still decoding in one ``generate`` call: bucket buffers ``buf`` (b rows, the first n real), their
    decode step, and ``rows`` [n] (host) = the original row of each; finished rows' results kept in original order."""

    def __init__(self, B: int, b: int, buf: "_Buffers", key, step):
        self.B, self.b, self.n, self.buf, self.key, self.step = B, b, B, buf, key, step
        self.rows = torch.arange(B)
        self.tokens = self.logp = None  # [B, S] results in original row order, made at the first move

    def save(self) -> None:
        """Copy the current rows' tokens / log-probs to the original order."""
        if self.tokens is None:
            self.tokens = torch.full_like(self.buf.tokens[:self.B], self.key.pad)
            self.logp = torch.zeros_like(self.buf.logp[:self.B])
        r = self.rows.to(self.buf.tokens.device)
        self.tokens.index_copy_(0, r, self.buf.tokens[:self.n])
        self.logp.index_copy_(0, r, self.buf.logp[:self.n])

    def move(self, buf: "_Buffers", key, step, keep: Tensor) -> None:
        self.rows = self.rows[keep.cpu()]
        self.buf, self.key, self.step, self.b, self.n = buf, key, step, buf.b, int(keep.shape[0])

    def results(self, slots: int) -> tuple[Tensor, Tensor]:
        """(tokens, log-probs) [B, slots] in the original row order."""
        if self.tokens is None:
            return self.buf.tokens[:self.B, :slots], self.buf.logp[:self.B, :slots]
        self.save()
        return self.tokens[:, :slots], self.logp[:, :slots]


@dataclass(frozen=True)
class _StepKey:
    """What a captured decode step bakes in as constants."""
    bucket: int
    params: SamplingParams
    eos: tuple[int, ...]
    pad: int


class HybridEngine:
    """Switches ONE model between training and fast generation (static KV cache, CUDA-graph decode step).

    model: a ``fastrlhf.models.decoder.CausalLM`` (anything with ``.config``, ``hidden_states(ids, **kv_kw)``, ``lm_head``).
    memory_policy: "keep" (the KV cache, buffers and graphs survive the end of ``generation()``; the next rollout starts
        at once) or "free" (released on exit so training gets the memory back; the next ``generation()`` re-allocates and
        re-captures).
    cuda_graphs: "auto" (on for a CUDA model), True (required; raises on CPU) or False.
    batch_buckets: sorted batch sizes to capture graphs for; a batch of B runs in the smallest bucket ≥ B (extra rows are
        idle). None = powers of two. Only used with CUDA graphs (eager decoding runs exactly B rows).
    compute_dtype: run generation under ``torch.autocast`` in this dtype (e.g. bf16 over fp32 master weights); None = the
        parameters' dtype, no autocast.
    compile_step: when the decode step runs eagerly (CPU, or cuda_graphs off), run it through ``torch.compile`` (fused
        kernels, far less per-op overhead; costs a one-off compile of tens of seconds per (batch, sampling params),
        counted in ``stats["compile_s"]``). Off by default.
    check_every: decode steps between looks at the "done" flags (each look is one host sync).
    compact: at those looks, move the live rows into a smaller batch bucket once they fit one (CUDA graphs: the graph
        buckets; eager: powers of two), and (eager) let attention read only the written cache slots. Same rollouts as
        ``compact=False`` (same per-row random numbers; up to float rounding of the smaller batches). Not with
        ``compile_step`` (each batch / slot shape would recompile) nor a ``weight_gather``.
    weight_gather: how a sharded model is gathered for one rollout (see the module docstring); None or mode "local" =
        the weights are local.
    onednn: eager CPU decoding with fp32 weights: pack every ``nn.Linear`` weight (and the head) once per ``generate``
        call into oneDNN's blocked layout and run the prefill and decode GEMMs through it
        (``fastrlhf.kernels.onednn_linear``; same product, another fp32 summation order). "auto" (default): when the
        torch build has oneDNN and the model runs eagerly on CPU in fp32 without ``compile_step`` or a
        ``weight_gather``; True: required (raises where it can't be used); False: ``F.linear``.
    """

    def __init__(self, model, *, memory_policy: str = "keep", cuda_graphs="auto", batch_buckets=None,
                 compute_dtype: torch.dtype | None = None, compile_step: bool = False, check_every: int = 8,
                 weight_gather=None, compact: bool = True, onednn="auto"):
        if memory_policy not in MEMORY_POLICIES:
            raise ValueError(f"HybridEngine(memory_policy={memory_policy!r}): expected one of {MEMORY_POLICIES}")
        if cuda_graphs not in ("auto", True, False):
            raise ValueError(f"HybridEngine(cuda_graphs={cuda_graphs!r}): expected 'auto', True or False")
        for name in ("config", "hidden_states", "lm_head"):
            if not hasattr(model, name):
                raise TypeError(f"HybridEngine(model): expected a fastrlhf.models.decoder.CausalLM (missing .{name}), "
                                f"got {type(model).__name__}")
        if batch_buckets is not None:
            batch_buckets = sorted(int(x) for x in batch_buckets)
            if not batch_buckets or batch_buckets[0] < 1:
                raise ValueError(f"HybridEngine(batch_buckets={batch_buckets!r}): expected positive batch sizes")
        if int(check_every) < 1:
            raise ValueError(f"HybridEngine(check_every={check_every}): must be >= 1")
        if onednn not in ("auto", True, False):
            raise ValueError(f"HybridEngine(onednn={onednn!r}): expected 'auto', True or False")
        self.model = model
        self.memory_policy = memory_policy
        self.batch_buckets = batch_buckets
        self.compute_dtype = compute_dtype
        self.check_every = int(check_every)
        p = next(model.parameters())
        self.device = p.device
        if cuda_graphs is True and self.device.type != "cuda":
            raise ValueError(f"HybridEngine(cuda_graphs=True): the model is on {self.device}; CUDA graphs need CUDA")
        self.use_graphs = self.device.type == "cuda" and torch.cuda.is_available() and cuda_graphs is not False
        self._graphs_required = cuda_graphs is True
        self.weight_gather = weight_gather if weight_gather is not None and weight_gather.mode != "local" else None
        if self.weight_gather is not None:
            self.use_graphs = False  # eager decoding is correct in every gather mode
        self.cache = None  # StaticKVCache
        self._buffers: dict[int, _Buffers] = {}
        self._graphs: dict[_StepKey, torch.cuda.CUDAGraph] = {}
        self._active = False
        self.compile_step = bool(compile_step)
        self.compact = bool(compact)
        self._slots: int | None = None  # eager decode: the cache window the next step reads (None = every slot)
        self._compiled = None  # torch.compile(self._step), made on first use
        self._compiled_keys: set = set()
        self.stats = {"capture_s": 0.0, "captures": 0, "cache_allocs": 0, "compile_s": 0.0, "compactions": 0,
                      "row_steps": 0, "pack_s": 0.0}  # row_steps: decode steps × bucket rows run (what compaction saves)
        self._pool = None  # the CUDA graphs' shared memory pool (torch.cuda.graph_pool_handle), made at first capture
        # compute_dtype copies of the nn.Linear weights: {module: copy} (see the module docstring); None = not used
        self._lowp: dict | None = {} if (self.weight_gather is None and compute_dtype is not None
                                          and compute_dtype != next(model.parameters()).dtype) else None
        why_not = (None if self.device.type == "cpu" else f"the model is on {self.device}",
                   None if onednn_linear.available() else "this torch build has no oneDNN",
                   None if p.dtype == torch.float32 and compute_dtype in (None, torch.float32)
                   else "it packs fp32 weights only (compute_dtype / weights are not fp32)",
                   None if not self.compile_step else "compile_step is on",
                   None if self.weight_gather is None else "the weights are gathered per rollout (weight_gather)")
        why_not = next((w for w in why_not if w is not None), None)
        if onednn is True and why_not is not None:
            raise ValueError(f"HybridEngine(onednn=True): can't pack the weights for oneDNN: {why_not}")
        self.use_onednn = onednn is not False and why_not is None
        self._head_packed: Tensor | None = None  # the packed head weight inside _packed_weights(), else None

    # ------------------------------------------------------------------------------------------------ mode switching
    @contextlib.contextmanager
    def gather_weights(self):
        """The full parameters for one rollout (``weight_gather``), then reshard; a no-op when the weights are local.
        ``generate`` enters it once per call, around the prefill and every decode step."""
        if self.weight_gather is None:
            yield
            return
        with self.weight_gather():
            yield

    def all_done(self, done: Tensor) -> bool:
        """Whether decoding can stop: every row of ``done`` [B] is finished (one host sync). With a ``weight_gather``
        whose decode step is a collective, all ranks agree (its ``all_done``)."""
        if self.weight_gather is not None:
            return self.weight_gather.all_done(done)
        return bool(done.all())

    @contextlib.contextmanager
    def generation(self, *, max_batch_size: int | None = None, max_seq_len: int | None = None):
        """Inference mode for the block: eval, no autograd, no gradient checkpointing, KV cache ready.

        max_batch_size / max_seq_len: size the KV cache now (prompt + new tokens); None = size it at the first
        ``generate`` call. On exit (also on an exception) the train/eval flag of every module and the gradient
        checkpointing setting are restored and the cache is kept or freed per ``memory_policy``.
        """
        if self._active:
            raise RuntimeError("HybridEngine.generation(): already inside a generation() block (nesting is not allowed)")
        modes = [(m, m.training) for m in self.model.modules()]
        ckpt_cfgs = self._ckpt_configs()
        ckpt = [(c, c.gradient_checkpointing) for c in ckpt_cfgs]
        self._active = True
        try:
            self.model.eval()
            for c in ckpt_cfgs:
                c.gradient_checkpointing = False
            with torch.no_grad():
                if max_batch_size is not None or max_seq_len is not None:
                    if max_batch_size is None or max_seq_len is None:
                        raise ValueError("HybridEngine.generation(): give both max_batch_size and max_seq_len (or neither)")
                    self._ensure_cache(self._bucket(int(max_batch_size)), int(max_seq_len))
                yield self
        finally:
            for m, flag in modes:
                m.training = flag
            for c, flag in ckpt:
                c.gradient_checkpointing = flag
            if self.memory_policy == "free":
                self.free()
            self._active = False

    def free(self) -> None:
        """Release the KV cache, the decode buffers, the captured graphs (and their memory pool) and the weight copies."""
        self._graphs.clear()
        self._buffers.clear()
        self.cache = None
        self._pool = None
        if self._lowp:
            self._lowp.clear()

    def _ckpt_configs(self):
        cfgs = []
        for mod in (self.model, getattr(self.model, "model", None)):
            c = getattr(mod, "config", None)
            if c is not None and hasattr(c, "gradient_checkpointing") and all(c is not x for x in cfgs):
                cfgs.append(c)
        return cfgs

    # ------------------------------------------------------------------------------------------------ cache / buffers
    def _bucket(self, B: int) -> int:
        if not self.use_graphs:
            return B
        buckets = self.batch_buckets or [1 << i for i in range(20)]
        return next((x for x in buckets if x >= B), B)

    def _ensure_cache(self, b: int, S: int) -> None:
        """A cache with room for b rows × S slots: reuse the current one if it fits, else allocate a bigger one."""
        if self.cache is not None and self.cache.fits(b, S):
            return
        if self.cache is not None:  # grow: keep the larger of old and new in each dim (sizes only go up)
            b, S = max(b, self.cache.max_batch), max(S, self.cache.max_seq)
        self.free()  # graphs and buffers point into the old cache
        self.cache = None
        dtype = self.compute_dtype or next(self.model.parameters()).dtype
        self.cache = self.model.new_kv_cache(b, S, dtype=dtype, device=self.device)
        self.cache.left_padded = True  # prompts left-padded, then every step's slot valid in every row: no holes
        self.stats["cache_allocs"] += 1

    def _get_buffers(self, b: int) -> _Buffers:
        buf = self._buffers.get(b)
        if buf is None:
            buf = self._buffers[b] = _Buffers(b, self.cache.max_seq, self.device)
        return buf

    def _device_ctx(self):
        """Make the model's GPU the current device for the block (Triton launches and graph capture use the current one)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    @contextlib.contextmanager
    def _lowp_weights(self):
        """Inside: every ``nn.Linear`` reads its ``compute_dtype`` copy, refreshed now from the parameter in place."""
        if self._lowp is None:
            yield
            return
        linears = [m for m in self.model.modules() if isinstance(m, torch.nn.Linear)]
        swapped = []
        try:
            for m in linears:
                w = m._parameters["weight"]
                copy = self._lowp.get(m)
                if copy is None or copy.shape != w.shape or copy.device != w.device:
                    copy = self._lowp[m] = torch.nn.Parameter(torch.empty(w.shape, dtype=self.compute_dtype,
                                                                          device=w.device), requires_grad=False)
                copy.data.copy_(w.detach())  # in place: the addresses a captured graph reads stay the same
                m._parameters["weight"] = copy
                swapped.append((m, w))
            yield
        finally:
            for m, w in swapped:
                m._parameters["weight"] = w

    @contextlib.contextmanager
    def _packed_weights(self, rows: int):
        """Inside (``use_onednn``): every plain ``nn.Linear`` with an fp32 CPU weight computes through a oneDNN-packed
        copy of it, made now (the weights change between rollouts, never inside one), and ``_sample_head`` reads the
        packed head. Modules whose class or instance defines its own forward, or whose weight is not fp32 on CPU, are
        left alone; the copies are dropped on exit."""
        if not self.use_onednn:
            yield
            return

        def packable(w: Tensor) -> bool:
            return w.dtype == torch.float32 and w.device.type == "cpu" and w.dim() == 2

        t0 = time.perf_counter()
        swapped = []
        try:
            head = self.model.lm_head
            for m in self.model.modules():  # the head is not called as a module here: _sample_head reads its weight
                if m is head or not _plain_linear(m) or "forward" in m.__dict__ or not packable(m.weight):
                    continue
                packed = onednn_linear.pack(m.weight, rows)
                m.forward = functools.partial(onednn_linear.linear, packed=packed, bias=m.bias)
                swapped.append(m)
            self._head_packed = onednn_linear.pack(head.weight, rows) if packable(head.weight) else None
            self.stats["pack_s"] += time.perf_counter() - t0
            yield
        finally:
            self._head_packed = None
            for m in swapped:
                del m.forward

    def _autocast(self):
        p = next(self.model.parameters())
        if self.compute_dtype is None or self.compute_dtype == p.dtype:
            return contextlib.nullcontext()
        # no autocast weight-cast cache: cached casts made during a CUDA-graph capture would be freed after it
        return torch.autocast(self.device.type, dtype=self.compute_dtype, cache_enabled=False)

    # ------------------------------------------------------------------------------------------------ generation
    def generate(self, prompts, *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id=None, pad_token_id: int | None = None, seed: int | None = None,
                 attention_mask: Tensor | None = None) -> Rollout:
        """Sample up to ``max_new_tokens`` tokens per prompt.

        prompts: list of token-id lists (any lengths ≥ 1; left-padded here) or a LongTensor [B, P] with
            ``attention_mask`` [B, P] (1 = real token; padding must be on the left; None = no padding).
        temperature: 0 = greedy; top_k: 0 = off; top_p: 1.0 = off (applied in this order, as transformers does).
        eos_token_id: int or list of ints; a row stops after emitting one (None = no EOS stopping).
        pad_token_id: fills prompt padding and responses after EOS; None = config.pad_token_id, else the (first) EOS, else 0.
        seed: seeds this call's torch.Generator (same seed, same prompts, same model → same samples); None = draws the
            seed from torch's global RNG.
        Returns a ``Rollout`` whose G is the longest response (≤ max_new_tokens).
        """
        if not self._active:
            raise RuntimeError("HybridEngine.generate(): call it inside `with engine.generation(...):` "
                               "(the model must be switched to inference first)")
        if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
            raise ValueError(f"HybridEngine.generate(max_new_tokens={max_new_tokens!r}): expected an int >= 1")
        params = SamplingParams(float(temperature), int(top_k), float(top_p))
        eos = _as_eos(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else self.model.config.pad_token_id
        if pad is None:
            pad = eos[0] if eos else 0
        V = self.model.config.vocab_size
        for name, t in [("pad_token_id", pad)] + [("eos_token_id", e) for e in eos]:
            if not 0 <= t < V:
                raise ValueError(f"HybridEngine.generate({name}={t}): outside the vocabulary [0, {V})")
        ids, mask = self._pad_prompts(prompts, attention_mask, pad)  # [B, P]
        B, P = ids.shape
        G = max_new_tokens
        b = self._bucket(B)
        self._ensure_cache(b, P + G)
        buf = self._get_buffers(b)
        key = _StepKey(b, params, eos, int(pad))
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        eos_t = torch.tensor(eos or [-1], device=self.device)
        compact = self.compact and not self.compile_step and self.weight_gather is None
        window = compact and not self.use_graphs
        with (self._grad_off(), self._device_ctx(), self.gather_weights(), self._autocast(), self._lowp_weights(),
              self._packed_weights(b)):
            step = self._decode_fn(key) if G > 1 else None
            # 1. reset the decode state: prompt at slots 0..P−1, idle bucket rows done from the start
            buf.tokens.fill_(pad)
            buf.tokens[:B, :P] = ids
            buf.logp.zero_()
            buf.mask.zero_()
            buf.mask[:B, :P] = mask
            buf.done.fill_(True)
            if not params.greedy:  # uniform for the token after slot P−1+i, i = 0..G−1 (drawn in [B, G] order)
                buf.uniform[:B, P - 1:P - 1 + G] = torch.rand(B, G, generator=gen, device=self.device)
            # 2. prefill: one forward over the distinct prompts (GRPO's n samples of a prompt share it: its K/V rows are
            #    copied to every row that repeats it), then sample the first new token (slot P) for every row
            pos = (mask.cumsum(-1) - 1).clamp_(min=0)  # [B, P] position ids under left padding
            first, group = distinct_rows(ids, mask)  # [U] a row of each distinct prompt, [B] each row's prompt
            am = buf.mask[:, :P] if window else buf.mask
            h = self.model.hidden_states(ids if first is None else ids[first],
                                         position_ids=pos if first is None else pos[first],
                                         attention_mask=am[:B] if first is None else am[first],
                                         kv_cache=self.cache.window(P) if window else self.cache,
                                         cache_pos=torch.arange(P, device=self.device))[:, -1]  # [U, H]
            if first is not None:
                self.cache.keep_rows(group, P)  # row b's prompt K/V from prefill row group[b]
                h = h.index_select(0, group)  # [B, H]
            tok, lp = self._sample_head(h, params, buf.uniform[:B, P - 1] if not params.greedy else None)
            buf.tokens[:B, P] = tok
            buf.logp[:B, P] = lp
            buf.done[:B] = (tok[:, None] == eos_t).any(-1)
            buf.pos[:B, 0] = pos[:, -1] + 1
            buf.pos[B:, 0] = 0
            buf.cache_pos.fill_(P)
            # 3. decode G−1 more tokens, one per step (each reads slot P+i−1 and writes the token at slot P+i)
            n = 1
            live = _Live(B, b, buf, key, step)  # the bucket decoding now, and its rows' original order
            try:
                while n < G:
                    if window:  # the fed token sits at slot P+n−1: read the slots up to it, rounded up
                        self._slots = min(self.cache.max_seq, -(-(P + n) // WINDOW_ROUND) * WINDOW_ROUND)
                    live.step()
                    self.stats["row_steps"] += live.b
                    n += 1
                    if n % self.check_every == 0:
                        if not compact:
                            if self.all_done(live.buf.done):
                                break
                            continue
                        done = live.buf.done[:live.n].cpu()  # the check's one sync
                        if bool(done.all()):
                            break
                        self._maybe_compact(live, (~done).nonzero().flatten(), P + n)
            finally:
                self._slots = None
            tokens, logp = live.results(P + n)
        # 4. the rollout: fresh tensors (the buffers are reused by the next call), rows in their original order, made
        #    outside inference mode (so the training forwards may save them for backward)
        resp = tokens[:, P:P + n]
        is_eos = (resp[..., None] == eos_t).any(-1)
        valid = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # no EOS strictly before this token
        lengths = valid.sum(-1)
        g = int(lengths.max()) if n > 0 else 0
        valid = valid[:, :g]
        return Rollout(
            prompt_ids=ids.clone(), prompt_mask=mask.clone(),
            response_ids=resp[:, :g].masked_fill(~valid, pad),
            response_mask=valid.long(),
            logprobs=logp[:, P:P + g].masked_fill(~valid, 0.0),
            lengths=lengths,
        )

    def _grad_off(self):
        """The decode's autograd switch: ``torch.inference_mode`` (no version counters or view tracking: about 1 µs less
        per op, some 300 ops per eager decode step), or ``no_grad`` with a ``weight_gather`` (its gathered parameters
        must stay usable by training)."""
        return torch.no_grad() if self.weight_gather is not None else torch.inference_mode()

    def _compact_bucket(self, n: int) -> int:
        """The bucket for n live rows: the graph buckets with CUDA graphs, else the next power of two."""
        return self._bucket(n) if self.use_graphs else 1 << (n - 1).bit_length()

    def _maybe_compact(self, live: "_Live", keep: Tensor, slots: int) -> None:
        """Move the live rows ``keep`` [n] (rows of the current bucket, ascending) into a smaller bucket when they fit
        one: KV-cache rows (slots ``:slots``, the ones written so far) and decode state gathered into rows 0..n−1 of
        that bucket's static buffers, its idle rows reset as at the start of a rollout. No-op otherwise."""
        n = int(keep.shape[0])
        nb = self._compact_bucket(n)
        if nb >= live.b:
            return
        live.save()  # every row's tokens / log-probs so far, to the original order
        old, dev = live.buf, self.device
        new = self._get_buffers(nb)
        idx = keep.to(dev)
        self.cache.keep_rows(idx, slots)
        for name in ("tokens", "logp", "mask", "uniform", "pos"):
            src, dst = getattr(old, name), getattr(new, name)
            dst[:n] = src.index_select(0, idx)
            if nb > n:
                dst[n:] = 0
        new.tokens[n:] = live.key.pad
        new.cache_pos.copy_(old.cache_pos)
        new.done[:n] = False
        new.done[n:] = True
        key = _StepKey(nb, live.key.params, live.key.eos, live.key.pad)
        live.move(new, key, self._decode_fn(key), keep)
        self.stats["compactions"] += 1

    def _pad_prompts(self, prompts, attention_mask, pad: int) -> tuple[Tensor, Tensor]:
        """-> (ids [B, P] int64 left-padded with ``pad``, mask [B, P] int64) on the model's device."""
        dev = self.device
        if isinstance(prompts, Tensor):
            if prompts.dim() != 2 or prompts.dtype not in (torch.int64, torch.int32) or prompts.shape[1] == 0:
                raise ValueError(f"HybridEngine.generate(prompts): a tensor must be int [B, P] with P >= 1, got "
                                 f"{prompts.dtype} {list(prompts.shape)}")
            ids = prompts.to(dev, torch.long)
            if attention_mask is None:
                mask = torch.ones_like(ids)
            else:
                if tuple(attention_mask.shape) != tuple(ids.shape):
                    raise ValueError(f"HybridEngine.generate(attention_mask): shape {list(attention_mask.shape)} != "
                                     f"prompts {list(ids.shape)}")
                mask = (attention_mask.to(dev) != 0).long()
                # left padding: once a row has a real token, every later slot is real (checked with one sync)
                if bool((mask[:, 1:] < mask[:, :-1]).any()) or bool((mask[:, -1] == 0).any()):
                    raise ValueError("HybridEngine.generate(attention_mask): prompts must be left-padded and non-empty "
                                     "(each row: zeros, then ones up to the last column)")
            ids = ids.masked_fill(mask == 0, pad)
        else:
            if attention_mask is not None:
                raise ValueError("HybridEngine.generate(attention_mask): only with a tensor of prompts; lists are "
                                 "padded here")
            prompts = [list(p) for p in prompts]
            if not prompts or any(len(p) == 0 for p in prompts):
                raise ValueError("HybridEngine.generate(prompts): expected a non-empty list of non-empty token lists")
            P = max(len(p) for p in prompts)
            ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts], dtype=torch.long)
            mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
            ids, mask = ids.to(dev), mask.to(dev)
        V = self.model.config.vocab_size
        if ids.device.type == "cpu" and (ids.min() < 0 or ids.max() >= V):
            raise ValueError(f"HybridEngine.generate(prompts): token ids must be in [0, {V})")
        return ids, mask

    # ------------------------------------------------------------------------------------------------ decode step
    def _sample_head(self, h: Tensor, params: SamplingParams, u: Tensor | None):
        """(tokens [b], log-probs [b] fp32) from the last hidden states h [b, H], with the training head's numerics
        (``fastrlhf.kernels.head``): the sampler reads fp32 logits of the compute-dtype operands (never bf16-rounded
        logits), one pass over the head per step; the token's log-prob z_y − LSE(z) comes from the max and Σexp the
        sampler already has. It differs from the fused ``head_logprobs`` that PPO's forwards use only by the order of
        the fp32 sums (~1e-7), far below what the KV-cache path of the hidden states leaves (docs/numerics.md)."""
        if self._head_packed is not None:  # fp32 weights on CPU: the same fp32 product through oneDNN
            return sample(onednn_linear.linear(h, self._head_packed), params, u)
        w = self.model.lm_head.weight
        w = w.to(compute_dtype(w))  # cast once per step (fp32 masters -> bf16 under autocast); a no-op below
        return sample(head_logits(h, w), params, u)

    def _step(self, key: _StepKey, eos_t: Tensor) -> None:
        """One decode step on the static buffers of bucket ``key.bucket`` (graph-capturable: no host syncs, no
        allocation that outlives the step, only tensor-indexed reads/writes)."""
        buf = self._buffers[key.bucket]
        cp = buf.cache_pos  # [1] slot of the token being fed
        cur = buf.tokens.index_select(1, cp)  # [b, 1]
        buf.mask.index_fill_(1, cp, 1)  # its key becomes valid
        S = self._slots  # eager: attention reads the first S slots (every valid key lies below S); None = all
        h = self.model.hidden_states(cur, position_ids=buf.pos, attention_mask=buf.mask if S is None else buf.mask[:, :S],
                                     kv_cache=self.cache if S is None else self.cache.window(S),
                                     cache_pos=cp)  # [b, 1, H]
        u = None if key.params.greedy else buf.uniform.index_select(1, cp).squeeze(1)  # [b]
        tok, lp = self._sample_head(h[:, -1], key.params, u)
        tok = tok.masked_fill(buf.done, key.pad)  # finished rows emit pad with log-prob 0
        lp = lp.masked_fill(buf.done, 0.0)
        nxt = cp + 1
        buf.tokens.index_copy_(1, nxt, tok[:, None])
        buf.logp.index_copy_(1, nxt, lp[:, None])
        buf.done |= (tok[:, None] == eos_t).any(-1)
        buf.pos += 1
        buf.cache_pos += 1

    def _decode_fn(self, key: _StepKey):
        """The decode step for ``key``: a replay of its CUDA graph (captured on first use), or the eager step."""
        eos_t = torch.tensor(key.eos or [-1], device=self.device)
        if not self.use_graphs:
            if not self.compile_step:
                return lambda: self._step(key, eos_t)
            if self._compiled is None:
                self._compiled = torch.compile(self._step, dynamic=False)
            if key not in self._compiled_keys:  # time the first (compiling) call; it does one real step
                self._compiled_keys.add(key)
                first = [True]

                def timed_first():
                    if not first[0]:
                        return self._compiled(key, eos_t)
                    first[0] = False
                    t0 = time.perf_counter()
                    self._compiled(key, eos_t)
                    self.stats["compile_s"] += time.perf_counter() - t0
                return timed_first
            return lambda: self._compiled(key, eos_t)
        graph = self._graphs.get(key)
        if graph is None:
            try:
                graph = self._capture(key)
            except Exception as e:  # e.g. an op in the model that syncs with the host
                if self._graphs_required:
                    raise
                import warnings
                warnings.warn(f"HybridEngine: CUDA graph capture failed ({e!r}); decoding eagerly from now on",
                              RuntimeWarning)
                self.use_graphs = False  # this call runs the same step eagerly on the bucket's rows
                return lambda: self._step(key, eos_t)
            self._graphs[key] = graph
        return graph.replay

    def _capture(self, key: _StepKey):
        """Capture the decode step of ``key`` as a CUDA graph (warm-up on a side stream first).

        Called before the prefill of a rollout, or in its middle when compaction first reaches a bucket: the warm-up
        steps write K/V at slots 0, 1 (capture changes nothing); those cache slots and the buffers the warm-up changes
        are restored afterwards. The graph keeps its own eos tensor alive."""
        t0 = time.perf_counter()
        buf = self._buffers[key.bucket]
        eos_t = torch.tensor(key.eos or [-1], device=buf.tokens.device)
        saved = [t.clone() for t in buf.mutable()]
        # the warm-up writes K/V at slots 0, 1 of the bucket's rows: restored afterwards, so that a capture in the
        # middle of a rollout (a bucket first reached by compaction) leaves the live rows' cache as it was
        kv = [t[:key.bucket, :, :2] for t in self.cache.k + self.cache.v]
        saved += [t.clone() for t in kv]
        try:
            buf.cache_pos.zero_()
            buf.pos.zero_()
            buf.done.fill_(False)
            dev = self.device
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step(key, eos_t)
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            buf.cache_pos.zero_()
            with torch.cuda.graph(graph, pool=self._pool):
                self._step(key, eos_t)
            graph._fastrlhf_eos = eos_t  # keep the constant alive as long as the graph
        finally:
            with torch.no_grad():
                for t, v in zip(buf.mutable() + kv, saved):
                    t.copy_(v)
        torch.cuda.synchronize(self.device)
        self.stats["capture_s"] += time.perf_counter() - t0
        self.stats["captures"] += 1
        return graph


def distinct_rows(ids: Tensor, mask: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """Rows of prompts ids / mask [B, P] (padding ignored) that repeat another row: (first [U], group [B]) with
    ``first[g]`` the first row of the g-th distinct prompt and ``group[b]`` the prompt of row b; (None, None) when all
    B differ. One host sync. The engine's shared prefill and the packed forwards' shared prompts both group by it."""
    B = ids.shape[0]
    if B < 2:
        return None, None
    _, group = torch.unique(ids.masked_fill(mask == 0, -1), dim=0, return_inverse=True)  # [B] in 0..U−1
    U = int(group.max()) + 1
    if U == B:
        return None, None
    rows = torch.arange(B, device=ids.device)
    first = torch.full((U,), B, device=ids.device).scatter_reduce(0, group, rows, "amin")
    return first, group


def _as_eos(eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, int):
        return (eos_token_id,)
    try:
        out = tuple(int(e) for e in eos_token_id)
    except TypeError:
        raise ValueError(f"HybridEngine.generate(eos_token_id={eos_token_id!r}): expected an int, a list of ints "
                         f"or None") from None
    return out
