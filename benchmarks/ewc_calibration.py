"""How strong is EWC at each lambda on the default recipe? (issue 9: the default must act)

For each lambda, one run of EWC (normalised Fisher) on the default task pair, printed next to the flat run:
the accuracy matrix, the first task's forgetting, and the measured |penalty gradient| / |loss gradient|.

    python benchmarks/ewc_calibration.py --lambdas 0.1,1,10 --seed 0
"""
from __future__ import annotations

import argparse
import json

from lrdist.cli import default_data_dir, default_model
from lrdist.continual import DEFAULT_TASKS, RECIPES, SequentialRunner
from lrdist.files import append_line
from lrdist.methods import EWC, Flat


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lambdas", default="0.1,1,10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append one JSON line per run here")
    args = p.parse_args(argv)
    runner = SequentialRunner(default_model(), DEFAULT_TASKS, RECIPES["fast"], data_dir=default_data_dir(),
                              progress=False)
    print("| method | accuracy matrix | forgetting (first task) | penalty/loss grad |\n|---|---|---|---|")
    for lam in [None] + [float(x) for x in args.lambdas.split(",")]:
        res = runner.run(Flat() if lam is None else EWC(lam), seed=args.seed)
        ratio = res["method_stats"].get("penalty_to_loss_grad", {})
        name = "flat" if lam is None else f"ewc lambda={lam:g}"
        acc = [[round(v, 3) for v in row if v is not None] for row in res["accuracy_matrix"]]
        print(f"| {name} | {acc} | {res['mean_forgetting']:+.3f} | "
              f"{', '.join(f'{v:.3g}' for v in ratio.values()) or '-'} |", flush=True)
        if args.out:
            append_line(args.out, json.dumps({"method": name, "seed": args.seed, **{k: res[k] for k in (
                "accuracy_matrix", "mean_forgetting", "objective", "method_stats")}}))  # whole or not at all


if __name__ == "__main__":
    main()
