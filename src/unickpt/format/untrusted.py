"""JSON read from a checkpoint, which may be corrupt or crafted, and the JSON size of values
about to be written (a crafted pickle in a foreign checkpoint among them)."""

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
        seen: set[str] = set()  # not names[:i] for each i: a 200k-name manifest took 20 min
        for name, _ in pairs:
            if name in seen:
                raise ValueError(f"the name {name!r} appears twice in one object")
            seen.add(name)
    return out


def json_size_bound(value: Any, limit: int) -> int:
    """A lower bound of ``len(json.dumps(value))``, in time linear in the distinct lists,
    tuples and dicts in ``value``; once it exceeds ``limit``, some number above ``limit``.

    JSON writes a list once per reference to it, so a value can be exponentially larger as
    JSON than in memory or as a pickle: 40 nested lists, each holding the one inside it twice,
    are 390 bytes of pickle and 2**40 lists of JSON. Check this before ``json.dumps``. A
    container that holds itself counts as small here; ``json.dumps`` refuses it. Nesting
    deeper than the recursion limit raises RecursionError, as ``json.dumps`` does.
    """
    sizes: dict[int, int] = {}

    def size(node: Any) -> int:
        if isinstance(node, str):
            return len(node) + 2
        if isinstance(node, int):  # its digits, without writing them (a 4,000-digit int...)
            return max(1, int(abs(node).bit_length() * 0.30102))
        if not isinstance(node, list | tuple | dict):
            return 1
        known = sizes.get(id(node))
        if known is not None:
            return known
        sizes[id(node)] = 0  # in progress: a cycle
        total = 1  # the brackets, less the comma before the first item
        pairs = node.items() if isinstance(node, dict) else ((None, item) for item in node)
        for name, item in pairs:
            # a key that is no string: JSON writes a number as text, and refuses the rest
            key = 0 if name is None else (size(name) if isinstance(name, str | int) else 1) + 1
            total += 1 + size(item) + key
            if total > limit:
                break
        total = max(total, 2)
        sizes[id(node)] = total
        return total

    return size(value)
