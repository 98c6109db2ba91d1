"""One optimizer step on model-shaped parameter sets, FusedRegionAdamW against torch's AdamW.

pytest-benchmark:  python -m pytest benchmarks/bench_optimizer.py --benchmark-only
a table:           python benchmarks/bench_optimizer.py [--quick] [--sets minilm,bert-base,many-small]
(`lrdist bench` prints the same table.)
"""
import argparse

import pytest
import torch

from lrdist import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("set_name", ["minilm", "bert-base", "many-small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("provider", bench.PROVIDERS)
def test_optimizer_step(benchmark, set_name, dtype, provider):
    if provider == "lrdist-triton" and DEVICE.type != "cuda":
        pytest.skip("the Triton kernel is timed on CUDA only (on a CPU it runs in the interpreter)")
    shapes = bench.param_set(set_name)
    params = [torch.randn(s, device=DEVICE).to(dtype).requires_grad_() for _, s, _ in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = bench.make_optimizer(provider, params, [r for _, _, r in shapes], [1.0] * 10)
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    benchmark.extra_info.update(params=sum(p.numel() for p in params), bytes_per_param=bench.bytes_per_param(dtype))
    benchmark.pedantic(lambda: (opt.step(), sync()), rounds=10, warmup_rounds=2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny set and 3 repetitions: checks the harness")
    parser.add_argument("--sets", default="minilm,bert-base,many-small")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--device", default=None)
    parser.add_argument("--terms", default="minilm", help="sets for the fused clip/EWC/MIGU rows ('' for none)")
    args = parser.parse_args(argv)
    print(bench.table(args.quick, args.sets, args.dtypes, args.terms, args.reps, args.device))


if __name__ == "__main__":
    main()
