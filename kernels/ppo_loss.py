"""Placeholder: being written (see kernels/__init__.py for the public API)."""


def ppo_policy_loss(*args, **kwargs):
    raise NotImplementedError("ppo_policy_loss")


def ppo_policy_loss_ref(*args, **kwargs):
    raise NotImplementedError("ppo_policy_loss_ref")
