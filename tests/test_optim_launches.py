"""What one FusedRegionAdamW step issues on the device, counted: every Triton launch (both kernels, through
Triton's own pre-run hooks) and every other op the step dispatches (a TorchDispatchMode), with Tensor LRs
read by the kernel instead of copied; every upload and launch under its device's guard; one NaN/inf policy
on both backends."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lrdist.optim as optim_mod
import lrdist.step_plan as plan_mod
from lrdist import FusedRegionAdamW
from test_optim import BACKENDS, REGIONS, SCALES, SHAPES, make_params, reference_groups, region_groups

K = optim_mod._kernel
KERNELS = {"step": K._fused_region_adamw_kernel, "norm": K._grad_sumsq_kernel}


class OpLog(TorchDispatchMode):
    """Every op dispatched while active, but those a Triton launch issues itself (the interpreter copies its
    arguments to and from the host; a GPU launch issues none) and the profiler's markers."""

    def __init__(self):
        super().__init__()
        self.ops, self.paused = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and func.namespace != "profiler":  # (optimizer.step's record_function markers)
            self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def device_log(monkeypatch):
    """(launches, ops): launches of each kernel by Triton's pre-run hooks, and the ops of the step outside them."""
    launches = {name: 0 for name in KERNELS}
    hooks = {}
    for name, kernel in KERNELS.items():
        hooks[name] = lambda *a, _n=name, **k: launches.__setitem__(_n, launches[_n] + 1)
        kernel.add_pre_run_hook(hooks[name])
    log = OpLog()
    for wrapper in ("fused_region_adamw", "grad_sumsq"):  # the launch wrappers: ops inside are the launch's
        real = getattr(K, wrapper)

        def paused(*a, _real=real, **k):
            log.paused += 1
            try:
                return _real(*a, **k)
            finally:
                log.paused -= 1
        monkeypatch.setattr(K, wrapper, paused)
    yield launches, log
    for name, kernel in KERNELS.items():
        kernel.pre_run_hooks.remove(hooks[name])


def mixed_model(device, tensor_lr: bool, clip: bool):
    """Six fp32 tensors over four regions plus two bf16 ones: two launch sets."""
    params = make_params(torch.float32, device)
    half = make_params(torch.bfloat16, device, seed=3)[:2]
    lr = (lambda: torch.tensor(1e-2, dtype=torch.float64, device=device)) if tensor_lr else (lambda: 1e-2)
    groups = [{**g, "lr": lr()} for g in region_groups(params)] + [dict(params=half, region=1, lr=lr())]
    opt = FusedRegionAdamW(groups, lr=1e-2, region_scales=SCALES, backend="triton", block_size=64,
                           max_grad_norm=1.0 if clip else None)
    return params + half, opt


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("clip", [False, True], ids=["no-clip", "clip"])
def test_a_step_issues_one_launch_per_set_and_nothing_else(device, device_log, tensor_lr, clip):
    """Per step: one step launch per (device, dtype, amsgrad) set, plus one norm launch per set with
    clipping; no copy or any other op, Tensor LRs included (the kernel reads them where they are)."""
    launches, log = device_log
    params, opt = mixed_model(device, tensor_lr, clip)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype).to(device) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()  # warm-up: state, pointer tables and the LR table are made here
    for name in launches:
        launches[name] = 0
    with log:
        for _ in range(3):
            opt.step()
    assert launches == {"step": 2 * 3, "norm": (2 * 3 if clip else 0)}
    assert log.ops == [], log.ops


def test_tensor_lrs_follow_fill_and_match_torch(device):
    """A scheduler's fill_ on the groups' LR tensors is what the next step uses, on both backends, as torch's
    AdamW with the same LRs (one group per region)."""
    for backend in BACKENDS:
        params = make_params(torch.float32, device)
        ref = make_params(torch.float32, device)
        lrs = [torch.tensor(1e-2, device=device) for _ in SCALES]
        ours = FusedRegionAdamW([{**g, "lr": lrs[g["region"]]} for g in region_groups(params)], lr=1e-2,
                                region_scales=SCALES, backend=backend, block_size=64)
        theirs = torch.optim.AdamW(reference_groups(ref, 1e-2), lr=1e-2)
        gen = torch.Generator().manual_seed(2)
        for step in range(3):
            grads = [torch.randn(s, generator=gen).to(device) for s in SHAPES]
            for p, r, g in zip(params, ref, grads):
                p.grad, r.grad = g.clone(), g.clone()
            ours.step()
            theirs.step()
            for lr in lrs:
                lr.fill_(1e-2 * 0.5 ** (step + 1))
            for g, region in zip(theirs.param_groups, sorted(set(REGIONS))):
                g["lr"] = 1e-2 * 0.5 ** (step + 1) * SCALES[region]
        for p, r in zip(params, ref):
            torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_of_a_wrong_dtype_or_device_is_refused_before_anything_changes(device, backend):
    params = make_params(torch.float32, device)[:2]
    with pytest.raises(TypeError, match="float32 or float64"):
        FusedRegionAdamW([dict(params=params, lr=torch.tensor(1e-2, dtype=torch.bfloat16, device=device))],
                         backend=backend)
    opt = FusedRegionAdamW([dict(params=params, lr=torch.tensor(1e-2, device=device))], backend=backend)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    state = {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state_dict()["state"].items()}
    opt.param_groups[0]["lr"] = torch.tensor(1e-2, device="meta")  # on no device the params are on
    with pytest.raises(ValueError, match="Tensor lr on meta for parameters on"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(v, state[k][n]) for k, s in opt.state_dict()["state"].items() for n, v in s.items())
    opt.param_groups[0]["lr"] = torch.tensor(1e-2, dtype=torch.float16, device=device)
    with pytest.raises(TypeError, match="float32 or float64"):
        opt.step()


def test_every_upload_and_launch_runs_under_its_devices_guard(device, monkeypatch):
    """Each table upload and each launch happens inside ``on_device(its tensors' device)``, which makes that
    device (and its current stream) current on CUDA: a spy on the guard keeps the stack of devices entered,
    a pre-run hook reads it at each launch, and a spy on the optimizer's upload reads it inside the upload."""
    stack, launched, uploaded = [], [], []

    def spied(real):
        @contextlib.contextmanager
        def spy(dev):
            stack.append(torch.device(dev))
            try:
                with real(dev):
                    yield
            finally:
                stack.pop()
        return spy
    monkeypatch.setattr(K, "on_device", spied(K.on_device))
    monkeypatch.setattr(optim_mod, "on_device", spied(plan_mod.on_device))
    real_copy = dst_copy = torch.Tensor.copy_

    def copy_spy(dst, src, non_blocking=False):  # the optimizer's uploads are copies from the host
        if src.device.type == "cpu" and dst.dtype == torch.float64:
            uploaded.append((dst.device, list(stack)))
        return dst_copy(dst, src, non_blocking=non_blocking)
    hook = lambda *a, **k: launched.append(list(stack))  # noqa: E731
    for kernel in KERNELS.values():
        kernel.add_pre_run_hook(hook)
    try:
        params, opt = mixed_model(device, tensor_lr=False, clip=True)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        monkeypatch.setattr(torch.Tensor, "copy_", copy_spy)
        opt.set_region_scales([1.0, 0.5, 0.25, 2.0])  # uploads into the existing tables
        opt.param_groups[0]["lr"] = 5e-3              # the hyperparameter table is rewritten
        opt.step()
        monkeypatch.setattr(torch.Tensor, "copy_", real_copy)
    finally:
        for kernel in KERNELS.values():
            kernel.pre_run_hooks.remove(hook)
    assert len(launched) == 8 and all(w and w[-1] == torch.device(device) for w in launched)  # 2 steps x 2 sets x 2
    assert len(uploaded) >= 2 and all(s and s[-1] == dev for dev, s in uploaded), uploaded


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on inf/inf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("clip", [False, True], ids=["no-clip", "clip"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_nan_and_inf_grads_follow_one_policy_on_both_backends(device, backend, bad, clip, amsgrad):
    """The reference: torch's fused AdamW after clip_grad_norm_ (with clipping), one group per region.
    NaN positions must match; AMSGrad's max keeps a NaN as torch.maximum does (torch's CPU op drops it in a
    tensor's scalar tail), placed here both in a vectorised body and in a tail."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(4, 8), (4, 8), (150,), (19,)]
    start = [torch.randn(s, generator=gen, dtype=torch.float64).float() for s in shapes]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64).float() for s in shapes]
    grads[0][1, 2] = float(bad)
    grads[2][70] = float(bad)   # the vectorised body
    grads[3][18] = float(bad)   # a tail element
    params = [torch.nn.Parameter(p.clone().to(device)) for p in start]
    ref = [torch.nn.Parameter(p.clone()) for p in start]
    ours = FusedRegionAdamW([dict(params=params[:2], region=0), dict(params=params[2:], region=1)], lr=1e-2,
                            weight_decay=0.1, amsgrad=amsgrad, region_scales=[1.0, 0.5], backend=backend,
                            block_size=64, max_grad_norm=1.0 if clip else None)
    theirs = torch.optim.AdamW([dict(params=ref[:2], lr=1e-2), dict(params=ref[2:], lr=5e-3)], weight_decay=0.1,
                               amsgrad=amsgrad, fused=True)
    for p, r, g in zip(params, ref, grads):
        p.grad, r.grad = g.clone().to(device), g.clone()
    if clip:
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
    ours.step()
    theirs.step()
    close = dict(rtol=1e-5, atol=1e-7, equal_nan=True)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach().cpu(), r.detach(), **close)
        mine, want = ours.state[p], theirs.state[r]
        torch.testing.assert_close(mine["exp_avg_sq"].cpu(), want["exp_avg_sq"], **close)
        if amsgrad:  # the policy: torch.maximum of the old max (0) and the new second moment
            policy = torch.maximum(torch.zeros_like(want["exp_avg_sq"]), want["exp_avg_sq"])
            torch.testing.assert_close(mine["max_exp_avg_sq"].cpu(), policy, **close)
    n_nan = sum(int(p.isnan().sum()) for p in params)
    assert n_nan == (sum(p.numel() for p in params) if clip and bad == "nan" else 3)
