"""Saving without stalling: a reused staging pool, one background save per process, handles.

The consistent copy of the state goes into host buffers that persist across saves (allocated and
pre-touched once per layout: fresh memory faults in slowly), so extra host memory is bounded by
one copy of the rank's state and does not grow. Writing and the commit protocol run on a
background thread over a dedicated gloo process group, so they never interleave with the
training loop's own collectives.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook

from unickpt.engine.buffers import mapped_empty
from unickpt.engine.comm import Comm, new_gloo_group
from unickpt.engine.jobs import JobChain
from unickpt.engine.result import SaveResult
from unickpt.errors import CheckpointError

log = logging.getLogger("unickpt")

BusyPolicy = Literal["wait", "skip"]


class SaveHandle:
    """A save in progress: :meth:`staged` once the consistent copy exists, :meth:`wait` once
    committed (re-raising the background error, if any)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.skipped = False
        self._staged = threading.Event()
        self._done = threading.Event()
        self._result: SaveResult | None = None
        self._error: BaseException | None = None

    @staticmethod
    def skipped_save(path: str) -> SaveHandle:
        """The handle of a save that was not made because another one was in flight."""
        handle = SaveHandle(path)
        handle.skipped = True
        handle._staged.set()
        handle._done.set()
        return handle

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def staged(self, timeout: float | None = None) -> bool:
        """Block until the state has been copied (the caller may then mutate it); False on
        timeout. Raises the save's error if it failed before the copy, or once it is done; a
        lazy copy refused at its end (StateChangedError) is reported by :meth:`wait`."""
        if not self._staged.wait(timeout):
            return False
        if self._error is not None and self._done.is_set():
            raise self._error
        return True

    def wait(self, timeout: float | None = None) -> SaveResult | None:
        """Block until committed; the result, or None for a skipped save. Raises on failure."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"save to {self.path} still running after {timeout}s")
        if self._error is not None:
            raise self._error
        return self._result

    def _finish(self, result: SaveResult | None, error: BaseException | None) -> None:
        self._result, self._error = result, error
        self._staged.set()
        self._done.set()

    def __repr__(self) -> str:
        status = (
            "skipped"
            if self.skipped
            else "done"
            if self.done
            else "staged"
            if self._staged.is_set()
            else "staging"
        )
        return f"SaveHandle({self.path!r}, {status})"


class StagingPool:
    """Host buffers for data images (one per write stream), reused by every save while their
    sizes stay the same: page-aligned (direct I/O writes straight from them), pre-touched once
    (fresh memory faults in slowly), pinned when CUDA is present (fast device-to-host copies)."""

    def __init__(self) -> None:
        self._images: list[torch.Tensor] = []

    @property
    def nbytes(self) -> int:
        return sum(image.numel() for image in self._images)

    def images(self, sizes: list[int]) -> list[torch.Tensor]:
        """uint8 buffers of exactly ``sizes`` bytes; buffers that no longer fit are freed
        before new ones are made, so the pool never holds more than the larger layout."""
        if [image.numel() for image in self._images] != sizes:
            self._images = []  # freed first: the old and the new layout are never both held
            self._images = [_aligned_buffer(size) for size in sizes]
        return list(self._images)

    def clear(self) -> None:
        """Free every buffer (the next background save allocates them again)."""
        self._images = []


def _aligned_buffer(nbytes: int) -> torch.Tensor:
    if torch.cuda.is_available():  # pinned host memory is page-aligned
        buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        buffer.zero_()  # pre-touch now, not in the middle of a later copy
        return buffer
    return mapped_empty((nbytes,), torch.uint8, populate=True)


POOL = StagingPool()
_lock = threading.Lock()
# Held by a save() or reserve_staging() call from its admission until its job is registered, so
# that saves from several threads of one process take turns instead of sharing the pool.
_calling = threading.RLock()
# The save running in the background and the lazy one not copied yet, forgotten once done:
# a handle's error holds the frames it was raised through (the caller's too, once wait()
# raised it), and those hold the saved state.
_in_flight: SaveHandle | None = None
_lazy_pending: SaveHandle | None = None
_started_any = False  # whether this process ever saved in the background (admit's collective)
_step_hook_installed = False
# Saves and reservations, in the order this rank started them (the same on every rank).
_jobs = JobChain("unickpt-save")
_group: tuple[object, dist.ProcessGroup] | None = None


@contextlib.contextmanager
def one_caller() -> Iterator[None]:
    """One thread at a time starts a save (or reservation) in this process."""
    with _calling:
        yield


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) has none of the parent's threads: waiting on their
    saves, or on locks they held, would hang it (``_jobs`` forgets its own)."""
    global _lock, _calling, _in_flight, _lazy_pending, _group, _started_any
    _lock, _calling = threading.Lock(), threading.RLock()
    _in_flight = _lazy_pending = None
    _group, _started_any = None, False


os.register_at_fork(after_in_child=_forget_in_child)


def _checkpoint_comm() -> Comm:
    """Collectives for background saves: a gloo group of all ranks, separate from training's.
    Taken when a job is submitted: a job that ran after ``destroy_process_group()`` and took
    its comm then would see a world of one and save alone on every rank, into one path."""
    global _group
    if not (dist.is_available() and dist.is_initialized()):
        return Comm()
    world = dist.group.WORLD
    if _group is None or _group[0] is not world:
        raise RuntimeError("checkpoint process group used before start() created it")
    return Comm(_group[1])


def _ensure_group() -> None:
    """Create the checkpoint group (a collective: every rank reaches this in the same order)."""
    global _group
    if dist.is_available() and dist.is_initialized():
        world = dist.group.WORLD
        if _group is None or _group[0] is not world:
            _group = (world, new_gloo_group())


def admit(policy: BusyPolicy, comm: Comm) -> bool:
    """Whether a new save may start; with one in flight, wait for it or skip, on every rank.

    Processes that never saved in the background (the same on every rank: SPMD) skip the check.
    """
    with _lock:
        previous, started = _in_flight, _started_any
    if not started:
        return True
    busy = previous is not None and not previous.done
    if comm.world_size > 1:  # the choice must be the same everywhere, or collectives deadlock
        busy = any(b == b"1" for b in comm.all_gather_bytes(b"1" if busy else b"0"))
    if not busy:
        return True
    if policy == "skip":
        log.warning("unickpt: a save is still in flight (%s); skipping this one", previous)
        return False
    log.info("unickpt: a save is still in flight (%s); waiting for it", previous)
    if previous is not None:
        previous._done.wait()
    return True


def release_staging_memory() -> None:
    """Wait for the save in flight (and any reservation), then free the staging pool's host
    memory."""
    with one_caller():
        _jobs.wait()
        POOL.clear()


def reserve(job: Callable[[Comm], None]) -> SaveHandle:
    """Run ``job`` (a collective that plans a save and fills :data:`POOL`) in the background,
    after the jobs already started; unlike a save, it is never in flight for :func:`admit`."""
    _ensure_group()
    comm = _checkpoint_comm()
    handle = SaveHandle("staging pool")

    def run() -> None:
        try:
            job(comm)
        except BaseException as exc:
            log.warning("unickpt: could not prepare the staging pool: %s", str(exc))
            handle._finish(None, exc)
        else:
            handle._finish(None, None)

    _jobs.submit(run)
    return handle


def before_update() -> None:
    """Block until the pending lazy save has copied the state (call before mutating it)."""
    pending = _lazy_pending
    if pending is not None:
        pending._staged.wait()


def _step_pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    before_update()


def _install_step_hook() -> None:
    """Make every optimizer's step wait for a pending lazy save's copy: those in the saved state,
    and any other over its tensors (a model saved without its optimizer, whose fused step,
    bumping no version counter, the save could not even detect)."""
    global _step_hook_installed
    if not _step_hook_installed:
        register_optimizer_step_pre_hook(_step_pre_hook)
        _step_hook_installed = True


def _forget(handle: SaveHandle) -> None:
    global _in_flight, _lazy_pending
    with _lock:
        if _in_flight is handle:
            _in_flight = None
        if _lazy_pending is handle:
            _lazy_pending = None


def _clear_frames(error: BaseException) -> None:
    """Drop the locals of the frames ``error`` (and the errors it chains) was raised through:
    the handle keeps the error after the save (admit() looks at it), and those locals hold the
    saved state. The tracebacks keep their lines."""
    pending, seen = [error], set()
    while pending:
        exc = pending.pop()
        if id(exc) not in seen:
            seen.add(id(exc))
            traceback.clear_frames(exc.__traceback__)
            pending += [e for e in (exc.__cause__, exc.__context__) if e is not None]


def start(
    path: str,
    stage: Callable[[Comm], None],
    finish: Callable[[Comm], SaveResult],
    *,
    lazy: bool,
) -> SaveHandle:
    """Run ``stage`` (here, or in the background when ``lazy``) and then ``finish`` in the
    background, both with the checkpoint group's comm; the returned handle reports both."""
    global _in_flight, _lazy_pending, _started_any
    _ensure_group()
    comm = _checkpoint_comm()
    world = _group[0] if _group is not None else None  # the process group of the save
    handle = SaveHandle(path)
    with _lock:  # before staging, which may raise on this rank alone: admit() stays collective
        _started_any = True
    if not lazy:
        _jobs.wait()  # a reservation may still be filling the pool
        try:
            stage(comm)
        except BaseException as exc:
            handle._finish(None, exc)
            raise
        handle._staged.set()
    else:
        _install_step_hook()

    def run() -> None:
        try:
            if lazy:
                try:
                    stage(comm)
                finally:
                    handle._staged.set()  # never leave a step hook blocked
            handle._finish(finish(comm), None)
        except BaseException as exc:
            if world is not None and (not dist.is_initialized() or dist.group.WORLD is not world):
                cut_off = CheckpointError(
                    f"destroy_process_group() cut off the save to {path}, before or after it "
                    "committed: wait() for its handle (or close() the CheckpointManager) before "
                    "destroying the process group"
                )
                cut_off.__cause__ = exc
                exc = cut_off
            # The text, not the error: a handler that keeps records would keep its frames.
            log.error("unickpt: background save to %s failed: %s", path, str(exc))
            _clear_frames(exc)
            handle._finish(None, exc)
        finally:
            _forget(handle)

    with _lock:
        _in_flight = handle
        if lazy:
            _lazy_pending = handle
    _jobs.submit(run)
    return handle
