"""Hugging Face safetensors -> unickpt: one ``model.safetensors`` or the shards a
``model.safetensors.index.json`` lists, streamed one tensor at a time.

Each tensor is read with one ranged read of exactly its bytes (a ``pread`` locally, a ranged GET
on S3) straight into the tensor that is then written, so memory stays at the tensors in flight
and no file is memory-mapped. Before any tensor is read, every header is parsed and checked
against its file's size and, for a sharded checkpoint, against the index: each listed file must
exist inside the source directory, and each tensor must be in the file the index names.

The result holds ``model.<name>`` for every tensor (names renamed or dropped by an optional spec),
as ``unickpt.save(path, {"model": model})`` writes it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unickpt.convert.spec import Spec
from unickpt.convert.target import write_converted
from unickpt.convert.torchfile import source_storage
from unickpt.engine.buffers import byte_view, streaming_empty
from unickpt.engine.stream import LazyTensor, Progress
from unickpt.errors import (
    CheckpointNotFoundError,
    ConversionError,
    CorruptCheckpointError,
    short_repr,
)
from unickpt.format.dtypes import FROM_SAFETENSORS, torch_dtype
from unickpt.format.manifest import MAX_COUNT, MAX_DIMS, Manifest
from unickpt.format.safetensors_file import read_header
from unickpt.format.untrusted import read_json
from unickpt.storage import Reader, Storage, open_storage

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 << 20  # an index maps names to file names; anything larger is not one


def open_location(
    url: str | os.PathLike[str] | Storage, storage_options: Mapping[str, Any] | None
) -> Storage:
    """The storage at ``url``. ``storage_options`` configure ``s3://`` locations only, so one set
    of options serves a conversion between a bucket and a local directory (either way round)."""
    if isinstance(url, Storage):
        return url
    text = os.fspath(url)
    return open_storage(text, storage_options if text.startswith("s3://") else None)


def open_source(
    url: str | os.PathLike[str] | Storage, storage_options: Mapping[str, Any] | None
) -> Storage:
    """The storage of a source to convert at ``url``: :func:`open_location`, but a local
    directory in the layout of the Hugging Face cache may link into its blobs
    (:func:`~unickpt.convert.torchfile.source_storage`)."""
    if isinstance(url, Storage) or "://" in os.fspath(url):
        return open_location(url, storage_options)
    return source_storage(url)


def parse_spec(spec: Spec | str | os.PathLike[str] | None) -> Spec | None:
    """A spec object, a spec file or a shipped spec's name (None: no spec)."""
    if spec is None or isinstance(spec, Spec):
        return spec
    return Spec.load(os.fspath(spec))


# ------------------------------------------------------------------------------ reading files


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file: where its bytes are and what they are."""

    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute, in the file
    nbytes: int


class SafetensorsFiles:
    """The safetensors files of one directory, each opened once, read tensor by tensor."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._readers: dict[str, Reader] = {}

    def reader(self, file: str) -> Reader:
        if file not in self._readers:
            self._readers[file] = self.storage.open_reader(file)
        return self._readers[file]

    def tensors(self, file: str) -> tuple[dict[str, StoredTensor], dict[str, str]]:
        """The tensors of ``file`` by name (in data order) and its ``__metadata__``; every entry is
        checked so that a later read cannot fall outside the file or misread its bytes."""
        where = self.storage.describe(file)
        reader = self.reader(file)
        header, start = read_header(reader, where)
        size = reader.size()
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise CorruptCheckpointError(f"{where}: __metadata__ must map strings to strings")
        found = [
            self._entry(file, where, name, entry, start, size) for name, entry in header.items()
        ]
        found.sort(key=lambda t: (t.offset, t.nbytes))
        # As the safetensors format requires: data back to back, no overlap, no hole, no tail
        # (what the safetensors library itself refuses, a crafted file could otherwise pass).
        position = 0  # in the data section, as data_offsets count
        for tensor in found:
            if tensor.offset - start != position:
                raise CorruptCheckpointError(
                    f"{where}: tensor {tensor.name!r} starts at data byte {tensor.offset - start}, "
                    f"where {position} was expected (tensors overlap or leave a hole)"
                )
            position += tensor.nbytes
        if start + position != size:
            raise CorruptCheckpointError(
                f"{where}: its tensors end at data byte {position}, its data at {size - start}"
            )
        return {t.name: t for t in found}, metadata

    @staticmethod
    def _entry(file: str, where: str, name: str, entry: Any, start: int, size: int) -> StoredTensor:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("dtype"), str)
            or not _int_list(entry.get("shape"))
            or not _int_list(entry.get("data_offsets"))
            or len(entry["data_offsets"]) != 2
        ):
            raise CorruptCheckpointError(
                f"{where}: tensor {name!r} has a malformed header entry {short_repr(entry)}"
            )
        stored = FROM_SAFETENSORS.get(entry["dtype"])
        if stored is None:
            raise ConversionError(
                f"{where}: tensor {name!r} has dtype {entry['dtype']!r}, which unickpt cannot "
                f"store (supported: {', '.join(FROM_SAFETENSORS)})"
            )
        dtype = torch_dtype(stored)
        shape = tuple(entry["shape"])
        if len(shape) > MAX_DIMS or any(not 0 <= n < MAX_COUNT for n in shape):
            raise CorruptCheckpointError(
                f"{where}: tensor {name!r} has shape {list(shape)}: at most {MAX_DIMS} "
                f"dimensions, each below 2^63"
            )
        begin, end = entry["data_offsets"]
        nbytes = math.prod(shape) * dtype.itemsize
        if begin < 0 or end - begin != nbytes:
            raise CorruptCheckpointError(
                f"{where}: tensor {name!r} ({entry['dtype']!r} {list(shape)}) has data offsets "
                f"[{begin}, {end}], which do not hold its {nbytes} bytes"
            )
        if start + end > size:
            raise CorruptCheckpointError(
                f"{where} is truncated: tensor {name!r} needs bytes up to {start + end}, "
                f"the file has {size}"
            )
        return StoredTensor(name, file, dtype, shape, start + begin, nbytes)

    def lazy(self, tensor: StoredTensor) -> LazyTensor:
        """``tensor``, read with one ranged read when it is materialised."""

        def load() -> torch.Tensor:
            out = streaming_empty(tensor.shape, tensor.dtype)
            if tensor.nbytes:
                self.reader(tensor.file).read_into(tensor.offset, byte_view(out))
            return out

        origin = f"{self.storage.describe(tensor.file)}:{tensor.name}"
        return LazyTensor(tensor.shape, tensor.dtype, load, origin)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)


# ------------------------------------------------------------------------------ the layout


def _read_index(storage: Storage) -> dict[str, str]:
    """The index's ``weight_map`` (tensor name -> file), with every file checked to be a
    relative path that stays inside the directory (UnsafeCheckpointError otherwise)."""
    where = storage.describe(INDEX_FILE)
    doc = read_json(storage, INDEX_FILE, max_bytes=MAX_INDEX_BYTES, what=where)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CorruptCheckpointError(f"{where}: 'weight_map' must map tensor names to file names")
    for file in sorted(set(weight_map.values())):
        storage.check_inside(file)
        if not storage.exists(file):
            raise CorruptCheckpointError(f"{where} lists {file!r}, which does not exist")
    return weight_map


def _check_placement(
    weight_map: Mapping[str, str], found: Mapping[str, Mapping[str, StoredTensor]], where: str
) -> None:
    """Every tensor the index lists is in the file it names, and no file holds one it does not."""
    for name, file in weight_map.items():
        if name not in found[file]:
            raise CorruptCheckpointError(
                f"{where} places tensor {name!r} in {file!r}, which has no such tensor"
            )
    for file, tensors in found.items():
        for name in tensors:
            if weight_map.get(name) != file:
                placed = weight_map.get(name)
                raise CorruptCheckpointError(
                    f"{file!r} holds tensor {name!r}, which {where} "
                    + (f"places in {placed!r}" if placed else "does not list")
                )


def read_source(
    src: str | os.PathLike[str] | Storage, storage_options: Mapping[str, Any] | None = None
) -> tuple[SafetensorsFiles, list[StoredTensor], dict[str, Any]]:
    """Open an HF checkpoint: a directory with ``model.safetensors.index.json`` or
    ``model.safetensors``, or one local ``.safetensors`` file. Returns the open files, every
    tensor in file and data order, and a description of the source for the manifest."""
    files: list[str] = []
    if not isinstance(src, Storage) and os.path.isfile(src):  # one local file
        path = Path(src)
        storage: Storage = source_storage(path.parent)
        files = [path.name]
    else:
        storage = open_source(src, storage_options)
    source = SafetensorsFiles(storage)
    try:
        weight_map: dict[str, str] | None = None
        if not files:
            if storage.exists(INDEX_FILE):
                weight_map = _read_index(storage)
                files = sorted(set(weight_map.values()))
            elif storage.exists(SINGLE_FILE):
                files = [SINGLE_FILE]
            else:
                raise CheckpointNotFoundError(f"no {INDEX_FILE} or {SINGLE_FILE} in {storage.url}")
        found: dict[str, dict[str, StoredTensor]] = {}
        metadata: dict[str, str] = {}
        for file in files:
            found[file], file_metadata = source.tensors(file)
            metadata.update(file_metadata)
        if weight_map is not None:
            _check_placement(weight_map, found, storage.describe(INDEX_FILE))
    except BaseException:
        source.close()
        raise
    tensors = [t for file in files for t in found[file].values()]
    description = {
        "format": "hf-safetensors",
        "path": src.url if isinstance(src, Storage) else os.fspath(src),  # as the caller gave it
        "files": files,
        "metadata": metadata,
    }
    return source, tensors, description


# ------------------------------------------------------------------------------ import


def import_hf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    spec: Spec | str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Convert the HF safetensors checkpoint at ``src`` into a unickpt checkpoint at ``dst``.

    ``src`` is a directory holding ``model.safetensors`` or ``model.safetensors.index.json`` and
    its shards (local or ``s3://``), or a local ``.safetensors`` file. Tensor ``name`` becomes
    ``model.<name>``, so ``unickpt.load(dst, {"model": model})`` restores it. ``spec`` (a Spec, a
    spec file, or a shipped spec's name) renames or drops names: the first rule matching a name
    decides (``drop: true`` removes it, ``rename`` rewrites it; a strict spec must match every
    name). ``storage_options`` configure the ``s3://`` side(s). ``progress(done, total)`` is
    called in bytes. Raises UnsafeCheckpointError for an index naming a file outside ``src``,
    CorruptCheckpointError (naming the file and tensor) for a truncated or inconsistent source.
    """
    rules = parse_spec(spec)
    source, tensors, description = read_source(src, storage_options)
    try:
        model = {t.name: source.lazy(t) for t in tensors}
        if rules is not None:
            model = rules.merge([[model]])  # one pipeline stage of one TP rank: renames and drops
        if not model:
            raise ConversionError(f"{source.storage.url} holds no tensor to convert")
        if rules is not None:
            description["spec"] = rules.name
        return write_converted(
            open_location(dst, storage_options),
            model,
            source=description,
            progress=progress,
        )
    finally:
        source.close()


__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "import_hf",
    "open_location",
    "parse_spec",
    "read_source",
]
