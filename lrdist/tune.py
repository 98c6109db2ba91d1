"""Give every baseline the tuning budget the distribution search got (``lrdist evaluate --tune-baselines N``).

Each baseline has its knobs: the flat LR, EWC's lambda, MIGU's threshold, LLRD's decay, and for LoRA both
its rank and its adapter LR (adapters start at zero and need an LR of their own). For each, an Optuna study
(TPE, in ``OUTPUT/tune.db``, so a rerun resumes) runs N trials on the search pairs, scored like the search:
on the held-out slice of each task's train split, never on the validation split the comparison reports. The
first trial is the knobs' defaults, so tuning can only help the baseline. The best values then go into the
held-out comparison.
"""
from __future__ import annotations

import inspect
import statistics
import zlib
from dataclasses import replace
from pathlib import Path

import optuna
from optuna.trial import TrialState

from lrdist import identity, trial_files
from lrdist.continual import Recipe, SequentialRunner
from lrdist.files import write_json
from lrdist.preflight import InputError
from lrdist.search import TPE_STARTUP_TRIALS
from lrdist.methods import make_method

# baseline -> {make_method keyword: how Optuna suggests it}; each knob's first trial is make_method's default
# (the recipe's LR for flat), read from its signature so the two cannot drift apart
KNOBS = {
    "flat": {"lr": lambda t: t.suggest_float("lr", 1e-6, 1e-3, log=True)},
    "ewc": {"ewc_lambda": lambda t: t.suggest_float("ewc_lambda", 1e-3, 1e3, log=True)},
    "migu": {"migu_threshold": lambda t: t.suggest_float("migu_threshold", 0.0, 0.95)},
    "llrd": {"llrd_decay": lambda t: t.suggest_float("llrd_decay", 0.5, 1.0)},
    "lora": {"lora_rank": lambda t: t.suggest_categorical("lora_rank", [2, 4, 8, 16, 32]),
             "lora_lr": lambda t: t.suggest_float("lora_lr", 1e-5, 1e-2, log=True)},
}


def default_knobs(name: str, recipe: Recipe) -> dict:
    """The knobs' values when untuned: make_method's defaults, and the recipe's LR for flat."""
    if name == "flat":
        return {"lr": recipe.lr}
    defaults = inspect.signature(make_method).parameters
    return {k: defaults[k].default for k in KNOBS[name]}


def method_with(name: str, knobs: dict | None = None):
    """A baseline with tuned knobs (``{"lr": 3e-5}`` for flat, make_method's keywords for the others)."""
    knobs = knobs or {}
    if name == "flat":
        from lrdist.methods import Flat
        return Flat(knobs.get("lr"))
    return make_method(name, **knobs)


def study_identity(model: str, pairs: list[list[str]], recipe: Recipe, name: str, data_dir=None,
                   objective: str = "paper", device=None) -> dict:
    """What a tuning study was made from: the model, the search pairs' data, the recipe (seed included),
    the device, the baseline and its knobs, and the objective."""
    tasks = list(dict.fromkeys(t for pair in pairs for t in pair))
    return identity.make(model, tasks, replace(recipe, eval_on="heldout"), data_dir, device, pairs=pairs,
                         method={"method": name, "knobs": sorted(KNOBS[name])}, objective=objective)


def check_studies(model: str, pairs: list[list[str]], recipe: Recipe, output, methods, data_dir=None,
                  objective: str = "paper", force: bool = False, device=None) -> None:
    """Before any work, for every baseline to tune: its study in OUTPUT/tune.db, and every one of its trial
    files (OUTPUT/trials/tune-NAME/), were made from the same things, and the files agree with the study
    (lrdist.trial_files.check_against). A mismatch is refused in one line, or with ``force`` tune.db,
    tuned.json and the trial files move into OUTPUT/replaced-<date>/ and tuning starts afresh."""
    out = Path(output)
    db = out / "tune.db"
    existing = set()
    if db.is_file():
        from lrdist.preflight import sqlite_intact
        sqlite_intact(db)
        storage = f"sqlite:///{db.resolve()}"
        existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    try:
        for name in methods:
            current = study_identity(model, pairs, recipe, name, data_dir, objective, device)
            folder = out / "trials" / f"tune-{name}"
            if f"tune-{name}" in existing:
                study = optuna.load_study(study_name=f"tune-{name}", storage=storage)
                stored, where = study.user_attrs.get("identity"), f"the tuning study tune-{name} in {db}"
                if stored is not None or study.get_trials(deepcopy=False):  # (else: stopped before its first trial)
                    identity.warn(where, identity.check(stored, current, where, identity.way_out(out)))
                    trial_files.check_against(study, folder, db, identity.way_out(out))
            try:
                trial_files.check_files(folder, current, identity.way_out(out))
            except InputError as exc:  # a damaged file: named, and moved aside like a mismatch with --force
                raise identity.IdentityMismatch(f"{exc}; or {identity.way_out(out)}") from None
    except identity.IdentityMismatch:
        if not force:
            raise
        identity.move_aside(out, [db, out / "tuned.json", out / "trials"])


def trial_sampler(name: str, seed: int, done: int) -> optuna.samplers.TPESampler:
    """The sampler that draws a tuning study's next trial once ``done`` trials are complete: seeded by the
    study, the recipe's seed and ``done``, so that a study resumed one trial per call, after a kill (whose
    trial is retried with its own knobs) or from its trial files draws exactly what an uninterrupted one
    draws, and never replays the first random draw of a sampler seeded once per call. As the search's
    TPE: 5 random trials, then TPE."""
    mixed = zlib.crc32(f"tune-{name}:{seed}:{done}".encode())
    return optuna.samplers.TPESampler(seed=mixed, n_startup_trials=TPE_STARTUP_TRIALS)


def tune_baselines(model: str, pairs: list[list[str]], recipe: Recipe, trials: int, output: str,
                   methods=tuple(KNOBS), data_dir=None, backend: str = "auto", device=None,
                   progress: bool = True, objective: str = "paper", force: bool = False) -> dict[str, dict]:
    """N trials per baseline on ``pairs``; returns {method: {knob: best value}} (also in OUTPUT/tuned.json).
    OUTPUT/tune.db is resumed only when its studies were made from the same model, data and recipe
    (``check_studies``)."""
    from lrdist.search import compact, objective_value
    if trials < 1:
        raise ValueError(f"--tune-baselines needs at least 1 trial, got {trials}")
    if not pairs:
        raise ValueError("--tune-baselines needs the search pairs (--search-pairs) to tune on")
    unknown = [m for m in methods if m not in KNOBS]
    if unknown:
        raise ValueError(f"no knob to tune for {unknown}; tunable baselines: {', '.join(KNOBS)}")
    check_studies(model, pairs, recipe, output, methods, data_dir, objective, force, device)
    recipe = replace(recipe, eval_on="heldout")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(out / 'tune.db').resolve()}"
    runners: dict = {}

    def score(method, trial) -> float:
        values, kept = [], []
        for tasks in pairs:
            key = tuple(tasks)
            if key not in runners:
                runners[key] = SequentialRunner(model, tasks, recipe, data_dir=data_dir, device=device,
                                                backend=backend, progress=False)
            res = runners[key].run(method, seed=recipe.seed)
            values.append(objective_value(res, objective))
            kept.append(compact(res))
        trial.set_user_attr("runs", kept)  # each pair's run, as a search trial keeps its results
        return statistics.fmean(values)

    from tqdm.auto import tqdm
    best, identities = {}, {}
    bar = tqdm(total=trials * len(methods), desc="tuning baselines", disable=not progress)
    for name in methods:
        knobs = KNOBS[name]
        study = optuna.create_study(storage=storage, study_name=f"tune-{name}", direction="maximize",
                                    load_if_exists=True, sampler=trial_sampler(name, recipe.seed, 0))
        saved = out / "trials" / f"tune-{name}"  # each finished trial also as a file (lrdist.trial_files)
        if "identity" not in study.user_attrs:  # a new study (checked above otherwise): say what it is of
            current = study_identity(model, pairs, recipe, name, data_dir, objective, device)
            if not study.get_trials(deepcopy=False):  # resumed from its trial files, if any
                trial_files.add_saved_trials(study, saved, current, f"the tuning study tune-{name}")
            study.set_user_attr("identity", current)
        if not study.get_trials(deepcopy=False):
            study.enqueue_trial(default_knobs(name, recipe))
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(t.number, state=TrialState.FAIL)  # a killed earlier run: redo that trial
            study.enqueue_trial(t.params)
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        trial_files.save_trials(study, saved)  # a trial told but killed before its file was written
        bar.update(min(done, trials))
        while done < trials:
            study.sampler = trial_sampler(name, recipe.seed, done)
            trial = study.ask()
            value = score(method_with(name, {k: suggest(trial) for k, suggest in knobs.items()}), trial)
            study.tell(trial, value)
            trial_files.save_trials(study, saved)
            done += 1
            bar.update()
        first = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))[:trials]  # the budget asked for
        best[name] = dict(max(first, key=lambda t: t.value).params)
        identities[name] = study.user_attrs["identity"]
    bar.close()
    write_json(out / "tuned.json", {"pairs": pairs, "trials": trials, "best": best, "identities": identities})
    return best
