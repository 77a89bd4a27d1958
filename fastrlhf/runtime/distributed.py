"""Data-parallel scale-out on PyTorch's own stack: torchrun (rendezvous), FSDP2 (``fully_shard``), c10d collectives.

Launched by torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) a stage calls :func:`init` once: it starts the
process group (NCCL on CUDA with ``cuda:LOCAL_RANK``, gloo on CPU) and every model is sharded with :func:`shard_model`
(one FSDP unit per decoder block, then the root). Not launched by torchrun, :func:`init` starts nothing and every helper
here is the identity (world size 1), so the stages run one code path.

Conventions the stages follow (see ``sft`` / ``reward`` / ``ppo``):
- batch sizes in the configs are per rank; a step consumes ``world × per-rank`` samples of one global order, rank r takes
  its slice (:func:`local_slice`), so N processes with batch b see the same samples as one process with batch N·b;
- a token-level loss divides by ``global_count / world`` (the kernels' ``normalizer``): FSDP averages gradients over
  ranks, so the result is Σ over all ranks' tokens / global count — the one-process loss of the global batch;
- metrics are reduced across ranks (:func:`reduce_metrics`) before rank 0 logs them;
- every rank runs the same number of forwards of a sharded model (FSDP all-gathers inside them): uneven shards are padded
  with weight-0 work (:func:`padded_shard`).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

TIMEOUT_ENV = "FASTRLHF_DIST_TIMEOUT_S"  # collective timeout (seconds): a rank stuck longer raises instead of hanging
_MESHES: dict = {}  # device type -> the 1-D DeviceMesh of all ranks (made once per process group)


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank / world size / local rank, its device, and whether torchrun launched it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launched: bool = False  # True under torchrun: models are FSDP-sharded (also with one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """torchrun (torch.distributed.run) sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address for each worker."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def init(device: str = "auto") -> DistEnv:
    """Start the process group when launched by torchrun and pick this rank's device; otherwise one plain process.

    device: "auto" (cuda:LOCAL_RANK when CUDA is present, else cpu), "cpu", or "cuda" (= cuda:LOCAL_RANK under torchrun).
    An explicit "cuda:N" under torchrun is an error (each rank owns the GPU of its LOCAL_RANK).
    """
    from fastrlhf.runtime.device import resolve_device
    if not launched_by_torchrun():
        return DistEnv(device=resolve_device(device))
    r, w, lr = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {device!r} under torchrun: use auto, cuda or cpu (rank r uses cuda:LOCAL_RANK)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda under torchrun, but CUDA is not available (use --device cpu: gloo backend)")
    dev = torch.device("cuda", lr) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
        kw = {"device_id": dev} if use_cuda else {}
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout, **kw)
    return DistEnv(rank=r, world_size=w, local_rank=lr, device=dev, launched=True)


def shutdown() -> None:
    """Leave the process group (end of a stage under torchrun); no-op otherwise."""
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _MESHES.clear()


# ------------------------------------------------------------------------------------------------------------ sharding

def shard_model(model: torch.nn.Module, env: DistEnv, *, bf16_compute: bool = False) -> torch.nn.Module:
    """FSDP2 under torchrun: ``fully_shard`` every decoder block, then the root (embeddings, final norm, head).

    bf16_compute: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): blocks all-gather bf16 copies of the fp32
    master shards and reduce gradients in fp32. Blocks reshard after forward (memory); the root keeps its parameters
    (embedding, LM head) until backward. ``hidden_states`` is registered as a forward method so the root's all-gather
    runs for it too (the LM head weight is then read by the fused log-prob kernel). Not launched: returns ``model``.
    """
    if not env.launched:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    try:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    except ImportError:
        FSDPModule = None
    if FSDPModule is None or not hasattr(FSDPModule, "set_reshard_after_forward"):
        raise RuntimeError(f"fastrlhf under torchrun needs FSDP2 with FSDPModule.set_reshard_after_forward "
                           f"(torch >= 2.7); this is torch {torch.__version__}")
    mesh = _MESHES.get(env.device.type)
    if mesh is None:  # one data-parallel mesh over all ranks, shared by every sharded model of the process
        mesh = _MESHES[env.device.type] = init_device_mesh(env.device.type, (env.world_size,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_compute
          else MixedPrecisionPolicy())
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    if hasattr(model, "hidden_states"):
        register_fsdp_forward_method(model, "hidden_states")
    return model


def load_full_state(model: torch.nn.Module, state: dict, *, strict: bool = False) -> None:
    """Load full (unsharded) tensors into ``model``: a sharded model takes them from rank 0 (``state`` may be empty on
    the other ranks), each rank keeping its shard; an unsharded one loads ``state`` directly."""
    if not is_sharded(model):
        model.load_state_dict(state, strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                strict=strict))


def _fsdp_module_type():
    """``FSDPModule`` (None where torch has no distributed support, e.g. some Windows / macOS builds)."""
    if not dist.is_available():
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return FSDPModule


def is_sharded(model: torch.nn.Module) -> bool:
    kind = _fsdp_module_type()
    return kind is not None and isinstance(model, kind)


def fsdp_units(model: torch.nn.Module) -> list:
    """The FSDP units of ``model`` (root last), [] for an unsharded model."""
    kind = _fsdp_module_type()
    units = [m for m in model.modules() if isinstance(m, kind)] if kind is not None else []
    return units[1:] + units[:1]


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """Gradient accumulation: skip FSDP's reduce-scatter on all but the last micro-batch (no-op when not sharded)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)


def local_tensor(x):
    """A replicated DTensor (e.g. the grad norm of sharded parameters) as a plain tensor; plain tensors unchanged."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def unsharded_bytes(model: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of all parameters when gathered (in ``dtype``, default their own): what a full unshard needs per rank."""
    return sum(p.numel() * (dtype or p.dtype).itemsize for p in model.parameters())  # DTensor.numel(): global size


class GenerationGather:
    """How a sharded policy is gathered for one rollout (``HybridEngine.gather_weights``).

    mode "full": every unit unshards once before the prefill and stays unsharded through all decode steps (no collective
        per step; ranks may stop decoding at different steps); resharded and freed at the end. Needs the full model in
        the compute dtype on every rank (``unsharded_bytes``) on top of the sharded state and the KV cache.
    mode "per_block": only the root (embeddings, LM head) unshards for the rollout; each block all-gathers in its own
        forward and frees after, so the extra memory is one block. Every decode step is then a collective: the ranks
        agree on "all rows done" (``all_done``) so they run the same number of steps.
    mode "auto": decided at the start of each rollout (the KV cache and optimizer state are allocated by then): "full"
        when the gathered model fits in 90 % of the free CUDA memory (free + cached-but-unused) on every rank, else
        "per_block"; always "full" on CPU. All ranks take the same decision (one all-reduce): a rank decoding per block
        runs collectives the others would not.
    ``mode`` is the mode of the current (or last) rollout; "local" for an unsharded model (nothing to gather).
    """

    def __init__(self, model: torch.nn.Module, mode: str = "auto", compute_dtype: torch.dtype | None = None):
        if mode not in ("auto", "full", "per_block"):
            raise ValueError(f"generation gather mode {mode!r}: expected auto, full or per_block")
        self.model, self.units = model, fsdp_units(model)
        self.compute_dtype = compute_dtype
        self.requested = mode
        self.mode = ("full" if mode == "auto" else mode) if self.units else "local"

    def _fits(self) -> bool:
        """Whether the gathered model fits on this rank now (CPU: always)."""
        dev = next(self.model.parameters()).device
        if dev.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(dev)
        free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)  # cached by PyTorch, reusable
        return unsharded_bytes(self.model, self.compute_dtype) < 0.9 * free

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if not self.units:
            yield
            return
        if self.requested == "auto":
            self.mode = "full" if not any_rank(not self._fits()) else "per_block"
        blocks, root = self.units[:-1], self.units[-1]
        gathered = self.units if self.mode == "full" else [root]
        for u in gathered:
            u.set_reshard_after_forward(False, recurse=False)
        for u in gathered:
            u.unshard()
        try:
            yield
        finally:
            for u in gathered:
                u.reshard()
            for u in blocks:
                if u in gathered:
                    u.set_reshard_after_forward(True, recurse=False)

    def all_done(self, done: torch.Tensor) -> bool:
        """Whether every row of every rank is finished (per_block mode: one all-reduce; otherwise the local flag)."""
        if self.mode != "per_block":
            return bool(done.all())
        flag = done.all().to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())


# ------------------------------------------------------------------------------------------------------------ data

def local_slice(global_items: Sequence, env_or_rank: Any = None, world: int | None = None) -> list:
    """Rank r's contiguous slice of a global batch of ``world × b`` items: items[r·b : (r+1)·b] (1 process: all)."""
    r, w = (rank(), world_size()) if env_or_rank is None else (
        (env_or_rank.rank, env_or_rank.world_size) if isinstance(env_or_rank, DistEnv) else (int(env_or_rank), int(world)))
    n = len(global_items)
    lo, hi = (n * r) // w, (n * (r + 1)) // w
    return list(global_items[lo:hi])


def padded_shard(items: Sequence, env: DistEnv | None = None) -> list[tuple[Any, float]]:
    """Rank r's share items[r::world] as (item, weight) pairs, padded with (items[0], 0.0) so that every rank gets
    ceil(n / world) entries: sharded models need the same number of forwards on every rank."""
    r, w = (env.rank, env.world_size) if env is not None else (rank(), world_size())
    mine = [(x, 1.0) for x in items[r::w]]
    need = -(-len(items) // w)
    return mine + [(items[0], 0.0)] * (need - len(mine)) if items else []


# ------------------------------------------------------------------------------------------------------------ reduce

def all_reduce_sum(x: torch.Tensor | float) -> torch.Tensor | float:
    """Σ over ranks (a tensor is reduced in place and returned; a float comes back as a float)."""
    if not is_initialized():
        return x
    t = x if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64)
    t_dev = t.to(_comm_device()) if t.device != _comm_device() else t
    dist.all_reduce(t_dev, op=dist.ReduceOp.SUM)
    if torch.is_tensor(x):
        if t_dev is not x:
            x.copy_(t_dev)
        return x
    return float(t_dev)


def global_count(n: torch.Tensor | float) -> float:
    """Σ over ranks of a count (e.g. valid tokens) as a float: the global token-mean denominator."""
    return float(all_reduce_sum(torch.as_tensor(n, dtype=torch.float64).clone().reshape(())))


def reduce_metrics(metrics: dict[str, float], *, sum_keys: Sequence[str] = (), max_keys: Sequence[str] = ()) -> dict:
    """Float metrics of all ranks reduced together: the mean over ranks, except ``sum_keys`` (e.g. tokens/s) summed
    and ``max_keys`` (e.g. peak memory) maxed. Ints (step, epoch: the same on every rank) and other entries are kept."""
    if not is_initialized():
        return dict(metrics)
    keys = [k for k, v in metrics.items() if isinstance(v, float)]
    w = world_size()
    vals = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    mx = torch.tensor([float(metrics[k]) if k in max_keys else 0.0 for k in keys], dtype=torch.float64)
    both = torch.cat([vals, mx]).to(_comm_device())
    total = both.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    out = dict(metrics)
    for i, k in enumerate(keys):
        if k in max_keys:
            out[k] = float(both[len(keys) + i])
        elif k in sum_keys:
            out[k] = float(total[i])
        else:
            out[k] = float(total[i]) / w
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any (e.g. a Ctrl-C seen by one rank: all save, then all stop)."""
    if not is_initialized():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (e.g. the temporary folder name of a checkpoint)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    """The device collectives of this group run on (NCCL: the current CUDA device; gloo: cpu)."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only (flushed): one console line per job, not one per rank."""
    if rank() == 0:
        print(*args, **{"flush": True, **kwargs})
