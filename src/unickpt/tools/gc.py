"""Remove checkpoints that were never committed (never committed ones are never touched)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from unickpt.format.manifest import INFLIGHT, MANIFEST
from unickpt.storage import Storage, open_storage

DATA_SUFFIX = ".safetensors"


@dataclass
class GcEntry:
    """One incomplete checkpoint directory, and whether gc removed it (and why not)."""

    name: str
    removed: bool
    reason: str


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


def _in_progress(sub: Storage, min_age: float) -> str | None:
    """Why ``sub`` may still be being written, or None if it is abandoned."""
    if not sub.exists(INFLIGHT):
        return None
    try:
        marker = json.loads(sub.read(INFLIGHT))
        host, pid = str(marker["host"]), int(marker["pid"])
        started = _dt.datetime.fromisoformat(str(marker["started"]))
    except (ValueError, KeyError, TypeError):
        return None
    if host == socket.gethostname():
        return f"save in progress (pid {pid} alive)" if _pid_alive(pid) else None
    age = (_dt.datetime.now(_dt.timezone.utc) - started).total_seconds()
    return f"save started {age:.0f}s ago on {host}" if age < min_age else None


def collect_garbage(
    root: str | Storage,
    *,
    dry_run: bool = False,
    min_age: float = 3600.0,
    storage_options: Mapping[str, Any] | None = None,
) -> list[GcEntry]:
    """Delete the incomplete checkpoints directly under ``root``.

    A directory is a checkpoint if it holds ``manifest.json``, an in-flight marker or data files.
    Committed ones (with a manifest) are never touched. An incomplete one is kept while its saver
    is alive (same host) or, for a saver on another host, younger than ``min_age`` seconds.
    """
    storage = open_storage(root, storage_options)
    out = []
    for name in storage.children():
        sub = storage.child(name)
        files = sub.list()
        if MANIFEST in files:
            continue
        if not files:  # a save that died before writing anything, or a stray empty directory
            if dry_run:
                out.append(GcEntry(name, False, "dry run (empty)"))
            elif storage.remove_if_empty(name):
                out.append(GcEntry(name, True, "empty"))
            continue
        if INFLIGHT not in files and not any(
            f.endswith(DATA_SUFFIX) or ".tmp-" in f for f in files
        ):
            continue  # not a checkpoint: leave other people's files alone
        busy = _in_progress(sub, min_age)
        if busy is None and not dry_run:
            storage.delete_prefix(name)
        out.append(
            GcEntry(name, busy is None and not dry_run, busy or ("dry run" if dry_run else ""))
        )
    return out
