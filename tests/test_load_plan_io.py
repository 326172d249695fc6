"""Bytes read by a resharding load are bounded by the bytes the rank needs.

A checkpoint saved at world 1 is loaded at world 2 into DTensor ``Shard(0)`` and ``Shard(1)``
layouts; one saved at world 2 (``Shard(0)``) is loaded at world 1. Each load is checked three
ways: ``LoadResult.bytes_needed`` is the local shard size, ``LoadResult.bytes_read`` is within 5%
of it, and the bytes the process actually read from the OS (``rchar`` in ``/proc/self/io``,
which also counts the manifest and the final status exchange) are within 10% plus 64 KiB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Shard, distribute_tensor

import unickpt

from dist_harness import run_distributed

SHAPES = {  # uneven on purpose: 2049 rows and 333 columns do not split evenly over 2 ranks
    "embed": (2049, 256),
    "proj.w": (1000, 333),
    "proj.b": (257, 64),
    "head": (64, 257),
}
MAX_READ_OVERHEAD = 1.05  # bytes_read / bytes_needed, as planned
MAX_OS_OVERHEAD = 1.10  # OS-level bytes read / bytes_needed ...
OS_SLACK = 64 * 1024  # ... plus the manifest and collectives

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/io"), reason="needs /proc/self/io (Linux)"
)


def expected(key: str) -> torch.Tensor:
    """The deterministic value of tensor ``key``, identical in every process."""
    seed = sorted(SHAPES).index(key)
    return torch.randn(SHAPES[key], generator=torch.Generator().manual_seed(seed))


def rchar() -> int:
    """Bytes this process has read through read-like system calls so far."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


@dataclass(frozen=True)
class ReadStats:
    layout: str
    bytes_read: int
    bytes_needed: int
    local_nbytes: int
    os_bytes: int

    def check(self) -> None:
        assert self.bytes_needed == self.local_nbytes, f"needed is not the local size: {self}"
        assert self.bytes_needed <= self.bytes_read <= MAX_READ_OVERHEAD * self.bytes_needed, (
            f"planned reads out of bounds: {self}"
        )
        assert self.os_bytes <= MAX_OS_OVERHEAD * self.bytes_needed + OS_SLACK, (
            f"the OS read too much: {self}"
        )


def load_and_measure(path: str, state: dict[str, torch.Tensor], layout: str) -> ReadStats:
    before = rchar()
    result = unickpt.load(path, state)
    os_bytes = rchar() - before
    local = [t.to_local() if isinstance(t, DTensor) else t for t in state.values()]
    return ReadStats(
        layout,
        result.bytes_read,
        result.bytes_needed,
        sum(t.numel() * t.element_size() for t in local),
        os_bytes,
    )


def load_resharded(
    rank: int, world_size: int, world1_path: str, world2_path: str
) -> list[ReadStats]:
    """Load ``world1_path`` as Shard(0) and as Shard(1), then save Shard(0) to ``world2_path``."""
    mesh = DeviceMesh("cpu", list(range(world_size)))
    stats = []
    for dim in (0, 1):
        placements: list[Placement] = [Shard(dim)]
        state = {
            key: distribute_tensor(torch.zeros(s), mesh, placements) for key, s in SHAPES.items()
        }
        stats.append(load_and_measure(world1_path, state, f"Shard({dim}) rank {rank}"))
        for key, value in state.items():
            want = torch.chunk(expected(key), world_size, dim)[rank]
            assert torch.equal(value.to_local(), want), f"Shard({dim}) rank {rank}: {key} differs"
    unickpt.save(
        world2_path,
        {key: distribute_tensor(expected(key), mesh, [Shard(0)]) for key in SHAPES},
    )
    return stats


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, ReadStats], str]:
    """One 2-rank run: the stats of its loads by layout, and the path of its world-2 save."""
    root = tmp_path_factory.mktemp("load_plan_io")
    world1, world2 = str(root / "world1"), str(root / "world2")
    unickpt.save(world1, {key: expected(key) for key in SHAPES})
    results = run_distributed(2, load_resharded, world1, world2)
    return {stats.layout: stats for per_rank in results for stats in per_rank}, world2


@pytest.mark.parametrize("dim", [0, 1])
def test_world1_to_world2_reads_only_the_local_shard(
    checkpoints: tuple[dict[str, ReadStats], str], dim: int
) -> None:
    stats, _ = checkpoints
    for rank in range(2):
        stats[f"Shard({dim}) rank {rank}"].check()


def test_world2_to_world1_reads_each_byte_once(
    checkpoints: tuple[dict[str, ReadStats], str],
) -> None:
    _, world2 = checkpoints
    assert len(unickpt.inspect(world2).files) == 2, "both ranks wrote their shards"
    state = {key: torch.zeros(shape) for key, shape in SHAPES.items()}
    stats = load_and_measure(world2, state, "world 2 Shard(0) -> world 1")
    stats.check()
    assert stats.bytes_read == stats.bytes_needed, f"each byte is read once: {stats}"
    for key, value in state.items():
        assert torch.equal(value, expected(key)), f"world 1 load of {key} differs"
