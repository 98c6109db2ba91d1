"""One search trial (two tasks): lrdist's pipeline against a plain loop written the common way.

pytest-benchmark:  python -m pytest benchmarks/bench_trial.py --benchmark-only
a table:           python benchmarks/bench_trial.py [--quick]
"""
import argparse
import os

import pytest

from lrdist.cli import default_data_dir, default_model
from lrdist.continual import Recipe, SequentialRunner
from lrdist.methods import PAPER_COMBINED, Distribution
from lrdist import trialbench

RECIPE = Recipe(epochs=1, batch_size=8, max_train_samples=64, max_eval_samples=64)


@pytest.fixture(scope="module")
def data_dir():
    d = os.environ.get("LRDIST_GLUE_DIR") or default_data_dir()
    if d is None:
        pytest.skip("no local GLUE folder (LRDIST_GLUE_DIR)")
    return d


def test_trial_lrdist(benchmark, data_dir):
    runner = SequentialRunner(default_model(), ["rte", "mrpc"], RECIPE, data_dir=data_dir, progress=False)
    benchmark.pedantic(lambda: runner.run(Distribution(PAPER_COMBINED)), rounds=3, warmup_rounds=1)


def test_trial_plain_loop(benchmark, data_dir):
    benchmark.pedantic(lambda: trialbench.plain_trial(default_model(), ["rte", "mrpc"], PAPER_COMBINED, RECIPE,
                                                      data_dir), rounds=3, warmup_rounds=0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 rows, one trial each: checks the harness")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    recipe = Recipe(epochs=1, batch_size=8, max_train_samples=8, max_eval_samples=8, max_length=64) if args.quick \
        else RECIPE
    data_dir = args.data_dir or os.environ.get("LRDIST_GLUE_DIR") or default_data_dir()
    res = trialbench.run(default_model(), recipe=recipe, data_dir=data_dir, trials=1 if args.quick else args.trials)
    print(trialbench.format_result(res))
    return res


if __name__ == "__main__":
    main()
