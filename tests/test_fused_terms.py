"""Clipping, EWC and MIGU fused into the step, each against its unfused reference + torch AdamW."""
import pytest
import torch

from lrdist import FusedRegionAdamW

BACKENDS = ["torch", "triton"]
SHAPES = [(6, 5), (7,), (33, 4), (3, 5, 7), (129, 2)]
SCALES = [0.5, 2.0, 1.0]
REGIONS = [0, 1, 2, 1, 0]


def params(dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_() for s in SHAPES]


def groups(ps, lr=None):
    out = []
    for region in range(3):
        g = {"params": [p for p, r in zip(ps, REGIONS) if r == region]}
        g.update({"region": region} if lr is None else {"lr": lr * SCALES[region]})
        out.append(g)
    return out


def grads(steps, device, scale=1.0, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64).to(device) * scale for s in SHAPES] for _ in range(steps)]


def close(a_list, b_list, dtype=torch.float64, loose=False):
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    if loose:  # fp32 with every term: a different order of roundings, amplified by Adam (1e-4 of a step)
        tol = dict(rtol=1e-4, atol=1e-5)
    for a, b in zip(a_list, b_list):
        torch.testing.assert_close(a.detach(), b.detach(), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_clipping_equals_clip_grad_norm_then_adamw(device, backend, dtype):
    ours, ref = params(dtype, device), params(dtype, device)
    opt = FusedRegionAdamW(groups(ours), lr=1e-2, region_scales=SCALES, backend=backend, block_size=64, max_grad_norm=1.5)
    ref_opt = torch.optim.AdamW(groups(ref, 1e-2), lr=1e-2)
    for k, step_grads in enumerate(grads(5, device, scale=3.0)):
        factor = 0.01 if k == 2 else 1.0  # one step under the threshold: no clipping then
        for p, r, g in zip(ours, ref, step_grads):
            p.grad, r.grad = (g * factor).to(dtype), (g * factor).to(dtype)
        opt.step()
        norm = torch.nn.utils.clip_grad_norm_(ref, 1.5)
        ref_opt.step()
        torch.testing.assert_close(opt.last_grad_norm.double(), norm.double(), rtol=1e-5, atol=1e-7)
    close(ours, ref, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_ewc_equals_autograd_penalty_then_adamw(device, backend):
    ours, ref = params(torch.float64, device), params(torch.float64, device)
    gen = torch.Generator().manual_seed(7)
    fisher = [torch.rand(s, generator=gen, dtype=torch.float64).to(device) for s in SHAPES]
    anchor = [torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in SHAPES]
    lam = 3.0
    opt = FusedRegionAdamW(groups(ours), lr=1e-2, region_scales=SCALES, backend=backend, block_size=64)
    # EWC on all but the second tensor
    opt.set_ewc({p: f for i, (p, f) in enumerate(zip(ours, fisher)) if i != 1},
                {p: a for i, (p, a) in enumerate(zip(ours, anchor)) if i != 1}, lam)
    ref_opt = torch.optim.AdamW(groups(ref, 1e-2), lr=1e-2)
    for step_grads in grads(5, device):
        for p, g in zip(ours, step_grads):
            p.grad = g.clone()
        opt.step()
        ref_opt.zero_grad()
        penalty = lam * sum((f * (r - a) ** 2).sum() for i, (r, f, a) in enumerate(zip(ref, fisher, anchor)) if i != 1)
        penalty.backward()  # autograd of the formula
        for r, g in zip(ref, step_grads):
            r.grad = r.grad + g if r.grad is not None else g.clone()
        ref_opt.step()
    close(ours, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_row_masks_equal_masked_grads_then_adamw(device, backend):
    ours, ref = params(torch.float64, device), params(torch.float64, device)
    opt = FusedRegionAdamW(groups(ours), lr=1e-2, region_scales=SCALES, backend=backend, block_size=64)
    ref_opt = torch.optim.AdamW(groups(ref, 1e-2), lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    masked = [0, 2, 4]  # weights with rows; the 1-D and 3-D tensors stay unmasked
    tables = []
    for step, step_grads in enumerate(grads(4, device)):
        masks = {i: (torch.rand(SHAPES[i][0], generator=gen) > 0.6).double().to(device) for i in masked}
        if step == 3:
            masks.pop(4)  # a weight left out of a later call is unmasked again
        opt.set_row_masks({ours[i]: m for i, m in masks.items()})
        tables.append(len(opt._tables))
        for i, (p, r, g) in enumerate(zip(ours, ref, step_grads)):
            p.grad = g.clone()
            r.grad = g * masks[i].view(-1, *([1] * (g.dim() - 1))) if i in masks else g.clone()
        opt.step()
        ref_opt.step()
    close(ours, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_terms_together_with_grad_scaler_and_two_dtypes(device, backend):
    """Unscale, mask, EWC and clip in one step, over an fp32 and a bf16 launch set (two launches share one norm)."""
    ours, ref = params(torch.float32, device), params(torch.float32, device)
    half = torch.randn(8, 3, dtype=torch.bfloat16, device=device, requires_grad=True)
    half_ref = half.detach().clone().requires_grad_()
    fisher = {p: torch.rand_like(p) for p in ours}
    anchor = {p: torch.randn_like(p) for p in ours}
    opt = FusedRegionAdamW(groups(ours) + [{"params": [half], "region": 0}], lr=1e-2, region_scales=SCALES,
                           backend=backend, block_size=64, max_grad_norm=2.0)
    opt.set_ewc(fisher, anchor, 0.5)
    ref_opt = torch.optim.AdamW(groups(ref, 1e-2) + [{"params": [half_ref], "lr": 1e-2 * SCALES[0]}], lr=1e-2)
    scale = torch.full((), 64.0, device=device)
    for step_grads in grads(3, device):
        keep = (torch.arange(6, device=device) % 2).double()
        opt.set_row_masks({ours[0]: keep})
        hg = torch.randn(8, 3, device=device)
        for p, g in zip(ours, step_grads):
            p.grad = (g * 64.0).float()
        half.grad = (hg * 64.0).to(torch.bfloat16)
        opt.grad_scale, opt.found_inf = scale, torch.zeros((), device=device)
        opt.step()
        # the reference, unfused: unscale, mask, EWC penalty gradient, clip, AdamW
        for i, (r, g) in enumerate(zip(ref, step_grads)):
            g = g.float()
            if i == 0:
                g = g * keep.float().view(-1, 1)
            r.grad = g + 2 * 0.5 * fisher[ours[i]] * (r.detach() - anchor[ours[i]])
        half_ref.grad = (hg * 64.0).to(torch.bfloat16) / 64.0
        torch.nn.utils.clip_grad_norm_(ref + [half_ref], 2.0)
        ref_opt.step()
    close(ours, ref, torch.float32, loose=True)
    torch.testing.assert_close(half.float(), half_ref.float(), rtol=3e-2, atol=1e-2)


def test_bad_extras():
    p = torch.zeros(4, 3, requires_grad=True)
    opt = FusedRegionAdamW([p])
    with pytest.raises(ValueError, match="row mask needs 4 values"):
        opt.set_row_masks({p: torch.ones(3)})
    with pytest.raises(ValueError, match="shapes must equal"):
        opt.set_ewc({p: torch.ones(3)}, {p: torch.ones(3)}, 1.0)
    with pytest.raises(ValueError, match="max_grad_norm must be positive"):
        FusedRegionAdamW([p], max_grad_norm=0.0)
