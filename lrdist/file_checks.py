"""The fields each kind of stored file must hold, checked where it is read: trial files, run files, search.json.

A file edited by hand (or written by something else) is refused in one line naming the file and the field,
before anything uses it: never a traceback, never a silently wrong table (a one-region distribution, a
dropped trial). Only the fields lrdist reads are checked; extra ones are left alone.
"""
from __future__ import annotations

import datetime
import math

from lrdist.preflight import InputError

MAX_TRIAL = 100_000  # a trial number beyond this is not one a study made (it would fill that many gaps)
MAX_SEED = 2 ** 32
# what each figure of a run can be (lrdist.continual.summarise, from accuracies in [0, 1]): the paper's objective
# sums two accuracies, forgetting and backward transfer are differences of two
BOUNDS = {"objective": (0.0, 2.0), "mean_final_accuracy": (0.0, 1.0), "mean_forgetting": (-1.0, 1.0),
          "bwt": (-1.0, 1.0)}
# a study's value by its objective (lrdist.search.objective_value); unknown: any of them
OBJECTIVE_BOUNDS = {"paper": (0.0, 2.0), "mean_accuracy": (0.0, 1.0), "forgetting": (-1.0, 1.0), None: (-1.0, 2.0)}


def _bad(path, name: str, problem: str):
    raise InputError(f"{path}: field {name} {problem}; give the file lrdist wrote")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < high


def _rate(value) -> bool:
    return _number(value) and 0.0 <= value <= 1.0


def _within(value, bounds) -> bool:
    return _number(value) and bounds[0] <= value <= bounds[1]


def _close(a, b) -> bool:
    """Equal but for float rounding (a value stored once and computed again)."""
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _lrs(path, name: str, lrs, regions: int | None) -> None:
    if not isinstance(lrs, list) or not lrs:
        _bad(path, name, "must be a list of learning rates (null for an empty region)")
    if any(v is not None and not (_number(v) and v > 0) for v in lrs):
        _bad(path, name, "must hold positive finite numbers or null")
    if regions is not None and len(lrs) != regions:
        _bad(path, name, f"has {len(lrs)} values but the study has {regions} regions")


def _matrix(path, name: str, rows, n: int) -> None:
    if not (isinstance(rows, list) and len(rows) == n and all(isinstance(r, list) and len(r) == n for r in rows)
            and all(v is None or _rate(v) for r in rows for v in r)):
        _bad(path, name, f"must be {n} rows of {n} accuracies in [0, 1]")


def _per_task(path, name: str, values, tasks: list[str], ok) -> None:
    if not isinstance(values, dict) or any(t not in values or not ok(values[t]) for t in tasks):
        _bad(path, name, f"must give each of {', '.join(tasks)} a value")


def _identity(path, name: str, ident) -> None:
    if ident is None:
        return
    if not isinstance(ident, dict):
        _bad(path, name, "must be an object")
    if "versions" in ident and not isinstance(ident["versions"], dict):
        _bad(path, f"{name}.versions", "must be an object")
    if "tasks" in ident and not (isinstance(ident["tasks"], list) and all(isinstance(t, str) for t in ident["tasks"])):
        _bad(path, f"{name}.tasks", "must be a list of task names")


def _results(path, name: str, res, regions: int | None) -> None:
    """A search trial's (or a tuning run's) compact results, as lrdist.search.compact keeps them."""
    if not isinstance(res, dict):
        _bad(path, name, "must be an object")
    _lrs(path, f"{name}.lrs", res.get("lrs"), regions)
    for key, bounds in BOUNDS.items():
        if key in res and not _within(res[key], bounds):
            _bad(path, f"{name}.{key}", f"must be a number in [{bounds[0]:g}, {bounds[1]:g}]")
    tasks = res.get("tasks")
    if tasks is not None:
        if not (isinstance(tasks, list) and tasks and all(isinstance(t, str) for t in tasks)):
            _bad(path, f"{name}.tasks", "must be a list of task names")
        if "accuracy_matrix" in res:
            _matrix(path, f"{name}.accuracy_matrix", res["accuracy_matrix"], len(tasks))
        for key, ok in (("majority_rate", _rate), ("eval_samples", lambda v: _int(v, 1, 10 ** 9))):
            if key in res:
                _per_task(path, f"{name}.{key}", res[key], tasks, ok)


def trial_file(rec, path) -> None:
    """A trial file (lrdist.trial_files.record): its fields, its value within what its study's objective can
    be and equal to what its results give, and (a search's) LRs those of its params in the study's space."""
    from optuna.distributions import json_to_distribution
    if not isinstance(rec, dict):
        _bad(path, "(the whole file)", "must be an object")
    if not _int(rec.get("number"), 0, MAX_TRIAL):
        _bad(path, "number", f"must be a whole number from 0 to {MAX_TRIAL - 1}")
    if rec.get("state") not in ("COMPLETE", "PRUNED"):
        _bad(path, "state", "must be COMPLETE or PRUNED")
    ident = rec.get("study_identity")
    _identity(path, "study_identity", ident)
    ident = ident or {}
    objective = ident.get("objective") if ident.get("objective") in OBJECTIVE_BOUNDS else None
    low, high = OBJECTIVE_BOUNDS[objective]
    within = f"a number in [{low:g}, {high:g}] (what the objective {objective or 'of any kind'} can be)"
    if rec["state"] == "COMPLETE" and not _within(rec.get("value"), (low, high)):
        _bad(path, "value", f"must be {within} for a complete trial")
    if rec["state"] == "PRUNED" and not (rec.get("value") is None or _within(rec["value"], (low, high))):
        _bad(path, "value", f"must be null or {within} for a pruned trial")
    for key in ("params", "distributions", "user_attrs", "intermediate_values"):
        if not isinstance(rec.get(key), dict):
            _bad(path, key, "must be an object")
    for key, text in rec["distributions"].items():
        try:
            dist = json_to_distribution(text)
        except Exception:  # noqa: BLE001 (optuna raises several kinds for a broken string)
            _bad(path, f"distributions.{key}", "is not a distribution Optuna wrote")
        if not _param_fits(dist, rec["params"], key):
            _bad(path, f"params.{key}", "is missing or outside its distribution")
    if set(rec["params"]) - set(rec["distributions"]):
        _bad(path, "params", "holds a parameter without a distribution")
    for step, value in rec["intermediate_values"].items():  # continual.intermediate_value: within [0, 2]
        if not (step.isdigit() and _within(value, (0.0, 2.0))):
            _bad(path, f"intermediate_values.{step}", "must map a step number to a number in [0, 2] (half the "
                 "first task's accuracy, then first + current task's)")
    space = ident.get("space") if isinstance(ident.get("space"), dict) else None
    regions = space.get("num_regions") if space and _int(space.get("num_regions"), 1, 10 ** 4) else None
    attrs = rec["user_attrs"]
    if rec["state"] == "COMPLETE" and "results" not in attrs and (space is not None or "runs" not in attrs):
        _bad(path, "user_attrs.results", "is missing: a complete trial records its results")
    if "results" in attrs:
        _results(path, "user_attrs.results", attrs["results"], regions)
        if space is not None:
            _space_lrs(path, attrs["results"]["lrs"], rec["params"], space, ident.get("recipe"))
        _value_of(path, "user_attrs.results", rec, [attrs["results"]], objective)
    runs = attrs.get("runs")
    if runs is not None and not (isinstance(runs, list) and runs):
        _bad(path, "user_attrs.runs", "must be a list of runs")
    for k, run in enumerate(runs or []):
        _results(path, f"user_attrs.runs.{k}", run, None)
    if runs and "results" not in attrs:
        _value_of(path, "user_attrs.runs", rec, runs, objective)
    if "system_attrs" in rec and not isinstance(rec["system_attrs"], dict):
        _bad(path, "system_attrs", "must be an object")
    for key in ("datetime_start", "datetime_complete"):
        if rec.get(key) is not None:
            try:
                datetime.datetime.fromisoformat(rec[key])
            except (TypeError, ValueError):
                _bad(path, key, "must be a date and time (ISO 8601) or null")


def _param_fits(dist, params: dict, key: str) -> bool:
    """A trial's param is of its distribution's type and inside it (checked before Optuna converts it,
    which fails on another type with its own message)."""
    from optuna.distributions import CategoricalDistribution
    if key not in params:
        return False
    value = params[key]
    if not isinstance(dist, CategoricalDistribution) and not _number(value):
        return False
    try:
        return bool(dist._contains(dist.to_internal_repr(value)))
    except (TypeError, ValueError):
        return False


def _space_lrs(path, lrs: list, params: dict, space: dict, recipe) -> None:
    """A search trial's LRs: null exactly at the space's empty regions, elsewhere its param (a scale: times
    the recipe's LR, lrdist.search.SearchSpace.lrs), within the space's bounds."""
    empty, kind = space.get("empty") or [], space.get("kind", "absolute")
    low, high = space.get("low"), space.get("high")
    base = recipe.get("lr") if isinstance(recipe, dict) else None
    if kind == "scale" and _number(base):
        low, high = (low * base, high * base) if _number(low) and _number(high) else (low, high)
    elif kind != "absolute":
        return  # a space this version does not know: its identity comparison refuses it
    name = "user_attrs.results.lrs"
    for r, lr in enumerate(lrs):
        if r in empty:
            if lr is not None:
                _bad(path, f"{name}.{r}", "must be null: the region is empty in the study's space")
            continue
        if lr is None:
            _bad(path, f"{name}.{r}", "must be a learning rate: the region is searched")
        if _number(low) and _number(high) and not (low * (1 - 1e-9) <= lr <= high * (1 + 1e-9)):
            _bad(path, f"{name}.{r}", f"must lie in the study's space [{low:g}, {high:g}]")
        param = params.get(f"{'lr' if kind == 'absolute' else 'scale'}_{r}")
        if not _number(param) or not _close(lr, param if kind == "absolute" else base * param):
            _bad(path, f"{name}.{r}", "must be the LR of the trial's params")


def _value_of(path, name: str, rec: dict, runs: list, objective) -> None:
    """A complete trial's value is its objective on its results (the mean over a tuning trial's runs)."""
    from lrdist.search import objective_value
    if rec["state"] != "COMPLETE" or objective is None:
        return
    try:
        values = [objective_value(r, objective) for r in runs]
    except KeyError as exc:
        _bad(path, f"{name}.{exc.args[0]}", "is missing: the trial's value is computed from it")
    if not _close(rec["value"], sum(values) / len(values)):
        _bad(path, "value", f"must be the objective ({objective}) of {name}")


def run_file(run, path) -> None:
    """An evaluate run file or a finetune results.json (the fields summaries read)."""
    from lrdist.evaluate import METRICS
    if not isinstance(run, dict):
        _bad(path, "(the whole file)", "must be an object")
    tasks = run.get("tasks")
    if not (isinstance(tasks, list) and tasks and all(isinstance(t, str) for t in tasks)):
        _bad(path, "tasks", "must be a list of task names")
    if not isinstance(run.get("method"), str):
        _bad(path, "method", "must be a method's name")
    if not _int(run.get("seed"), 0, MAX_SEED):
        _bad(path, "seed", "must be a whole number >= 0")
    for key in METRICS:
        if not _within(run.get(key), BOUNDS[key]):
            _bad(path, key, f"must be a number in [{BOUNDS[key][0]:g}, {BOUNDS[key][1]:g}]")
    _matrix(path, "accuracy_matrix", run.get("accuracy_matrix"), len(tasks))
    for key, ok in (("majority_rate", _rate), ("eval_samples", lambda v: _int(v, 1, 10 ** 9))):
        if run.get(key) is not None:
            _per_task(path, key, run[key], tasks, ok)
    if "method_stats" in run and not isinstance(run["method_stats"], dict):
        _bad(path, "method_stats", "must be an object")
    _identity(path, "identity", run.get("identity"))


def search_info(info, path) -> None:
    """A search folder's search.json."""
    if not isinstance(info, dict):
        _bad(path, "(the whole file)", "must be an object")
    for key in ("study_name", "storage"):
        if not (isinstance(info.get(key), str) and info[key]):
            _bad(path, key, "must be a non-empty string")
    if "tasks" in info and not (isinstance(info["tasks"], list) and all(isinstance(t, str) for t in info["tasks"])):
        _bad(path, "tasks", "must be a list of task names")
    _identity(path, "identity", info.get("identity"))
