"""CheckpointManager: when to save, what to keep, where to resume from."""

from __future__ import annotations

import builtins
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from unickpt.engine.background import (
    BusyPolicy,
    SaveHandle,
    before_update,
    release_staging_memory,
)
from unickpt.engine.comm import Comm
from unickpt.engine.load import load
from unickpt.engine.result import SaveResult
from unickpt.engine.save import SaveMode, save
from unickpt.errors import CheckpointError, CorruptCheckpointError, IncompleteCheckpointError
from unickpt.format.manifest import MANIFEST, read_manifest
from unickpt.layout.sharded import ShardedTensor
from unickpt.manager import rng
from unickpt.storage import open_storage

log = logging.getLogger("unickpt")

LATEST = "latest"
RNG_KEY = "__rng__"


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint under the manager's root."""

    name: str
    path: str
    step: int | None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Pending:
    name: str
    step: int
    handle: SaveHandle


class CheckpointManager:
    """Saves on a schedule, keeps what the retention policy says, restores the newest.

    Every rank constructs it with the same arguments and calls it at the same points (SPMD).
    ``every_n_steps`` / ``every_n_seconds`` say when :meth:`maybe_save` saves (the time test is
    decided by rank 0, so all ranks agree). Retention keeps the ``keep_last`` newest, every step
    divisible by ``keep_every``, and the ``keep_best = (metric, n)`` best by ``best_mode``; it
    never deletes the newest committed checkpoint nor one being written. RNG states (torch CPU,
    CUDA, numpy, python) are saved per rank and restored when the world size is unchanged.
    """

    def __init__(
        self,
        root: str,
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
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError("keep_last must be at least 1 (the newest checkpoint is always kept)")
        self.root = root
        self._storage = open_storage(root, storage_options)
        self._options = storage_options
        self.every_n_steps = every_n_steps
        self.every_n_seconds = every_n_seconds
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.keep_best = keep_best
        self.best_mode = best_mode
        self.mode: SaveMode = mode
        self.if_busy: BusyPolicy = if_busy
        self.save_rng = save_rng
        self._comm = Comm()
        self._pending: list[_Pending] = []
        self._last_save = time.monotonic()
        self._infos: dict[str, CheckpointInfo] = {}

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

    def maybe_save(
        self,
        step: int,
        state: dict[str, Any],
        metrics: dict[str, Any] | None = None,
        *,
        force: bool = False,
    ) -> SaveResult | SaveHandle | None:
        """Save ``state`` as step ``step`` if the schedule (or ``force``) says so."""
        self._reap(block=False)
        if not (force or self._due(step)):
            return None
        self._last_save = time.monotonic()
        name = self.name_for(step)
        full = dict(state)
        if self.save_rng:
            row = rng.capture()
            world, rank = self._comm.world_size, self._comm.rank
            full[RNG_KEY] = ShardedTensor(row[None], (world, row.numel()), (rank, 0))
        metadata = {"metrics": dict(metrics or {})}
        path = f"{self.root.rstrip('/')}/{name}"
        if self.mode == "sync":
            result = save(
                path,
                full,
                step=step,
                user_metadata=metadata,
                if_busy=self.if_busy,
                storage_options=self._options,
            )
            self._committed(name)
            return result
        handle = save(
            path,
            full,
            mode=self.mode,
            step=step,
            user_metadata=metadata,
            if_busy=self.if_busy,
            storage_options=self._options,
        )
        if not handle.skipped:
            self._pending.append(_Pending(name, step, handle))
        return handle

    def before_update(self) -> None:
        """Block until the pending lazy save has copied the state (for custom update loops)."""
        before_update()

    def wait(self) -> None:
        """Block until every save started by this manager is committed (or failed)."""
        self._reap(block=True)

    def close(self) -> None:
        """Wait for every save, then free the host memory that staged them."""
        self.wait()
        release_staging_memory()

    def _reap(self, *, block: bool) -> None:
        still = []
        for pending in self._pending:
            if not (block or pending.handle.done):
                still.append(pending)
                continue
            try:
                pending.handle.wait()
            except CheckpointError as exc:
                log.error("unickpt: checkpoint %s failed: %s", pending.name, exc)
                continue
            self._committed(pending.name)
        self._pending = still

    def _committed(self, name: str) -> None:
        if self._comm.rank != 0:
            return
        self._storage.put_atomic(LATEST, name.encode())
        self._retain()

    # ---------------------------------------------------------------------------- retention

    def _info(self, name: str) -> CheckpointInfo | None:
        if name not in self._infos:
            try:
                manifest = read_manifest(self._storage.child(name))
            except CheckpointError:
                return None
            metrics = manifest.user_metadata.get("metrics", {})
            self._infos[name] = CheckpointInfo(
                name,
                f"{self.root.rstrip('/')}/{name}",
                manifest.step,
                metrics if isinstance(metrics, dict) else {},
            )
        return self._infos[name]

    def list(self) -> builtins.list[CheckpointInfo]:
        """Committed checkpoints under the root, oldest step first."""
        infos = []
        for name in self._storage.children():
            if self._storage.exists(f"{name}/{MANIFEST}") and (info := self._info(name)):
                infos.append(info)
        return sorted(infos, key=lambda i: (i.step if i.step is not None else -1, i.name))

    def _retain(self) -> None:
        committed = self.list()
        if not committed:
            return
        keep = {committed[-1].name}
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
            scored = [i for i in committed if isinstance(i.metrics.get(metric), int | float)]
            scored.sort(key=lambda i: i.metrics[metric], reverse=self.best_mode == "max")
            keep |= {i.name for i in scored[:count]}
        writing = {p.name for p in self._pending if not p.handle.done}
        for info in committed:
            if info.name not in keep and info.name not in writing:
                # Un-commit first: a crash mid-delete leaves an incomplete checkpoint for gc.
                self._storage.delete(f"{info.name}/{MANIFEST}")
                self._storage.delete_prefix(info.name)
                self._infos.pop(info.name, None)
                log.info("unickpt: retention removed %s", info.name)

    # ------------------------------------------------------------------------------ restore

    def latest(self) -> str | None:
        """Path of the newest committed checkpoint, or None.

        Found by listing, not by the ``latest`` pointer file: that file is written for external
        tools and may lag behind a commit or name a checkpoint deleted since.
        """
        committed = self.list()
        return committed[-1].path if committed else None

    def restore(self, state: dict[str, Any], *, strict: bool = True) -> int | None:
        """Load the newest loadable checkpoint into ``state`` (any layout); its step, or None.

        A corrupt or incomplete newest checkpoint is skipped (logged) for the next older one.
        """
        self.wait()
        for info in reversed(self.list()):
            try:
                return self._restore_from(info, state, strict)
            except (CorruptCheckpointError, IncompleteCheckpointError) as exc:
                log.warning("unickpt: cannot restore %s (%s); trying an older one", info.name, exc)
        return None

    def _restore_from(
        self, info: CheckpointInfo, state: dict[str, Any], strict: bool
    ) -> int | None:
        manifest = read_manifest(self._storage.child(info.name))
        full = dict(state)
        saved_rng = manifest.tensors.get(RNG_KEY)
        row = None
        if saved_rng is not None:
            world, length = saved_rng.shape
            rank = self._comm.rank % world
            row = torch.empty((1, length), dtype=torch.int64)
            full[RNG_KEY] = ShardedTensor(row, (world, length), (rank, 0))
        result = load(info.path, full, strict=strict, storage_options=self._options)
        if row is not None:
            if saved_rng is not None and saved_rng.shape[0] == self._comm.world_size:
                rng.restore(row[0])
            else:
                log.warning(
                    "unickpt: %s was saved at another world size; RNG states not restored",
                    info.name,
                )
        return result.step
