"""MIGU (Du et al. 2024): update only the linear-layer outputs with large L1-normalised magnitude.

Forward hooks on every nn.Linear of the encoder record, per output channel, the sum of |output| over
all tokens of the batch. After backward, each weight gradient keeps the rows whose L1-normalised
magnitude is at or above the ``threshold`` quantile (0.7: the top 30 %); the other rows are zeroed.
Biases are untouched, the mask is fresh every step, and the first task trains unmasked. With a
FusedRegionAdamW the masks go to the optimizer (``set_row_masks``) and are applied inside its step.

Under DDP or FSDP2 each rank sees its own part of the batch: the magnitudes are summed over the ranks
of ``process_group`` (default: all) before the masks are taken, so every replica masks the same rows,
those one process would mask on the whole batch. A sharded weight's mask is sliced to its local rows.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lrdist.methods.base import Method
from lrdist.shards import local, local_rows


class MIGU(Method):
    name = "migu"

    def __init__(self, threshold: float = 0.7, fused: bool = True, process_group=None):
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"MIGU threshold must lie in [0, 1), got {threshold}")
        self.threshold, self.fused, self.process_group = threshold, fused, process_group
        self.optimizer = None
        self.magnitudes: dict[nn.Linear, torch.Tensor] = {}
        self.linears: list[nn.Linear] = []
        self.handles = []
        self.task_index = 0

    def attach(self, model, encoder, optimizer=None):
        self.optimizer = optimizer if self.fused and hasattr(optimizer, "set_row_masks") else None
        self.linears = [m for m in encoder.modules() if isinstance(m, nn.Linear)]
        for module in self.linears:
            self.handles.append(module.register_forward_hook(self._record))

    def _record(self, module, inputs, output):
        if module.training:
            with torch.no_grad():
                self.magnitudes[module] = output.detach().abs().reshape(-1, output.shape[-1]).sum(0).float()

    def before_task(self, task_index):
        self.task_index = task_index

    def _sum_over_ranks(self) -> None:
        """One all-reduce of every recorded magnitude (in the modules' order, the same on every rank)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(self.process_group) == 1:
            return
        mods = [m for m in self.linears if m in self.magnitudes]
        if not mods:
            return
        flat = torch.cat([self.magnitudes[m] for m in mods])
        dist.all_reduce(flat, group=self.process_group)
        self.magnitudes.update(zip(mods, flat.split([self.magnitudes[m].numel() for m in mods])))

    def masks(self) -> dict[nn.Linear, torch.Tensor]:
        """Per linear layer, a bool vector over output channels: True = this row is updated."""
        out = {}
        for module, mag in self.magnitudes.items():
            normed = mag / mag.sum().clamp_min(torch.finfo(mag.dtype).tiny)
            out[module] = normed >= torch.quantile(normed, self.threshold)
        return out

    @torch.no_grad()
    def after_backward(self, encoder):
        masks = {}
        if self.task_index > 0:
            self._sum_over_ranks()
            masks = {m: keep for m, keep in self.masks().items() if m.weight.grad is not None}
        if self.optimizer is not None:
            self.optimizer.set_row_masks({m.weight: keep for m, keep in masks.items()})
        else:
            for module, keep in masks.items():
                grad = local(module.weight.grad)
                grad.mul_(local_rows(module.weight, keep).unsqueeze(1).to(grad.dtype))
        self.magnitudes.clear()

    def detach(self):
        if self.optimizer is not None:
            self.optimizer.clear_row_masks()
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def describe(self):
        return {"method": self.name, "migu_threshold": self.threshold}
