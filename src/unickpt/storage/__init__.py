"""Where checkpoints live: a small interface and its local-filesystem and in-memory backends."""

from __future__ import annotations

from unickpt.errors import StorageError
from unickpt.storage.base import Reader, Storage, Writer, check_relative_path
from unickpt.storage.local import LocalStorage
from unickpt.storage.memory import MemoryStorage

__all__ = [
    "LocalStorage",
    "MemoryStorage",
    "Reader",
    "Storage",
    "Writer",
    "check_relative_path",
    "open_storage",
]


def open_storage(url: str | Storage) -> Storage:
    """The storage rooted at ``url``: a local path, ``file://PATH`` or ``memory://NAME/PREFIX``."""
    if isinstance(url, Storage):
        return url
    url = str(url)
    if url.startswith("memory://"):
        namespace, _, prefix = url[len("memory://") :].partition("/")
        return MemoryStorage(namespace, prefix)
    if url.startswith("file://"):
        return LocalStorage(url[len("file://") :])
    if "://" in url:
        raise StorageError(
            f"unsupported storage URL {url!r}: use a local path, file:// or memory://"
        )
    return LocalStorage(url)
