"""Placeholder: being written (see kernels/__init__.py for the public API)."""


def gae(*args, **kwargs):
    raise NotImplementedError("gae")


def gae_ref(*args, **kwargs):
    raise NotImplementedError("gae_ref")
