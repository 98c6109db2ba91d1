"""Continual-learning strategies the sequential loop calls at fixed points."""
from lrdist.methods.base import Method
from lrdist.methods.dist import (PAPER_COMBINED, PAPER_ROUNDED, PRESETS, Distribution, check_lrs, fill_missing,
                                 load_distribution)
from lrdist.methods.ewc import DEFAULT_LAMBDA, EWC
from lrdist.methods.flat import Flat
from lrdist.methods.llrd import LLRD
from lrdist.methods.lora import DEFAULT_TARGETS, LoRA
from lrdist.methods.migu import MIGU

METHODS = ("flat", "dist", "llrd", "ewc", "migu", "lora")


def make_method(name: str, *, lrs: str | None = None, lrs_kind: str = "absolute", llrd_decay: float = 0.8,
                ewc_lambda: float = DEFAULT_LAMBDA, ewc_anchor: str = "previous", ewc_fisher_batches=None,
                migu_threshold: float = 0.7, lora_rank: int = 8, lora_alpha: float | None = None,
                lora_targets=DEFAULT_TARGETS, lora_lr: float | None = 5e-4) -> Method:
    """Build a method by name from the CLI's options."""
    if name == "flat":
        return Flat()
    if name == "dist":
        if not lrs:
            raise ValueError(f"--method dist needs --lrs (a preset: {', '.join(PRESETS)}; a file; or 10 values)")
        return Distribution.from_spec(lrs, lrs_kind)
    if name == "llrd":
        return LLRD(llrd_decay)
    if name == "ewc":
        return EWC(ewc_lambda, ewc_anchor, ewc_fisher_batches)
    if name == "migu":
        return MIGU(migu_threshold)
    if name == "lora":  # with --lrs: per-region LRs on the adapters
        dist = Distribution.from_spec(lrs, lrs_kind) if lrs else None
        return LoRA(lora_rank, lora_alpha, lora_targets, lora_lr, distribution=dist)
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


__all__ = ["Method", "Flat", "Distribution", "LLRD", "EWC", "MIGU", "LoRA", "make_method", "METHODS", "PRESETS",
           "PAPER_COMBINED", "PAPER_ROUNDED", "DEFAULT_LAMBDA", "check_lrs", "fill_missing", "load_distribution"]
