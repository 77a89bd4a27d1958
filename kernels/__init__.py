"""fastrlhf.kernels: fused RLHF ops (Triton on CUDA; PyTorch / C++ on CPU). Depends on torch + triton only.

Notation: B batch, T time (response tokens), V vocabulary, H hidden size, N tokens (leading dims flattened).
Every RL op returns fp32 whatever the input dtype (the decoder ops ``rms_norm``, ``rope``, ``swiglu`` return their
inputs' dtype); the math is in ``docs/kernels.md`` and on the lines that compute it.
Each op lives in its own file with its Triton kernel(s), launcher, ``autograd.Function`` and a pure-PyTorch ``*_ref``.
"""
from ._aggregate import aggregate_ref, default_denominator
from ._backend import backend, get_backend, set_backend
from .gae_scan import gae, gae_ref
from .kl import kl_penalty, kl_penalty_ref
from .kl_controller import AdaptiveKLController, FixedKLController, adaptive_kl_coef
from .fused_linear_kl import linear_kl, linear_kl_ref
from .fused_linear_logprobs import linear_logprobs, linear_logprobs_ref
from .logprobs import logprobs_from_logits, logprobs_from_logits_ref
from .ppo_loss import ppo_policy_loss, ppo_policy_loss_ref
from .rewards import shape_rewards, shape_rewards_ref
from .rmsnorm import rms_norm, rms_norm_ref
from .rope import rope, rope_ref
from .swiglu import swiglu, swiglu_ref
from .value_loss import ppo_value_loss, ppo_value_loss_ref
from .whitening import whiten, whiten_ref

__all__ = [
    "backend", "get_backend", "set_backend",
    "logprobs_from_logits", "linear_logprobs", "linear_kl", "kl_penalty", "shape_rewards", "gae", "whiten",
    "ppo_policy_loss", "ppo_value_loss", "default_denominator", "aggregate_ref",
    "AdaptiveKLController", "FixedKLController", "adaptive_kl_coef",
    "logprobs_from_logits_ref", "linear_logprobs_ref", "linear_kl_ref", "kl_penalty_ref", "shape_rewards_ref", "gae_ref",
    "whiten_ref",
    "ppo_policy_loss_ref", "ppo_value_loss_ref",
    "rms_norm", "rope", "swiglu", "rms_norm_ref", "rope_ref", "swiglu_ref",
]
