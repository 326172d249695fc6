"""One rank's data files in a save: their layout, and the two ways their bytes reach storage.

The save plan gives each rank the boxes it writes; they are dealt into up to WRITE_STREAMS
files written concurrently. A file's header is padded so that its data starts at a multiple of
DATA_ALIGN bytes (docs/FORMAT.md §3). Its data then reaches storage either

* streamed from the live tensors (sync saves), each piece checksummed just before it is written,
  while it is in cache; or
* from a staged *data image* (background saves): the file's data bytes, laid out as in the file,
  in page-aligned host memory that the staging pool reuses across saves. Staging is one memcpy
  per chunk (the only part training may wait for); the image then goes to storage in aligned
  pieces, each checksummed just before it is written, which local storage writes around the page
  cache (direct I/O).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import torch

from unickpt.engine.buffers import byte_view, flat, tensor_bytes
from unickpt.errors import (
    CheckpointError,
    CheckpointExistsError,
    StateChangedError,
    first_few,
)
from unickpt.format.checksum import Checksummer
from unickpt.format.dtypes import itemsize
from unickpt.format.manifest import (
    DATA_DIR,
    DATA_SUFFIX,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    written_by_a_save,
)
from unickpt.format.safetensors_file import FileEntry, encode_header
from unickpt.layout.box import Box
from unickpt.layout.sharded import LocalShard
from unickpt.layout.state import SaveView
from unickpt.plan.save_plan import SavePlan
from unickpt.storage import LocalStorage, Storage, Writer
from unickpt.storage.local import BUFFERED_WRITE_BYTES, DIRECT_ALIGN

DATA_ALIGN = DIRECT_ALIGN  # data sections start here, so images can be written with direct I/O
WRITE_STREAMS = 2  # concurrent files per rank: disks here sustain ~1.5-2x more with two
STREAM_MIN_BYTES = 64 * 1024 * 1024  # below this, a second stream is only another file
# Staged images go to storage in pieces of this size (aligned, so local storage writes them with
# direct I/O), each checksummed just before it is written.
IMAGE_WRITE_BYTES = 8 * 1024 * 1024


def check_target(storage: Storage) -> None:
    """Refuse a save's target that holds a committed checkpoint, or anything a save did not
    write there (a run directory, the working directory, a bucket's root, given by mistake):
    a checkpoint's directory is unickpt's, and a save deletes its own leftovers in it."""
    names = storage.list()
    if MANIFEST in names:
        raise CheckpointExistsError(
            f"{storage.url} already holds a committed checkpoint; save to a new path"
        )
    foreign = [name for name in names if not written_by_a_save(name)]
    if foreign:
        raise CheckpointError(
            f"{storage.url} holds files that no unickpt save wrote ({first_few(foreign)}); "
            "save into a new or empty directory"
        )


def shard_key(key: str, box: Box) -> str:
    """A chunk's name in its data file's safetensors header (docs/FORMAT.md §3)."""
    return f"{key}@{','.join(map(str, box.offsets))}"


@dataclass(frozen=True)
class ChunkSlot:
    """Where one box goes in a data file (``offset``: absolute, from the file's first byte)."""

    key: str
    box: Box
    entry: FileEntry
    offset: int


@dataclass(frozen=True)
class FileLayout:
    """One data file of this rank: header bytes, then its chunks back to back."""

    stream: int
    header: bytes
    chunks: tuple[ChunkSlot, ...]

    @property
    def data_bytes(self) -> int:
        return sum(c.entry.nbytes for c in self.chunks)

    @property
    def size(self) -> int:
        return len(self.header) + self.data_bytes

    def name(self, rank: int, uid: str) -> str:
        return f"{DATA_DIR}/r{rank:05d}-{uid}-{self.stream}{DATA_SUFFIX}"

    def records(self, file: str, checksums: list[str]) -> list[dict[str, Any]]:
        """The chunk records rank 0 turns into manifest entries."""
        return [
            {
                "key": c.key,
                "offsets": list(c.box.offsets),
                "sizes": list(c.box.sizes),
                "file": file,
                "st_key": c.entry.name,
                "offset": c.offset,
                "nbytes": c.entry.nbytes,
                "xxh3": checksum,
            }
            for c, checksum in zip(self.chunks, checksums, strict=True)
        ]


def file_layouts(writes: list[tuple[str, Box]], plan: SavePlan) -> list[FileLayout]:
    """This rank's boxes dealt into files of near-equal size (largest first): as many as
    WRITE_STREAMS, each carrying at least STREAM_MIN_BYTES."""
    size = {key: itemsize(dtype) for key, (dtype, _) in plan.tensors.items()}
    total = sum(box.volume * size[key] for key, box in writes)
    count = max(1, min(WRITE_STREAMS, total // STREAM_MIN_BYTES))
    streams: list[list[tuple[str, Box]]] = [[] for _ in range(count)]
    load = [0] * count
    for key, box in sorted(writes, key=lambda w: -w[1].volume * size[w[0]]):
        lightest = load.index(min(load))
        streams[lightest].append((key, box))
        load[lightest] += box.volume * size[key]
    layouts: list[FileLayout] = []
    for stream in streams:
        if not stream:
            continue
        stream.sort(key=lambda w: (w[0], w[1].offsets))
        entries = [
            FileEntry(shard_key(key, box), plan.tensors[key][0], box.sizes, box.volume * size[key])
            for key, box in stream
        ]
        header, offsets = encode_header(
            entries, {"format": FORMAT_NAME, "version": str(FORMAT_VERSION)}, align=DATA_ALIGN
        )
        chunks = tuple(
            ChunkSlot(key, box, entry, offset)
            for (key, box), entry, offset in zip(stream, entries, offsets, strict=True)
        )
        layouts.append(FileLayout(len(layouts), header, chunks))
    return layouts


def _source(view: SaveView, chunk: ChunkSlot) -> torch.Tensor:
    shard: LocalShard = view.shards[chunk.key]
    return shard.local[chunk.box.relative_to(shard.box).slices()]


def _write_checksummed(
    writer: Writer, data: memoryview, spans: list[tuple[int, int]], piece: int
) -> list[str]:
    """Write ``data`` in pieces of ``piece`` bytes, checksumming the part of each span
    ``[begin, end)`` a piece holds just before writing it (while it is in cache)."""
    digests = [Checksummer() for _ in spans]
    first = 0  # the first span not wholly written yet
    for start in range(0, data.nbytes, piece):
        end = min(start + piece, data.nbytes)
        while first < len(spans) and spans[first][1] <= start:
            first += 1
        for index in range(first, len(spans)):
            begin, stop = spans[index]
            if begin >= end:
                break
            digests[index].update(data[max(begin, start) : min(stop, end)])
        writer.write(data[start:end])
    return [digest.hexdigest() for digest in digests]


def stream_file(writer: Writer, layout: FileLayout, view: SaveView, storage: Storage) -> list[str]:
    """Write the file from the live tensors; returns each chunk's checksum."""
    # Local files get small write() calls anyway (see BUFFERED_WRITE_BYTES); other backends get
    # whole chunks (S3 sends a large write as a part without copying it).
    piece = BUFFERED_WRITE_BYTES if isinstance(storage, LocalStorage) else None
    writer.write(layout.header)
    checksums = []
    for chunk in layout.chunks:
        data = tensor_bytes(_source(view, chunk))
        checksums += _write_checksummed(
            writer, data, [(0, data.nbytes)], piece or max(data.nbytes, 1)
        )
    return checksums


def stage_file(layout: FileLayout, view: SaveView, image: torch.Tensor, *, all_cores: bool) -> None:
    """Copy the file's data into ``image`` (uint8, ``layout.data_bytes`` long).

    Only the copy happens here, while the state must not change; checksums are computed as the
    image is written, when the caller's compute no longer waits for them. ``all_cores`` when the
    caller is blocked anyway (async saves): torch's parallel copy. Otherwise (lazy saves, beside
    the caller's compute) a plain memcpy: one thread, without the GIL (ctypes releases it), so it
    takes at most one core from training, and only for its own time.
    """
    assert image.numel() == layout.data_bytes
    base = len(layout.header)
    with torch.no_grad():
        for chunk in layout.chunks:
            begin, nbytes = chunk.offset - base, chunk.entry.nbytes
            source = _source(view, chunk).detach()
            if source.device.type != "cpu" or not source.is_contiguous():
                if begin % source.element_size() == 0:
                    target = image[begin : begin + nbytes].view(source.dtype).view(source.shape)
                    target.copy_(source)
                    continue
                source = source.contiguous().cpu()  # rare: a misaligned slot for a strided box
            if source.numel() * source.element_size() != nbytes:  # never copy past its end
                raise StateChangedError(f"{chunk.key!r} changed size since the save was called")
            if all_cores:
                image[begin : begin + nbytes].copy_(flat(source).view(torch.uint8))
            else:
                ctypes.memmove(image.data_ptr() + begin, source.data_ptr(), nbytes)


def write_image(writer: Writer, layout: FileLayout, image: torch.Tensor) -> list[str]:
    """Write a staged file, its header then its data image; returns each chunk's checksum."""
    writer.write(layout.header)
    base = len(layout.header)
    spans = [(c.offset - base, c.offset - base + c.entry.nbytes) for c in layout.chunks]
    return _write_checksummed(writer, byte_view(image), spans, IMAGE_WRITE_BYTES)
