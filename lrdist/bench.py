"""Optimizer-step benchmark: FusedRegionAdamW against torch's AdamW with one group per region.

Parameter sets are shaped like real models (names and shapes from a BERT built on the meta device) and
split into the 10 bert10 regions. For each provider it reports the median step time (with the
interquartile range), the bandwidth achieved counting the bytes AdamW must move (fp32: 28 B/param =
read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq), that bandwidth as a share of a
plain device copy measured in the same run, the ratio to torch's fused AdamW with 10 groups, the host time
per step, and on CUDA the kernel launches per step (torch.profiler).
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass

import torch

from lrdist.optim import FusedRegionAdamW, triton_available
from lrdist.regions import assign_regions

PROVIDERS = ("lrdist-triton", "lrdist-torch", "torch-fused-10g", "torch-foreach-10g", "torch-fused-1g")


def _bert_shapes(**config) -> list[tuple[str, tuple, int]]:
    """(name, shape, bert10 region) of a BertForSequenceClassification, built without memory."""
    import transformers
    with torch.device("meta"):
        model = transformers.BertForSequenceClassification(transformers.BertConfig(**config))
    regions = assign_regions(model, "bert10").region_of
    return [(n, tuple(p.shape), regions[n]) for n, p in model.named_parameters()]


def param_set(name: str) -> list[tuple[str, tuple, int]]:
    if name == "bert-base":
        return _bert_shapes()
    if name == "minilm":
        return _bert_shapes(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    if name == "many-small":  # 2,000 small tensors (adapters, norms): launch- and metadata-bound
        return [(f"t{i}", (1 + (i * 37) % 2048,), i % 10) for i in range(2000)]
    if name == "tiny":  # --quick: checks the harness, measures nothing
        return _bert_shapes(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            vocab_size=500)
    raise ValueError(f"unknown parameter set {name!r}")


def bytes_per_param(dtype: torch.dtype) -> int:
    """Read param, grad, exp_avg, exp_avg_sq and write param, exp_avg, exp_avg_sq: 7 tensors' worth."""
    return 7 * torch.empty((), dtype=dtype).element_size()


def make_optimizer(provider: str, params, regions, scales):
    by_region = {}
    for p, r in zip(params, regions):
        by_region.setdefault(r, []).append(p)
    if provider.startswith("lrdist"):
        groups = [{"params": ps, "region": r} for r, ps in sorted(by_region.items())]
        return FusedRegionAdamW(groups, lr=1e-4, weight_decay=0.0, region_scales=scales,
                                backend=provider.split("-")[1])
    if provider == "torch-fused-1g":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    groups = [{"params": ps, "lr": 1e-4 * scales[r]} for r, ps in sorted(by_region.items())]
    return torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.0, **({"fused": True} if provider == "torch-fused-10g"
                                                                    else {"foreach": True}))


def _time(fn, device: torch.device, reps: int, warmup: int) -> list[float]:
    """Per-call seconds: CUDA events on a GPU, perf_counter on a CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def copy_bandwidth(device: torch.device, reps: int) -> float:
    """Bytes per second of a plain device copy (read + write) of 256 MB, 16 MB on a CPU quick run."""
    n = (64 << 20) if reps > 3 else (4 << 20)
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = _time(lambda: dst.copy_(src), device, reps, 2)
    return 2 * src.numel() * 4 / statistics.median(times)


def count_launches(opt, device) -> int | None:
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@dataclass
class Row:
    params: str
    dtype: str
    provider: str
    n_params: int
    n_tensors: int
    median_ms: float
    iqr_ms: float
    gbps: float
    pct_copy: float
    host_ms: float
    launches: int | None
    vs_fused10: float = math.nan


def bench_one(set_name, dtype, provider, device, reps, warmup, copy_bps) -> Row | None:
    if provider == "lrdist-triton" and not (device.type == "cuda" and triton_available()):
        return None  # on a CPU the kernel runs only in the (slow) interpreter: not a timing
    shapes = param_set(set_name)
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, generator=gen, device=device, dtype=torch.float32).to(dtype).requires_grad_()
              for _, s, _ in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).to(dtype) * 1e-3
    regions = [r for _, _, r in shapes]
    scales = [1.0, 1.0, 0.3, 0.7, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0]
    opt = make_optimizer(provider, params, regions, scales)
    times = _time(opt.step, device, reps, warmup)
    host = []
    for _ in range(max(3, reps // 2)):  # host time: the call returns before a GPU finishes
        t0 = time.perf_counter()
        opt.step()
        host.append(time.perf_counter() - t0)
        if device.type == "cuda":
            torch.cuda.synchronize()
    n = sum(p.numel() for p in params)
    med = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), med, max(times)]
    gbps = n * bytes_per_param(dtype) / med
    return Row(set_name, str(dtype).replace("torch.", ""), provider, n, len(params), med * 1e3,
               (q[2] - q[0]) * 1e3, gbps / 1e9, 100 * gbps / copy_bps, statistics.median(host) * 1e3,
               count_launches(opt, device))


TERMS = ("clip", "ewc", "migu")


def bench_terms(set_name, dtype, device, reps, warmup, copy_bps) -> list[Row]:
    """The fused forms (clipping, EWC, MIGU masks in the step) against their unfused pipelines:
    clip_grad_norm_ + AdamW, an EWC gradient pass + AdamW, masked grads + AdamW (torch fused, 10 groups)."""
    shapes = param_set(set_name)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    ours_provider = "lrdist-triton" if device.type == "cuda" and triton_available() else "lrdist-torch"
    for term in TERMS:
        for provider in (ours_provider, "torch-fused-10g"):
            params = [torch.randn(s, generator=gen, device=device).to(dtype).requires_grad_() for _, s, _ in shapes]
            grads = [torch.randn(p.shape, generator=gen, device=device).to(dtype) for p in params]
            opt = make_optimizer(provider, params, [r for _, _, r in shapes], [1.0] * 10)
            fisher = [torch.rand_like(p) for p in params]
            anchor = [p.detach().clone() for p in params]
            masks = {p: (torch.rand(p.shape[0], generator=gen, device=device) > 0.7).float()
                     for p in params if p.dim() == 2}
            fused = provider.startswith("lrdist")
            if fused and term == "clip":
                opt.max_grad_norm = 1.0
            if fused and term == "ewc":
                opt.set_ewc(dict(zip(params, fisher)), dict(zip(params, anchor)), 10.0)

            def step():
                for p, g in zip(params, grads):  # fresh grads: the unfused pipelines change them in place
                    p.grad = g.clone()
                if fused:
                    if term == "migu":
                        opt.set_row_masks(masks)
                elif term == "clip":
                    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
                elif term == "ewc":
                    diffs = torch._foreach_sub([p.detach() for p in params], anchor)
                    torch._foreach_mul_(diffs, fisher)
                    torch._foreach_add_([p.grad for p in params], diffs, alpha=20.0)
                else:
                    for p, keep in masks.items():
                        p.grad.mul_(keep.to(dtype).unsqueeze(1))
                opt.step()
            times = _time(step, device, reps, warmup)
            n = sum(p.numel() for p in params)
            med = statistics.median(times)
            q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), med, max(times)]
            gbps = n * bytes_per_param(dtype) / med
            label = f"{provider}+{term}" if fused else {"clip": "clip_grad_norm_+torch-fused-10g",
                                                       "ewc": "ewc-pass+torch-fused-10g",
                                                       "migu": "masked-grads+torch-fused-10g"}[term]
            rows.append(Row(set_name, str(dtype).replace("torch.", ""), label, n, len(params), med * 1e3,
                            (q[2] - q[0]) * 1e3, gbps / 1e9, 100 * gbps / copy_bps, med * 1e3, None))
        rows[-1].vs_fused10 = 1.0
        rows[-2].vs_fused10 = rows[-1].median_ms / rows[-2].median_ms
    return rows


def run(sets=("minilm", "bert-base", "many-small"), dtypes=(torch.float32, torch.bfloat16),
        providers=PROVIDERS, device=None, reps=20, warmup=3, terms_on=None) -> tuple[list[Row], float]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    copy_bps = copy_bandwidth(device, reps)
    rows = []
    for set_name in sets:
        for dtype in dtypes:
            batch = [r for p in providers if (r := bench_one(set_name, dtype, p, device, reps, warmup, copy_bps))]
            ref = next((r for r in batch if r.provider == "torch-fused-10g"), None)
            for r in batch:
                r.vs_fused10 = ref.median_ms / r.median_ms if ref else math.nan
            rows += batch
    for set_name in terms_on or ():
        rows += bench_terms(set_name, torch.float32, device, reps, warmup, copy_bps)
    return rows, copy_bps


def format_rows(rows: list[Row], copy_bps: float, device: str) -> str:
    """The table; for the fused-term rows, "x torch fused 10g" compares with the same term's unfused pipeline
    (and their times include refreshing the grads, identical on both sides)."""
    head = (f"device: {device}; copy bandwidth {copy_bps / 1e9:.1f} GB/s (read + write)\n"
            f"| params | dtype | provider | tensors | median ms (IQR) | GB/s | % copy | x torch fused 10g | "
            f"host ms | launches |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r.params} ({r.n_params / 1e6:.1f}M) | {r.dtype} | {r.provider} | {r.n_tensors} | "
                     f"{r.median_ms:.2f} ({r.iqr_ms:.2f}) | {r.gbps:.3g} | {r.pct_copy:.3g} | {r.vs_fused10:.2f} | "
                     f"{r.host_ms:.2f} | {'-' if r.launches is None else r.launches} |")
    return "\n".join(lines)


def device_name(device=None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return "cpu"


def table(quick=False, sets="minilm,bert-base,many-small", dtypes="float32,bfloat16", terms="minilm", reps=20,
          device=None) -> str:
    """Run the benchmark and return its table (what `lrdist bench` and benchmarks/bench_optimizer.py print).
    ``quick``: the tiny set with 3 repetitions, to check the harness."""
    rows, copy_bps = run(("tiny",) if quick else tuple(sets.split(",")),
                         tuple(getattr(torch, d) for d in dtypes.split(",")), device=device,
                         reps=3 if quick else reps, warmup=1 if quick else 3,
                         terms_on=("tiny",) if quick else tuple(t for t in terms.split(",") if t))
    return format_rows(rows, copy_bps, device_name(device))


def host_step_set(device=None):
    """BERT-base's 201 tensors shrunk to 8 elements, in 20 groups (bert10 region x decay / no decay): a step
    made of nothing but per-tensor bookkeeping."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = param_set("bert-base")
    params = [torch.randn(8, device=device).requires_grad_() for _ in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    keys = [(r, len(s) == 1) for _, s, r in shapes]  # 1-D tensors (biases, LayerNorm) take no decay
    groups = {}
    for p, key in zip(params, keys):
        groups.setdefault(key, []).append(p)
    ours = FusedRegionAdamW([{"params": ps, "region": r, "weight_decay": 0.0 if nd else 0.01}
                             for (r, nd), ps in sorted(groups.items())], lr=1e-4, region_scales=[1.0] * 10,
                            backend="triton")
    theirs = torch.optim.AdamW([{"params": ps, "lr": 1e-4, "weight_decay": 0.0 if nd else 0.01}
                                for (r, nd), ps in sorted(groups.items())], lr=1e-4, fused=True)
    return params, ours, theirs


def host_step(reps=300) -> dict:
    """Host time of a cached Triton-path step (``FusedRegionAdamW.prepare_step``: every check, the step plan and
    the tables, all but the launches) against torch's whole fused AdamW step, side by side on ``host_step_set``.
    On a CPU the Triton path needs TRITON_INTERPRET=1 to be chosen; nothing is launched here."""
    old, threads = os.environ.get("TRITON_INTERPRET"), torch.get_num_threads()
    os.environ["TRITON_INTERPRET"] = "1" if not torch.cuda.is_available() else (old or "0")
    torch.set_num_threads(1)  # 8-element tensors: threads only add contention noise to torch's CPU step
    try:
        params, ours, theirs = host_step_set()
        ours.prepare_step()  # builds the plan: what follows is the cached step
        sync = torch.cuda.synchronize if params[0].is_cuda else (lambda: None)
        ours_t, theirs_t = [], []
        for _ in range(reps):  # interleaved, so both see the same machine load
            t0 = time.perf_counter()
            ours.prepare_step()
            ours_t.append(time.perf_counter() - t0)
            sync()
            t0 = time.perf_counter()
            theirs.step()
            sync()
            theirs_t.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    ours_ms, theirs_ms = statistics.median(ours_t) * 1e3, statistics.median(theirs_t) * 1e3
    # The minimum is the least disturbed call of each: on a loaded machine the medians can be far apart.
    return dict(tensors=len(params), groups=len(ours.param_groups), ours_host_ms=ours_ms,
                torch_fused_step_ms=theirs_ms, ratio=ours_ms / theirs_ms, ours_min_ms=min(ours_t) * 1e3,
                torch_min_ms=min(theirs_t) * 1e3, ratio_of_mins=min(ours_t) / min(theirs_t))
