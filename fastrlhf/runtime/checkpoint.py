"""Checkpoints: atomic HF folders + trainer state, resume, and Ctrl-C -> "save then exit".

Layout of a run directory:
    run_dir/checkpoint-0000120/   config.json, model.safetensors, tokenizer files (an HF folder transformers can load;
                                  under FSDP the full weights are gathered from the shards and written by rank 0)
                                  state/           (trained weights + optimizer states, torch.distributed.checkpoint:
                                                    one file per rank, loadable at any other world size; --resume
                                                    reads this, each rank only its shards)
                                  trainer_state.pt (step, data position, RNG states; tensors/primitives only)
                                  run_config.yaml  (the stage config of the run)
                                  <name>/          (more HF folders, e.g. PPO's value_model)
A checkpoint is written into a hidden temporary folder in the same parent, fsynced, then renamed into place (os.replace is
atomic within one filesystem), so a crash mid-save leaves the previous checkpoints untouched. Older checkpoints are removed
only after the new one is complete: of the checkpoints older than the one just written, the ``keep - 1`` newest stay (a
later checkpoint left by an earlier, longer run is never touched). Weights load from safetensors only; the trainer state
loads with ``torch.load(weights_only=True)``; ``state/`` is read through ``safe_state`` (its pickled index and items admit
only the checkpoint's own types), so no pickled code runs from a checkpoint.

An output folder holds one run: ``prepare_run_dir`` refuses a used one unless the run resumes it or ``overwrite`` starts
it over, and removes the hidden temporary folders a killed save left behind.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fastrlhf.runtime import distributed

STATE_FILE = "trainer_state.pt"
STATE_DIR = "state"  # torch.distributed.checkpoint folder: trained weights + optimizer states, sharded
_NAME = re.compile(r"^checkpoint-(\d+)$")
# the hidden temporary folders of save_checkpoint (and of save_model inside it, one dot more)
_STALE = re.compile(r"^\.\.?checkpoint-\d+\.(tmp|old)-[0-9a-f]{8}(\.(tmp|old)-[0-9a-f]{8})?$")
_RUN_FILES = re.compile(r"^(metrics\.jsonl(\.tmp)?|(\w+_)?curves\.png|tensorboard)$")  # a run's files besides checkpoints


class CheckpointError(RuntimeError):
    """A missing or unreadable checkpoint; the message names the path."""


# ------------------------------------------------------------------------------------------------------------- RNG

def rng_state() -> dict:
    """Python, numpy (global) and torch (CPU + every CUDA device) RNG states as tensors/primitives."""
    py = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------------ save / load

def checkpoint_path(run_dir, step: int) -> Path:
    return Path(run_dir) / f"checkpoint-{step:07d}"


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not support fsync on directories
        pass
    finally:
        os.close(fd)


def full_state_dict(model) -> dict | None:
    """The full (unsharded) weights of ``model`` on the CPU: gathered from every rank for an FSDP-sharded model
    (a collective: all ranks call it; rank 0 gets the dict, the others None), ``model.state_dict()`` otherwise."""
    if distributed.is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if distributed.rank() == 0 else None
    return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}


def save_checkpoint(run_dir, step: int, *, model, tokenizer=None, trainer_state: dict | None = None,
                    config: Any = None, keep: int = 2, extra_files: dict[str, Callable[[Path], None]] | None = None,
                    extra_models: dict[str, Any] | None = None, trained: dict[str, tuple] | None = None,
                    export: Callable[[dict], dict] | None = None) -> Path:
    """Write ``run_dir/checkpoint-<step>`` atomically and return its path; keep the ``keep`` newest checkpoints (0 = all).

    Called by every rank (under torchrun the weights are gathered and the optimizer state is written by all ranks):
    - ``model`` and ``extra_models`` (name -> model, e.g. the value model): HF folders transformers loads, full weights
      gathered from the shards, written by rank 0 (``model`` at the top, the others in sub-folders ``name``);
    - ``trained`` (name -> (model, optimizer)): what resuming needs, the weights and the optimizer state, sharded as
      they are, with ``torch.distributed.checkpoint`` into ``state/`` (each rank writes its own shards; loadable at
      any other world size);
    - ``trainer_state``: a dict of tensors/primitives (use ``trainer_state_dict``); ``extra_files``: name -> writer(path)
      for more files (rank 0);
    - ``export``: rank 0 maps the gathered weights of ``model`` to those written (e.g. LoRA adapters merged into the
      base weights); it runs before the ``extra_files`` writers.
    Everything goes to a hidden temporary folder that is renamed into place once complete.
    """
    from fastrlhf.models.hf_io import save_model

    final = checkpoint_path(run_dir, step)
    states = {"": full_state_dict(model)}                          # collectives first, on every rank
    for name, m in (extra_models or {}).items():
        states[name] = full_state_dict(m)
    models = {"": model, **(extra_models or {})}
    tmp = Path(run_dir) / distributed.broadcast_object(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if distributed.rank() == 0:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            top = export(states[""]) if export is not None else states[""]
            save_model(model, tmp, tokenizer=tokenizer, state_dict=top)  # creates tmp/ (itself atomic)
            for name, sd in states.items():
                if name:
                    save_model(models[name], tmp / name, state_dict=sd)
        distributed.barrier()
        if trained:
            save_training_state(tmp / STATE_DIR, trained)
        if distributed.rank() == 0:
            if trainer_state is not None:
                torch.save(trainer_state, tmp / STATE_FILE)
            if config is not None:
                from fastrlhf.runtime.config import save_config
                save_config(config, tmp / "run_config.yaml")
            for name, writer in (extra_files or {}).items():
                writer(tmp / name)
            _fsync_tree(tmp)
            if final.exists():                                    # re-saving the same step: swap, then drop the old one
                old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(Path(run_dir))
    except BaseException:
        if distributed.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if distributed.rank() == 0 and keep > 0:
        older = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) < step]  # never this one or later ones
        for old in older[:len(older) - (keep - 1)]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()                                                   # every rank sees the finished checkpoint
    return final


def save_training_state(path: Path, trained: dict[str, tuple]) -> None:
    """name -> (model, optimizer): the model's weights and the optimizer's state, sharded as they are, with
    ``torch.distributed.checkpoint`` at ``path`` (every rank writes its own shards; a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    state = {name: {"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, opt)}
             for name, (m, opt) in trained.items()}
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=str(path))


@contextmanager
def _single_process_quiet():
    """DCP warns that it 'assumes a single process' when no process group is running: that is the intent here."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*assuming the intent is to (save|load) in a single process.*")
        yield


def has_training_state(checkpoint) -> bool:
    return (Path(checkpoint) / STATE_DIR / ".metadata").is_file()


def load_training_state(checkpoint, trained: dict[str, tuple], legacy: dict[str, dict | None] | None = None) -> None:
    """Restore name -> (model, optimizer) from ``checkpoint/state``: weights and optimizer state, written at any world
    size and resharded to this one (each rank reads only its shards). ``legacy``: name -> the plain
    ``optimizer.state_dict()`` an older fastrlhf kept in trainer_state.pt (one process, weights from the HF folder),
    used when the checkpoint has no ``state/`` folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    path = Path(checkpoint) / STATE_DIR
    if not has_training_state(checkpoint):
        legacy = legacy or {}
        if all(legacy.get(name) is not None for name in trained):
            for name, (_, opt) in trained.items():
                opt.load_state_dict(legacy[name])
            return
        raise CheckpointError(f"{path}: no training state (.metadata missing): not a complete fastrlhf checkpoint")
    from torch.distributed.checkpoint.api import CheckpointException

    from fastrlhf.runtime.safe_state import SafeLoadPlanner, SafeStateReader, StateRefused, read_metadata, refusal
    try:
        md = read_metadata(path)  # checked here first, so that a refusal is reported as it is (DCP wraps its errors)
    except (StateRefused, OSError) as e:
        raise CheckpointError(str(e) if isinstance(e, StateRefused) else f"{path}: cannot read .metadata ({e})") from None
    saved = set(md.state_dict_metadata)
    live, twins = {}, {}
    for name, (m, opt) in trained.items():
        twins[name] = _unfused_twin(path, name, m, opt, saved)
        live[name] = twins[name] or (m, opt)
    state = {name: {"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, opt)}
             for name, (m, opt) in live.items()}
    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=SafeStateReader(str(path)), planner=SafeLoadPlanner())
    except (Exception, CheckpointException) as e:  # CheckpointException derives from BaseException
        causes = [exc for exc, _ in e.failures.values()] if isinstance(e, CheckpointException) else [e]
        cause = causes[0] if causes else e
        why = str(cause) if isinstance(cause, StateRefused) else refusal(cause)
        raise CheckpointError(f"{path}: cannot load the training state: {why}") from None
    for name, (m, opt) in trained.items():
        if twins[name] is None:
            set_model_state_dict(m, state[name]["model"])
            set_optimizer_state_dict(m, opt, state[name]["optim"])
        else:
            _fuse_from_twin(m, opt, state[name])


def _unfused_twin(path: Path, name: str, model, opt, saved: set):
    """(twin model, twin optimizer) when the checkpoint holds ``name``'s model with HF's separate q/k/v and gate/up
    projections (written before the projections were fused) and ``model`` has them fused: a copy of ``model`` with
    those projections split, and an optimizer of the same kind and groups over it, to load the old state into.
    None when the checkpoint's names match ``model``'s (any other mismatch is DCP's to report)."""
    from fastrlhf.models.decoder import GATE_UP_PARTS, QKV_PARTS, part_names, unfuse_projections
    fused = [k for k in model.state_dict() if len(part_names(k)) > 1]
    if not fused or not all(f"{name}.model.{p}" in saved for p in part_names(fused[0])):
        return None
    if distributed.world_size() > 1:
        raise CheckpointError(f"{path}: written before fastrlhf fused the q/k/v and gate/up projections; resume it "
                              "once in a single process (it is converted on load), then scale out again")
    import copy
    twin = copy.deepcopy(model)
    unfuse_projections(twin, QKV_PARTS + GATE_UP_PARTS)
    names = {id(p): n for n, p in model.named_parameters()}
    twin_params = dict(twin.named_parameters())
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [twin_params[n] for p in g["params"] for n in part_names(names[id(p)])]}
              for g in opt.param_groups]
    return twin, type(opt)(groups)  # every group carries all its hyperparameters


def _fuse_from_twin(model, opt, loaded: dict) -> None:
    """Copy the state loaded into the unfused twin into ``model`` / ``opt``: weights through the model's own load hook
    (which concatenates HF's parts), and each fused parameter's optimizer tensors concatenated the same way (rows q,
    k, v; gate, up), scalars such as AdamW's step taken from the first part."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from fastrlhf.models.decoder import part_names
    model.load_state_dict(loaded["model"])
    old = loaded["optim"]
    new = get_optimizer_state_dict(model, opt)
    for fqn in new["state"]:
        states = [old["state"][n] for n in part_names(fqn)]
        new["state"][fqn] = {k: torch.cat([st[k] for st in states]) if torch.is_tensor(v) and v.dim() > 0 else v
                             for k, v in states[0].items()}
    for g_new, g_old in zip(new["param_groups"], old["param_groups"]):
        g_new.update({k: v for k, v in g_old.items() if k != "params"})
    set_optimizer_state_dict(model, opt, new)


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints of ``run_dir``, oldest first (temporary folders of an interrupted save are ignored)."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _NAME.match(p.name))
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def checkpoint_step(path) -> int:
    """The step of a ``checkpoint-<step>`` folder."""
    m = _NAME.match(Path(path).name)
    if m is None:
        raise CheckpointError(f"{path}: not a checkpoint-<step> folder")
    return int(m.group(1))


def prepare_run_dir(run_dir, *, resume: str = "", overwrite: bool = False) -> None:
    """Check and tidy the output folder before any work (called by every rank; rank 0 changes the folder).

    - a file at ``run_dir``: error;
    - a non-empty folder is refused unless the run resumes (``resume``) or starts over (``overwrite``: the previous
      run's checkpoint-* folders, metrics.jsonl, plots and TensorBoard logs are deleted first; other files stay);
    - hidden temporary folders of saves that were killed (``.checkpoint-*.tmp-*`` / ``.old-*``) are removed.
    """
    d = Path(run_dir)
    if d.exists() and not d.is_dir():
        raise CheckpointError(f"{d}: --output_dir is a file, not a folder")
    if resume and overwrite:
        raise CheckpointError(f"{d}: give --resume (continue the run) or --overwrite (start it over), not both")
    entries = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
    used = [n for n in entries if not _STALE.match(n)]
    if used and not resume and not overwrite:
        shown = ", ".join(used[:4]) + (", ..." if len(used) > 4 else "")
        raise CheckpointError(f"{d}: --output_dir already holds a run ({shown}); continue it with --resume auto, "
                              f"start it over with --overwrite (deletes its checkpoints and metrics), or choose "
                              f"another --output_dir")
    distributed.barrier()  # every rank has looked before rank 0 changes anything
    if distributed.rank() == 0:
        for n in entries:
            p = d / n
            if _STALE.match(n) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif overwrite and ((_NAME.match(n) and p.is_dir()) or _RUN_FILES.match(n)):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
        stale = [n for n in entries if _STALE.match(n)]
        if stale:
            print(f"[fastrlhf] {d}: removed {len(stale)} unfinished checkpoint folder(s) of a killed save", flush=True)
    distributed.barrier()


def latest_checkpoint(run_dir) -> Path | None:
    cks = list_checkpoints(run_dir)
    return cks[-1] if cks else None


def load_trainer_state(path) -> dict:
    """The trainer state of a checkpoint folder (or file), loaded with weights_only=True."""
    p = Path(path)
    f = p / STATE_FILE if p.is_dir() else p
    if not f.is_file():
        raise CheckpointError(f"{f}: no trainer state (not a fastrlhf checkpoint folder, or an incomplete one)")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        from fastrlhf.runtime.safe_state import refusal
        raise CheckpointError(f"{f}: cannot load the trainer state: {refusal(e)}") from None


def resolve_resume(resume: str, run_dir) -> Path | None:
    """``resume``: "" (no resume), "auto"/"latest" (the newest checkpoint of run_dir, if any) or a checkpoint path."""
    if not resume:
        return None
    if resume in ("auto", "latest"):
        return latest_checkpoint(run_dir)
    p = Path(resume)
    if not (p / STATE_FILE).is_file():
        inner = latest_checkpoint(p)
        if inner is None:
            raise CheckpointError(f"{p}: --resume: no {STATE_FILE} here and no checkpoint-* folder inside")
        p = inner
    return p


def trainer_state_dict(*, step: int, optimizer=None, data_state: dict | None = None, extra: dict | None = None) -> dict:
    """Everything besides the weights needed to continue exactly: step, optimizer, data position, RNG states."""
    return {"step": int(step), "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "data": data_state or {}, "rng": rng_state(), "extra": extra or {}}


def restore_trainer_state(state: dict, *, optimizer=None, data=None) -> int:
    """Load optimizer (when the state holds one) / data position / RNG from ``state``; returns the step to continue
    from. The stages keep optimizer states in the sharded ``optimizer/`` folder instead (``load_optimizers``)."""
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if data is not None and state.get("data"):
        data.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    return int(state["step"])


# --------------------------------------------------------------------------------------------------------- Ctrl-C

class StopRequest:
    """Set by the first Ctrl-C (or SIGTERM) inside ``graceful_interrupt``; the training loop checks ``requested``."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""

    def __bool__(self) -> bool:
        return self.requested


@contextmanager
def graceful_interrupt(message: str = "saving a checkpoint, then exiting (Ctrl-C again to abort at once)"):
    """Turn the first Ctrl-C / SIGTERM into a stop request (the loop saves, then exits); a second Ctrl-C raises
    KeyboardInterrupt as usual. Handlers are restored on exit. Outside the main thread it only yields the flag."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if stop.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.requested, stop.signal_name = True, signal.Signals(signum).name
        print(f"\n[fastrlhf] {stop.signal_name}: {message}", flush=True)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
