"""The step plan of a FusedRegionAdamW: which tensors step on which path, checked once and reused.

``build_plan`` checks every tensor a step touches (grad dtype, shape, device and layout; the state's and
the EWC buffers' dtype, shape and device), then creates missing state and packs the Triton pointer
tables. Nothing changes until the whole input passed, so a bad tensor raises with the optimizer intact.

A later step reuses the plan while its signature holds: the same parameter objects, the same groups'
regions and amsgrad flags, the same buffers version and state count, and for every parameter and grad
the kernel would read, the same address, dtype, numel and contiguity (four C-level maps, far cheaper
than re-deriving the plan). New grad objects at the old addresses (``zero_grad(set_to_none=True)`` with
a caching allocator) keep the plan. So the kernel never reads memory whose dtype or size was not checked.

Tensors the fused ops cannot walk linearly (a non-contiguous param or grad) step through contiguous
staging buffers: copied in before the launch, the param (and an unscaled grad) copied back after.

A DTensor parameter (FSDP2) steps through its local shard (``lrdist.shards``): every address, size and
layout above is the local tensor's, and its state and grad must be placed like it. A launch set holds
the tensors of one (device, dtype, amsgrad, sharding): the clipping norm of a set is reduced over the
mesh dims its tensors are sharded on.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from itertools import chain, compress, repeat
from operator import attrgetter, is_, is_not

import torch

from lrdist import shards
from lrdist.optim_checks import capturing, check_lr_device, check_param, overlaps

try:
    from lrdist.kernels import fused_region_adamw as _kernel
except Exception:  # Triton missing or broken: only the torch path is used then
    _kernel = None

MAX_CACHED_TABLES = 8

_ptr, _numel, _contiguous = torch.Tensor.data_ptr, torch.Tensor.numel, torch.Tensor.is_contiguous
_dtype, grad_of = attrgetter("dtype"), attrgetter("grad")


def memory_signature(tensors: list) -> tuple:
    """Address, dtype, numel and contiguity of each tensor (what decides the memory a kernel walks)."""
    return (list(map(_ptr, tensors)), list(map(_dtype, tensors)), list(map(_numel, tensors)),
            list(map(_contiguous, tensors)))


@dataclass
class Item:
    """One parameter with a grad: what the fused ops read and write for it."""

    group: int                        # index into param_groups
    index: int                        # flat index over every group's params
    param: torch.Tensor               # the optimizer's key (a DTensor under FSDP2)
    local: torch.Tensor               # what this rank steps: the param, or its local shard
    shard: tuple | None               # lrdist.shards.shard_key(param): where its norm is reduced
    state: dict
    p_stage: torch.Tensor | None      # contiguous copy of a non-contiguous param
    g_stage: torch.Tensor | None      # contiguous copy of a non-contiguous grad

    def step_param(self) -> torch.Tensor:
        return self.local if self.p_stage is None else self.p_stage

    def step_grad(self, grads: list) -> torch.Tensor:
        """``grads``: the local grads, one per param."""
        return grads[self.index] if self.g_stage is None else self.g_stage

    def moment(self, name: str) -> torch.Tensor | None:
        t = self.state.get(name)
        return None if t is None else shards.local(t)


STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def state_refs(state, params: list, grads: list, sharded: bool) -> tuple | None:
    """What the plan's tables point into: the optimizer state's keys and dicts (in order), every value in the
    stepped params' dicts (held, so their memory outlives the plan) and its address. None when some stepped
    param has no state."""
    dicts = list(map(state.get, compress(params, map(is_not, grads, repeat(None)))))
    if None in dicts:
        return None
    contents = list(chain.from_iterable(map(dict.values, dicts)))
    return list(state), list(state.values()), dicts, contents, _addresses(contents, sharded)


def _addresses(values, sharded: bool) -> list | None:
    """The data address of each value (a DTensor's local shard's); None if one is no tensor (set by hand:
    then every step rebuilds the plan, slower but right)."""
    try:
        return list(map(_ptr, map(shards.local, values) if sharded else values))
    except (TypeError, AttributeError):
        return None


def states_unchanged(state, refs: tuple | None, sharded: bool) -> bool:
    """Whether ``state`` still holds what ``state_refs`` saw: the same keys and dicts (by identity), and in
    them values at the same addresses, in order. A state replaced or cleared (``opt.state[p] = {}``, a new
    ``exp_avg``) or moved in place (``.data =``, ``set_``, a growing ``resize_``) rebuilds the plan, so the
    kernel never walks a stale or freed buffer (what the plan was built on was checked then). C-level loops,
    hashing no tensor (a dict lookup by param calls its Python-level ``__hash__``: ~0.5 µs each)."""
    if refs is None or refs[4] is None:
        return False
    keys, values, dicts, _, addresses = refs
    return (len(state) == len(keys) and all(map(is_, state, keys)) and all(map(is_, state.values(), values))
            and _addresses(chain.from_iterable(map(dict.values, dicts)), sharded) == addresses)


def step_signature(params: list, grads: list, staged: list) -> tuple:
    """The step's param and grad memory that the plan's tables and staging copies depend on (local tensors),
    in C-level loops: which params have a grad; address, dtype, numel and contiguity of each stepped param
    and grad; the strides of the tensors staged through contiguous copies (an ``expand``ed grad at the old
    address is a new layout). The state's memory: ``states_unchanged``."""
    has_grad = list(map(is_not, grads, repeat(None)))
    live = [*compress(params, has_grad), *compress(grads, has_grad)]
    return has_grad, memory_signature(live), [(params[i].stride(), grads[i].stride()) for i in staged]


@dataclass
class StepPlan:
    params: list                  # every param of every group, in order (compared by identity)
    sharded: bool                 # some param is a DTensor: the step reads local shards
    signature: tuple              # step_signature(...) of the local tensors
    layout: list                  # (region, amsgrad) per group
    version: int                  # the optimizer's buffers version
    states: tuple | None          # state_refs(...): the state dicts and tensors the tables point into
    torch_groups: list            # [(group index, [Item])]: torch's fused op per group
    triton_sets: list             # [(device, shard key, TensorTable)]: one launch each
    staged: list                  # Items with a staging buffer
    staged_at: list               # their flat indices

    def local(self, *tensor_lists) -> tuple:
        """What this rank steps of each tensor (of these params: a plain model skips the mapping)."""
        return tuple(list(map(shards.local, ts)) for ts in tensor_lists) if self.sharded else tensor_lists

    def matches(self, params: list, grads: list, layout: list, version: int, state) -> bool:
        """Whether this plan still describes the step. Grads are compared by memory, not identity: the
        plan holds none (new grad objects at the old addresses keep it, and old grads can be freed)."""
        if (version != self.version or layout != self.layout
                or len(params) != len(self.params) or not all(map(is_, params, self.params))
                or not states_unchanged(state, self.states, self.sharded)):
            return False
        try:
            return step_signature(*self.local(params, grads), self.staged_at) == self.signature
        except RuntimeError:  # e.g. a sparse grad has no data pointer: the rebuild explains
            return False


def on_device(device: torch.device):
    """Make ``device`` current (and so its current stream) for what follows; a no-op off CUDA."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check_tensors(opt, params: list, grads: list) -> None:
    """Every check the plan needs, before anything changes."""
    groups = opt.param_groups
    if len(set(map(id, params))) != len(params):
        raise ValueError("a parameter appears more than once in param_groups (edited by hand?): list each once")
    k = 0
    for group in groups:
        if any(grads[k + i] is not None for i in range(len(group["params"]))):
            check_lr_device(group)  # the params may have moved since the Tensor lr was checked
        for p in group["params"]:
            g = grads[k]
            k += 1
            if g is None:
                continue
            what = f"parameter {k - 1} (shape {tuple(p.shape)}, {p.dtype})"
            if g.is_sparse:
                raise RuntimeError("FusedRegionAdamW does not support sparse gradients")
            check_param(p)  # its dtype may have changed since construction (model.to(...))
            if g.device != p.device:
                raise RuntimeError(f"the gradient of {what} is on {g.device}, the parameter on {p.device}")
            lp, lg, placed = shards.local(p), shards.local(g), shards.layout(p)
            if shards.layout(g) != placed:
                raise RuntimeError(f"the gradient of {what} is {shards.describe(shards.layout(g))}, the "
                                   f"parameter {shards.describe(placed)}")
            if g.shape != p.shape or lg.shape != lp.shape:
                raise RuntimeError(f"the gradient of {what} has shape {tuple(g.shape)} (local {tuple(lg.shape)})")
            if g.dtype != p.dtype:
                raise TypeError(f"the gradient of {what} is {g.dtype}: like torch's AdamW, FusedRegionAdamW "
                                f"needs grads in the parameter's dtype (cast it, or leave grad_dtype unset)")
            state = opt.state.get(p)
            if state:  # keys dropped or set to non-tensors by hand
                missing = [key for key in STATE_KEYS[:3] if key not in state]
                bad = [key for key in STATE_KEYS[1:] if key in state and not isinstance(state[key], torch.Tensor)]
                if missing or bad:
                    problem = (f"has no {', '.join(map(repr, missing))}" if missing
                               else f"holds no tensor under {', '.join(map(repr, bad))}")
                    raise RuntimeError(f"the optimizer state of {what} {problem} (changed by hand?): restore it, "
                                       f"or call opt.reset_state() to start afresh")
            if overlaps(p):
                raise RuntimeError(f"{what} has elements sharing memory (e.g. from expand()): an update could "
                                   f"not be written back; give it memory of its own")
            if state:
                step = state.get("step")
                if not (isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.numel() == 1
                        and step.device == p.device and not shards.is_dtensor(step)):
                    seen = (f"a {step.dtype} tensor of {step.numel()} elements on {step.device}"
                            if isinstance(step, torch.Tensor) else type(step).__name__)
                    raise RuntimeError(f"the optimizer state of {what} has a step that is {seen}, not one float32 "
                                       f"value on {p.device} (changed by hand?): restore it, or opt.reset_state()")
            if overlaps(g):
                raise RuntimeError(f"the gradient of {what} has elements sharing memory (e.g. from expand()): "
                                   f"give it a gradient of its own (.clone() or .contiguous())")
            for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                t = state.get(name) if state else None
                if t is None:
                    continue
                if t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
                    raise RuntimeError(
                        f"the optimizer state of {what} is {t.dtype} {tuple(t.shape)} on {t.device}: the "
                        f"parameter changed after a step (e.g. model.half()); call "
                        f"opt.load_state_dict(opt.state_dict()) to cast the state, or opt.reset_state()")
                if shards.layout(t) != placed or shards.local(t).shape != lp.shape:
                    raise RuntimeError(f"the optimizer state of {what} is {shards.describe(shards.layout(t))}, the "
                                       f"parameter {shards.describe(placed)}: load sharded state with "
                                       f"torch.distributed.checkpoint's set_optimizer_state_dict, or reset_state()")
            pair = opt._ewc.get(p)  # local tensors, like every buffer the optimizer keeps
            if pair is not None and any(t.shape != lp.shape or t.dtype != p.dtype or t.device != p.device
                                        for t in pair):
                raise RuntimeError(f"the EWC Fisher/anchor of {what} no longer match the parameter "
                                   f"(dtype, shape or device changed): call set_ewc again")
            keep = opt._row_masks.get(p)
            if keep is not None and (lp.dim() == 0 or keep.numel() != lp.shape[0] or keep.device != p.device):
                raise RuntimeError(f"the row mask of {what} no longer matches the parameter: call set_row_masks")


def build_plan(opt, params: list, grads: list, layout: list) -> StepPlan:
    check_tensors(opt, params, grads)
    locals_, local_grads = list(map(shards.local, params)), list(map(shards.local, grads))
    devices = {p.device for p, g in zip(params, grads) if g is not None}
    if len(devices) > 1 and (opt.max_grad_norm is not None or opt._ewc or opt._row_masks):
        raise RuntimeError("max_grad_norm, EWC and row masks need all parameters on one device")
    items, k = [], 0
    for gi, group in enumerate(opt.param_groups):
        for p in group["params"]:
            lp, g = locals_[k], local_grads[k]
            k += 1
            if g is None:
                continue
            state = opt._init_state(p, group["amsgrad"])
            fits = lambda t: t is not None and (t.shape, t.dtype, t.device) == (lp.shape, lp.dtype, lp.device)  # noqa: E731
            stage = [t if fits(t) else None for t in opt._staging.get(p, (None, None))]  # the param may have changed
            p_stage = None if lp.is_contiguous() else (stage[0] if stage[0] is not None else
                                                       torch.empty(lp.shape, dtype=lp.dtype, device=lp.device))
            g_stage = None if g.is_contiguous() else (stage[1] if stage[1] is not None else
                                                      torch.empty(lp.shape, dtype=lp.dtype, device=lp.device))
            if p_stage is not None or g_stage is not None:
                opt._staging[p] = (p_stage, g_stage)
            items.append(Item(gi, k - 1, p, lp, shards.shard_key(p), state, p_stage, g_stage))

    triton_on = {d: opt._use_triton(d) for d in devices}
    launch_sets, torch_groups = {}, {}
    for item in items:
        group = opt.param_groups[item.group]
        if triton_on[item.param.device]:
            key = (item.param.device, item.param.dtype, group["amsgrad"], item.shard)
            launch_sets.setdefault(key, []).append(item)
        else:
            torch_groups.setdefault(item.group, []).append(item)
    staged = [i for i in items if i.p_stage is not None or i.g_stage is not None]
    sharded = any(map(shards.is_dtensor, params))
    plan = StepPlan(params=params, sharded=sharded, layout=layout,
                    signature=step_signature(locals_, local_grads, [i.index for i in staged]),
                    version=opt._tables_version, states=state_refs(opt.state, params, grads, sharded),
                    torch_groups=list(torch_groups.items()),
                    triton_sets=[], staged=staged, staged_at=[i.index for i in staged])
    for (device, _, amsgrad, shard), set_items in launch_sets.items():
        plan.triton_sets.append((device, shard, launch_table(opt, device, amsgrad, set_items, local_grads)))
    return plan


def launch_table(opt, device, amsgrad: bool, items: list, grads: list):
    """The kernel's pointer tables for one launch set, from a small LRU keyed by everything they hold
    (launch sets differ when some grads are None, e.g. other tasks' heads). ``grads``: the local grads."""
    groups = opt.param_groups
    cols = []
    for it in items:
        ewc, keep = opt._ewc.get(it.param), opt._row_masks.get(it.param)
        if it.local.numel() == 0:  # an empty shard steps nothing (and has no rows to mask)
            ewc = keep = None
        cols.append((it.group, groups[it.group]["region"], it.step_param(), it.step_grad(grads),
                     it.moment("exp_avg"), it.moment("exp_avg_sq"), it.moment("max_exp_avg_sq") if amsgrad else None,
                     it.state["step"], ewc[0] if ewc else None, ewc[1] if ewc else None, keep))
    addr = lambda t: None if t is None else (t.data_ptr(), t.dtype, t.numel())  # noqa: E731
    key = (device, amsgrad, opt.block_size, tuple((c[0], c[1], *map(addr, c[2:])) for c in cols))
    table = opt._tables.get(key)
    if table is None:
        if device.type == "cuda" and capturing():
            raise RuntimeError("FusedRegionAdamW: grads or states moved during CUDA graph capture. Take a "
                               "warm-up step first and keep grads in place (zero_grad(set_to_none=False))")
        gi, regions, p, g, m, v, vmax, steps, fishers, anchors, masks = (list(c) for c in zip(*cols))
        table = _kernel.build_table(p, g, m, v, vmax if amsgrad else None, steps, gi, regions, amsgrad,
                                    opt.block_size, fishers=fishers, anchors=anchors, row_masks=masks)
        opt._tables[key] = table
        if len(opt._tables) > MAX_CACHED_TABLES:
            opt._tables.popitem(last=False)
    else:
        opt._tables.move_to_end(key)
    return table
