"""Placeholder: being written (see kernels/__init__.py for the public API)."""


def logprobs_from_logits(*args, **kwargs):
    raise NotImplementedError("logprobs_from_logits")


def logprobs_from_logits_ref(*args, **kwargs):
    raise NotImplementedError("logprobs_from_logits_ref")
