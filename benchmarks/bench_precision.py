"""One MiniLM training step (forward, backward) on a CPU: fp32, bf16 autocast as oneDNN computes it, and
bf16 autocast with its linear layers' GEMMs as fp32 GEMMs of the bf16 values (lrdist.precision).

On an x86 CPU without AVX512-BF16 and AMX oneDNN emulates bf16 products, and the fp32-GEMM way is what
lrdist takes there by default; on one with them, oneDNN's bf16 is the fast one and lrdist leaves it be.

pytest-benchmark:  python -m pytest benchmarks/bench_precision.py --benchmark-only
a table:           python benchmarks/bench_precision.py [--quick] [--batch 16] [--length 128] [--repeats 5]
"""
import argparse
import contextlib
import statistics
import time

import pytest
import torch

from lrdist import precision
from lrdist.cli import default_model

WAYS = {"fp32": None, "bf16 oneDNN": "onednn", "bf16 fp32 GEMMs": "fp32"}


def make_step(batch: int, length: int):
    from transformers import AutoModel
    model = AutoModel.from_pretrained(default_model())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (batch, length), generator=gen)
    mask = torch.ones_like(ids)

    def step(way):
        bf16 = way is not None
        gemms = precision.Fp32Gemms() if way == "fp32" else contextlib.nullcontext()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), gemms:
            loss = model(input_ids=ids, attention_mask=mask).last_hidden_state.float().square().mean()
        with gemms:
            loss.backward()
    return step


@pytest.fixture(scope="module")
def step():
    return make_step(16, 128)


@pytest.mark.parametrize("way", list(WAYS))
def test_step(benchmark, step, way):
    benchmark.pedantic(lambda: step(WAYS[way]), rounds=5, warmup_rounds=1)


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="batch 2, length 16, 2 repeats (a check that it runs)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.length, args.repeats = 2, 16, 2
    step = make_step(args.batch, args.length)
    times = {}
    for way in WAYS.values():
        step(way)  # warm-up
    for _ in range(args.repeats):  # interleaved, so that the ways share the machine's load
        for name, way in WAYS.items():
            t0 = time.perf_counter()
            step(way)
            times.setdefault(name, []).append(time.perf_counter() - t0)
    base = statistics.median(times["bf16 oneDNN"])
    print(f"MiniLM forward + backward, batch {args.batch} x {args.length} tokens, {torch.get_num_threads()} threads, "
          f"{cpu_model()} (bf16 instructions: {'no' if precision.emulated_cpu_bf16() else 'yes or not x86'}); "
          f"lrdist's default here: {precision.cpu_bf16_gemm()}")
    print("| way | median ms | min ms | time / bf16 oneDNN |\n|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {1e3 * statistics.median(ts):.1f} | {1e3 * min(ts):.1f} | {statistics.median(ts) / base:.2f} |")


if __name__ == "__main__":
    main()
