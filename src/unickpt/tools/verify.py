"""Full integrity check: every file's size and header, every chunk's checksum."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from unickpt.errors import CheckpointError, CorruptCheckpointError
from unickpt.format.checksum import Checksummer
from unickpt.format.dtypes import safetensors_dtype
from unickpt.format.manifest import Chunk, Manifest, read_manifest
from unickpt.format.safetensors_file import read_header
from unickpt.storage import Reader, Storage, open_storage

BLOCK = 16 * 1024 * 1024


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
    error of :func:`unickpt.inspect` when the manifest itself is missing or unreadable.
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
        raise CorruptCheckpointError(
            f"checkpoint {storage.url} failed verification "
            f"({len(problems)} problem(s)):\n{listed}{more}"
        )
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
    problems = []
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
                f"entry {chunk.key!r} is {entry}, expected {expected}"
            )
    return problems


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
