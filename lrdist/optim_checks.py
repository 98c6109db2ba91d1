"""Input checks for FusedRegionAdamW: each raises a one-line error naming the problem and the fix.

They only read their inputs, so a caller validates everything first and changes its state after (a bad
input never leaves an optimizer half-updated). Device tensors cost one host read per call, never one
per tensor.
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from lrdist import shards

# What both backends step: torch's fused AdamW and the Triton kernel support exactly these.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def refuse_during_capture(what: str) -> None:
    if capturing():
        raise RuntimeError(f"{what} changes which buffers the step reads and cannot run during CUDA graph "
                           f"capture: call it before capturing, then capture again")


def _is_real(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def check_number(name: str, value, low: float = 0.0, read: bool = False) -> None:
    """A finite real number >= low. A one-element float Tensor counts; its value is read and checked only
    with ``read`` (a Tensor lr is read on the device by the step, and checking it would cost a host sync;
    eps and weight decay are read on the host at every step, as torch takes them as floats: on a GPU keep
    them floats, or each step syncs)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name} as a Tensor must be one floating-point value, got shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")
        if not read:
            return
        value = float(value)
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value >= low):
        raise ValueError(f"invalid {name}: {value} (must be finite and >= {low})")


def check_lr_device(group: dict) -> None:
    """A Tensor lr must live where its group's parameters are: the kernel reads it there, at every step."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        where = {p.device for p in group["params"] if isinstance(p, torch.Tensor)}
        if where and where != {lr.device}:
            raise ValueError(f"a Tensor lr on {lr.device} for parameters on {', '.join(map(str, sorted(where, key=str)))}: "
                             f"put the lr tensor on its parameters' device")


def check_region(region, num_regions: int | None) -> None:
    if isinstance(region, bool) or not isinstance(region, Integral) or region < 0:
        raise ValueError(f"param group 'region' must be a non-negative int, got {region!r}")
    if num_regions is not None and region >= num_regions:
        raise ValueError(f"region {region} is out of range: the optimizer has {num_regions} region scales "
                         f"(regions 0..{num_regions - 1}); use a smaller region or more region_scales")


def check_param(p) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"FusedRegionAdamW optimizes Tensors, got {type(p).__name__}")
    if p.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"FusedRegionAdamW supports parameters of dtype float32, float16, bfloat16 and "
                        f"float64, got {p.dtype}")


def overlaps(t: torch.Tensor) -> bool:
    """Whether some elements of ``t`` share memory (e.g. from expand()): an update or an unscaled grad could
    not be written back into it."""
    local = shards.local(t)
    return not local.is_contiguous() and torch._debug_has_internal_overlap(local) == 1  # MemOverlap::Yes


def check_group(group: dict, num_regions: int | None) -> None:
    """A param group with its defaults filled in: hyperparameters, region and parameters."""
    lr = group["lr"]
    # A Tensor lr on the CPU costs nothing to read; on a GPU it is left to the device (no host sync).
    check_number("learning rate", lr, read=isinstance(lr, torch.Tensor) and lr.device.type == "cpu")
    if isinstance(lr, torch.Tensor) and lr.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"a Tensor learning rate must be float32 or float64 (the kernel reads it as such), got {lr.dtype}")
    check_number("epsilon", group["eps"], read=True)
    check_number("weight_decay", group["weight_decay"], read=True)
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_real(b) for b in betas)):
        raise TypeError(f"betas must be two real numbers (beta1, beta2), got {betas!r}")
    if not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"invalid betas {tuple(betas)}: each must lie in [0, 1)")
    for flag in ("amsgrad", "maximize"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"{flag} must be True or False, got {group[flag]!r}")
    check_region(group["region"], num_regions)
    if len(set(map(id, group["params"]))) != len(group["params"]):
        raise ValueError("a parameter appears twice in a param group: each must be listed once")
    for p in group["params"]:
        check_param(p)
        if overlaps(p):
            raise ValueError(f"a parameter of shape {tuple(p.shape)} has elements sharing memory (e.g. from "
                             f"expand()): an update could not be written back; give it memory of its own")
        bad = shards.unsupported_placement(p)
        if bad:
            raise ValueError(f"FusedRegionAdamW cannot step {bad}")
    meshes = {shards.mesh_of(p) for p in group["params"]}
    if len(meshes) > 1:  # a group steps as one unit (torch's fused op, one norm): one layout per group
        what = "DTensor and plain tensor parameters" if None in meshes else "DTensors on different device meshes"
        raise ValueError(f"a param group mixes {what}: put each mesh's parameters (and plain tensors) in "
                         f"groups of their own")
    check_lr_device(group)


def check_block_size(block_size) -> None:
    if block_size is None:
        return
    if isinstance(block_size, bool) or not isinstance(block_size, Integral):
        raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if not (16 <= block_size <= 65536 and block_size & (block_size - 1) == 0):
        raise ValueError(f"block_size must be a power of two from 16 to 65536 (Triton blocks), got {block_size}")


def check_max_grad_norm(value) -> None:
    if value is None:
        return
    if not _is_real(value):
        raise TypeError(f"max_grad_norm must be a positive number or None, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"max_grad_norm must be positive and finite, got {value}")


def check_scales(values, num_regions: int | None) -> torch.Tensor:
    """Validate a region scale table on the host; return it as a 1-D float64 CPU tensor."""
    if isinstance(values, torch.Tensor):
        t = values.detach()
    else:
        try:  # lists parse straight to float64: via float32, 0.3 would become 0.30000001
            t = torch.as_tensor(values, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"region scales must be a 1-D sequence of real numbers, got {values!r}") from None
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"region scales must be real numbers, got dtype {t.dtype}")
    t = t.to("cpu", torch.float64)
    if t.dim() != 1:
        raise ValueError(f"region scales must be a 1-D sequence, got shape {tuple(t.shape)}")
    if num_regions is not None and t.numel() != num_regions:
        raise ValueError(f"expected {num_regions} region scales (one per region), got {t.numel()}")
    if t.numel() == 0:
        raise ValueError("region scales must not be empty")
    bad = (~torch.isfinite(t)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"region scales must be finite; NaN or inf at region(s) {bad}")
    bad = (t < 0).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"region scales must be >= 0; negative at region(s) {bad}")
    return t


def _all_finite(tensors: list) -> bool:
    """One host read per device for all of them; DTensors' shards are checked on their ranks, and every
    rank of their meshes gets the same answer."""
    flags: dict = {}
    for t in tensors:
        flags.setdefault(t.device, []).append(torch.isfinite(shards.local(t)).all())
    finite = all(bool(torch.stack(f).all()) for f in flags.values())
    return not shards.any_on_a_rank(not finite, tensors)


def check_ewc(fisher, anchor, lam, known: set) -> None:
    if not isinstance(fisher, dict) or not isinstance(anchor, dict):
        raise TypeError(f"set_ewc takes dicts mapping parameters to tensors, got fisher as "
                        f"{type(fisher).__name__} and anchor as {type(anchor).__name__}")
    if not _is_real(lam) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"EWC lambda must be a finite number >= 0, got {lam!r}")
    tensors = []
    for p, f in fisher.items():
        if p not in known:
            raise ValueError("set_ewc: every Fisher key must be a parameter of this optimizer")
        if p not in anchor:
            raise ValueError(f"set_ewc: the parameter of shape {tuple(p.shape)} has a Fisher but no anchor")
        a = anchor[p]
        if not isinstance(f, torch.Tensor) or not isinstance(a, torch.Tensor):
            raise TypeError(f"set_ewc: Fisher and anchor values must be Tensors, got {type(f).__name__} and "
                            f"{type(a).__name__}")
        if f.shape != p.shape or a.shape != p.shape:
            raise ValueError(f"set_ewc: Fisher/anchor shapes must equal the parameter's {tuple(p.shape)}, got "
                             f"{tuple(f.shape)} and {tuple(a.shape)}")
        placed = shards.layout(p)
        for name, t in (("Fisher", f), ("anchor", a)):
            if shards.layout(t) != placed:  # each rank keeps the shard it steps: placed like the param
                raise ValueError(f"set_ewc: the {name} of a parameter that is {shards.describe(placed)} is "
                                 f"{shards.describe(shards.layout(t))}: give it the parameter's placement")
        if f.is_complex() or a.is_complex() or not (f.is_floating_point() and a.is_floating_point()):
            raise TypeError(f"set_ewc: Fisher and anchor must be real floating-point, got {f.dtype} and {a.dtype}")
        tensors += [f, a]
    if not _all_finite(tensors):
        raise ValueError("set_ewc: a Fisher or anchor tensor holds NaN or inf")


def check_row_masks(masks, known: set) -> dict:
    """Validate every mask; return {param: mask as a 1-D float32 tensor on the param's device}."""
    if not isinstance(masks, dict):
        raise TypeError(f"set_row_masks takes a dict mapping weights to row masks, got {type(masks).__name__}")
    out, floats = {}, []
    for p, keep in masks.items():
        if p not in known:
            raise ValueError("set_row_masks: every key must be a parameter of this optimizer")
        if shards.is_dtensor(keep):
            raise TypeError("set_row_masks: give a row mask as a plain tensor over all the weight's rows "
                            "(each rank keeps the rows of its shard), not a DTensor")
        if p.dim() == 0:
            raise ValueError("set_row_masks: a 0-d parameter has no rows to mask")
        try:
            keep = torch.as_tensor(keep)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"a row mask must be a tensor or a sequence of numbers, got {type(keep).__name__}") from None
        if keep.is_complex():
            raise TypeError(f"a row mask must hold real numbers, got {keep.dtype}")
        if keep.numel() != p.shape[0]:
            raise ValueError(f"a row mask needs {p.shape[0]} values (the rows of a {tuple(p.shape)} weight), "
                             f"got {keep.numel()}")
        if keep.is_floating_point():
            floats.append(keep)  # bool masks (MIGU's) need no read-back
        out[p] = keep.reshape(-1).to(p.device, torch.float32)
    if not _all_finite(floats):
        raise ValueError("set_row_masks: a row mask holds NaN or inf")
    return out


def loaded_scales(state_dict):
    """The region table a state dict carries: its ``region_scales``, else its param groups' copies (what
    ``torch.distributed.checkpoint``'s helpers keep), else None (e.g. torch.optim.AdamW's)."""
    if not isinstance(state_dict, dict):
        return None
    if state_dict.get("region_scales") is not None:
        return state_dict["region_scales"]
    tables = [tuple(g["region_scales"]) for g in state_dict.get("param_groups", ())
              if isinstance(g, dict) and g.get("region_scales") is not None]
    if len(set(tables)) > 1:
        raise ValueError("the state dict's param groups carry different region_scales: it was edited by hand")
    return tables[0] if tables else None


def check_loaded_state(state_dict, groups: list, num_regions_after: int) -> None:
    """A state dict for load_state_dict: its groups, their regions and each saved state's tensors."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise TypeError("load_state_dict needs an optimizer state dict (a dict with 'state' and 'param_groups')")
    saved = state_dict["param_groups"]
    if len(saved) != len(groups):
        raise ValueError(f"the state dict has {len(saved)} parameter groups, this optimizer {len(groups)}")
    params = {}
    for group, sg in zip(groups, saved):
        if len(sg.get("params", ())) != len(group["params"]):
            raise ValueError("a parameter group of the state dict has a different number of parameters")
        merged = {**group, **{k: v for k, v in sg.items() if k != "params"}}
        check_group({**merged, "params": []}, num_regions_after)
        params.update(zip(sg["params"], group["params"]))
    for key, st in state_dict["state"].items():
        p = params.get(key)
        if p is None:
            continue  # torch ignores state for ids it does not know
        missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if st and k not in st]
        if missing:
            raise ValueError(f"the saved state of a parameter of shape {tuple(p.shape)} has no "
                             f"{', '.join(map(repr, missing))}: the state dict is incomplete")
        for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            t = st.get(name)
            if t is not None and (not isinstance(t, torch.Tensor) or t.shape != p.shape):
                raise ValueError(f"state {name!r} of a parameter of shape {tuple(p.shape)} has shape "
                                 f"{tuple(getattr(t, 'shape', ()))}: the state dict belongs to another model")
            sharded = t is not None and (shards.is_dtensor(t) or shards.is_dtensor(p))
            if sharded and shards.layout(t) != shards.layout(p):
                raise ValueError(f"state {name!r} of a parameter that is {shards.describe(shards.layout(p))} is "
                                 f"{shards.describe(shards.layout(t))}: load sharded state with torch.distributed."
                                 f"checkpoint.state_dict.set_optimizer_state_dict")
        step = st.get("step")
        if step is not None and (isinstance(step, torch.Tensor) and step.numel() != 1 or
                                 not isinstance(step, torch.Tensor) and not _is_real(step)):
            raise ValueError(f"state 'step' must be a number or a one-element tensor, got {step!r}")
