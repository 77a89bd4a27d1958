"""Which implementation a kernel call uses: the Triton kernels or the CPU (PyTorch / C++) path.

- ``"auto"`` (default): Triton for CUDA tensors, the CPU path for CPU tensors.
- ``"triton"``: always Triton. On CPU tensors this needs ``TRITON_INTERPRET=1`` in the environment *before* triton kernels
  are defined (the tests set it in ``conftest.py``); the interpreter runs the very same kernel code, slowly.
- ``"torch"``: always the PyTorch / C++ path (also on CUDA, e.g. to compare against).

Select with ``FASTRLHF_KERNEL_BACKEND`` (read once, at the first kernel call) or ``set_backend(...)`` /
``with backend(...):``.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

_VALID = ("auto", "triton", "torch")
_state = threading.local()


_env_default: str | None = None  # FASTRLHF_KERNEL_BACKEND, read once at the first kernel call (a decode step makes ~20)


def _default() -> str:
    global _env_default
    if _env_default is None:
        name = os.environ.get("FASTRLHF_KERNEL_BACKEND", "auto")
        if name not in _VALID:
            raise ValueError(f"FASTRLHF_KERNEL_BACKEND={name!r}: expected one of {_VALID}")
        _env_default = name
    return _env_default


def get_backend() -> str:
    return getattr(_state, "name", None) or _default()


def set_backend(name: str) -> None:
    if name not in _VALID:
        raise ValueError(f"backend {name!r}: expected one of {_VALID}")
    _state.name = name


@contextlib.contextmanager
def backend(name: str):
    """``with backend("triton"): ...`` uses that backend inside the block (thread-local)."""
    prev = getattr(_state, "name", None)
    set_backend(name)
    try:
        yield
    finally:
        _state.name = prev


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether a call on tensor ``t`` should launch the Triton kernel."""
    name = get_backend()
    if name == "torch":
        return False
    if t.is_cuda:
        return True
    if name == "triton":
        if not interpreting():
            raise RuntimeError(
                "fastrlhf.kernels: backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before fastrlhf.kernels "
                "is imported (Triton's interpreter); or use backend 'torch'/'auto' for the CPU path"
            )
        return True
    return False  # auto on CPU -> PyTorch / C++ path
