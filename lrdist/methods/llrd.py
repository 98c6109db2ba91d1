from lrdist.methods.base import Method


class LLRD(Method):
    """Layer-wise LR decay: the last region gets the base LR, each region below it ``decay`` times less."""

    name = "llrd"

    def __init__(self, decay: float = 0.8):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"LLRD decay must lie in (0, 1], got {decay}")
        self.decay = decay

    def region_lrs(self, base_lr, num_regions):
        return [base_lr * self.decay ** (num_regions - 1 - r) for r in range(num_regions)]

    def describe(self):
        return {"method": self.name, "llrd_decay": self.decay}
