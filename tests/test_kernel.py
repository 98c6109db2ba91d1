"""The Triton kernel alone, against AdamW written plainly below (fp64; torch's CUDA rounding; torch's own AdamW).

What the compiler makes of the kernel for GPUs (IEEE math, registers, vector width, barriers) is in test_aot.py."""
import math

import pytest
import torch

from lrdist.kernels import fused_region_adamw as K

SHAPES = [(1,), (7,), (1025,), (3, 5, 7), (64,), (130, 3)]


def reference_adamw(p, g, m, v, vmax, step, lr, beta1, beta2, eps, wd, maximize, amsgrad, grad_scale=1.0):
    """One AdamW step in float64 (torch.optim.AdamW's formulas); returns new p, m, v, vmax."""
    p, g, m, v = (x.double() for x in (p, g, m, v))
    g = g / grad_scale
    if maximize:
        g = -g
    p = p * (1 - lr * wd)
    m = m + (1 - beta1) * (g - m)
    v = beta2 * v + (1 - beta2) * g * g
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    if amsgrad:
        vmax = torch.maximum(vmax.double(), v)
        denom = vmax.sqrt() / math.sqrt(bc2) + eps
    else:
        denom = v.sqrt() / math.sqrt(bc2) + eps
    return p - lr / bc1 * m / denom, m, v, vmax


def make_set(shapes, dtype, device, amsgrad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda s, scale=1.0: (torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
    params = [mk(s) for s in shapes]
    grads = [mk(s) for s in shapes]
    m = [mk(s, 0.1) for s in shapes]
    v = [mk(s, 0.1).abs() for s in shapes]
    vmax = [x.clone() * 1.5 for x in v] if amsgrad else None
    steps = [torch.full((), float(i % 3), device=device) for i in range(len(shapes))]
    return params, grads, m, v, vmax, steps


def tolerance(dtype):
    # fp32: a few rounding steps; half: the interpreter truncates instead of rounding on store.
    return {torch.float64: (1e-12, 1e-14), torch.float32: (2e-6, 1e-7),
            torch.bfloat16: (2e-2, 2e-3), torch.float16: (4e-3, 1e-4)}[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("amsgrad,maximize", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("block", [64, 256])
def test_kernel_matches_reference(device, dtype, amsgrad, maximize, block):
    params, grads, m, v, vmax, steps = make_set(SHAPES, dtype, device, amsgrad)
    groups = [i % 2 for i in range(len(SHAPES))]
    regions = [(3 * i) % 4 for i in range(len(SHAPES))]
    hyper_rows = [[1e-2, 0.9, 0.999, 1e-8, 0.1, -1.0 if maximize else 1.0],
                  [3e-3, 0.8, 0.99, 1e-6, 0.0, -1.0 if maximize else 1.0]]
    scales = [0.5, 2.0, 1.0, 0.0]
    expected = []
    for i in range(len(SHAPES)):
        lr, b1, b2, eps, wd, _ = hyper_rows[groups[i]]
        expected.append(reference_adamw(params[i], grads[i], m[i], v[i], vmax[i] if amsgrad else None,
                                        steps[i].item() + 1, lr * scales[regions[i]], b1, b2, eps, wd,
                                        maximize, amsgrad))
    old_steps = [s.item() for s in steps]
    table = K.build_table(params, grads, m, v, vmax, steps, groups, regions, amsgrad, block)
    assert table.n_blocks == sum(math.ceil(math.prod(s) / block) for s in SHAPES)
    hyper = torch.tensor(hyper_rows, dtype=torch.float64, device=device)
    K.fused_region_adamw(table, hyper, torch.tensor(scales, dtype=torch.float64, device=device))

    rtol, atol = tolerance(dtype)
    for i, (p_ref, m_ref, v_ref, vmax_ref) in enumerate(expected):
        torch.testing.assert_close(params[i].double(), p_ref.to(dtype).double(), rtol=rtol, atol=atol)
        torch.testing.assert_close(m[i].double(), m_ref.to(dtype).double(), rtol=rtol, atol=atol)
        torch.testing.assert_close(v[i].double(), v_ref.to(dtype).double(), rtol=rtol, atol=atol)
        if amsgrad:
            torch.testing.assert_close(vmax[i].double(), vmax_ref.to(dtype).double(), rtol=rtol, atol=atol)
        assert steps[i].item() == old_steps[i] + 1  # bumped once, however many blocks
    assert table.arrivals.eq(0).all()  # counters are back to zero for the next launch


def test_found_inf_changes_nothing_and_grad_scale_unscales(device):
    params, grads, m, v, _, steps = make_set(SHAPES, torch.float32, device, False)
    table = K.build_table(params, grads, m, v, None, steps, [0] * 6, [0] * 6, False, 64)
    hyper = torch.tensor([[1e-2, 0.9, 0.999, 1e-8, 0.1, 1.0]], dtype=torch.float64, device=device)
    scales = torch.ones(1, dtype=torch.float64, device=device)
    before = [t.clone() for t in params + grads + m + v + steps]
    K.fused_region_adamw(table, hyper, scales, torch.full((), 4.0, device=device),
                         torch.ones((), device=device))
    for a, b in zip(params + grads + m + v + steps, before):
        assert torch.equal(a, b)

    expected = [reference_adamw(params[i], grads[i], m[i], v[i], None, steps[i].item() + 1, 1e-2, 0.9,
                                0.999, 1e-8, 0.1, False, False, grad_scale=4.0)[0] for i in range(6)]
    unscaled = [g / 4.0 for g in grads]
    K.fused_region_adamw(table, hyper, scales, torch.full((), 4.0, device=device),
                         torch.zeros((), device=device))
    for i in range(6):
        torch.testing.assert_close(params[i].double(), expected[i], rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(grads[i], unscaled[i])  # torch's fused AdamW writes them back too


def test_misaligned_views_take_the_scalar_path(device):
    """Params that are views at odd offsets into one buffer: no 16-byte alignment, still correct."""
    flat = torch.randn(1 + 7 + 33, dtype=torch.float64, device=device)
    views = [flat[1:8], flat[8:41]]
    grads = [torch.randn_like(x) for x in views]
    m = [torch.zeros_like(x) for x in views]
    v = [torch.zeros_like(x) for x in views]
    steps = [torch.zeros((), device=device) for _ in views]
    expected = [reference_adamw(views[i], grads[i], m[i], v[i], None, 1, 1e-2, 0.9, 0.999, 1e-8, 0.0,
                                False, False)[0] for i in range(2)]
    table = K.build_table(views, grads, m, v, None, steps, [0, 0], [0, 0], False, 16)
    assert not table.aligned
    K.fused_region_adamw(table, torch.tensor([[1e-2, 0.9, 0.999, 1e-8, 0.0, 1.0]], dtype=torch.float64,
                                             device=device), torch.ones(1, dtype=torch.float64, device=device))
    for view, exp in zip(views, expected):
        torch.testing.assert_close(view, exp, rtol=1e-12, atol=1e-14)


def torch_cuda_adamw(p, g, m, v, vmax, step, lr, beta1, beta2, eps, wd, maximize, amsgrad, grad_scale=None):
    """One step rounded as torch's CUDA fused AdamW rounds it (ATen's adam_math): element values in float32,
    lr, betas, eps and weight decay in double, so each line mixing them is evaluated in double and rounded
    once to float32; bias corrections in double, handed over as float32. Returns p, g, m, v, vmax."""
    f32 = torch.float32
    if grad_scale is not None:  # a power of two here: exact however torch divides by a Python scalar
        g = (g.double() / grad_scale).float()
    stored_grad = g
    if maximize:
        g = -g
    if wd != 0:
        p = (p.double() - lr * wd * p.double()).float()
    m = (beta1 * m.double() + (1 - beta1) * g.double()).float()
    v = (beta2 * v.double() + (1 - beta2) * g.double() * g.double()).float()
    bc1 = torch.tensor(1 - beta1 ** step, dtype=f32)
    step_size = torch.tensor(lr / bc1.item(), dtype=f32)
    bc2_sqrt = torch.tensor(math.sqrt(1 - beta2 ** step), dtype=f32)
    if amsgrad:
        vmax = torch.maximum(vmax, v)
    denom = (((vmax if amsgrad else v).sqrt() / bc2_sqrt.to(v.device)).double() + eps).float()
    return p - (step_size.to(p.device) * m) / denom, stored_grad, m, v, vmax


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("grad_scale", [None, 1024.0])
def test_fp32_step_rounds_bit_for_bit_like_torch_cuda_fused_adamw(device, amsgrad, grad_scale):
    """The kernel's fp32 operations and their rounding are torch's CUDA ones, so the results are equal, not
    close. Under the interpreter each operation rounds once, as on the GPU with FMA contraction off (the
    compiled instructions are checked in test_aot.py). Subnormal moments and grads must not flush to zero."""
    params, grads, m, v, vmax, steps = make_set(SHAPES, torch.float32, device, amsgrad, seed=3)
    tiny = 3e-41  # subnormal in float32 (the smallest normal is 1.2e-38)
    v[2].view(-1)[::3], grads[2].view(-1)[::3] = tiny, 0.0  # exp_avg_sq stays subnormal
    grads[4].view(-1)[::3], m[4].view(-1)[::3] = tiny, 0.0  # exp_avg becomes subnormal
    if amsgrad:
        vmax[2].view(-1)[1::3] = 1e-40
    groups = [i % 3 for i in range(len(SHAPES))]
    regions = [(2 * i) % 3 for i in range(len(SHAPES))]
    hyper_rows = [[1e-3, 0.9, 0.999, 1e-8, 0.01, 1.0], [3e-4, 0.8, 0.95, 1e-6, 0.0, 1.0],
                  [2e-3, 0.5, 0.9, 1e-3, 0.2, -1.0]]
    scales = [1.0, 0.3, 7.0]
    expected = []
    for i in range(len(SHAPES)):
        lr, b1, b2, eps, wd, sign = hyper_rows[groups[i]]
        expected.append(torch_cuda_adamw(params[i], grads[i], m[i], v[i], vmax[i] if amsgrad else None,
                                         steps[i].item() + 1, lr * scales[regions[i]], b1, b2, eps, wd, sign < 0,
                                         amsgrad, grad_scale))
    table = K.build_table(params, grads, m, v, vmax, steps, groups, regions, amsgrad, 64)
    K.fused_region_adamw(table, torch.tensor(hyper_rows, dtype=torch.float64, device=device),
                         torch.tensor(scales, dtype=torch.float64, device=device),
                         None if grad_scale is None else torch.full((1,), grad_scale, device=device))
    for i, (p_ref, g_ref, m_ref, v_ref, vmax_ref) in enumerate(expected):
        assert torch.equal(params[i], p_ref) and torch.equal(m[i], m_ref) and torch.equal(v[i], v_ref)
        assert torch.equal(grads[i], g_ref)
        if amsgrad:
            assert torch.equal(vmax[i], vmax_ref)
    for t in (v[2], m[4]):  # subnormals survived: no flush to zero
        assert ((t.view(-1)[::3].abs() < 1.2e-38) & (t.view(-1)[::3] != 0)).all()


def kernel_step(params, grads, amsgrad, device, max_norm=None, found_inf=None, lr=1e-2, wd=0.1):
    """One step from a fresh state through the launchers (the norm launch first when clipping).
    Returns (exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, extras)."""
    m, v, vmax = ([torch.zeros_like(p) for p in params] for _ in range(3))
    steps = [torch.zeros((), device=device) for _ in params]
    n = len(params)
    table = K.build_table(params, grads, m, v, vmax if amsgrad else None, steps, [0] * n, [0] * n, amsgrad, 64)
    extras = None
    if max_norm is not None:
        f64 = dict(dtype=torch.float64, device=device)
        extras = K.StepExtras(max_grad_norm=torch.full((1,), max_norm, **f64), norm_acc=torch.zeros(1, **f64),
                              norm_out=torch.zeros(1, dtype=torch.float32, device=device),
                              step_arrivals=torch.zeros(1, dtype=torch.int32, device=device),
                              step_programs=table.n_blocks)
        K.grad_sumsq(table, extras)
    hyper = torch.tensor([[lr, 0.9, 0.999, 1e-8, wd, 1.0]], dtype=torch.float64, device=device)
    K.fused_region_adamw(table, hyper, torch.ones(1, dtype=torch.float64, device=device), found_inf=found_inf,
                         extras=extras)
    return m, v, vmax, steps, extras


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on inf/inf
@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("clip", [False, True], ids=["no-clip", "clip"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_nan_and_inf_grads_as_torch_fused_adamw_after_clip_grad_norm(device, bad, clip, amsgrad):
    """The reference: torch's fused AdamW on the CPU after clip_grad_norm_ (with clipping). A NaN with clipping
    makes every param NaN; an inf with clipping zeroes every other grad; without clipping only the element
    is hit. AMSGrad's max keeps a NaN, as torch.maximum (the kernel's documented policy)."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(4, 8), (4, 8), (150,)]  # two blocks of 64 unmasked, one masked
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    grads[0][1, 2] = float(bad)
    grads[2][70] = float(bad)  # in a full block: the vectorised path

    ref = [torch.nn.Parameter(p.clone()) for p in params]
    for r, g in zip(ref, grads):
        r.grad = g.clone()
    norm = torch.nn.utils.clip_grad_norm_(ref, 1.0) if clip else None
    opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad,
                            fused=True)
    opt.step()

    ours = [p.to(device) for p in params]
    m, v, vmax, steps, extras = kernel_step(ours, [g.to(device) for g in grads], amsgrad, device,
                                            max_norm=1.0 if clip else None)
    close = dict(rtol=1e-5, atol=1e-7, equal_nan=True)  # NaNs must sit where torch's are
    for i, r in enumerate(ref):
        state = opt.state[r]
        torch.testing.assert_close(ours[i].cpu(), r.detach(), **close)
        torch.testing.assert_close(m[i].cpu(), state["exp_avg"], **close)
        torch.testing.assert_close(v[i].cpu(), state["exp_avg_sq"], **close)
        if amsgrad:  # torch's fused op drops a NaN here in a tensor's scalar tail; torch.maximum keeps it
            policy = torch.maximum(torch.zeros_like(state["exp_avg_sq"]), state["exp_avg_sq"])
            torch.testing.assert_close(vmax[i].cpu(), policy, **close)
        assert steps[i].item() == 1
    n_nan = sum(int(p.isnan().sum()) for p in ours)
    assert n_nan == (sum(p.numel() for p in ours) if clip and bad == "nan" else 2)
    if clip:
        torch.testing.assert_close(extras.norm_out.cpu()[0], norm, equal_nan=True)
        assert extras.norm_acc.eq(0).all() and extras.step_arrivals.eq(0).all()  # cleared for the next step


def test_found_inf_skips_a_step_with_nan_grads_and_clipping(device):
    """GradScaler's found_inf stays the way to skip a step: nothing changes, the norm accumulators reset."""
    params = [torch.randn(4, 8, device=device), torch.randn(150, device=device)]
    grads = [torch.randn_like(p) for p in params]
    grads[1][3] = float("nan")
    before = [t.clone() for t in params + grads]
    m, v, vmax, steps, extras = kernel_step(params, grads, True, device, max_norm=1.0,
                                            found_inf=torch.ones(1, device=device))
    for a, b in zip(params + grads, before):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    assert all(t.eq(0).all() for t in m + v + vmax + steps)
    assert extras.norm_acc.eq(0).all() and extras.step_arrivals.eq(0).all()


def test_tensor_lrs_are_read_through_the_lr_table(device):
    """Groups naming an LR tensor take it from there at every launch (the hyperparameter table's LR column,
    set to nonsense here, is not read for them); a fill_ between launches is seen without a rebuild."""
    params, grads, m, v, _, steps = make_set(SHAPES, torch.float32, device, False)
    groups = [i % 3 for i in range(len(SHAPES))]
    hyper = torch.tensor([[99.0, 0.9, 0.999, 1e-8, 0.1, 1.0], [99.0, 0.8, 0.99, 1e-6, 0.0, 1.0],
                          [3e-3, 0.9, 0.99, 1e-8, 0.0, 1.0]], dtype=torch.float64, device=device)
    lr0 = torch.tensor(1e-2, device=device)                      # float32, as torch's schedulers keep them
    lr1 = torch.tensor(2e-3, dtype=torch.float64, device=device)
    lr_table = K.build_lr_table([lr0, lr1, None], device)
    table = K.build_table(params, grads, m, v, None, steps, groups, [0] * 6, False, 64)
    scales = torch.ones(1, dtype=torch.float64, device=device)
    for new_lr0 in (None, 5e-3):
        if new_lr0 is not None:
            lr0.fill_(new_lr0)
        lrs = [lr0.item(), lr1.item(), 3e-3]
        expected = []
        for i in range(len(SHAPES)):
            _, b1, b2, eps, wd, _ = hyper[groups[i]].tolist()
            expected.append(reference_adamw(params[i], grads[i], m[i], v[i], None, steps[i].item() + 1,
                                            lrs[groups[i]], b1, b2, eps, wd, False, False))
        K.fused_region_adamw(table, hyper, scales, lr_table=lr_table)
        for i, (p_ref, m_ref, v_ref, _) in enumerate(expected):
            torch.testing.assert_close(params[i].double(), p_ref, rtol=2e-6, atol=1e-7)
            torch.testing.assert_close(m[i].double(), m_ref, rtol=2e-6, atol=1e-7)
            torch.testing.assert_close(v[i].double(), v_ref, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("what", ["float16 lr", "two-value lr", "lr on another device", "float lr", "short lr table",
                                  "empty grad_scale", "grad_scale on another device", "hyper on another device"])
def test_launch_inputs_the_kernel_cannot_read_are_one_line_errors_before_anything_runs(device, what):
    params, grads, m, v, _, steps = make_set(SHAPES, torch.float32, device, False)
    table = K.build_table(params, grads, m, v, None, steps, [0, 1, 0, 1, 0, 1], [0] * 6, False, 64)
    hyper = torch.tensor([[1e-2, 0.9, 0.999, 1e-8, 0.0, 1.0]] * 2, dtype=torch.float64, device=device)
    scales = torch.ones(1, dtype=torch.float64, device=device)
    before = [t.clone() for t in params + grads + m + v + steps]
    lr = torch.tensor(1e-2, device=device)
    args, kwargs = [table, hyper, scales], {}
    with pytest.raises((TypeError, ValueError)) as err:
        if what == "float16 lr":
            K.build_lr_table([lr.half(), None], device)
        elif what == "two-value lr":
            K.build_lr_table([lr.repeat(2), None], device)
        elif what == "lr on another device":
            K.build_lr_table([torch.tensor(1e-2, device="meta"), None], device)
        elif what == "float lr":
            K.build_lr_table([1e-2, None], device)
        else:
            if what == "short lr table":  # group 1 exists in the set, the table has one row
                kwargs["lr_table"] = K.build_lr_table([lr], device)
            elif what == "empty grad_scale":
                kwargs["grad_scale"] = torch.ones(0, device=device)
            elif what == "grad_scale on another device":
                kwargs["grad_scale"] = torch.ones(1, device="meta")
            else:
                args[1] = hyper.to("meta")
            K.fused_region_adamw(*args, **kwargs)
    assert "\n" not in str(err.value)
    for a, b in zip(params + grads + m + v + steps, before):
        assert torch.equal(a, b)


BAD_SETS = {
    "no tensors": lambda s: {k: [] for k in s},
    "grad in another dtype": lambda s: {"grads": [s["grads"][0].double()] + s["grads"][1:]},
    "exp_avg with fewer elements": lambda s: {"m": [s["m"][0]] + [s["m"][1][:3]] + s["m"][2:]},
    "strided grad": lambda s: {"grads": s["grads"][:5] + [s["grads"][5].t()]},
    "exp_avg_sq on another device": lambda s: {"v": [s["v"][0].to("meta")] + s["v"][1:]},
    "float64 step": lambda s: {"steps": [s["steps"][0].double()] + s["steps"][1:]},
    "two-value step": lambda s: {"steps": [s["steps"][0].repeat(2)] + s["steps"][1:]},
    "int params": lambda s: {"params": [p.to(torch.int32) for p in s["params"]]},
    "one grad short": lambda s: {"grads": s["grads"][:-1]},
    "negative region": lambda s: {"regions": [0] * 5 + [-1]},
    "row mask of the wrong length": lambda s: {"row_masks": [None] * 5 + [torch.ones(129)]},
    "float64 row mask": lambda s: {"row_masks": [None] * 5 + [torch.ones(130, dtype=torch.float64)]},
}


@pytest.mark.parametrize("what", list(BAD_SETS))
def test_build_table_refuses_any_tensor_the_kernel_would_walk_past_or_misread(device, what):
    """build_table hands the kernel raw addresses: everything at one must be the dtype, size and device the
    kernel walks it as. A bad set is one line, before any table is made."""
    params, grads, m, v, _, steps = make_set(SHAPES, torch.float32, device, False)
    s = dict(params=params, grads=grads, m=m, v=v, steps=steps, groups=[0] * 6, regions=[0] * 6,
             row_masks=[None] * 6)
    s.update({k: [t.to(device) if isinstance(t, torch.Tensor) and t.device.type != "meta" else t for t in x]
              for k, x in BAD_SETS[what](s).items()})
    with pytest.raises((TypeError, ValueError)) as err:
        K.build_table(s["params"], s["grads"], s["m"], s["v"], None, s["steps"], s["groups"], s["regions"],
                      False, 64, row_masks=s["row_masks"])
    assert "\n" not in str(err.value) and str(err.value)
