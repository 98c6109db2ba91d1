"""FusedRegionAdamW: AdamW with a per-region learning-rate table, as a drop-in ``torch.optim`` optimizer.

Each param group may carry ``"region": int``; a tensor's effective LR is
``group["lr"] * region_scales[group["region"]]``. The region table is a device tensor, so changing the
distribution (``set_region_scales``) or the scheduler's LR changes no kernel and costs no host sync.

Backends:
* ``"triton"``: one kernel launch per (device, dtype, amsgrad) for all tensors of all groups
  (``lrdist.kernels.fused_region_adamw``). Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1``.
* ``"torch"``: torch's own fused AdamW op (``torch.optim.adamw.adamw(fused=True)``) once per param group,
  which has a fast CPU kernel; torch's foreach path on devices without a fused kernel.
* ``"auto"``: Triton for CUDA tensors when Triton works, otherwise torch.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import replace
from typing import Iterable

import torch
from torch.optim.adamw import adamw as _torch_adamw
from torch.optim.optimizer import _get_fused_kernels_supported_devices

try:
    from lrdist.kernels import fused_region_adamw as _kernel
    _TRITON_ERROR = None
except Exception as exc:  # Triton missing or broken: the torch path still works.
    _kernel = None
    _TRITON_ERROR = exc

BACKENDS = ("auto", "triton", "torch")
_MAX_CACHED_TABLES = 8  # launch sets differ when some grads are None (e.g. other tasks' heads)


def triton_available() -> bool:
    return _kernel is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_scales(values, num_regions: int | None) -> torch.Tensor:
    """Validate a region scale table on the host; return it as a 1-D float64 CPU tensor."""
    # Lists parse straight to float64: via float32, 0.3 would become 0.30000001.
    t = values.detach() if isinstance(values, torch.Tensor) else torch.as_tensor(values, dtype=torch.float64)
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


def _copy_to(dst: torch.Tensor, host: torch.Tensor) -> None:
    """Overwrite a device table in place from host values without a host sync."""
    if dst.device.type == "cuda":
        host = host.pin_memory()  # the caching host allocator keeps it alive until the copy ran
    dst.copy_(host, non_blocking=True)


class FusedRegionAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with per-region LR scales, fused over all tensors."""

    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale / found_inf

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, amsgrad: bool = False, maximize: bool = False,
                 region_scales=None, backend: str = "auto", block_size: int | None = None,
                 max_grad_norm: float | None = None):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("a Tensor lr must have one element")
        if not 0.0 <= lr:
            raise ValueError(f"invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"invalid epsilon value: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}: each must lie in [0, 1)")
        if not 0.0 <= weight_decay:
            raise ValueError(f"invalid weight_decay value: {weight_decay}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "triton" and _kernel is None:
            raise RuntimeError(f"backend='triton' but the Triton kernel cannot be imported: {_TRITON_ERROR}")
        self.backend = backend
        self.block_size = block_size or (_kernel.DEFAULT_BLOCK if _kernel else 2048)
        self._num_regions: int | None = None  # known once all groups are in
        # Bumped whenever an address the device tables hold may change (new or loaded state, EWC
        # buffers, row-mask buffers): part of the table cache key.
        self._tables_version = 0
        self._ewc: dict = {}        # param -> (fisher, anchor): persistent buffers the kernel reads
        self._ewc_lambda = 0.0
        self._row_masks: dict = {}  # param -> float32 [rows] (MIGU), persistent
        self._extras: dict = {}     # device -> StepExtras
        self.max_grad_norm = max_grad_norm
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, region=0)
        super().__init__(params, defaults)

        n = 1 + max(g["region"] for g in self.param_groups)
        scales = _check_scales(region_scales if region_scales is not None else [1.0] * n, None)
        self._install_scales(scales)

    # ---- region table -------------------------------------------------------------------------
    def _install_scales(self, scales: torch.Tensor) -> None:
        too_high = [g["region"] for g in self.param_groups if g["region"] >= scales.numel()]
        if too_high:
            raise ValueError(f"region {max(too_high)} is out of range for {scales.numel()} region "
                             f"scales; pass region_scales with at least {max(too_high) + 1} values")
        self._num_regions = scales.numel()
        device = self.param_groups[0]["params"][0].device
        self._scales = {device: scales.to(device)}  # device -> float64 [R]; first one is canonical
        self._tables: OrderedDict = OrderedDict()
        self._hyper: dict = {}

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
        once to validate it.
        """
        host = _check_scales(values, self._num_regions)
        for table in self._scales.values():
            _copy_to(table, host)

    def _scales_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._scales:
            self._scales[device] = self.region_scales.to(device)
        return self._scales[device]

    # ---- fused extras: EWC, MIGU row masks, clipping -------------------------------------------------
    def set_ewc(self, fisher: dict, anchor: dict, lam: float) -> None:
        """Add ``2 lam F (p - anchor)`` to each listed param's grad inside the step (EWC's penalty
        gradient for ``lam * sum F (p - anchor)^2``). ``fisher``/``anchor`` map params to tensors."""
        if lam < 0:
            raise ValueError(f"EWC lambda must be >= 0, got {lam}")
        known = {p for g in self.param_groups for p in g["params"]}
        for p in fisher:
            if p not in known or p not in anchor:
                raise ValueError("set_ewc: every Fisher tensor needs an anchor and a parameter of this optimizer")
            if fisher[p].shape != p.shape or anchor[p].shape != p.shape:
                raise ValueError(f"set_ewc: Fisher/anchor shapes must equal the parameter's {tuple(p.shape)}")
        self._ewc = {p: (fisher[p].detach().to(p.device, p.dtype).contiguous().clone(),
                         anchor[p].detach().to(p.device, p.dtype).contiguous().clone()) for p in fisher}
        self._ewc_lambda = float(lam)
        for extras in self._extras.values():
            extras.ewc_lambda.fill_(self._ewc_lambda)
        self._tables_version += 1

    def clear_ewc(self) -> None:
        self._ewc = {}
        self._tables_version += 1

    def set_row_masks(self, masks: dict) -> None:
        """MIGU: per listed weight, a vector over its output rows (1 keeps a row's grad, 0 zeroes it),
        applied inside the step. Params left out are unmasked. Buffers persist: no table rebuild."""
        rebuild = False
        for p, keep in masks.items():
            if keep.numel() != p.shape[0]:
                raise ValueError(f"a row mask needs {p.shape[0]} values (the rows of a {tuple(p.shape)} "
                                 f"weight), got {keep.numel()}")
            buf = self._row_masks.get(p)
            if buf is None:
                buf = self._row_masks[p] = torch.empty(p.shape[0], dtype=torch.float32, device=p.device)
                rebuild = True
            buf.copy_(keep.reshape(-1), non_blocking=True)
        for p, buf in self._row_masks.items():
            if p not in masks:
                buf.fill_(1.0)
        if rebuild:
            self._tables_version += 1

    def clear_row_masks(self) -> None:
        self._row_masks = {}
        self._tables_version += 1

    @property
    def max_grad_norm(self) -> float | None:
        """Clip the global grad norm to this inside the step (None: no clipping)."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float | None) -> None:
        if value is not None and not value > 0:
            raise ValueError(f"max_grad_norm must be positive, got {value}")
        self._max_grad_norm = value
        for extras in self._extras.values():  # the device copy follows, so steps need not check it
            extras.max_grad_norm.fill_(value or 0.0)

    @property
    def last_grad_norm(self) -> torch.Tensor | None:
        """The global grad norm of the last step (a device tensor; with max_grad_norm set)."""
        if not self._extras:
            return None
        return next(iter(self._extras.values())).norm_out[0]

    def _step_extras(self, device: torch.device):
        extras = self._extras.get(device)
        if extras is None:
            f64 = dict(dtype=torch.float64, device=device)
            extras = self._extras[device] = _kernel.StepExtras(
                ewc_lambda=torch.full((1,), self._ewc_lambda, **f64),
                max_grad_norm=torch.full((1,), self._max_grad_norm or 0.0, **f64),
                norm_acc=torch.zeros(1, **f64),
                norm_out=torch.zeros(1, dtype=torch.float32, device=device),
                step_arrivals=torch.zeros(1, dtype=torch.int32, device=device))
        return extras

    # ---- param groups ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        region = group["region"]
        if isinstance(region, bool) or not isinstance(region, int) or region < 0:
            raise ValueError(f"param group 'region' must be a non-negative int, got {region!r}")
        if self._num_regions is not None and region >= self._num_regions:
            self.param_groups.pop()
            raise ValueError(f"region {region} is out of range: the optimizer has "
                             f"{self._num_regions} region scales")
        for p in group["params"]:
            if p.is_complex():
                raise TypeError("FusedRegionAdamW does not support complex parameters")
            if not p.is_floating_point():
                raise TypeError(f"FusedRegionAdamW needs floating-point parameters, got {p.dtype}")
        if hasattr(self, "_hyper"):
            self._hyper.clear()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)

    # ---- state dict -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["region_scales"] = self.region_scales.detach().cpu().clone()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads our own state dicts and ``torch.optim.AdamW``'s (keeping our groups' regions)."""
        regions = [g["region"] for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, region in zip(self.param_groups, regions):
            group.setdefault("region", region)
        for p, state in self.state.items():
            if "step" in state:  # torch keeps step on the CPU unless fused/capturable
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device).reshape(())
        self._tables_version += 1
        scales = state_dict.get("region_scales")
        self._install_scales(_check_scales(scales if scales is not None else self.region_scales, None))

    def reset_state(self) -> None:
        """Forget all moments and step counts (a fresh run), keeping groups and the region table."""
        self.state.clear()
        self._tables_version += 1
        self._tables.clear()

    # ---- step -----------------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, amsgrad: bool) -> dict:
        state = self.state[p]
        if not state:
            self._tables_version += 1
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if amsgrad and "max_exp_avg_sq" not in state:
            self._tables_version += 1
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
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

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)

        launch_sets: dict = {}  # (device, dtype, amsgrad) -> list of (group index, param, grad, state)
        torch_batches = []      # (group, [(param, grad, state)])
        triton_on: dict = {}    # device -> whether its tensors take the Triton path
        for gi, group in enumerate(self.param_groups):
            batch = []
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("FusedRegionAdamW does not support sparse gradients")
                if grad.device != p.device:
                    raise RuntimeError(f"a gradient is on {grad.device} but its parameter on {p.device}")
                state = self._init_state(p, group["amsgrad"])
                if p.device not in triton_on:
                    triton_on[p.device] = self._use_triton(p.device)
                if triton_on[p.device] and _contiguous(p, grad, state):
                    launch_sets.setdefault((p.device, p.dtype, group["amsgrad"]), []).append((gi, p, grad, state))
                else:
                    batch.append((p, grad, state))
            if batch:
                torch_batches.append((group, batch))
        fused_terms = self.max_grad_norm is not None or self._ewc or self._row_masks
        if fused_terms and launch_sets and torch_batches:
            raise RuntimeError("max_grad_norm, EWC and row masks need every tensor on one path: some tensors "
                               "are not contiguous (Triton path) or not on CUDA; use backend='torch'")
        if fused_terms and len({key[0] for key in launch_sets} | {b[0][0].device for _, b in torch_batches}) > 1:
            raise RuntimeError("max_grad_norm, EWC and row masks need all parameters on one device")
        if torch_batches:
            if fused_terms:
                grad_scale = self._torch_terms(torch_batches, grad_scale)
            for group, batch in torch_batches:
                self._torch_step(group, batch, grad_scale, found_inf)
        if launch_sets:
            self._triton_steps(launch_sets, grad_scale, found_inf)
        return loss

    @torch.no_grad()
    def _torch_terms(self, torch_batches, grad_scale):
        """The fused terms on the torch path, in the kernel's order: unscale, row mask, EWC, clip.

        Applied to ``.grad`` in place (as ``clip_grad_norm_`` does). Returns the grad_scale left to apply."""
        items = [(p, g) for _, batch in torch_batches for p, g, _ in batch]
        grads = [g for _, g in items]
        if grad_scale is not None:
            torch._foreach_div_(grads, grad_scale)
            grad_scale = None
        for p, g in items:
            keep = self._row_masks.get(p)
            if keep is not None:
                g.mul_(keep.to(g.dtype).view(-1, *([1] * (g.dim() - 1))))
        ewc = [(p, g, self._ewc[p]) for p, g in items if p in self._ewc]
        if ewc:  # grads += 2 lam F (p - anchor), as foreach ops
            diffs = torch._foreach_sub([p.detach() for p, _, _ in ewc], [pair[1] for _, _, pair in ewc])
            torch._foreach_mul_(diffs, [pair[0] for _, _, pair in ewc])
            torch._foreach_add_([g for _, g, _ in ewc], diffs, alpha=2.0 * self._ewc_lambda)
        if self.max_grad_norm is not None:  # as clip_grad_norm_: per-tensor norms, then their norm
            extras = self._step_extras(items[0][0].device)
            norm = torch.linalg.vector_norm(torch.stack([n.double() for n in torch._foreach_norm(grads)]))
            torch._foreach_mul_(grads, (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0).to(grads[0].dtype))
            extras.norm_out.copy_(norm.reshape(1))
        return grad_scale

    def _torch_step(self, group, batch, grad_scale, found_inf) -> None:
        params, grads, states = zip(*batch)
        device = params[0].device
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
            list(params), list(grads), [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
            [s["step"] for s in states], fused=fused, foreach=None if fused else True,
            grad_scale=grad_scale, found_inf=found_inf, amsgrad=group["amsgrad"], beta1=beta1,
            beta2=beta2, lr=lr, weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=group["maximize"])

    def _hyper_table(self, device: torch.device) -> torch.Tensor:
        """Per-group [lr, beta1, beta2, eps, weight_decay, sign] as a float64 device table.

        Rewritten only when a value changed (e.g. the scheduler moved the LR). A Tensor lr is copied
        on the device, so a captured graph picks up ``lr.fill_(...)``.
        """
        rows, tensor_lrs = [], []
        for gi, g in enumerate(self.param_groups):
            lr = g["lr"]
            if isinstance(lr, torch.Tensor):
                tensor_lrs.append((gi, lr))
                lr = 0.0
            rows.append((float(lr), float(g["betas"][0]), float(g["betas"][1]), float(g["eps"]),
                         float(g["weight_decay"]), -1.0 if g["maximize"] else 1.0))
        cached = self._hyper.get(device)
        if cached is None or cached[0] != rows:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("an LR or hyperparameter changed during CUDA graph capture: "
                                   "use Tensor lrs (group['lr'] = torch.tensor(..., device='cuda'))")
            table = cached[1] if cached is not None and len(cached[0]) == len(rows) else \
                torch.empty(len(rows), _kernel.N_HYPER, dtype=torch.float64, device=device)
            _copy_to(table, torch.tensor(rows, dtype=torch.float64))
            self._hyper[device] = cached = (rows, table)
        table = cached[1]
        for gi, lr in tensor_lrs:
            table[gi, _kernel.LR].copy_(lr.reshape(()), non_blocking=True)
        return table

    def _table(self, device, amsgrad, items):
        # The addresses (and the tables version) decide whether the device tables are still valid.
        key = (device, amsgrad, self._tables_version, tuple((gi, self.param_groups[gi]["region"], p.data_ptr(),
                                                              g.data_ptr(), s["exp_avg"].data_ptr())
                                                             for gi, p, g, s in items))
        table = self._tables.get(key)
        if table is None:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("FusedRegionAdamW: grads or states moved during CUDA graph capture. Take a "
                                   "warm-up step first and keep grads in place (zero_grad(set_to_none=False))")
            gis, params, grads, states = zip(*items)
            ewc = [self._ewc.get(p) for p in params]
            table = _kernel.build_table(
                params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["max_exp_avg_sq"] for s in states] if amsgrad else None,
                [s["step"] for s in states], list(gis), [self.param_groups[gi]["region"] for gi in gis], amsgrad,
                self.block_size, fishers=[e[0] if e else None for e in ewc], anchors=[e[1] if e else None for e in ewc],
                row_masks=[self._row_masks.get(p) for p in params])
            self._tables[key] = table
            if len(self._tables) > _MAX_CACHED_TABLES:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return table

    def _triton_steps(self, launch_sets, grad_scale, found_inf) -> None:
        """One step launch per (device, dtype, amsgrad); with clipping, a norm launch before each."""
        tables = [(device, self._table(device, amsgrad, items)) for (device, _, amsgrad), items in launch_sets.items()]
        hypers = {device: self._hyper_table(device) for device, _ in tables}  # once per device
        extras = {}
        if self._ewc or self._row_masks or self.max_grad_norm is not None:
            for device in hypers:
                ex = self._step_extras(device)
                if self.max_grad_norm is None:
                    ex = replace(ex, max_grad_norm=None)  # the kernel's clipping stays off
                else:  # the global norm of this step, summed over every launch set of the device
                    mine = [table for d, table in tables if d == device]
                    ex.step_programs = sum(table.n_blocks for table in mine)
                    for table in mine:
                        _kernel.grad_sumsq(table, ex, grad_scale)
                extras[device] = ex
        for device, table in tables:
            _kernel.fused_region_adamw(table, hypers[device], self._scales_on(device), grad_scale, found_inf,
                                       extras.get(device))


def _contiguous(p, grad, state) -> bool:
    """The kernel walks memory linearly: all four tensors must be contiguous."""
    return (p.is_contiguous() and grad.is_contiguous() and state["exp_avg"].is_contiguous()
            and state["exp_avg_sq"].is_contiguous())
