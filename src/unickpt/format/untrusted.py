"""Parsing JSON read from a checkpoint, which may be corrupt or crafted."""

from __future__ import annotations

import json
from typing import Any

from unickpt.errors import CorruptCheckpointError
from unickpt.storage.base import Storage


def read_json(storage: Storage, path: str, *, max_bytes: int, what: str) -> Any:
    """The JSON value in file ``path`` of ``storage``, read only if at most ``max_bytes`` long
    (a small file the checkpoint describes itself with); any defect raises
    CorruptCheckpointError naming ``what``."""
    with storage.open_reader(path) as reader:
        size = reader.size()
        if size > max_bytes:
            raise CorruptCheckpointError(
                f"{what} is {size} bytes, more than the {max_bytes} allowed"
            )
        text = bytes(reader.read(0, size))
    return parse_json(text, what)


def parse_json(text: bytes | str, what: str) -> Any:
    """The JSON value in ``text``; any defect raises CorruptCheckpointError naming ``what``.

    Besides malformed JSON, ``json.loads`` raises ValueError for integers beyond Python's
    digit limit and RecursionError for deep nesting: each is one more corrupt file, not a crash.
    """
    try:
        return json.loads(text, object_pairs_hook=_unique_names)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{what} is not valid JSON: {exc}") from exc


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose names are unique: readers that keep the first of two equal names
    and readers that keep the last would see two different checkpoints."""
    out = dict(pairs)
    if len(out) != len(pairs):
        names = [name for name, _ in pairs]
        twice = next(name for index, name in enumerate(names) if name in names[:index])
        raise ValueError(f"the name {twice!r} appears twice in one object")
    return out
