"""Run TRL's online trainers (GRPO, RLOO; the experimental PPO on 0.29) with ``fastrlhf.kernels`` log-probs and entropy.

    from fastrlhf.integrations import trl as fast_trl
    with fast_trl.patched():          # or: patch = fast_trl.apply(); ...; patch.undo()
        GRPOTrainer(...).train()

Notation: B batch, T completion tokens, V vocabulary, H hidden size, N tokens.

What the trainers call, per TRL version (read from TRL's source; each name is replaced in the module where the trainer
looks it up, so nothing else in TRL changes):

TRL 0.29.x: the trainers form ``logits = model(...).logits[:, :-1] / temperature`` ([B, T, V]) and call two helpers imported
  by name into each trainer module:
      selective_log_softmax(logits [..., V], index [...]) -> logp [...]     (an index [..., K] is left to TRL)
      entropy_from_logits(logits [..., V], chunk_size=128) -> H [...]
  replaced in ``trl.trainer.grpo_trainer``, ``trl.trainer.rloo_trainer`` and ``trl.experimental.ppo.ppo_trainer`` by
  ``fastrlhf.kernels.logprobs_from_logits`` with τ = 1 (the caller has already divided by its temperature).
TRL 1.16.x: GRPO and RLOO never see logits. ``add_fused_lm_head`` wraps the model forward; ``model(..., labels=...,
  fused_lm_head=True)`` runs the body and calls, looked up in ``trl.trainer.utils`` at call time,
      _ChunkedLogProbFunction.apply(hidden [N, H], weight [V, H], bias [V] | None, targets [N], temperature, chunk_size,
                                    final_logit_softcapping, logit_scale, outputs)
          -> (logp [N], entropy [N] | None, log_sum_sq_probs | None, mean_logits | None, is_top1 | None)
  which we serve with ``fastrlhf.kernels.linear_logprobs`` on z = logit_scale · (h Wᵀ + b) / τ = (h Wᵀ + b) / (τ / logit_scale),
  in TRL's compute dtype (the autocast dtype when autocast is on, else the hidden states' dtype). Calls we cannot serve
  exactly (logit softcapping, the extra outputs, logit_scale <= 0) go to TRL's own function and are counted in ``fallbacks``.

Log-probs and entropies come back fp32 in both cases (TRL 0.29 returns the logits' dtype, i.e. bf16 log-probs under a bf16
model; fp32 is the more accurate value of the same quantity, see docs/kernels.md).

Losses: TRL computes the clipped GRPO/PPO loss and its k3 KL inline inside ``GRPOTrainer._compute_loss`` (and the PPO
trainer's ``train``), not in a helper it looks up, so they cannot be swapped without rewriting TRL's methods; use
``fastrlhf.kernels.ppo_policy_loss`` / ``kl_penalty`` in your own trainer instead (see the README, "Use the kernels in your trainer").

Any other TRL version: ``apply()`` warns and patches nothing (``allow_untested=True`` patches when every target's signature
still matches the one we read, with a warning). A signature mismatch on a known version also warns and patches nothing.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import inspect
import warnings
from typing import Any, Callable

import torch

from fastrlhf.kernels import linear_logprobs, logprobs_from_logits

SUPPORTED = ("0.29.x", "1.16.x")  # TRL versions whose source we read; see the module docstring for what each calls

# Parameter names of the functions we replace, as read from TRL's source (checked before patching).
_SLS_029 = ("logits", "index")
_ENT_029 = ("logits", "chunk_size")
_CHUNKED_116 = ("ctx", "hidden", "weight", "bias", "targets", "temperature", "chunk_size", "final_logit_softcapping",
                "logit_scale", "outputs")
_SERVED_OUTPUTS = {"log_probs", "entropy"}


@dataclasses.dataclass
class _Target:
    module: str      # where the trainer looks the name up
    name: str        # the global name in that module
    expect: tuple    # parameter names of TRL's object (for the structural check)
    make: Callable   # make(original, patch) -> replacement
    required: bool = True  # False: skipped (and listed in `skipped`) when the module cannot be imported


class TRLPatch:
    """Handle returned by ``apply()``: what was replaced, how often our kernels ran, and ``undo()``.

    ``calls[name]`` counts calls served by fastrlhf.kernels, ``fallbacks[name]`` calls handed back to TRL's original.
    ``applied`` is False when nothing was patched (unknown TRL version or signature mismatch; the reason is in ``reason``).
    Usable as a context manager: ``with apply(): ...`` undoes on exit.
    """

    def __init__(self, version: str):
        self.version = version
        self.applied = False
        self.reason = ""
        self.patched: list[tuple[Any, str, Any, Any]] = []  # (module, name, original, replacement)
        self.skipped: list[str] = []
        self.calls: collections.Counter = collections.Counter()
        self.fallbacks: collections.Counter = collections.Counter()

    def undo(self) -> None:
        """Put TRL's originals back (only where our replacement is still in place). Safe to call twice."""
        global _active
        for module, name, original, replacement in reversed(self.patched):
            if getattr(module, name, None) is replacement:
                setattr(module, name, original)
            else:
                warnings.warn(f"fastrlhf.integrations.trl: {module.__name__}.{name} was replaced by someone else after "
                              "apply(); leaving it as it is", RuntimeWarning, stacklevel=2)
        self.patched = []
        self.applied = False
        if _active is self:
            _active = None

    def __enter__(self) -> "TRLPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        names = [f"{m.__name__}.{n}" for m, n, _, _ in self.patched]
        return (f"TRLPatch(trl={self.version}, applied={self.applied}, patched={names}, calls={dict(self.calls)}, "
                f"fallbacks={dict(self.fallbacks)})")


_active: TRLPatch | None = None


# --- replacements ---------------------------------------------------------------------------------------------------


def _make_selective_log_softmax(original: Callable, patch: TRLPatch) -> Callable:
    def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """fastrlhf stand-in for TRL 0.29's helper: logits [..., V], index [...] -> fp32 logp [...] = log softmax(logits)[index]."""
        if index.dim() != logits.dim() - 1 or not logits.is_floating_point():
            patch.fallbacks["selective_log_softmax"] += 1  # top-K gathers ([..., K]) stay with TRL
            return original(logits, index)
        patch.calls["selective_log_softmax"] += 1
        return logprobs_from_logits(logits, index)  # τ = 1: TRL divided the logits by its temperature already

    return selective_log_softmax


def _make_entropy_from_logits(original: Callable, patch: TRLPatch) -> Callable:
    def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
        """fastrlhf stand-in for TRL 0.29's helper: logits [..., V] -> fp32 H [...] = LSE(z) − Σ softmax(z)·z (nats)."""
        del chunk_size  # TRL's memory knob; our kernel streams the vocabulary anyway
        if not logits.is_floating_point():
            patch.fallbacks["entropy_from_logits"] += 1
            return original(logits)
        patch.calls["entropy_from_logits"] += 1
        dummy = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)  # any valid label; logp unused
        return logprobs_from_logits(logits, dummy, return_entropy=True)[1]

    return entropy_from_logits


class _LinearLogProbsHead:
    """Stands in for TRL 1.16's ``_ChunkedLogProbFunction``: same ``apply`` arguments, same 5-tuple result."""

    def __init__(self, original: Any, patch: TRLPatch):
        self.original = original
        self.patch = patch

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        outputs = tuple(outputs)
        if final_logit_softcapping is not None or not set(outputs) <= _SERVED_OUTPUTS or not logit_scale > 0:
            self.patch.fallbacks["linear_logprobs"] += 1
            return self.original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                       final_logit_softcapping, logit_scale, outputs)
        self.patch.calls["linear_logprobs"] += 1
        dev = hidden.device.type
        # TRL's compute dtype: the autocast dtype when autocast is on, else the hidden states' dtype.
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        with torch.autocast(dev, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            want_entropy = "entropy" in outputs
            # z = logit_scale · (h Wᵀ + b) / τ  =  (h Wᵀ + b) / (τ / logit_scale)
            out = linear_logprobs(hidden.to(dtype), w, targets, bias=b, temperature=temperature / logit_scale,
                                  return_entropy=want_entropy)
        logp, ent = out if want_entropy else (out, None)
        return logp, ent, None, None, None


def _make_linear_head(original: Any, patch: TRLPatch) -> Any:
    return _LinearLogProbsHead(original, patch)


_PLANS: dict[tuple[int, int], list[_Target]] = {
    (0, 29): [
        _Target("trl.trainer.grpo_trainer", "selective_log_softmax", _SLS_029, _make_selective_log_softmax),
        _Target("trl.trainer.grpo_trainer", "entropy_from_logits", _ENT_029, _make_entropy_from_logits),
        _Target("trl.trainer.rloo_trainer", "selective_log_softmax", _SLS_029, _make_selective_log_softmax, False),
        _Target("trl.trainer.rloo_trainer", "entropy_from_logits", _ENT_029, _make_entropy_from_logits, False),
        _Target("trl.experimental.ppo.ppo_trainer", "selective_log_softmax", _SLS_029, _make_selective_log_softmax,
                False),
    ],
    (1, 16): [
        _Target("trl.trainer.utils", "_ChunkedLogProbFunction", _CHUNKED_116, _make_linear_head),
    ],
}


def _params(obj: Any) -> tuple:
    fn = obj.forward if inspect.isclass(obj) and issubclass(obj, torch.autograd.Function) else obj
    return tuple(inspect.signature(fn).parameters)


def _plan_for(version: str, allow_untested: bool) -> tuple[list[_Target] | None, str]:
    from packaging.version import Version

    v = Version(version)
    key = tuple(v.release[:2])
    if key in _PLANS and not v.is_prerelease and not v.is_devrelease:
        return _PLANS[key], ""
    msg = (f"fastrlhf.integrations.trl: TRL {version} is not a version we have read (supported: {', '.join(SUPPORTED)})")
    if not allow_untested:
        return None, msg + "; nothing patched, TRL runs unchanged"
    newest = max(k for k in _PLANS if k <= key) if any(k <= key for k in _PLANS) else min(_PLANS)
    return _PLANS[newest], msg + f"; allow_untested=True: trying the {newest[0]}.{newest[1]} plan (signatures checked)"


def apply(*, allow_untested: bool = False) -> TRLPatch:
    """Replace TRL's log-prob / entropy helpers with fastrlhf.kernels. Returns a ``TRLPatch`` (also a context manager).

    Unknown TRL version, or a known one whose functions' signatures differ from the ones we read: a warning and no patch
    (``patch.applied`` is False). Calling ``apply()`` while a patch is active returns that same patch.
    """
    global _active
    try:
        import trl
    except ImportError as e:
        raise ImportError("fastrlhf.integrations.trl.apply(): TRL is not installed (pip install trl)") from e
    if _active is not None and _active.applied:
        return _active

    patch = TRLPatch(trl.__version__)
    plan, note = _plan_for(trl.__version__, allow_untested)
    if plan is None:
        patch.reason = note
        warnings.warn(note, RuntimeWarning, stacklevel=2)
        return patch
    if note:
        warnings.warn(note, RuntimeWarning, stacklevel=2)

    # 1. resolve every target and check its signature before touching anything
    resolved = []
    for t in plan:
        try:
            module = importlib.import_module(t.module)
        except Exception as e:  # an optional trainer whose extra dependencies are missing
            if t.required:
                patch.reason = f"fastrlhf.integrations.trl: cannot import {t.module} ({e}); nothing patched"
                warnings.warn(patch.reason, RuntimeWarning, stacklevel=2)
                return patch
            patch.skipped.append(f"{t.module}.{t.name} ({type(e).__name__}: {e})")
            continue
        original = getattr(module, t.name, None)
        got = None if original is None else _params(original)
        if got != t.expect:
            patch.reason = (f"fastrlhf.integrations.trl: TRL {trl.__version__}: {t.module}.{t.name} has parameters {got}, "
                            f"expected {t.expect}; nothing patched, TRL runs unchanged")
            warnings.warn(patch.reason, RuntimeWarning, stacklevel=2)
            return patch
        resolved.append((module, t, original))

    # 2. swap them in
    for module, t, original in resolved:
        replacement = t.make(original, patch)
        setattr(module, t.name, replacement)
        patch.patched.append((module, t.name, original, replacement))
    patch.applied = True
    _active = patch
    return patch


def undo() -> None:
    """Undo the active ``apply()`` (no-op when nothing is patched)."""
    if _active is not None:
        _active.undo()


@contextlib.contextmanager
def patched(*, allow_untested: bool = False):
    """``with patched() as p:`` runs the block with TRL patched (``p`` is the ``TRLPatch``) and restores TRL after.

    A block nested inside an already active patch leaves it active on exit.
    """
    was_active = _active is not None and _active.applied
    patch = apply(allow_untested=allow_untested)
    try:
        yield patch
    finally:
        if not was_active:
            patch.undo()
