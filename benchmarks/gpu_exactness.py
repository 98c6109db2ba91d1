"""The kernel's promises checked on a GPU, in one run (benchmarks/gpu_check.sh calls it; about a minute).

1. Distance from torch's CUDA fused AdamW, in ulps: ``FusedRegionAdamW(backend="triton")`` and
   ``torch.optim.AdamW(fused=True)`` step the same random params with the same random grads for several
   steps; fp32, bf16 and fp16, AdamW and AMSGrad, fp32 with a GradScaler scale, and fp64. The claim
   (kernels/fused_region_adamw.py): bit for bit equal but for about one element in 10^8 per step, 1 ulp apart.
   Fails if more than 1e-5 of the elements of any tensor differ or any differs by more than 2 ulp.
2. NaN and inf grads, clipping on and off, AMSGrad on and off, against torch's fused AdamW on the same
   device after ``clip_grad_norm_``: NaNs where torch has them in params and moments (all params with a NaN
   and clipping), finite values within 1e-5; max_exp_avg_sq NaN where exp_avg_sq is (torch's CUDA op drops
   that NaN: the documented difference), equal elsewhere.
3. Streams: a step issued on a side stream, behind a long sleep and a grad copy on that stream, must see the
   copied grads (a launch on another stream would run first and read the old ones). With two GPUs, also a
   step of params on cuda:1 while cuda:0 is current.

    python benchmarks/gpu_exactness.py            on a GPU (exit 1 if a check fails)
    python benchmarks/gpu_exactness.py --quick    on the CPU with the Triton interpreter: checks this script;
                                                  part 1 then compares with torch's CPU op and only reports
"""
import argparse
import os
import sys
import warnings

import torch

SHAPES = [(2048, 1024), (1000, 7), (4099,), (1,)]
QUICK_SHAPES = [(300,), (7, 5)]
LIMIT_FRACTION, LIMIT_ULP = 1e-5, 2
_BITS = {torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF), torch.float32: (torch.int32, 0x7FFFFFFF),
         torch.float16: (torch.int16, 0x7FFF), torch.bfloat16: (torch.int16, 0x7FFF)}


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units in the last place of their dtype, per element; NaN against NaN counts 0, NaN against a
    number counts as far apart as possible."""
    int_t, magnitude = _BITS[a.dtype]

    def ordered(x):
        i = x.contiguous().view(int_t).to(torch.int64)
        return torch.where(i >= 0, i, -(i & magnitude))
    d = (ordered(a) - ordered(b)).abs()
    d = torch.where(a.isnan() & b.isnan(), 0, d)
    return torch.where(a.isnan() ^ b.isnan(), torch.iinfo(torch.int64).max, d)


def distance_from_torch(device, dtype, amsgrad, grad_scale, shapes, steps):
    """Step both optimizers; per state name, (elements, differing, max ulp) after the first and the last step."""
    from lrdist import FusedRegionAdamW
    gen = torch.Generator(device=device).manual_seed(0)
    ours = [torch.randn(s, generator=gen, device=device).to(dtype) for s in shapes]
    theirs = [p.clone() for p in ours]
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=amsgrad)
    opt = FusedRegionAdamW(ours, backend="triton", **kw)
    ref = torch.optim.AdamW(theirs, fused=True, **kw)
    if grad_scale is not None:  # as GradScaler hands them to optimizers that unscale inside the step
        for o in (opt, ref):
            o.grad_scale = torch.full((), grad_scale, device=device)
            o.found_inf = torch.zeros((), device=device)
    rows = {}
    for step in range(steps):
        for a, b in zip(ours, theirs):
            a.grad = (torch.randn(a.shape, generator=gen, device=device) * (grad_scale or 1.0)).to(dtype)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
        if step in (0, steps - 1):
            pairs = {"param": (ours, theirs)}
            for name in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
                pairs[name] = ([opt.state[p][name] for p in ours], [ref.state[p][name] for p in theirs])
            if grad_scale is not None:
                pairs["grad (unscaled)"] = ([p.grad for p in ours], [p.grad for p in theirs])
            for name, (xs, ys) in pairs.items():
                d = torch.cat([ulps(x, y).flatten() for x, y in zip(xs, ys)])
                rows[(step + 1, name)] = (d.numel(), int((d > 0).sum()), int(d.max()))
    return rows


def nan_case(device, bad, clip, amsgrad):
    """One step with a NaN or inf grad: the failures found (empty: as torch after clip_grad_norm_)."""
    from lrdist import FusedRegionAdamW
    gen = torch.Generator(device="cpu").manual_seed(1)
    params = [torch.randn(s, generator=gen).to(device) for s in [(4, 8), (4, 8), (4099,)]]
    grads = [torch.randn(p.shape, generator=gen).to(device) for p in params]
    grads[0][1, 2] = grads[2][70] = float(bad)
    ours = [p.clone() for p in params]
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    for a, b, g in zip(ours, theirs, grads):
        a.grad, b.grad = g.clone(), g.clone()
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad)
    opt = FusedRegionAdamW(ours, backend="triton", max_grad_norm=1.0 if clip else None, **kw)
    ref = torch.optim.AdamW(theirs, fused=True, **kw)
    if clip:
        torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    opt.step()
    ref.step()
    failures = []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        mine, torchs = opt.state[a], ref.state[b]
        for name, x, y in (("param", a, b.detach()), ("exp_avg", mine["exp_avg"], torchs["exp_avg"]),
                           ("exp_avg_sq", mine["exp_avg_sq"], torchs["exp_avg_sq"])):
            if not torch.allclose(x, y, rtol=1e-5, atol=1e-7, equal_nan=True):
                failures.append(f"{name} {i}")
        if amsgrad:  # ours keeps a NaN exp_avg_sq in the max (torch.maximum); torch's CUDA op drops it
            want = torch.where(torchs["exp_avg_sq"].isnan(), torchs["exp_avg_sq"], torchs["max_exp_avg_sq"])
            if not torch.allclose(mine["max_exp_avg_sq"], want, rtol=1e-5, atol=1e-7, equal_nan=True):
                failures.append(f"max_exp_avg_sq {i}")
    n_nan = sum(int(p.isnan().sum()) for p in ours)
    if n_nan != (sum(p.numel() for p in ours) if clip and bad == "nan" else 2):
        failures.append(f"{n_nan} NaN params")
    return failures


def stream_case(device: torch.device, current: torch.device) -> list:
    """A step issued on a side stream of ``device`` while ``current`` is the current device: it must run on
    that stream, after the grad copy queued there behind a long sleep."""
    from lrdist import FusedRegionAdamW
    params = [torch.randn(s, device=device) for s in [(1024, 1024), (4099,)]]
    theirs = [p.clone() for p in params]
    opt = FusedRegionAdamW(params, backend="triton", lr=1e-3)
    ref = torch.optim.AdamW(theirs, lr=1e-3, fused=True)
    for a, b in zip(params, theirs):  # a first step compiles and builds the tables
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    opt.step()
    ref.step()
    new = [torch.randn_like(p) for p in params]
    torch.cuda.synchronize(device)
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):  # (makes `device` current too)
        torch.cuda._sleep(200_000_000)  # on the order of 0.1 s of GPU time on `side`
        for p, g in zip(params, new):
            p.grad.copy_(g)
        with torch.cuda.device(current):  # `side` stays the current stream of `device`
            opt.step()
    side.synchronize()
    for b, g in zip(theirs, new):
        b.grad = g.clone()
    ref.step()
    torch.cuda.synchronize(device)
    return [f"param {i} not stepped with the side stream's grads" for i, (a, b) in enumerate(zip(params, theirs))
            if not torch.allclose(a, b, rtol=1e-6, atol=1e-7)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU and the Triton interpreter: check the script itself")
    args = ap.parse_args()
    if args.quick:
        os.environ["TRITON_INTERPRET"] = "1"  # before lrdist imports the kernel
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)  # numpy on inf/inf
        device, shapes, steps = torch.device("cpu"), QUICK_SHAPES, 2
    else:
        if not torch.cuda.is_available():
            print("gpu_exactness: no CUDA device (use --quick on a CPU)", file=sys.stderr)
            return 2
        device, shapes, steps = torch.device("cuda"), SHAPES, 10
    failed = []

    where = "the CPU, interpreted: not the GPU claim" if args.quick else torch.cuda.get_device_name()
    n_params = sum(torch.Size(s).numel() for s in shapes)
    print(f"## Distance from torch's fused AdamW on {where}, {steps} steps, {n_params} params\n")
    print("| dtype | amsgrad | grad scale | after step | state | elements | differing | max ulp |")
    print("|---|---|---|---|---|---|---|---|")
    configs = [(d, a, None) for d in (torch.float32, torch.bfloat16, torch.float16) for a in (False, True)]
    for dtype, amsgrad, scale in configs + [(torch.float32, False, 1024.0), (torch.float64, False, None)]:
        rows = distance_from_torch(device, dtype, amsgrad, scale, shapes, steps)
        for (step, name), (n, differing, worst) in rows.items():
            print(f"| {str(dtype)[6:]} | {amsgrad} | {scale or '-'} | {step} | {name} | {n} | {differing} | {worst} |")
            if not args.quick and (differing > LIMIT_FRACTION * n or worst > LIMIT_ULP):
                failed.append(f"ulps: {dtype} amsgrad={amsgrad} scale={scale} step {step} {name}")

    print("\n## NaN and inf grads against torch's fused AdamW after clip_grad_norm_\n")
    print("| grad | clipping | amsgrad | result |\n|---|---|---|---|")
    for bad in ("nan", "inf"):
        for clip in (False, True):
            for amsgrad in (False, True):
                problems = nan_case(device, bad, clip, amsgrad)
                print(f"| {bad} | {clip} | {amsgrad} | {'as torch' if not problems else ', '.join(problems)} |")
                failed += [f"nan: {bad} clip={clip} amsgrad={amsgrad}: {p}" for p in problems]

    print("\n## Streams and devices\n")
    if args.quick:
        print("skipped on the CPU")
    else:
        cases = [(torch.device("cuda:0"), torch.device("cuda:0"))]
        if torch.cuda.device_count() > 1:
            cases.append((torch.device("cuda:1"), torch.device("cuda:0")))
        else:
            print("one GPU: the cuda:1-while-cuda:0-is-current case is not run")
        for dev, current in cases:
            problems = stream_case(dev, current)
            print(f"- params on {dev}, {current} current, step on a side stream: "
                  f"{'ran on that stream' if not problems else '; '.join(problems)}")
            failed += [f"stream: {p}" for p in problems]

    print()
    print("gpu_exactness: " + ("all checks passed" if not failed else "FAILED: " + "; ".join(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
