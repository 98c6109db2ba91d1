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


def _bad(path, name: str, problem: str):
    raise InputError(f"{path}: field {name} {problem}; give the file lrdist wrote")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < high


def _rate(value) -> bool:
    return _number(value) and 0.0 <= value <= 1.0


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
    for key in ("objective", "mean_forgetting"):
        if key in res and not _number(res[key]):
            _bad(path, f"{name}.{key}", "must be a finite number")
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
    """A trial file (lrdist.trial_files.record)."""
    from optuna.distributions import json_to_distribution
    if not isinstance(rec, dict):
        _bad(path, "(the whole file)", "must be an object")
    if not _int(rec.get("number"), 0, MAX_TRIAL):
        _bad(path, "number", f"must be a whole number from 0 to {MAX_TRIAL - 1}")
    if rec.get("state") not in ("COMPLETE", "PRUNED"):
        _bad(path, "state", "must be COMPLETE or PRUNED")
    if rec["state"] == "COMPLETE" and not _number(rec.get("value")):
        _bad(path, "value", "must be a finite number for a complete trial")
    if rec["state"] == "PRUNED" and not (rec.get("value") is None or _number(rec["value"])):
        _bad(path, "value", "must be null or a finite number for a pruned trial")
    for key in ("params", "distributions", "user_attrs", "intermediate_values"):
        if not isinstance(rec.get(key), dict):
            _bad(path, key, "must be an object")
    for key, text in rec["distributions"].items():
        try:
            dist = json_to_distribution(text)
        except Exception:  # noqa: BLE001 (optuna raises several kinds for a broken string)
            _bad(path, f"distributions.{key}", "is not a distribution Optuna wrote")
        if key not in rec["params"] or not dist._contains(dist.to_internal_repr(rec["params"][key])):
            _bad(path, f"params.{key}", "is missing or outside its distribution")
    if set(rec["params"]) - set(rec["distributions"]):
        _bad(path, "params", "holds a parameter without a distribution")
    for step, value in rec["intermediate_values"].items():
        if not (step.isdigit() and _number(value)):
            _bad(path, f"intermediate_values.{step}", "must map a step number to a finite number")
    ident = rec.get("study_identity")
    _identity(path, "study_identity", ident)
    space = ident.get("space") if isinstance(ident, dict) else None
    regions = space.get("num_regions") if isinstance(space, dict) and _int(space.get("num_regions"), 1, 10 ** 4) else None
    if "results" in rec["user_attrs"]:
        _results(path, "user_attrs.results", rec["user_attrs"]["results"], regions)
    for k, run in enumerate(rec["user_attrs"].get("runs") or []):
        _results(path, f"user_attrs.runs.{k}", run, None)
    if "system_attrs" in rec and not isinstance(rec["system_attrs"], dict):
        _bad(path, "system_attrs", "must be an object")
    for key in ("datetime_start", "datetime_complete"):
        if rec.get(key) is not None:
            try:
                datetime.datetime.fromisoformat(rec[key])
            except (TypeError, ValueError):
                _bad(path, key, "must be a date and time (ISO 8601) or null")


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
        if not _number(run.get(key)):
            _bad(path, key, "must be a finite number")
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
