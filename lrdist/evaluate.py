"""Compare methods on held-out task sequences over several seeds: one table of mean +- std."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from lrdist.continual import Recipe, SequentialRunner, resolve_device
from lrdist.methods import Method, make_method

DEFAULT_METHODS = ("flat", "combined", "paper", "ewc", "migu", "llrd")


def build_methods(names, combined: str | None) -> dict[str, Method]:
    out = {}
    for name in names:
        if name == "combined":
            if combined is None:
                continue  # nothing combined yet: skip rather than guess
            out[name] = make_method("dist", lrs=combined)
        elif name == "paper":
            out[name] = make_method("dist", lrs="paper")
        else:
            out[name] = make_method(name)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def evaluate(model: str, sequences: list[list[str]], recipe: Recipe, seeds: list[int], output: str,
             methods=DEFAULT_METHODS, combined: str | None = None, data_dir=None, backend="auto",
             progress=True, device: str | None = None) -> dict:
    """Every (sequence, method, seed) run is saved to OUTPUT/runs/ as it finishes; running the same
    command again skips the runs already there."""
    resolve_device(device)  # a device this machine lacks fails now, before any output is written
    chosen = build_methods(methods, combined)
    out = Path(output)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs = []
    for tasks in sequences:
        runner = None  # loaded only if some run of this sequence is still to do
        for label, method in chosen.items():
            for seed in seeds:
                path = out / "runs" / f"{'-'.join(tasks)}-{label}-seed{seed}.json"
                if path.is_file():
                    runs.append(json.loads(path.read_text()))
                    continue
                if runner is None:
                    runner = SequentialRunner(model, tasks, recipe, data_dir=data_dir, device=device,
                                              backend=backend, progress=progress)
                res = runner.run(method, seed=seed)
                run = {"tasks": tasks, "method": label, "seed": seed, "objective": res["objective"],
                       "mean_forgetting": res["mean_forgetting"], "bwt": res["bwt"],
                       "mean_final_accuracy": res["mean_final_accuracy"],
                       "accuracy_matrix": res["accuracy_matrix"], "lrs": res["lrs"]}
                path.write_text(json.dumps(run))
                runs.append(run)
                print(f"{'-'.join(tasks):<12} {label:<9} seed {seed}: objective {res['objective']:.4f}  "
                      f"forgetting {res['mean_forgetting']:+.4f}")
    summary = []
    for label in chosen:
        mine = [r for r in runs if r["method"] == label]
        row = {"method": label, "runs": len(mine)}
        for key in ("objective", "mean_forgetting", "bwt", "mean_final_accuracy"):
            row[key], row[key + "_std"] = mean_std([r[key] for r in mine])
        summary.append(row)
    result = {"sequences": sequences, "seeds": seeds, "summary": summary, "runs": runs}
    (out / "evaluate.json").write_text(json.dumps(result, indent=2))
    (out / "evaluate.md").write_text(format_summary(result) + "\n")
    return result


def format_summary(result: dict) -> str:
    lines = [f"sequences: {', '.join('-'.join(s) for s in result['sequences'])}; seeds: {result['seeds']}", "",
             "| method | objective | forgetting | BWT | final accuracy | runs |", "|---|---|---|---|---|---|"]
    for r in sorted(result["summary"], key=lambda r: -r["objective"]):
        lines.append(f"| {r['method']} | {r['objective']:.4f} ± {r['objective_std']:.4f} | "
                     f"{r['mean_forgetting']:+.4f} ± {r['mean_forgetting_std']:.4f} | "
                     f"{r['bwt']:+.4f} ± {r['bwt_std']:.4f} | "
                     f"{r['mean_final_accuracy']:.4f} ± {r['mean_final_accuracy_std']:.4f} | {r['runs']} |")
    return "\n".join(lines)
