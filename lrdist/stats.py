"""The uncertainty every printed result carries: standard errors and paired confidence intervals.

* An accuracy measured on n rows is a binomial proportion: its standard error is sqrt(p (1 - p) / n).
* A mean over runs (seeds, task pairs) has the standard error s / sqrt(k) of those k values.
* Two methods run on the same (pair, seed) units are compared by their paired differences: the mean
  difference with a Student-t 95% confidence interval over the units. The interval "excludes zero" when
  the difference is unlikely to be noise alone.
* One value has no spread: its standard deviation is None and prints as '-'.
* A task is not learned when its accuracy right after its own training is within two standard errors of
  its majority-class rate on the rows scored (or below it): such a task has nothing to forget, and its
  "forgetting" is noise or a flip between classes. ``unlearned`` is the one check every table uses.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

from scipy import stats as _scipy_stats


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n rows."""
    if n < 1:
        raise ValueError(f"an accuracy needs at least one row, got n={n}")
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def sum_se(*ses: float) -> float:
    """Standard error of a sum of independent estimates (e.g. two tasks' accuracies)."""
    return math.sqrt(sum(se * se for se in ses))


def mean_se(values: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean); the error is NaN for a single value (no spread to see)."""
    if not values:
        raise ValueError("mean_se needs at least one value")
    if len(values) == 1:
        return float(values[0]), math.nan
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation); the deviation is None for a single value (no spread to see)."""
    if not values:
        raise ValueError("mean_sd needs at least one value")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def sd_text(sd: float | None, digits: int = 4) -> str:
    return "-" if sd is None or math.isnan(sd) else f"{sd:.{digits}f}"


def majority_rate(labels) -> float:
    """The share of the most frequent label: the accuracy of always predicting it."""
    labels = [int(v) for v in labels]
    if not labels:
        raise ValueError("majority_rate needs at least one label")
    return max(labels.count(v) for v in set(labels)) / len(labels)


def learned(accuracy: float, majority: float, n: int) -> bool:
    """Whether an accuracy on n rows stands more than two standard errors above the majority rate."""
    # The se is that of a classifier at the majority rate (what "nothing learned" would score), its p(1-p)
    # floored at 1/n (one row's worth): the se at the observed accuracy is 0 at 100%, which made a perfect
    # score on a single-class split (majority 1.0) or a few rows above a high majority count as learned.
    se = math.sqrt(max(majority * (1.0 - majority), 1.0 / n) / n)
    return accuracy - majority > 2.0 * se


def unlearned(res: dict) -> list[str]:
    """The tasks of a run not learned right after their own training (see the module's note). ``res`` holds
    ``tasks``, ``accuracy_matrix``, ``majority_rate`` and ``eval_samples`` (a run's results, an evaluate
    run, a search trial's); a run that recorded no majority rate has nothing to judge: []."""
    rates, rows, n = res.get("majority_rate"), res.get("accuracy_matrix"), res.get("eval_samples")
    if not rates or not rows or not n:
        return []
    return [t for i, t in enumerate(res["tasks"])
            if i < len(rows) and rows[i][i] is not None and not learned(rows[i][i], rates[t], n[t])]


UNLEARNED_RULE = ("accuracy right after its own training within two standard errors of (or below) its "
                  "majority-class rate on the rows scored (the se of a classifier at that rate)")
UNLEARNED_NOTE = f"not learned ({UNLEARNED_RULE}): its forgetting means nothing"


def unlearned_details(res: dict) -> str:
    """'mrpc 0.689 vs majority 0.684' for each task of a run that was not learned ('' when none)."""
    i = {t: k for k, t in enumerate(res["tasks"])}
    return ", ".join(f"{t} {res['accuracy_matrix'][i[t]][i[t]]:.3f} vs majority {res['majority_rate'][t]:.3f}"
                     for t in unlearned(res))


def unlearned_note(res: dict) -> str | None:
    """One line naming a run's unlearned tasks with their accuracy and majority rate, or None."""
    details = unlearned_details(res)
    return f"{details}: {UNLEARNED_NOTE}" if details else None


def t_critical(df: int, level: float = 0.95) -> float:
    """Two-sided Student-t critical value."""
    return float(_scipy_stats.t.ppf(0.5 + level / 2.0, df))


@dataclass(frozen=True)
class PairedDifference:
    """Mean of (a - b) over paired units with its confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0.0 or self.high < 0.0)

    def as_dict(self) -> dict:
        return {**asdict(self), "excludes_zero": self.excludes_zero}

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:+.4f} (one unit: no interval)"
        verdict = "excludes 0" if self.excludes_zero else "includes 0"
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}] ({verdict})"


def paired_difference(a: list[float], b: list[float], level: float = 0.95) -> PairedDifference:
    """Mean of a[i] - b[i] with a Student-t confidence interval over the n paired units."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    if not a:
        raise ValueError("paired_difference needs at least one pair")
    diffs = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(diffs)
    if len(diffs) == 1:
        return PairedDifference(mean, math.nan, math.nan, 1, level)
    half = t_critical(len(diffs) - 1, level) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return PairedDifference(mean, mean - half, mean + half, len(diffs), level)


def pm(value: float, se: float, digits: int = 4) -> str:
    """'value ± se', or the value alone when the error is unknown."""
    if se is None or math.isnan(se):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {se:.{digits}f}"


# ---- several task pairs, several comparisons ------------------------------------------------------------
@dataclass(frozen=True)
class BlockedDifference:
    """The mean paired difference (method - reference) over units grouped into blocks (task pairs), with
    the blocks as fixed effects: the error is the spread of the units around their own block's mean, so a
    difference between pairs is not counted as noise. Each unit weighs the same (with equal seeds per pair,
    the mean of the pairs' means). It speaks for these pairs; ``per_block`` shows how far they agree."""

    mean: float
    se: float
    df: int
    n: int
    per_block: dict  # block -> (mean difference, units)

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        half = t_critical(self.df, level) * self.se
        return self.mean - half, self.mean + half

    @property
    def p_value(self) -> float:
        """Two-sided p-value of 'no difference'."""
        if self.se == 0:
            return 0.0 if self.mean else 1.0
        return float(2 * _scipy_stats.t.sf(abs(self.mean) / self.se, self.df))

    def detectable(self, power: float = 0.8, alpha: float = 0.05) -> float:
        """The smallest true difference a two-sided t-test at ``alpha`` finds with ``power``, given this
        design's units and error (noncentral t)."""
        return detectable_difference(self.se, self.df, power, alpha)


def blocked_difference(diffs: dict) -> BlockedDifference:
    """``diffs``: block -> paired differences of its units. Needs more units than blocks."""
    blocks = {b: list(v) for b, v in diffs.items() if len(v)}
    n = sum(len(v) for v in blocks.values())
    df = n - len(blocks)
    if df < 1:
        raise ValueError(f"a blocked comparison needs more units ({n}) than blocks ({len(blocks)})")
    mean = sum(sum(v) for v in blocks.values()) / n
    residual = sum((x - statistics.fmean(v)) ** 2 for v in blocks.values() for x in v)
    return BlockedDifference(mean, math.sqrt(residual / df / n), df, n,
                             {b: (statistics.fmean(v), len(v)) for b, v in blocks.items()})


def detectable_difference(se: float, df: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """Smallest true difference d with P(|T| > t_crit) = power, T noncentral t(df, d / se)."""
    from scipy.optimize import brentq
    crit = t_critical(df, 1 - alpha)
    nct = _scipy_stats.nct

    def shortfall(shift: float) -> float:
        lower = nct.cdf(-crit, df, shift)  # the wrong-sign tail: negligible, and NaN far out in scipy
        return nct.sf(crit, df, shift) + (0.0 if math.isnan(lower) else lower) - power
    return float(brentq(shortfall, 0.0, crit + 10.0)) * se


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): family-wise error control."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def bonferroni_level(level: float, comparisons: int) -> float:
    """The confidence level of each of ``comparisons`` intervals that hold together with ``level``."""
    return 1 - (1 - level) / comparisons
