"""FusedRegionAdamW: AdamW with a per-region learning-rate table, as a drop-in ``torch.optim`` optimizer.

Each param group may carry ``"region": int``; a tensor's effective LR is
``group["lr"] * region_scales[group["region"]]``. The region table is a device tensor, so changing the
distribution (``set_region_scales``) or the scheduler's LR changes no kernel and costs no host sync.

Backends:
* ``"triton"``: one kernel launch per (device, dtype, amsgrad) for all tensors of all groups (and per
  sharding, under FSDP2) (``lrdist.kernels.fused_region_adamw``). Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1``.
* ``"torch"``: torch's own fused AdamW op (``torch.optim.adamw.adamw(fused=True)``) once per param group,
  which has a fast CPU kernel; torch's foreach path on devices without a fused kernel.
* ``"auto"``: Triton for CUDA tensors when Triton works, otherwise torch.

Contract (both backends alike):
* Bad input raises a one-line error before anything changes (checks in ``lrdist.optim_checks``).
* A step checks its tensors once and reuses the checked plan while nothing moved (``lrdist.step_plan``).
* ``.grad`` after a step is the loss gradient, unscaled when GradScaler passed a scale (as torch's fused
  AdamW leaves it); row masks, EWC and clipping act inside the step and never write ``.grad``.
* Several devices (DDP, FSDP2): a DTensor param steps through its local shard, with state placed like
  it; clipping uses the whole model's norm (``lrdist.fused_terms``, ``lrdist.shards``). Every group's
  ``"region_scales"`` mirrors the region table (read-only: use ``set_region_scales``), so
  ``torch.distributed.checkpoint``'s state-dict helpers, which keep only ``state`` and ``param_groups``,
  carry the distribution.
* CUDA graphs: between replays, ``set_region_scales``, ``fill_`` on Tensor lrs, ``set_row_masks`` on the
  weights already masked, ``set_ewc`` on the same parameters and ``max_grad_norm`` from one number to
  another write into the buffers the graph reads. Anything that changes which buffers the step reads
  (``add_param_group``, ``set_ewc`` on other params, ``clear_ewc``, ``clear_row_masks``, ``reset_state``,
  ``load_state_dict``, ``max_grad_norm`` to or from None) raises during capture and needs a new capture
  after it; the buffers a captured step used stay alive with the optimizer.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Iterable

import torch
from torch.optim.adamw import adamw as _torch_adamw
from torch.optim.optimizer import _get_fused_kernels_supported_devices

from lrdist import shards
from lrdist.fused_terms import torch_terms, triton_extras
from lrdist.optim_checks import (capturing, check_block_size, check_ewc, check_group, check_loaded_state,
                                 check_lr_device, check_max_grad_norm, check_row_masks, check_scales,
                                 loaded_scales, refuse_during_capture)
from lrdist.step_plan import build_plan, grad_of, on_device

try:
    from lrdist.kernels import fused_region_adamw as _kernel
    _TRITON_ERROR = None
except Exception as exc:  # Triton missing or broken: the torch path still works.
    _kernel = None
    _TRITON_ERROR = exc

BACKENDS = ("auto", "triton", "torch")
# Caches rebuilt on demand: dropped by pickling and deepcopy.
_CACHES = ("_scales", "_tables", "_hyper", "_lr_tables", "_extras", "_plan", "_staging", "_raw_rows", "_rows",
           "_layout", "_tensor_lrs", "_graph_refs")


def triton_available() -> bool:
    return _kernel is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _copy_to(dst: torch.Tensor, host: torch.Tensor) -> None:
    """Overwrite a device table in place from host values without a host sync, on the table's device and
    its current stream (the one the launches that read it use)."""
    with on_device(dst.device):
        if dst.device.type == "cuda":
            host = host.pin_memory()  # the caching host allocator keeps it alive until the copy ran
        dst.copy_(host, non_blocking=True)


def _host_value(x):
    """A hyperparameter the host reads (betas, eps, weight decay) as its current value, so that a Tensor
    changed in place (``fill_``) is noticed; a malformed one stays as it is for check_group to name."""
    return x.item() if isinstance(x, torch.Tensor) and x.numel() == 1 else x


def _raw_row(g: dict) -> tuple:
    """What the step compares per group to notice a change (a Tensor lr by identity: it is read on the device)."""
    lr, betas = g["lr"], g["betas"]  # a Tensor lr by identity and storage (the kernel reads its address); kept
    return ((id(lr), lr, lr.data_ptr(), lr.dtype, lr.device) if isinstance(lr, torch.Tensor) else lr,
            tuple(map(_host_value, betas)) if isinstance(betas, (tuple, list)) else betas,
            _host_value(g["eps"]), _host_value(g["weight_decay"]), g["maximize"], g["amsgrad"], g["region"])


class FusedRegionAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with per-region LR scales, fused over all tensors."""

    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale / found_inf

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, amsgrad: bool = False, maximize: bool = False,
                 region_scales=None, backend: str = "auto", block_size: int | None = None,
                 max_grad_norm: float | None = None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, region=0)
        check_group({**defaults, "params": ()}, None)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "triton" and _kernel is None:
            raise RuntimeError(f"backend='triton' but the Triton kernel cannot be imported: {_TRITON_ERROR}")
        check_block_size(block_size)
        check_max_grad_norm(max_grad_norm)
        scales = None if region_scales is None else check_scales(region_scales, None)
        self.backend = backend
        self.block_size = block_size or (_kernel.DEFAULT_BLOCK if _kernel else 2048)
        self._num_regions: int | None = None  # known once all groups are in
        # Bumped whenever an address the device tables hold may change (new or loaded state, EWC
        # buffers, row-mask buffers): part of the step plan's signature.
        self._tables_version = 0
        self._ewc: dict = {}        # param -> (fisher, anchor): persistent buffers the kernel reads
        self._ewc_lambda = 0.0
        self._row_masks: dict = {}  # param -> float32 [rows] (MIGU), persistent
        self._max_grad_norm = max_grad_norm
        self._reset_caches()
        super().__init__(params, defaults)

        n = 1 + max(g["region"] for g in self.param_groups)
        self._install_scales(scales if scales is not None else check_scales([1.0] * n, None))

    def _reset_caches(self) -> None:
        self._scales: dict = {}     # device -> float64 [R]; the first one is canonical
        self._tables: OrderedDict = OrderedDict()  # LRU of Triton pointer tables (lrdist.step_plan)
        self._hyper: dict = {}      # device -> (float rows, float64 [G, 6] table)
        self._lr_tables: dict = {}  # device -> the kernel's table of Tensor-lr addresses (kernel.LRTable)
        self._extras: dict = {}     # device -> StepExtras
        self._plan = None           # the checked step plan (lrdist.step_plan)
        self._staging: dict = {}    # param -> contiguous (param, grad) copies for non-contiguous tensors
        self._raw_rows = None       # every group's raw hyperparameters when last checked
        self._rows: list = []       # ... as floats
        self._layout: list = []     # ... (region, amsgrad) per group
        self._tensor_lrs: list = []  # (group index, Tensor lr)
        self._graph_refs: list = []  # what captured CUDA graphs point at: never freed

    # ---- pickling and deepcopy: our own attributes, without the caches -------------------------
    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in _CACHES}
        state["_region_scales"] = self.region_scales
        return state

    def __setstate__(self, state: dict) -> None:
        scales = state.pop("_region_scales", None)
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
        self._reset_caches()
        if scales is not None:
            self._scales = {scales.device: scales}
            self._mirror_scales(scales)

    # ---- region table -------------------------------------------------------------------------
    def _install_scales(self, scales: torch.Tensor) -> None:
        for g in self.param_groups:
            if g["region"] >= scales.numel():
                raise ValueError(f"region {g['region']} is out of range for {scales.numel()} region scales; "
                                 f"pass region_scales with at least {g['region'] + 1} values")
        self._num_regions = scales.numel()
        first = next((p for g in self.param_groups for p in g["params"]), None)
        device = first.device if first is not None else torch.device("cpu")
        self._scales = {device: scales.to(device)}
        self._mirror_scales(scales)
        self._hyper.clear()
        self._raw_rows = None

    def _mirror_scales(self, host: torch.Tensor) -> None:
        """Every group's read-only copy of the table (what state dicts carry through DCP's helpers)."""
        values = tuple(host.tolist())
        for g in self.param_groups:
            g["region_scales"] = values

    @property
    def num_regions(self) -> int:
        return self._num_regions

    @property
    def region_scales(self) -> torch.Tensor:
        """The per-region LR scale table (float64, on the params' device). Use set_region_scales."""
        return next(iter(self._scales.values()))

    def set_region_scales(self, values) -> None:
        """Replace the distribution in place: same tensors, so kernels and CUDA graphs see it.

        Host values (list, numpy, CPU tensor) are validated for free; a CUDA tensor is read back
        once to validate it. Safe between CUDA-graph replays (not during capture).
        """
        host = check_scales(values, self._num_regions)
        if capturing():
            raise RuntimeError("set_region_scales cannot run during CUDA graph capture: call it between replays")
        for table in self._scales.values():
            _copy_to(table, host)
        self._mirror_scales(host)

    def _scales_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._scales:
            self._scales[device] = self.region_scales.to(device)
        return self._scales[device]

    # ---- fused extras: EWC, MIGU row masks, clipping -------------------------------------------------
    def _known(self) -> set:
        return {p for g in self.param_groups for p in g["params"]}

    def set_ewc(self, fisher: dict, anchor: dict, lam: float) -> None:
        """Add ``2 lam F (p - anchor)`` to each listed param's grad inside the step (EWC's penalty
        gradient for ``lam * sum F (p - anchor)^2``). ``fisher``/``anchor`` map params to tensors.
        The same params again: their buffers are overwritten in place (safe between graph replays)."""
        check_ewc(fisher, anchor, lam, self._known())
        fisher = {p: shards.local(f.detach()) for p, f in fisher.items()}  # a DTensor param's: its shard
        anchor = {p: shards.local(anchor[p].detach()) for p in fisher}
        in_place = set(fisher) == set(self._ewc) and all(self._ewc[p][0].dtype == p.dtype for p in fisher)
        if not in_place:
            refuse_during_capture("set_ewc on other parameters")
        if in_place:
            for p, (f, a) in self._ewc.items():
                f.copy_(fisher[p], non_blocking=True)
                a.copy_(anchor[p], non_blocking=True)
        else:
            self._ewc = {p: (fisher[p].to(p.device, p.dtype).contiguous().clone(),
                             anchor[p].to(p.device, p.dtype).contiguous().clone()) for p in fisher}
            self._tables_version += 1
        self._ewc_lambda = float(lam)
        for extras in self._extras.values():
            extras.ewc_lambda.fill_(self._ewc_lambda)

    def clear_ewc(self) -> None:
        refuse_during_capture("clear_ewc")
        self._ewc = {}
        self._tables_version += 1

    def set_row_masks(self, masks: dict) -> None:
        """MIGU: per listed weight, a vector over its output rows (1 keeps a row's grad, 0 zeroes it),
        applied inside the step. Params left out are unmasked. Buffers persist: with the same weights
        as before no table is rebuilt (safe between graph replays). A DTensor weight takes a vector over
        all its rows; the optimizer keeps the rows of its local shard."""
        masks = {p: shards.local_rows(p, keep) for p, keep in check_row_masks(masks, self._known()).items()}
        new = [p for p in masks if p not in self._row_masks]
        if new:
            refuse_during_capture("set_row_masks on weights not masked before")
            for p in new:
                self._row_masks[p] = torch.empty(masks[p].numel(), dtype=torch.float32, device=p.device)
            self._tables_version += 1
        for p, buf in self._row_masks.items():
            if p in masks:
                buf.copy_(masks[p], non_blocking=True)
            else:
                buf.fill_(1.0)

    def clear_row_masks(self) -> None:
        refuse_during_capture("clear_row_masks")
        self._row_masks = {}
        self._tables_version += 1

    @property
    def max_grad_norm(self) -> float | None:
        """Clip the global grad norm to this inside the step (None: no clipping)."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float | None) -> None:
        check_max_grad_norm(value)
        if (value is None) != (self._max_grad_norm is None):
            refuse_during_capture("switching max_grad_norm on or off")
        self._max_grad_norm = value
        for extras in self._extras.values():  # the device copy follows, so steps need not check it
            extras.max_grad_norm.fill_(value or 0.0)

    @property
    def last_grad_norm(self) -> torch.Tensor | None:
        """The global grad norm of the last step (a device tensor; with max_grad_norm set)."""
        if not self._extras:
            return None
        return next(iter(self._extras.values())).norm_out[0]

    # ---- param groups ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """As torch's, but the whole group is checked first: a bad one leaves param_groups unchanged."""
        refuse_during_capture("add_param_group")
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set) or params is None:
            raise TypeError("a param group's 'params' must be an ordered collection of Tensors (not a set)")
        param_group["params"] = params = list(params)
        check_group({**self.defaults, **param_group}, self._num_regions)
        super().add_param_group(param_group)
        if self._num_regions is not None:  # (during __init__, _install_scales mirrors them)
            param_group["region_scales"] = self.param_groups[0]["region_scales"]
        self._raw_rows = None

    # ---- state dict -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch's, plus the region table: as ``region_scales`` and in every param group (the groups'
        copies are what ``torch.distributed.checkpoint.state_dict.get_state_dict`` keeps)."""
        sd = super().state_dict()
        sd["region_scales"] = self.region_scales.detach().cpu().clone()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads our own state dicts (also through ``torch.distributed.checkpoint``'s helpers, sharded or
        resharded) and ``torch.optim.AdamW``'s. A state dict without a region table (torch's) brings its
        moments, steps and betas/eps/weight decay but not its LRs: its groups' LRs are effective ones (our
        lr x scale), so our groups keep their lr, regions and region table (taking its LRs would scale them
        twice). Everything is checked first: a bad state dict leaves the optimizer as it was."""
        refuse_during_capture("load_state_dict")
        scales = loaded_scales(state_dict)
        ours = scales is not None
        scales = check_scales(scales if ours else self.region_scales, None)
        check_loaded_state(state_dict, self.param_groups, scales.numel())
        kept = [{k: g[k] for k in ("region", "lr", "initial_lr") if k in g and (k == "region" or not ours)}
                for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, keep in zip(self.param_groups, kept):
            group.update({k: v for k, v in keep.items() if k != "region" or k not in group})
        for p, state in self.state.items():
            if "step" in state:  # torch keeps step on the CPU unless fused/capturable
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device).reshape(())
        self._tables_version += 1
        self._install_scales(scales)

    def reset_state(self) -> None:
        """Forget all moments and step counts (a fresh run), keeping groups and the region table."""
        refuse_during_capture("reset_state")
        self.state.clear()
        self._tables_version += 1
        self._tables.clear()
        self._staging.clear()

    # ---- step -----------------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, amsgrad: bool) -> dict:
        """Zero moments on the first step, placed like the param (a DTensor's: sharded like it, as torch's
        AdamW does); kept contiguous so the fused ops can walk them linearly. ``step`` is a plain tensor."""
        state = self.state[p]
        zeros = lambda: torch.zeros_like(p, memory_format=torch.contiguous_format)  # noqa: E731
        if not state:
            self._tables_version += 1
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = zeros()
            state["exp_avg_sq"] = zeros()
        if amsgrad and "max_exp_avg_sq" not in state:
            self._tables_version += 1
            state["max_exp_avg_sq"] = zeros()
        for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if name in state and not shards.local(state[name]).is_contiguous():  # e.g. loaded from torch's AdamW
                state[name] = state[name].contiguous()
                self._tables_version += 1
        return state

    def _use_triton(self, device: torch.device) -> bool:
        if self.backend == "torch":
            return False
        if self.backend == "triton":
            if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
                raise RuntimeError(f"backend='triton' runs on CUDA tensors (or CPU tensors with "
                                   f"TRITON_INTERPRET=1); got tensors on {device}")
            return True
        return device.type == "cuda" and _kernel is not None

    def _check_groups(self) -> None:
        """Every step: compare the groups' hyperparameters with the last checked ones (cheap); on any
        change check them all (a region mutated out of range raises here, before any group steps)."""
        raw = [_raw_row(g) for g in self.param_groups]
        if raw == self._raw_rows:
            return
        for g in self.param_groups:
            check_group({**g, "params": ()}, self._num_regions)
            check_lr_device(g)
        self._lr_tables.clear()  # a Tensor lr may have been replaced: its address is read at every launch
        self._rows = [(0.0 if isinstance(g["lr"], torch.Tensor) else float(g["lr"]), float(g["betas"][0]),
                       float(g["betas"][1]), float(g["eps"]), float(g["weight_decay"]),
                       -1.0 if g["maximize"] else 1.0) for g in self.param_groups]
        self._layout = [(int(g["region"]), g["amsgrad"]) for g in self.param_groups]
        self._tensor_lrs = [(gi, g["lr"]) for gi, g in enumerate(self.param_groups)
                            if isinstance(g["lr"], torch.Tensor)]
        self._raw_rows = raw

    def prepare_step(self):
        """The host part of a step, everything but the launches: check the groups, reuse or rebuild the
        step plan, refresh the hyperparameter tables. Returns what ``_launch`` needs.
        (benchmarks/bench_optimizer.py times exactly this.)"""
        self._check_groups()
        params = [p for g in self.param_groups for p in g["params"]]
        grads = list(map(grad_of, params))
        plan = self._plan
        if plan is None or not plan.matches(params, grads, self._layout, self._tables_version, self.state):
            self._plan = None  # a failed build leaves no stale plan
            plan = self._plan = build_plan(self, params, grads, self._layout)
        hypers = {device: (self._hyper_table(device), self._lr_table(device)) for device, _, _ in plan.triton_sets}
        if plan.triton_sets and capturing():  # a captured graph keeps pointing at these
            self._graph_refs.append((plan, dict(self._hyper), dict(self._lr_tables), dict(self._extras),
                                     dict(self._scales)))
        (local_grads,) = plan.local(grads)
        return plan, local_grads, hypers

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._launch(*self.prepare_step(), getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        return loss

    def _launch(self, plan, grads, hypers, grad_scale, found_inf) -> None:
        """The device work of a step: staging copies, torch's fused op per group, the Triton launches.
        ``grads``: the local grads (prepare_step)."""
        unscales = grad_scale is not None  # every grad is left unscaled, staged ones copied back at the end
        for it in plan.staged:
            if it.p_stage is not None:
                it.p_stage.copy_(it.local)
            if it.g_stage is not None:
                it.g_stage.copy_(grads[it.index])
        if plan.torch_groups:
            items = [it for _, its in plan.torch_groups for it in its]
            step_grads = [it.step_grad(grads) for it in items]
            if self.max_grad_norm is not None or self._ewc or self._row_masks:
                step_grads = torch_terms(self, items, step_grads, grad_scale, found_inf)
                grad_scale = None
            k = 0
            for gi, its in plan.torch_groups:
                self._torch_step(self.param_groups[gi], its, step_grads[k:k + len(its)], grad_scale, found_inf)
                k += len(its)
        if plan.triton_sets:
            self._triton_steps(plan.triton_sets, hypers, grad_scale, found_inf)
        for it in plan.staged:
            if it.p_stage is not None:
                it.local.copy_(it.p_stage)
            if it.g_stage is not None and unscales:
                grads[it.index].copy_(it.g_stage)  # unscaled, as for every other grad

    def _torch_step(self, group, items, grads, grad_scale, found_inf) -> None:
        device = items[0].local.device
        scales = self._scales_on(device)
        if device.type == "cpu":
            lr = group["lr"] * scales[group["region"]].item()  # CPU read: no sync
        else:
            lr = scales[group["region"]].to(torch.float32) * group["lr"]  # stays on the device
        fused = device.type in _get_fused_kernels_supported_devices()
        if not fused and found_inf is not None:
            raise RuntimeError(f"no fused AdamW kernel for {device}: unscale grads "
                               f"(scaler.unscale_) before stepping")
        beta1, beta2 = group["betas"]
        _torch_adamw(
            [it.step_param() for it in items], list(grads), [it.moment("exp_avg") for it in items],
            [it.moment("exp_avg_sq") for it in items],
            [it.moment("max_exp_avg_sq") for it in items] if group["amsgrad"] else [],
            [it.state["step"] for it in items], fused=fused, foreach=None if fused else True,
            grad_scale=grad_scale, found_inf=found_inf, amsgrad=group["amsgrad"], beta1=beta1,
            beta2=beta2, lr=lr, weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=group["maximize"])
        if group["amsgrad"]:  # one NaN policy on every device: a NaN second moment stays in the max, as
            # torch.maximum and the Triton kernel keep it (torch's CPU op drops it in a tensor's scalar tail,
            # its CUDA op everywhere); changes nothing else (the op already took the max)
            torch._foreach_maximum_([it.moment("max_exp_avg_sq") for it in items],
                                    [it.moment("exp_avg_sq") for it in items])

    def _hyper_table(self, device: torch.device) -> torch.Tensor:
        """Per-group [lr, beta1, beta2, eps, weight_decay, sign] as a float64 device table.

        Rewritten only when a value changed (e.g. the scheduler moved a float LR). A group with a Tensor lr
        has its LR read by the kernel from that tensor (``_lr_table``), so this table is not touched.
        """
        rows = self._rows
        cached = self._hyper.get(device)
        if cached is None or cached[0] != rows:
            if device.type == "cuda" and capturing():
                raise RuntimeError("an LR or hyperparameter changed during CUDA graph capture: "
                                   "use Tensor lrs (group['lr'] = torch.tensor(..., device='cuda'))")
            table = cached[1] if cached is not None and len(cached[0]) == len(rows) else \
                torch.empty(len(rows), _kernel.N_HYPER, dtype=torch.float64, device=device)
            _copy_to(table, torch.tensor(rows, dtype=torch.float64))
            self._hyper[device] = cached = (rows, table)
        return cached[1]

    def _lr_table(self, device: torch.device):
        """The addresses of the groups' Tensor lrs on ``device`` (None when no group has one): the kernel
        reads each at every launch, so ``lr.fill_`` (a scheduler, a captured graph) needs no copy. Rebuilt
        only when a group's LR tensor is replaced (``_check_groups``)."""
        if not self._tensor_lrs:
            return None
        table = self._lr_tables.get(device)
        if table is None:
            if device.type == "cuda" and capturing():
                raise RuntimeError("a Tensor lr was replaced during CUDA graph capture: fill_ the one the groups "
                                   "hold instead, or capture again")
            table = self._lr_tables[device] = _kernel.build_lr_table(
                [g["lr"] if isinstance(g["lr"], torch.Tensor) and g["lr"].device == device else None
                 for g in self.param_groups], device)
        return table

    def _triton_steps(self, tables, hypers, grad_scale, found_inf) -> None:
        """One step launch per launch set; with clipping, the global norm first (lrdist.fused_terms).

        The norm accumulator and arrival counters are zero between steps (the kernels clear them); a
        step that fails between launches clears them here, so the next step's norm is right."""
        try:
            extras = {}
            if self._ewc or self._row_masks or self.max_grad_norm is not None:
                extras = triton_extras(self, tables, grad_scale)
            for device, _, table in tables:
                hyper, lr_table = hypers[device]
                _kernel.fused_region_adamw(table, hyper, self._scales_on(device), grad_scale, found_inf,
                                           extras.get(device), lr_table)
        except BaseException:
            for device, ex in self._extras.items():
                with on_device(device):
                    ex.norm_acc.zero_()
                    ex.step_arrivals.zero_()
            for device, _, table in tables:
                with on_device(device):
                    table.arrivals.zero_()
            raise
