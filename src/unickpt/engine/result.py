"""What a save reports back."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SaveResult:
    """What one rank's save did: bytes it wrote, wall time, per-phase times, plan-cache use."""

    path: str
    step: int | None
    bytes_written: int
    seconds: float
    plan_cache_hit: bool
    phases: dict[str, float] = field(default_factory=dict)
