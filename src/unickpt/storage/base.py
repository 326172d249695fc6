"""The storage interface: everything unickpt needs from a place that holds checkpoints.

A Storage is rooted at one location (a directory, a bucket prefix, a memory namespace) and takes
relative POSIX paths. Implementations must refuse paths that escape the root.
"""

from __future__ import annotations

import abc
import builtins
import contextlib
import math
import posixpath
import threading
import time
from collections.abc import Iterator
from types import TracebackType

from unickpt.errors import (
    CheckpointError,
    CorruptCheckpointError,
    StorageError,
    UnsafeCheckpointError,
)

# A local file is written as <name><TEMP_INFIX><random>, then renamed to <name> once durable.
TEMP_INFIX = ".tmp-"


def check_relative_path(path: str) -> str:
    """``path`` if it is a safe relative POSIX path inside the root; raises otherwise."""
    if not isinstance(path, str) or not path:
        raise UnsafeCheckpointError(f"path {path!r} is not a non-empty string")
    if "\\" in path or "\x00" in path:
        raise UnsafeCheckpointError(f"path {path!r} contains a forbidden character")
    if posixpath.isabs(path):
        raise UnsafeCheckpointError(f"path {path!r} is absolute; checkpoint paths must be relative")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafeCheckpointError(f"path {path!r} escapes or is not normalised ('.', '..', '//')")
    return path


def require_range(where: str, offset: int, nbytes: int, size: int) -> None:
    """Raise CorruptCheckpointError unless bytes [offset, offset + nbytes) lie in a file of
    ``size`` bytes: a read past the end means the file was truncated."""
    if offset < 0 or offset + nbytes > size:
        raise CorruptCheckpointError(
            f"file {where} is truncated: need bytes [{offset}, {offset + nbytes}) "
            f"but the file has {size}"
        )


class Writer(abc.ABC):
    """A file being written sequentially; visible under its path only after :meth:`close`."""

    @abc.abstractmethod
    def write(self, data: memoryview | bytes) -> None: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Make the data durable (fsync or upload completion) and the file visible."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Discard what was written; never raises."""

    def __enter__(self) -> Writer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
        else:
            self.abort()


class RateLimit:
    """A cap on the bytes per second written through it, shared by all the writers it is given
    to (thread-safe): one save's streams, or a manager's saves and drains. Each write waits for
    its turn on a virtual clock that advances by ``nbytes / bytes_per_second``, so the writers
    together average at most the cap and never burst above it, while a write slower than its
    turn earns no credit for later ones.

    Meant for storage or networks shared with other traffic: a capped save commits later and
    costs the training loop no less (measured in bench/README.md, ``async_save.py``).
    """

    def __init__(self, bytes_per_second: float) -> None:
        if not (isinstance(bytes_per_second, (int, float)) and math.isfinite(bytes_per_second)):
            raise ValueError(f"a write rate must be a finite number, not {bytes_per_second!r}")
        if bytes_per_second <= 0:
            raise ValueError(f"a write rate must be positive, not {bytes_per_second!r} bytes/s")
        self.bytes_per_second = float(bytes_per_second)
        self._lock = threading.Lock()
        self._next_turn = 0.0  # time.monotonic() at which the next write may start

    def acquire(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more may be written."""
        with self._lock:
            now = time.monotonic()
            turn = max(now, self._next_turn)
            self._next_turn = turn + nbytes / self.bytes_per_second
        if turn > now:
            time.sleep(turn - now)


class _RateLimitedWriter(Writer):
    def __init__(self, inner: Writer, limit: RateLimit) -> None:
        self._inner = inner
        self._limit = limit

    def write(self, data: memoryview | bytes) -> None:
        self._limit.acquire(memoryview(data).nbytes)
        self._inner.write(data)

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()


def as_rate_limit(rate: float | RateLimit | None) -> RateLimit | None:
    """A limit of ``rate`` bytes per second (a given :class:`RateLimit` is shared as is)."""
    return rate if rate is None or isinstance(rate, RateLimit) else RateLimit(rate)


def rate_limited(writer: Writer, limit: RateLimit | None) -> Writer:
    """``writer``, its writes held to ``limit`` when there is one."""
    return writer if limit is None else _RateLimitedWriter(writer, limit)


class Reader(abc.ABC):
    """Random access to one stored file."""

    @abc.abstractmethod
    def size(self) -> int: ...

    @abc.abstractmethod
    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the bytes at ``offset``; a short file raises CorruptCheckpointError."""

    def read_into_many(self, offset: int, outs: list[memoryview]) -> None:
        """Fill ``outs`` one after the other from the bytes starting at ``offset``."""
        for out in outs:
            self.read_into(offset, out)
            offset += out.nbytes

    def read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        self.read_into(offset, memoryview(buf))
        return buf

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Storage(abc.ABC):
    """A rooted namespace of files. ``url`` names the root in messages.

    ``node_local``: every node has its own copy of this root (a memory tier's tmpfs directory),
    so ranks on different nodes write to different places under the same name.
    """

    url: str
    node_local: bool = False

    @abc.abstractmethod
    def open_writer(self, path: str) -> Writer:
        """Stream a new file to ``path`` (replacing any previous one on close)."""

    @abc.abstractmethod
    def open_reader(self, path: str) -> Reader: ...

    @abc.abstractmethod
    def put_atomic(self, path: str, data: bytes, *, replace: bool = True) -> None:
        """Publish a small object at once: readers see the old content or the new, never a mix.

        With ``replace=False`` an existing ``path`` is kept and CheckpointExistsError raised,
        so that of writers racing to publish one path exactly one wins.
        """

    @abc.abstractmethod
    def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Every file under ``prefix`` (a directory path, '' for the root), as relative paths."""

    @abc.abstractmethod
    def delete(self, path: str) -> None:
        """Remove one file; a missing file is not an error."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove every file under ``prefix`` (a directory path) and the prefix itself."""

    @abc.abstractmethod
    def child(self, prefix: str) -> Storage:
        """The storage rooted at ``prefix`` under this root."""

    @abc.abstractmethod
    def children(self) -> builtins.list[str]:
        """Names of the sub-namespaces (directories, prefixes) directly under the root."""

    def abandoned_uploads(self, older_than: float) -> builtins.list[str]:
        """Paths of writes begun more than ``older_than`` seconds ago and never finished that
        listings do not show (an object store's multipart uploads whose writer died, or whose
        abort failed); none where every write is a visible file."""
        return []

    def abort_uploads(self, path: str) -> None:  # noqa: B027 - nothing to do without uploads
        """Abort the unfinished writes of ``path`` that :meth:`abandoned_uploads` names."""

    def check_inside(self, path: str) -> None:
        """Raise UnsafeCheckpointError unless ``path`` stays inside the root (no I/O on data)."""
        check_relative_path(path)

    def ensure_root(self) -> None:  # noqa: B027 - a no-op where there are no directories
        """Create the root if the backend has such a notion (directories); idempotent."""

    def root_exists(self) -> bool:
        """Whether anything (a file, or an empty directory where those exist) is at the root."""
        return bool(self.list())

    def remove_if_empty(self, prefix: str) -> bool:
        """Remove an empty sub-namespace, atomically failing if something appeared in it."""
        return not self.child(prefix).list()

    def read(self, path: str) -> bytes:
        with self.open_reader(path) as reader:
            return bytes(reader.read(0, reader.size()))

    def size(self, path: str) -> int:
        with self.open_reader(path) as reader:
            return reader.size()

    def modified(self, path: str) -> float | None:
        """When the file at ``path`` (not one it links to) was last written, in seconds since
        the epoch; None if there is no such file or the backend keeps no such time."""
        return None

    def describe(self, path: str) -> str:
        """A human-readable location of ``path`` for error messages."""
        return f"{self.url.rstrip('/')}/{path}"

    @contextlib.contextmanager
    def naming_errors(self, path: str) -> Iterator[None]:
        """Writing ``path``: unickpt's own errors pass through, any other becomes a
        StorageError naming the file (a source tensor that fails to materialise included)."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as exc:
            raise StorageError(
                f"writing {self.describe(path)}: {type(exc).__name__}: {exc}"
            ) from exc
