"""Background jobs that run one after another, each on its own non-daemon thread.

Background saves and the manager's drains both need this: their jobs run collectives on a
process group of their own, so they must run one at a time, in the order every rank submitted
them. A thread per job (joining its predecessor first) instead of a resident worker: nothing
lingers when there is nothing to do.

Two process-wide hooks serve every chain. At interpreter exit, pending jobs finish before
``concurrent.futures`` stops its thread pools taking work (a job writing files or uploading
S3 parts through a pool would otherwise fail, and the checkpoint the script asked for would
silently not exist). A forked child (a DataLoader worker) has none of its parent's threads, so
its chains forget them instead of waiting on them forever.
"""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401 - registers its exit hook before ours (below)
import os
import threading
import weakref
from collections.abc import Callable


class JobChain:
    """Runs jobs in submission order, each on a new non-daemon thread named ``name``.

    Jobs must not raise: they report through whatever handle their submitter gave them.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._tail: threading.Thread | None = None
        _chains.add(self)

    def submit(self, job: Callable[[], None]) -> None:
        """Start ``job`` once every job submitted before it has finished."""
        with self._lock:
            previous = self._tail
            self._tail = threading.Thread(
                target=_after, args=(previous, job), name=self.name, daemon=False
            )
            self._tail.start()

    def wait(self) -> None:
        """Block until every job submitted so far has finished."""
        with self._lock:
            tail = self._tail
        if tail is not None:
            tail.join()

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._tail = None


def _after(previous: threading.Thread | None, job: Callable[[], None]) -> None:
    if previous is not None:
        previous.join()
    job()


_chains: weakref.WeakSet[JobChain] = weakref.WeakSet()


def _finish_before_exit() -> None:
    """Threading's exit hooks run newest first: this one before concurrent.futures' own."""
    for chain in list(_chains):
        chain.wait()


def _forget_in_child() -> None:
    for chain in list(_chains):
        chain._forget()


threading._register_atexit(_finish_before_exit)  # type: ignore[attr-defined]
os.register_at_fork(after_in_child=_forget_in_child)
