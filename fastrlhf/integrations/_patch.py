"""In-place patching of another trainer's functions, shared by ``integrations.verl`` and ``integrations.openrlhf``.

A ``PeerPatch`` records every replacement (a module or class attribute, or a registry entry) with its original, counts
the calls served by ``fastrlhf.kernels`` (``calls``) and those handed back to the peer's own function (``fallbacks``),
and puts everything back on ``undo()`` (also on leaving a ``with`` block).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import inspect
import sys
import warnings
from typing import Any


class PeerPatch:
    """What ``apply()`` replaced in a peer trainer, how often our kernels ran, and ``undo()``.

    ``applied`` is False when nothing was patched (unknown version or a changed signature; the reason is in ``reason``).
    """

    def __init__(self, peer: str, version: str):
        self.peer = peer
        self.version = version
        self.applied = False
        self.reason = ""
        self.patched: list[tuple[Any, Any, Any, Any, str]] = []  # (owner, key, original, replacement, kind)
        self.skipped: list[str] = []
        self.calls: collections.Counter = collections.Counter()
        self.fallbacks: collections.Counter = collections.Counter()
        self.on_undo = None  # callback run after undo (the module forgets its active patch)

    # --- recording replacements ------------------------------------------------------------------------------------

    def set_attr(self, owner: Any, name: str, replacement: Any) -> Any:
        """owner.name = replacement (owner: a module or a class); returns the original."""
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        setattr(owner, name, replacement)
        self.patched.append((owner, name, original, replacement, "attr"))
        return original

    def set_item(self, table: dict, key: Any, replacement: Any) -> None:
        """table[key] = replacement (a registry such as veRL's POLICY_LOSS_REGISTRY)."""
        self.patched.append((table, key, table[key], replacement, "item"))
        table[key] = replacement

    def set_everywhere(self, package: str, module: Any, name: str, replacement: Any) -> None:
        """Replace ``module.name`` and every copy of it that a loaded ``package.*`` module imported by name."""
        original = getattr(module, name)
        self.set_attr(module, name, replacement)
        for mod_name, mod in list(sys.modules.items()):
            if mod is module or mod is None or not (mod_name == package or mod_name.startswith(package + ".")):
                continue
            if getattr(mod, name, None) is original:
                self.set_attr(mod, name, replacement)

    # --- undo ------------------------------------------------------------------------------------------------------

    def undo(self) -> None:
        """Put the peer's originals back (only where our replacement is still in place). Safe to call twice."""
        for owner, key, original, replacement, kind in reversed(self.patched):
            if kind == "item":
                current = owner.get(key)
            else:
                current = owner.__dict__.get(key) if isinstance(owner, type) else getattr(owner, key, None)
            if current is not replacement:
                warnings.warn(f"fastrlhf.integrations.{self.peer}: {_where(owner)}.{key} was replaced by someone else "
                              "after apply(); leaving it as it is", RuntimeWarning, stacklevel=2)
                continue
            if kind == "item":
                owner[key] = original
            else:
                setattr(owner, key, original)
        self.patched = []
        self.applied = False
        if self.on_undo is not None:
            self.on_undo(self)

    def __enter__(self) -> "PeerPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        names = sorted({f"{_where(o)}.{k}" for o, k, _, _, _ in self.patched})
        return (f"PeerPatch({self.peer}={self.version}, applied={self.applied}, patched={names}, "
                f"calls={dict(self.calls)}, fallbacks={dict(self.fallbacks)})")


def _where(owner: Any) -> str:
    if isinstance(owner, dict):
        return "<registry>"
    return getattr(owner, "__qualname__", None) or getattr(owner, "__name__", repr(owner))


def signature_of(obj: Any) -> tuple:
    """(name, default) of each parameter of a function, or of a class's ``__init__`` (``self`` dropped)."""
    fn = obj.__init__ if isinstance(obj, type) else obj
    params = list(inspect.signature(fn).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    return tuple((p.name, None if p.default is inspect.Parameter.empty else repr(p.default)) for p in params)


def import_optional(name: str, patch: PeerPatch):
    """The module, or None (recorded in ``patch.skipped``) when its own dependencies are missing."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # a trainer module whose heavy dependencies (ray, deepspeed, vllm...) are absent
        patch.skipped.append(f"{name} ({type(e).__name__}: {e})")
        return None


def version_key(version: str) -> tuple[int, int] | None:
    """(major, minor) of a release version; None for pre- and dev-releases."""
    from packaging.version import Version

    v = Version(version)
    if v.is_prerelease or v.is_devrelease:
        return None
    return tuple(v.release[:2])


def served(patch: PeerPatch, name: str, ours: Any, original: Any, serve: Any) -> Any:
    """A replacement for the peer's ``original`` that calls ``ours`` when ``serve(*args, **kw)`` says our kernels take
    the call (counted in ``patch.calls[name]``) and the original otherwise (``patch.fallbacks[name]``).
    ``inspect.signature`` of the replacement shows ``ours``, whose parameters are the peer's own."""
    @functools.wraps(ours)
    def replacement(*args, **kwargs):
        if serve(*args, **kwargs):
            patch.calls[name] += 1
            return ours(*args, **kwargs)
        patch.fallbacks[name] += 1
        return original(*args, **kwargs)

    replacement.__wrapped__ = ours
    return replacement


def counting_class(patch: PeerPatch, name: str, ours: type) -> type:
    """A subclass of ``ours`` (e.g. a KL controller) that counts its constructions in ``patch.calls[name]``."""
    class Counted(ours):
        def __init__(self, *args, **kwargs):
            patch.calls[name] += 1
            super().__init__(*args, **kwargs)

    Counted.__name__ = Counted.__qualname__ = ours.__name__
    Counted.__doc__ = ours.__doc__
    return Counted


class PatchSlot:
    """The one active patch of a peer: ``apply()`` returns it while applied, ``undo()`` and ``patched()`` use it."""

    def __init__(self):
        self.active: PeerPatch | None = None

    def current(self) -> PeerPatch | None:
        """The applied patch, or None."""
        return self.active if self.active is not None and self.active.applied else None

    def activate(self, patch: PeerPatch) -> PeerPatch:
        patch.applied = True
        patch.on_undo = self._forget
        self.active = patch
        return patch

    def _forget(self, patch: PeerPatch) -> None:
        if self.active is patch:
            self.active = None

    def undo(self) -> None:
        """Undo the active patch (no-op when nothing is patched)."""
        if self.active is not None:
            self.active.undo()

    @contextlib.contextmanager
    def patched(self, apply, **kwargs):
        """``with slot.patched(apply) as p:`` the block runs patched; restored after unless it was already patched."""
        was_active = self.current() is not None
        patch = apply(**kwargs)
        try:
            yield patch
        finally:
            if not was_active:
                patch.undo()
