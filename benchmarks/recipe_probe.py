"""Which default recipe makes the flat baseline learn every task and forget the first? (issue 9)

Runs the flat method for each candidate recipe and seed, and prints, per candidate, the mean over seeds of
each task's accuracy right after its own training, the first task's drop after the last, and each task's
majority-class rate on the same rows. A candidate passes when every task ends its own training at least 10
points above its majority rate and the first task drops by at least 5 points.

    python benchmarks/recipe_probe.py --seeds 0,1,2 --out runs/probe.jsonl
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

from lrdist.cli import default_data_dir, default_model
from lrdist.continual import RECIPES, SequentialRunner
from lrdist.files import append_line
from lrdist.methods import Flat

CANDIDATES = {
    "sst2-qnli cls lr1e-4": ("sst2,qnli", dict(pooling="cls", lr=1e-4)),
    "sst2-qnli mean lr1e-4": ("sst2,qnli", dict(pooling="mean", lr=1e-4)),
    "sst2-qnli mean lr5e-5": ("sst2,qnli", dict(pooling="mean", lr=5e-5)),
    "sst2-qnli mean lr2e-4": ("sst2,qnli", dict(pooling="mean", lr=2e-4)),
    "sst2-qqp mean lr1e-4": ("sst2,qqp", dict(pooling="mean", lr=1e-4)),
    "sst2-qqp mean lr2e-4": ("sst2,qqp", dict(pooling="mean", lr=2e-4)),
    "sst2-mrpc mean lr1e-4": ("sst2,mrpc", dict(pooling="mean", lr=1e-4)),
    # Which tasks does the flat baseline learn at the fast recipe? (issue 19's choice of pairs; SST-2 second)
    **{f"{t}-sst2 mean lr2e-4": (f"{t},sst2", dict(pooling="mean", lr=2e-4)) for t in ("mnli", "qnli", "rte", "cola", "qqp")},
    "sst2-mnli mean lr2e-4": ("sst2,mnli", dict(pooling="mean", lr=2e-4)),
    "sst2-qnli mean lr1e-4 len64": ("sst2,qnli", dict(pooling="mean", lr=1e-4, max_length=64)),
    "sst2-qnli mean lr2e-4 len64 2048": ("sst2,qnli", dict(pooling="mean", lr=2e-4, max_length=64,
                                                          max_train_samples=2048)),
}
BASE = dict(epochs=1, batch_size=16, max_train_samples=1024, max_eval_samples=500, max_length=128)


def majority(runner, task: str) -> float:
    labels = runner.eval[task].labels
    return labels.bincount().max().item() / len(labels)


def table(path: Path) -> str:
    """The Markdown table of every candidate in a probe file: means over its seeds."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = ["| candidate | seeds | task 1 after own training (majority) | task 2 after own training (majority) | "
             "task 1 drop after task 2 | passes | s per run |", "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["candidate"] for r in rows):
        mine = [r for r in rows if r["candidate"] == name]
        own = [statistics.fmean(r["accuracy_matrix"][i][i] for r in mine) for i in (0, 1)]
        maj = mine[0]["majority"]
        drop = statistics.fmean(r["accuracy_matrix"][0][0] - r["accuracy_matrix"][1][0] for r in mine)
        ok = all(o - m >= 0.10 for o, m in zip(own, maj)) and drop >= 0.05
        lines.append(f"| {name} | {len(mine)} | {own[0]:.3f} ({maj[0]:.3f}) | {own[1]:.3f} ({maj[1]:.3f}) | "
                     f"{drop:+.3f} | {'yes' if ok else 'no'} | {statistics.median(r['seconds'] for r in mine):.0f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="runs/probe.jsonl")
    p.add_argument("--eval-on", default="validation", choices=["validation", "heldout"],
                   help="score on the validation split, or on the held-out slice of train (keeps validation unseen)")
    p.add_argument("--table", action="store_true", help="only print the table of what --out already holds")
    args = p.parse_args(argv)
    if args.table:
        print(table(Path(args.out)))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.candidates.split(","):
        tasks, over = CANDIDATES[name]
        recipe = replace(RECIPES["fast"], **{**BASE, **over}, eval_on=args.eval_on)
        runner = SequentialRunner(default_model(), tasks, recipe, data_dir=default_data_dir(), progress=False)
        rows = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            t0 = time.perf_counter()
            res = runner.run(Flat(), seed=seed)
            acc = res["accuracy_matrix"]
            row = {"candidate": name, "seed": seed, "recipe": asdict(recipe), "accuracy_matrix": acc,
                   "majority": [majority(runner, t) for t in runner.tasks], "seconds": time.perf_counter() - t0}
            rows.append(row)
            append_line(out, json.dumps(row))  # the file rewritten whole: a kill leaves no half line
            print(f"{name} seed {seed}: {acc}  ({row['seconds']:.0f} s)", flush=True)
        learned = [statistics.fmean(r["accuracy_matrix"][i][i] for r in rows) - rows[0]["majority"][i]
                   for i in range(len(runner.tasks))]
        drop = statistics.fmean(r["accuracy_matrix"][0][0] - r["accuracy_matrix"][-1][0] for r in rows)
        print(f"== {name}: learned above majority {[f'{x:+.3f}' for x in learned]}, first-task drop {drop:+.3f}",
              flush=True)


if __name__ == "__main__":
    main()
