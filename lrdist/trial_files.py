"""A study's finished trials as JSON files, one per trial: a record to commit, and a study rebuilt from it.

An Optuna study lives in a database on one machine. ``save_trials`` writes every finished trial (complete
or pruned) of a study as ``FOLDER/trial-NNNN.json``, once, atomically, with the study's identity.
``add_saved_trials`` puts such a folder's trials into a study that has none yet (a fresh database on
another machine), keeping their numbers (a number whose trial failed is filled with a failed trial), so
a search or a tuning study resumes from files kept in a repository. ``study_from_files`` rebuilds a study
in memory for reading (combine, report) where its database is not at hand.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path

import optuna
from optuna.distributions import distribution_to_json, json_to_distribution
from optuna.trial import TrialState

from lrdist import identity
from lrdist.files import read_json, write_json

SAVED = (TrialState.COMPLETE, TrialState.PRUNED)
PATTERN = "trial-*.json"


def path_of(folder, number: int) -> Path:
    return Path(folder) / f"trial-{number:04d}.json"


def record(trial, ident: dict | None) -> dict:
    """A finished trial as plain JSON."""
    when = lambda d: d.isoformat() if d else None  # noqa: E731
    return {"number": trial.number, "state": trial.state.name, "value": trial.value, "params": trial.params,
            "distributions": {k: distribution_to_json(d) for k, d in trial.distributions.items()},
            "user_attrs": trial.user_attrs,
            "intermediate_values": {str(k): v for k, v in trial.intermediate_values.items()},
            "datetime_start": when(trial.datetime_start), "datetime_complete": when(trial.datetime_complete),
            "study_identity": ident}


def save_trials(study: optuna.Study, folder) -> int:
    """Write each finished trial not yet in ``folder``; returns how many were written."""
    folder = Path(folder)
    ident = study.user_attrs.get("identity")
    written = 0
    for t in study.get_trials(deepcopy=False, states=SAVED):
        path = path_of(folder, t.number)
        if not path.exists():
            write_json(path, record(t, ident))
            written += 1
    return written


def load_records(folder) -> list[dict]:
    """The trial files of ``folder`` in number order (a damaged one is named in one line)."""
    records = []
    for path in sorted(Path(folder).glob(PATTERN)):  # (none when the folder does not exist)
        rec = read_json(path, "the trial file", fix="restore it from the repository or delete it")
        if not (isinstance(rec, dict) and rec.get("state") in ("COMPLETE", "PRUNED")
                and isinstance(rec.get("number"), int) and "params" in rec and "distributions" in rec):
            raise ValueError(f"{path} is not a trial file lrdist wrote")
        records.append(rec)
    return sorted(records, key=lambda r: r["number"])


def _frozen(rec: dict):
    when = lambda s: datetime.datetime.fromisoformat(s) if s else None  # noqa: E731
    state = TrialState[rec["state"]]
    return optuna.trial.create_trial(
        state=state, value=rec["value"], params=rec["params"],
        distributions={k: json_to_distribution(d) for k, d in rec["distributions"].items()},
        user_attrs=rec["user_attrs"], intermediate_values={int(k): v for k, v in rec["intermediate_values"].items()})


def add_saved_trials(study: optuna.Study, folder, current: dict | None = None, what: str = "") -> int:
    """Add ``folder``'s trials to ``study``, which must hold none yet; numbers are kept. With ``current``
    (the study's identity now), trial files made from something else are refused in one line first."""
    records = load_records(folder) if Path(folder).is_dir() else []
    if not records:
        return 0
    if study.get_trials(deepcopy=False):
        raise ValueError(f"{what or 'the study'} already holds trials: trial files are only added to a new one")
    if current is not None:  # every file must come from this very study (checked once per distinct identity)
        seen = {}
        for rec in records:
            seen.setdefault(json.dumps(rec.get("study_identity"), sort_keys=True), rec)
        for rec in seen.values():
            where = f"the trial file {path_of(folder, rec['number'])}"
            identity.warn(where, identity.check(rec.get("study_identity"), current, where,
                                                f"move {folder} away, or use another --output"))
    numbers = [r["number"] for r in records]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"{folder} holds two files for one trial number")
    by_number = {r["number"]: r for r in records}
    for number in range(max(numbers) + 1):  # a gap was a failed trial: keep the numbering
        rec = by_number.get(number)
        study.add_trial(_frozen(rec) if rec else optuna.trial.create_trial(state=TrialState.FAIL))
    return len(records)


def study_from_files(folder, name: str) -> optuna.Study:
    """An in-memory study holding ``folder``'s trials (for reading; its sampler is not used)."""
    study = optuna.create_study(study_name=name, direction="maximize")
    records = load_records(folder)
    if not records:
        raise ValueError(f"{folder} holds no trial files ({PATTERN})")
    add_saved_trials(study, folder)
    if records[0].get("study_identity") is not None:
        study.set_user_attr("identity", records[0]["study_identity"])
    return study
