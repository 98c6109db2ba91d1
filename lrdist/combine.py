"""Combine the distributions found by several studies into one (the paper's "BERTcL combined").

From each study take the best (or top-k) completed trials' LRs and combine them region by region: the
geometric mean by default (the paper's rule), or the arithmetic mean or median. The result is a
distribution file that ``lrdist finetune --method dist --lrs FILE`` takes.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import optuna

from lrdist import file_checks, identity
from lrdist.files import read_json, write_json
from lrdist.search import completed_trials, folder_storage, make_storage
from lrdist.trial_files import PATTERN, check_against, check_files, study_from_files

RULES = ("geometric", "arithmetic", "median")


def open_studies(source: str, study_name: str | None = None) -> list[optuna.Study]:
    """A search output folder (its search.json names storage and study) or a storage URL."""
    path = Path(source)
    if path.is_dir():
        meta = path / "search.json"
        if not meta.is_file():
            raise FileNotFoundError(f"{path} holds no search.json: not an `lrdist search` output folder")
        info = read_json(meta, fix="it is not the file `lrdist search` wrote")
        file_checks.search_info(info, meta)
        name, url = study_name or info["study_name"], folder_storage(path, info)
        if url is not None and name not in {s.study_name for s in optuna.get_all_study_summaries(make_storage(url))}:
            if not any((path / "trials").glob(PATTERN)):  # e.g. an empty study.db a refused search left
                raise ValueError(f"{url} holds no study {name!r} and {path / 'trials'} no trial files: nothing "
                                 f"to read (run the search, or restore its trial files)")
            url = None
        if url is None:  # no database here (e.g. a study committed as trial files): rebuild it from them
            return [study_from_files(path / "trials", name, info.get("identity"))]
        study = optuna.load_study(study_name=name, storage=make_storage(url))
        if info.get("identity") is not None and study.user_attrs.get("identity") is not None:
            identity.check(info["identity"], study.user_attrs["identity"], f"{meta} (beside the study in {url})",
                           "restore the search.json that search wrote, or read the trial files alone (move the "
                           "database away)")
        # a database beside trial files (e.g. copied from another machine): both must hold the same study
        check_files(path / "trials", study.user_attrs.get("identity") or info.get("identity"),
                    f"move {path / 'trials'} away, or the database")
        check_against(study, path / "trials", url)
        return [study]
    if "://" not in source and not source.startswith("journal:") and not source.endswith((".log", ".journal")):
        raise FileNotFoundError(f"{source} is neither a search folder nor a storage URL")
    storage = make_storage(source)
    names = [study_name] if study_name else [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if not names:
        raise ValueError(f"no studies in {source}")
    return [optuna.load_study(study_name=n, storage=storage) for n in names]


def best_lrs(study: optuna.Study, top_k: int = 1) -> list[list[float]]:
    trials = completed_trials(study)
    if len(trials) < top_k:
        raise ValueError(f"study {study.study_name!r} has {len(trials)} completed trial(s), fewer than top-k = {top_k}")
    return [t.user_attrs["results"]["lrs"] for t in trials[:top_k]]


def combine(distributions: list[list], rule: str = "geometric") -> list:
    """Region by region over the distributions that have a value there (None: an empty region of the model
    a study ran on). A region no distribution has a value for stays None."""
    if rule not in RULES:
        raise ValueError(f"unknown combination rule {rule!r}; choose from {', '.join(RULES)}")
    if not distributions:
        raise ValueError("nothing to combine")
    n = len(distributions[0])
    if any(len(d) != n for d in distributions):
        raise ValueError("the distributions to combine have different numbers of regions")
    out = []
    for column in zip(*distributions):
        col = [v for v in column if v is not None]
        if not col:
            out.append(None)
        elif rule == "geometric":
            out.append(math.exp(sum(math.log(v) for v in col) / len(col)))
        elif rule == "arithmetic":
            out.append(sum(col) / len(col))
        else:
            out.append(statistics.median(col))
    return out


# what studies combined together may differ in: their tasks (and so their rows), how the search went about
# it, and where it ran; never the model, the recipe, the precision or the objective
MAY_DIFFER = identity.IGNORED + ("tasks", "data", "space", "sampler", "pruner", "device")


def check_combinable(per_study: list[dict]) -> None:
    """Studies made from one model, recipe and objective (one line naming the two and the field)."""
    known = [s for s in per_study if isinstance(s.get("identity"), dict)]
    for s in known[1:]:
        first, mine = identity.upgrade(known[0]["identity"]), identity.upgrade(s["identity"])
        name = identity.first_difference(first, mine, ignore=MAY_DIFFER)
        if name:
            raise ValueError(f"study {s['study']!r} ({s['source']}) and study {known[0]['study']!r} "
                             f"({known[0]['source']}) were made from different things "
                             f"({identity.explain(first, mine, name)}); combine studies of one model, recipe and "
                             f"objective")


def combine_sources(sources: list[str], output: str, top_k: int = 1, rule: str = "geometric",
                    study_name: str | None = None) -> dict:
    """Combine the best trials of the studies in ``sources`` into ``output``, which records each study's
    identity; studies made from different models, recipes or objectives are refused first."""
    per_study = []
    for source in sources:
        for study in open_studies(source, study_name):
            ident = study.user_attrs.get("identity")
            per_study.append({"source": source, "study": study.study_name, "lrs": best_lrs(study, top_k),
                              "tasks": ident.get("tasks") if isinstance(ident, dict) else None, "identity": ident})
    check_combinable(per_study)
    chosen = [lrs for s in per_study for lrs in s["lrs"]]
    result = {"kind": "absolute", "lrs": combine(chosen, rule), "rule": rule, "top_k": top_k,
              "studies": per_study}
    write_json(output, result)
    return result
