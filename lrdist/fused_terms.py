"""The fused terms of a FusedRegionAdamW step: MIGU row masks, EWC's penalty gradient, global-norm clipping.

The Triton kernel applies them as it reads each grad (``kernels/fused_region_adamw.py``); ``torch_terms``
is the same sequence in plain torch for the torch path, in the kernel's order: unscale, row mask, EWC, clip.
Neither writes ``.grad`` beyond unscaling it.

The clipping norm is the whole model's. Each launch set (or torch-path tensor) sums its squared grads on
this rank; a set sharded over a device mesh (FSDP2) is then all-reduced over the mesh dims it is sharded
on, and the sets are added up (``_global_sq``): the only place where ranks talk during a step.
"""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import torch

from lrdist.shards import sum_over_shards

try:
    from lrdist.kernels import fused_region_adamw as _kernel
except Exception:  # Triton missing or broken: the torch path still works
    _kernel = None


def step_extras(opt, device: torch.device):
    """The device buffers every launch set of a step on ``device`` shares (created once)."""
    extras = opt._extras.get(device)
    if extras is None:
        f64 = dict(dtype=torch.float64, device=device)
        # without Triton only the torch path runs: it needs the same fields, not the kernel's class
        make = _kernel.StepExtras if _kernel is not None else SimpleNamespace
        extras = opt._extras[device] = make(
            ewc_lambda=torch.full((1,), opt._ewc_lambda, **f64),
            max_grad_norm=torch.full((1,), opt.max_grad_norm or 0.0, **f64),
            norm_acc=torch.zeros(1, **f64),
            norm_out=torch.zeros(1, dtype=torch.float32, device=device),
            step_arrivals=torch.zeros(1, dtype=torch.int32, device=device))
    return extras


def _global_sq(partials: list) -> torch.Tensor:
    """Sum of the (shard key, fp64 [1] squared sum on this rank) pairs over the whole model: each sharded
    partial summed over its mesh's shard dims first. Partials of one key are added before reducing."""
    by_key: dict = {}
    for key, sq in partials:
        by_key[key] = by_key[key] + sq if key in by_key else sq
    for key, sq in by_key.items():
        sum_over_shards(sq, key)
    return sum(by_key.values())


@torch.no_grad()
def torch_terms(opt, items, grads, grad_scale, found_inf) -> list:
    """The fused terms on the torch path. Returns the grads the step uses; ``.grad`` itself is only
    unscaled (in place, unless found_inf), exactly what the Triton kernel leaves there."""
    if grad_scale is not None:
        scale = grad_scale if found_inf is None else torch.where(found_inf > 0, 1.0, grad_scale)
        torch._foreach_div_(grads, scale)
    out = list(grads)
    for k, it in enumerate(items):
        keep = opt._row_masks.get(it.param)
        if keep is not None:
            out[k] = out[k] * keep.to(out[k].dtype).view(-1, *([1] * (out[k].dim() - 1)))
    ewc = [k for k, it in enumerate(items) if it.param in opt._ewc]
    if ewc:  # grads + 2 lam F (p - anchor), as foreach ops
        pairs = [opt._ewc[items[k].param] for k in ewc]
        diffs = torch._foreach_sub([items[k].step_param() for k in ewc], [a for _, a in pairs])
        torch._foreach_mul_(diffs, [f for f, _ in pairs])
        summed = torch._foreach_add([out[k] for k in ewc], diffs, alpha=2.0 * opt._ewc_lambda)
        for k, g in zip(ewc, summed):
            out[k] = g
    if opt.max_grad_norm is not None:  # as clip_grad_norm_, with the norms in fp64 (fp16 overflows)
        extras = step_extras(opt, items[0].local.device)
        norms = torch._foreach_norm(out, 2, dtype=torch.float64)
        partials = [(it.shard, n.reshape(1).square()) for it, n in zip(items, norms)]
        norm = _global_sq(partials).sqrt().reshape(())
        out = torch._foreach_mul(out, (opt.max_grad_norm / (norm + 1e-6)).clamp(max=1.0))
        extras.norm_out.copy_(norm.reshape(1))
    return out


def triton_extras(opt, tables, grad_scale) -> dict:
    """Per device, the StepExtras the step launches get; with clipping, the global squared norm of this
    step is in its ``norm_acc`` (the step kernel reads it and its last program clears it)."""
    extras = {}
    for device in dict.fromkeys(device for device, _, _ in tables):
        ex = step_extras(opt, device)
        if opt.max_grad_norm is None:
            extras[device] = replace(ex, max_grad_norm=None)  # the kernel's clipping stays off
            continue
        mine = [(shard, table) for d, shard, table in tables if d == device]
        ex.step_programs = sum(table.n_blocks for _, table in mine)
        if all(shard is None for shard, _ in mine):  # one rank holds everything: straight into norm_acc
            for _, table in mine:
                _kernel.grad_sumsq(table, ex, grad_scale)
        else:
            partials = []
            for shard, table in mine:
                acc = torch.zeros(1, dtype=torch.float64, device=device)
                _kernel.grad_sumsq(table, replace(ex, norm_acc=acc), grad_scale)
                partials.append((shard, acc))
            ex.norm_acc.copy_(_global_sq(partials))
        extras[device] = ex
    return extras
