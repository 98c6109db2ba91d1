"""What this rank holds of a sharded parameter (a ``DTensor``, e.g. under FSDP2), and sums across ranks.

FusedRegionAdamW steps the local shard of every DTensor: the region table is per tensor, so a shard
keeps its region and the kernel needs no new idea. Its state takes the param's placement (as
``torch.optim.AdamW``'s does), so ``torch.distributed.checkpoint`` saves and reshards it. What must be
global (the clipping norm) is summed over the mesh dims a tensor is *sharded* on, never over the dims it
is replicated on (HSDP), where every rank holds a copy. Plain tensors (DDP) are whole on every rank.
"""
from __future__ import annotations

import torch

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
except ImportError:  # a torch built without distributed: nothing is ever sharded
    DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """The tensor this rank steps: a DTensor's local shard (the same memory), else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def layout(t) -> tuple | None:
    """(mesh, placements) of a DTensor, None for a plain tensor."""
    return (t.device_mesh, tuple(t.placements)) if is_dtensor(t) else None


def describe(lay) -> str:
    return "a plain tensor" if lay is None else f"a DTensor placed {list(lay[1])} on mesh {tuple(lay[0].shape)}"


def mesh_of(t):
    return t.device_mesh if is_dtensor(t) else None


def shard_key(t) -> tuple | None:
    """(mesh, the mesh dims ``t`` is sharded on), or None when every rank holds all of ``t``: a sum over
    ``t``'s elements is complete after an all-reduce over exactly those dims."""
    if not is_dtensor(t):
        return None
    dims = tuple(d for d, placement in enumerate(t.placements) if placement.is_shard())
    return (t.device_mesh, dims) if dims else None


def sum_over_shards(total: torch.Tensor, key) -> None:
    """All-reduce ``total`` (in place, a sum) over the sharded mesh dims of ``key`` (see shard_key)."""
    if key is not None:
        mesh, dims = key
        for d in dims:
            dist.all_reduce(total, group=mesh.get_group(d))


def unsupported_placement(t) -> str | None:
    """Why the optimizer cannot step DTensor ``t`` (a Partial placement: pending sums), or None."""
    if is_dtensor(t):
        bad = [p for p in t.placements if not (p.is_shard() or p.is_replicate())]
        if bad:
            return f"a DTensor parameter placed {list(t.placements)}: only Shard and Replicate placements can step"
    return None


def local_rows(p, keep: torch.Tensor) -> torch.Tensor:
    """The part of a per-row vector (one value per row of ``p``'s global shape) that belongs to this
    rank's shard of ``p``: sharded like ``p``'s dim 0, whole where ``p`` is replicated or sharded on
    other dims. No communication: every rank slices its own copy."""
    if not is_dtensor(p):
        return keep
    rows = [placement if placement.is_shard(0) else Replicate() for placement in p.placements]
    return distribute_tensor(keep, p.device_mesh, rows, src_data_rank=None).to_local()


def any_on_a_rank(flag: bool, tensors: list) -> bool:
    """Whether ``flag`` holds on any rank of the meshes of the DTensors in ``tensors`` (one all-reduce per
    mesh dim; no communication without DTensors), so every rank raises on a bad value in one rank's shard."""
    meshes = {t.device_mesh: t for t in tensors if is_dtensor(t)}
    count = None
    for mesh, t in meshes.items():
        if count is None:
            count = torch.tensor([float(flag)], device=local(t).device)
        for d in range(mesh.ndim):
            dist.all_reduce(count, group=mesh.get_group(d))
    return flag if count is None else bool(count.item() > 0)


def whole(t):
    """A DTensor as the full tensor on every rank (a reduction's result: summed over the shards); a plain
    tensor as it is. Differentiable."""
    return t.full_tensor() if is_dtensor(t) else t
