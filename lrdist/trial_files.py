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

from lrdist import file_checks, identity
from lrdist.files import read_json, write_json
from lrdist.preflight import InputError

SAVED = (TrialState.COMPLETE, TrialState.PRUNED)
PATTERN = "trial-*.json"


def path_of(folder, number: int) -> Path:
    return Path(folder) / f"trial-{number:04d}.json"


def record(trial, ident: dict | None) -> dict:
    """A finished trial as plain JSON."""
    when = lambda d: d.isoformat() if d else None  # noqa: E731
    return {"number": trial.number, "state": trial.state.name, "value": trial.value, "params": trial.params,
            "distributions": {k: distribution_to_json(d) for k, d in trial.distributions.items()},
            "user_attrs": trial.user_attrs, "system_attrs": _plain(trial.system_attrs),
            "intermediate_values": {str(k): v for k, v in trial.intermediate_values.items()},
            "datetime_start": when(trial.datetime_start), "datetime_complete": when(trial.datetime_complete),
            "study_identity": ident}


def _plain(attrs: dict) -> dict:
    """The attributes that are plain JSON (the pruners' history, e.g. Hyperband's completed_rung_N)."""
    out = {}
    for key, value in attrs.items():
        try:
            out[key] = json.loads(json.dumps(value))
        except (TypeError, ValueError):
            pass  # not JSON: no pruner of ours keeps such a value
    return out


def save_trials(study: optuna.Study, folder) -> int:
    """Write each finished trial not yet in ``folder``; returns how many were written. A file already there
    that disagrees with the study's trial (another machine's trial of that number) is refused in one line:
    never left silently beside a database that says otherwise."""
    folder = Path(folder)
    ident = study.user_attrs.get("identity")
    written = 0
    for t in study.get_trials(deepcopy=False, states=SAVED):
        path = path_of(folder, t.number)
        if not path.exists():
            write_json(path, record(t, ident))
            written += 1
        else:
            _same_trial(t, read_json(path, "the trial file"), path, f"study {study.study_name!r}",
                        f"move {path} away (the study's trial is then written in its place)")
    return written


def _same_trial(trial, rec: dict, path, where: str, way_out: str) -> None:
    """Refuse (IdentityMismatch, one line) when a trial file is not the study's trial of its number."""
    if trial is None:
        what = "the study has no such trial"
    elif trial.state.name != rec.get("state"):
        what = f"state {trial.state.name} there, {rec.get('state')} in the file"
    elif trial.value != rec.get("value"):
        what = f"value {trial.value} there, {rec.get('value')} in the file"
    elif trial.params != rec.get("params"):
        what = "other params"
    else:
        return
    raise identity.IdentityMismatch(f"trial {rec.get('number')}: {path} disagrees with {where} ({what}); {way_out}")


def check_files(folder, current: dict | None, way_out: str) -> list[dict]:
    """``folder``'s trial files (load_records), every one made from ``current`` (by default: from what the
    first was made from): one line naming the first file that differs and the field. Returns them."""
    records = load_records(folder)
    seen = {}
    for rec in records:  # checked once per distinct identity
        seen.setdefault(json.dumps(rec.get("study_identity"), sort_keys=True), rec)
    reference = current if current is not None else (records[0].get("study_identity") if records else None)
    for rec in seen.values():
        where = f"the trial file {path_of(folder, rec['number'])}"
        if reference is None and rec.get("study_identity") is None:
            continue
        identity.warn(where, identity.check(rec.get("study_identity"), reference or {}, where, way_out))
    return records


def check_against(study: optuna.Study, folder, where, way_out: str | None = None) -> None:
    """A study's database and its trial files agree: each file is the study's finished trial of its number
    (state, value, params); a trial the database lacks, or one it holds otherwise, is refused in one line
    naming the trial and the way out. Finished trials not yet written as files are fine."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    way_out = way_out or (f"move {where} away to resume from the trial files, or move {folder} away to keep "
                          f"the database")
    for rec in load_records(folder):
        _same_trial(trials.get(rec["number"]), rec, path_of(folder, rec["number"]), where, way_out)


def load_records(folder) -> list[dict]:
    """The trial files of ``folder`` in number order (a damaged one is named in one line)."""
    records = []
    for path in sorted(Path(folder).glob(PATTERN)):  # (none when the folder does not exist)
        rec = read_json(path, "the trial file", fix="restore it from the repository or delete it")
        file_checks.trial_file(rec, path)
        if path.name != path_of(folder, rec["number"]).name:
            raise InputError(f"{path}: field number {rec['number']} does not match the file's name; "
                             f"give the file lrdist wrote")
        records.append(rec)
    return sorted(records, key=lambda r: r["number"])


def _frozen(rec: dict):
    """The trial a record was made from: its values, attributes (the pruners' history in system_attrs,
    absent from files written before it was kept) and times."""
    when = lambda s: datetime.datetime.fromisoformat(s) if s else None  # noqa: E731
    trial = optuna.trial.create_trial(
        state=TrialState[rec["state"]], value=rec["value"], params=rec["params"],
        distributions={k: json_to_distribution(d) for k, d in rec["distributions"].items()},
        user_attrs=rec["user_attrs"], system_attrs=rec.get("system_attrs") or {},
        intermediate_values={int(k): v for k, v in rec["intermediate_values"].items()})
    trial.datetime_start = when(rec.get("datetime_start")) or trial.datetime_start
    trial.datetime_complete = when(rec.get("datetime_complete")) or trial.datetime_complete
    return trial


def add_saved_trials(study: optuna.Study, folder, current: dict | None = None, what: str = "") -> int:
    """Add ``folder``'s trials to ``study``, which must hold none yet; numbers are kept. With ``current``
    (the study's identity now), trial files made from something else are refused in one line first."""
    # every file must come from this very study (with ``current``), or all from one (without)
    records = check_files(folder, current, f"move {folder} away, or use another --output")
    if not records:
        return 0
    if study.get_trials(deepcopy=False):
        raise ValueError(f"{what or 'the study'} already holds trials: trial files are only added to a new one")
    numbers = [r["number"] for r in records]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"{folder} holds two files for one trial number")
    by_number = {r["number"]: r for r in records}
    for number in range(max(numbers) + 1):  # a gap was a failed trial: keep the numbering
        rec = by_number.get(number)
        study.add_trial(_frozen(rec) if rec else optuna.trial.create_trial(state=TrialState.FAIL))
    return len(records)


def study_from_files(folder, name: str, current: dict | None = None) -> optuna.Study:
    """An in-memory study holding ``folder``'s trials (for reading; its sampler is not used). Every file
    must be made from ``current`` (a search folder's search.json identity), or all from one thing."""
    study = optuna.create_study(study_name=name, direction="maximize")
    records = load_records(folder)
    if not records:
        raise ValueError(f"{folder} holds no trial files ({PATTERN})")
    add_saved_trials(study, folder, current)
    ident = current if current is not None else records[0].get("study_identity")
    if ident is not None:
        study.set_user_attr("identity", ident)
    return study
