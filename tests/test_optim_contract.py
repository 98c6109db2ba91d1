"""FusedRegionAdamW keeps torch.optim's contract on both backends (issue 10, one test per row).

References are written plainly here: torch.optim.AdamW (foreach=False) with one group per region,
clip_grad_norm_ on fp32 copies, and a twin optimizer that never saw the bad input.
"""
import copy
import pickle

import pytest
import torch

import lrdist.optim as optim_mod
from lrdist import FusedRegionAdamW

BACKENDS = ["torch", "triton"]
SCALES = [0.5, 2.0]
LR = 1e-2


def make(device, backend, seed=0, steps=1, **kw):
    """Three params in two regions, `steps` steps taken, and fresh grads set for the next step."""
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in [(6, 4), (5,), (3, 2)]]
    groups = [{"params": [ps[0]], "region": 0}, {"params": [ps[1], ps[2]], "region": 1}]
    opt = FusedRegionAdamW(groups, lr=LR, region_scales=SCALES, backend=backend, block_size=64, **kw)
    for _ in range(steps + 1):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        if _ < steps:
            opt.step()
    return ps, opt


def reference(ps, **kw):
    """torch's AdamW on copies of ps, with the lr x scale of each region: one group per region."""
    ref = [p.detach().clone().requires_grad_() for p in ps]
    groups = [{"params": [ref[0]], "lr": LR * SCALES[0]}, {"params": ref[1:], "lr": LR * SCALES[1]}]
    return ref, torch.optim.AdamW(groups, lr=LR, foreach=False, **kw)


def snapshot(opt, ps) -> dict:
    """Everything a bad input must leave as it was."""
    return dict(
        params=[p.detach().clone() for p in ps], grads=[p.grad.clone() for p in ps],
        state={id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in ps if p in opt.state},
        groups=[(len(g["params"]), g["region"], g["lr"], g["betas"], g["eps"], g["weight_decay"])
                for g in opt.param_groups],
        scales=opt.region_scales.clone(), max_grad_norm=opt.max_grad_norm, ewc_lambda=opt._ewc_lambda,
        ewc={id(p): [t.clone() for t in pair] for p, pair in opt._ewc.items()},
        masks={id(p): m.clone() for p, m in opt._row_masks.items()})


def assert_same(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


# ---- bad input: one clear line, nothing changed ------------------------------------------------------------

def new_opt(**kw):
    """A call building another optimizer over the same params with one bad argument."""
    def call(opt, ps):
        FusedRegionAdamW([{"params": ps, "region": 0}], **{"backend": opt.backend, **kw})
    return call


def new_param(dtype):
    def call(opt, ps):
        FusedRegionAdamW([torch.zeros(3, dtype=dtype)], backend=opt.backend)
    return call


def add_group(**group):
    def call(opt, ps):
        opt.add_param_group({"params": [torch.zeros(4, requires_grad=True)], **group})
    return call


def add_group_params(params):
    def call(opt, ps):
        opt.add_param_group({"params": params, "region": 0})
    return call


def masks(bad):
    def call(opt, ps):
        opt.set_row_masks(bad(ps))
    return call


def ewc(fisher, anchor, lam):
    def call(opt, ps):
        opt.set_ewc(fisher(ps), anchor(ps), lam)
    return call


def load(edit):
    """load_state_dict of the optimizer's own state dict with one part broken."""
    def call(opt, ps):
        sd = copy.deepcopy(opt.state_dict())
        edit(sd)
        opt.load_state_dict(sd)
    return call


def mutate_group(key, value):
    """Change a group's hyperparameter after construction, step, and put it back (the step must refuse)."""
    def call(opt, ps):
        old = opt.param_groups[1][key]
        opt.param_groups[1][key] = value
        try:
            opt.step()
        finally:
            opt.param_groups[1][key] = old
    return call


def mutate_state(key, value):
    """Replace one entry of a param's state by hand after a step, step, and put it back (the step must refuse)."""
    def call(opt, ps):
        state = opt.state[ps[0]]
        old = state[key]
        state[key] = value(old)
        try:
            opt.step()
        finally:
            state[key] = old
    return call


def list_twice(opt, ps):
    """A param appended to a group's list by hand after construction (add_param_group would refuse it)."""
    opt.param_groups[1]["params"].append(ps[0])
    try:
        opt.step()
    finally:
        opt.param_groups[1]["params"].pop()


def convert(dtype):
    """model.half() / .double() after a step (Module._apply swaps .data of params and grads), then step."""
    def call(opt, ps):
        old = [(p.data, p.grad.data) for p in ps]
        for p in ps:
            p.data, p.grad.data = p.data.to(dtype), p.grad.data.to(dtype)
        try:
            opt.step()
        finally:
            for p, (data, grad) in zip(ps, old):
                p.data, p.grad.data = data, grad
    return call


def setter(name, value):
    def call(opt, ps):
        setattr(opt, name, value)
    return call


def rows(ps):
    return ps[0].shape[0]


nan = float("nan")
inf = float("inf")
ok_ewc = lambda ps: {ps[0]: torch.rand_like(ps[0])}  # noqa: E731
ok_anchor = lambda ps: {ps[0]: torch.zeros_like(ps[0])}  # noqa: E731

# (issue row, id, call, exception type, what the message says)
BAD_INPUTS = [
    (14, "region_scales-strings", new_opt(region_scales=["a"]), TypeError, "region scales must be a 1-D sequence"),
    (14, "region_scales-complex", new_opt(region_scales=torch.ones(1, dtype=torch.complex64)), TypeError, "real numbers"),
    (14, "region_scales-nan", new_opt(region_scales=[nan]), ValueError, "NaN or inf"),
    (14, "region_scales-too-short", new_opt(region_scales=[]), ValueError, "empty"),
    (14, "lr-string", new_opt(lr="0.1"), TypeError, "learning rate must be a real number"),
    (14, "lr-negative", new_opt(lr=-1.0), ValueError, "invalid learning rate"),
    (14, "lr-nan", new_opt(lr=nan), ValueError, "invalid learning rate"),
    (14, "lr-tensor-2-values", new_opt(lr=torch.ones(2)), TypeError, "one floating-point value"),
    (17, "lr-tensor-bfloat16", new_opt(lr=torch.tensor(0.1, dtype=torch.bfloat16)), TypeError, "float32 or float64"),
    (17, "eps-tensor-negative", new_opt(eps=torch.tensor(-1.0)), ValueError, "invalid epsilon"),
    (17, "weight_decay-tensor-nan", new_opt(weight_decay=torch.tensor(nan)), ValueError, "invalid weight_decay"),
    (17, "eps-tensor-2-d", new_opt(eps=torch.tensor([[1e-8, 1e-8]])), TypeError, "one floating-point value"),
    (17, "param-twice-in-a-group", lambda opt, ps: FusedRegionAdamW([ps[0], ps[0]], backend=opt.backend), ValueError,
     "appears twice"),
    (14, "betas-one-value", new_opt(betas=(0.9,)), TypeError, "betas must be two real numbers"),
    (14, "betas-beta2-1", new_opt(betas=(0.9, 1.0)), ValueError, r"each must lie in \[0, 1\)"),
    (14, "eps-negative", new_opt(eps=-1e-8), ValueError, "invalid epsilon"),
    (14, "weight_decay-None", new_opt(weight_decay=None), TypeError, "weight_decay must be a real number"),
    (14, "amsgrad-string", new_opt(amsgrad="yes"), TypeError, "amsgrad must be True or False"),
    (14, "block_size-100", new_opt(block_size=100), ValueError, "power of two"),
    (14, "block_size-float", new_opt(block_size=64.0), TypeError, "block_size must be an int"),
    (14, "max_grad_norm-zero", new_opt(max_grad_norm=0.0), ValueError, "max_grad_norm must be positive"),
    (14, "max_grad_norm-string", new_opt(max_grad_norm="1"), TypeError, "max_grad_norm must be a positive number"),
    (14, "backend-cuda", new_opt(backend="cuda"), ValueError, "backend must be one of"),
    (11, "param-fp8", new_param(torch.float8_e4m3fn), TypeError, "supports parameters of dtype"),
    (11, "param-int", new_param(torch.int64), TypeError, "supports parameters of dtype"),
    (11, "param-complex", new_param(torch.complex64), TypeError, "supports parameters of dtype"),
    (4, "add-group-region-minus-1", add_group(region=-1), ValueError, "non-negative int"),
    (4, "add-group-region-float", add_group(region=0.0), ValueError, "non-negative int"),
    (4, "add-group-region-too-high", add_group(region=5), ValueError, "region 5 is out of range"),
    (4, "add-group-int-params", add_group_params([torch.zeros(3, dtype=torch.int32)]), TypeError, "dtype"),
    (4, "add-group-lr-string", add_group(lr="0.1"), TypeError, "learning rate"),
    (4, "add-group-params-set", add_group_params({torch.zeros(2, requires_grad=True)}), TypeError, "not a set"),
    (5, "masks-second-wrong-length", masks(lambda ps: {ps[0]: torch.ones(rows(ps)), ps[2]: torch.ones(7)}),
     ValueError, "row mask needs 3 values"),
    (5, "masks-not-a-param", masks(lambda ps: {torch.zeros(6, 4): torch.ones(6)}), ValueError, "parameter of this"),
    (14, "masks-a-list", masks(lambda ps: [torch.ones(6)]), TypeError, "takes a dict"),
    (7, "masks-nan", masks(lambda ps: {ps[0]: torch.tensor([1.0, nan, 1.0, 0.0, 1.0, 1.0])}), ValueError, "NaN or inf"),
    (7, "ewc-lambda-nan", ewc(ok_ewc, ok_anchor, nan), ValueError, "EWC lambda"),
    (7, "ewc-lambda-inf", ewc(ok_ewc, ok_anchor, inf), ValueError, "EWC lambda"),
    (7, "ewc-fisher-nan", ewc(lambda ps: {ps[0]: torch.full_like(ps[0], nan)}, ok_anchor, 1.0), ValueError, "NaN or inf"),
    (7, "ewc-anchor-inf", ewc(ok_ewc, lambda ps: {ps[0]: torch.full_like(ps[0], inf)}, 1.0), ValueError, "NaN or inf"),
    (14, "ewc-fisher-a-list", ewc(lambda ps: [torch.ones(6, 4)], ok_anchor, 1.0), TypeError, "takes dicts"),
    (14, "ewc-lambda-string", ewc(ok_ewc, ok_anchor, "1"), ValueError, "EWC lambda"),
    (14, "ewc-wrong-shape", ewc(lambda ps: {ps[0]: torch.ones(3)}, lambda ps: {ps[0]: torch.ones(3)}, 1.0),
     ValueError, "shapes must equal"),
    (14, "ewc-no-anchor", ewc(ok_ewc, lambda ps: {}, 1.0), ValueError, "no anchor"),
    (14, "set_region_scales-short", lambda opt, ps: opt.set_region_scales([1.0]), ValueError, "expected 2 region"),
    (14, "set_region_scales-nan", lambda opt, ps: opt.set_region_scales([1.0, nan]), ValueError, "NaN or inf"),
    (14, "max_grad_norm-set-negative", setter("max_grad_norm", -1.0), ValueError, "max_grad_norm must be positive"),
    (6, "load-region_scales-too-short", load(lambda sd: sd.update(region_scales=torch.ones(1, dtype=torch.float64))),
     ValueError, "region 1 is out of range"),
    (6, "load-exp_avg-wrong-shape", load(lambda sd: sd["state"][0].update(exp_avg=torch.zeros(3))),
     ValueError, "belongs to another model"),
    (6, "load-group-region-too-high", load(lambda sd: sd["param_groups"][1].update(region=9)),
     ValueError, "region 9 is out of range"),
    (17, "load-state-without-exp_avg_sq", load(lambda sd: sd["state"][0].pop("exp_avg_sq")), ValueError,
     "has no 'exp_avg_sq'"),
    (17, "load-state-without-step", load(lambda sd: sd["state"][1].pop("step")), ValueError, "has no 'step'"),
    (6, "load-one-group-missing", load(lambda sd: sd["param_groups"].pop()), ValueError, "parameter groups"),
    (6, "load-not-a-state-dict", lambda opt, ps: opt.load_state_dict([1, 2]), TypeError, "needs an optimizer state"),
    (16, "load-groups-region_scales-differ", load(lambda sd: (sd.pop("region_scales"),
                                                              sd["param_groups"][0].update(region_scales=(1.0, 3.0)))),
     ValueError, "carry different region_scales"),
    (8, "region-mutated-to-7", mutate_group("region", 7), ValueError, "region 7 is out of range"),
    (8, "region-mutated-to-minus-1", mutate_group("region", -1), ValueError, "non-negative int"),
    (8, "region-mutated-to-10**6", mutate_group("region", 10 ** 6), ValueError, "out of range"),
    (8, "region-mutated-to-1.5", mutate_group("region", 1.5), ValueError, "non-negative int"),
    (8, "lr-mutated-to-string", mutate_group("lr", "0.1"), TypeError, "learning rate"),
    (17, "lr-mutated-to-a-tensor-elsewhere", mutate_group("lr", torch.tensor(0.1, device="meta")), ValueError,
     "Tensor lr on meta for parameters on"),
    (17, "state-step-float64", mutate_state("step", lambda t: t.double()), RuntimeError, "not one float32 value"),
    (17, "state-step-an-int", mutate_state("step", lambda t: 5), RuntimeError, "not one float32 value"),
    (17, "state-exp_avg-none", mutate_state("exp_avg", lambda t: None), RuntimeError, "holds no tensor under 'exp_avg'"),
    (17, "param-appended-twice-by-hand", list_twice, ValueError, "appears more than once"),
    (17, "expanded-param", add_group_params([torch.ones(3).expand(6, 3)]), ValueError, "sharing memory"),
    (17, "tensor-lr-nan", new_opt(lr=torch.tensor(nan)), (ValueError, TypeError), "learning rate|Tensor lr"),
    (9, "model.double()-after-a-step", convert(torch.float64), RuntimeError, "load_state_dict"),
    (9, "model.half()-after-a-step", convert(torch.float16), RuntimeError, "load_state_dict"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row,call,exc,match", [b[:1] + b[2:] for b in BAD_INPUTS], ids=[f"row{b[0]}-{b[1]}" for b in BAD_INPUTS])
def test_bad_input_raises_one_clear_line_and_changes_nothing(device, backend, row, call, exc, match):
    ps, opt = make(device, backend)
    opt.set_row_masks({ps[2]: torch.tensor([1.0, 0.0, 1.0])})  # extras present, so they must stay too
    twin_ps, twin = make(device, backend)
    twin.set_row_masks({twin_ps[2]: torch.tensor([1.0, 0.0, 1.0])})
    before = snapshot(opt, ps)
    with pytest.raises(exc, match=match) as info:
        call(opt, ps)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300
    assert_same(snapshot(opt, ps), before)
    opt.step()   # and the next step is the one it would have been without the bad call
    twin.step()
    for a, b in zip(ps, twin_ps):
        assert torch.equal(a, b)


# ---- row 1: deepcopy and pickle ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_keeps_its_config_and_steps_like_the_original(device, backend, how):
    ps, opt = make(device, backend, max_grad_norm=0.7)
    opt.set_ewc({ps[0]: torch.rand_like(ps[0])}, {ps[0]: torch.zeros_like(ps[0])}, 0.3)
    opt.set_row_masks({ps[2]: torch.tensor([1.0, 0.0, 1.0])})
    opt.step()
    copy_ps, copy_opt = copy.deepcopy((ps, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((ps, opt)))
    assert copy_opt.max_grad_norm == 0.7 and copy_opt.backend == backend and copy_opt.block_size == 64
    assert copy_opt.region_scales.tolist() == SCALES and copy_opt._ewc_lambda == 0.3
    assert set(copy_opt._ewc) == {copy_ps[0]} and set(copy_opt._row_masks) == {copy_ps[2]}
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        for p, q in zip(ps, copy_ps):
            q.grad = torch.randn(p.shape, generator=gen).to(device)
            p.grad = q.grad.clone()
        opt.step()
        copy_opt.step()
    for p, q in zip(ps, copy_ps):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    torch.testing.assert_close(copy_opt.last_grad_norm, opt.last_grad_norm)


# ---- row 2: non-dense params and grads with other strides -----------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [None, 1.0], ids=["plain", "clipped"])
def test_non_dense_params_and_strided_grads_match_torch(device, backend, clip):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(20, generator=gen, dtype=torch.float64).to(device)
    strided = torch.nn.Parameter(base[::2])                                        # non-dense
    transposed = torch.nn.Parameter(torch.randn(4, 6, generator=gen, dtype=torch.float64).to(device).t())
    plain = torch.nn.Parameter(torch.randn(5, 3, generator=gen, dtype=torch.float64).to(device))
    ps = [strided, transposed, plain]
    opt = FusedRegionAdamW([{"params": ps[:2], "region": 0}, {"params": ps[2:], "region": 1}], lr=LR,
                           region_scales=SCALES, backend=backend, block_size=64, max_grad_norm=clip)
    ref = [p.detach().clone().requires_grad_() for p in ps]
    ref_opt = torch.optim.AdamW([{"params": ref[:2], "lr": LR * SCALES[0]}, {"params": ref[2:], "lr": LR * SCALES[1]}],
                                lr=LR, foreach=False)
    untouched = base[1::2].clone()
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device) for p in ps]
        strided.grad = grads[0]
        transposed.grad = grads[1].clone()                     # the param's (transposed) strides
        plain.grad = grads[2].t().contiguous().t()             # strides unlike the param's
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        opt.step()
        if clip:
            torch.nn.utils.clip_grad_norm_(ref, clip)
        ref_opt.step()
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-12, atol=1e-14)
    assert torch.equal(base[1::2], untouched)  # the elements between the strided param's stay as they were


# ---- row 3: zero-element tensors ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_element_tensors_count_steps_like_torch(device, backend):
    ps = [torch.zeros(0, device=device, requires_grad=True), torch.zeros(0, 5, device=device, requires_grad=True),
          torch.randn(3, device=device, requires_grad=True)]
    opt = FusedRegionAdamW(ps, lr=LR, backend=backend, block_size=64)
    ref = [p.detach().clone().requires_grad_() for p in ps]
    ref_opt = torch.optim.AdamW(ref, lr=LR, foreach=False)
    for _ in range(3):
        for p, r in zip(ps, ref):
            p.grad = torch.randn(p.shape, device=device)
            r.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    assert [opt.state[p]["step"].item() for p in ps] == [ref_opt.state[r]["step"].item() for r in ref] == [3.0] * 3
    torch.testing.assert_close(ps[2], ref[2])


# ---- row 9: the model's dtype changes after a step --------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["double", "half"])
def test_a_dtype_change_is_refused_then_the_documented_fix_steps_like_torch(device, backend, dtype):
    model = torch.nn.Linear(4, 3).to(device)
    ref_model = copy.deepcopy(model)
    opt = FusedRegionAdamW(model.parameters(), lr=LR, backend=backend, block_size=64)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=LR, foreach=False)
    x = torch.randn(8, 4, device=device)
    for m, o in ((model, opt), (ref_model, ref_opt)):
        m(x).square().sum().backward()
        o.step()
        m.to(dtype)
        m.zero_grad()
        m(x.to(dtype)).square().sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="model.half()"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    opt.load_state_dict(opt.state_dict())          # the fix the message names: casts the state
    ref_opt.load_state_dict(ref_opt.state_dict())  # what torch's AdamW needs too
    opt.step()
    ref_opt.step()
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float16 else dict(rtol=1e-6, atol=1e-7)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b.double(), **tol)


# ---- row 10: grad dtype unlike the param's ---------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_a_grad_in_another_dtype_is_refused_before_anything_changes(device, backend):
    p = torch.randn(16, device=device).to(torch.bfloat16).requires_grad_()
    q = torch.randn(5, device=device, requires_grad=True)
    opt = FusedRegionAdamW([p, q], lr=LR, backend=backend, block_size=64)
    q.grad = torch.randn(5, device=device)
    p.grad_dtype = torch.float32
    p.grad = torch.randn(16, device=device)
    before = [p.detach().clone(), q.detach().clone()]
    with pytest.raises(TypeError, match="is torch.float32: like torch's AdamW"):
        opt.step()
    assert torch.equal(p, before[0]) and torch.equal(q, before[1]) and not opt.state


# ---- row 11: clipping state survives a failed step --------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_survives_a_step_that_failed_after_the_norm(device, backend, monkeypatch):
    ps, opt = make(device, backend, steps=0, max_grad_norm=1.0)
    ref, ref_opt = reference(ps)
    # A launch that fails after the norm was taken (a compile error, an out-of-memory): injected once.
    name, module = ("fused_region_adamw", optim_mod._kernel) if backend == "triton" else ("_torch_adamw", optim_mod)
    real = getattr(module, name)

    def fail_once(*args, **kwargs):
        monkeypatch.setattr(module, name, real)
        raise RuntimeError("launch failed")
    monkeypatch.setattr(module, name, fail_once)
    grads = [p.grad.clone() for p in ps]
    with pytest.raises(RuntimeError, match="launch failed"):
        opt.step()
    for p, g in zip(ps, grads):
        assert torch.equal(p.grad, g)  # .grad is left as it was (clipping never writes it)
    for _ in range(2):
        opt.step()
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        ref_opt.step()
        torch.testing.assert_close(opt.last_grad_norm.double(), norm.double(), rtol=1e-6, atol=0)
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p, r)


# ---- row 12: the clipping norm of fp16 grads above 65504 ---------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_fp16_grads_with_a_norm_above_the_fp16_range(device, backend):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen).to(device, torch.float16).requires_grad_() for s in [(40, 30), (50,)]]
    opt = FusedRegionAdamW(ps, lr=LR, eps=1e-3, backend=backend, block_size=64, max_grad_norm=1.0)
    ref = [p.detach().clone().requires_grad_() for p in ps]
    ref_opt = torch.optim.AdamW(ref, lr=LR, eps=1e-3, fused=True)  # fp32 math on fp16 tensors, as ours
    for _ in range(2):
        grads = [(torch.randn(p.shape, generator=gen) * 3000).to(device, torch.float16) for p in ps]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        fp32 = [g.float().requires_grad_() for g in grads]  # clip_grad_norm_ on fp32 copies
        for t in fp32:
            t.grad = t.detach().clone()
        norm = torch.nn.utils.clip_grad_norm_(fp32, 1.0)
        assert norm > 65504
        for r, t in zip(ref, fp32):
            r.grad = t.grad.half()
        ref_opt.step()
        torch.testing.assert_close(opt.last_grad_norm.double(), norm.double(), rtol=1e-5, atol=0)
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p.double(), r.double(), rtol=8e-3, atol=1e-3)


# ---- row 13: what .grad holds after a step ----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad_scale"])
def test_grad_after_a_step_with_masks_ewc_and_clipping_is_the_unscaled_loss_grad(device, backend, scaled):
    ps, opt = make(device, backend, max_grad_norm=0.5)
    opt.set_ewc({ps[1]: torch.rand_like(ps[1])}, {ps[1]: torch.zeros_like(ps[1])}, 2.0)
    opt.set_row_masks({ps[0]: (torch.arange(6, device=device) % 2).float()})
    grads = [p.grad.clone() for p in ps]
    if scaled:
        for p in ps:
            p.grad.mul_(8.0)
        opt.grad_scale, opt.found_inf = torch.full((), 8.0, device=device), torch.zeros((), device=device)
    opt.step()
    for p, g in zip(ps, grads):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


# ---- the step plan notices what moved --------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_the_step_plan_follows_replaced_storage_and_new_grads(device, backend):
    """p.data replaced (same dtype and size), grads set to None and back, a grad dropped: like torch."""
    ps, opt = make(device, backend, steps=0)
    ref, ref_opt = reference(ps)
    gen = torch.Generator().manual_seed(9)
    for k in range(5):
        grads = [torch.randn(p.shape, generator=gen).to(device) for p in ps]
        if k == 2:
            ps[0].data = ps[0].data.clone()  # new storage
        for i, (p, r, g) in enumerate(zip(ps, ref, grads)):
            p.grad = None if (k == 3 and i == 1) else g.clone()
            r.grad = None if (k == 3 and i == 1) else g.clone()
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p, r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["new-dict", "cleared", "new-exp_avg", "state-cleared", "exp_avg-storage-swapped",
                                 "exp_avg_sq-resized-in-place", "a-non-tensor-entry-added"])
def test_state_replaced_between_steps_is_followed_like_torch(device, backend, how):
    """A state dict or tensor replaced by hand between steps (grads kept in place, so no address moved)
    makes the step rebuild its tables, as torch's AdamW follows it; the kernel never walks the freed buffers."""
    gen = torch.Generator().manual_seed(5)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(64,), (7, 3)]]
    ours = [p.clone().to(device).requires_grad_() for p in start]
    ref = [p.clone().requires_grad_() for p in start]
    opt = FusedRegionAdamW(ours, lr=1e-2, backend=backend, block_size=64, weight_decay=0.0)
    theirs = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.0)
    for p in ours + ref:
        p.grad = torch.zeros_like(p)
    for k in range(4):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in start]
        for p, r, g in zip(ours, ref, grads):
            p.grad.copy_(g.to(device))
            r.grad.copy_(g)
        if k == 2:
            for o, t, p, r in ((opt, theirs, ours[0], ref[0]),):
                if how == "new-dict":
                    o.state[p], t.state[r] = {}, {}
                elif how == "cleared":
                    o.state[p].clear(), t.state[r].clear()
                elif how == "new-exp_avg":
                    o.state[p]["exp_avg"] = torch.full_like(p, 0.5)
                    t.state[r]["exp_avg"] = torch.full_like(r, 0.5)
                elif how == "a-non-tensor-entry-added":  # kept, ignored, as torch's AdamW ignores it
                    o.state[p]["note"] = t.state[r]["note"] = "mine"
                elif how == "exp_avg-storage-swapped":  # the same tensor object, new memory
                    o.state[p]["exp_avg"].data = torch.full_like(p, 0.5)
                    t.state[r]["exp_avg"] = torch.full_like(r, 0.5)
                elif how == "exp_avg_sq-resized-in-place":  # grows (new memory), then back to its shape
                    v = o.state[p]["exp_avg_sq"]
                    v.resize_(4096).fill_(0.25)
                    v.resize_(p.shape)
                    t.state[r]["exp_avg_sq"].fill_(0.25)
                else:
                    o.state.clear(), t.state.clear()
            junk = [torch.zeros(64, dtype=torch.float64, device=device) for _ in range(20)]  # reuses freed memory
        opt.step()
        theirs.step()
    for p, r in zip(ours, ref):
        torch.testing.assert_close(p.detach().cpu(), r.detach(), rtol=1e-12, atol=1e-14)
    assert all(j.eq(0).all() for j in junk)  # nothing wrote into memory the old state had


@pytest.mark.parametrize("backend", BACKENDS)
def test_hyperparameters_changed_in_place_are_followed_like_torch(device, backend):
    """A Tensor eps or weight decay changed with fill_, and betas given as a list changed element by element,
    take effect at the next step, as torch's AdamW reads them afresh."""
    gen = torch.Generator().manual_seed(9)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(64,), (7, 3)]]
    ours = [p.clone().to(device).requires_grad_() for p in start]
    ref = [p.clone().requires_grad_() for p in start]
    eps, wd = torch.tensor(1e-8, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    opt = FusedRegionAdamW(ours, lr=1e-2, betas=[0.9, 0.999], eps=eps, weight_decay=wd, backend=backend,
                           block_size=64)
    theirs = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for k in range(3):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in start]
        for p, r, g in zip(ours, ref, grads):
            p.grad, r.grad = g.to(device), g.clone()
        if k == 1:
            eps.fill_(0.5)
            wd.fill_(0.3)
            opt.param_groups[0]["betas"][0] = 0.5
            theirs.param_groups[0].update(eps=0.5, weight_decay=0.3, betas=(0.5, 0.999))
        opt.step()
        theirs.step()
    for p, r in zip(ours, ref):
        torch.testing.assert_close(p.detach().cpu(), r.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_at_one_address_trading_grads_step_like_torch(device, backend):
    """Two zero-size params (both at address 0) hand a grad from one to the other: which params have a grad
    is part of what the cached plan compares, so each is stepped when it has one, as in torch's AdamW."""
    a, b = torch.zeros(0, device=device, requires_grad=True), torch.zeros(0, 3, device=device, requires_grad=True)
    c = torch.randn(4, device=device, requires_grad=True)
    opt = FusedRegionAdamW([a, b, c], backend=backend, block_size=16)
    a.grad, c.grad = torch.zeros(0, device=device), torch.randn(4, device=device)
    opt.step()
    a.grad, b.grad = None, torch.zeros(0, 3, device=device)
    opt.step()
    assert [opt.state[t]["step"].item() for t in (a, b, c)] == [1.0, 1.0, 2.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_partial_state_is_refused_before_anything_changes(device, backend):
    ps, opt = make(device, backend)
    before = snapshot(opt, ps)
    saved = opt.state[ps[0]].pop("exp_avg_sq")
    with pytest.raises(RuntimeError, match="has no 'exp_avg_sq'"):
        opt.step()
    opt.state[ps[0]]["exp_avg_sq"] = saved
    assert_same(snapshot(opt, ps), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tensor_lr_replaced_by_a_float_steps_with_the_float(device, backend):
    p = torch.randn(8, dtype=torch.float64, device=device, requires_grad=True)
    p.grad = torch.randn(8, dtype=torch.float64, device=device)
    opt = FusedRegionAdamW([{"params": [p], "lr": torch.tensor(1e-2, dtype=torch.float64, device=device)}],
                           backend=backend, weight_decay=0.0)
    opt.step()
    opt.param_groups[0]["lr"] = 0.0
    before = p.detach().clone()
    opt.step()
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [None, 100.0], ids=["plain", "clip"])
def test_a_strided_grad_is_left_unscaled_after_a_gradscaler_step(device, backend, clip):
    p = torch.randn(8, 6, device=device, requires_grad=True)
    loss_grad = torch.randn(6, 8, device=device).t()  # non-contiguous: stepped through a staging copy
    p.grad = loss_grad * 4.0
    opt = FusedRegionAdamW([p], backend=backend, max_grad_norm=clip)
    opt.grad_scale, opt.found_inf = torch.tensor(4.0, device=device), torch.tensor(0.0, device=device)
    opt.step()
    torch.testing.assert_close(p.grad, loss_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_expanded_grad_is_refused_before_anything_changes(device, backend):
    p = torch.randn(4, 3, device=device, requires_grad=True)
    opt = FusedRegionAdamW([p], backend=backend)
    p.grad = torch.ones(3, device=device).expand(4, 3)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="sharing memory"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state
    # At the address, size and contiguity of a strided grad the cached plan stepped with: refused too.
    base = torch.randn(4, 8, device=device)
    p.grad = base[:, :3]
    opt.step()
    p.grad = base[:, :1].expand(4, 3)
    opt.grad_scale = torch.tensor(2.0, device=device)
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
    with pytest.raises(RuntimeError, match="sharing memory"):
        opt.step()
    assert torch.equal(p.detach(), before[0]) and all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_state_after_a_reshaped_param_steps_like_a_fresh_optimizer(device, backend):
    p = torch.randn(3, 4, device=device).t().requires_grad_()  # non-contiguous: staged
    p.grad = torch.randn(3, 4, device=device).t()
    opt = FusedRegionAdamW([p], lr=1e-2, backend=backend)
    opt.step()
    p.data = torch.randn(5, 3, device=device).t()
    p.grad = torch.randn(3, 5, device=device)
    with pytest.raises(RuntimeError, match="changed after a step"):
        opt.step()
    opt.reset_state()  # the documented way out
    ref = p.detach().clone().requires_grad_()
    ref.grad = p.grad.clone()
    opt.step()
    torch.optim.AdamW([ref], lr=1e-2).step()
    torch.testing.assert_close(p.detach(), ref.detach())


def test_an_empty_first_group_is_accepted_as_torch_accepts_it(device):
    p = torch.randn(5, device=device, requires_grad=True)
    p.grad = torch.ones(5, device=device)
    opt = FusedRegionAdamW([{"params": []}, {"params": [p], "region": 1}], region_scales=[1.0, 0.5])
    opt.step()
    assert opt.state[p]["step"].item() == 1
