from lrdist.methods.base import Method


class Flat(Method):
    """One learning rate for the whole model (the usual fine-tuning baseline): ``lr``, else the recipe's."""

    name = "flat"

    def __init__(self, lr: float | None = None):
        if lr is not None and not lr > 0:
            raise ValueError(f"flat lr must be positive, got {lr}")
        self.lr = lr

    def region_lrs(self, base_lr, num_regions):
        return [self.lr or base_lr] * num_regions

    def describe(self):
        return {"method": self.name} if self.lr is None else {"method": self.name, "lr": self.lr}
