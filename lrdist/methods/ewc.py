"""Elastic Weight Consolidation (Kirkpatrick et al. 2017) with a diagonal empirical Fisher.

Penalty ``lambda * sum F (theta - theta*)^2`` over the shared encoder. Its gradient
``2 lambda F (theta - theta*)`` is added without an autograd graph: inside the optimizer step when the
optimizer is a FusedRegionAdamW (``set_ewc``: no separate pass), else to the grads after backward. The
Fisher is the mean of squared batch gradients on the finished task's training data, summed over finished
tasks; theta* is the weights after the last finished task, or the pretrained weights.

Calibration: a raw empirical Fisher of a fine-tuned transformer is tiny (mean squared gradients of order
1e-8), so a lambda like 1000 gives a penalty gradient orders of magnitude below the loss gradient and EWC
does nothing. By default the Fisher is normalised to mean 1 over the encoder, so lambda is on a scale that
does not depend on the model or the loss, and the run records how large the penalty gradient was against
the loss gradient (``method_stats["penalty_to_loss_grad"]``, the ratio of their norms, one mean per task).

Under FSDP2 the Fisher and anchor are DTensors sharded like their parameters (built from the sharded
grads and weights), and every sum above is over the whole model (``lrdist.shards.whole``).
"""
from __future__ import annotations

import math

import torch

from lrdist.methods.base import Method
from lrdist.shards import whole

DEFAULT_LAMBDA = 1.0  # with the normalised Fisher; see the calibration table in benchmarks/SCIENCE.md


class EWC(Method):
    name = "ewc"

    RATIO_EVERY = 10  # steps between measurements of the penalty-to-loss gradient ratio

    def __init__(self, lam: float = DEFAULT_LAMBDA, anchor: str = "previous", fisher_batches: int | None = None,
                 fused: bool = True, normalize: bool = True):
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
            raise ValueError(f"EWC lambda must be a finite number >= 0, got {lam}")
        if fisher_batches is not None and fisher_batches < 1:
            raise ValueError(f"EWC Fisher batches must be at least 1, got {fisher_batches}")
        if anchor not in ("previous", "pretrained"):
            raise ValueError(f"EWC anchor must be 'previous' or 'pretrained', got {anchor!r}")
        self.lam, self.anchor, self.fisher_batches, self.fused = lam, anchor, fisher_batches, fused
        self.normalize = normalize
        self.ratios: dict[int, list[float]] = {}  # task index -> measured penalty/loss gradient norm ratios
        self.task_index, self.steps = 0, 0
        self.fisher: dict[str, torch.Tensor] = {}
        self.theta_star: dict[str, torch.Tensor] = {}
        self.optimizer = None

    def attach(self, model, encoder, optimizer=None):
        # A fresh run (a resume loads the saved state after this): no Fisher from an earlier run.
        self.fisher, self.theta_star, self.ratios = {}, {}, {}
        self.encoder = encoder
        self.optimizer = optimizer if self.fused and hasattr(optimizer, "set_ewc") else None
        if self.anchor == "pretrained":
            self.theta_star = {n: p.detach().clone() for n, p in encoder.named_parameters()}

    def penalty(self, encoder) -> torch.Tensor:
        """lambda * sum F (theta - theta*)^2, for logging and for tests."""
        total = torch.zeros((), device=next(encoder.parameters()).device)
        for n, p in encoder.named_parameters():
            if n in self.fisher:
                total = total + whole((self.fisher[n] * (p - self.theta_star[n]) ** 2).sum())
        return self.lam * total

    def before_task(self, task_index):
        self.task_index, self.steps = task_index, 0
        if self.optimizer is not None and self.fisher:  # (again after a resume)
            params = dict(self.encoder.named_parameters())
            self.optimizer.set_ewc({params[n]: f for n, f in self.fisher.items()},
                                   {params[n]: self.theta_star[n] for n in self.fisher}, self.lam)

    @torch.no_grad()
    def after_backward(self, encoder):
        if not self.fisher:
            return
        if self.steps % self.RATIO_EVERY == 1:  # (at step 0 theta = theta*: no penalty yet)
            self._measure_ratio(encoder)
        self.steps += 1
        if self.optimizer is not None:
            return
        for n, p in encoder.named_parameters():
            if n in self.fisher and p.grad is not None:
                p.grad.add_(self.fisher[n] * (p - self.theta_star[n]), alpha=2.0 * self.lam)

    def _measure_ratio(self, encoder) -> None:
        """|penalty gradient| / |loss gradient| over the encoder, with .grad holding the loss gradient."""
        pen = loss = 0.0
        for n, p in encoder.named_parameters():
            if n in self.fisher and p.grad is not None:
                pen += whole((2.0 * self.lam * self.fisher[n] * (p - self.theta_star[n])).double().pow(2).sum()).item()
                loss += whole(p.grad.double().pow(2).sum()).item()
        if loss > 0:
            self.ratios.setdefault(self.task_index, []).append(math.sqrt(pen / loss))

    def after_task(self, encoder, grad_batches):
        params = dict(encoder.named_parameters())
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        count = 0
        for _ in grad_batches(self.fisher_batches):
            with torch.no_grad():
                for n, p in params.items():
                    if p.grad is not None:
                        fisher[n].add_(p.grad.detach() ** 2)
            count += 1
        for n in fisher:
            fisher[n] /= max(count, 1)
            self.fisher[n] = self.fisher[n] + fisher[n] if n in self.fisher else fisher[n]
        if self.normalize:  # mean 1 over the encoder: lambda on a model- and loss-independent scale
            total = sum(whole(f.double().sum()).item() for f in self.fisher.values())
            size = sum(f.numel() for f in self.fisher.values())
            if total > 0:
                for n in self.fisher:
                    self.fisher[n] = self.fisher[n] * (size / total)
        if self.anchor == "previous":
            self.theta_star = {n: p.detach().clone() for n, p in params.items()}

    def detach(self):
        if self.optimizer is not None:
            self.optimizer.clear_ewc()

    def state_dict(self):
        return {"fisher": self.fisher, "theta_star": self.theta_star, "ratios": self.ratios}

    def load_state_dict(self, state):
        self.fisher, self.theta_star = state["fisher"], state["theta_star"]
        self.ratios = state.get("ratios", {})

    def stats(self):
        return {"penalty_to_loss_grad": {str(k): sum(v) / len(v) for k, v in sorted(self.ratios.items())}}

    def describe(self):  # fused or not: the same run
        return {"method": self.name, "ewc_lambda": self.lam, "ewc_anchor": self.anchor,
                "ewc_fisher": "normalised" if self.normalize else "raw", "ewc_fisher_batches": self.fisher_batches}
