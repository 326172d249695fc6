"""FSDP2 on top of tensor parallelism (a 2-D dp x tp mesh, `_StridedShard` placements), and
which box each rank holds under any DTensor placements."""

from __future__ import annotations

import itertools
import math
import os
from types import SimpleNamespace
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.distributed.tensor.placement_types import _StridedShard

import unickpt
from unickpt.layout.sharded import _dtensor_shard

from dist_harness import run_distributed


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(12, 22)
        self.down = torch.nn.Linear(22, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def _full(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, DTensor) else value


def _snapshot(model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optim.param_groups for p in g["params"]]
    out = {f"param.{n}": _full(t).detach().clone() for n, t in model.state_dict().items()}
    for index, entries in optim.state_dict()["state"].items():
        for key, value in entries.items():
            out[f"optim.{names[id(params[index])]}.{key}"] = _full(value).clone()
    return out


def _save_2d(rank: int, world_size: int, path: str) -> dict[str, torch.Tensor]:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = MLP()
    parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    placements = {str(p.placements) for p in model.parameters()}
    assert any("_S" in p or "StridedShard" in p for p in placements), placements
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    for _ in range(2):
        model(torch.randn(4, 12)).pow(2).sum().backward()
        optim.step()
        optim.zero_grad()
    unickpt.save(path, {"model": model, "optim": optim})
    return _snapshot(model, optim)


def _load_fsdp(rank: int, world_size: int, path: str) -> dict[str, torch.Tensor]:
    model = MLP()
    fully_shard(model)
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    unickpt.load(path, {"model": model, "optim": optim})
    return _snapshot(model, optim)


def test_fsdp_over_tp_roundtrips_to_any_layout(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(os.fspath(tmp_path), "ckpt")
    reference = run_distributed(4, _save_2d, path)[0]
    unickpt.verify(path)

    model = MLP()
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    unickpt.load(path, {"model": model, "optim": optim})
    single = _snapshot(model, optim)
    fsdp = run_distributed(2, _load_fsdp, path)[0]
    for name, layout in (("world 1 plain", single), ("world 2 FSDP2", fsdp)):
        assert layout.keys() == reference.keys(), name
        for key, expected in reference.items():
            assert torch.equal(layout[key], expected), f"{name}: {key} differs"


class _Mesh:
    """The part of a DeviceMesh the layout code reads, seen from one coordinate."""

    mesh_dim_names = None

    def __init__(self, shape: tuple[int, ...], coordinate: tuple[int, ...]) -> None:
        self.shape, self._coordinate = shape, coordinate

    def size(self, mesh_dim: int) -> int:
        return self.shape[mesh_dim]

    def get_coordinate(self) -> list[int]:
        return list(self._coordinate)


def _torch_local(
    full: torch.Tensor, mesh: tuple[int, ...], placements: list[Any], coordinate: tuple[int, ...]
) -> torch.Tensor:
    """What torch's own placements give the rank at ``coordinate`` (as distribute_tensor)."""
    local = full
    for mesh_dim, placement in enumerate(placements):
        if not isinstance(placement, Replicate):
            pieces, _ = placement._split_tensor(local, mesh[mesh_dim], with_padding=False)
            local = pieces[coordinate[mesh_dim]]
    return local


@st.composite
def _layouts(draw: Any) -> tuple[tuple[int, ...], tuple[int, ...], list[Any]]:
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim)))
    mesh = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    kinds = [draw(st.sampled_from(["R", "S", "SS"])) for _ in mesh]
    dims = [draw(st.integers(-ndim, ndim - 1)) for _ in mesh]
    placements: list[Any] = []
    for m, (kind, dim) in enumerate(zip(kinds, dims, strict=True)):
        if kind == "R":
            placements.append(Replicate())
        elif kind == "S":
            placements.append(Shard(dim))
        else:  # FSDP2's split factor: the later Shards' pieces on that dim, or a wrong one
            later = math.prod(
                mesh[k]
                for k in range(m + 1, len(mesh))
                if kinds[k] == "S" and dims[k] % ndim == dim % ndim
            )
            placements.append(_StridedShard(dim, split_factor=draw(st.sampled_from([later, 2]))))
    return shape, mesh, placements


@settings(max_examples=300, deadline=None)
@given(_layouts())
def test_dtensor_boxes_follow_torch_placement_semantics(
    layout: tuple[tuple[int, ...], tuple[int, ...], list[Any]],
) -> None:
    """Each rank's box holds exactly what torch's placements give it, or the layout is refused:
    never a wrong box (some _StridedShard layouts loaded permuted). Plain Shard/Replicate
    layouts are never refused."""
    shape, mesh, placements = layout
    full = torch.arange(math.prod(shape)).reshape(shape)
    strided = any(isinstance(p, _StridedShard) and p.split_factor > 1 for p in placements)
    for coordinate in itertools.product(*(range(n) for n in mesh)):
        local = _torch_local(full, mesh, placements, coordinate)
        dtensor = SimpleNamespace(
            placements=tuple(placements),
            shape=torch.Size(shape),
            device_mesh=_Mesh(mesh, coordinate),
            to_local=lambda local=local: local,
        )
        try:
            shard = _dtensor_shard(dtensor, key="x")  # type: ignore[arg-type]
        except unickpt.InvalidStateError:
            assert strided, placements
            continue
        assert torch.equal(full[shard.box.slices()], local), (coordinate, shard.box)


def _outside_the_mesh(rank: int, world_size: int, path: str) -> list[float]:
    mesh = DeviceMesh("cpu", [0, 1])  # rank 2 is in no shard of it
    full = torch.arange(15.0).reshape(5, 3)
    unickpt.save(path, {"x": distribute_tensor(full, mesh, [Shard(0)])})
    target = distribute_tensor(torch.zeros(5, 3), mesh, [Shard(0)])
    unickpt.load(path, {"x": target})
    return target.to_local().flatten().tolist()


def test_a_mesh_without_some_ranks_saves_and_loads(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(os.fspath(tmp_path), "c")
    locals_ = run_distributed(3, _outside_the_mesh, path)
    assert locals_ == [[0.0, 1, 2, 3, 4, 5, 6, 7, 8], [9.0, 10, 11, 12, 13, 14], []]
    loaded = {"x": torch.zeros(5, 3)}
    unickpt.load(path, loaded)
    assert torch.equal(loaded["x"], torch.arange(15.0).reshape(5, 3))
