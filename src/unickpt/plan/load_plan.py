"""The load plan: for each box a rank needs, the byte ranges of the stored chunks that hold it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from unickpt.format.manifest import Chunk
from unickpt.layout.box import Box, contiguous_runs, row_major_strides

# Read a chunk's whole span of a sub-box (one request) instead of one request per run when the
# bytes between runs are at most this fraction of the bytes needed.
MAX_SPAN_WASTE = 1 / 32


@dataclass(frozen=True)
class ChunkRead:
    """Read part of one chunk and place it into the target.

    The bytes at ``ranges`` (file offset, length), concatenated into one buffer, hold the needed
    sub-box ``inter`` (global coordinates) as the strided view ``(inter.sizes, strides, offset)``
    of that buffer, counted in elements.
    """

    chunk: Chunk
    inter: Box
    ranges: tuple[tuple[int, int], ...]
    strides: tuple[int, ...]
    offset: int = 0

    @property
    def buffer_nbytes(self) -> int:
        return sum(length for _, length in self.ranges)


def plan_chunk_read(chunk: Chunk, inter: Box, itemsize: int, *, whole: bool = False) -> ChunkRead:
    """How to read ``inter`` (inside ``chunk.box``) from the chunk; ``whole`` reads all of it."""
    local = inter.relative_to(chunk.box)
    chunk_strides = row_major_strides(chunk.sizes)
    if whole:
        start = sum(o * s for o, s in zip(local.offsets, chunk_strides, strict=True))
        return ChunkRead(chunk, inter, ((chunk.offset, chunk.nbytes),), chunk_strides, start)
    runs = contiguous_runs(local, chunk.sizes)
    first, end = runs.span
    if runs.count == 1:
        return ChunkRead(
            chunk,
            inter,
            ((chunk.offset + first * itemsize, (end - first) * itemsize),),
            row_major_strides(inter.sizes),
        )
    needed = inter.volume * itemsize
    span = (end - first) * itemsize
    if span - needed <= needed * MAX_SPAN_WASTE:
        return ChunkRead(chunk, inter, ((chunk.offset + first * itemsize, span),), chunk_strides)
    length = runs.length * itemsize
    ranges = tuple((chunk.offset + int(s) * itemsize, length) for s in runs.starts)
    return ChunkRead(chunk, inter, ranges, row_major_strides(inter.sizes))


def plan_target_reads(
    target: Box, chunks: Sequence[Chunk], itemsize: int, *, whole: bool = False
) -> list[ChunkRead]:
    """Every chunk read needed to fill ``target``; chunks that miss it are skipped."""
    out = []
    for chunk in chunks:
        inter = chunk.box.intersect(target)
        if inter is not None and inter.volume:
            out.append(plan_chunk_read(chunk, inter, itemsize, whole=whole))
    return out


def contiguous_destination(target_sizes: Sequence[int], inter_local: Box) -> int | None:
    """Element offset of ``inter_local`` in the target if it is one contiguous run there."""
    runs = contiguous_runs(inter_local, target_sizes)
    return int(runs.starts[0]) if runs.count == 1 else None
