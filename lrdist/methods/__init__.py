"""Continual-learning strategies the sequential loop calls at fixed points."""
from lrdist.methods.base import Method
from lrdist.methods.dist import PAPER_COMBINED, PAPER_ROUNDED, PRESETS, Distribution, check_lrs, load_distribution
from lrdist.methods.ewc import EWC
from lrdist.methods.flat import Flat
from lrdist.methods.llrd import LLRD
from lrdist.methods.migu import MIGU

METHODS = ("flat", "dist", "llrd", "ewc", "migu")


def make_method(name: str, *, lrs: str | None = None, lrs_kind: str = "absolute", llrd_decay: float = 0.8,
                ewc_lambda: float = 1000.0, ewc_anchor: str = "previous", ewc_fisher_batches=None,
                migu_threshold: float = 0.7) -> Method:
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
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


__all__ = ["Method", "Flat", "Distribution", "LLRD", "EWC", "MIGU", "make_method", "METHODS", "PRESETS",
           "PAPER_COMBINED", "PAPER_ROUNDED", "check_lrs", "load_distribution"]
