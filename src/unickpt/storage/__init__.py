"""Where checkpoints live: a small interface and its local-filesystem, in-memory and S3 backends."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from unickpt.errors import StorageError
from unickpt.storage.base import (
    RateLimit,
    Reader,
    Storage,
    Writer,
    as_rate_limit,
    check_relative_path,
    rate_limited,
)
from unickpt.storage.local import LocalStorage
from unickpt.storage.memory import MemoryStorage
from unickpt.storage.s3 import S3Storage

__all__ = [
    "LocalStorage",
    "MemoryStorage",
    "RateLimit",
    "Reader",
    "S3Storage",
    "Storage",
    "Writer",
    "as_rate_limit",
    "check_relative_path",
    "open_storage",
    "rate_limited",
]


def open_storage(
    url: str | os.PathLike[str] | Storage, storage_options: Mapping[str, Any] | None = None
) -> Storage:
    """The storage rooted at ``url``: a local path, ``file://PATH``, ``memory://NAME/PREFIX`` or
    ``s3://BUCKET/PREFIX``. ``storage_options`` configure the S3 backend (endpoint, credentials,
    part size...; see :mod:`unickpt.storage.s3`); other backends take none."""
    if isinstance(url, Storage):
        if storage_options:
            raise StorageError("storage_options apply to a URL, not to an already open Storage")
        return url
    if not isinstance(url, str | os.PathLike) or isinstance(os.fspath(url), bytes):
        # str() would make a directory named "None" or "b'/tmp/x'" of a mistake
        raise TypeError(f"a checkpoint path is a str, os.PathLike or Storage, not {url!r}")
    url = os.fspath(url)
    if not url:
        raise ValueError("empty checkpoint path (an unset variable?); name a directory")
    if url.startswith("s3://"):
        return S3Storage(url, storage_options)
    if storage_options:
        raise StorageError(f"storage_options are only understood for s3:// URLs, not {url!r}")
    if url.startswith("memory://"):
        namespace, _, prefix = url[len("memory://") :].partition("/")
        return MemoryStorage(namespace, prefix)
    if url.startswith("file://"):
        return LocalStorage(url[len("file://") :])
    if "://" in url:
        raise StorageError(
            f"unsupported storage URL {url!r}: use a local path, file://, memory:// or s3://"
        )
    return LocalStorage(url)
