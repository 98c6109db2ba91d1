"""One AdamW step over every tensor of a (device, dtype) set in a single Triton launch.

The kernel knows pointers and tables, nothing about ``torch.optim``:

* ``TensorTable`` packs, per tensor, the addresses of param / grad / exp_avg / exp_avg_sq /
  max_exp_avg_sq / step, its numel, group and region, and a block->tensor map. It is built on the host
  once and sent with one pinned, non-blocking copy; it is rebuilt only when an address changes.
* Per-group hyperparameters (lr, beta1, beta2, eps, weight_decay, sign) and per-region LR scales are
  float64 device tables, read by every program. Changing the LR schedule or the distribution rewrites
  a table: no recompile, no host sync, and a captured CUDA graph sees the new values. An ``LRTable``
  (optional) lets a group's LR be read through the address of its own LR tensor instead, so a scheduler's
  ``lr.fill_`` needs no copy into the table.
* Each tensor's step count is a device float32 (torch's fused layout). Every program computes with
  ``step + 1``; the last program of a tensor to finish (an arrival counter) writes ``step + 1`` back,
  so all programs read the old value and the step update costs no second launch.
* ``grad_scale`` / ``found_inf`` are fused as in torch's fused AdamW: with ``found_inf`` set nothing
  changes, the step count included; with ``grad_scale`` the unscaled grad is written back.
* Optional, per tensor: a MIGU row mask (one value per output row), an EWC pair (Fisher F, anchor
  theta*) adding 2 lambda F (theta - theta*) to the grad as it is read, and global-norm clipping: a first
  launch (``grad_sumsq``) reduces the squared norm of those effective grads into one accumulator, the step
  scales each grad by min(1, max_norm / (norm + 1e-6)), and its last program clears the accumulator.
* Every upload and launch runs with the tables' device current, so it goes to that device and its
  current stream (Triton launches on the current device's current stream).

Rounding. The update rounds like torch's CUDA fused AdamW (``adam_math`` in ATen's fused_adam_utils.cuh),
operation by operation. There the element values are held in the compute type (fp32 for fp32, bf16 and
fp16 params; fp64 for fp64) while lr, betas, eps and weight decay are doubles, so every line mixing the two
is evaluated in double and rounded once to the compute type. This kernel does the same:

* in double, rounded once: the weight decay p - (lr*wd)*p (skipped when wd == 0, as torch does),
  exp_avg = beta1*m + (1-beta1)*g, exp_avg_sq = beta2*v + ((1-beta2)*g)*g, and denom = s + eps; per
  tensor, the bias corrections 1 - beta^step and sqrt(1 - beta2^step), and step_size = lr / bc1;
* in the compute type, correctly rounded (IEEE round to nearest): grad / grad_scale (``div.rn``; torch
  divides in double and rounds, which gives the same float since double has more than 2*24+2 bits),
  sqrt(v) (``sqrt.rn``), s = sqrt(v) / bc2_sqrt (``div.rn``), (step_size*m) / denom (``div.rn``), the
  final subtraction, and the clip, sign, MIGU and EWC products;
* no flush to zero: subnormal moments stay subnormal, as in torch;
* FMA contraction pinned off (``LAUNCH_OPTIONS``, also used by aot.py): every operation rounds as written,
  so the Triton interpreter (numpy, one rounding per operation) computes the bits the GPU computes, and
  tests/test_kernel.py compares them bit for bit with torch's formula written out in torch ops.

Expected distance from torch's CUDA fused AdamW on the same inputs: 0 ulp in params, grads, exp_avg,
exp_avg_sq and max_exp_avg_sq, for fp32 and (both rounding to nearest even on store) bf16 and fp16. The
exceptions are elements where a double intermediate lies within about 2^-29 ulp of a rounding midpoint of
the compute type: nvcc may fuse torch's double multiply-adds into FMAs, which we round twice, and torch
takes beta^step with pow where we use exp(step*log(beta)). Those elements are 1 ulp apart; expect about one
in 10^8 per step. fp64 params compute everything in fp64, as torch does; there the bias corrections differ
from pow's in the last bits, which moves a param only if its update lands within about 10^-3 ulp of a
midpoint. benchmarks/gpu_check.sh measures the distance (benchmarks/gpu_exactness.py). Known
differences by design: the clipping norm is accumulated in fp64 (as lrdist's torch path does), so it
overflows only where fp64 does; torch's ``clip_grad_norm_`` sums fp32 grads in fp32.

NaN and inf: one policy, the reference being torch's fused AdamW after ``clip_grad_norm_``.

* Without clipping a NaN or inf grad touches only its own element (an inf gives m = v = inf and a NaN
  param). With clipping the global norm is NaN or inf: the clip coefficient is NaN (``tl.minimum`` with
  NaN propagation, as ``torch.clamp``), so every param of the step becomes NaN; or 0, so every grad is
  multiplied by 0 (the inf one giving NaN).
* AMSGrad: max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq) propagates a NaN, as ``torch.maximum``
  and torch's single-tensor and foreach AdamW do. torch's fused op uses ``std::max``, which drops a NaN
  exp_avg_sq: always on CUDA, and on CPU only in the scalar tail of a tensor (its vector body propagates).
  We follow ``torch.maximum``: one rule on every device and at every position, and a NaN in exp_avg_sq is
  never hidden behind a finite max_exp_avg_sq. The param is NaN either way.
* ``found_inf`` stays the way to skip a step (GradScaler): with it set nothing changes.
"""
from __future__ import annotations

import contextlib
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
# Columns of the LR table: a group's LR tensor address, and what the kernel reads there.
LR_ADDR, LR_KIND = range(2)
LR_FROM_HYPER, LR_FLOAT32, LR_FLOAT64 = range(3)
_LR_KINDS = {torch.float32: LR_FLOAT32, torch.float64: LR_FLOAT64}

DEFAULT_BLOCK = 2048
# Compile options of every launch (and of aot.py), pinned rather than left to Triton's defaults: no FMA
# contraction, so each operation rounds as written (Triton 3.10 flips the default); no flush to zero in
# libdevice (only the bias corrections' fp64 exp/log call it), so no float32 instruction of the kernel flushes.
LAUNCH_OPTIONS = dict(enable_fp_fusion=False, enable_reflect_ftz=False)
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16,
              torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}


def num_warps(block: int, dtype: torch.dtype, aligned: bool = True) -> int:
    """Warps per program. A thread owns 8 elements of an aligned fp32, bf16 or fp16 set (two 16-byte vectors
    in fp32), half as many in fp64 and half again when the set is unaligned (scalar loads): more would take
    over 128 registers (kernels/aot.py counts them)."""
    per_thread = 8 // (2 if dtype == torch.float64 else 1) // (1 if aligned else 2)
    return max(4, min(32, block // (32 * per_thread)))


@triton.jit
def _div_rn(x, y, CT: tl.constexpr):
    """x / y rounded to nearest (Triton's plain float32 ``/`` is the approximate ``div.full.f32``)."""
    if CT == tl.float32:
        q = tl.div_rn(x, y)
    else:
        q = x / y  # fp64 division is div.rn.f64
    return q


@triton.jit
def _sqrt_rn(x, CT: tl.constexpr):
    """sqrt(x) rounded to nearest (Triton's plain float32 ``tl.sqrt`` is ``sqrt.approx.ftz.f32``)."""
    if CT == tl.float32:
        r = tl.sqrt_rn(x)
    else:
        r = tl.sqrt(x)  # sqrt.rn.f64
    return r


@triton.jit
def _tensor_extras(ptrs, meta, t, ewc_lambda):
    """Tensor t's optional terms: row length, row-mask, Fisher and anchor addresses (0: none), lambda."""
    return (tl.load(meta + t * 5 + 4), tl.load(ptrs + t * 9 + 8), tl.load(ptrs + t * 9 + 6),
            tl.load(ptrs + t * 9 + 7), ewc_lambda)


@triton.jit
def _effective_grad(g, p, offs, mask, row_len, mask_addr, fisher_addr, anchor_addr, ewc_lambda,
                    DTYPE: tl.constexpr, CT: tl.constexpr, MIGU: tl.constexpr, EWC: tl.constexpr,
                    ALIGNED: tl.constexpr):
    """The gradient the step uses: the loss gradient with MIGU's row mask, plus EWC's penalty gradient."""
    if MIGU:
        if mask_addr != 0:
            keep = tl.load(mask_addr.to(tl.pointer_type(tl.float32)) + offs // row_len, mask=mask)
            g = g * keep.to(CT)
    if EWC:
        if fisher_addr != 0:
            fisher_ptr = fisher_addr.to(tl.pointer_type(DTYPE))
            anchor_ptr = anchor_addr.to(tl.pointer_type(DTYPE))
            if ALIGNED:
                fisher_ptr = tl.multiple_of(fisher_ptr, 16)
                anchor_ptr = tl.multiple_of(anchor_ptr, 16)
            fisher = tl.load(fisher_ptr + offs, mask=mask).to(CT)
            anchor = tl.load(anchor_ptr + offs, mask=mask).to(CT)
            g = g + (2.0 * ewc_lambda).to(CT) * fisher * (p - anchor)
    return g


@triton.jit
def _block_offsets(pid, meta, t, numel, BLOCK: tl.constexpr):
    """Element offsets of program pid's block within tensor t, and whether that block is full."""
    local = pid - tl.load(meta + t * 5 + 3)
    offs = local.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
    return offs, (local + 1) * BLOCK <= numel


@triton.jit
def _adamw_update(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, numel, grad_scale_ptr, extras,
                  lr, weight_decay, beta1, beta2, eps, step_size, bc2_sqrt, sign, clip,
                  DTYPE: tl.constexpr, CT: tl.constexpr, AMSGRAD: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                  MIGU: tl.constexpr, EWC: tl.constexpr, CLIP: tl.constexpr, ALIGNED: tl.constexpr,
                  MASKED: tl.constexpr):
    """AdamW on one block of one tensor, rounded as torch's CUDA adam_math (module docstring).
    Full blocks run unmasked so loads can be vectorised."""
    if MASKED:
        mask = offs < numel
    else:
        mask = None
    g = tl.load(g_ptr + offs, mask=mask).to(CT)
    if HAS_GRAD_SCALE:
        g = _div_rn(g, tl.load(grad_scale_ptr).to(CT), CT)
        tl.store(g_ptr + offs, g.to(DTYPE), mask=mask)  # as torch's fused AdamW: grads left unscaled
    p = tl.load(p_ptr + offs, mask=mask).to(CT)
    row_len, mask_addr, fisher_addr, anchor_addr, ewc_lambda = extras
    g = _effective_grad(g, p, offs, mask, row_len, mask_addr, fisher_addr, anchor_addr, ewc_lambda,
                        DTYPE, CT, MIGU, EWC, ALIGNED)
    if CLIP:
        g = g * clip
    g = g * sign
    m = tl.load(m_ptr + offs, mask=mask).to(CT)
    v = tl.load(v_ptr + offs, mask=mask).to(CT)

    # torch's lines with double hyperparameters: evaluated in double, rounded once to CT.
    if weight_decay != 0:
        p64 = p.to(tl.float64)
        p = (p64 - lr * weight_decay * p64).to(CT)
    g64 = g.to(tl.float64)
    m = (beta1 * m.to(tl.float64) + (1.0 - beta1) * g64).to(CT)
    v = (beta2 * v.to(tl.float64) + (1.0 - beta2) * g64 * g64).to(CT)
    if AMSGRAD:
        # As torch's fused kernel: the max with v before it is rounded to the state dtype (in half
        # precision a tiny v would otherwise round to 0 and leave eps alone in the denominator). A NaN
        # propagates, as torch.maximum (module docstring).
        vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=mask).to(CT), v, propagate_nan=tl.PropagateNan.ALL)
        tl.store(vmax_ptr + offs, vmax.to(DTYPE), mask=mask)
        root = _sqrt_rn(vmax, CT)
    else:
        root = _sqrt_rn(v, CT)
    denom = (_div_rn(root, bc2_sqrt, CT).to(tl.float64) + eps).to(CT)
    p = p - _div_rn(step_size * m, denom, CT)

    tl.store(p_ptr + offs, p.to(DTYPE), mask=mask)
    tl.store(m_ptr + offs, m.to(DTYPE), mask=mask)
    tl.store(v_ptr + offs, v.to(DTYPE), mask=mask)


@triton.jit
def _grad_sq(g_ptr, p_ptr, offs, numel, grad_scale_ptr, extras, DTYPE: tl.constexpr, CT: tl.constexpr,
             HAS_GRAD_SCALE: tl.constexpr, MIGU: tl.constexpr, EWC: tl.constexpr, ALIGNED: tl.constexpr,
             MASKED: tl.constexpr):
    """Sum of squares of one block's effective grads, in fp64 (as the torch path's norms)."""
    if MASKED:
        mask = offs < numel
    else:
        mask = None
    g = tl.load(g_ptr + offs, mask=mask).to(CT)
    if HAS_GRAD_SCALE:
        g = _div_rn(g, tl.load(grad_scale_ptr).to(CT), CT)
    row_len, mask_addr, fisher_addr, anchor_addr, ewc_lambda = extras
    p = g  # read only by EWC, which loads the param itself
    if EWC:
        p = tl.load(p_ptr + offs, mask=mask).to(CT)
    g = _effective_grad(g, p, offs, mask, row_len, mask_addr, fisher_addr, anchor_addr, ewc_lambda,
                        DTYPE, CT, MIGU, EWC, ALIGNED)
    g64 = g.to(tl.float64)
    if MASKED:
        g64 = tl.where(mask, g64, 0.0)
    return tl.sum(g64 * g64)


@triton.jit
def _grad_sumsq_kernel(ptrs, meta, block_tensor, grad_scale_ptr, ewc_lambda_ptr, norm_acc,
                       BLOCK: tl.constexpr, DTYPE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                       MIGU: tl.constexpr, EWC: tl.constexpr, ALIGNED: tl.constexpr):
    """Adds the squared L2 norm of every effective grad of the set into norm_acc (one launch)."""
    CT: tl.constexpr = tl.float64 if DTYPE == tl.float64 else tl.float32
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    numel = tl.load(meta + t * 5 + 0)
    g_ptr = tl.load(ptrs + t * 9 + 1).to(tl.pointer_type(DTYPE))
    p_ptr = tl.load(ptrs + t * 9 + 0).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        g_ptr = tl.multiple_of(g_ptr, 16)
        p_ptr = tl.multiple_of(p_ptr, 16)
    ewc_lambda = 0.0
    if EWC:
        ewc_lambda = tl.load(ewc_lambda_ptr)
    extras = _tensor_extras(ptrs, meta, t, ewc_lambda)
    offs, full = _block_offsets(pid, meta, t, numel, BLOCK)
    if full:
        sq = _grad_sq(g_ptr, p_ptr, offs, numel, grad_scale_ptr, extras, DTYPE, CT, HAS_GRAD_SCALE, MIGU, EWC,
                      ALIGNED, MASKED=False)
    else:
        sq = _grad_sq(g_ptr, p_ptr, offs, numel, grad_scale_ptr, extras, DTYPE, CT, HAS_GRAD_SCALE, MIGU, EWC,
                      ALIGNED, MASKED=True)
    tl.atomic_add(norm_acc, sq, sem="relaxed")


@triton.jit
def _group_lr(hyper, lr_table, group, TENSOR_LR: tl.constexpr):
    """Group's LR: its LR tensor's current value where the LR table names one, else the hyperparameter table's."""
    lr = tl.load(hyper + group * 6 + 0)
    if TENSOR_LR:
        kind = tl.load(lr_table + group * 2 + 1)
        addr = tl.load(lr_table + group * 2 + 0)
        if kind == 1:  # LR_FLOAT32
            lr = tl.load(addr.to(tl.pointer_type(tl.float32))).to(tl.float64)
        elif kind == 2:  # LR_FLOAT64
            lr = tl.load(addr.to(tl.pointer_type(tl.float64)))
    return lr


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
    lr_table,        # int64 [G, 2]: LR tensor address and kind per group (TENSOR_LR)
    BLOCK: tl.constexpr,
    DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr,
    MIGU: tl.constexpr,
    EWC: tl.constexpr,
    CLIP: tl.constexpr,
    TENSOR_LR: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    live = True
    if HAS_FOUND_INF:  # an inf/NaN in the scaled grads: change nothing, the step count included
        live = tl.load(found_inf_ptr) == 0
    clip = tl.full((), 1.0, tl.float64)
    if CLIP:  # as torch's clip_grad_norm_: a NaN norm gives a NaN coefficient (torch.clamp keeps NaN)
        norm = tl.sqrt(tl.load(norm_acc))
        clip = tl.minimum(tl.load(clip_ptr) / (norm + 1e-6), 1.0, propagate_nan=tl.PropagateNan.ALL)
        if pid == 0:
            tl.store(norm_out, norm.to(tl.float32))
    if live:
        numel = tl.load(meta + t * 5 + 0)
        group = tl.load(meta + t * 5 + 1)
        region = tl.load(meta + t * 5 + 2)

        # Element values in CT (fp32; fp64 for fp64 params), hyperparameters in fp64: torch's opmath.
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

        lr = _group_lr(hyper, lr_table, group, TENSOR_LR) * tl.load(region_scales + region)
        beta1 = tl.load(hyper + group * 6 + 1)
        beta2 = tl.load(hyper + group * 6 + 2)
        eps = tl.load(hyper + group * 6 + 3)
        weight_decay = tl.load(hyper + group * 6 + 4)
        sign = tl.load(hyper + group * 6 + 5)
        # As torch: bias corrections in double, handed to the element math in CT; step_size = lr / bc1.
        step = tl.load(step_ptr).to(tl.float64) + 1.0
        bias_correction1 = (1.0 - tl.exp(step * tl.log(beta1))).to(CT)
        bc2_sqrt = tl.sqrt(1.0 - tl.exp(step * tl.log(beta2))).to(CT)
        step_size = (lr / bias_correction1.to(tl.float64)).to(CT)

        offs, full = _block_offsets(pid, meta, t, numel, BLOCK)
        args = (p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, numel, grad_scale_ptr, extras, lr, weight_decay,
                beta1, beta2, eps, step_size, bc2_sqrt, sign.to(CT), clip.to(CT))
        if full:
            _adamw_update(*args, DTYPE, CT, AMSGRAD, HAS_GRAD_SCALE, MIGU, EWC, CLIP, ALIGNED, MASKED=False)
        else:
            _adamw_update(*args, DTYPE, CT, AMSGRAD, HAS_GRAD_SCALE, MIGU, EWC, CLIP, ALIGNED, MASKED=True)

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
        tl.debug_barrier()  # every warp has read norm_acc (also when found_inf skipped the update)
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

    @property
    def device(self) -> torch.device:
        return self.arrivals.device


@dataclass
class LRTable:
    """Where the kernel reads each group's LR: through the address of the group's LR tensor (read at every
    launch, so ``lr.fill_`` by a scheduler, captured CUDA graphs included, needs no copy), or, for a row of
    kind LR_FROM_HYPER, from the hyperparameter table's LR column."""

    table: torch.Tensor  # int64 [G, 2]: LR_ADDR, LR_KIND
    tensors: tuple       # the LR tensors (None where none): kept alive while the table holds their addresses

    @property
    def device(self) -> torch.device:
        return self.table.device


@dataclass
class StepExtras:
    """What every launch set of one step on one device shares, for the optional fused terms."""

    ewc_lambda: torch.Tensor | None = None     # float64 [1]
    max_grad_norm: torch.Tensor | None = None  # float64 [1]: clipping on when set
    norm_acc: torch.Tensor | None = None       # float64 [1], zero between steps
    norm_out: torch.Tensor | None = None       # float32 [1]: the last step's grad norm
    step_arrivals: torch.Tensor | None = None  # int32 [1], zero between steps
    step_programs: int = 0                     # programs over every step launch of this step


def on_device(device: torch.device):
    """Make ``device`` current for an upload or a launch, so both go to it and to its current stream."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device with one pinned, non-blocking copy (a plain copy on CPU)."""
    if device.type == "cuda":
        with on_device(device):
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
    # Vector loads need every element tensor 16-byte aligned (the row mask is gathered, the step is a scalar).
    aligned = all(row[c] % 16 == 0 for row in rows for c in (PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ,
                                                              FISHER, ANCHOR))
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


def build_lr_table(lrs, device: torch.device) -> LRTable:
    """The LR table for one device: ``lrs`` holds one entry per param group, its LR tensor or None (the
    hyperparameter table's LR column). An LR tensor must be one float32 or float64 value on ``device``: the
    kernel reads it there, as that dtype, at every launch."""
    device = torch.device(device)
    rows = []
    for gi, lr in enumerate(lrs):
        if lr is None:
            rows.append([0, LR_FROM_HYPER])
            continue
        if not isinstance(lr, torch.Tensor):
            raise TypeError(f"build_lr_table: group {gi}'s lr must be a Tensor or None, got {type(lr).__name__}")
        if lr.dtype not in _LR_KINDS or lr.numel() != 1 or lr.device != device or lr.is_sparse:
            raise ValueError(f"build_lr_table: group {gi}'s lr must be one float32 or float64 value on {device}, "
                             f"got a {lr.dtype} tensor of {lr.numel()} elements on {lr.device}")
        rows.append([lr.data_ptr(), _LR_KINDS[lr.dtype]])
    if not rows:
        raise ValueError("build_lr_table needs one entry per param group, got none")
    return LRTable(table=_upload(torch.tensor(rows, dtype=torch.int64), device), tensors=tuple(lrs))


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
                                 f"with {p.numel()} elements, got {'a' if t.is_contiguous() else 'a non-contiguous'} "
                                 f"{t.dtype} on {t.device} with {t.numel()} elements")
        if steps[i].dtype != torch.float32 or steps[i].numel() != 1 or steps[i].device != device:
            raise ValueError(f"build_table: step {i} must be one float32 on {device}")
        keep = row_masks[i]
        if keep is not None and (p.dim() == 0 or keep.dtype != torch.float32 or keep.device != device
                                 or keep.numel() != p.shape[0] or not keep.is_contiguous()):
            raise ValueError(f"build_table: row mask {i} must be a contiguous float32 vector, one value per row")
        if groups[i] < 0 or regions[i] < 0:
            raise ValueError(f"build_table: tensor {i} has a negative group or region")


def _check_scalars(device: torch.device, **scalars) -> None:
    """Each one-value tensor a launch reads (None: not read) must be a float with a value, on the set's device."""
    for name, t in scalars.items():
        if t is not None and (not t.is_floating_point() or t.numel() < 1 or t.device != device):
            raise ValueError(f"fused_region_adamw: {name} must be a float tensor with a value on {device}, "
                             f"got {t.dtype} [{t.numel()}] on {t.device}")


def grad_sumsq(table: TensorTable, extras: StepExtras, grad_scale: torch.Tensor | None = None) -> None:
    """Add the squared norm of the set's effective grads into ``extras.norm_acc``: one launch."""
    _check_scalars(table.device, grad_scale=grad_scale, norm_acc=extras.norm_acc,
                   ewc_lambda=extras.ewc_lambda if table.ewc else None)
    dummy = table.arrivals
    with on_device(table.device):
        _grad_sumsq_kernel[(table.n_blocks,)](
            table.ptrs, table.meta, table.block_tensor, grad_scale if grad_scale is not None else dummy,
            extras.ewc_lambda if table.ewc else dummy, extras.norm_acc,
            BLOCK=table.block, DTYPE=_TL_DTYPES[table.dtype], HAS_GRAD_SCALE=grad_scale is not None,
            MIGU=table.migu, EWC=table.ewc, ALIGNED=table.aligned, num_warps=num_warps(table.block, table.dtype, table.aligned),
            **LAUNCH_OPTIONS)


def fused_region_adamw(table: TensorTable, hyper: torch.Tensor, region_scales: torch.Tensor,
                       grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
                       extras: StepExtras | None = None, lr_table: LRTable | None = None) -> None:
    """Launch one AdamW step over every tensor in ``table``: exactly one kernel launch. With ``lr_table``,
    groups that name an LR tensor there take their LR from it (the hyperparameter table's LR column is
    then not read for them)."""
    if table.dtype not in _TL_DTYPES:
        raise TypeError(f"fused_region_adamw supports {list(_TL_DTYPES)}, got {table.dtype}")
    device = table.device
    if (hyper.dtype != torch.float64 or hyper.dim() != 2 or hyper.shape[0] <= table.max_group
            or hyper.shape[1] != N_HYPER or region_scales.dtype != torch.float64
            or region_scales.numel() <= table.max_region
            or hyper.device != device or region_scales.device != device):  # read without bounds checks
        raise ValueError(f"fused_region_adamw: need a float64 [>{table.max_group}, {N_HYPER}] hyperparameter table "
                         f"and > {table.max_region} float64 region scales on {device}, got {hyper.dtype} "
                         f"{tuple(hyper.shape)} on {hyper.device} and {region_scales.dtype} "
                         f"[{region_scales.numel()}] on {region_scales.device}")
    if lr_table is not None and (lr_table.table.dtype != torch.int64 or lr_table.table.dim() != 2
                                 or lr_table.table.shape[0] <= table.max_group or lr_table.table.shape[1] != 2
                                 or lr_table.device != device):
        raise ValueError(f"fused_region_adamw: the LR table must be int64 [>{table.max_group}, 2] on {device}, "
                         f"got {lr_table.table.dtype} {tuple(lr_table.table.shape)} on {lr_table.device}")
    extras = extras or StepExtras()
    clip = extras.max_grad_norm is not None
    _check_scalars(device, grad_scale=grad_scale, found_inf=found_inf,
                   ewc_lambda=extras.ewc_lambda if table.ewc else None,
                   **(dict(max_grad_norm=extras.max_grad_norm, norm_acc=extras.norm_acc, norm_out=extras.norm_out)
                      if clip else {}))
    if clip and (extras.step_arrivals is None or extras.step_arrivals.dtype != torch.int32
                 or extras.step_arrivals.numel() < 1 or extras.step_arrivals.device != device):
        raise ValueError(f"fused_region_adamw: clipping needs an int32 step_arrivals counter on {device}")
    dummy = table.arrivals  # any device pointer; never read when its flag is off
    block = table.block
    with on_device(device):
        _fused_region_adamw_kernel[(table.n_blocks,)](
            table.ptrs, table.meta, table.block_tensor, hyper, region_scales, table.arrivals,
            grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy,
            extras.ewc_lambda if table.ewc else dummy,
            extras.norm_acc if clip else dummy, extras.max_grad_norm if clip else dummy,
            extras.norm_out if clip else dummy, extras.step_arrivals if clip else dummy,
            extras.step_programs if clip else 0,
            lr_table.table if lr_table is not None else dummy,
            BLOCK=block, DTYPE=_TL_DTYPES[table.dtype], AMSGRAD=table.amsgrad,
            HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
            ALIGNED=table.aligned, MIGU=table.migu, EWC=table.ewc, CLIP=clip, TENSOR_LR=lr_table is not None,
            num_warps=num_warps(block, table.dtype, table.aligned), **LAUNCH_OPTIONS,
        )
