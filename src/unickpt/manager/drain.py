"""Draining a committed checkpoint from a faster tier to a slower one, in the background.

Protocol (every rank, over a process group of its own — never the training loop's):
(1) rank 0 reads the source manifest, marks the target in flight, and broadcasts the file list
(or why it cannot, or that the target already holds the checkpoint); (2) every rank says which
of those files it can read locally with the right size (a node-local memory tier holds only the
node's files); each file goes to one rank that sees it, its writer when possible; (3) every rank
streams its files in bounded chunks; (4) the ranks all-gather their outcomes, and only if every
copy succeeded rank 0 publishes the manifest's exact bytes last (``put_atomic``), so the slower
tier's copy becomes visible complete or not at all; (5) rank 0 broadcasts the outcome, so every
rank returns or raises together. A local failure is carried to the next collective, never
raised before it, so no rank is left waiting.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass

from unickpt.engine.comm import Comm
from unickpt.engine.save import mark_inflight, tidy
from unickpt.errors import CheckpointExistsError, CorruptCheckpointError, StorageError
from unickpt.format.manifest import INFLIGHT, MANIFEST, Manifest
from unickpt.storage import RateLimit, Storage, rate_limited

log = logging.getLogger("unickpt")

COPY_CHUNK = 8 << 20  # bytes held per copy: a file is never read into memory whole
_WRITER = re.compile(r"(?:^|/)r(\d+)-[^/]*$")  # data/r<RANK:05d>-<uid>-<i>.safetensors


@dataclass(frozen=True)
class DrainError:
    """A checkpoint that did not reach a slower tier (it stays on the faster ones)."""

    name: str
    tier: str
    message: str

    def __str__(self) -> str:
        return f"checkpoint {self.name} did not reach tier {self.tier}: {self.message}"


@dataclass(frozen=True)
class DrainResult:
    """What one rank did in one drain: bytes and files it copied; False ``copied`` if the
    target already held the checkpoint."""

    copied: bool
    files: int
    nbytes: int
    seconds: float


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def copy_file(
    source: Storage,
    target: Storage,
    path: str,
    size: int,
    buffer: bytearray,
    write_limit: RateLimit | None = None,
) -> None:
    """Stream ``path`` of ``size`` bytes from ``source`` to ``target`` through ``buffer``."""
    with source.open_reader(path) as reader:
        if reader.size() != size:
            raise CorruptCheckpointError(
                f"data file {source.describe(path)} has {reader.size()} bytes, "
                f"the manifest says {size}"
            )
        view = memoryview(buffer)
        with rate_limited(target.open_writer(path), write_limit) as writer:
            offset = 0
            while offset < size:
                count = min(len(buffer), size - offset)
                reader.read_into(offset, view[:count])
                writer.write(view[:count])
                offset += count


def _owners(files: list[str], seen: list[set[int]], world: int) -> list[int | None]:
    """For each file, the rank that copies it: its writer if that rank sees it (spreads the
    work as the save did), else one of the ranks that see it; None if no rank does."""
    owners: list[int | None] = []
    for index, name in enumerate(files):
        holders = [rank for rank in range(world) if index in seen[rank]]
        match = _WRITER.search(name)
        preferred = int(match.group(1)) % world if match else index % world
        if not holders:
            owners.append(None)
        else:
            owners.append(preferred if preferred in holders else holders[index % len(holders)])
    return owners


def drain(
    comm: Comm,
    source_root: Storage,
    target_root: Storage,
    name: str,
    *,
    write_limit: RateLimit | None = None,
) -> DrainResult:
    """Copy the committed checkpoint ``name`` from ``source_root`` to ``target_root`` (a
    collective over ``comm``), writing at most as fast as ``write_limit`` allows. Raises
    StorageError on every rank if it did not commit."""
    started = time.monotonic()
    source, target = source_root.child(name), target_root.child(name)
    where = f"{name} from {source_root.url} to {target_root.url}"

    # (1) what to copy, as rank 0 sees it
    text = b""
    intro: dict[str, object] = {"error": None, "present": False, "files": {}}
    if comm.rank == 0:
        try:
            text = source.read(MANIFEST)
            manifest = Manifest.from_json(text, where=source.describe(MANIFEST))
            if target.exists(MANIFEST):
                if target.read(MANIFEST) != text:  # e.g. a run that went back and re-saved
                    raise StorageError(
                        f"{target.url} already holds a different checkpoint of that name; "
                        "it is not overwritten"
                    )
                intro["present"] = True
                with contextlib.suppress(Exception):  # what a drain killed after publishing left
                    tidy(target, manifest)
            else:
                intro["files"] = manifest.files
                target_root.delete_prefix(name)  # what a drain killed mid-copy left
                mark_inflight(target)
        except Exception as exc:
            intro["error"] = _describe(exc)
    intro = json.loads(comm.broadcast_bytes(json.dumps(intro).encode()))
    if intro["error"]:
        raise StorageError(f"drain of {where} failed before copying: {intro['error']}")
    if intro["present"]:
        return DrainResult(False, 0, 0, time.monotonic() - started)
    sizes = intro["files"]
    assert isinstance(sizes, dict)
    files = sorted(sizes)

    # (2) who sees which file
    visible: list[int] = []
    for index, path in enumerate(files):
        with contextlib.suppress(Exception):
            if source.exists(path) and source.size(path) == sizes[path]:
                visible.append(index)
    seen = [set(json.loads(g)) for g in comm.all_gather_bytes(json.dumps(visible).encode())]
    owners = _owners(files, seen, comm.world_size)
    unseen = [path for path, owner in zip(files, owners, strict=True) if owner is None]

    # (3) copy this rank's share
    error = ""
    mine = [path for path, owner in zip(files, owners, strict=True) if owner == comm.rank]
    nbytes = 0
    if unseen:
        error = f"no rank can read {unseen[:3]} from {source.url} (missing or truncated)"
    else:
        try:  # a failure of any kind is told to the peers below: they wait for this rank
            buffer = bytearray(min(COPY_CHUNK, max((sizes[p] for p in mine), default=0)))
            for path in mine:
                copy_file(source, target, path, sizes[path], buffer, write_limit)
                nbytes += sizes[path]
        except BaseException as exc:
            error = f"rank {comm.rank}: {_describe(exc)}"

    # (4) publish last, only if every copy landed; (5) tell everyone
    errors = [e.decode() for e in comm.all_gather_bytes(error.encode()) if e]
    outcome = ""
    if comm.rank == 0:
        try:
            if errors:
                raise StorageError("; ".join(dict.fromkeys(errors)))
            target.put_atomic(MANIFEST, text, replace=False)
        except CheckpointExistsError as exc:  # another writer's checkpoint: not ours to delete
            outcome = str(exc)
        except Exception as exc:
            outcome = str(exc) if isinstance(exc, StorageError) else _describe(exc)
            with contextlib.suppress(Exception):  # best effort: gc takes what is left
                target_root.delete_prefix(name)
        else:
            with contextlib.suppress(Exception):  # committed; a stale marker is only clutter
                target.delete(INFLIGHT)
    outcome = comm.broadcast_bytes(outcome.encode()).decode()
    if outcome:
        raise StorageError(f"drain of {where} failed, nothing was committed there: {outcome}")
    return DrainResult(True, len(mine), nbytes, time.monotonic() - started)
