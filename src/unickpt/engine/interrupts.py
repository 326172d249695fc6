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
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

_HELD = (signal.SIGINT, signal.SIGTERM)
_HELD_NOTICE = (
    "unickpt: {} held until this checkpoint operation ends, so that all ranks stay in step; "
    "send it again to interrupt it (a save is then not committed)\n"
)
_holding = False  # the main thread is inside held_interrupts() (it nests: the outermost holds)


@contextlib.contextmanager
def held_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the block, then deliver the first one received to the
    Python handler that was in place. A second signal during the block is delivered as soon as
    the main thread runs Python again (a collective blocked in C++ delays it, as it delays any
    Python handler). Only the main thread receives signals. Signals without a Python handler
    (SIGTERM's default kills the process at once, leaving no rank half-way) are not held, and
    a handler the block itself installs is kept.
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
            _restore(previous, hold)
            previous[signum](signum, frame)
        else:
            received.append(signum)
            # Otherwise a Ctrl-C during a minutes-long save looks ignored. Not logged: a logging
            # handler could wait on a lock the interrupted main thread holds, where a stream
            # refuses a reentrant write (suppressed). Not os.write(2): with stderr closed, fd 2
            # may be a checkpoint's data file.
            if sys.stderr is not None:
                with contextlib.suppress(Exception):
                    sys.stderr.write(_HELD_NOTICE.format(signal.Signals(signum).name))
                    sys.stderr.flush()

    try:
        for signum in _HELD:
            handler = signal.getsignal(signum)
            if callable(handler):
                signal.signal(signum, hold)
                previous[signum] = handler
    except (ValueError, OSError):  # cannot install handlers here (finalizing, say): hold none
        _restore(previous, hold)
        previous.clear()
    _holding = True
    try:
        yield
    finally:
        _holding = False
        _restore(previous, hold)
        if received:  # Python's SIGINT handler raises KeyboardInterrupt
            previous[received[0]](received[0], None)


def _restore(previous: dict[int, Any], hold: Any) -> None:
    """Put back the handlers ``hold`` replaced, where it is still in place."""
    for signum, handler in previous.items():
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signum) is hold:
                signal.signal(signum, handler)
