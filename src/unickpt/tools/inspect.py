"""Read a checkpoint's manifest without touching its data."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from unickpt.format.manifest import Manifest, read_manifest
from unickpt.storage import Storage, open_storage


def inspect(path: str | Storage, *, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """The committed manifest at ``path``; IncompleteCheckpointError if it was never committed."""
    return read_manifest(open_storage(path, storage_options))
