"""Boxes: axis-aligned hyper-rectangles of a tensor's global index space.

Every shard on disk and every shard a rank holds is a box. Resharding is box intersection plus the
translation of a sub-box of a row-major chunk into contiguous byte runs.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Box:
    """``offsets`` and ``sizes`` per dimension; a 0-d tensor is the empty tuple box of volume 1."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @staticmethod
    def of(offsets: Sequence[int], sizes: Sequence[int]) -> Box:
        return Box(tuple(int(o) for o in offsets), tuple(int(s) for s in sizes))

    @staticmethod
    def full(shape: Sequence[int]) -> Box:
        return Box((0,) * len(shape), tuple(int(s) for s in shape))

    @property
    def ndim(self) -> int:
        return len(self.sizes)

    @property
    def volume(self) -> int:
        return math.prod(self.sizes)

    @property
    def ends(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offsets, self.sizes, strict=True))

    def intersect(self, other: Box) -> Box | None:
        """The common box, or None when the two share no element."""
        lo = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets, strict=True))
        hi = tuple(min(a, b) for a, b in zip(self.ends, other.ends, strict=True))
        if any(h <= l_ for l_, h in zip(lo, hi, strict=True)):
            return None
        return Box(lo, tuple(h - l_ for l_, h in zip(lo, hi, strict=True)))

    def relative_to(self, origin: Box) -> Box:
        """This box in the coordinates of ``origin`` (which must contain it)."""
        return Box(
            tuple(o - p for o, p in zip(self.offsets, origin.offsets, strict=True)), self.sizes
        )

    def within(self, shape: Sequence[int]) -> bool:
        return len(shape) == self.ndim and all(
            o >= 0 and s >= 0 and o + s <= d
            for o, s, d in zip(self.offsets, self.sizes, shape, strict=True)
        )

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes, strict=True))

    def split(self, pieces: int) -> list[Box]:
        """Cut along the first dimension longer than 1 into at most ``pieces`` near-equal boxes."""
        dim = next((d for d, s in enumerate(self.sizes) if s > 1), None)
        if dim is None or pieces <= 1:
            return [self]
        length = self.sizes[dim]
        pieces = min(pieces, length)
        out = []
        for i in range(pieces):
            lo, hi = length * i // pieces, length * (i + 1) // pieces
            offsets = list(self.offsets)
            sizes = list(self.sizes)
            offsets[dim] += lo
            sizes[dim] = hi - lo
            out.append(Box(tuple(offsets), tuple(sizes)))
        return out

    def __str__(self) -> str:
        return (
            "["
            + ", ".join(f"{o}:{o + s}" for o, s in zip(self.offsets, self.sizes, strict=True))
            + "]"
        )


def row_major_strides(sizes: Sequence[int]) -> tuple[int, ...]:
    """Element strides of a contiguous row-major array of ``sizes``."""
    strides = [1] * len(sizes)
    for d in range(len(sizes) - 2, -1, -1):
        strides[d] = strides[d + 1] * max(int(sizes[d + 1]), 1)
    return tuple(strides)


@dataclass(frozen=True, slots=True)
class Runs:
    """A sub-box of a row-major array as contiguous runs of elements.

    ``starts[i]`` is the element index (in the enclosing array) where run ``i`` begins; every run
    is ``length`` elements long. Runs are in row-major order of the sub-box, so reading them one
    after the other yields the sub-box as a contiguous array.
    """

    starts: np.ndarray
    length: int

    @property
    def count(self) -> int:
        return int(self.starts.size)

    @property
    def span(self) -> tuple[int, int]:
        """[first, last) element range covering every run."""
        if self.count == 0:
            return (0, 0)
        return int(self.starts[0]), int(self.starts[-1]) + self.length


def contiguous_runs(sub: Box, sizes: Sequence[int]) -> Runs:
    """Decompose ``sub`` (relative to an array of ``sizes``) into maximal contiguous runs."""
    ndim = len(sizes)
    if sub.volume == 0:
        return Runs(np.zeros(0, dtype=np.int64), 0)
    if ndim == 0:
        return Runs(np.zeros(1, dtype=np.int64), 1)
    strides = row_major_strides(sizes)
    # The run extends over the trailing dims the sub-box covers fully, plus one partial dim.
    k = ndim - 1
    while k > 0 and sub.offsets[k] == 0 and sub.sizes[k] == sizes[k]:
        k -= 1
    length = sub.sizes[k] * strides[k]
    starts = np.array([sub.offsets[k] * strides[k]], dtype=np.int64)
    for d in range(k - 1, -1, -1):
        rows = (sub.offsets[d] + np.arange(sub.sizes[d], dtype=np.int64)) * strides[d]
        starts = (rows[:, None] + starts[None, :]).reshape(-1)
    return Runs(starts, int(length))


MAX_GRID_CELLS = 4_000_000  # beyond this, tiling is checked at a random point (linear time)
_PRIME = 2**127 - 1  # a Mersenne prime, far above any tensor's element count


def tiling_problem(
    boxes: Sequence[Box], shape: Sequence[int], *, one_chunk_if_empty: bool = True
) -> str | None:
    """Why ``boxes`` do not tile ``shape`` exactly (no gap, no overlap), or None if they do.

    A shape with no elements takes one box of its whole shape, as a manifest has it (FORMAT §4);
    without ``one_chunk_if_empty``, any boxes inside it (other formats' empty shards)."""
    shape = tuple(int(s) for s in shape)
    for box in boxes:
        if not box.within(shape):
            return f"chunk {box} lies outside shape {list(shape)}"
    total = math.prod(shape)
    covered = sum(b.volume for b in boxes)
    if total == 0:
        if not one_chunk_if_empty or (len(boxes) == 1 and boxes[0] == Box.full(shape)):
            return None if boxes else "no chunk"
        return f"{len(boxes)} chunks for a tensor with no elements (one of its whole shape)"
    nonempty = [b for b in boxes if b.volume]
    if covered != total:
        kind = "overlap" if covered > total else "gap"
        return f"chunks cover {covered} of {total} elements ({kind})"
    if len(shape) == 0:
        return None if len(nonempty) == 1 else f"{len(nonempty)} chunks for a 0-d tensor"
    # Volumes add up, so exact tiling <=> no two chunks overlap. Check on the grid of cut points:
    # each grid cell must be claimed exactly once (linear in cells for DTensor-style grids).
    cuts = [
        sorted({0, n, *(b.offsets[d] for b in nonempty), *(b.ends[d] for b in nonempty)})
        for d, n in enumerate(shape)
    ]
    cells = math.prod(len(c) - 1 for c in cuts)
    if cells > MAX_GRID_CELLS:  # crafted or pathological cut patterns
        return None if _covers_once_at_random_point(nonempty, shape) else "chunks overlap"
    claims = np.zeros([len(c) - 1 for c in cuts], dtype=np.int32)
    index = [{v: i for i, v in enumerate(c)} for c in cuts]
    for b in nonempty:
        sl = tuple(slice(index[d][b.offsets[d]], index[d][b.ends[d]]) for d in range(len(shape)))
        claims[sl] += 1
    return "chunks overlap" if (claims != 1).any() else None


def _covers_once_at_random_point(boxes: Sequence[Box], shape: tuple[int, ...]) -> bool:
    """Whether ``boxes`` cover every element of ``shape`` exactly once, in time linear in the
    boxes for any arrangement (manifests are untrusted: checking pairs took minutes on a crafted
    staircase of 8000 chunks, and no exact check is near-linear in every dimension count).
    Never wrong when it says no; wrong when it says yes with probability at most
    sum(shape) / 2**127, below 2**-57 for any shape a manifest admits.

    The elements of a box have the generating polynomial prod_d (x_d**lo_d - x_d**hi_d) / (1 - x_d),
    so P = sum over boxes of prod_d (x_d**lo_d - x_d**hi_d), minus the same for the whole shape,
    is G * prod_d (1 - x_d), where G counts each element's claims minus one. The boxes tile the
    shape iff G = 0. G's coefficients lie in [-1, number of boxes], far below the prime, so a
    nonzero G is nonzero modulo it, and so is P (a product of nonzero polynomials over a field).
    A nonzero P vanishes at a uniformly random point with probability at most deg(P) / prime
    (Schwartz-Zippel), and deg(P) <= sum(shape). The point is secret: crafted input cannot aim
    at its zeros.
    """
    point = [secrets.randbelow(_PRIME) for _ in shape]
    powers: list[dict[int, int]] = [{} for _ in shape]

    def term(offsets: Sequence[int], ends: Sequence[int]) -> int:
        value = 1
        for d, (lo, hi) in enumerate(zip(offsets, ends, strict=True)):
            cache = powers[d]
            for c in (lo, hi):
                if c not in cache:
                    cache[c] = pow(point[d], c, _PRIME)
            value = value * (cache[lo] - cache[hi]) % _PRIME
        return value

    total = sum(term(b.offsets, b.ends) for b in boxes) - term((0,) * len(shape), shape)
    return total % _PRIME == 0
