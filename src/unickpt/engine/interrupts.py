"""SIGINT and SIGTERM held while the main thread runs a save's or load's collectives.

Python raises a signal's exception (KeyboardInterrupt, or a SystemExit from a preemption
handler) on whatever line the main thread runs when the signal arrives: most often just after a
collective returns, since ranks spend most of a save waiting for each other there. Raised
between two collectives, it leaves the rank's peers waiting in the next one until the process
group's timeout, or pairs their collectives with this rank's later ones (a retry, an emergency
save), which garbles both. Held until the save or load ends, it is delivered on a rank whose
peers are in step, and the checkpoint is committed or not, the same for every rank.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

_HELD = (signal.SIGINT, signal.SIGTERM)
_holding = False  # the main thread is inside held_interrupts() (it nests: the outermost holds)


@contextlib.contextmanager
def held_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the block, then deliver the first one received to the
    handler that was in place. A second signal during the block is delivered at once: a peer
    that hangs must not make the process deaf to Ctrl-C. Only the main thread receives
    signals; elsewhere, and for signals ignored or handled outside Python, this does nothing.
    """
    global _holding
    if _holding or threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous: dict[int, Any] = {}

    def hold(signum: int, frame: FrameType | None) -> None:
        if received:  # the second: stop holding, and let it act now
            received.clear()
            _restore(previous)
            _deliver(signum, previous[signum], frame)
        else:
            received.append(signum)

    for signum in _HELD:
        handler = signal.getsignal(signum)
        if handler not in (signal.SIG_IGN, None):
            previous[signum] = handler
            signal.signal(signum, hold)
    _holding = True
    try:
        yield
    finally:
        _holding = False
        _restore(previous)
        if received:
            _deliver(received[0], previous[received[0]], None)


def _restore(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def _deliver(signum: int, handler: Any, frame: FrameType | None) -> None:
    """Act on ``signum`` as ``handler`` (already back in place) would have on its arrival."""
    if callable(handler):
        handler(signum, frame)  # Python's SIGINT handler raises KeyboardInterrupt
    else:  # SIG_DFL: the default action, usually the end of the process
        os.kill(os.getpid(), signum)
