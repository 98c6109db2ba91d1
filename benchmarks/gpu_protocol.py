"""What the paper's protocol would cost on a GPU (issue 19, milestone 4): BERT-base, full GLUE training sets,
the `paper` recipe (3 epochs, batch 4, length 256), the paper's 100 trials per searched pair, and baselines
tuned on the same budget, on the pairs of SCIENCE.md §4.1.

Counts, not timings: optimizer steps and padded tokens per pair-run (token lengths measured with the
uncased WordPiece tokenizer BERT-base shares with all-MiniLM-L6-v2, batches padded to their longest row as
lrdist's collate does), training FLOPs, and the rate a GPU must sustain to finish in a given time.

    python benchmarks/gpu_protocol.py [--days 7] [--sample 4000] [--data-dir DIR]
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import paper_question  # noqa: E402  (benchmarks/, beside this script)
from lrdist.continual import RECIPES  # noqa: E402

# GLUE's full training-set sizes (Wang et al. 2019); the local copy holds subsets of the large ones.
TRAIN_ROWS = {"cola": 8551, "sst2": 67349, "mrpc": 3668, "qqp": 363846, "mnli": 392702, "qnli": 104743,
              "rte": 2490}
SMALL_PAIRS = [["rte", "mrpc"], ["cola", "sst2"], ["mrpc", "rte"]]    # the README's GPU example
TRIALS = 100                     # per searched pair, as the paper
# the pairs, seeds and methods of SCIENCE.md §4.1, from the study's own script
SEARCH_PAIRS, HELDOUT_PAIRS = paper_question.SEARCH_PAIRS, paper_question.HELDOUT_PAIRS
SEEDS, HELDOUT_METHODS = len(paper_question.SEEDS), 1 + len(paper_question.METHODS)  # tuned flat + the methods

# BERT-base: 12 layers, hidden 768, feed-forward 3072. The matmul weights a token meets (embedding lookups
# cost no FLOPs): 4 d^2 (attention) + 2 d f (feed-forward) per layer.
LAYERS, HIDDEN, FFN = 12, 768, 3072
MATMUL_PARAMS = LAYERS * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN)
ALL_PARAMS = 108_891_648         # bert-base-uncased less its pooler (lrdist's heads read [CLS] itself)
ADAMW_BYTES = 28                 # fp32 AdamW per parameter per step: read p, g, m, v; write p, m, v
# H200 SXM spec-sheet figures (not measured here): HBM3e bandwidth and dense bf16 tensor-core peak
H200_BYTES_PER_S, H200_BF16_FLOPS = 4.8e12, 989e12


def train_flops_per_token(width: int) -> float:
    """Forward + backward (3x forward): 2 FLOPs per multiply-add on every weight, plus attention's scores
    and weighted sum (2 x 2 width d per layer forward) in a batch padded to ``width``."""
    return 3 * (2 * MATMUL_PARAMS + 4 * width * HIDDEN * LAYERS)


@dataclass
class TaskCost:
    steps: int           # optimizer steps for all epochs
    tokens: float        # padded tokens for all epochs
    flops: float


def lengths(task: str, sample: int, data_dir: str, max_length: int) -> list[int]:
    """Token counts of up to ``sample`` rows of the task's (local) train split."""
    from transformers import AutoTokenizer

    from lrdist.cli import default_model
    from lrdist.data import select_rows, task_spec
    tok = AutoTokenizer.from_pretrained(default_model())
    spec = task_spec(task)
    ds = select_rows(task, "train", sample, data_dir)
    a = list(ds[spec.text_a])
    b = list(ds[spec.text_b]) if spec.text_b else None
    return [len(ids) for ids in tok(a, b, truncation=True, max_length=max_length)["input_ids"]]


def task_cost(rows: int, lens: list[int], batch: int, epochs: int, rng: random.Random) -> TaskCost:
    """Padded width per batch drawn by shuffling the measured lengths, as training batches them."""
    widths = []
    for _ in range(max(1, 20000 // len(lens))):
        order = lens[:]
        rng.shuffle(order)
        widths += [max(order[i:i + batch]) for i in range(0, len(order) - batch + 1, batch)]
    width = sum(widths) / len(widths)
    per_token = sum(w * train_flops_per_token(w) for w in widths) / sum(widths)  # attention grows as width^2
    steps = epochs * math.ceil(rows / batch)
    tokens = epochs * rows * width
    return TaskCost(steps, tokens, tokens * per_token)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--days", type=float, default=7.0, help="wall time to finish the whole protocol in")
    p.add_argument("--sample", type=int, default=4000, help="train rows per task whose lengths are measured")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    p.add_argument("--quick", action="store_true", help="300 rows per task (CI)")
    args = p.parse_args(argv)
    sample = 300 if args.quick else args.sample
    recipe, rng = RECIPES["paper"], random.Random(0)
    tasks = sorted({t for pairs in (SEARCH_PAIRS, HELDOUT_PAIRS, SMALL_PAIRS) for pair in pairs for t in pair})
    cost = {t: task_cost(TRAIN_ROWS[t], lengths(t, sample, args.data_dir, recipe.max_length), recipe.batch_size,
                         recipe.epochs, rng) for t in tasks}

    def pair_cost(pair):
        return TaskCost(*(sum(getattr(cost[t], f) for t in pair) for f in ("steps", "tokens", "flops")))

    print(f"BERT-base, `paper` recipe: {recipe.epochs} epochs, batch {recipe.batch_size}, length "
          f"{recipe.max_length}, full training sets; {sample} rows per task measured for token lengths.\n")
    print("| pair | role | steps per pair-run | padded tokens (M) | training PFLOP |")
    print("|---|---|---|---|---|")
    for role, pairs in (("source", SEARCH_PAIRS), ("held-out", HELDOUT_PAIRS), ("small (README example)", SMALL_PAIRS)):
        for pair in pairs:
            c = pair_cost(pair)
            print(f"| {' → '.join(pair)} | {role} | {c.steps:,} | {c.tokens / 1e6:.1f} | {c.flops / 1e15:.1f} |")

    # the whole protocol of §4.1 at the paper's budget: searches, two baselines tuned on all source pairs
    # (a trial = one run per source pair), held-out runs; pruning would cut some search trials short
    source = [pair_cost(p) for p in SEARCH_PAIRS]
    units = {"searches": (TRIALS, source), "tuning flat and EWC": (2 * TRIALS, source),
             "held-out runs": (HELDOUT_METHODS * SEEDS, [pair_cost(p) for p in HELDOUT_PAIRS])}
    hours = 24 * args.days
    print(f"\nThe protocol of SCIENCE.md §4.1 at {TRIALS} trials per searched pair, to finish in {args.days:g} days "
          f"({hours:g} h) on one GPU:\n")
    print("| part | pair-runs | steps (M) | PFLOP |")
    print("|---|---|---|---|")
    total_runs = total_steps = total_flops = 0.0
    for name, (repeat, costs) in units.items():
        runs = repeat * len(costs)
        steps, flops = repeat * sum(c.steps for c in costs), repeat * sum(c.flops for c in costs)
        total_runs, total_steps, total_flops = total_runs + runs, total_steps + steps, total_flops + flops
        print(f"| {name} | {runs:,} | {steps / 1e6:.1f} | {flops / 1e15:,.0f} |")
    print(f"| **total** | {total_runs:,.0f} | {total_steps / 1e6:.1f} | {total_flops / 1e15:,.0f} |")
    print(f"\nNeeded: {total_runs / hours:.1f} pair-runs per hour (a search trial is one, a tuning trial three), "
          f"that is {total_steps / hours / 3600:,.0f} optimizer steps per second of batch {recipe.batch_size} and "
          f"{total_flops / hours / 3600 / 1e12:.1f} TFLOP/s sustained.")
    optimizer_h = total_steps * ALL_PARAMS * ADAMW_BYTES / H200_BYTES_PER_S / 3600
    search_steps = TRIALS * sum(c.steps for c in source)
    print(f"Lower bounds on one H200 (spec sheet, not measured): the AdamW steps alone move {ADAMW_BYTES} B per "
          f"parameter, {optimizer_h:.0f} h at full memory bandwidth; the matmuls at the dense bf16 peak "
          f"{total_flops / H200_BF16_FLOPS / 3600:.0f} h (not reachable at batch 4: about "
          f"{total_flops / total_steps / 1e12:.2f} TFLOP a step). `lrdist search --batch-trials K` trains K search "
          f"trials in one step, cutting launches per trial K-fold but not the AdamW bytes; tuning and held-out runs "
          f"do not batch, so even with every search batched the other {(total_steps - search_steps) / 1e6:.1f} M "
          f"steps need {(total_steps - search_steps) / hours / 3600:,.0f} steps per second.")
    small = [pair_cost(p) for p in SMALL_PAIRS]
    repeat = 3 * TRIALS + HELDOUT_METHODS * SEEDS  # search + two tunings per pair, and the held-out runs
    print(f"With the small pairs as both source and held-out pairs: {repeat * len(small):,} pair-runs, "
          f"{repeat * sum(c.steps for c in small) / hours / 3600:,.0f} steps per second for the same {args.days:g} days.")


if __name__ == "__main__":
    main()
