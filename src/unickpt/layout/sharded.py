"""Where a rank's local data sits globally: DTensor placements, ShardedTensors, plain tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from unickpt.errors import InvalidStateError
from unickpt.layout.box import Box


class ShardedTensor:
    """A rank's shard of a larger tensor, for hand-rolled TP/PP layouts.

    ``local`` holds the elements ``global_offsets[d] : global_offsets[d] + local.shape[d]`` of a
    tensor of ``global_shape``. Ranks holding identical boxes are replicas: the box is written once.
    On load, ``local`` is filled in place.
    """

    def __init__(
        self, local: torch.Tensor, global_shape: Sequence[int], global_offsets: Sequence[int]
    ) -> None:
        shape = tuple(int(s) for s in global_shape)
        if not len(global_offsets) == local.dim() == len(shape):
            raise InvalidStateError(
                f"ShardedTensor: local shape {list(local.shape)}, global shape {list(shape)} "
                f"and offsets {list(global_offsets)} must have as many dimensions"
            )
        box = Box.of(global_offsets, local.shape)
        if not box.within(shape):
            raise InvalidStateError(
                f"ShardedTensor: local shape {list(local.shape)} at offsets "
                f"{list(global_offsets)} does not fit in global shape {list(shape)}"
            )
        self.local = local
        self.global_shape = shape
        self.global_offsets = box.offsets

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    def __repr__(self) -> str:
        return (
            f"ShardedTensor(local={tuple(self.local.shape)}, global_shape={self.global_shape}, "
            f"global_offsets={self.global_offsets}, dtype={self.local.dtype})"
        )


@dataclass
class LocalShard:
    """A rank's view of one global tensor: its local data and the global box that data covers."""

    local: torch.Tensor
    global_shape: tuple[int, ...]
    box: Box
    mesh: dict[str, Any] | None = None  # the DTensor mesh, for the writer's layout record


def is_tensor_leaf(value: object) -> bool:
    return isinstance(value, torch.Tensor | ShardedTensor)


def local_shard(value: torch.Tensor | ShardedTensor, *, key: str) -> LocalShard:
    """The rank-local shard of a tensor leaf; a plain tensor is a full, replicated box."""
    if isinstance(value, ShardedTensor):
        _check_dense(value.local, key)
        return LocalShard(
            value.local, value.global_shape, Box.of(value.global_offsets, value.local.shape)
        )
    _check_dense(value, key)
    if isinstance(value, DTensor):
        return _dtensor_shard(value, key=key)
    return LocalShard(value, tuple(value.shape), Box.full(value.shape))


def _check_dense(tensor: torch.Tensor, key: str) -> None:
    """Shards move as the bytes of a dense tensor: refuse any other kind, naming it."""
    if tensor.is_nested or tensor.layout != torch.strided:
        kind = "nested" if tensor.is_nested else str(tensor.layout).removeprefix("torch.")
        raise InvalidStateError(
            f"tensor {key!r} is a {kind} tensor; only dense (strided) tensors are supported: "
            "convert it (e.g. .to_dense()) or keep its parts as separate tensors"
        )
    if tensor.device.type == "meta":
        raise InvalidStateError(
            f"tensor {key!r} is on the meta device and has no data; materialise it first "
            "(e.g. module.to_empty(device=...))"
        )


def _placement_order(value: DTensor, key: str) -> list[tuple[int, int]]:
    """(mesh dim, tensor dim) of each sharding placement, in the order the shards nest.

    ``Shard`` placements nest left to right. FSDP2 over a TP-sharded dimension marks its shard
    ``_StridedShard(d, split_factor=k)``: the tensor was cut by the later ``Shard(d)``
    placements (``k`` pieces in all) first, so it nests right after the last of them — and each
    rank still holds a single box. A split factor of 1 is a plain ``Shard``.
    """
    ndim = len(value.shape)
    placements = value.placements
    order: list[tuple[int, int]] = []
    after: dict[int, tuple[int, int]] = {}  # mesh dim of a Shard -> the strided shard after it
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Shard):
            order.append((mesh_dim, placement.dim % ndim))
            if mesh_dim in after:
                order.append(after.pop(mesh_dim))
        elif isinstance(placement, _StridedShard):
            dim = placement.dim % ndim
            if placement.split_factor == 1:
                order.append((mesh_dim, dim))
                continue
            later = [
                m
                for m, p in enumerate(placements)
                if m > mesh_dim and isinstance(p, Shard) and p.dim % ndim == dim
            ]
            others = [
                p
                for m, p in enumerate(placements)
                if m != mesh_dim and isinstance(p, _StridedShard) and p.dim % ndim == dim
            ]
            pieces = int(placement.split_factor) * int(value.device_mesh.size(mesh_dim))
            if (
                not later
                or others
                or placement.split_factor != math.prod(value.device_mesh.size(m) for m in later)
                # Torch cuts uneven strided pieces unlike nested chunks once several Shards
                # follow; FSDP2 over TP (one follows) nests like chunks at any size.
                or (len(later) > 1 and int(value.shape[dim]) % pieces != 0)
            ):
                raise InvalidStateError(
                    f"tensor {key!r}: placements {list(placements)} do not describe one box "
                    "per rank that unickpt knows how to place"
                )
            after[later[-1]] = (mesh_dim, dim)
        elif not isinstance(placement, Replicate):
            raise InvalidStateError(
                f"tensor {key!r}: DTensor placement {placement} is not supported; "
                "use Shard(d) or Replicate() (reduce Partial placements before saving)"
            )
    return order


def _dtensor_shard(value: DTensor, *, key: str) -> LocalShard:
    mesh = value.device_mesh
    shape = tuple(int(s) for s in value.shape)
    local = value.to_local()
    coordinate = mesh.get_coordinate()
    offsets = [0] * len(shape)
    sizes = list(shape)
    if coordinate is None:  # this rank is not in the mesh: it holds nothing
        if not shape:
            raise InvalidStateError(
                f"tensor {key!r}: a 0-d DTensor on a mesh without this rank is not supported "
                "(an empty part of a scalar has no box); put it on a mesh of every rank"
            )
        sizes = [0] * len(shape)
    else:
        for mesh_dim, dim in _placement_order(value, key):
            # torch.chunk semantics: ceil-sized pieces, the tail possibly short or empty.
            parts = mesh.size(mesh_dim)
            piece = -(-sizes[dim] // parts)
            lo = min(piece * coordinate[mesh_dim], sizes[dim])
            hi = min(lo + piece, sizes[dim])
            offsets[dim] += lo
            sizes[dim] = hi - lo
    if local.numel() == 0 == math.prod(sizes):  # torch shapes empty pieces its own way (1-d
        local = local.new_empty(sizes)  # outside the mesh; [0, 0] for FSDP2's [N, 0] shards)
    if tuple(local.shape) != tuple(sizes):
        raise InvalidStateError(
            f"tensor {key!r}: DTensor local shape {list(local.shape)} differs from the shard "
            f"{sizes} its placements {list(value.placements)} imply"
        )
    mesh_info = {"shape": list(mesh.shape), "dim_names": list(mesh.mesh_dim_names or [])}
    return LocalShard(local, shape, Box(tuple(offsets), tuple(sizes)), mesh_info)
