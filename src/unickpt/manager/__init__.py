"""Run-level checkpointing: schedule, retention, latest pointer, resume, RNG state."""

from unickpt.manager.manager import CheckpointInfo, CheckpointManager

__all__ = ["CheckpointInfo", "CheckpointManager"]
