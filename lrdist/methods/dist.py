"""A fixed learning-rate distribution: one LR per region, absolute or as scales of the base LR."""
from __future__ import annotations

import json
import math
from pathlib import Path

from lrdist.methods.base import Method

# Kenneweg et al. 2024, "BERTcL combined": absolute LRs for the 10 bert10 regions.
PAPER_COMBINED = [3.295e-6, 4.363e-6, 9.215e-7, 1.923e-6, 2.849e-6, 2.143e-6, 3.267e-6, 3.699e-6,
                  3.186e-6, 1.119e-5]
# The same, rounded by the paper to scales of a base LR.
PAPER_ROUNDED = [1, 1, 0.3, 0.7, 1, 1, 1, 1, 1, 3]
PRESETS = {
    "paper": ("absolute", PAPER_COMBINED),
    "paper-rounded": ("scale", PAPER_ROUNDED),
}


def load_distribution(spec: str, kind: str = "absolute") -> tuple[str, list[float]]:
    """A preset name, a JSON file, or comma-separated values -> (kind, values).

    A file holds a list, or {"kind": "absolute"|"scale", "lrs": [...]} as ``lrdist combine`` writes it.
    """
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"distribution file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"distribution file {path} is not valid JSON ({exc})") from None
        if isinstance(data, dict):
            kind, values = data.get("kind", kind), data.get("lrs")
            if values is None:
                raise ValueError(f"distribution file {path} has no 'lrs' list")
        else:
            values = data
        if not isinstance(values, list):
            raise ValueError(f"distribution file {path}: 'lrs' must be a list of numbers, got {type(values).__name__}")
        try:
            return kind, [None if v is None else float(v) for v in values]
        except (TypeError, ValueError):
            raise ValueError(f"distribution file {path}: 'lrs' must hold numbers (or null for an empty region)") from None
    try:
        return kind, [float(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(f"--lrs {spec!r} is neither a preset ({', '.join(PRESETS)}), a file, "
                         f"nor comma-separated numbers") from None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_lrs(values: list, num_regions: int, what: str = "distribution") -> None:
    """Positive finite values, one per region; None marks a region the distribution has no value for."""
    if len(values) != num_regions:
        raise ValueError(f"{what} has {len(values)} values but the region scheme has {num_regions} regions")
    bad = [i for i, v in enumerate(values)
           if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)]
    if bad:
        raise ValueError(f"{what} must hold positive finite values; bad at region(s) {bad}")
    if all(v is None for v in values):
        raise ValueError(f"{what} has no value for any region")


def fill_missing(values: list) -> list[float]:
    """Values for the regions marked None (e.g. empty in the model a distribution was searched on):
    log-linear interpolation between the nearest regions that have one (regions are ordered by depth)."""
    known = [i for i, v in enumerate(values) if v is not None]
    out = []
    for i, v in enumerate(values):
        if v is not None:
            out.append(float(v))
            continue
        below = max((k for k in known if k < i), default=None)
        above = min((k for k in known if k > i), default=None)
        if below is None or above is None:
            out.append(float(values[above if below is None else below]))
        else:
            w = (i - below) / (above - below)
            out.append(math.exp((1 - w) * math.log(values[below]) + w * math.log(values[above])))
    return out


class Distribution(Method):
    name = "dist"

    def __init__(self, values: list[float], kind: str = "absolute", label: str = "custom"):
        if kind not in ("absolute", "scale"):
            raise ValueError(f"distribution kind must be 'absolute' or 'scale', got {kind!r}")
        self.values = [None if v is None else float(v) for v in values]
        self.kind, self.label = kind, label

    @classmethod
    def from_spec(cls, spec: str, kind: str = "absolute") -> "Distribution":
        kind, values = load_distribution(spec, kind)
        return cls(values, kind, spec)

    def region_lrs(self, base_lr, num_regions):
        check_lrs(self.values, num_regions)
        values = fill_missing(self.values)
        return values if self.kind == "absolute" else [base_lr * v for v in values]

    def describe(self):
        """By its values, not where they came from: a file rewritten with other LRs is another method, and
        a copy of the same LRs elsewhere is the same one (stored results compare this)."""
        return {"method": self.name, "kind": self.kind, "lrs": self.values}
