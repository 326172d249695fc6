"""CheckpointManager: when to save, what to keep, where to resume from, across storage tiers."""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.distributed as dist

from unickpt.engine.background import (
    BusyPolicy,
    SaveHandle,
    before_update,
    release_staging_memory,
)
from unickpt.engine.comm import Comm, new_gloo_group
from unickpt.engine.interrupts import held_interrupts
from unickpt.engine.jobs import JobChain
from unickpt.engine.load import load
from unickpt.engine.result import SaveResult
from unickpt.engine.save import SaveMode, reserve_staging, save
from unickpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    StorageError,
    error_vote,
    peer_error,
    raise_first_failure,
)
from unickpt.format.manifest import MANIFEST, RNG_KEY, Manifest, read_manifest, read_summary
from unickpt.layout.sharded import ShardedTensor
from unickpt.layout.state import check_state, plain_step
from unickpt.manager import rng
from unickpt.manager.drain import DrainError, drain
from unickpt.manager.tiers import RootOrTiers, Tier, parse_tiers, tier_count
from unickpt.storage import as_rate_limit

log = logging.getLogger("unickpt")

LATEST = "latest"
# The manager's own checkpoints; anything else under a tier's root is not its to list or delete.
_NAME = re.compile(r"step_\d{10,}")
_MAX_RNG_WORDS = 1 << 20  # a row is ~1.3k words (+ 2 per CUDA device); far more is corrupt
# Failures that make a checkpoint unusable, so restore tries the next candidate (and the run
# replaces it when it saves its step again). A StorageError says only that its tier cannot be
# read now: restore tries the same step on a slower tier, never an older one. Anything else
# (a state that does not match, a refused pickle) is the caller's to fix and raises.
_UNUSABLE = (CorruptCheckpointError, IncompleteCheckpointError, CheckpointNotFoundError)


def _vanished(tier: Tier, name: str, error: BaseException) -> BaseException:
    """``error``, or, if the manifest of ``name`` is gone (not found, or its data left without
    it) from a durable tier that listed it committed moments ago, why that cannot be a bad
    checkpoint: another job deleted it (a run still alive, its retention or gc). Restore then
    raises rather than go back to an older step, or start over, and save over that job's
    checkpoints; a memory tier misses what another node holds."""
    gone = (CheckpointNotFoundError, IncompleteCheckpointError)
    if tier.memory or not isinstance(error, gone):
        return error
    vanished = CheckpointError(
        f"{name} was deleted from {tier.url} while restore read it ({error}): is another job "
        "(an earlier run still alive, or its gc) using this run's checkpoints? Restore again "
        "once only this run does"
    )
    vanished.__cause__ = error
    return vanished


@dataclass(frozen=True)
class _Problem:
    """Why a restore candidate failed on some ranks, as every rank agreed; empty if it did not."""

    text: str = ""
    unreachable: bool = False  # only its tier's storage failed: the checkpoint may be fine

    def __bool__(self) -> bool:
        return bool(self.text)

    @staticmethod
    def of(failed: builtins.list[tuple[int, dict[str, str]]]) -> _Problem:
        return _Problem(
            "; ".join(f"rank {rank}: {vote['type']}: {vote['error']}" for rank, vote in failed),
            bool(failed) and all(vote["kind"] == "unreachable" for _, vote in failed),
        )


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint: ``path`` on the fastest tier holding it, and which ``tiers``
    (their URLs, fastest first) hold it."""

    name: str
    path: str
    step: int | None
    metrics: dict[str, Any] = field(default_factory=dict)
    tiers: tuple[str, ...] = ()


def _order(info: CheckpointInfo) -> tuple[int, str]:
    return (info.step if info.step is not None else -1, info.name)


def _score(value: Any) -> bool:
    """Whether a metric can rank checkpoints: a number, not a bool, not NaN (a diverged step)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _check_arguments(
    every_n_steps: int | None,
    every_n_seconds: float | None,
    keep_last: int | None,
    keep_every: int | None,
    keep_best: tuple[str, int] | None,
    best_mode: str,
    mode: str,
    if_busy: str,
    keep_in_memory: int,
) -> None:
    def positive_int(name: str, value: object) -> None:
        if value is not None and (type(value) is not int or value < 1):
            raise ValueError(f"{name} must be a positive int or None, not {value!r}")

    positive_int("every_n_steps", every_n_steps)
    positive_int("keep_every", keep_every)
    if keep_last is not None and (type(keep_last) is not int or keep_last < 1):
        raise ValueError("keep_last must be at least 1 (the newest checkpoint is always kept)")
    if type(keep_in_memory) is not int or keep_in_memory < 1:
        raise ValueError("keep_in_memory must be at least 1")
    if every_n_seconds is not None and not (
        isinstance(every_n_seconds, int | float)
        and not isinstance(every_n_seconds, bool)
        and every_n_seconds > 0
    ):
        raise ValueError(f"every_n_seconds must be a positive number, not {every_n_seconds!r}")
    if keep_best is not None and not (
        isinstance(keep_best, tuple)
        and len(keep_best) == 2
        and isinstance(keep_best[0], str)
        and type(keep_best[1]) is int
        and keep_best[1] >= 1
    ):
        raise ValueError(f"keep_best must be a (metric name, count >= 1) tuple, not {keep_best!r}")
    for name, value, allowed in (
        ("best_mode", best_mode, ("min", "max")),
        ("mode", mode, ("sync", "async", "lazy")),
        ("if_busy", if_busy, ("wait", "skip")),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, not {value!r}")


class CheckpointManager:
    """Saves on a schedule, keeps what the retention policy says, restores the newest.

    ``root_or_tiers`` is one root (a local path or ``s3://bucket/prefix``) or a list of tiers,
    fastest first, e.g. ``["memory", "/nfs/ckpt/run1", "s3://bucket/run1"]``. Saves go to the
    fastest tier in ``mode``; once committed there, a background drain copies each checkpoint to
    every slower tier in turn without blocking training (see docs/DESIGN.md, "Tiers"). The
    ``"memory"`` tier is a node-local shared-memory directory (``/dev/shm/unickpt/<run>``, or
    ``"memory:///DIR"``) holding the ``keep_in_memory`` newest checkpoints plus any not yet
    drained; it outlives a crashed trainer on the same node. ``storage_options`` configure the
    ``s3://`` tiers. ``max_write_rate`` caps the bytes per second each process writes for its
    saves and drains together (see :class:`~unickpt.storage.RateLimit`).

    Every rank constructs it with the same arguments and calls it at the same points (SPMD).
    ``every_n_steps`` / ``every_n_seconds`` say when :meth:`maybe_save` saves (the time test is
    decided by rank 0, so all ranks agree). Retention, on each durable tier, keeps the
    ``keep_last`` newest, every step divisible by ``keep_every``, and the ``keep_best =
    (metric, n)`` best by ``best_mode``; it never deletes the newest committed checkpoint, one
    being written, or one still to be drained. With ``save_rng`` (the default) RNG states
    (torch CPU, CUDA, numpy, python) are saved per rank, as the checkpoint's ``__rng__`` tensor,
    and restored when the world size is unchanged; a plain :func:`unickpt.load` ignores them.
    """

    @held_interrupts()
    def __init__(
        self,
        root_or_tiers: RootOrTiers,
        *,
        every_n_steps: int | None = None,
        every_n_seconds: float | None = None,
        keep_last: int | None = 3,
        keep_every: int | None = None,
        keep_best: tuple[str, int] | None = None,
        best_mode: Literal["min", "max"] = "min",
        mode: SaveMode = "lazy",
        if_busy: BusyPolicy = "wait",
        save_rng: bool = True,
        storage_options: Mapping[str, Any] | None = None,
        keep_in_memory: int = 1,
        max_write_rate: float | None = None,
    ) -> None:
        self._comm = Comm()
        error: BaseException | None = None
        self.tiers: list[Tier] = []
        try:
            _check_arguments(
                every_n_steps,
                every_n_seconds,
                keep_last,
                keep_every,
                keep_best,
                best_mode,
                mode,
                if_busy,
                keep_in_memory,
            )
            self.tiers = parse_tiers(root_or_tiers, storage_options)
        except BaseException as exc:  # one rank's bad path or option: told to the others
            error = exc
        if self._comm.world_size > 1 and tier_count(root_or_tiers) > 1:
            self._agree_on_tiers(error)  # a collective one-tier managers never had: rank 0
        elif error is not None:  # alone may make one to list (latest(), list())
            raise error
        self.root = self.tiers[0].root
        self.every_n_steps = every_n_steps
        self.every_n_seconds = every_n_seconds
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.keep_best = keep_best
        self.best_mode = best_mode
        self.keep_in_memory = keep_in_memory
        self.mode: SaveMode = mode
        self.if_busy: BusyPolicy = if_busy
        self.save_rng = save_rng
        self._write_limit = as_rate_limit(max_write_rate)
        # Drains run collectives from a background thread: on the default group they would
        # interleave with training's, so they get a gloo group of their own (created here, a
        # collective every rank reaches at the same point). One tier needs no collective.
        self._group: dist.ProcessGroup | None = None
        self._drain_comm = Comm()
        self._ensure_group()
        self._drainer = JobChain("unickpt-drain")
        self._lock = threading.Lock()
        self._active: Counter[str] = Counter()  # checkpoints with a save or drain still to run
        self._errors: list[DrainError] = []
        self._failed_saves: list[str] = []  # background saves that failed, until wait() says so
        # Committed checkpoints restore skipped as unusable, newer than the one it restored
        # (name -> tier indices): the resumed run replaces each when it saves that step again.
        self._superseded: dict[str, set[int]] = {}
        self._backlog_warned = 0
        self._reported = 0
        self._last_save = time.monotonic()
        self._newest: str | None = None  # the checkpoint this manager saved or restored last
        self._newest_handle: SaveHandle | None = None  # its background save, if it was one
        self._infos: dict[tuple[int, str], CheckpointInfo] = {}
        self._pool_planned = False  # whether a save or a reservation has sized the pool
        self._reservation: SaveHandle | None = None

    @property
    def drain_errors(self) -> builtins.list[DrainError]:
        """Every drain that failed so far (checkpoint, tier, cause), oldest first."""
        with self._lock:
            return builtins.list(self._errors)

    # ------------------------------------------------------------------------------- saving

    @staticmethod
    def name_for(step: int) -> str:
        return f"step_{step:010d}"

    def _due(self, step: int) -> bool:
        due = self.every_n_steps is not None and step % self.every_n_steps == 0
        if self.every_n_seconds is not None:
            elapsed = time.monotonic() - self._last_save >= self.every_n_seconds
            if self._comm.world_size > 1:  # clocks differ: rank 0 decides for everyone
                elapsed = self._comm.broadcast_bytes(b"1" if elapsed else b"0") == b"1"
            due = due or elapsed
        return due

    @held_interrupts()
    def maybe_save(
        self,
        step: int,
        state: dict[str, Any],
        metrics: dict[str, Any] | None = None,
        *,
        force: bool = False,
    ) -> SaveResult | SaveHandle | None:
        """Save ``state`` as step ``step`` to the fastest tier if the schedule (or ``force``)
        says so; draining to the slower tiers follows in the background.

        Returns None when no save is due, or when ``step`` is the step this manager saved or
        restored last (a final ``force=True`` save after a scheduled one); otherwise the
        :class:`SaveResult` (sync) or :class:`SaveHandle` (async, lazy); a handle whose
        ``skipped`` is True when ``if_busy="skip"`` skipped the save, in any mode.
        """
        step = plain_step(step)
        check_state(state)
        if step < 0:
            raise ValueError(f"step must be at least 0, not {step}")
        if not (force or self._due(step)):
            if self.mode != "sync" and not self._pool_planned:
                # Plan and fill the staging pool in the background now, so that the first
                # save neither allocates nor faults in host memory (seconds per GiB on some
                # hosts) while the caller waits for its copy.
                self._reservation = reserve_staging(self._with_rng(state))
                self._pool_planned = True
            return None
        self._pool_planned = True
        name = self.name_for(step)
        if name == self._newest and not self._newest_failed():
            log.info("unickpt: %s is saved already; not saving it again", name)
            return None
        self._last_save = time.monotonic()
        self._ensure_group()  # a collective: before the save, which may raise on one rank alone
        if name in self._superseded:
            self._replace_superseded(name)
        full = self._with_rng(state)
        metadata = {"metrics": dict(metrics or {})}
        target = self.tiers[0].storage.child(name)
        if self.mode == "sync":
            result = save(
                target,
                full,
                step=step,
                user_metadata=metadata,
                if_busy=self.if_busy,
                max_write_rate=self._write_limit,
            )
            if isinstance(result, SaveHandle):  # skipped (if_busy="skip"): nothing to record
                return result
            self._newest, self._newest_handle = name, None
            self._submit(name, None, source=0)
            if len(self.tiers) == 1:  # nothing to drain: retention is done when this returns
                self._drainer.wait()
            return result
        handle = save(
            target,
            full,
            mode=self.mode,
            step=step,
            user_metadata=metadata,
            if_busy=self.if_busy,
            max_write_rate=self._write_limit,
        )
        if not handle.skipped:
            self._newest, self._newest_handle = name, handle
            self._submit(name, handle, source=0)
        return handle

    def _newest_failed(self) -> bool:
        """Whether the background save of the newest checkpoint failed (waiting for it: its
        outcome is the same on every rank, the moment each rank learns it is not). If it did,
        the drainer's bookkeeping of the failure, which clears its leftovers on the memory
        tier, is waited for too: it would clear those of the retry."""
        handle = self._newest_handle
        if handle is None:
            return False
        try:
            handle.wait()
        except Exception:
            self._drainer.wait()
            return True
        return False

    def _replace_superseded(self, name: str) -> None:
        """Remove ``name``, a checkpoint restore skipped as unusable, before saving it anew.
        Every rank calls this at the same point."""
        for index in sorted(self._superseded.pop(name)):
            if self.tiers[index].memory or self._comm.rank == 0:  # memory: each node its own
                self._delete(index, name, "restore skipped it as unusable; saved again now")
        if self._comm.world_size > 1:  # no rank claims the path before it is gone everywhere
            self._comm.all_gather_bytes(b"")

    def _with_rng(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` plus this rank's RNG states (one row of a tensor sharded over ranks)."""
        if not self.save_rng:
            return state
        row = rng.capture()
        world, rank = self._comm.world_size, self._comm.rank
        return {**state, RNG_KEY: ShardedTensor(row[None], (world, row.numel()), (rank, 0))}

    def before_update(self) -> None:
        """Block until the pending lazy save has copied the state (for custom update loops)."""
        before_update()

    def wait(self) -> None:
        """Block until every save and drain started by this manager is over.

        Raises, once, for what failed since the last call: a background save (nothing was
        committed for it; CheckpointError), or a drain (StorageError naming the checkpoint
        and tier: the checkpoint stays on the faster tiers; :attr:`drain_errors` keeps them
        all). Each failure is logged when it happens, too.
        """
        if self._reservation is not None:
            with contextlib.suppress(Exception):  # logged where it failed, like a failed save
                self._reservation.wait()
        self._drainer.wait()
        with self._lock:
            new, self._reported = self._errors[self._reported :], len(self._errors)
            failed, self._failed_saves = self._failed_saves, []
        drains = (
            "checkpoint(s) did not reach every tier; they remain on the faster tiers: "
            + "; ".join(str(e) for e in new)
        )
        if failed:
            saves = "checkpoint(s) not saved, nothing was committed: " + "; ".join(failed)
            raise CheckpointError(saves + (f"; and {drains}" if new else ""))
        if new:
            raise StorageError(drains)

    @held_interrupts()
    def close(self) -> None:
        """Wait for every save and drain (raising as :meth:`wait` does), then free the host
        memory that staged them, the memory tier's checkpoints that a slower tier holds (tmpfs
        is RAM; a restart restores from the slower tier), and the drains' process group."""
        error: Exception | None = None
        try:
            self.wait()
        except Exception as exc:  # every rank still takes part in what follows
            error = exc
        try:
            self._release_memory_tier(clean=error is None)
        finally:
            release_staging_memory()
            self._pool_planned, self._reservation = False, None
            if self._group is not None:
                dist.destroy_process_group(self._group)
                self._group = None
        if error is not None:
            raise error

    def _release_memory_tier(self, *, clean: bool) -> None:
        """Remove the memory tier's checkpoints that a slower tier holds byte for byte (the same
        manifest) or that retention removed from the slower tiers (``keep_in_memory`` kept them
        for a quick restore, over), unless this run had failures. Rank 0 decides; every rank
        deletes on its node. Called by every rank."""
        if len(self.tiers) < 2 or not self.tiers[0].memory:
            return
        doomed: builtins.list[str] = []
        if self._comm.rank == 0 and clean:
            try:
                doomed = self._releasable()
            except Exception as exc:  # never skip the collective below
                log.warning("unickpt: the memory tier is left as it is: %s", exc)
        if self._comm.world_size > 1:
            doomed = json.loads(self._comm.broadcast_bytes(json.dumps(doomed).encode()))
        for name in doomed:
            self._delete(0, name, "the run is closed; durable elsewhere or retired there")
        memory = self.tiers[0].storage
        if doomed and self._comm.rank == 0:  # a pointer to nothing is left only if empty
            with contextlib.suppress(Exception):
                if not any(_NAME.fullmatch(name) for name in memory.children()):
                    memory.delete(LATEST)

    def _releasable(self) -> builtins.list[str]:
        """The memory tier's checkpoints that a slower tier holds with the same manifest, or
        that no slower tier holds nor would keep (retention removed them there, or would have:
        a crashed run's, never drained)."""
        listings = self._listings()
        memory = self.tiers[0].storage
        all_listed = all(listing is not None for listing in listings[1:])
        wanted = {name for name, _ in self._undrained(listings)}
        out = []
        for info in listings[0] or []:
            holders = [
                index
                for index, listing in enumerate(listings[1:], start=1)
                if any(i.name == info.name for i in listing or [])
            ]
            if not holders and all_listed and info.name not in wanted:
                out.append(info.name)
                continue
            text = memory.read(f"{info.name}/{MANIFEST}")
            for index in holders:
                if self.tiers[index].storage.read(f"{info.name}/{MANIFEST}") == text:
                    out.append(info.name)
                    break
        return out

    def _agree_on_tiers(self, error: BaseException | None) -> None:
        """Raise on every rank one rank's failure to construct the manager (a bad path or
        option on one node), so that no peer waits for it in a collective. Refuse ranks naming
        different durable tiers (a path built from a clock, a relative one in different working
        directories): saves check their paths, but the memory tier's can only compare names,
        its root being each node's own; a drain would then commit a checkpoint whose files went
        to two places."""
        mine = [tier.storage.url for tier in self.tiers[1:]]
        vote = {
            "tiers": mine,
            **error_vote(error),
        }
        votes = [json.loads(v) for v in self._comm.all_gather_bytes(json.dumps(vote).encode())]
        raise_first_failure(votes, error, "creating the CheckpointManager")
        others = [(rank, v["tiers"]) for rank, v in enumerate(votes) if v["tiers"] != mine]
        if others:
            theirs = "; ".join(f"rank {rank}: {v}" for rank, v in others)
            raise ValueError(
                f"ranks disagree on the durable tiers: rank {self._comm.rank}: {mine}; {theirs}; "
                "every rank must name the same ones"
            )

    def _ensure_group(self) -> None:
        """(Re)create the drains' process group: at construction, and at the first save after
        :meth:`close` — points every rank reaches in the same order."""
        if self._group is None and len(self.tiers) > 1 and self._comm.world_size > 1:
            self._group = new_gloo_group()
            self._drain_comm = Comm(self._group)

    def _submit(self, name: str, handle: SaveHandle | None, *, source: int) -> None:
        self._ensure_group()
        with self._lock:
            waiting = len(self._active)  # checkpoints ahead of this one
            self._active[name] += 1
            warn = len(self.tiers) > 1 and waiting >= 2 * max(1, self._backlog_warned)
            self._backlog_warned = waiting if warn or waiting <= 1 else self._backlog_warned
        if warn:  # at 2, 4, 8... waiting: a growing backlog makes each save a new high
            log.warning(
                "unickpt: %d checkpoints are still to be drained when %s is saved: saves come "
                "faster than the slower tiers take them (the fastest tier keeps them all)",
                waiting,
                name,
            )
        self._drainer.submit(lambda: self._job(name, handle, source))

    def _job(self, name: str, handle: SaveHandle | None, source: int) -> None:
        """After ``name`` commits on tier ``source``: drain it to each slower tier in turn,
        then apply retention. Runs on the drainer's thread; the same on every rank."""
        try:
            if handle is not None:
                try:
                    handle.wait()
                except BaseException as exc:  # every rank sees the same failed save
                    log.error("unickpt: checkpoint %s failed: %s", name, str(exc))
                    with self._lock:
                        self._failed_saves.append(f"{name}: {type(exc).__name__}: {exc}")
                    memory = self.tiers[source]
                    # tmpfs is RAM: drop this node's leftovers (never a committed checkpoint:
                    # the save may have failed because one was already there)
                    if memory.memory and not memory.storage.exists(f"{name}/{MANIFEST}"):
                        with contextlib.suppress(Exception):
                            memory.storage.delete_prefix(name)
                    return
            self._publish(source, name)
            for index in range(source + 1, len(self.tiers)):
                self._drain(source, index, name)
            self._retain()
        except Exception:  # a bug here must not kill the thread silently
            log.exception("unickpt: bookkeeping of checkpoint %s failed", name)
        finally:
            with self._lock:
                self._active[name] -= 1
                if self._active[name] <= 0:
                    del self._active[name]

    def _drain(self, source: int, index: int, name: str) -> None:
        target = self.tiers[index]
        try:
            result = drain(
                self._drain_comm,
                self.tiers[source].storage,
                target.storage,
                name,
                write_limit=self._write_limit,
            )
        except CheckpointError as exc:
            error = DrainError(name, target.url, str(exc))
            log.error("unickpt: %s", error)
            with self._lock:
                self._errors.append(error)
            return
        if result.copied:
            log.info(
                "unickpt: drained %s to %s (this rank: %d file(s), %.1f MiB in %.2fs)",
                name,
                target.url,
                result.files,
                result.nbytes / 2**20,
                result.seconds,
            )
            self._publish(index, name)

    def _publish(self, index: int, name: str) -> None:
        """Point tier ``index``'s ``latest`` file at ``name`` unless it names a newer one."""
        if self._comm.rank != 0:
            return
        storage = self.tiers[index].storage
        try:
            current = storage.read(LATEST).decode() if storage.exists(LATEST) else ""
            if name > current:  # names are zero-padded steps: string order is step order
                storage.put_atomic(LATEST, name.encode())
        except Exception as exc:
            log.warning("unickpt: cannot update %s: %s", storage.describe(LATEST), exc)

    # ---------------------------------------------------------------------------- retention

    def _info(self, index: int, name: str) -> CheckpointInfo | None:
        key = (index, name)
        if key not in self._infos:
            tier = self.tiers[index]
            try:  # one bad directory (corrupt, incomplete, a symlink out) is not the tier's
                summary = read_summary(tier.storage.child(name))
            except StorageError:
                raise  # unreachable now, not absent: the tier cannot be listed
            except CheckpointError:
                return None
            metrics = summary.user_metadata.get("metrics", {})
            self._infos[key] = CheckpointInfo(
                name,
                tier.path(name),
                summary.step,
                metrics if isinstance(metrics, dict) else {},
                (tier.url,),
            )
        return self._infos[key]

    def _listing(self, index: int) -> builtins.list[CheckpointInfo]:
        """Committed checkpoints on tier ``index`` (as this node sees it), oldest first."""
        storage = self.tiers[index].storage
        infos = []
        for name in storage.children():
            if _NAME.fullmatch(name) and (info := self._info(index, name)):
                infos.append(info)
        return sorted(infos, key=_order)

    def _listings(self) -> builtins.list[builtins.list[CheckpointInfo] | None]:
        """Each tier's listing; None for a tier that cannot be listed now (logged)."""
        out: builtins.list[builtins.list[CheckpointInfo] | None] = []
        for index, tier in enumerate(self.tiers):
            try:
                out.append(self._listing(index))
            except CheckpointError as exc:
                log.warning("unickpt: cannot list tier %s: %s", tier.url, exc)
                out.append(None)
        return out

    def list(self) -> builtins.list[CheckpointInfo]:
        """Committed checkpoints across the tiers, oldest step first; each says which tiers
        hold it. A tier that cannot be listed now is left out (logged) when there are several.
        """
        if len(self.tiers) == 1:
            return self._listing(0)
        merged: dict[str, CheckpointInfo] = {}
        for listing in self._listings():
            for info in listing or []:
                seen = merged.get(info.name)
                merged[info.name] = (
                    info if seen is None else replace(seen, tiers=seen.tiers + info.tiers)
                )
        return sorted(merged.values(), key=_order)

    def _victims(
        self, index: int, listings: builtins.list[builtins.list[CheckpointInfo] | None]
    ) -> builtins.list[str]:
        """What retention removes from tier ``index``."""
        committed = listings[index]
        if not committed:
            return []
        keep = {committed[-1].name}
        with self._lock:
            keep |= set(self._active)  # being saved, or still to be drained from here
        if self.tiers[index].memory:
            keep |= {i.name for i in committed[-self.keep_in_memory :]}
            # Not durable yet: kept until it, or a newer checkpoint, is on a slower tier.
            drained = max(
                (_order(i) for listing in listings[index + 1 :] for i in listing or []),
                default=None,
            )
            keep |= {i.name for i in committed if drained is None or _order(i) > drained}
            return [i.name for i in committed if i.name not in keep]
        if self.keep_last is not None:
            keep |= {i.name for i in committed[-self.keep_last :]}
        else:
            keep |= {i.name for i in committed}
        if self.keep_every:
            keep |= {
                i.name for i in committed if i.step is not None and i.step % self.keep_every == 0
            }
        if self.keep_best:
            metric, count = self.keep_best
            scored = [i for i in committed if _score(i.metrics.get(metric))]
            scored.sort(key=lambda i: i.metrics[metric], reverse=self.best_mode == "max")
            keep |= {i.name for i in scored[:count]}
        return [i.name for i in committed if i.name not in keep]

    def _retain(self) -> None:
        """Apply retention on every tier. Rank 0 decides (it alone sees the memory tier's
        manifests: it wrote them); durable tiers are shared, so rank 0 deletes there; each node
        holds its own part of the memory tier, so every rank deletes what rank 0 names there."""
        in_memory: builtins.list[str] = []
        if self._comm.rank == 0:
            try:
                listings = self._listings()
                for index, tier in enumerate(self.tiers):
                    victims = self._victims(index, listings)
                    if tier.memory:
                        in_memory = victims
                    for name in [] if tier.memory else victims:
                        self._delete(index, name, "retention")
            except Exception as exc:  # never skip the collective below
                log.warning("unickpt: retention skipped: %s", exc)
        if self.tiers[0].memory:
            doomed = json.dumps(in_memory).encode()
            for name in json.loads(self._drain_comm.broadcast_bytes(doomed)):
                self._delete(0, name, "retention")

    def _delete(self, index: int, name: str, why: str) -> None:
        storage = self.tiers[index].storage
        try:
            # Un-commit first: a crash mid-delete leaves an incomplete checkpoint for gc.
            storage.delete(f"{name}/{MANIFEST}")
            storage.delete_prefix(name)
        except Exception as exc:
            log.warning("unickpt: could not remove %s (%s): %s", storage.describe(name), why, exc)
            return
        self._infos.pop((index, name), None)
        log.info("unickpt: removed %s from %s (%s)", name, self.tiers[index].url, why)

    # ------------------------------------------------------------------------------ restore

    def latest(self) -> str | None:
        """Path of the newest committed checkpoint (on the fastest tier holding it), or None.
        Committed: its manifest published, its step read; loading it validates the rest.

        Found by listing, not by the ``latest`` pointer file: that file is written for external
        tools and may lag behind a commit or name a checkpoint deleted since.
        """
        committed = self.list()
        return committed[-1].path if committed else None

    @held_interrupts()
    def restore(
        self, state: dict[str, Any], *, strict: bool = True, verify: bool = True
    ) -> int | None:
        """Load the newest complete checkpoint across the tiers into ``state`` (any layout);
        its step, or None.

        Candidates are ordered newest step first, the fastest tier first for one step; every
        rank takes the same one. A memory-tier copy counts only if every rank can read all of
        its files on its own node. A corrupt or incomplete candidate is skipped (logged) for
        the next, unless it was committed on a durable tier when listed and is gone since:
        another job deleting this run's checkpoints, for which restore raises, as for any
        failure that says nothing against the checkpoint (a state that does not match, an
        interrupt). One whose tier cannot be read now (a :class:`StorageError`: an endpoint
        down, retries used up) is tried on the slower tiers that hold its step; if none can
        give it, restore raises that StorageError rather than resume from an older step, over
        which the run would then save again. ``verify`` checks the checksum of every chunk
        read, so that corrupt bytes are found too (it reads whole chunks: when resharding,
        more than the rank needs; ``verify=False`` trusts the storage). The restored
        checkpoint is then drained to the slower tiers that lack it (a crashed run's undrained
        snapshot becomes durable).
        """
        check_state(state)
        self._drainer.wait()  # drain errors stay for wait() to report
        candidates, undrained = self._candidates()
        for at, (name, index) in enumerate(candidates):
            tier = self.tiers[index]
            manifest, problem = self._agree_readable(tier, name)
            if manifest is not None:
                step, error = None, None
                try:
                    step = self._restore_from(tier, name, manifest, state, strict, verify)
                except BaseException as exc:  # of any kind: the peers wait to hear of it
                    error = _vanished(tier, name, exc)
                problem = self._agree_on(f"restore of {name}", error)
                if not problem:
                    log.info("unickpt: restored %s from %s", name, tier.url)
                    self._supersede(candidates[:at], name)
                    self._newest, self._newest_handle = name, None
                    if index + 1 < len(self.tiers):
                        self._submit(name, None, source=index)
                    for older, source in undrained:  # all queued before any retention runs
                        if older < name:  # newer ones are superseded: the run saves them again
                            self._submit(older, None, source=source)
                    return step
            following = candidates[at + 1][0] if at + 1 < len(candidates) else None
            if problem.unreachable and following != name:
                raise StorageError(
                    f"cannot restore {name} from {tier.url} now ({problem.text}); no older "
                    "checkpoint is restored in its place, as the run would then save its step "
                    "again over it: try again once the storage can be read"
                )
            log.warning(
                "unickpt: cannot restore %s from %s (%s); trying %s",
                name,
                tier.url,
                problem.text,
                "the same step on a slower tier" if following == name else "an older one",
            )
        self._supersede(candidates, None)
        return None

    def _supersede(self, skipped: builtins.list[tuple[str, int]], restored: str | None) -> None:
        """Remember the committed checkpoints newer than the restored one (all of them if none
        was): the run goes on from an older state and will save their steps again."""
        self._superseded = {}
        for name, index in skipped:
            if name != restored:
                self._superseded.setdefault(name, set()).add(index)
        for name in self._newer_on_other_nodes(restored):
            self._superseded.setdefault(name, set()).add(0)
        if self._superseded:
            log.warning(
                "unickpt: restore skipped %s (unusable, or only on some node's memory tier); "
                "each is replaced when the run saves its step again",
                ", ".join(sorted(self._superseded)),
            )

    def _newer_on_other_nodes(self, restored: str | None) -> builtins.list[str]:
        """Committed memory-tier checkpoints newer than ``restored`` on any rank's node: rank
        0's listing misses those of other nodes (ranks placed on other nodes after a restart),
        and the run will save their steps again. Agreed, so every rank replaces the same ones
        at the same point."""
        if not self.tiers[0].memory:
            return []
        memory, mine = self.tiers[0].storage, []
        with contextlib.suppress(Exception):  # a node that cannot list has nothing to add
            mine = [
                name
                for name in memory.children()
                if _NAME.fullmatch(name)
                and (restored is None or name > restored)
                and memory.exists(f"{name}/{MANIFEST}")
            ]
        if self._comm.world_size == 1:
            return mine
        gathered = self._comm.all_gather_bytes(json.dumps(mine).encode())
        return sorted({str(name) for names in gathered for name in json.loads(names)})

    def _candidates(self) -> tuple[builtins.list[tuple[str, int]], builtins.list[tuple[str, int]]]:
        """(name, tier index) of every committed checkpoint, in restore order, as rank 0 lists
        them, and those of :meth:`_undrained`; the memory tier's uncommitted leftovers (a
        crashed save) are removed everywhere."""
        found: builtins.list[tuple[CheckpointInfo, int]] = []
        undrained: builtins.list[tuple[str, int]] = []
        swept = False  # only with rank 0's full view of the memory tier's commits
        error: BaseException | None = None
        if self._comm.rank == 0:
            try:
                listings = self._listings()
                unlisted = [
                    tier.url
                    for tier, listing in zip(self.tiers, listings, strict=True)
                    if listing is None
                ]
                if unlisted:
                    raise StorageError(
                        f"tier {unlisted[0]} cannot be listed now (logged above): it may hold "
                        "checkpoints newer than the other tiers', so restore picks none without "
                        "it (a run resumed from an older step, or started over, would save "
                        "those steps again beside them); try again once it can be listed, or "
                        "leave it out of the tiers to restore from the others"
                    )
                found = [(i, n) for n, listing in enumerate(listings) for i in listing or []]
                found.sort(key=lambda f: (_order(f[0]), -f[1]), reverse=True)
                undrained = self._undrained(listings)
                swept = self.tiers[0].memory and listings[0] is not None
            except BaseException as exc:  # told to the peers first: they wait for the list
                error = exc
        message: dict[str, Any] = {
            "candidates": [(i.name, index) for i, index in found],
            "undrained": undrained,
            "sweep": swept,
            **error_vote(error),
        }
        if self._comm.world_size > 1:
            message = json.loads(self._comm.broadcast_bytes(json.dumps(message).encode()))
        raise_first_failure([message], error, "listing the checkpoints")  # rank 0's
        ordered = [(str(n), int(i)) for n, i in message["candidates"]]
        undrained = [(str(n), int(i)) for n, i in message["undrained"]]
        if message["sweep"]:
            memory = self.tiers[0].storage
            committed = {name for name, index in ordered if index == 0}
            for name in {n for n in memory.children() if _NAME.fullmatch(n)} - committed:
                with contextlib.suppress(Exception):
                    if memory.exists(f"{name}/{MANIFEST}"):  # unreadable (a newer format?): kept
                        continue
                    memory.delete_prefix(name)
                    log.info("unickpt: removed the incomplete %s from %s", name, memory.url)
        return ordered, undrained

    def _undrained(
        self, listings: builtins.list[builtins.list[CheckpointInfo] | None]
    ) -> builtins.list[tuple[str, int]]:
        """Committed checkpoints on faster tiers only (a run killed before their drains) that a
        slower tier's retention would keep had they been drained, as (name, the fastest tier
        holding it), oldest first: ``keep_every`` and ``keep_best`` promise them, and the
        memory tier's retention drops them once a newer one is durable."""
        out: dict[str, int] = {}
        for index in range(1, len(self.tiers)):
            held = listings[index]
            if held is None:  # cannot be listed now: nothing to compare with
                continue
            names = {info.name for info in held}
            missing: dict[str, tuple[CheckpointInfo, int]] = {}
            for source in range(index):
                for info in listings[source] or []:
                    if info.name not in names:
                        missing.setdefault(info.name, (info, source))
            if not missing:
                continue
            # As if every missing one had been drained, as it would have been without the crash
            merged = sorted([*held, *(info for info, _ in missing.values())], key=_order)
            victims = set(self._victims(index, [*listings[:index], merged]))
            for name, (_, source) in missing.items():
                if name not in victims:
                    out.setdefault(name, source)
        return sorted(out.items())

    def _agree_readable(self, tier: Tier, name: str) -> tuple[Manifest | None, _Problem]:
        """The candidate's manifest if every rank can read it (and, on the memory tier, every
        file it lists, at its size, on this rank's node); else None and why, on every rank."""
        manifest: Manifest | None = None
        error: BaseException | None = None
        try:
            storage = tier.storage.child(name)
            manifest = read_manifest(storage)
            if tier.memory:
                for file, size in manifest.files.items():
                    if not storage.exists(file) or storage.size(file) != size:
                        raise IncompleteCheckpointError(
                            f"{storage.describe(file)} is missing or truncated on this node"
                        )
        except BaseException as exc:
            error = _vanished(tier, name, exc)
        problem = self._agree_on(f"reading {name} on {tier.url}", error)
        if problem:
            text = problem.text
            log.info("unickpt: %s on %s is not readable everywhere: %s", name, tier.url, text)
            return None, problem
        return manifest, problem

    def _agree_on(self, what: str, error: BaseException | None) -> _Problem:
        """Every rank's outcome of ``what`` (reading or restoring a candidate), agreed: empty
        when it worked on every rank, else why not, when every failure lets the ranks move on
        (an unusable checkpoint, a tier that cannot be read now). Any other failure (the
        caller's to fix, an interrupt) raises on every rank: moving on to an older checkpoint
        would hit it again, and the run would then save over the newer ones. Called by every
        rank whatever its own outcome, so that none returns while a peer still waits."""
        failed = self._failures(error)
        fatal = [(rank, vote) for rank, vote in failed if vote["kind"] == "other"]
        if not fatal:
            return _Problem.of(failed)
        if error is not None and any(rank == self._comm.rank for rank, _ in fatal):
            raise error
        rank, vote = fatal[0]
        raise peer_error(rank, what, vote["type"], vote["error"])

    def _failures(self, error: BaseException | None) -> builtins.list[tuple[int, dict[str, str]]]:
        """(rank, its error and the kind of failure) of every rank where the step failed."""
        kind = (
            "unusable"
            if isinstance(error, _UNUSABLE)
            else "unreachable"
            if isinstance(error, StorageError)
            else "other"
        )
        mine = {**error_vote(error), "kind": kind}
        votes = [json.loads(v) for v in self._comm.all_gather_bytes(json.dumps(mine).encode())]
        return [(rank, vote) for rank, vote in enumerate(votes) if vote["type"]]

    def _restore_from(
        self,
        tier: Tier,
        name: str,
        manifest: Manifest,
        state: dict[str, Any],
        strict: bool,
        verify: bool,
    ) -> int | None:
        full = dict(state)
        saved_rng = manifest.tensors.get(RNG_KEY)
        row = None
        if saved_rng is not None:
            if (
                len(saved_rng.shape) != 2
                or saved_rng.dtype != "int64"
                or saved_rng.shape[0] < 1
                or not 1 <= saved_rng.shape[1] <= _MAX_RNG_WORDS
            ):
                raise CorruptCheckpointError(
                    f"{name} on {tier.url}: tensor {RNG_KEY!r} is {saved_rng.dtype} of shape "
                    f"{list(saved_rng.shape)}, not one row of RNG states per rank"
                )
            world, length = saved_rng.shape
            rank = self._comm.rank % world
            row = torch.empty((1, length), dtype=torch.int64)
            full[RNG_KEY] = ShardedTensor(row, (world, length), (rank, 0))
        result = load(tier.storage.child(name), full, strict=strict, verify=verify)
        state.update({key: full[key] for key in state})  # top-level JSON values were replaced
        if row is not None:
            assert saved_rng is not None
            other_setup = (
                "another world size"
                if saved_rng.shape[0] != self._comm.world_size
                else "another set of generators (CUDA devices), or another torch"
                if saved_rng.shape[1] != rng.capture().numel()
                else ""
            )
            if other_setup:
                log.warning(
                    "unickpt: %s was saved with %s; RNG states not restored", name, other_setup
                )
            else:
                try:
                    rng.restore(row[0])
                except Exception as exc:  # a row load() took as it is (no checksum asked)
                    raise CorruptCheckpointError(
                        f"{name} on {tier.url}: tensor {RNG_KEY!r}: the RNG states of rank "
                        f"{self._comm.rank} cannot be restored: {type(exc).__name__}: {exc}"
                    ) from exc
        return result.step
