"""Remove checkpoints that were never committed (committed ones are never touched).

A checkpoint root may hold directories copied or extracted from elsewhere, so anything in one of
them, its in-flight marker above all, may be corrupt or crafted: none of it may crash gc or stop
it from collecting the other directories.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import reprlib
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from unickpt.errors import CheckpointError, CheckpointNotFoundError
from unickpt.format.manifest import INFLIGHT, MANIFEST, written_by_a_save
from unickpt.format.untrusted import read_json
from unickpt.storage import LocalStorage, Storage, open_storage
from unickpt.storage.base import TEMP_INFIX

log = logging.getLogger("unickpt")

# A marker unickpt writes is about 100 bytes; reading a huge one would only exhaust memory.
MAX_MARKER_BYTES = 64 * 1024
# The largest C pid_t. Larger ids overflow os.kill; 0 and negative ones address process groups
# (kill(-1, 0) succeeds while any process lives), so none of these names a saver.
MAX_PID = 2**31 - 1
# How far ahead of ours another host's clock may plausibly be. A save said to start later than
# this would otherwise look young forever and pin its garbage.
MAX_CLOCK_SKEW = 600.0


@dataclass
class GcEntry:
    """One incomplete checkpoint directory, and whether gc removed it (and why not)."""

    name: str
    removed: bool
    reason: str


class _UntrustedMarker(Exception):
    """The in-flight marker cannot be read or does not say who is saving; the message says why."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _read_marker(sub: Storage, marker: str) -> dict[str, Any] | None:
    """The in-flight marker ``marker`` of ``sub`` as a JSON object, None if there is none.

    Raises _UntrustedMarker if it is not a regular file inside ``sub``, too large, or no object.
    """
    try:
        if not sub.exists(marker):
            return None
        # open_reader refuses symlinks out, FIFOs, devices
        doc = read_json(sub, marker, max_bytes=MAX_MARKER_BYTES, what=marker)
    except CheckpointError as exc:
        raise _UntrustedMarker(str(exc)) from exc
    if not isinstance(doc, dict):
        raise _UntrustedMarker("not a JSON object")
    return doc


def _pid(value: Any) -> int:
    """``value`` if it is a process id; raises _UntrustedMarker."""
    if type(value) is not int or not 0 < value <= MAX_PID:  # type(): True is no process id
        raise _UntrustedMarker(f"pid {reprlib.repr(value)} is not a process id")
    return value


def _started(value: Any, now: _dt.datetime) -> _dt.datetime:
    """``value`` as an aware time, at most MAX_CLOCK_SKEW after ``now``; raises _UntrustedMarker."""
    try:
        when = _dt.datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        when = None
    if when is None:
        raise _UntrustedMarker(f"started {reprlib.repr(value)} is not an ISO-8601 time")
    if when.tzinfo is None:  # unickpt writes UTC; a writer that left the zone out meant it too
        when = when.replace(tzinfo=_dt.timezone.utc)
    if (when - now).total_seconds() > MAX_CLOCK_SKEW:
        raise _UntrustedMarker(f"started {reprlib.repr(value)} is in the future")
    return when


def _saver(sub: Storage, marker_file: str, min_age: float, now: _dt.datetime) -> str | None:
    """Why ``sub``'s marker says its saver may be at work, or None if it has none or is done.

    Only what the decision needs must be well-formed: the pid of a saver on this host, the
    start of one on another. Raises _UntrustedMarker.
    """
    marker = _read_marker(sub, marker_file)
    if marker is None:
        return None
    host = marker.get("host")
    if not isinstance(host, str):
        raise _UntrustedMarker(f"host {reprlib.repr(host)} is not a string")
    if host == socket.gethostname():
        pid = _pid(marker.get("pid"))
        return f"save in progress (pid {pid} alive)" if _pid_alive(pid) else None
    age = (now - _started(marker.get("started"), now)).total_seconds()
    return f"save started {age:.0f}s ago on {host}" if age < min_age else None


def _in_progress(sub: Storage, files: list[str], min_age: float) -> str | None:
    """Why ``sub`` (holding ``files``) may still be being written, or None if it is abandoned.

    A saver publishes its marker by writing, syncing and renaming a temporary of it (seconds
    on a slow disk): the temporary speaks for the saver meanwhile, once written (an empty one
    is a writer killed before it wrote, or microseconds from writing), and the marker itself
    is looked at last, in case it was published since ``files`` was listed."""
    now = _dt.datetime.now(_dt.timezone.utc)
    publishing = [f for f in files if f.startswith(f"{INFLIGHT}{TEMP_INFIX}") and _written(sub, f)]
    for marker in [*publishing, INFLIGHT]:
        try:
            busy = _saver(sub, marker, min_age, now)
        except _UntrustedMarker as exc:
            # unickpt publishes its marker atomically and never rewrites it, so a live
            # unickpt saver leaves no such marker, only a temporary not written yet; some other
            # writer may be behind it. The file's age stands in for its start: the grace a
            # save on another host gets.
            mtime = sub.modified(marker)
            busy = f"untrusted in-flight marker ({exc}) of unknown age"
            if mtime is not None:
                age = now.timestamp() - mtime
                busy = f"untrusted in-flight marker ({exc}) written {age:.0f}s ago"
                busy = busy if age < min_age else None
        if busy is not None:
            return busy
    return None


def _written(sub: Storage, path: str) -> bool:
    """Whether ``path`` holds any bytes (False if it is gone)."""
    try:
        return sub.size(path) > 0
    except CheckpointError:
        return False


def _collect(storage: Storage, name: str, dry_run: bool, min_age: float) -> GcEntry | None:
    """Delete the directory ``name`` if it is an abandoned checkpoint; None if not one at all."""
    sub = storage.child(name)
    files = sub.list()
    # A committed checkpoint; or, with one inside, a directory of checkpoints (gc pointed one
    # level too high): its files are no checkpoint's own and must not make it look like one.
    if MANIFEST in files or any(f.endswith(f"/{MANIFEST}") for f in files):
        return None
    if not files:  # a save that died before writing anything, or a stray empty directory
        if dry_run:
            return GcEntry(name, False, "dry run (empty)")
        return GcEntry(name, True, "empty") if storage.remove_if_empty(name) else None
    ours = [f for f in files if written_by_a_save(f)]
    if not ours:
        return None  # not a checkpoint: leave other people's files alone
    busy = _in_progress(sub, files, min_age)
    # A saver publishes its manifest before it deletes its marker, so a save that committed
    # since the listing, its marker gone, shows its manifest now.
    if busy is None and sub.exists(MANIFEST):
        return None
    if busy is not None or dry_run:
        return GcEntry(name, False, busy or "dry run")
    if len(ours) < len(files):  # files no save wrote, put there since: only the save's go
        for file in ours:
            sub.delete(file)
        return GcEntry(
            name, False, f"removed the save's files, kept {len(files) - len(ours)} others"
        )
    storage.delete_prefix(name)
    return GcEntry(name, True, "")


def collect_garbage(
    root: str | Storage,
    *,
    dry_run: bool = False,
    min_age: float = 3600.0,
    storage_options: Mapping[str, Any] | None = None,
) -> list[GcEntry]:
    """Delete the incomplete checkpoints directly under ``root``.

    A directory is a checkpoint if it holds ``manifest.json``, an in-flight marker or data files
    in ``data/``. Committed ones (with a manifest) are never touched, nor is a directory holding
    a committed checkpoint further down (``root`` given one level too high: a run directory).
    An incomplete one is kept while its saver is alive (same host) or, for a saver on another
    host, younger than ``min_age`` seconds. A marker that cannot be read or makes no sense (a
    bad pid, a start in the future) names no saver: the checkpoint is kept until the marker file
    is ``min_age`` seconds old, and for good where the storage cannot tell a file's age. A
    directory gc fails on is reported as kept, with the error as the reason, and the others are
    still collected. On object stores, a directory holding nothing but uploads of a save's data
    files started over ``min_age`` seconds ago (a failed save whose aborts failed too) has them
    aborted.
    """
    storage = open_storage(root, storage_options)
    # A typo must not look like a clean run (on object stores an empty prefix is just empty).
    if isinstance(storage, LocalStorage) and not storage.root_exists():
        raise CheckpointNotFoundError(f"no directory {storage.url} to collect in")
    out = []
    children = storage.children()
    for name in children:
        try:
            entry = _collect(storage, name, dry_run, min_age)
        except CheckpointError as exc:
            log.warning("unickpt gc: skipped %s: %s", storage.describe(name), exc)
            entry = GcEntry(name, False, f"error: {exc}")
        if entry is not None:
            out.append(entry)
    return out + _collect_uploads(storage, set(children), dry_run, min_age)


def _collect_uploads(
    storage: Storage, children: set[str], dry_run: bool, min_age: float
) -> list[GcEntry]:
    """Abort a save's data-file uploads left where nothing else is: a save that failed while
    its store was failing, whose aborts failed but whose marker went, leaves no object under
    its directory, which listings therefore never show. Uploads in a listed directory are its
    collection's (or, committed, never touched); a live save's directory always holds its
    marker, and ``min_age`` guards the rest."""
    try:
        uploads = storage.abandoned_uploads(min_age)
    except CheckpointError as exc:
        log.warning("unickpt gc: cannot look for incomplete uploads: %s", exc)
        return []
    abandoned: dict[str, list[str]] = {}
    for path in uploads:
        name, _, inside = path.partition("/")
        if name not in children and written_by_a_save(inside):
            abandoned.setdefault(name, []).append(path)
    out = []
    for name, paths in sorted(abandoned.items()):
        if dry_run:
            out.append(GcEntry(name, False, "dry run (incomplete uploads only)"))
            continue
        try:
            # A save that started after the children were listed has its marker there by now:
            # it writes that before any data file.
            if storage.child(name).list():
                continue
            for path in paths:
                storage.abort_uploads(path)
        except CheckpointError as exc:
            log.warning("unickpt gc: skipped %s: %s", storage.describe(name), exc)
            out.append(GcEntry(name, False, f"error: {exc}"))
        else:
            out.append(GcEntry(name, True, "incomplete uploads only"))
    return out
