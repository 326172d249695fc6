"""Ordering host threads after the GPU work the caller queued.

Saves and loads copy between host and device memory on worker threads, whose current stream is
the default one; PyTorch's side streams do not synchronise with it. A caller that trains on a
side stream would have its state copied before its last update landed, or overwritten while
queued kernels still read it, unless those threads first wait for what the caller had queued.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

_HOST = frozenset({torch.device("cpu"), torch.device("meta")})


class DeviceWork:
    """The work queued on the caller's current stream of each device, as of :meth:`record`."""

    def __init__(self, events: list[torch.Event]) -> None:
        self._events = events

    @classmethod
    def record(cls, tensors: Iterable[torch.Tensor]) -> DeviceWork:
        """Mark, in the calling thread, the work queued so far on every device ``tensors`` use."""
        events = []
        for device in {t.device for t in tensors} - _HOST:
            event = torch.Event(device=device)
            event.record(torch.accelerator.current_stream(device))
            events.append(event)
        return cls(events)

    def wait(self) -> None:
        """Block until that work is done (from any thread)."""
        for event in self._events:
            event.synchronize()
