"""Compare methods on held-out task sequences over several seeds, with the noise shown.

Runs are scored on each task's validation split, which no search or tuning ever saw. Per method: mean ±
std over the (sequence, seed) runs, and the paired difference from the flat baseline on the same units with
a 95% confidence interval, which says whether the difference is distinguishable from noise.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

from lrdist import stats
from lrdist.continual import Recipe, SequentialRunner, resolve_device
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


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def evaluate(model: str, sequences: list[list[str]], recipe: Recipe, seeds: list[int], output: str,
             methods=DEFAULT_METHODS, combined: str | None = None, data_dir=None, backend="auto",
             progress=True, device=None, tuned: dict | None = None) -> dict:
    """Every (sequence, method, seed) run is saved to OUTPUT/runs/ as it finishes; running the same
    command again skips the runs already there (unless the method's settings changed)."""
    if not seeds:
        raise ValueError("evaluate needs at least one seed")
    resolve_device(device)  # a device this machine lacks fails now, before any output is written
    chosen = build_methods(methods, combined, tuned)
    recipe = replace(recipe, eval_on="validation")  # the split no search or tuning has seen
    out = Path(output)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs = []
    for tasks in sequences:
        runner = None  # loaded only if some run of this sequence is still to do
        for label, method in chosen.items():
            for seed in seeds:
                path = out / "runs" / f"{'-'.join(tasks)}-{label}-seed{seed}.json"
                if path.is_file():
                    saved = json.loads(path.read_text())
                    if saved.get("method_config") == method.describe() and saved.get("recipe") == recipe.__dict__:
                        runs.append(saved)
                        continue
                if runner is None:
                    runner = SequentialRunner(model, tasks, recipe, data_dir=data_dir, backend=backend,
                                              device=device, progress=progress)
                res = runner.run(method, seed=seed)
                run = {"tasks": tasks, "method": label, "seed": seed, "method_config": method.describe(),
                       "recipe": recipe.__dict__, **{k: res[k] for k in METRICS},
                       **{k + "_se": res[k + "_se"] for k in METRICS},
                       "accuracy_matrix": res["accuracy_matrix"], "accuracy_se_matrix": res["accuracy_se_matrix"],
                       "lrs": res["lrs"], "method_stats": res["method_stats"]}
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(run))
                tmp.replace(path)  # a kill mid-write leaves no half file
                runs.append(run)
                print(f"{'-'.join(tasks):<12} {label:<9} seed {seed}: objective "
                      f"{stats.pm(res['objective'], res['objective_se'])}  "
                      f"forgetting {res['mean_forgetting']:+.4f}", flush=True)
    result = {"sequences": sequences, "seeds": seeds, "tuned": tuned or {}, "summary": summarise_runs(runs, chosen),
              "runs": runs}
    (out / "evaluate.json").write_text(json.dumps(result, indent=2))
    (out / "evaluate.md").write_text(format_summary(result) + "\n")
    return result


def summarise_runs(runs: list[dict], labels) -> list[dict]:
    """Per method: mean ± std of each metric over its runs, and its paired difference from flat."""
    unit = lambda r: (tuple(r["tasks"]), r["seed"])  # noqa: E731
    flat = {unit(r): r for r in runs if r["method"] == "flat"}
    summary = []
    for label in labels:
        mine = [r for r in runs if r["method"] == label]
        row = {"method": label, "runs": len(mine)}
        for key in METRICS:
            row[key], row[key + "_std"] = mean_std([r[key] for r in mine])
        paired = [r for r in mine if unit(r) in flat]
        if label != "flat" and paired:
            for key in ("objective", "mean_forgetting"):
                diff = stats.paired_difference([r[key] for r in paired], [flat[unit(r)][key] for r in paired])
                row[key + "_vs_flat"] = diff.as_dict()
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


def format_summary(result: dict) -> str:
    seqs = ", ".join("→".join(s) for s in result["sequences"])
    lines = [f"sequences: {seqs}; seeds: {result['seeds']}; scored on the validation split", "",
             "| method | objective (mean ± std) | Δ objective vs flat [95% CI] | forgetting (mean ± std) | "
             "Δ forgetting vs flat [95% CI] | final accuracy | runs |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(result["summary"], key=lambda r: -r["objective"]):
        lines.append(f"| {r['method']} | {stats.pm(r['objective'], r['objective_std'])} | {_diff_cell(r, 'objective')} | "
                     f"{r['mean_forgetting']:+.4f} ± {r['mean_forgetting_std']:.4f} | "
                     f"{_diff_cell(r, 'mean_forgetting')} | "
                     f"{stats.pm(r['mean_final_accuracy'], r['mean_final_accuracy_std'])} | {r['runs']} |")
    lines += ["", "Objective: first task's accuracy after the last task + last task's accuracy (higher is better). "
              "Forgetting: drop of earlier tasks from their best (lower is better). Δ: paired over "
              "(sequence, seed); an interval that includes 0 means no difference was shown."]
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
