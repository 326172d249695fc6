"""Single-writer streaming save: a checkpoint built one tensor at a time, holding O(largest tensor).

Tools that *produce* a checkpoint from something other than live training state (conversion from
other frameworks, merging, quantisation) know every output tensor's name, dtype and shape before
they compute any of them. That is all the safetensors headers need, so the files are laid out
first and each tensor is materialised, written, checksummed and dropped in turn, while the next
one is being produced. The result is an ordinary committed checkpoint (docs/FORMAT.md): data
files first, ``manifest.json`` last and atomically.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import queue
import socket
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from unickpt.engine.buffers import tensor_bytes
from unickpt.engine.datafile import check_target, shard_key
from unickpt.engine.save import mark_inflight, tidy
from unickpt.errors import CheckpointError
from unickpt.format.checksum import checksum
from unickpt.format.dtypes import dtype_name, itemsize
from unickpt.format.manifest import (
    DATA_DIR,
    DATA_SUFFIX,
    FORMAT_NAME,
    FORMAT_VERSION,
    INFLIGHT,
    Chunk,
    Manifest,
    TensorMeta,
    commit_manifest,
)
from unickpt.format.safetensors_file import FileEntry, encode_header
from unickpt.layout.box import Box
from unickpt.layout.state import plain_step, plain_user_metadata
from unickpt.storage import Storage, Writer, open_storage

FILE_BYTES = 4 << 30  # a new data file after this many bytes: bounded files for object stores

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class LazyTensor:
    """A tensor known by dtype and shape, materialised only when :meth:`load` is called.

    ``origin`` says where the data comes from (file, key) for error messages.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    origin: str = ""

    @staticmethod
    def of(tensor: torch.Tensor, origin: str = "") -> LazyTensor:
        """Wrap a tensor that already exists."""
        return LazyTensor(tuple(tensor.shape), tensor.dtype, lambda: tensor, origin)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def materialize(self, key: str) -> torch.Tensor:
        """Load and check the result against the declared dtype and shape."""
        where = f" (from {self.origin})" if self.origin else ""
        try:
            tensor = self.load()
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"producing tensor {key!r}{where}: {type(exc).__name__}: {exc}"
            ) from exc
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            raise CheckpointError(
                f"tensor {key!r}{where}: produced {tensor.dtype} {list(tensor.shape)}, "
                f"declared {self.dtype} {list(self.shape)}"
            )
        return tensor


def _lay_out(
    entries: Sequence[tuple[str, LazyTensor]], uid: str, file_bytes: int
) -> list[tuple[str, list[tuple[str, LazyTensor, FileEntry]]]]:
    """Deal the entries, in order, into files of at most ``file_bytes`` (or one tensor)."""
    files: list[tuple[str, list[tuple[str, LazyTensor, FileEntry]]]] = []
    size = file_bytes
    for key, lazy in entries:
        name = dtype_name(lazy.dtype, key=key)
        entry = FileEntry(
            shard_key(key, Box.full(lazy.shape)),
            name,
            lazy.shape,
            math.prod(lazy.shape) * itemsize(name),
        )
        if not files or (size + entry.nbytes > file_bytes and size > 0):
            files.append((f"{DATA_DIR}/r00000-{uid}-{len(files)}{DATA_SUFFIX}", []))
            size = 0
        files[-1][1].append((key, lazy, entry))
        size += entry.nbytes
    return files


class _BackgroundWriter:
    """One thread writing what the caller produces: production overlaps I/O, and at most three
    tensors (being written, queued, being produced) are alive at once."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[Writer, memoryview | bytes] | None] = queue.Queue(1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="unickpt-stream", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if self._error is None:
                    item[0].write(item[1])
            except BaseException as exc:  # re-raised in the producer's thread
                self._error = exc
            finally:
                # Drop the written tensor before taking the next item: held until get()
                # returns, it was a fourth tensor alive beside the next one being produced.
                item = None
                self._queue.task_done()
        self._queue.task_done()

    def write(self, writer: Writer, data: memoryview | bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((writer, data))

    def drain(self) -> None:
        """Wait until everything queued so far is written; raise the first write error."""
        self._queue.join()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


def stream_save(
    path: str | Storage,
    tensors: Sequence[tuple[str, LazyTensor]],
    *,
    objects: Mapping[str, Any] | None = None,
    step: int | None = None,
    user_metadata: Mapping[str, Any] | None = None,
    writer_info: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    file_bytes: int = FILE_BYTES,
) -> Manifest:
    """Write ``tensors`` (key, lazy tensor), in order, and ``objects`` (JSON) as one checkpoint.

    Each lazy tensor is loaded only when its turn comes and released once written, so memory
    stays O(largest tensor). ``progress(done_bytes, total_bytes)`` is called after each tensor.
    Nothing is visible at ``path`` until the manifest commits; an existing checkpoint there is
    never touched (CheckpointExistsError).
    """
    storage = open_storage(path, storage_options)
    step = None if step is None else plain_step(step)
    metadata = plain_user_metadata(user_metadata)
    check_target(storage)
    keys = [key for key, _ in tensors]
    if len(set(keys)) != len(keys):
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        raise CheckpointError(f"two output tensors share a key: {duplicates}")
    mark_inflight(storage)
    total = sum(lazy.nbytes for _, lazy in tensors)
    done = 0
    files: dict[str, int] = {}
    metas: dict[str, TensorMeta] = {}
    background = _BackgroundWriter()
    try:
        for file, members in _lay_out(tensors, uuid.uuid4().hex[:12], file_bytes):
            header, offsets = encode_header(
                [entry for _, _, entry in members],
                {"format": FORMAT_NAME, "version": str(FORMAT_VERSION)},
            )
            with storage.naming_errors(file), storage.open_writer(file) as writer:
                try:
                    background.write(writer, header)
                    for (key, lazy, entry), offset in zip(members, offsets, strict=True):
                        data = tensor_bytes(lazy.materialize(key))
                        chunk = Chunk(
                            (0,) * len(lazy.shape),
                            lazy.shape,
                            file,
                            entry.name,
                            offset,
                            entry.nbytes,
                            checksum(data),
                        )
                        background.write(writer, data)
                        del data
                        metas[key] = TensorMeta(entry.dtype, lazy.shape, [chunk])
                        done += entry.nbytes
                        if progress is not None:
                            progress(done, total)
                finally:  # the writer is not closed (committed or aborted) under the thread
                    background.drain()
            files[file] = offsets[-1] + members[-1][2].nbytes
        manifest = Manifest(
            tensors=dict(sorted(metas.items())),
            objects=dict(objects or {}),
            files=files,
            step=step,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(),
            writer={
                "world_size": 1,
                "meshes": [],
                "torch": torch.__version__,
                "host": socket.gethostname(),
                **(writer_info or {}),
            },
            user_metadata=metadata,
        )
        manifest = Manifest.from_json(manifest.to_json(), where="(about to commit)")
        commit_manifest(storage, manifest)
    except BaseException:
        with contextlib.suppress(Exception):  # not committed: let gc take it even while we live
            storage.delete(INFLIGHT)
        raise
    finally:
        background.close()
    tidy(storage, manifest)
    return manifest


__all__ = ["LazyTensor", "Progress", "stream_save"]
