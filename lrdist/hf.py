"""Hugging Face Trainer drop-in: FusedRegionAdamW built for a model and a region scheme.

    opt = lrdist.hf.region_optimizer(model, "bert10", lr=2e-5, region_scales=[1, 1, 0.3, 0.7, 1, 1, 1, 1, 1, 3])
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))

The Trainer builds its LR scheduler on this optimizer, clips gradients with ``args.max_grad_norm``, and
saves and restores the optimizer state (per-region scales included) in its checkpoints.
"""
from __future__ import annotations

from torch import nn

from lrdist.optim import FusedRegionAdamW
from lrdist.regions import assign_regions, param_groups

NO_DECAY = ("bias", "LayerNorm.weight", "layernorm.weight", "norm.weight")


def region_optimizer(model: nn.Module, scheme: str = "bert10", lr: float = 5e-5, region_scales=None,
                     weight_decay: float = 0.0, no_decay=NO_DECAY, **kwargs) -> FusedRegionAdamW:
    """FusedRegionAdamW over ``model`` with one region per part of ``scheme`` (biases and norms undecayed)."""
    n = assign_regions(model, scheme).num_regions
    return FusedRegionAdamW(param_groups(model, scheme, weight_decay=weight_decay, no_decay=tuple(no_decay)),
                            lr=lr, weight_decay=weight_decay,
                            region_scales=region_scales if region_scales is not None else [1.0] * n, **kwargs)
