"""MIGU (Du et al. 2024): update only the linear-layer outputs with large L1-normalised magnitude.

Forward hooks on every nn.Linear of the encoder record, per output channel, the sum of |output| over
all tokens of the batch. After backward, each weight gradient keeps the rows whose L1-normalised
magnitude is at or above the ``threshold`` quantile (0.7: the top 30 %); the other rows are zeroed.
Biases are untouched, the mask is fresh every step, and the first task trains unmasked. With a
FusedRegionAdamW the masks go to the optimizer (``set_row_masks``) and are applied inside its step.
"""
from __future__ import annotations

import torch
from torch import nn

from lrdist.methods.base import Method


class MIGU(Method):
    name = "migu"

    def __init__(self, threshold: float = 0.7, fused: bool = True):
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"MIGU threshold must lie in [0, 1), got {threshold}")
        self.threshold, self.fused = threshold, fused
        self.optimizer = None
        self.magnitudes: dict[nn.Linear, torch.Tensor] = {}
        self.handles = []
        self.task_index = 0

    def attach(self, model, encoder, optimizer=None):
        self.optimizer = optimizer if self.fused and hasattr(optimizer, "set_row_masks") else None
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
        masks = {m: keep for m, keep in self.masks().items() if m.weight.grad is not None} if self.task_index > 0 else {}
        if self.optimizer is not None:
            self.optimizer.set_row_masks({m.weight: keep for m, keep in masks.items()})
        else:
            for module, keep in masks.items():
                module.weight.grad.mul_(keep.unsqueeze(1).to(module.weight.grad.dtype))
        self.magnitudes.clear()

    def detach(self):
        if self.optimizer is not None:
            self.optimizer.clear_row_masks()
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def describe(self):
        return {"method": self.name, "migu_threshold": self.threshold}
