"""FusedRegionAdamW against torch.optim.AdamW built with one param group per region (lr x scale)."""
import copy
import os

import pytest
import torch

import lrdist.optim as optim_mod
from lrdist import FusedRegionAdamW

BACKENDS = ["torch", "triton"]
SHAPES = [(1,), (7,), (1025,), (3, 5, 7), (33, 4), (2,)]
REGIONS = [0, 2, 1, 2, 0, 3]            # mixed: several tensors per region, interleaved
SCALES = [0.5, 2.0, 1.0, 0.3]


def make_params(dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device).requires_grad_()
            for s in SHAPES]


def region_groups(params, **extra):
    """Ours: one group per region carrying "region"."""
    return [dict(params=[p for p, r in zip(params, REGIONS) if r == region], region=region, **extra)
            for region in sorted(set(REGIONS))]


def reference_groups(params, lr, **extra):
    """torch's: one group per region with lr x scale."""
    return [dict(params=[p for p, r in zip(params, REGIONS) if r == region], lr=lr * SCALES[region], **extra)
            for region in sorted(set(REGIONS))]


def feed_grads(steps, dtype, device, seed=1, skip=None):
    """The same random grads for every run: a list (per step) of lists (per tensor); None skips."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(steps):
        out.append([None if skip and skip(k, i) else torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device)
                    for i, s in enumerate(SHAPES)])
    return out


def run(opt, params, grads, scheduler=None):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.clone()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_params_close(ours, ref, dtype):
    # Half precision: a few ulps. The interpreter truncates on every store (a GPU rounds), which
    # drifts by up to an ulp a step, so it gets more room.
    ulps = 8 if os.environ.get("TRITON_INTERPRET") == "1" else 3
    tol = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=1e-6, atol=1e-7),
           torch.bfloat16: dict(rtol=ulps * 2 ** -7, atol=2 ** -10),
           torch.float16: dict(rtol=ulps * 2 ** -10, atol=2 ** -14)}[dtype]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.detach().double(), b.detach().double(), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("amsgrad,maximize,weight_decay", [(False, False, 0.1), (True, False, 0.0), (False, True, 0.05)])
def test_matches_torch_adamw_with_region_groups(device, backend, dtype, amsgrad, maximize, weight_decay):
    params, ref = make_params(dtype, device), make_params(dtype, device)
    half = dtype in (torch.bfloat16, torch.float16)
    # In half precision second moments reach subnormals, where an eps of 1e-7 would amplify one
    # rounding difference into a huge step; 1e-3 is the usual half-precision choice.
    kw = dict(betas=(0.85, 0.995), eps=1e-3 if half else 1e-7, weight_decay=weight_decay, amsgrad=amsgrad,
              maximize=maximize)
    ours = FusedRegionAdamW(region_groups(params), lr=1e-2, region_scales=SCALES, backend=backend,
                            block_size=64, **kw)
    # Half precision: torch's fused kernel (fp32 math, one rounding) is the fair reference.
    theirs = torch.optim.AdamW(reference_groups(ref, 1e-2), lr=1e-2, fused=half or None, **kw)
    # Tensor 5 skips step 1 and tensor 0 skips step 3: their step counts must lag like torch's.
    grads = feed_grads(6, dtype, device, skip=lambda k, i: (k, i) in {(1, 5), (3, 0)})
    run(ours, params, grads)
    run(theirs, ref, grads)
    assert_params_close(params, ref, dtype)
    for p, r in zip(params, ref):
        assert ours.state[p]["step"].item() == theirs.state[r]["step"].item()
        m_ours, m_ref = ours.state[p]["exp_avg"].double(), theirs.state[r]["exp_avg"].double()
        scale = m_ref.abs().max().item()
        tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 5e-2)
        torch.testing.assert_close(m_ours, m_ref, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_tracks_an_fp64_reference(device, backend):
    """fp32 against the exact (fp64) answer, not only against torch's fp32 rounding."""
    params, ref = make_params(torch.float32, device), make_params(torch.float64, device)
    ours = FusedRegionAdamW(region_groups(params), lr=1e-3, weight_decay=0.01, region_scales=SCALES,
                            backend=backend, block_size=64)
    theirs = torch.optim.AdamW(reference_groups(ref, 1e-3), lr=1e-3, weight_decay=0.01)
    run(ours, params, feed_grads(5, torch.float32, device))
    run(theirs, ref, [[g.double() for g in gs] for gs in feed_grads(5, torch.float32, device)])
    for a, b in zip(params, ref):
        torch.testing.assert_close(a.detach().double(), b.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", ["cosine_warmup", "step_lr"])
def test_schedulers_and_distribution_changes(device, backend, schedule):
    """A scheduler moves group lrs and set_region_scales swaps the distribution mid-run."""
    from transformers import get_cosine_schedule_with_warmup
    params, ref = make_params(torch.float64, device), make_params(torch.float64, device)
    ours = FusedRegionAdamW(region_groups(params), lr=1e-2, region_scales=SCALES, backend=backend, block_size=64)
    theirs = torch.optim.AdamW(reference_groups(ref, 1e-2), lr=1e-2)
    make = {"cosine_warmup": lambda o: get_cosine_schedule_with_warmup(o, 2, 8),
            "step_lr": lambda o: torch.optim.lr_scheduler.StepLR(o, 2, gamma=0.5)}[schedule]
    s_ours, s_theirs = make(ours), make(theirs)
    grads = feed_grads(8, torch.float64, device)
    run(ours, params, grads[:4], s_ours)
    run(theirs, ref, grads[:4], s_theirs)
    new_scales = [1.0, 0.1, 4.0, 0.0]
    ours.set_region_scales(new_scales)
    for group, region in zip(theirs.param_groups, sorted(set(REGIONS))):  # rescale the reference too
        for key in ("lr", "initial_lr"):
            group[key] = group[key] / SCALES[region] * new_scales[region]
    s_theirs.base_lrs = [g["initial_lr"] for g in theirs.param_groups]
    run(ours, params, grads[4:], s_ours)
    run(theirs, ref, grads[4:], s_theirs)
    assert_params_close(params, ref, torch.float64)
    assert ours.region_scales.tolist() == new_scales


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trips_both_ways(device, backend, tmp_path):
    grads = feed_grads(6, torch.float32, device)
    # ours -> torch AdamW -> continue, against ours continuing
    params_a, params_b = make_params(torch.float32, device), make_params(torch.float32, device)
    scales_one = [1.0] * 4  # torch groups carry the lr themselves, so compare at unit scales
    ours = FusedRegionAdamW(region_groups(params_a), lr=1e-2, amsgrad=True, region_scales=scales_one,
                            backend=backend, block_size=64)
    run(ours, params_a, grads[:3])
    torch.save(ours.state_dict(), tmp_path / "ours.pt")
    with torch.no_grad():
        for a, b in zip(params_a, params_b):
            b.copy_(a)
    theirs = torch.optim.AdamW([dict(params=g["params"]) for g in region_groups(params_b)], lr=1e-2, amsgrad=True)
    theirs.load_state_dict(torch.load(tmp_path / "ours.pt"))
    run(ours, params_a, grads[3:])
    run(theirs, params_b, grads[3:])
    assert_params_close(params_a, params_b, torch.float32)

    # torch AdamW (one group per region at lr x scale) -> ours with that distribution: its moments and steps
    # come over, our lr and region table stay (its LRs are effective ones), training continues identically
    params_c, params_d = make_params(torch.float32, device), make_params(torch.float32, device)
    src = torch.optim.AdamW(reference_groups(params_c, 1e-2), lr=1e-2)
    run(src, params_c, grads[:3])
    with torch.no_grad():
        for c, d in zip(params_c, params_d):
            d.copy_(c)
    dst = FusedRegionAdamW(region_groups(params_d), lr=1e-2, region_scales=SCALES, backend=backend, block_size=64)
    dst.load_state_dict(copy.deepcopy(src.state_dict()))
    assert [g["region"] for g in dst.param_groups] == sorted(set(REGIONS))
    assert [g["lr"] for g in dst.param_groups] == [1e-2] * 4  # not lr x scale: that would scale twice
    assert all(dst.state[p]["step"].device == p.device for p in params_d)
    run(src, params_c, grads[3:])
    run(dst, params_d, grads[3:])
    assert_params_close(params_d, params_c, torch.float32)


def test_state_dict_restores_the_distribution(device):
    params = make_params(torch.float32, device)
    a = FusedRegionAdamW(region_groups(params), region_scales=SCALES)
    b = FusedRegionAdamW(region_groups(params))
    b.load_state_dict(a.state_dict())
    assert b.region_scales.tolist() == SCALES


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_skips_a_step_with_inf_and_unscales_otherwise(device, backend):
    params, ref = make_params(torch.float32, device), make_params(torch.float32, device)
    ours = FusedRegionAdamW(region_groups(params), lr=1e-2, region_scales=SCALES, backend=backend, block_size=64)
    theirs = torch.optim.AdamW(reference_groups(ref, 1e-2), lr=1e-2)
    scaler = torch.amp.GradScaler(device.type, init_scale=256.0)
    scaler.scale(torch.ones((), device=device))  # the scaler creates its scale lazily here
    grads = feed_grads(3, torch.float32, device)

    def scaled_step(step_grads, inject_inf):
        for p, g in zip(params, step_grads):
            p.grad = g * scaler.get_scale()
        if inject_inf:
            params[2].grad[5] = float("inf")
        scaler.step(ours)
        scaler.update()

    scaled_step(grads[0], False)
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(ours.state_dict()["state"])
    scaled_step(grads[1], True)  # skipped: params and state bit-identical, step count included
    for a, b in zip(params, before):
        assert torch.equal(a, b)
    for k, st in ours.state_dict()["state"].items():
        for name, value in st.items():
            assert torch.equal(value, state_before[k][name]), name
    scaled_step(grads[2], False)
    run(theirs, ref, [grads[0], grads[2]])
    assert_params_close(params, ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rebuilds_tables_when_grads_move_and_keeps_one_launch_per_dtype(device, backend, request):
    """zero_grad(set_to_none=True) gives new grad tensors; a mixed fp32/bf16 model steps in two launches."""
    launches = []
    hook = lambda *a, **k: launches.append(1)  # noqa: E731  (Triton calls it at every launch of the kernel)
    optim_mod._kernel._fused_region_adamw_kernel.add_pre_run_hook(hook)
    request.addfinalizer(lambda: optim_mod._kernel._fused_region_adamw_kernel.pre_run_hooks.remove(hook))
    params = make_params(torch.float32, device)
    half = make_params(torch.bfloat16, device, seed=3)[:2]
    ref = make_params(torch.float32, device)
    ours = FusedRegionAdamW(region_groups(params) + [dict(params=half, region=1)], lr=1e-2,
                            region_scales=SCALES, backend=backend, block_size=64)
    theirs = torch.optim.AdamW(reference_groups(ref, 1e-2), lr=1e-2)
    grads = feed_grads(4, torch.float32, device)
    for step_grads in grads:
        ours.zero_grad(set_to_none=True)
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        for h in half:
            h.grad = torch.randn_like(h)
        ours.step()
    run(theirs, ref, grads)
    assert_params_close(params, ref, torch.float32)
    assert len(launches) == (8 if backend == "triton" else 0)  # one per (device, dtype) per step


def test_auto_uses_torch_on_cpu_and_triton_errors_off_cuda_without_interpreter(monkeypatch):
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    opt = FusedRegionAdamW([p], backend="auto")
    assert not opt._use_triton(p.device)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    opt = FusedRegionAdamW([p], backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        opt.step()


def test_default_table_has_one_scale_per_region():
    params = make_params(torch.float32, "cpu")
    opt = FusedRegionAdamW(region_groups(params))
    assert opt.num_regions == 4 and opt.region_scales.tolist() == [1.0] * 4


@pytest.mark.parametrize("bad,match", [
    ([1.0, 1.0, 1.0], "expected 4 region scales"),
    ([1.0, float("nan"), 1.0, 1.0], "NaN or inf at region"),
    ([1.0, 1.0, float("inf"), 1.0], "NaN or inf at region"),
    ([1.0, -0.5, 1.0, 1.0], "negative at region"),
    ([[1.0, 1.0], [1.0, 1.0]], "1-D"),
])
def test_bad_scale_tables_raise(bad, match):
    params = make_params(torch.float32, "cpu")
    opt = FusedRegionAdamW(region_groups(params))
    with pytest.raises(ValueError, match=match):
        opt.set_region_scales(bad)
    if "expected" not in match:
        with pytest.raises(ValueError, match=match):
            FusedRegionAdamW(region_groups(params), region_scales=bad)
    assert opt.region_scales.tolist() == [1.0] * 4  # unchanged


def test_bad_inputs_raise():
    params = make_params(torch.float32, "cpu")
    with pytest.raises(ValueError, match="out of range"):
        FusedRegionAdamW(region_groups(params), region_scales=[1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative int"):
        FusedRegionAdamW([dict(params=params, region=-1)])
    with pytest.raises(ValueError, match="non-negative int"):
        FusedRegionAdamW([dict(params=params, region=1.5)])
    opt = FusedRegionAdamW(region_groups(params))
    with pytest.raises(ValueError, match="out of range"):
        opt.add_param_group(dict(params=[torch.zeros(2, requires_grad=True)], region=7))
    with pytest.raises(ValueError, match="more than one parameter group"):
        FusedRegionAdamW([dict(params=[params[0]], region=0), dict(params=[params[0]], region=1)])
    with pytest.raises(TypeError, match="complex"):
        FusedRegionAdamW([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(ValueError, match="backend"):
        FusedRegionAdamW(params, backend="cuda")
    with pytest.raises(ValueError, match="betas"):
        FusedRegionAdamW(params, betas=(0.9, 1.0))
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = FusedRegionAdamW(emb.parameters())
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
