"""Cheaper runs, measured side by side: does a recipe change cut the time of a run and keep its accuracies?

Runs the flat baseline on a search pair (SST-2 then QQP, scored on the held-out slice of the train splits,
as a search scores) under each variant, interleaved seed by seed so that the variants share the machine's
load, and writes one JSON file per run (atomically: a killed run leaves no half file). The table gives, per variant against the base recipe: the median
time ratio over seeds, and the paired difference of every accuracy and of the objective with its 95%
interval. A change is kept only if it is faster and no accuracy moves beyond noise.

    python benchmarks/recipe_cost.py --seeds 0,1,2 --out benchmarks/science/cost
    python benchmarks/recipe_cost.py --table --out benchmarks/science/cost
    python benchmarks/recipe_cost.py --variants bf16-onednn,bf16-fp32gemm,base --out benchmarks/science/cost-gemm
    python benchmarks/recipe_cost.py --table --against bf16-onednn --out benchmarks/science/cost-gemm
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

from lrdist import stats
from lrdist.cli import default_data_dir, default_model
from lrdist.continual import RECIPES, SequentialRunner
from lrdist.methods import Flat
from lrdist.precision import ENV, cpu_bf16_gemm

VARIANTS = {
    "base": {},
    "bf16": dict(precision="bf16"),
    "buckets8": dict(length_buckets=8),
    "bf16+buckets8": dict(precision="bf16", length_buckets=8),
    "bf16-onednn": dict(precision="bf16"),      # bf16 as oneDNN computes it (emulated on a CPU without bf16 units)
    "bf16-fp32gemm": dict(precision="bf16"),    # bf16 with its GEMMs as fp32 GEMMs of bf16 values (lrdist.precision)
}
GEMM = {"bf16-onednn": "onednn", "bf16-fp32gemm": "fp32"}  # LRDIST_CPU_BF16_GEMM for these variants
CELLS = {"task 1 after task 1": (0, 0), "task 1 after task 2": (1, 0), "task 2 after task 2": (1, 1)}


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")


def table(path: Path, against: str = "base") -> str:
    rows = sorted((json.loads(f.read_text()) for f in path.glob("*.json")), key=lambda r: (r["seed"], r["variant"]))
    base = {r["seed"]: r for r in rows if r["variant"] == against}
    if not base:
        raise SystemExit(f"recipe_cost: no runs of the variant {against!r} in {path} to compare with")
    for r in rows:  # a pair is two runs of one machine, task pair and data (seconds compare only so)
        other = base.get(r["seed"])
        if other and (r.get("cpu"), r["tasks"]) != (other.get("cpu"), other["tasks"]):
            raise SystemExit(f"recipe_cost: {r['variant']} seed {r['seed']} ran on {r.get('cpu')} ({'-'.join(r['tasks'])}), "
                             f"{against} seed {r['seed']} on {other.get('cpu')} ({'-'.join(other['tasks'])}); "
                             f"keep other machines' runs in another --out")
    lines = [f"| variant | runs | s per run (median) | time / {against} (median over seeds) | "
             + " | ".join(f"Δ {c} [95% CI]" for c in CELLS) + " | Δ objective [95% CI] |",
             "|---" * (5 + len(CELLS)) + "|"]
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        paired = [r for r in mine if r["seed"] in base]
        ratio = statistics.median(r["seconds"] / base[r["seed"]]["seconds"] for r in paired) if paired else float("nan")
        cells = []
        for i, j in CELLS.values():
            d = stats.paired_difference([r["accuracy_matrix"][i][j] for r in paired],
                                        [base[r["seed"]]["accuracy_matrix"][i][j] for r in paired])
            cells.append("—" if name == against else str(d))
        d = stats.paired_difference([r["objective"] for r in paired], [base[r["seed"]]["objective"] for r in paired])
        lines.append(f"| {name} | {len(mine)} | {statistics.median(r['seconds'] for r in mine):.0f} | {ratio:.2f} | "
                     + " | ".join(cells) + f" | {'—' if name == against else d} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="sst2,qqp")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="benchmarks/science/cost", help="folder of run files")
    p.add_argument("--table", action="store_true", help="only print the table of what --out already holds")
    p.add_argument("--against", default="base", help="the variant the table compares the others with")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.table:
        print(table(out, args.against))
        return
    out.mkdir(parents=True, exist_ok=True)
    runners, user = {}, os.environ.get(ENV)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.variants.split(","):
            path = out / f"{name}-seed{seed}.json"
            if path.is_file():
                continue
            recipe = replace(RECIPES["fast"], eval_on="heldout", **VARIANTS[name])
            if name not in runners:
                runners[name] = SequentialRunner(default_model(), args.tasks, recipe, data_dir=default_data_dir(),
                                                 progress=False)
            if name in GEMM:
                os.environ[ENV] = GEMM[name]
            elif user is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = user                # the caller's choice for the other variants
            t0 = time.perf_counter()
            res = runners[name].run(Flat(), seed=seed)
            row = {"variant": name, "seed": seed, "tasks": res["tasks"], "recipe": asdict(recipe),
                   "cpu_bf16_gemm": cpu_bf16_gemm() if recipe.precision == "bf16" else None, "cpu": cpu_model(),
                   "accuracy_matrix": res["accuracy_matrix"], "objective": res["objective"],
                   "task_seconds": res["task_seconds"], "seconds": time.perf_counter() - t0}
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(row, indent=1))
            os.replace(tmp, path)
            print(f"{name} seed {seed}: {res['accuracy_matrix']}  ({row['seconds']:.0f} s)", flush=True)
    print(table(out, args.against))


if __name__ == "__main__":
    main()
