"""Imports of the installed veRL and OpenRLHF for the integration tests (installed with ``pip --no-deps``).

OpenRLHF's ``openrlhf.models`` package and its trainer modules import flash-attn, DeepSpeed and vLLM at module top.
Those are GPU builds that cannot be installed on a CPU machine, and none of the functions under test calls them
(``log_probs_from_logits`` imports flash-attn's kernel lazily and falls back on ImportError). So, only where such a
package is absent, ``gpu_only_stubs()`` serves an empty placeholder module for it while OpenRLHF's modules are
imported; any call into a placeholder raises. The placeholders are removed from ``sys.modules`` afterwards, so the
rest of the test session (and fastrlhf's own availability checks) never sees them. veRL needs no placeholder.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

GPU_ONLY = ("flash_attn", "deepspeed", "vllm")


class _Placeholder(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{name} is a test placeholder (the GPU package is not installed)")

        return missing


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = roots

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Placeholder(spec.name)

    def exec_module(self, module):
        module.__path__ = []


@contextlib.contextmanager
def gpu_only_stubs():
    missing = tuple(r for r in GPU_ONLY if r not in sys.modules and importlib.util.find_spec(r) is None)
    finder = _PlaceholderFinder(missing)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n, m in sys.modules.items() if isinstance(m, _Placeholder)]:
            del sys.modules[name]


def import_openrlhf():
    """The OpenRLHF modules the patch touches: (utils, loss, experience_maker, kl_controller)."""
    with gpu_only_stubs():
        names = ("openrlhf.models.utils", "openrlhf.models.loss", "openrlhf.trainer.ppo_utils.experience_maker",
                 "openrlhf.trainer.ppo_utils.kl_controller", "openrlhf.trainer.ray.ppo_actor")
        return tuple(importlib.import_module(n) for n in names)


def import_verl():
    """(torch_functional, core_algos) of the installed veRL."""
    return (importlib.import_module("verl.utils.torch_functional"),
            importlib.import_module("verl.trainer.ppo.core_algos"))


@contextlib.contextmanager
def counting(monkeypatch, *names):
    """Wrap ``fastrlhf.kernels.<name>`` so each call is counted; yields the Counter."""
    import collections

    from fastrlhf import kernels

    counts = collections.Counter()
    for name in names:
        fn = getattr(kernels, name)

        def wrapper(*args, _fn=fn, _name=name, **kwargs):
            counts[_name] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(kernels, name, wrapper)
    yield counts
