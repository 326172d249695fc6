"""A trainer for tests/test_tiers.py to kill -9, and the states every tier test saves and checks.

``python tests/tier_trainer.py TIER [TIER ...]`` saves steps 1 and 2 with a
``CheckpointManager(TIERS, mode="async")``, prints ``committed <step>`` once each save is
committed on the fastest tier, then keeps "training" until killed. The test points the slower
tier at an endpoint that never answers, so the kill lands after the memory-tier commit and
before any drain finished.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

import unickpt

ROWS, COLS = 768, 1024  # 3 MiB of float32: several copy chunks and S3 parts once lowered


def full_state(step: int) -> dict[str, Any]:
    """The whole state saved at ``step`` (each step differs in every byte that matters)."""
    gen = torch.Generator().manual_seed(1000 + step)
    return {
        "w": torch.randn(ROWS, COLS, generator=gen),
        "b": torch.randn(33, generator=gen).to(torch.bfloat16),
        "loader": {"position": step * 10},
    }


def rank_state(step: int, rank: int, world: int) -> dict[str, Any]:
    """``rank``'s part of :func:`full_state`: rows of ``w`` split unevenly-safe, the rest
    replicated."""
    state = full_state(step)
    if world > 1:
        lo, hi = ROWS * rank // world, ROWS * (rank + 1) // world
        state["w"] = unickpt.ShardedTensor(state["w"][lo:hi].clone(), (ROWS, COLS), (lo, 0))
    return state


def blank_state(rank: int, world: int) -> dict[str, Any]:
    """Zeros laid out like :func:`rank_state`, for restoring into."""
    state = rank_state(0, rank, world)
    w = state["w"]
    if isinstance(w, unickpt.ShardedTensor):
        state["w"] = unickpt.ShardedTensor(
            torch.zeros_like(w.local), w.global_shape, w.global_offsets
        )
    else:
        state["w"] = torch.zeros_like(w)
    state["b"] = torch.zeros_like(state["b"])
    state["loader"] = {"position": -1}
    return state


def local_rows(state: dict[str, Any]) -> torch.Tensor:
    w = state["w"]
    return w.local if isinstance(w, unickpt.ShardedTensor) else w


def main() -> None:
    torch.set_num_threads(1)
    manager = unickpt.CheckpointManager(sys.argv[1:], every_n_steps=1, mode="async")
    for step in (1, 2):
        handle = manager.maybe_save(step, full_state(step))
        assert isinstance(handle, unickpt.SaveHandle)
        handle.wait()
        print(f"committed {step}", flush=True)
    while True:  # training goes on while the drain is stuck, until the test kills us
        time.sleep(0.1)


if __name__ == "__main__":
    main()
