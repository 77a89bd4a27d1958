"""Placeholder: being written (see kernels/__init__.py for the public API)."""


def ppo_value_loss(*args, **kwargs):
    raise NotImplementedError("ppo_value_loss")


def ppo_value_loss_ref(*args, **kwargs):
    raise NotImplementedError("ppo_value_loss_ref")
