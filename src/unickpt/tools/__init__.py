"""Working with committed checkpoints: inspect, verify, garbage-collect."""

from unickpt.tools.gc import collect_garbage
from unickpt.tools.inspect import inspect
from unickpt.tools.verify import VerifyReport, verify

__all__ = ["VerifyReport", "collect_garbage", "inspect", "verify"]
