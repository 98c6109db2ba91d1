"""Compare methods on held-out task sequences over several seeds, with the noise shown.

Runs are scored on each task's validation split, which no search or tuning ever saw. Per method: mean ±
std over the (sequence, seed) runs, and the paired difference from the flat baseline on the same units with
a 95% confidence interval, which says whether the difference is distinguishable from noise.
"""
from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import replace
from pathlib import Path

from lrdist import file_checks, identity, stats
from lrdist.continual import Recipe, SequentialRunner, resolve_device
from lrdist.files import read_json, write_atomic, write_json
from lrdist.preflight import InputError
from lrdist.methods import Method, make_method
from lrdist.tune import method_with

DEFAULT_METHODS = ("flat", "combined", "paper", "ewc", "migu", "llrd", "lora")
METHOD_NAMES = DEFAULT_METHODS
METRICS = ("objective", "mean_forgetting", "bwt", "mean_final_accuracy")


def build_methods(names, combined: str | None, tuned: dict | None = None) -> dict[str, Method]:
    """Methods by label. ``combined``/``paper`` are distributions; the others are baselines, with their
    tuned knobs when ``tuned`` has them."""
    unknown = [n for n in names if n not in METHOD_NAMES]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHOD_NAMES)}")
    if "combined" in names and combined is None:
        raise ValueError("--methods includes 'combined' but no --combined distribution file was given "
                         "(make one with `lrdist combine`, or leave 'combined' out)")
    tuned = tuned or {}
    out = {}
    for name in names:
        if name == "combined":
            out[name] = make_method("dist", lrs=combined)
        elif name == "paper":
            out[name] = make_method("dist", lrs="paper")
        else:
            out[name] = method_with(name, tuned.get(name))
    return out


def settings_tag(settings: dict) -> str:
    """8 hex digits of a hash of a method's settings (identity.method_settings): part of a run file's name."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def run_path(output, tasks: list[str], label: str, seed: int, settings: dict) -> Path:
    """Where a run of ``label`` with these method settings is saved: runs of one label whose settings
    differ (a baseline tuned again, a rewritten distribution file) are different runs, kept side by side."""
    return Path(output) / "runs" / f"{'-'.join(tasks)}-{label}-seed{seed}-{settings_tag(settings)}.json"


def find_run(output, tasks: list[str], label: str, seed: int, method: Method, recipe: Recipe) -> Path | None:
    """The saved run of ``method`` (labelled ``label``) on ``tasks`` with ``seed`` in ``output``, or None:
    its file named by the method's settings, or one named before names held them (PAIR-LABEL-seedS.json)
    whose recorded method settings are these."""
    settings = identity.method_settings(method, recipe)
    path = run_path(output, tasks, label, seed, settings)
    if path.is_file():
        return path
    old = Path(output) / "runs" / f"{'-'.join(tasks)}-{label}-seed{seed}.json"
    if old.is_file():
        stored = identity.upgrade(saved_run(old).get("identity"))
        if isinstance(stored, dict) and stored.get("method") == json.loads(json.dumps(settings)):
            return old
    return None


def saved_run(path: Path) -> dict:
    """A run file, its fields checked (lrdist.file_checks); a damaged one is named in one line."""
    run = read_json(path, "the saved run", fix="--force moves it aside and runs it again")
    file_checks.run_file(run, path)
    return run


def check_saved_runs(model: str, sequences: list[list[str]], recipe: Recipe, seeds: list[int], output,
                     methods: dict | None = None, data_dir=None, force: bool = False, device=None) -> None:
    """Before any work: EVERY run saved in OUTPUT/runs (whatever its method, seed or pair) was made from
    the same model, data (of its tasks), recipe and device as this command would use; its method settings
    are not compared here (a run of other settings is another run, saved under another name, see
    ``run_path``), so nothing found after tuning can differ. A mismatch is refused in one line, or with
    ``force`` the runs made from something else (and the old summary) are moved into
    OUTPUT/replaced-<date>/ and run again. (``sequences``, ``seeds`` and ``methods`` are what this command
    runs; every file is checked all the same.)"""
    recipe = replace(recipe, eval_on="validation")
    out = Path(output)
    stale, notes = [], []
    for path in sorted((out / "runs").glob("*.json")):
        try:
            saved = saved_run(path)
        except InputError as exc:  # damaged: named, and moved aside like a mismatch with --force
            stale.append((path, str(exc)))
            continue
        named = _named_for_other_settings(path, saved)
        if named:
            stale.append((path, f"{named}; {identity.way_out(out)}"))
            continue
        current = identity.make(model, saved["tasks"], recipe, data_dir, device, seed=saved["seed"])
        try:
            notes.append(identity.check(saved.get("identity"), current, f"the saved run {path}",
                                        identity.way_out(out), identity.IGNORED + ("method",)))
        except identity.IdentityMismatch as exc:
            stale.append((path, str(exc)))
    if stale and not force:
        path, message = stale[0]
        more = f" ({len(stale)} saved runs differ)" if len(stale) > 1 else ""
        raise identity.IdentityMismatch(message + more)
    if stale:
        identity.move_aside(out, [p for p, _ in stale] + [out / "evaluate.json", out / "evaluate.md"])
    notes = [n for n in notes if n]
    if notes:
        identity.warn(f"{len(notes)} saved run(s) in {out / 'runs'}", notes[0])


def _named_for_other_settings(path: Path, saved: dict) -> str | None:
    """Why a run file's name (its method settings' hash, ``run_path``) disagrees with the method settings it
    records (a file edited or renamed by hand), or None. A name without the hash (written before names held
    it) is matched by its recorded settings when found (``find_run``)."""
    stem = f"{'-'.join(saved['tasks'])}-{saved['method']}-seed{saved['seed']}"
    if path.name == f"{stem}.json":
        return None
    ident = saved.get("identity")
    method = ident.get("method") if isinstance(ident, dict) else None
    upgraded = identity.upgrade(ident).get("method") if isinstance(ident, dict) else None
    names = {f"{stem}-{settings_tag(m)}.json" for m in (method, upgraded) if isinstance(m, dict)}
    if path.name in names:
        return None
    if not names:
        return f"{path}: field identity.method is missing, but the file's name records method settings (a hash)"
    return (f"{path}: field identity.method ({identity.shown(method)}) is not the method settings the file's name "
            f"records (their hash): a file edited or renamed by hand")


def evaluate(model: str, sequences: list[list[str]], recipe: Recipe, seeds: list[int], output: str,
             methods=DEFAULT_METHODS, combined: str | None = None, data_dir=None, backend="auto",
             progress=True, device=None, tuned: dict | None = None, force: bool = False) -> dict:
    """Every (sequence, method, seed) run is saved to OUTPUT/runs/ as it finishes, with its identity;
    running the same command again reuses the runs already there when they were made from the same
    model, data, recipe, method settings and seed, and refuses (or with ``force`` moves aside and reruns)
    those made from something else, before any training."""
    if not seeds:
        raise ValueError("evaluate needs at least one seed")
    resolve_device(device)  # a device this machine lacks fails now, before any output is written
    chosen = build_methods(methods, combined, tuned)
    recipe = replace(recipe, eval_on="validation")  # the split no search or tuning has seen
    out = Path(output)
    check_saved_runs(model, sequences, recipe, seeds, out, chosen, data_dir, force, device)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    reused = {}  # (tasks, label, seed) -> the saved run, its whole identity compared before any training
    for tasks in sequences:
        for label, method in chosen.items():
            for seed in seeds:
                found = find_run(out, tasks, label, seed, method, recipe)
                if found is not None:
                    saved = saved_run(found)
                    current = identity.make(model, tasks, recipe, data_dir, device,
                                            method=identity.method_settings(method, recipe), seed=seed)
                    identity.check(saved.get("identity"), current, f"the saved run {found}", identity.way_out(out))
                    reused[(tuple(tasks), label, seed)] = saved
    runs = []
    for tasks in sequences:
        runner = None  # loaded only if some run of this sequence is still to do
        for label, method in chosen.items():
            for seed in seeds:
                if (tuple(tasks), label, seed) in reused:
                    runs.append(reused[(tuple(tasks), label, seed)])
                    continue
                path = run_path(out, tasks, label, seed, identity.method_settings(method, recipe))
                if runner is None:
                    runner = SequentialRunner(model, tasks, recipe, data_dir=data_dir, backend=backend,
                                              device=device, progress=progress)
                res = runner.run(method, seed=seed)
                run = {"tasks": tasks, "method": label, "seed": seed, "method_config": method.describe(),
                       "recipe": recipe.__dict__, **{k: res[k] for k in METRICS},
                       **{k + "_se": res[k + "_se"] for k in METRICS},
                       "accuracy_matrix": res["accuracy_matrix"], "accuracy_se_matrix": res["accuracy_se_matrix"],
                       "eval_samples": res["eval_samples"], "majority_rate": res["majority_rate"],
                       "lrs": res["lrs"], "method_stats": res["method_stats"], "total_seconds": res["total_seconds"],
                       "identity": runner.identity(method, seed)}
                write_json(path, run, indent=None)
                runs.append(run)
                bad = stats.unlearned(run)
                print(f"{'-'.join(tasks):<12} {label:<9} seed {seed}: objective "
                      f"{stats.pm(res['objective'], res['objective_se'])}  "
                      f"forgetting {res['mean_forgetting']:+.4f}"
                      + (f"  (not learned: {', '.join(bad)})" if bad else ""), flush=True)
    result = {"sequences": sequences, "seeds": seeds, "tuned": tuned or {}, "summary": summarise_runs(runs, chosen),
              "runs": runs}
    write_outputs(result, out)
    return result


def write_outputs(result: dict, out: Path) -> None:
    """evaluate.json and evaluate.md, each written whole (lrdist.files)."""
    write_json(out / "evaluate.json", result)
    write_atomic(out / "evaluate.md", format_summary(result) + "\n")


def summarise_runs(runs: list[dict], labels) -> list[dict]:
    """Per method: n runs, mean ± std of each metric over them (no std for one run), its paired difference
    from flat, and in how many runs each task was not learned (stats.unlearned)."""
    unit = lambda r: (tuple(r["tasks"]), r["seed"])  # noqa: E731
    flat = {unit(r): r for r in runs if r["method"] == "flat"}
    summary = []
    for label in labels:
        mine = [r for r in runs if r["method"] == label]
        if not mine:
            continue
        row = {"method": label, "runs": len(mine)}
        for key in METRICS:
            row[key], row[key + "_std"] = stats.mean_sd([r[key] for r in mine])
        paired = [r for r in mine if unit(r) in flat]
        if label != "flat" and paired:
            for key in ("objective", "mean_forgetting"):
                diff = stats.paired_difference([r[key] for r in paired], [flat[unit(r)][key] for r in paired])
                row[key + "_vs_flat"] = diff.as_dict()
        judged = [r for r in mine if r.get("majority_rate")]
        row["learning_judged"] = len(judged)
        row["not_learned"] = {}
        for r in judged:
            for task in stats.unlearned(r):
                row["not_learned"][task] = row["not_learned"].get(task, 0) + 1
        ratios = [v for r in mine for v in r.get("method_stats", {}).get("penalty_to_loss_grad", {}).values()]
        if ratios:
            row["penalty_to_loss_grad"] = statistics.fmean(ratios)
        summary.append(row)
    return summary


def _diff_cell(row: dict, key: str) -> str:
    d = row.get(key + "_vs_flat")
    if d is None:
        return "—"
    return str(stats.PairedDifference(d["mean"], d["low"], d["high"], d["n"], d["level"]))


def _mean_sd(row: dict, key: str, signed: bool = False) -> str:
    return f"{row[key]:{'+' if signed else ''}.4f} ± {stats.sd_text(row.get(key + '_std'))}"


def _not_learned_cell(row: dict) -> str:
    if not row.get("learning_judged"):
        return "not recorded"
    bad = row.get("not_learned") or {}
    return ", ".join(f"{t} {k}/{row['learning_judged']}" for t, k in bad.items()) or "none"


def format_summary(result: dict) -> str:
    seqs = ", ".join("→".join(s) for s in result["sequences"])
    lines = [f"sequences: {seqs}; seeds: {result['seeds']}; scored on {result.get('scored_on', 'the validation split')}; "
             f"n = runs per method", "",
             "| method | n | objective (mean ± std) | Δ objective vs flat [95% CI] | forgetting (mean ± std) | "
             "Δ forgetting vs flat [95% CI] | final accuracy | not learned (runs) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["summary"], key=lambda r: -r["objective"]):
        lines.append(f"| {r['method']} | {r['runs']} | {_mean_sd(r, 'objective')} | {_diff_cell(r, 'objective')} | "
                     f"{_mean_sd(r, 'mean_forgetting', signed=True)} | {_diff_cell(r, 'mean_forgetting')} | "
                     f"{_mean_sd(r, 'mean_final_accuracy')} | {_not_learned_cell(r)} |")
    lines += ["", "Objective: first task's accuracy after the last task + last task's accuracy (higher is better). "
              "Forgetting: drop of earlier tasks from their best (lower is better). Δ: paired over "
              "(sequence, seed); an interval that includes 0 means no difference was shown. One run has no "
              "spread: '-'."]
    if any(r.get("not_learned") for r in result["summary"]):
        lines.append(f"Not learned: {stats.UNLEARNED_RULE}. The forgetting of such a task measures nothing, "
                     f"and neither does an objective built on it.")
    if result.get("note"):
        lines.append(result["note"])
    if result.get("unrecorded"):
        lines.append(f"{result['unrecorded']} of the runs record no identity (made before identities were stored): "
                     f"that they share one model and recipe was not checked.")
    tuned = result.get("tuned") or {}
    if tuned:
        lines.append("Baselines tuned on the search pairs (held-out train slice): " +
                     "; ".join(f"{m}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in knobs.items()) for m, knobs in tuned.items()))
    ewc = [r for r in result["summary"] if "penalty_to_loss_grad" in r]
    for r in ewc:
        lines.append(f"{r['method']}: |penalty gradient| / |loss gradient| averaged {r['penalty_to_loss_grad']:.3g} "
                     f"during the later tasks")
    return "\n".join(lines)


# ---- summaries from stored run files (`lrdist summary`) -------------------------------------------------
def is_run(data) -> bool:
    """A run's JSON: an evaluate run file or a finetune results.json."""
    return isinstance(data, dict) and all(k in data for k in ("tasks", "method", "seed", *METRICS))


def load_runs(sources: list[str]) -> list[dict]:
    """The runs in ``sources``: run JSON files (evaluate's OUTPUT/runs/*.json, finetune's results.json),
    evaluate.json files (their runs), or folders searched recursively for run files (files moved aside into
    replaced-* folders are not current and are left out). Each run records the file it came from."""
    files, runs, seen = [], [], {}
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.json") if not any(part.startswith("replaced-")
                                                                     for part in p.relative_to(path).parts))
            files += [(p, False) for p in found]
        elif path.is_file():
            files.append((path, True))
        else:
            raise FileNotFoundError(f"{source} is neither a folder nor a run file")
    for path, named in files:
        data = read_json(path)
        if not isinstance(data, dict):  # no file lrdist writes is anything else: not one to pass over
            file_checks.run_file(data, path)
        found = data.get("runs", []) if named and "summary" in data else [data]
        must = named or path.parent.name == "runs"  # a file given by name, or in evaluate's runs folder
        for run in found:
            if not (must or is_run(run)):
                continue
            file_checks.run_file(run, path)
            key = (tuple(run["tasks"]), run["method"], run["seed"], _settings_key(run))
            if key in seen:
                if {k: v for k, v in seen[key].items() if k != "file"} != run:
                    raise ValueError(f"{path} and {seen[key]['file']} both hold {run['method']} on "
                                     f"{'-'.join(run['tasks'])} with seed {run['seed']} and the same settings, "
                                     f"with other results; summarise them separately")
                continue
            seen[key] = {**run, "file": str(path)}
            runs.append(seen[key])
    if not runs:
        raise FileNotFoundError(f"no run files (evaluate runs or finetune results.json) in {', '.join(sources)}")
    return runs


def _settings(run: dict):
    """The method settings a run recorded (identity.method, upgraded), or None where it recorded none."""
    ident = identity.upgrade(run.get("identity"))
    return ident.get("method") if isinstance(ident, dict) else None


def _settings_key(run: dict) -> str:
    return json.dumps(_settings(run), sort_keys=True)


def label_variants(runs: list[dict]) -> list[dict]:
    """The runs, with the runs of one label made with different recorded method settings (evaluate keeps
    each, named by its settings: a baseline tuned again) labelled apart by the settings that differ:
    'flat (lr=0.001)'. Runs that recorded no settings stay in their label's row unless it has several."""
    recorded: dict = {}
    for r in runs:
        if isinstance(_settings(r), dict):
            recorded.setdefault(r["method"], {}).setdefault(_settings_key(r), _settings(r))
    labels = {}
    for label, kinds in recorded.items():
        if len(kinds) < 2:
            continue
        differ = [f for f in dict.fromkeys(f for d in kinds.values() for f in d)
                  if len({json.dumps(d[f]) if f in d else None for d in kinds.values()}) > 1]
        named = {key: ", ".join(f"{f}={identity.shown(d[f]) if f in d else 'unset'}" for f in differ)
                 for key, d in kinds.items()}
        if len(set(named.values())) < len(named):  # long values cut short alike: the settings' hash tells apart
            named = {key: f"{text}, settings {settings_tag(kinds[key])}" for key, text in named.items()}
        labels.update({(label, key): f"{label} ({text})" for key, text in named.items()})
        labels[(label, _settings_key({}))] = f"{label} (settings not recorded)"  # ({}: a run without identity)
    return [{**r, "method": labels.get((r["method"], _settings_key(r)), r["method"])} for r in runs]


def check_one_run_per_unit(runs: list[dict]) -> None:
    """One run per label, pair and seed: a table or a paired difference over two would count a unit twice."""
    seen: dict = {}
    for r in runs:
        other = seen.setdefault((r["method"], tuple(r["tasks"]), r["seed"]), r)
        if other is not r:
            raise ValueError(f"{other.get('file')} and {r.get('file')} both hold {r['method']} on "
                             f"{'-'.join(r['tasks'])} with seed {r['seed']}; summarise them separately")


def check_alike(runs: list[dict]) -> None:
    """Runs summarised together were made alike: one model, recipe and device, and the same rows of every
    task they share (each run's identity, where recorded, is compared on everything but its tasks, method,
    seed and package versions; its data task by task). Refused in one line naming both files."""
    first = next((r for r in runs if r.get("identity")), None)
    rows: dict = {}  # task -> (its rows' hashes, the first file that used them)
    for r in runs:
        if first is None or not r.get("identity"):
            continue
        mine = identity.upgrade(r["identity"])
        name = identity.first_difference(identity.upgrade(first["identity"]), mine,
                                         ignore=identity.IGNORED + ("tasks", "data", "method", "seed"))
        other = first
        if name is None:
            for task, hashes in (mine.get("data") or {}).items():
                seen, other = rows.setdefault(task, (hashes, r))
                name = identity.first_difference(seen, hashes, f"data.{task}", ())
                if name:
                    break
        if name:
            raise ValueError(f"{r['file']} and {other['file']} were made from different things "
                             f"({identity.explain(identity.upgrade(other['identity']), mine, name)}); "
                             f"summarise them separately")


def summary_of(runs: list[dict]) -> dict:
    """evaluate.json's content (sequences, seeds, summary, runs) for runs made alike (``check_alike``)."""
    check_alike(runs)
    runs = label_variants(runs)
    check_one_run_per_unit(runs)
    labels = list(dict.fromkeys(["flat"] + [r["method"] for r in runs]))
    flats = sorted(m for m in labels if m.startswith("flat ("))
    sequences = [list(s) for s in dict.fromkeys(tuple(r["tasks"]) for r in runs)]
    seeds = sorted({r["seed"] for r in runs})
    unrecorded = sum(not r.get("identity") for r in runs)
    scored = sorted({r.get("eval_on") or r.get("recipe", {}).get("eval_on") or "validation" for r in runs})
    scored_on = " and ".join("the validation split" if s == "validation" else "a held-out slice of train"
                             for s in scored)
    return {"sequences": sequences, "seeds": seeds, "tuned": {}, "summary": summarise_runs(runs, labels),
            "runs": runs, "unrecorded": unrecorded, "scored_on": scored_on,
            "note": (f"No Δ vs flat: flat was run with {len(flats)} settings ({'; '.join(flats)}); summarise the "
                     f"runs of one of them with the other methods' to compare." if flats else None)}
