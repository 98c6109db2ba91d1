"""Search trials per hour: K trials trained together (lrdist.batched) against one at a time and a plain loop.

Each row trains K distributions over RTE then MRPC and reports trials per hour (K / seconds of the batch)
and memory per replica: on CUDA the peak allocated memory of the batch / K, on a CPU the growth of the
peak resident set during the batch / K (Linux; the peak is reset before each row). K = 1 is the
sequential loop (``SequentialRunner.run``, what ``lrdist search`` runs), "plain loop" the common way
(lrdist/trialbench.py: reload, tokenise and pad to 256 in the trial, torch AdamW with 10 groups).
Weights and data are loaded once and not timed (a search worker loads them once).

pytest-benchmark:  python -m pytest benchmarks/bench_batched.py --benchmark-only
a table:           python benchmarks/bench_batched.py [--quick] [--ks 1,4,8] [--model minilm|bert-base-random|DIR]
"""
import argparse
import dataclasses
import os
import statistics
import tempfile
import time

import pytest
import torch

from lrdist import trialbench
from lrdist.batched import BatchedRunner
from lrdist.bench import device_name
from lrdist.cli import default_data_dir, default_model
from lrdist.continual import Recipe, SequentialRunner, recipe_from
from lrdist.methods import Distribution

RECIPE = Recipe(epochs=1, batch_size=8, max_train_samples=64, max_eval_samples=64)
TASKS = ["rte", "mrpc"]


def distributions(k: int, seed: int = 0) -> list[Distribution]:
    g = torch.Generator().manual_seed(seed)  # log-uniform in [1e-6, 1e-4], as a search would draw
    return [Distribution((10 ** (torch.rand(10, generator=g, dtype=torch.float64) * 2 - 6)).tolist()) for _ in range(k)]


def random_bert(size: str, tokenizer_from: str) -> str:
    """A randomly initialised BERT (timing needs no pretrained weights) with a real tokenizer, in a temp folder:
    'bert-base-random' (110M) or 'minilm-random' (MiniLM's shapes). Lets a machine without the hub run it."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    shapes = {"bert-base-random": {}, "minilm-random": dict(hidden_size=384, num_hidden_layers=6,
                                                             num_attention_heads=12, intermediate_size=1536)}[size]
    folder = tempfile.mkdtemp(prefix=size + "-")
    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    BertModel(BertConfig(vocab_size=tok.vocab_size, **shapes)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def resolve_model(name: str | None, tokenizer_from: str | None = None) -> str:
    if name in (None, "minilm"):
        return default_model()
    if name.endswith("-random"):
        return random_bert(name, tokenizer_from or default_model())
    return name


def _rss_peak_reset() -> bool:
    try:  # Linux: writing 5 resets the peak resident set (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class Memory:
    """Peak memory added while the block runs: CUDA allocator peak, else the peak resident set."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.ok = _rss_peak_reset()
            self.base = _rss("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.ok:
            self.peak = _rss("VmHWM") - self.base


def time_batch(runner: SequentialRunner, k: int) -> dict:
    """One batch of k trials (k = 1: the sequential loop); seconds, trials per hour, memory per replica."""
    dists = distributions(k, seed=k)
    with Memory(runner.device) as mem:
        t0 = time.perf_counter()
        if k == 1:
            runner.run(dists[0])
        else:
            BatchedRunner(runner).run(dists)
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return {"k": k, "seconds": seconds, "trials_per_hour": 3600 * k / seconds,
            "mb_per_replica": None if mem.peak is None else mem.peak / k / 2**20}


def run(model: str, recipe: Recipe, data_dir, ks=(1, 4, 8), repeats: int = 1, plain: bool = True, device=None):
    runner = SequentialRunner(model, TASKS, recipe, data_dir=data_dir, device=device, progress=False)
    runner.run(distributions(1)[0])  # warm-up (allocator, kernels, caches): not timed
    rows = []
    for k in ks:
        batches = [time_batch(runner, k) for _ in range(repeats)]
        med = statistics.median(b["seconds"] for b in batches)
        rows.append({**batches[0], "seconds": med, "trials_per_hour": 3600 * k / med, "label": f"K={k}" if k > 1
                     else "K=1 (sequential loop)"})
    if plain:
        t = [trialbench.plain_trial(model, TASKS, distributions(1)[0].values, recipe, data_dir)["seconds"]
             for _ in range(repeats)]
        med = statistics.median(t)
        rows.append({"k": 1, "label": "plain loop", "seconds": med, "trials_per_hour": 3600 / med,
                     "mb_per_replica": None})
    params = sum(p.numel() for p in runner.model.parameters())
    return {"rows": rows, "params": params, "device": device_name(runner.device), "recipe": recipe}


def format_table(res: dict) -> str:
    r = res["recipe"]
    base = next(row for row in res["rows"] if row["label"].startswith("K=1"))
    lines = [f"device: {res['device']}; {res['params'] / 1e6:.1f}M parameters; {'-'.join(TASKS)}, "
             f"{r.max_train_samples} train / {r.max_eval_samples} eval rows per task, batch {r.batch_size}, "
             f"length {r.max_length}, {r.epochs} epoch(s)",
             "| trials | s per batch | trials per hour | x sequential loop | MB per replica (peak) |",
             "|---|---|---|---|---|"]
    for row in res["rows"]:
        mb = "-" if row["mb_per_replica"] is None else f"{row['mb_per_replica']:.0f}"
        lines.append(f"| {row['label']} | {row['seconds']:.2f} | {row['trials_per_hour']:.0f} | "
                     f"{row['trials_per_hour'] / base['trials_per_hour']:.2f} | {mb} |")
    return "\n".join(lines)


# ---- pytest-benchmark ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_runner():
    data_dir = os.environ.get("LRDIST_GLUE_DIR") or default_data_dir()
    if data_dir is None:
        pytest.skip("no local GLUE folder (LRDIST_GLUE_DIR)")
    return SequentialRunner(default_model(), TASKS, RECIPE, data_dir=data_dir, progress=False)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_trials(benchmark, bench_runner, k):
    dists = distributions(k)
    fn = (lambda: bench_runner.run(dists[0])) if k == 1 else (lambda: BatchedRunner(bench_runner).run(dists))
    benchmark.extra_info["trials"] = k  # trials per hour = 3600 * k / the time of one round
    benchmark.pedantic(fn, rounds=1, warmup_rounds=0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 rows, K = 1, 2: checks the harness")
    parser.add_argument("--ks", default="1,4,8")
    parser.add_argument("--model", default=None, help="minilm (default), minilm-random, bert-base-random, or a folder")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for the -random models (default: MiniLM's)")
    parser.add_argument("--recipe", default=None, choices=["fast", "paper"], help="default: 64 rows, batch 8")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-plain", action="store_true")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    recipe = RECIPE if args.recipe is None else recipe_from(args.recipe)
    over = dict(max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples, epochs=args.epochs)
    if args.quick:
        over = dict(max_train_samples=8, max_eval_samples=8, max_length=64)
    recipe = dataclasses.replace(recipe, **{k: v for k, v in over.items() if v is not None})
    ks = (1, 2) if args.quick else tuple(int(k) for k in args.ks.split(","))
    data_dir = args.data_dir or os.environ.get("LRDIST_GLUE_DIR") or default_data_dir()
    res = run(resolve_model(args.model, args.tokenizer), recipe, data_dir, ks, args.repeats,
              plain=not args.no_plain, device=args.device)
    print(format_table(res))
    return res


if __name__ == "__main__":
    main()
