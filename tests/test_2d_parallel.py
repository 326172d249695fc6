"""FSDP2 on top of tensor parallelism (a 2-D dp x tp mesh, `_StridedShard` placements)."""

from __future__ import annotations

import os

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import unickpt

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
