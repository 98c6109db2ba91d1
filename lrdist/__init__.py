"""lrdist: per-region learning rates for continual fine-tuning, with a one-launch fused AdamW."""
from lrdist.optim import FusedRegionAdamW, triton_available

__all__ = ["FusedRegionAdamW", "triton_available"]
__version__ = "0.1.0"
