"""The Triton kernel alone, against AdamW written plainly in fp64 below."""
import math
import os
import subprocess
import sys
import textwrap

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


AOT = textwrap.dedent("""
    import sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from lrdist.kernels.fused_region_adamw import _fused_region_adamw_kernel as k
    arch, dtype, aligned, amsgrad = int(sys.argv[1]), getattr(tl, sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
    extras = sys.argv[5] == "1"  # MIGU, EWC and clipping compiled in too
    sig = dict(ptrs="*i64", meta="*i64", block_tensor="*i64", hyper="*fp64", region_scales="*fp64",
               arrivals="*i32", grad_scale_ptr="*fp32", found_inf_ptr="*fp32", ewc_lambda_ptr="*fp64",
               norm_acc="*fp64", clip_ptr="*fp64", norm_out="*fp32", step_arrivals="*i32", step_programs="i32")
    const = dict(BLOCK=2048, DTYPE=dtype, AMSGRAD=amsgrad, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, ALIGNED=aligned,
                 MIGU=extras, EWC=extras, CLIP=extras)
    sig.update({n: "constexpr" for n in const})
    ptx = triton.compile(ASTSource(fn=k, signature=sig, constexprs=const),
                         target=GPUTarget("cuda", arch, 32), options=dict(num_warps=8)).asm["ptx"]
    print("V4" if ".v4." in ptx or ".v8." in ptx else "SCALAR", ptx.count("atom."), ptx.count("bar.sync"))
    if extras:  # the norm reduction kernel lowers too
        from lrdist.kernels.fused_region_adamw import _grad_sumsq_kernel as r
        rsig = dict(ptrs="*i64", meta="*i64", block_tensor="*i64", grad_scale_ptr="*fp32", ewc_lambda_ptr="*fp64",
                    norm_acc="*fp64", BLOCK="constexpr", DTYPE="constexpr", HAS_GRAD_SCALE="constexpr",
                    MIGU="constexpr", EWC="constexpr")
        triton.compile(ASTSource(fn=r, signature=rsig, constexprs=dict(BLOCK=2048, DTYPE=dtype, HAS_GRAD_SCALE=True,
                       MIGU=True, EWC=True)), target=GPUTarget("cuda", arch, 32), options=dict(num_warps=8))
""")


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernel_compiles_for_gpus(arch, dtype):
    """Lower the real kernels to PTX for Ampere and Hopper (no GPU needed): they compile, aligned sets get
    vector loads, and the plain step holds exactly one atomic (the per-tensor arrival counter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = {}
    for aligned, extras in (("1", "0"), ("0", "0"), ("1", "1")):
        run = subprocess.run([sys.executable, "-c", AOT, str(arch), dtype, aligned, "1", extras], env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        out[aligned + extras] = run.stdout.split()
    assert out["10"][0] == "V4" and out["00"][0] == "SCALAR"
    assert out["10"][1] == "1"  # plain: one atomic, the arrival counter
    assert out["11"][0] == "V4"  # the optional terms keep the vector loads
