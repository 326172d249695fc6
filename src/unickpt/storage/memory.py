"""In-process storage: tests, and a fast tier for snapshots that need no durability."""

from __future__ import annotations

import builtins
import threading

from unickpt.errors import CheckpointExistsError, CorruptCheckpointError
from unickpt.storage.base import Reader, Storage, Writer, check_relative_path, require_range

_NAMESPACES: dict[str, dict[str, bytes]] = {}
_LOCK = threading.Lock()


class _MemoryWriter(Writer):
    def __init__(self, files: dict[str, bytes], path: str) -> None:
        self._files = files
        self._path = path
        self._parts: list[bytes] | None = []

    def write(self, data: memoryview | bytes) -> None:
        assert self._parts is not None
        self._parts.append(bytes(data))

    def close(self) -> None:
        if self._parts is None:
            return
        with _LOCK:
            self._files[self._path] = b"".join(self._parts)
        self._parts = None

    def abort(self) -> None:
        self._parts = None


class _MemoryReader(Reader):
    def __init__(self, data: bytes, where: str) -> None:
        self._data = memoryview(data)
        self._where = where

    def size(self) -> int:
        return self._data.nbytes

    def read_into(self, offset: int, out: memoryview) -> None:
        require_range(self._where, offset, out.nbytes, self._data.nbytes)
        out.cast("B")[:] = self._data[offset : offset + out.nbytes]

    def close(self) -> None:
        self._data.release()


class MemoryStorage(Storage):
    """Files in a process-wide namespace named by ``memory://NAME/prefix`` URLs."""

    def __init__(self, namespace: str, prefix: str = "") -> None:
        with _LOCK:
            self._files = _NAMESPACES.setdefault(namespace, {})
        self._namespace = namespace
        self._prefix = prefix.strip("/")
        self.url = f"memory://{namespace}/{self._prefix}".rstrip("/")

    def _key(self, path: str) -> str:
        check_relative_path(path)
        return f"{self._prefix}/{path}" if self._prefix else path

    def open_writer(self, path: str) -> Writer:
        return _MemoryWriter(self._files, self._key(path))

    def open_reader(self, path: str) -> Reader:
        with _LOCK:
            data = self._files.get(self._key(path))
        if data is None:
            raise CorruptCheckpointError(f"file {self.describe(path)} is missing")
        return _MemoryReader(data, self.describe(path))

    def put_atomic(self, path: str, data: bytes, *, replace: bool = True) -> None:
        key = self._key(path)
        with _LOCK:
            if not replace and key in self._files:
                raise CheckpointExistsError(f"{self.describe(path)} already exists")
            self._files[key] = bytes(data)

    def exists(self, path: str) -> bool:
        with _LOCK:
            return self._key(path) in self._files

    def list(self, prefix: str = "") -> list[str]:
        base = self._key(prefix) + "/" if prefix else (self._prefix + "/" if self._prefix else "")
        strip = len(self._prefix) + 1 if self._prefix else 0
        with _LOCK:
            return sorted(k[strip:] for k in self._files if k.startswith(base))

    def delete(self, path: str) -> None:
        with _LOCK:
            self._files.pop(self._key(path), None)

    def delete_prefix(self, prefix: str) -> None:
        base = self._key(prefix) + "/"
        with _LOCK:
            for key in [k for k in self._files if k.startswith(base)]:
                del self._files[key]

    def children(self) -> builtins.list[str]:
        return sorted({name.split("/", 1)[0] for name in self.list() if "/" in name})

    def child(self, prefix: str) -> MemoryStorage:
        return MemoryStorage(self._namespace, self._key(prefix))

    def files(self) -> dict[str, bytes]:
        """The raw namespace (tests use it to corrupt bytes)."""
        return self._files
