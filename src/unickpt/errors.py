"""Every failure unickpt detects raises a subclass of :class:`CheckpointError`.

Messages name the checkpoint, tensor, chunk and file involved, so that a user reading a log line
knows what to fix without a debugger.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Mapping, Sequence
from typing import Any


class CheckpointError(Exception):
    """Base class of all errors raised by unickpt."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path holds no checkpoint at all (no directory, no manifest, no data)."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A save targeted a path that already holds a committed checkpoint."""


class IncompleteCheckpointError(CheckpointError):
    """The checkpoint was never committed: data may exist but ``manifest.json`` does not."""


class CorruptCheckpointError(CheckpointError):
    """Committed data does not match its manifest (checksum, size, header) or is unreadable."""


class UnsupportedFormatError(CorruptCheckpointError):
    """The manifest names a format or version this unickpt cannot read."""


class UnsafeCheckpointError(CheckpointError):
    """Reading the checkpoint would escape its directory or unpickle without the caller's opt-in."""


class StateMismatchError(CheckpointError):
    """The state passed to ``load`` does not match the checkpoint (keys, shapes, dtypes)."""


class InvalidStateError(CheckpointError):
    """The state passed to ``save`` cannot be checkpointed as given (bad key, leaf or sharding),
    or one passed to ``load`` cannot be walked (nested too deeply)."""


class StateChangedError(CheckpointError):
    """A lazy save's state was updated in place before the save had copied it."""


class StorageError(CheckpointError):
    """The storage backend failed (disk full, permission denied, unreachable store)."""


class CollectiveError(CheckpointError):
    """A collective of a save or load failed or timed out: a peer did not make the same call
    (another path, mode or step, or no call at all), failed before it, or died."""


class ConversionError(CheckpointError):
    """A conversion spec is invalid, or a source checkpoint does not fit it (docs/CONVERT.md)."""


def error_class(name: str) -> type[CheckpointError]:
    """The unickpt error class called ``name``; CheckpointError for any other name."""
    known = {cls.__name__: cls for cls in _subclasses(CheckpointError)}
    return known.get(name, CheckpointError)


def error_vote(error: BaseException | None) -> dict[str, str]:
    """What a rank tells its peers of its outcome: its error's message and class name, both
    empty if it has none (a peer that only hears of it raises :func:`peer_error`)."""
    if error is None:
        return {"error": "", "type": ""}
    return {"error": str(error), "type": type(error).__name__}


def peer_error(rank: int, what: str, kind: str, message: str) -> CheckpointError:
    """Rank ``rank``'s failure of ``what`` (``kind``: the class name of its error), as a rank
    that only heard of it raises it: of the same unickpt class, where it was one, so that
    every rank can tell a storage outage from a corrupt checkpoint alike."""
    return error_class(kind)(f"{what} failed on rank {rank}: {kind}: {message}")


def raise_first_failure(
    votes: Sequence[Mapping[str, Any]], local: BaseException | None, what: str
) -> None:
    """Raise this rank's own error, else the first failing rank's, as one of its class:
    ``votes`` are every rank's :func:`error_vote`, in rank order."""
    if local is not None:
        raise local
    for rank, vote in enumerate(votes):
        if vote["type"]:
            raise peer_error(rank, what, vote["type"], vote["error"])


# C0, DEL and C1 (Unicode's "Cc" characters), and lone surrogates, which no encoding prints
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def printable(text: str, *, keep: str = "") -> str:
    """``text`` with each control character but those in ``keep``, and each lone surrogate,
    shown as repr shows it (ESC as ``\\x1b``): for every string of checkpoint origin that may
    reach a terminal (paths, tensor and object names, messages quoting them, warnings), as a
    crafted checkpoint must not send escape sequences (clear the screen, retitle or recolour
    the terminal) to one or to a log later shown on one, nor make printing fail."""
    return _UNPRINTABLE.sub(lambda m: m[0] if m[0] in keep else repr(m[0])[1:-1], text)


def first_few(items: Sequence[str], shown: int = 3) -> str:
    """The first ``shown`` of ``items`` joined for a message, and how many more there are."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, 60, 60
    return short


_SHORT = _short_repr()


def short_repr(value: Any) -> str:
    """At most a few hundred characters of ``value``'s repr: for checkpoint content quoted in a
    message, which may be crafted, huge or self-sharing (a list holding another twice, 40 deep,
    whose full repr would never end)."""
    return _SHORT.repr(value)


def _subclasses(cls: type[CheckpointError]) -> list[type[CheckpointError]]:
    return [cls, *(sub for direct in cls.__subclasses__() for sub in _subclasses(direct))]
