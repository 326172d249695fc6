"""Background jobs that run one after another on a non-daemon worker thread.

Background saves and the manager's drains both need this: their jobs run collectives on a
process group of their own, so they must run one at a time, in the order every rank submitted
them. The worker starts with the first job and ends when it finds none left: nothing lingers
when there is nothing to do, and a backlog (drains slower than saves) is a queue, not a thread
per job (a thousand threads, until a container's pids limit refused the next).

Two process-wide hooks serve every chain. At interpreter exit, pending jobs finish before
``concurrent.futures`` stops its thread pools taking work (a job writing files or uploading
S3 parts through a pool would otherwise fail, and the checkpoint the script asked for would
silently not exist). A forked child (a DataLoader worker) has none of its parent's threads, so
its chains forget them instead of waiting on them forever.
"""

from __future__ import annotations

import collections
import concurrent.futures.thread  # noqa: F401 - registers its exit hook before ours (below)
import logging
import os
import threading
import weakref
from collections.abc import Callable

log = logging.getLogger("unickpt")


class JobChain:
    """Runs jobs in submission order on a non-daemon worker thread named ``name``.

    Jobs must not raise: they report through whatever handle their submitter gave them.
    """

    _changed: threading.Condition
    _queue: collections.deque[Callable[[], None]]
    _working: bool  # a worker runs, and takes every job queued before it ends
    _submitted: int
    _finished: int

    def __init__(self, name: str) -> None:
        self.name = name
        self._forget()
        _chains.add(self)

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` once every job submitted before it has finished: on the worker, or,
        when no thread can be started (a container's pids limit), here and now."""
        with self._changed:
            self._queue.append(job)
            self._submitted += 1
            if self._working:
                return
            self._working = True
        try:
            threading.Thread(target=self._work, name=self.name, daemon=False).start()
        except RuntimeError as exc:  # its peers run theirs: here, rather than not at all
            log.warning("unickpt: no thread for a job of %s (%s): running it here", self.name, exc)
            self._work()

    def wait(self) -> None:
        """Block until every job submitted so far has finished."""
        with self._changed:
            submitted = self._submitted
            self._changed.wait_for(lambda: self._finished >= submitted)

    def _work(self) -> None:
        while True:
            with self._changed:
                if not self._queue:
                    self._working = False
                    return
                job = self._queue.popleft()
            try:
                job()
            except BaseException:  # a bug: the jobs queued after it still run
                log.exception("unickpt: a job of %s raised", self.name)
            finally:
                with self._changed:
                    self._finished += 1
                    self._changed.notify_all()

    def _forget(self) -> None:
        """No jobs, no worker (at start, and in a forked child, which has none of its
        parent's threads)."""
        self._changed = threading.Condition()
        self._queue = collections.deque()
        self._working = False
        self._submitted = self._finished = 0


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
