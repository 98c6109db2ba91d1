"""One AdamW step over every tensor of a (device, dtype) set in a single Triton launch.

The kernel knows pointers and tables, nothing about ``torch.optim``:

* ``TensorTable`` packs, per tensor, the addresses of param / grad / exp_avg / exp_avg_sq /
  max_exp_avg_sq / step, its numel, group and region, and a block->tensor map. It is built on the host
  once and sent with one pinned, non-blocking copy; it is rebuilt only when an address changes.
* Per-group hyperparameters (lr, beta1, beta2, eps, weight_decay, sign) and per-region LR scales are
  float64 device tables, read by every program. Changing the LR schedule or the distribution rewrites
  a table: no recompile, no host sync, and a captured CUDA graph sees the new values.
* Each tensor's step count is a device float32 (torch's fused layout). Every program computes with
  ``step + 1``; the last program of a tensor to finish (an arrival counter) writes ``step + 1`` back,
  so all programs read the old value and the step update costs no second launch.
* ``grad_scale`` / ``found_inf`` are fused as in torch's fused AdamW: with ``found_inf`` set nothing
  changes, the step count included; with ``grad_scale`` the unscaled grad is written back.
* Optional, per tensor: a MIGU row mask (one value per output row), an EWC pair (Fisher F, anchor
  theta*) adding 2 lambda F (theta - theta*) to the grad as it is read, and global-norm clipping: a first
  launch (``grad_sumsq``) reduces the squared norm of those effective grads into one accumulator, the step
  scales each grad by min(1, max_norm / (norm + 1e-6)), and its last program clears the accumulator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Columns of the per-tensor pointer table and of the per-group hyperparameter table.
PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, STEP, FISHER, ANCHOR, ROW_MASK = range(9)
N_PTRS = 9
NUMEL, GROUP, REGION, FIRST_BLOCK, ROW_LEN = range(5)
N_META = 5
LR, BETA1, BETA2, EPS, WEIGHT_DECAY, SIGN = range(6)
N_HYPER = 6

DEFAULT_BLOCK = 2048
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16,
              torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}


@triton.jit
def _tensor_extras(ptrs, meta, t, ewc_lambda):
    """Tensor t's optional terms: row length, row-mask, Fisher and anchor addresses (0: none), lambda."""
    return (tl.load(meta + t * 5 + 4), tl.load(ptrs + t * 9 + 8), tl.load(ptrs + t * 9 + 6),
            tl.load(ptrs + t * 9 + 7), ewc_lambda)


@triton.jit
def _effective_grad(g, p, offs, mask, row_len, mask_addr, fisher_addr, anchor_addr, ewc_lambda,
                    DTYPE: tl.constexpr, CT: tl.constexpr, MIGU: tl.constexpr, EWC: tl.constexpr):
    """The gradient the step uses: the loss gradient with MIGU's row mask, plus EWC's penalty gradient."""
    if MIGU:
        if mask_addr != 0:
            keep = tl.load(mask_addr.to(tl.pointer_type(tl.float32)) + offs // row_len, mask=mask)
            g = g * keep.to(CT)
    if EWC:
        if fisher_addr != 0:
            fisher = tl.load(fisher_addr.to(tl.pointer_type(DTYPE)) + offs, mask=mask).to(CT)
            anchor = tl.load(anchor_addr.to(tl.pointer_type(DTYPE)) + offs, mask=mask).to(CT)
            g = g + (2.0 * ewc_lambda).to(CT) * fisher * (p - anchor)
    return g


@triton.jit
def _adamw_update(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, numel, grad_scale_ptr, extras,
                  step_size, decay, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, sign, clip,
                  DTYPE: tl.constexpr, CT: tl.constexpr, AMSGRAD: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                  MIGU: tl.constexpr, EWC: tl.constexpr, CLIP: tl.constexpr, MASKED: tl.constexpr):
    """AdamW on one block of one tensor. Full blocks run unmasked so loads can be vectorised."""
    if MASKED:
        mask = offs < numel
    else:
        mask = None
    g = tl.load(g_ptr + offs, mask=mask).to(CT)
    if HAS_GRAD_SCALE:
        g = g / tl.load(grad_scale_ptr).to(CT)
        tl.store(g_ptr + offs, g.to(DTYPE), mask=mask)  # as torch's fused AdamW: grads left unscaled
    p = tl.load(p_ptr + offs, mask=mask).to(CT)
    row_len, mask_addr, fisher_addr, anchor_addr, ewc_lambda = extras
    g = _effective_grad(g, p, offs, mask, row_len, mask_addr, fisher_addr, anchor_addr, ewc_lambda,
                        DTYPE, CT, MIGU, EWC)
    if CLIP:
        g = g * clip
    g = g * sign
    m = tl.load(m_ptr + offs, mask=mask).to(CT)
    v = tl.load(v_ptr + offs, mask=mask).to(CT)

    p = p * decay
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    if AMSGRAD:
        # As torch's fused kernel: the max with v before it is rounded to the state dtype (in half
        # precision a tiny v would otherwise round to 0 and leave eps alone in the denominator).
        vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=mask).to(CT), v)
        tl.store(vmax_ptr + offs, vmax.to(DTYPE), mask=mask)
        denom = tl.sqrt(vmax) / bc2_sqrt + eps
    else:
        denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p - step_size * (m / denom)

    tl.store(p_ptr + offs, p.to(DTYPE), mask=mask)
    tl.store(m_ptr + offs, m.to(DTYPE), mask=mask)
    tl.store(v_ptr + offs, v.to(DTYPE), mask=mask)


@triton.jit
def _grad_sumsq_kernel(ptrs, meta, block_tensor, grad_scale_ptr, ewc_lambda_ptr, norm_acc,
                       BLOCK: tl.constexpr, DTYPE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                       MIGU: tl.constexpr, EWC: tl.constexpr):
    """Adds the squared L2 norm of every effective grad of the set into norm_acc (one launch)."""
    CT: tl.constexpr = tl.float64 if DTYPE == tl.float64 else tl.float32
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    numel = tl.load(meta + t * 5 + 0)
    offs = (pid - tl.load(meta + t * 5 + 3)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(tl.load(ptrs + t * 9 + 1).to(tl.pointer_type(DTYPE)) + offs, mask=mask, other=0.0).to(CT)
    if HAS_GRAD_SCALE:
        g = g / tl.load(grad_scale_ptr).to(CT)
    ewc_lambda = 0.0
    if EWC:
        ewc_lambda = tl.load(ewc_lambda_ptr)
    p = tl.load(tl.load(ptrs + t * 9 + 0).to(tl.pointer_type(DTYPE)) + offs, mask=mask, other=0.0).to(CT)
    row_len, mask_addr, fisher_addr, anchor_addr, ewc_lambda = _tensor_extras(ptrs, meta, t, ewc_lambda)
    g = _effective_grad(g, p, offs, mask, row_len, mask_addr, fisher_addr, anchor_addr, ewc_lambda,
                        DTYPE, CT, MIGU, EWC)
    g = tl.where(mask, g, 0.0)
    tl.atomic_add(norm_acc, tl.sum(g * g).to(tl.float64), sem="relaxed")


@triton.jit
def _fused_region_adamw_kernel(
    ptrs,            # int64 [T, 9]: addresses (see PARAM..ROW_MASK); 0 where a tensor has none
    meta,            # int64 [T, 5]: numel, group, region, first block, row length
    block_tensor,    # int64 [n_blocks]: which tensor each program updates
    hyper,           # float64 [G, 6]: lr, beta1, beta2, eps, weight_decay, sign (-1 maximises)
    region_scales,   # float64 [R]
    arrivals,        # int32 [T]: programs finished this launch; always back to 0 afterwards
    grad_scale_ptr,  # [1] (read only if HAS_GRAD_SCALE)
    found_inf_ptr,   # [1] (read only if HAS_FOUND_INF)
    ewc_lambda_ptr,  # float64 [1] (read only if EWC)
    norm_acc,        # float64 [1]: squared grad norm from _grad_sumsq_kernel (CLIP)
    clip_ptr,        # float64 [1]: max_grad_norm (CLIP)
    norm_out,        # float32 [1]: the grad norm, for logging (CLIP)
    step_arrivals,   # int32 [1]: programs finished over every launch of this step (CLIP)
    step_programs,   # programs of every launch of this step: the last one clears norm_acc (CLIP)
    BLOCK: tl.constexpr,
    DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,
    MIGU: tl.constexpr,
    EWC: tl.constexpr,
    CLIP: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    live = True
    if HAS_FOUND_INF:  # an inf/NaN in the scaled grads: change nothing, the step count included
        live = tl.load(found_inf_ptr) == 0
    clip = tl.full((), 1.0, tl.float64)
    if CLIP:
        norm = tl.sqrt(tl.load(norm_acc))
        clip = tl.minimum(tl.load(clip_ptr) / (norm + 1e-6), 1.0)
        if pid == 0:
            tl.store(norm_out, norm.to(tl.float32))
    if live:
        numel = tl.load(meta + t * 5 + 0)
        group = tl.load(meta + t * 5 + 1)
        region = tl.load(meta + t * 5 + 2)
        local = pid - tl.load(meta + t * 5 + 3)

        # Element math in fp32 (fp64 for fp64 params); scalars in fp64 so bias corrections stay exact.
        CT: tl.constexpr = tl.float64 if DTYPE == tl.float64 else tl.float32
        p_ptr = tl.load(ptrs + t * 9 + 0).to(tl.pointer_type(DTYPE))
        g_ptr = tl.load(ptrs + t * 9 + 1).to(tl.pointer_type(DTYPE))
        m_ptr = tl.load(ptrs + t * 9 + 2).to(tl.pointer_type(DTYPE))
        v_ptr = tl.load(ptrs + t * 9 + 3).to(tl.pointer_type(DTYPE))
        vmax_ptr = tl.load(ptrs + t * 9 + 4).to(tl.pointer_type(DTYPE))
        step_ptr = tl.load(ptrs + t * 9 + 5).to(tl.pointer_type(tl.float32))
        if ALIGNED:  # every address is 16-byte aligned: allow vector loads
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            m_ptr = tl.multiple_of(m_ptr, 16)
            v_ptr = tl.multiple_of(v_ptr, 16)
            vmax_ptr = tl.multiple_of(vmax_ptr, 16)
        ewc_lambda = 0.0
        if EWC:
            ewc_lambda = tl.load(ewc_lambda_ptr)
        extras = _tensor_extras(ptrs, meta, t, ewc_lambda)

        lr = tl.load(hyper + group * 6 + 0) * tl.load(region_scales + region)
        beta1 = tl.load(hyper + group * 6 + 1)
        beta2 = tl.load(hyper + group * 6 + 2)
        eps = tl.load(hyper + group * 6 + 3)
        weight_decay = tl.load(hyper + group * 6 + 4)
        sign = tl.load(hyper + group * 6 + 5)
        step = tl.load(step_ptr).to(tl.float64) + 1.0
        bias_correction1 = 1.0 - tl.exp(step * tl.log(beta1))
        bias_correction2 = 1.0 - tl.exp(step * tl.log(beta2))

        offs = local.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
        args = (p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, numel, grad_scale_ptr, extras,
                (lr / bias_correction1).to(CT), (1.0 - lr * weight_decay).to(CT), (1.0 - beta1).to(CT),
                beta2.to(CT), (1.0 - beta2).to(CT), tl.sqrt(bias_correction2).to(CT), eps.to(CT),
                sign.to(CT), clip.to(CT))
        if (local + 1) * BLOCK <= numel:
            _adamw_update(*args, DTYPE, CT, AMSGRAD, HAS_GRAD_SCALE, MIGU, EWC, CLIP, MASKED=False)
        else:
            _adamw_update(*args, DTYPE, CT, AMSGRAD, HAS_GRAD_SCALE, MIGU, EWC, CLIP, MASKED=True)

        # Only the last program of this tensor to arrive bumps its step: every other program has
        # already read the old value (acq_rel orders those reads before the counter). The atomic is
        # issued by one thread per program, so first wait for every warp of this program: a warp that
        # has not yet loaded `step` could otherwise read the last program's `step + 1`.
        tl.debug_barrier()
        arrived = tl.atomic_add(arrivals + t, 1, sem="acq_rel")
        # A zero-element tensor still has one (fully masked) program, so its step count moves like torch's.
        if arrived == tl.maximum(tl.cdiv(numel, BLOCK), 1) - 1:
            tl.store(step_ptr, step.to(tl.float32))
            tl.store(arrivals + t, 0)
    if CLIP:  # the last program of the whole step (every launch) clears the norm accumulator
        done = tl.atomic_add(step_arrivals, 1, sem="acq_rel")
        if done == step_programs - 1:
            tl.store(norm_acc, 0.0)
            tl.store(step_arrivals, 0)


@dataclass
class TensorTable:
    """Device tables describing one launch set: every tensor of one (device, dtype, amsgrad)."""

    ptrs: torch.Tensor          # int64 [T, 9]
    meta: torch.Tensor          # int64 [T, 5]
    block_tensor: torch.Tensor  # int64 [n_blocks]
    arrivals: torch.Tensor      # int32 [T]
    n_blocks: int
    dtype: torch.dtype
    amsgrad: bool
    aligned: bool
    block: int
    migu: bool = False          # some tensor carries a row mask
    ewc: bool = False           # some tensor carries an EWC pair
    max_group: int = 0          # the hyperparameter and region tables must reach these rows
    max_region: int = 0


@dataclass
class StepExtras:
    """What every launch set of one step on one device shares, for the optional fused terms."""

    ewc_lambda: torch.Tensor | None = None     # float64 [1]
    max_grad_norm: torch.Tensor | None = None  # float64 [1]: clipping on when set
    norm_acc: torch.Tensor | None = None       # float64 [1], zero between steps
    norm_out: torch.Tensor | None = None       # float32 [1]: the last step's grad norm
    step_arrivals: torch.Tensor | None = None  # int32 [1], zero between steps
    step_programs: int = 0                     # programs over every step launch of this step


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device with one pinned, non-blocking copy (a plain copy on CPU)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def build_table(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, groups, regions,
                amsgrad: bool, block: int = DEFAULT_BLOCK, fishers=None, anchors=None,
                row_masks=None) -> TensorTable:
    """Pack the addresses and sizes of a launch set into device tables (one pinned copy).

    All lists are aligned per tensor; ``max_exp_avg_sqs`` may be None when ``amsgrad`` is off, and
    ``fishers``/``anchors`` (EWC) and ``row_masks`` (float32, one value per row) may hold None entries.
    """
    n = len(params)
    if n == 0:
        raise ValueError("build_table needs at least one tensor")
    device, dtype = params[0].device, params[0].dtype
    fishers, anchors, row_masks = fishers or [None] * n, anchors or [None] * n, row_masks or [None] * n
    _check_set(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None, steps, groups,
               regions, fishers, anchors, row_masks)
    numels = [p.numel() for p in params]
    blocks = [max(1, triton.cdiv(k, block)) for k in numels]  # an empty tensor: one masked program
    first = [0] * n
    for i in range(1, n):
        first[i] = first[i - 1] + blocks[i - 1]
    n_blocks = first[-1] + blocks[-1]

    addr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    rows = []
    for i in range(n):
        rows.append([params[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                     exp_avg_sqs[i].data_ptr(), addr(max_exp_avg_sqs[i]) if amsgrad else 0,
                     steps[i].data_ptr(), addr(fishers[i]), addr(anchors[i]), addr(row_masks[i])])
    aligned = all(a % 16 == 0 for row in rows for a in row[:STEP])
    row_len = [numels[i] // params[i].shape[0] if row_masks[i] is not None else 1 for i in range(n)]
    meta = [[numels[i], groups[i], regions[i], first[i], row_len[i]] for i in range(n)]
    owner = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), torch.tensor(blocks))

    # One buffer, one copy; the three tables are views of it.
    host = torch.cat([torch.tensor(rows, dtype=torch.int64).flatten(),
                      torch.tensor(meta, dtype=torch.int64).flatten(), owner])
    dev = _upload(host, device)
    return TensorTable(
        ptrs=dev[: n * N_PTRS].view(n, N_PTRS),
        meta=dev[n * N_PTRS: n * (N_PTRS + N_META)].view(n, N_META),
        block_tensor=dev[n * (N_PTRS + N_META):],
        arrivals=torch.zeros(n, dtype=torch.int32, device=device),
        n_blocks=n_blocks, dtype=dtype, amsgrad=amsgrad, aligned=aligned, block=block,
        migu=any(m is not None for m in row_masks), ewc=any(f is not None for f in fishers),
        max_group=max(groups), max_region=max(regions),
    )


def _check_set(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, groups, regions, fishers, anchors,
               row_masks) -> None:
    """The kernel walks each tensor linearly as the set's dtype: every address it gets must hold exactly
    that (same dtype, device and numel as the param, contiguous), else a read or write would stray."""
    device, dtype = params[0].device, params[0].dtype
    if dtype not in _TL_DTYPES:
        raise TypeError(f"fused_region_adamw supports {list(_TL_DTYPES)}, got {dtype}")
    lists = [grads, exp_avgs, exp_avg_sqs, steps, groups, regions, fishers, anchors, row_masks]
    if max_exp_avg_sqs is not None:
        lists.append(max_exp_avg_sqs)
    if any(len(x) != len(params) for x in lists):
        raise ValueError("build_table: every list needs one entry per param")
    for i, p in enumerate(params):
        same = [grads[i], exp_avgs[i], exp_avg_sqs[i], fishers[i], anchors[i]]
        if max_exp_avg_sqs is not None:
            same.append(max_exp_avg_sqs[i])
        for t in [p] + [t for t in same if t is not None]:
            if t.dtype != dtype or t.device != device or t.numel() != p.numel() or not t.is_contiguous():
                raise ValueError(f"build_table: tensor {i}: every tensor must be a contiguous {dtype} on {device} "
                                 f"with {p.numel()} elements, got {t.dtype} on {t.device}, {t.numel()} elements")
        if steps[i].dtype != torch.float32 or steps[i].numel() != 1 or steps[i].device != device:
            raise ValueError(f"build_table: step {i} must be one float32 on {device}")
        keep = row_masks[i]
        if keep is not None and (p.dim() == 0 or keep.dtype != torch.float32 or keep.device != device
                                 or keep.numel() != p.shape[0] or not keep.is_contiguous()):
            raise ValueError(f"build_table: row mask {i} must be a contiguous float32 vector, one value per row")
        if groups[i] < 0 or regions[i] < 0:
            raise ValueError(f"build_table: tensor {i} has a negative group or region")


def grad_sumsq(table: TensorTable, extras: StepExtras, grad_scale: torch.Tensor | None = None) -> None:
    """Add the squared norm of the set's effective grads into ``extras.norm_acc``: one launch."""
    dummy = table.arrivals
    _grad_sumsq_kernel[(table.n_blocks,)](
        table.ptrs, table.meta, table.block_tensor, grad_scale if grad_scale is not None else dummy,
        extras.ewc_lambda if table.ewc else dummy, extras.norm_acc,
        BLOCK=table.block, DTYPE=_TL_DTYPES[table.dtype], HAS_GRAD_SCALE=grad_scale is not None,
        MIGU=table.migu, EWC=table.ewc, num_warps=8 if table.block >= 2048 else 4)


def fused_region_adamw(table: TensorTable, hyper: torch.Tensor, region_scales: torch.Tensor,
                       grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
                       extras: StepExtras | None = None) -> None:
    """Launch one AdamW step over every tensor in ``table``: exactly one kernel launch."""
    if table.dtype not in _TL_DTYPES:
        raise TypeError(f"fused_region_adamw supports {list(_TL_DTYPES)}, got {table.dtype}")
    if (hyper.dtype != torch.float64 or hyper.dim() != 2 or hyper.shape[0] <= table.max_group
            or hyper.shape[1] != N_HYPER or region_scales.dtype != torch.float64
            or region_scales.numel() <= table.max_region):  # the kernel indexes both without bounds
        raise ValueError(f"fused_region_adamw: need a float64 [>{table.max_group}, {N_HYPER}] hyperparameter table "
                         f"and > {table.max_region} float64 region scales, got {hyper.dtype} {tuple(hyper.shape)} "
                         f"and {region_scales.dtype} [{region_scales.numel()}]")
    extras = extras or StepExtras()
    clip = extras.max_grad_norm is not None
    dummy = table.arrivals  # any device pointer; never read when its flag is off
    block = table.block
    _fused_region_adamw_kernel[(table.n_blocks,)](
        table.ptrs, table.meta, table.block_tensor, hyper, region_scales, table.arrivals,
        grad_scale if grad_scale is not None else dummy,
        found_inf if found_inf is not None else dummy,
        extras.ewc_lambda if table.ewc else dummy,
        extras.norm_acc if clip else dummy, extras.max_grad_norm if clip else dummy,
        extras.norm_out if clip else dummy, extras.step_arrivals if clip else dummy,
        extras.step_programs if clip else 0,
        BLOCK=block, DTYPE=_TL_DTYPES[table.dtype], AMSGRAD=table.amsgrad,
        HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
        ALIGNED=table.aligned, MIGU=table.migu, EWC=table.ewc, CLIP=clip,
        num_warps=8 if block >= 2048 else 4,
    )
