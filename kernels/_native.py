"""The compiled CPU ops (csrc/, built as ``fastrlhf.kernels._C``), or None when this copy of the kernels has no build.

Callers fall back to their PyTorch ``*_ref`` when it is None, so the kernels import with torch, triton and numpy alone.
"""
from __future__ import annotations


def native():
    """The pybind11 module ``_C`` beside these kernels, or None if it was not built."""
    try:
        from . import _C
    except ImportError:
        return None
    return _C
