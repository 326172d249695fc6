"""PyTorch Distributed Checkpoint (DCP) directory -> unickpt, without unpickling untrusted code.

A DCP directory written by ``torch.distributed.checkpoint.save`` with the default
``FileSystemWriter`` holds ``.metadata`` and ``__<rank>_<n>.distcp`` data files:

* ``.metadata`` is a plain pickle of DCP's ``Metadata`` dataclass: for every flattened key, a
  ``TensorStorageMetadata`` (dtype, global size, the chunks as offsets + sizes) or a
  ``BytesStorageMetadata`` (a non-tensor value); ``storage_data`` maps each (key, chunk offsets)
  to a byte range (file, offset, length) of a data file; ``planner_data`` maps each key to its
  path in the saved nested dict. It is read by an unpickler that builds private stand-in records
  for DCP's own classes and accepts nothing else (torch dtypes, sizes, layouts, paths aside).
  Anything else raises UnsafeCheckpointError before it runs, unless ``trust_pickle``.
* Each byte range is one item, written back to back by the saving rank: a tensor chunk is a
  complete ``torch.save`` archive of that chunk; a non-tensor value is a ``torch.save`` of the
  object. Both are read with ``torch.load(weights_only=True)`` from exactly that range (a file
  view over our storage readers, so S3 works too). Items written with a stream transform
  (DCP's experimental zstd extension) are refused with a clear error.

Each global tensor becomes one lazy tensor that reads its chunks (from however many ranks wrote
them) into place when the streaming writer gets to it, so memory stays O(largest tensor).

Keys: DCP flattens the saved dict by joining nested keys with ``.``, exactly as unickpt does
(docs/FORMAT.md §5), so ``dcp.save({"model": model_sd, "optim": optim_sd})`` with
``get_state_dict`` gives ``model.<fqn>`` and ``optim.state.<fqn>.<name>`` unchanged. Non-tensor
values become JSON objects where unickpt would keep one: a list without tensors (such as
``optim.param_groups``, which DCP splits into ``optim.param_groups.<i>.<hyper-parameter>``) is
put back together as one object. ``flatten_optimizer_state_dict=True`` checkpoints, whose groups
are stored per parameter (``optim.param_groups.<fqn>.lr``), are regrouped: parameters with equal
hyper-parameters form one group, in saved order. Values that are not JSON (or, without
``trust_pickle``, need more than plain data to unpickle) are skipped with one warning naming them.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

import torch

from unickpt.convert.hf import open_location, open_source
from unickpt.convert.torchfile import (
    JsonBudget,
    refuse_compressed,
    unpickling_error,
)
from unickpt.engine.buffers import MAPPED_BYTES, release_freed_memory, streaming_empty
from unickpt.engine.stream import LazyTensor, Progress, stream_save
from unickpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConversionError,
    CorruptCheckpointError,
    InvalidStateError,
    UnsafeCheckpointError,
    printable,
    short_repr,
)
from unickpt.format.dtypes import dtype_name
from unickpt.format.manifest import Manifest
from unickpt.layout.box import Box, tiling_problem
from unickpt.storage import Reader, Storage

METADATA_FILE = ".metadata"
# DCP pickles ~150 bytes per chunk (its sizes, offsets and byte range; names are memoised), so
# 4 GiB holds ~29M chunks: a run sharding each of ~1,000 tensors over 16k ranks is 16M chunks and
# fits. It is read as a stream, never whole; memory is that of the records (~5x the pickle).
MAX_METADATA_BYTES = 4 << 30
MAX_PATH_CHARS = 4096  # a path in the metadata (the checkpoint's own id): Linux's PATH_MAX
# A saved dict nested deeper is no model's or optimizer's: its keys stay flat (one value each)
# rather than cost time quadratic in a crafted planner path's length to regroup.
MAX_NESTING = 64
WHOLE_RECORD_BYTES = 1 << 20  # smaller items are fetched in one read; torch.load seeks a lot
_ZIP_MAGIC = b"PK\x03\x04"

ObjPath = tuple[str | int, ...]


# ------------------------------------------------------------------------ restricted metadata

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_DCP_RECORDS = {
    "Metadata",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "TensorProperties",
    "StorageMeta",
    "MetadataIndex",
    "_StorageInfo",
}
_LAYOUTS = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
_PATH_CLASSES = {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}


class _Record:
    """A stand-in for one of DCP's metadata dataclasses: attributes only, no behaviour."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict, slots) state
        if isinstance(state, dict):
            for key, value in state.items():
                if isinstance(key, str) and not key.startswith("__"):
                    self.__dict__[key] = value
        else:  # TensorProperties pickles a tuple whose first field is the dtype
            self.__dict__["state"] = state


def _layout(name: Any) -> torch.layout:
    if not isinstance(name, str) or name not in _LAYOUTS:
        raise pickle.UnpicklingError(f"unknown torch layout {short_repr(name)}")
    return _LAYOUTS[name]


def _joined_path(*parts: Any) -> str:
    """A pickled ``pathlib`` path as text. Its parts must be strings of a path's length: ``str``
    of a crafted argument (a list holding another twice, 40 deep) would never finish, and one
    long string referenced a million times would join into terabytes."""
    if not all(isinstance(p, str) for p in parts):
        raise pickle.UnpicklingError(f"a path made of {short_repr(parts)}, not of strings")
    if sum(len(p) + 1 for p in parts) > MAX_PATH_CHARS:
        raise pickle.UnpicklingError(f"a path longer than {MAX_PATH_CHARS} characters")
    return "/".join(parts)


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only DCP's metadata classes (to fresh stand-in records, so that nothing a pickle
    does to a class outlives this load), torch dtypes, sizes and layouts, and paths."""

    def __init__(self, file: io.BufferedIOBase) -> None:
        super().__init__(file)
        self._records: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES and name in _DCP_RECORDS:
            if name not in self._records:
                self._records[name] = type(name, (_Record,), {})
            return self._records[name]
        if module == "torch.distributed.checkpoint.metadata" and name == "_MEM_FORMAT_ENCODING":
            return int  # an enum rebuilt from its value: keep the value
        if module == "torch" and name == "Size":
            return tuple
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype | torch.layout):
            return getattr(torch, name)
        if module == "torch.serialization" and name == "_get_layout":
            return _layout
        if module in ("pathlib", "pathlib._local") and name in _PATH_CLASSES:
            return _joined_path
        if module == "collections" and name == "OrderedDict":
            return dict
        raise UnsafeCheckpointError(f"global {module}.{name} is not one of DCP's metadata types")


def read_metadata(storage: Storage, *, trust_pickle: bool = False) -> Any:
    """The unpickled ``.metadata`` of the DCP checkpoint in ``storage`` (stand-in records unless
    ``trust_pickle``; attribute names are DCP's either way)."""
    where = storage.describe(METADATA_FILE)
    if not storage.exists(METADATA_FILE):
        if storage.exists(f"__0{METADATA_FILE}"):
            raise ConversionError(
                f"{storage.url} has per-rank metadata (__<rank>.metadata, saved without rank "
                "coordination) and no global .metadata; only the global form is supported"
            )
        raise CheckpointNotFoundError(f"no DCP checkpoint at {storage.url}: {where} is missing")
    with storage.open_reader(METADATA_FILE) as reader:
        if reader.size() > MAX_METADATA_BYTES:
            raise CorruptCheckpointError(f"{where} is {reader.size()} bytes, too large")
        # unpickled as it is read: garbage fails at its first bytes, not after reading them all
        data = io.BufferedReader(_FileRange(reader, 0, reader.size()), WHOLE_RECORD_BYTES)
        try:
            if trust_pickle:
                return pickle.load(data)  # the caller trusts this checkpoint
            return _MetadataUnpickler(data).load()
        except UnsafeCheckpointError as exc:
            raise UnsafeCheckpointError(
                f"{where}: {exc}; unpickling it could execute arbitrary code. Re-run with "
                "--trust-pickle (trust_pickle=True) only if you trust where this checkpoint "
                "came from"
            ) from None
        except CheckpointError:  # the storage failed to read it
            raise
        except Exception as exc:  # MemoryError included: records beyond this machine's memory
            raise CorruptCheckpointError(
                f"{where} is not a readable DCP metadata pickle: {type(exc).__name__}: "
                f"{printable(str(exc)[:300])}"
            ) from exc


# ----------------------------------------------------------------------------- parsed metadata


@dataclass(frozen=True)
class _Stored:
    """One item's bytes: a ``torch.save`` archive at ``offset`` in ``file``."""

    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class _Tensor:
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[tuple[Box, _Stored], ...]


@dataclass(frozen=True)
class _Item:
    fqn: str
    path: ObjPath
    tensor: _Tensor | None  # None: a non-tensor value
    stored: _Stored | None  # the value's bytes (non-tensor items)


def _ints(value: Any, what: str, where: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(type(v) is int and v >= 0 for v in value):
        raise CorruptCheckpointError(f"{where}: {what} {short_repr(value)} is not a list of sizes")
    return tuple(value)


def _field(record: Any, name: str, where: str) -> Any:
    try:
        return getattr(record, name)
    except AttributeError:
        raise CorruptCheckpointError(
            f"{where}: {type(record).__name__} has no field {name!r}"
        ) from None


def _storage_index(metadata: Any, storage: Storage, where: str) -> dict[tuple[str, Any], _Stored]:
    """(fqn, chunk offsets or None) -> where its bytes are, every file checked to be inside."""
    table = _field(metadata, "storage_data", where)
    if not isinstance(table, dict):
        raise CorruptCheckpointError(f"{where}: storage_data is not a mapping")
    out: dict[tuple[str, Any], _Stored] = {}
    checked: set[str] = set()
    for index, info in table.items():
        fqn = _field(index, "fqn", where)
        offset = getattr(index, "offset", None)  # a class default: absent for non-tensors
        descriptors = getattr(info, "transform_descriptors", None)
        if descriptors:
            raise ConversionError(
                f"{where}: {short_repr(fqn)} was written through stream transform(s) "
                f"{short_repr(descriptors)} "
                "(DCP's experimental compression), which unickpt does not read; re-save the "
                "checkpoint without storage-writer extensions"
            )
        file = _field(info, "relative_path", where)
        start = _field(info, "offset", where)
        length = _field(info, "length", where)
        if not isinstance(fqn, str) or not isinstance(file, str):
            raise CorruptCheckpointError(f"{where}: malformed storage entry for {short_repr(fqn)}")
        if type(start) is not int or type(length) is not int or start < 0 or length < 0:
            raise CorruptCheckpointError(
                f"{where}: {fqn!r} has byte range {short_repr(start)}+{short_repr(length)}"
            )
        if file not in checked:
            storage.check_inside(file)
            checked.add(file)
        key = None if offset is None else _ints(offset, "chunk offset", where)
        out[(fqn, key)] = _Stored(file, start, length)
    return out


def _path(planner: Any, fqn: str) -> ObjPath:
    """The key's path in the saved nested dict (DCP's default planner records it)."""
    path = planner.get(fqn) if isinstance(planner, dict) else None
    if (
        isinstance(path, tuple | list)
        and 0 < len(path) <= MAX_NESTING
        and all(isinstance(p, str) or (type(p) is int and p >= 0) for p in path)
        and ".".join(str(p) for p in path) == fqn
    ):
        return tuple(path)
    return (fqn,)


def parse_metadata(metadata: Any, storage: Storage) -> list[_Item]:
    """Every item of the checkpoint, checked: known dtype, chunks that tile the tensor, each
    chunk and value with a byte range in a file inside the checkpoint."""
    where = storage.describe(METADATA_FILE)
    entries = _field(metadata, "state_dict_metadata", where)
    if not isinstance(entries, dict):
        raise CorruptCheckpointError(f"{where}: state_dict_metadata is not a mapping")
    stored = _storage_index(metadata, storage, where)
    planner = getattr(metadata, "planner_data", None)
    items: list[_Item] = []
    for fqn, entry in entries.items():
        if not isinstance(fqn, str):
            raise CorruptCheckpointError(f"{where}: key {short_repr(fqn)} is not a string")
        kind = type(entry).__name__
        if kind == "BytesStorageMetadata":
            if (fqn, None) not in stored:
                raise CorruptCheckpointError(f"{where}: no stored bytes for {fqn!r}")
            items.append(_Item(fqn, _path(planner, fqn), None, stored[(fqn, None)]))
            continue
        if kind != "TensorStorageMetadata":
            raise CorruptCheckpointError(f"{where}: {fqn!r} has unknown storage type {kind}")
        properties = _field(entry, "properties", where)
        state = getattr(properties, "state", None)
        dtype = (
            state[0] if isinstance(state, tuple) and state else getattr(properties, "dtype", None)
        )
        if not isinstance(dtype, torch.dtype):
            raise CorruptCheckpointError(
                f"{where}: {fqn!r} has no valid dtype ({short_repr(dtype)})"
            )
        try:
            dtype_name(dtype, key=fqn)
        except InvalidStateError as exc:
            raise ConversionError(f"{where}: {exc}") from None
        shape = _ints(_field(entry, "size", where), "size", where)
        chunks = []
        for chunk in _field(entry, "chunks", where):
            box = Box.of(
                _ints(_field(chunk, "offsets", where), "chunk offset", where),
                _ints(_field(chunk, "sizes", where), "chunk size", where),
            )
            if (fqn, box.offsets) not in stored:
                raise CorruptCheckpointError(f"{where}: no stored bytes for chunk {box} of {fqn!r}")
            chunks.append((box, stored[(fqn, box.offsets)]))
        # (DCP writes a tensor with no elements as one empty chunk per rank that held a piece)
        problem = tiling_problem([b for b, _ in chunks], shape, one_chunk_if_empty=False)
        if problem is not None:
            raise CorruptCheckpointError(
                f"{where}: the chunks of {fqn!r} do not tile it: {problem}"
            )
        items.append(_Item(fqn, _path(planner, fqn), _Tensor(dtype, shape, tuple(chunks)), None))
    return items


# ------------------------------------------------------------------------------ reading items


class _FileRange(io.RawIOBase):
    """A seekable, read-only view of ``length`` bytes at ``start`` of a storage file."""

    def __init__(self, reader: Reader, start: int, length: int) -> None:
        super().__init__()
        self._reader, self._start, self._length, self._position = reader, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(view.nbytes, self._length - self._position))
        if count:
            self._reader.read_into(self._start + self._position, view[:count])
        self._position += count
        return count


class _Items:
    """Opens each data file once and unpickles single items from it."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._readers: dict[str, Reader] = {}

    def _open(self, stored: _Stored) -> tuple[Reader, str]:
        if stored.file not in self._readers:
            self._readers[stored.file] = self.storage.open_reader(stored.file)
        reader = self._readers[stored.file]
        where = f"{self.storage.describe(stored.file)} at byte {stored.offset}"
        if stored.offset + stored.length > reader.size():
            raise CorruptCheckpointError(
                f"{self.storage.describe(stored.file)} is truncated: an item needs bytes up to "
                f"{stored.offset + stored.length}, the file has {reader.size()}"
            )
        return reader, where

    def load(self, stored: _Stored, *, weights_only: bool = True) -> tuple[Any, str]:
        """The unpickled item and a description of where it was."""
        reader, where = self._open(stored)
        stream: IO[bytes]
        if stored.length <= WHOLE_RECORD_BYTES:
            stream = io.BytesIO(bytes(reader.read(stored.offset, stored.length)))
        else:
            stream = io.BufferedReader(_FileRange(reader, stored.offset, stored.length))
        if stream.read(4) != _ZIP_MAGIC:
            raise ConversionError(
                f"{where}: the item is not a torch.save archive; only checkpoints written by "
                "DCP's FileSystemWriter in its default torch_save format can be converted"
            )
        try:
            refuse_compressed(stream, f"{where}: the item")
            stream.seek(0)
            return torch.load(stream, map_location="cpu", weights_only=weights_only), where
        except CheckpointError:
            raise
        except pickle.UnpicklingError as exc:
            raise unpickling_error(where, exc, trusted=not weights_only) from exc
        except Exception as exc:
            raise CorruptCheckpointError(
                f"{where}: unreadable item: {type(exc).__name__}: {exc}"
            ) from exc

    def chunk(self, fqn: str, tensor: _Tensor, box: Box, stored: _Stored) -> torch.Tensor:
        value, where = self.load(stored)
        if type(value) is torch.Tensor and value.numel() == 0 == box.volume:
            value = value.new_empty(box.sizes)  # FSDP2 saves its empty pieces as [0, 0, ...]
        if (
            type(value) is not torch.Tensor
            or value.dtype != tensor.dtype
            or tuple(value.shape) != box.sizes
        ):
            got = (
                f"{value.dtype} {list(value.shape)}"
                if isinstance(value, torch.Tensor)
                else type(value).__name__
            )
            raise CorruptCheckpointError(
                f"{where}: chunk {box} of {fqn!r} holds {got}, the metadata says "
                f"{tensor.dtype} {list(box.sizes)}"
            )
        return value

    def lazy(self, fqn: str, tensor: _Tensor) -> LazyTensor:
        """The global tensor, assembled from its chunks when materialised."""

        def load() -> torch.Tensor:
            if math.prod(tensor.shape) * tensor.dtype.itemsize >= MAPPED_BYTES:
                release_freed_memory()  # earlier chunks torch.load put on the heap
            (box, stored), *rest = tensor.chunks
            if not rest and box.sizes == tensor.shape:
                return self.chunk(fqn, tensor, box, stored)
            out = streaming_empty(tensor.shape, tensor.dtype)
            for box, stored in tensor.chunks:
                out[box.slices()].copy_(self.chunk(fqn, tensor, box, stored))
            return out

        first = tensor.chunks[0][1]
        origin = f"{len(tensor.chunks)} DCP chunk(s), first in {self.storage.describe(first.file)}"
        return LazyTensor(tensor.shape, tensor.dtype, load, origin)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


# ------------------------------------------------------------------------------ keys & objects


def _assemble(entries: Sequence[tuple[ObjPath, Any]]) -> Any:
    """Rebuild the nested value whose leaves are ``entries`` (relative path, value)."""
    if len(entries) == 1 and not entries[0][0]:
        return entries[0][1]
    children: dict[str | int, list[tuple[ObjPath, Any]]] = {}
    for rel, value in entries:
        if not rel:
            raise CorruptCheckpointError(
                f"a value and its members are both stored: {short_repr(entries)}"
            )
        children.setdefault(rel[0], []).append((rel[1:], value))
    if all(type(k) is int for k in children):
        return [_assemble(children[k]) for k in sorted(children, key=int)]
    return {str(k): _assemble(v) for k, v in children.items()}


def _regroup(per_param: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Param groups from per-parameter hyper-parameters (``flatten_optimizer_state_dict``):
    parameters with equal hyper-parameters share a group, groups in order of first parameter."""
    groups: dict[str, dict[str, Any]] = {}
    for fqn, hyper in per_param.items():
        signature = json.dumps(hyper, sort_keys=True, allow_nan=True, default=repr)
        group = groups.setdefault(signature, {**hyper, "params": []})
        group["params"].append(fqn)
    return list(groups.values())


def _objects(
    items: Sequence[_Item], values: Mapping[str, Any], tensor_keys: set[str]
) -> tuple[dict[str, Any], list[str]]:
    """The non-tensor values as unickpt objects, and the keys that are not JSON."""
    # unickpt walks into a list only when it holds tensors; otherwise the list is one value
    inside_tensor_lists = {
        item.path[:i] for item in items if item.tensor for i in range(len(item.path))
    }
    grouped: dict[str, list[tuple[ObjPath, Any]]] = {}
    flat_groups: dict[str, dict[str, dict[str, Any]]] = {}
    for item in items:
        if item.tensor is not None or item.fqn not in values:
            continue
        value, path = values[item.fqn], item.path
        if len(path) == 2 and isinstance(path[1], str) and path[1].startswith("param_groups."):
            fqn, _, name = path[1][len("param_groups.") :].rpartition(".")
            if name == "params":  # the group's members are the parameters listed under it
                continue
            flat_groups.setdefault(f"{path[0]}.param_groups", {}).setdefault(fqn, {})[name] = value
            continue
        cut = next(
            (
                i
                for i, p in enumerate(path)
                if type(p) is int and path[:i] not in inside_tensor_lists
            ),
            len(path),
        )
        key = ".".join(str(p) for p in path[:cut])
        grouped.setdefault(key, []).append((path[cut:], value))
    objects = {key: _assemble(entries) for key, entries in grouped.items()}
    for key, per_param in flat_groups.items():
        objects[key] = _regroup(per_param)
    skipped: list[str] = []
    for key in list(objects):
        if key in tensor_keys:
            raise CorruptCheckpointError(f"{key!r} is both a tensor and a value in the checkpoint")
        try:
            json.dumps(objects[key], allow_nan=True)
        except (TypeError, ValueError):
            skipped.append(f"{key} ({type(objects.pop(key)).__name__}, not JSON)")
    return objects, skipped


# ------------------------------------------------------------------------------ import


def import_dcp(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    progress: Progress | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Convert the DCP checkpoint directory ``src`` into a unickpt checkpoint at ``dst``.

    Works for checkpoints saved by any number of ranks (FSDP/TP DTensor shards are put back
    together); ``dcp.save({"model": model_sd, "optim": optim_sd})`` with ``get_state_dict``
    gives a checkpoint that ``unickpt.load(dst, {"model": model, "optim": optimizer})`` restores
    at any layout. See the module documentation for keys and non-tensor values. Without
    ``trust_pickle`` the metadata may hold only DCP's own types and non-tensor values only plain
    data; anything else raises UnsafeCheckpointError (metadata) or is skipped with a warning
    (values) instead of being unpickled. ``storage_options`` configure the ``s3://`` side(s);
    ``progress(done, total)`` is called in bytes.
    """
    storage = open_source(src, storage_options)
    metadata = read_metadata(storage, trust_pickle=trust_pickle)
    try:
        items = parse_metadata(metadata, storage)
    except CheckpointError:
        raise
    except Exception as exc:  # records shaped unlike DCP's (a crafted or foreign pickle)
        raise CorruptCheckpointError(
            f"{storage.describe(METADATA_FILE)} does not describe a DCP checkpoint: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    reader = _Items(storage)
    try:
        values: dict[str, Any] = {}
        skipped: list[str] = []
        budget = JsonBudget()
        for item in items:
            if item.stored is None:
                continue
            try:
                value, where = reader.load(item.stored, weights_only=not trust_pickle)
            except UnsafeCheckpointError as exc:
                skipped.append(f"{item.fqn} (needs trust_pickle: {exc})")
                continue
            budget.charge(value, f"value {item.fqn!r} ({where})")
            values[item.fqn] = value
        tensors = sorted(
            (item for item in items if item.tensor is not None),
            key=lambda item: _first_read(item.tensor),
        )
        objects, not_json = _objects(items, values, {item.fqn for item in tensors})
        skipped += not_json
        if skipped:
            warnings.warn(
                printable(  # the keys and files are the checkpoint's: a warning reaches a terminal
                    f"import_dcp: {len(skipped)} non-tensor value(s) of {storage.url} not "
                    "converted: " + "; ".join(skipped)
                ),
                stacklevel=2,
            )
        entries = [(item.fqn, reader.lazy(item.fqn, _tensor(item))) for item in tensors]
        if not entries and not objects:
            raise ConversionError(f"{storage.url} holds nothing to convert")
        return stream_save(
            open_location(dst, storage_options),
            entries,
            objects=objects,
            writer_info={
                "converted_from": {
                    "format": "torch-dcp",
                    "path": os.fspath(src),
                    "items": len(items),
                }
            },
            progress=progress,
        )
    finally:
        reader.close()


def _tensor(item: _Item) -> _Tensor:
    assert item.tensor is not None
    return item.tensor


def _first_read(tensor: _Tensor | None) -> tuple[str, int]:
    """Tensors in the order their first chunks sit in the files: reads run forward."""
    assert tensor is not None
    stored = tensor.chunks[0][1]
    return stored.file, stored.offset


__all__ = ["import_dcp", "parse_metadata", "read_metadata"]
