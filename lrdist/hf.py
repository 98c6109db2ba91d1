"""Hugging Face Trainer drop-in: FusedRegionAdamW built for a model and a region scheme.

On one device or under DDP, hand the Trainer a built optimizer:

    opt = lrdist.hf.region_optimizer(model, "bert10", lr=2e-5, region_scales=[1, 1, 0.3, 0.7, 1, 1, 1, 1, 1, 3])
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))

With FSDP the Trainer refuses ``optimizers=`` (it must build the optimizer after sharding the model); let
it build ours on the sharded model instead, which also works without FSDP:

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizer_cls_and_kwargs=lrdist.hf.trainer_optimizer("bert10", lr=2e-5, region_scales=[...]))

The Trainer builds its LR scheduler on this optimizer, clips gradients with ``args.max_grad_norm``, and
saves and restores the optimizer state (per-region scales included) in its checkpoints. Its
``args.learning_rate`` and ``args.weight_decay`` are not used: pass ``lr`` and ``weight_decay`` here.
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


def _region_optimizer_factory():
    """What the Trainer calls first for a factory (any ``optimizer_cls`` not a torch.optim.Optimizer class);
    it then calls the result with its model, sharded if FSDP is on, and the kwargs."""
    return region_optimizer


def trainer_optimizer(scheme: str = "bert10", **kwargs) -> tuple:
    """``Trainer(optimizer_cls_and_kwargs=trainer_optimizer("bert10", lr=..., region_scales=...))``: the
    Trainer builds ``region_optimizer(model, scheme, **kwargs)`` on the model it trains (after FSDP2 has
    sharded it, where ``optimizers=`` is refused). ``kwargs`` are region_optimizer's."""
    return _region_optimizer_factory, {"scheme": scheme, **kwargs}
