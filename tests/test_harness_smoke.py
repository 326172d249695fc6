from __future__ import annotations

import torch.distributed as dist

from dist_harness import run_distributed


def _rank_and_world(rank: int, world_size: int) -> tuple[int, int]:
    return dist.get_rank(), world_size


def test_harness_runs_every_rank() -> None:
    assert run_distributed(2, _rank_and_world) == [(0, 2), (1, 2)]
