"""Placeholder: being written (see kernels/__init__.py for the public API)."""


def whiten(*args, **kwargs):
    raise NotImplementedError("whiten")


def whiten_ref(*args, **kwargs):
    raise NotImplementedError("whiten_ref")
