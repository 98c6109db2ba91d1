"""MIGU (Du et al. 2024): update only the linear-layer outputs with large L1-normalised magnitude.

Forward hooks on every nn.Linear of the encoder record, per output channel, the sum of |output| over
all tokens of the batch. After backward, each weight gradient keeps the rows whose L1-normalised
magnitude is at or above the ``threshold`` quantile (0.7: the top 30 %); the other rows are zeroed.
Biases are untouched, the mask is fresh every step, and the first task trains unmasked.
"""
from __future__ import annotations

import torch
from torch import nn

from lrdist.methods.base import Method


class MIGU(Method):
    name = "migu"

    def __init__(self, threshold: float = 0.7):
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"MIGU threshold must lie in [0, 1), got {threshold}")
        self.threshold = threshold
        self.magnitudes: dict[nn.Linear, torch.Tensor] = {}
        self.handles = []
        self.task_index = 0

    def attach(self, model, encoder):
        for module in encoder.modules():
            if isinstance(module, nn.Linear):
                self.handles.append(module.register_forward_hook(self._record))

    def _record(self, module, inputs, output):
        if module.training:
            with torch.no_grad():
                self.magnitudes[module] = output.detach().abs().reshape(-1, output.shape[-1]).sum(0).float()

    def before_task(self, task_index):
        self.task_index = task_index

    def masks(self) -> dict[nn.Linear, torch.Tensor]:
        """Per linear layer, a bool vector over output channels: True = this row is updated."""
        out = {}
        for module, mag in self.magnitudes.items():
            normed = mag / mag.sum().clamp_min(torch.finfo(mag.dtype).tiny)
            out[module] = normed >= torch.quantile(normed, self.threshold)
        return out

    @torch.no_grad()
    def after_backward(self, encoder):
        if self.task_index > 0:
            for module, keep in self.masks().items():
                if module.weight.grad is not None:
                    module.weight.grad.mul_(keep.unsqueeze(1).to(module.weight.grad.dtype))
        self.magnitudes.clear()

    def detach(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def describe(self):
        return {"method": self.name, "migu_threshold": self.threshold}
