"""The save plan: which rank writes which box of which tensor.

Every rank reports the boxes it holds. Identical boxes held by several ranks (DP replicas,
``Replicate()`` placements, plain tensors) are written once; large replicated boxes are cut so
their replicas share the writing; then boxes go, largest first, to the least-loaded rank holding
them. Module buffers are the exception: they go whole to the lowest rank holding them. The plan
depends only on the global layout, so it is cached under that layout's digest.
"""

from __future__ import annotations

import functools
import json
import math
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import xxhash

from unickpt.errors import InvalidStateError
from unickpt.format.dtypes import itemsize
from unickpt.layout.box import Box, tiling_problem

# Replicated boxes are split among their holders in pieces at least this large (so boxes of
# twice this size and more), at most one per holder: no rank writes a large replicated tensor
# alone, and no piece is so small that its own write costs more than it spreads.
SPLIT_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class ShardMeta:
    """What one rank holds of one tensor.

    ``buffer`` marks a module buffer. Its replicas may differ where parameters' cannot: DDP
    leaves each rank's BatchNorm statistics as its own batches made them until the next forward
    broadcasts rank 0's. So the lowest rank holding a buffer writes it, and a resume continues
    from the statistics the run itself would have used.
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    box: Box
    buffer: bool = False

    def to_json(self) -> list[object]:
        return [
            self.key,
            self.dtype,
            list(self.shape),
            list(self.box.offsets),
            list(self.box.sizes),
            self.buffer,
        ]

    @staticmethod
    def from_json(doc: list[object]) -> ShardMeta:
        key, dtype, shape, offsets, sizes, buffer = doc
        assert isinstance(key, str) and isinstance(dtype, str) and isinstance(buffer, bool)
        assert isinstance(shape, list) and isinstance(offsets, list) and isinstance(sizes, list)
        return ShardMeta(key, dtype, tuple(shape), Box.of(offsets, sizes), buffer)


def layout_digest(metas: list[ShardMeta]) -> str:
    """A digest of one rank's layout; equal digests on every rank mean the cached plan holds."""
    text = json.dumps(sorted(m.to_json() for m in metas), separators=(",", ":"))  # type: ignore[type-var]
    return xxhash.xxh3_128_hexdigest(text.encode())


@dataclass(frozen=True)
class SavePlan:
    """``writes[r]`` is the list of (key, box) rank ``r`` writes; ``tensors`` the global specs."""

    writes: list[list[tuple[str, Box]]]
    tensors: dict[str, tuple[str, tuple[int, ...]]]

    def bytes_per_rank(self) -> list[int]:
        return [
            sum(box.volume * itemsize(self.tensors[key][0]) for key, box in writes)
            for writes in self.writes
        ]


def build_save_plan(per_rank: list[list[ShardMeta]], split_bytes: int = SPLIT_BYTES) -> SavePlan:
    """Deduplicate and balance; raise InvalidStateError if ranks disagree or boxes don't tile."""
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    holders: dict[tuple[str, Box], list[int]] = {}
    declared: dict[str, list[int]] = {}
    buffers: set[str] = set()
    for rank, metas in enumerate(per_rank):
        for meta in metas:
            spec = (meta.dtype, meta.shape)
            seen = tensors.setdefault(meta.key, spec)
            if seen != spec:
                raise InvalidStateError(
                    f"tensor {meta.key!r}: ranks disagree on dtype/shape: {seen} vs {spec} "
                    f"(rank {rank})"
                )
            declared.setdefault(meta.key, []).append(rank)
            if meta.buffer:
                buffers.add(meta.key)
            if meta.box.volume:
                holders.setdefault((meta.key, meta.box), []).append(rank)

    by_key: dict[str, list[Box]] = {key: [] for key in tensors}
    for key, box in holders:
        by_key[key].append(box)
    for key, boxes in by_key.items():
        shape = tensors[key][1]
        if math.prod(shape) == 0:  # an empty tensor: one empty chunk, from any rank that has it
            by_key[key] = [Box.full(shape)]
            holders[(key, Box.full(shape))] = declared[key]
            continue
        problem = tiling_problem(boxes, shape)
        if problem:
            raise InvalidStateError(
                f"tensor {key!r}: the ranks' shards do not tile its shape {list(shape)}: {problem}"
            )

    pieces: list[tuple[int, str, Box, list[int]]] = []
    for key, boxes in by_key.items():
        size = itemsize(tensors[key][0])
        for box in boxes:
            ranks = holders[(key, box)]
            nbytes = box.volume * size
            if key in buffers:
                pieces.append((nbytes, key, box, [min(ranks)]))
                continue
            parts = min(len(ranks), max(1, nbytes // split_bytes)) if len(ranks) > 1 else 1
            for piece in box.split(parts):
                pieces.append((piece.volume * size, key, piece, ranks))

    load = [0] * len(per_rank)
    writes: list[list[tuple[str, Box]]] = [[] for _ in per_rank]
    pieces.sort(key=lambda p: (-p[0], p[1], p[2].offsets))
    for nbytes, key, box, ranks in pieces:
        rank = min(ranks, key=lambda r: (load[r], r))
        load[rank] += nbytes
        writes[rank].append((key, box))
    for rank_writes in writes:
        rank_writes.sort(key=lambda w: (w[0], w[1].offsets))
    return SavePlan(writes, tensors)


def _new_lock(cache: weakref.ref[PlanCache]) -> None:
    held = cache()
    if held is not None:
        held._lock = threading.Lock()


class PlanCache:
    """A few recent plans keyed by the digest of the global layout (thread-safe: background
    saves and reservations plan on their own thread)."""

    def __init__(self, capacity: int = 8) -> None:
        self._plans: OrderedDict[str, SavePlan] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()
        # A child forked while a planning thread held the lock (a DataLoader worker forked during
        # a background save) would wait for it forever; the plans themselves are immutable.
        os.register_at_fork(after_in_child=functools.partial(_new_lock, weakref.ref(self)))

    def snapshot(self) -> dict[str, SavePlan]:
        """The plans held now, which later puts and evictions do not change."""
        with self._lock:
            return dict(self._plans)

    def put(self, digest: str, plan: SavePlan) -> None:
        with self._lock:
            self._plans[digest] = plan
            self._plans.move_to_end(digest)
            while len(self._plans) > self._capacity:
                self._plans.popitem(last=False)
