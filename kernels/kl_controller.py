"""Placeholder: being written."""


class AdaptiveKLController:
    def __init__(self, *a, **k):
        raise NotImplementedError


class FixedKLController:
    def __init__(self, *a, **k):
        raise NotImplementedError


def adaptive_kl_coef(*a, **k):
    raise NotImplementedError
