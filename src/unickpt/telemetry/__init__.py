"""Where the time goes: per-phase timers that every layer may use (this package imports none)."""

from unickpt.telemetry.phases import PhaseTimer

__all__ = ["PhaseTimer"]
