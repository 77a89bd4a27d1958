"""The model's projection layer: ``nn.Linear`` whose fp32 CPU GEMMs run through oneDNN.

Same parameters, state-dict keys and math as ``nn.Linear`` (y = x·Wᵀ + b). When the input and weight are plain fp32
CPU tensors (no autocast, no FSDP/DTensor weight, not inside ``torch.compile``) and the product has at least
``onednn_linear.TRAIN_MIN_MACS`` multiply-adds, the forward and the input gradient go through
``fastrlhf.kernels.onednn_linear.train_linear`` (another fp32 summation order than ``F.linear``; the weight gradient
stays on torch's BLAS). Everything else (CUDA, bf16, autocast, sharded weights, small or empty inputs) calls
``F.linear``. ``Linear.onednn = False`` turns the oneDNN path off for every instance.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastrlhf.kernels import onednn_linear

_ONEDNN = onednn_linear.available()


class Linear(nn.Linear):
    onednn: bool = True  # class-wide switch (tests and A/B timings flip it)
    plain_linear = True  # computes exactly x·Wᵀ + b: the engine may run it through its packed decode copies

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (self.onednn and _ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32
                and w.dtype == torch.float32 and type(w) is nn.Parameter and x.dim() >= 2
                and x.numel() * w.shape[0] >= onednn_linear.TRAIN_MIN_MACS
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
            return onednn_linear.train_linear(x, w, self.bias)
        return F.linear(x, w, self.bias)
