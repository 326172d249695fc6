"""Full integrity check: every file's size and header, every chunk's checksum."""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from unickpt.errors import CheckpointError, CorruptCheckpointError
from unickpt.format.checksum import Checksummer
from unickpt.format.dtypes import FROM_SAFETENSORS, itemsize, safetensors_dtype
from unickpt.format.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_COUNT,
    MAX_DIMS,
    Chunk,
    Manifest,
    deleted_while_read,
    read_manifest,
)
from unickpt.format.safetensors_file import read_header
from unickpt.storage import Reader, Storage, open_storage

BLOCK = 16 * 1024 * 1024
METADATA = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION)}  # FORMAT.md §3
TENSOR_FIELDS = {"dtype", "shape", "data_offsets"}


def _short_repr() -> reprlib.Repr:
    """A repr that shortens: header values quoted in a report may be crafted and huge."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, 60, 60
    return short


_SHORT = _short_repr()


@dataclass
class VerifyReport:
    """What a successful :func:`verify` checked."""

    path: str
    tensors: int
    chunks: int
    files: int
    bytes_checked: int


def verify(
    path: str | Storage,
    *,
    storage_options: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Return normally only if the checkpoint is committed and every byte checks out.

    Raises CorruptCheckpointError listing every problem found (tensor, chunk, file), or the
    error of :func:`unickpt.inspect` when the manifest itself is missing or unreadable
    (CheckpointNotFoundError too if the checkpoint was deleted while being verified).
    ``progress(done, total)`` is called with bytes checked so far, e.g. to drive a progress bar.
    """
    storage = open_storage(path, storage_options)
    manifest = read_manifest(storage)
    by_file: dict[str, list[tuple[str, Chunk]]] = {name: [] for name in manifest.files}
    for key, meta in manifest.tensors.items():
        for chunk in meta.chunks:
            by_file[chunk.file].append((key, chunk))
    problems: list[str] = []
    checked = 0
    total = sum(chunk.nbytes for chunks in by_file.values() for _, chunk in chunks)
    for name, chunks in by_file.items():
        where = storage.describe(name)
        try:
            with storage.open_reader(name) as reader:
                if reader.size() != manifest.files[name]:
                    problems.append(
                        f"{where}: {reader.size()} bytes, the manifest says "
                        f"{manifest.files[name]} (truncated or replaced)"
                    )
                    continue
                problems += _check_header(reader, where, chunks, manifest)
                for key, chunk in chunks:
                    if _checksum(reader, chunk) != chunk.xxh3:
                        problems.append(
                            f"tensor {key!r} chunk {chunk.box} in {where}: checksum "
                            f"mismatch (bytes [{chunk.offset}, {chunk.offset + chunk.nbytes}))"
                        )
                    checked += chunk.nbytes
                    if progress is not None:
                        progress(checked, total)
        except CheckpointError as exc:
            problems.append(str(exc))
    if problems:
        listed = "\n".join(f"  {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        failed = CorruptCheckpointError(
            f"checkpoint {storage.url} failed verification "
            f"({len(problems)} problem(s)):\n{listed}{more}"
        )
        raise deleted_while_read(storage, failed)  # gone since it was read: not corrupt
    return VerifyReport(
        storage.url,
        len(manifest.tensors),
        sum(len(c) for c in by_file.values()),
        len(by_file),
        checked,
    )


def _check_header(
    reader: Reader, where: str, chunks: list[tuple[str, Chunk]], manifest: Manifest
) -> list[str]:
    header, data_start = read_header(reader, where)
    problems = _safetensors_problems(header, data_start, reader.size(), where)
    for key, chunk in chunks:
        entry = header.get(chunk.key)
        expected = {
            "dtype": safetensors_dtype(manifest.tensors[key].dtype),
            "shape": list(chunk.sizes),
            "data_offsets": [chunk.offset - data_start, chunk.offset - data_start + chunk.nbytes],
        }
        if entry != expected:
            problems.append(
                f"tensor {key!r} chunk {chunk.box} in {where}: safetensors header "
                f"entry {chunk.key!r} is {_SHORT.repr(entry)}, expected {expected}"
            )
    return problems


def _safetensors_problems(
    header: dict[str, Any], data_start: int, size: int, where: str
) -> list[str]:
    """Why ``header`` is not a safetensors header as unickpt writes it (FORMAT.md §3), if it is not.

    The chunk entries the manifest names are compared with it separately. This covers what a
    reader without the manifest depends on, such as the safetensors library, which refuses the
    whole file over a bad ``__metadata__`` or a malformed entry, or data not laid back to back.
    """
    problems = []
    metadata = header.get("__metadata__")
    if "__metadata__" not in header:
        problems.append(f"{where}: safetensors header has no __metadata__, expected {METADATA}")
    elif not (
        isinstance(metadata, dict)
        and all(isinstance(v, str) for v in metadata.values())  # safetensors requires strings
        and all(metadata.get(k) == v for k, v in METADATA.items())  # more keys: still readable
    ):
        problems.append(
            f"{where}: safetensors header __metadata__ is {_SHORT.repr(metadata)}, "
            f"expected {METADATA}"
        )
    spans: list[tuple[int, int, str]] = []
    malformed = False
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        span = _tensor_span(entry)
        if span is None:
            malformed = True
            problems.append(
                f"{where}: safetensors header entry {_SHORT.repr(name)} is not a valid tensor "
                f"entry: {_SHORT.repr(entry)}"
            )
        else:
            spans.append((*span, name))
    if malformed:  # the layout check below needs every entry's offsets
        return problems
    position = 0  # safetensors requires data back to back from the start, to the file's end
    for begin, end, name in sorted(spans):
        if begin != position:
            problems.append(
                f"{where}: safetensors header entry {_SHORT.repr(name)} starts at data byte "
                f"{begin}, expected {position} (tensors overlap or leave a hole)"
            )
            return problems
        position = end
    if data_start + position != size:
        problems.append(
            f"{where}: safetensors header entries end at data byte {position}, the file's data "
            f"at {size - data_start}"
        )
    return problems


def _tensor_span(entry: Any) -> tuple[int, int] | None:
    """``entry``'s data offsets if it is a tensor entry unickpt could have written, else None."""
    if not isinstance(entry, dict) or set(entry) != TENSOR_FIELDS:
        return None
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if (
        not isinstance(dtype, str)
        or dtype not in FROM_SAFETENSORS
        or not _counts(shape)
        or len(shape) > MAX_DIMS
        or not _counts(offsets)
        or len(offsets) != 2
    ):
        return None
    begin, end = offsets
    if end - begin != math.prod(shape) * itemsize(FROM_SAFETENSORS[dtype]):
        return None
    return begin, end


def _counts(value: Any) -> bool:
    """A list of ints in [0, 2^63), as shapes and offsets are (bools are no ints here)."""
    return isinstance(value, list) and all(type(v) is int and 0 <= v < MAX_COUNT for v in value)


def _checksum(reader: Reader, chunk: Chunk) -> str:
    state = Checksummer()
    buffer = bytearray(min(BLOCK, max(chunk.nbytes, 1)))
    done = 0
    while done < chunk.nbytes:
        n = min(len(buffer), chunk.nbytes - done)
        view = memoryview(buffer)[:n]
        reader.read_into(chunk.offset + done, view)
        state.update(view)
        done += n
    return state.hexdigest()
