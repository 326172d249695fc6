"""Storage tiers of a CheckpointManager: where each one lives and how the list is spelled.

A manager is given one root (a single tier, as before) or a list of tiers, fastest first. The
only tier that is not a plain storage URL is the memory tier: ``"memory"`` (a directory under
``/dev/shm/unickpt`` named after the slower tiers) or ``"memory:///ABSOLUTE/DIR"``. It is a
node-local shared-memory (tmpfs) directory written with the ordinary local backend, so that a
snapshot outlives a crashed trainer on the same node and every rank of that node sees every
file of it — which a process-local ``memory://`` namespace can do neither of.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from unickpt.errors import StorageError
from unickpt.storage import LocalStorage, Storage, open_storage

SHM_ROOT = "/dev/shm/unickpt"
MEMORY = "memory"
_MEMORY_URL = "memory://"

RootOrTiers = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


@dataclass(frozen=True)
class Tier:
    """One place checkpoints are kept.

    ``url`` names it in listings and messages (``memory:///dev/shm/...`` for the memory tier);
    ``root`` is what a checkpoint path under it starts with (loadable by ``unickpt.load``).
    """

    url: str
    root: str
    storage: Storage
    memory: bool = False

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"


def tier_count(root_or_tiers: RootOrTiers) -> int:
    """How many tiers the caller named, whether or not they make sense."""
    if isinstance(root_or_tiers, str | os.PathLike):
        return 1
    try:
        return len(root_or_tiers)
    except TypeError:
        return 1


def _run_id(durable: Sequence[Tier]) -> str:
    """A directory name that is the same for every rank and every restart of one run: the last
    component of the first slower tier (for humans) and a digest of all their URLs."""
    digest = hashlib.sha256("\n".join(t.storage.url for t in durable).encode()).hexdigest()
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", durable[0].storage.url.rstrip("/").rsplit("/", 1)[-1])
    return f"{base.strip('._') or 'run'}-{digest[:12]}"


def _shared_root() -> None:
    """Create SHM_ROOT the way /tmp is (world-writable, sticky) so that the first user's runs
    do not lock out everybody else's on a shared node."""
    try:
        os.mkdir(SHM_ROOT)
    except FileExistsError:
        return
    except OSError as exc:
        raise StorageError(f"cannot create the memory tier's directory {SHM_ROOT}: {exc}") from exc
    os.chmod(SHM_ROOT, 0o1777)


def _private_directory(path: str) -> None:
    """Make sure ``path`` is a directory only this user can read or write (mode 0700; created
    if missing). Restore trusts what a memory tier holds, and under the shared SHM_ROOT, its
    name predictable, another local user could otherwise have made it first, or a symlink in
    its place, and planted a checkpoint there for the run to resume from."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StorageError(f"cannot create the memory tier's directory {path}: {exc}") from exc
    try:
        found = os.lstat(path)
        if stat.S_ISDIR(found.st_mode) and found.st_uid == os.geteuid():
            os.chmod(path, 0o700)  # made by an earlier version, readable by every user
            return
    except OSError as exc:
        raise StorageError(f"cannot check the memory tier's directory {path}: {exc}") from exc
    if not stat.S_ISDIR(found.st_mode):
        problem = "a symlink" if stat.S_ISLNK(found.st_mode) else "not a directory"
    else:
        problem = f"owned by another user (uid {found.st_uid})"
    raise StorageError(
        f"the memory tier's directory {path} is {problem}: refused, as checkpoints found there "
        "would be restored; remove it, or name the tier's directory with 'memory:///DIR'"
    )


def _memory_dir(spec: str) -> str | None:
    """The directory of a memory tier spelled ``spec``, '' to derive it, None if not one."""
    if spec == MEMORY:
        return ""
    if not spec.startswith(_MEMORY_URL):
        return None
    path = spec[len(_MEMORY_URL) :]
    if not path.startswith("/"):
        raise StorageError(
            f"tier {spec!r}: a memory tier is 'memory' or 'memory:///ABSOLUTE/DIR' (a node-local "
            "shared-memory directory); process-local memory:// namespaces cannot outlive a "
            "crashed trainer nor be read by the other ranks of a node"
        )
    return path


def parse_tiers(
    root_or_tiers: RootOrTiers, storage_options: Mapping[str, Any] | None
) -> list[Tier]:
    """The tiers, fastest first (one root: a one-tier manager). ``storage_options`` go to the
    ``s3://`` tiers."""
    if isinstance(root_or_tiers, str | os.PathLike):
        root_or_tiers = [root_or_tiers]
    specs = [os.fspath(spec) for spec in root_or_tiers]
    if not specs:
        raise ValueError("a CheckpointManager needs at least one tier")
    if storage_options and not any(spec.startswith("s3://") for spec in specs):
        raise ValueError(f"storage_options configure s3:// tiers, and {specs} has none")
    memory = _memory_dir(specs[0])
    if any(_memory_dir(spec) is not None for spec in specs[1:]):
        raise ValueError(f"the memory tier must come first (the fastest): {specs}")
    durable = [
        Tier(spec, spec, open_storage(spec, storage_options if spec.startswith("s3://") else None))
        for spec in (specs if memory is None else specs[1:])
    ]
    if memory is None:
        return durable
    if not durable:
        raise ValueError(
            "a memory tier needs a slower, durable tier to drain to, e.g. "
            "['memory', '/path/to/ckpts'] or ['memory', 's3://bucket/run']"
        )
    if not memory:
        if not os.path.isdir(os.path.dirname(SHM_ROOT)):
            raise StorageError(
                f"{os.path.dirname(SHM_ROOT)} does not exist on this host: name the memory "
                "tier's directory on a tmpfs explicitly, 'memory:///path/to/tmpfs/dir'"
            )
        _shared_root()
        memory = os.path.join(SHM_ROOT, _run_id(durable))
        _private_directory(memory)
    memory = os.path.abspath(memory)  # one the caller names is the caller's to secure
    return [
        Tier(f"{_MEMORY_URL}{memory}", memory, LocalStorage(memory, node_local=True), memory=True),
        *durable,
    ]
