"""Watch the staging pool: which buffers background saves allocate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from unickpt.engine import background


def count_pool_allocations(patch: Callable[[Any, str, Any], None] = setattr) -> list[int]:
    """Give background saves a fresh pool; the returned list fills with the size of every
    staging buffer allocated from now on. ``patch`` is ``setattr`` in a child process, pytest's
    ``monkeypatch.setattr`` in the test process (undone after the test)."""
    allocations: list[int] = []
    allocate = background._aligned_buffer

    def counted(nbytes: int) -> torch.Tensor:
        allocations.append(nbytes)
        return allocate(nbytes)

    patch(background, "POOL", background.StagingPool())
    patch(background, "_aligned_buffer", counted)
    return allocations
