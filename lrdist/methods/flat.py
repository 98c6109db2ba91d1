from lrdist.methods.base import Method


class Flat(Method):
    """One learning rate for the whole model (the usual fine-tuning baseline)."""

    name = "flat"
