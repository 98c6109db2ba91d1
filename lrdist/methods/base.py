"""The small interface through which a continual-learning strategy plugs into the sequential loop."""
from __future__ import annotations

from torch import nn


class Method:
    """A strategy: per-region LRs, plus hooks the loop calls at fixed points. Defaults do nothing."""

    name = "base"
    adapts_encoder = False  # True: wrap_encoder/unwrap_encoder swap the encoder for the run (LoRA)

    def region_lrs(self, base_lr: float, num_regions: int) -> list[float]:
        """The effective LR of every region."""
        return [base_lr] * num_regions

    def attach(self, model: nn.Module, encoder: nn.Module, optimizer=None) -> None:
        """Once per run, before training (register hooks, remember weights). ``optimizer`` is the run's
        optimizer: a FusedRegionAdamW lets EWC and MIGU hand their terms to the fused step."""

    def before_task(self, task_index: int) -> None:
        """Before the first step of each task."""

    def after_backward(self, encoder: nn.Module) -> None:
        """After loss.backward(), before optimizer.step(): may change gradients."""

    def after_task(self, encoder: nn.Module, grad_batches) -> None:
        """After a task's training. ``grad_batches()`` yields once per batch of that task's training
        data after running backward on it, with the model's grads holding that batch's gradient."""

    def detach(self) -> None:
        """Remove hooks at the end of a run."""

    def wrap_encoder(self, encoder: nn.Module) -> nn.Module:
        """With ``adapts_encoder``: the encoder to train in this run (e.g. with adapters)."""
        return encoder

    def unwrap_encoder(self, encoder: nn.Module) -> nn.Module:
        """With ``adapts_encoder``: the plain encoder back after the run."""
        return encoder

    def stats(self) -> dict:
        """Diagnostics the run records under ``method_stats`` (e.g. EWC's penalty-to-loss gradient ratio)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def describe(self) -> dict:
        return {"method": self.name}
