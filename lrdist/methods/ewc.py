"""Elastic Weight Consolidation (Kirkpatrick et al. 2017) with a diagonal empirical Fisher.

Penalty ``lambda * sum F (theta - theta*)^2`` over the shared encoder. Its gradient
``2 lambda F (theta - theta*)`` is added without an autograd graph: inside the optimizer step when the
optimizer is a FusedRegionAdamW (``set_ewc``: no separate pass), else to the grads after backward. The Fisher is the mean of squared batch
gradients on the finished task's training data, summed over finished tasks; theta* is the weights after
the last finished task, or the pretrained weights (the variant the paper compares with).
"""
from __future__ import annotations

import torch

from lrdist.methods.base import Method


class EWC(Method):
    name = "ewc"

    def __init__(self, lam: float = 1000.0, anchor: str = "previous", fisher_batches: int | None = None,
                 fused: bool = True):
        if lam < 0:
            raise ValueError(f"EWC lambda must be >= 0, got {lam}")
        if anchor not in ("previous", "pretrained"):
            raise ValueError(f"EWC anchor must be 'previous' or 'pretrained', got {anchor!r}")
        self.lam, self.anchor, self.fisher_batches, self.fused = lam, anchor, fisher_batches, fused
        self.fisher: dict[str, torch.Tensor] = {}
        self.theta_star: dict[str, torch.Tensor] = {}
        self.optimizer = None

    def attach(self, model, encoder, optimizer=None):
        self.encoder = encoder
        self.optimizer = optimizer if self.fused and hasattr(optimizer, "set_ewc") else None
        if self.anchor == "pretrained":
            self.theta_star = {n: p.detach().clone() for n, p in encoder.named_parameters()}

    def penalty(self, encoder) -> torch.Tensor:
        """lambda * sum F (theta - theta*)^2, for logging and for tests."""
        total = torch.zeros((), device=next(encoder.parameters()).device)
        for n, p in encoder.named_parameters():
            if n in self.fisher:
                total = total + (self.fisher[n] * (p - self.theta_star[n]) ** 2).sum()
        return self.lam * total

    def before_task(self, task_index):
        if self.optimizer is not None and self.fisher:  # (again after a resume)
            params = dict(self.encoder.named_parameters())
            self.optimizer.set_ewc({params[n]: f for n, f in self.fisher.items()},
                                   {params[n]: self.theta_star[n] for n in self.fisher}, self.lam)

    @torch.no_grad()
    def after_backward(self, encoder):
        if not self.fisher or self.optimizer is not None:
            return
        for n, p in encoder.named_parameters():
            if n in self.fisher and p.grad is not None:
                p.grad.add_(self.fisher[n] * (p - self.theta_star[n]), alpha=2.0 * self.lam)

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
        if self.anchor == "previous":
            self.theta_star = {n: p.detach().clone() for n, p in params.items()}

    def detach(self):
        if self.optimizer is not None:
            self.optimizer.clear_ewc()

    def state_dict(self):
        return {"fisher": self.fisher, "theta_star": self.theta_star}

    def load_state_dict(self, state):
        self.fisher, self.theta_star = state["fisher"], state["theta_star"]

    def describe(self):
        return {"method": self.name, "ewc_lambda": self.lam, "ewc_anchor": self.anchor}  # fused or not: same run
