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


@pytest.mark.parametrize("provider", ["lrdist-triton-prepare_step", "torch-fused-20g-step"])
def test_host_step(benchmark, provider):
    """Host work of a cached Triton-path step (prepare_step: all a step does but the launches) against torch's
    whole fused AdamW step, on BERT-base's 201 tensors of 8 elements in 20 groups (bench.host_step_set).
    `python benchmarks/bench_optimizer.py --host` prints both side by side with their ratio."""
    import os
    os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")  # Triton path on a CPU
    _, ours, theirs = bench.host_step_set()
    ours.prepare_step()  # the plan is built once; what is timed is the cached step
    benchmark.pedantic(ours.prepare_step if provider.startswith("lrdist") else theirs.step, rounds=200,
                       warmup_rounds=5)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny set and 3 repetitions: checks the harness")
    parser.add_argument("--sets", default="minilm,bert-base,many-small")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--device", default=None)
    parser.add_argument("--terms", default="minilm", help="sets for the fused clip/EWC/MIGU rows ('' for none)")
    parser.add_argument("--host", action="store_true", help="only the host-step row: ours against torch's step")
    args = parser.parse_args(argv)
    if args.host:
        r = bench.host_step()
        print(f"| tensors | groups | lrdist prepare_step ms | torch fused step ms | ratio (medians) | ratio (minima) |\n"
              f"|---|---|---|---|---|---|\n| {r['tensors']} | {r['groups']} | {r['ours_host_ms']:.3f} "
              f"(min {r['ours_min_ms']:.3f}) | {r['torch_fused_step_ms']:.3f} (min {r['torch_min_ms']:.3f}) | "
              f"{r['ratio']:.3f} | {r['ratio_of_mins']:.3f} |")
        return
    print(bench.table(args.quick, args.sets, args.dtypes, args.terms, args.reps, args.device))


if __name__ == "__main__":
    main()
