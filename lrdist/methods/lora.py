"""LoRA (Hu et al. 2021) through ``peft``: the encoder stays frozen, low-rank adapters and the task heads train.

"LoRA Reduces Catastrophic Forgetting in Sequential Transformer Encoder Fine-Tuning" (arXiv 2603.27707)
studies this baseline in the paper's setting. The adapters sit in the encoder's layers, so they fall into
the same regions as the weights they adapt: a distribution (``lrs``) can give them per-region LRs too.
Fresh adapters (A random, B zero) are made for every run, from the run's seed.
"""
from __future__ import annotations

from lrdist.methods.base import Method

DEFAULT_TARGETS = ("query", "value")


class LoRA(Method):
    name = "lora"
    adapts_encoder = True

    def __init__(self, rank: int = 8, alpha: float | None = None, targets=DEFAULT_TARGETS, lr: float | None = 5e-4,
                 dropout: float = 0.0, distribution: Method | None = None):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        alpha = float(2 * rank if alpha is None else alpha)
        if not alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {alpha}")
        targets = tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip())
        if not targets:
            raise ValueError("LoRA needs at least one target module name (e.g. query,value)")
        if lr is not None and not lr > 0:
            raise ValueError(f"LoRA lr must be positive, got {lr}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must lie in [0, 1), got {dropout}")
        self.rank, self.alpha, self.targets, self.lr, self.dropout = rank, alpha, targets, lr, dropout
        self.distribution = distribution

    def region_lrs(self, base_lr, num_regions):
        if self.distribution is not None:  # per-region LRs on the adapters
            return self.distribution.region_lrs(base_lr, num_regions)
        return [self.lr or base_lr] * num_regions

    def wrap_encoder(self, encoder):
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets),
                            lora_dropout=self.dropout, bias="none")
        try:
            return get_peft_model(encoder, config)
        except ValueError as exc:  # e.g. target modules not in this model
            raise ValueError(f"LoRA: {str(exc).splitlines()[0]}") from None

    def unwrap_encoder(self, wrapped):
        base = wrapped.unload()  # drops the adapters without merging: the pretrained weights are untouched
        for p in base.parameters():
            p.requires_grad_(True)
        return base

    def describe(self):
        out = {"method": self.name, "lora_rank": self.rank, "lora_alpha": self.alpha,
               "lora_targets": list(self.targets), "lora_lr": self.lr, "lora_dropout": self.dropout}
        if self.distribution is not None:
            out["distribution"] = self.distribution.describe()
        return out
