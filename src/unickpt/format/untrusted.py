"""Parsing JSON read from a checkpoint, which may be corrupt or crafted."""

from __future__ import annotations

import json
from typing import Any

from unickpt.errors import CorruptCheckpointError


def parse_json(text: bytes | str, what: str) -> Any:
    """The JSON value in ``text``; any defect raises CorruptCheckpointError naming ``what``.

    Besides malformed JSON, ``json.loads`` raises ValueError for integers beyond Python's
    digit limit and RecursionError for deep nesting: each is one more corrupt file, not a crash.
    """
    try:
        return json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{what} is not valid JSON: {exc}") from exc
