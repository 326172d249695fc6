"""Property tests of the layout math: boxes, contiguous runs, tiling checks and chunk reads.

The central property: for a tensor of any shape (0-d, size-1 and 0-size dims included) saved as
any grid of row-major chunks in one byte "file", any target box is reassembled exactly by
executing its ``plan_target_reads`` the way ``engine/load.py``'s ``_execute`` does, while reading
at most 5% more bytes than the target holds.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from unickpt.format.manifest import Chunk
from unickpt.layout.box import Box, contiguous_runs, row_major_strides, tiling_problem
from unickpt.plan.load_plan import (
    MAX_SPAN_WASTE,
    ChunkRead,
    contiguous_destination,
    plan_chunk_read,
    plan_target_reads,
)

DTYPES = [torch.float32, torch.bfloat16, torch.int8, torch.bool]
PAD = b"\xa5"  # filler between chunks in the fake file: never part of any tensor
MAX_READ_OVERHEAD = 1.05

shapes = st.lists(st.integers(0, 6), max_size=4).map(tuple)
nonempty_shapes = st.lists(st.integers(1, 6), max_size=4).map(tuple)


@st.composite
def grid(draw: st.DrawFn, shape: tuple[int, ...], max_cuts: int = 2) -> list[Box]:
    """A DTensor-like grid tiling of ``shape``: random cut points per dimension."""
    intervals = []
    for n in shape:
        cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=max_cuts))) if n > 1 else []
        bounds = [0, *cuts, n]
        intervals.append(list(itertools.pairwise(bounds)))
    return [
        Box(tuple(lo for lo, _ in cell), tuple(hi - lo for lo, hi in cell))
        for cell in itertools.product(*intervals)
    ]


@st.composite
def sub_box(draw: st.DrawFn, shape: tuple[int, ...]) -> Box:
    """Any box inside ``shape``, possibly empty."""
    offsets, sizes = [], []
    for n in shape:
        lo = draw(st.integers(0, n))
        offsets.append(lo)
        sizes.append(draw(st.integers(0, n - lo)))
    return Box.of(offsets, sizes)


@st.composite
def shape_and_grid(
    draw: st.DrawFn, shape_strategy: st.SearchStrategy[tuple[int, ...]] = shapes
) -> tuple[tuple[int, ...], list[Box]]:
    shape = draw(shape_strategy)
    return shape, draw(grid(shape))


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Small integers (exact in every dtype), so equality checks are exact."""
    values = torch.randint(-100, 100, shape, generator=torch.Generator().manual_seed(seed))
    return values > 0 if dtype == torch.bool else values.to(dtype)


def unlike(expected: torch.Tensor) -> torch.Tensor:
    """Differs from ``expected`` at every element, so an element left unwritten shows."""
    if expected.dtype == torch.bool:
        return ~expected
    if expected.dtype.is_floating_point:
        return torch.full_like(expected, math.nan)
    return expected + 1  # values are in [-100, 100): no int8 overflow


def write_file(tensor: torch.Tensor, boxes: list[Box], gap: int) -> tuple[np.ndarray, list[Chunk]]:
    """Store each box of ``tensor`` row-major in one byte array, ``gap`` filler bytes apart."""
    parts: list[bytes] = []
    position = 0
    chunks = []
    for box in boxes:
        data = tensor[box.slices()].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        position += gap
        chunks.append(
            Chunk(box.offsets, box.sizes, "data", f"t@{box}", position, len(data), "0" * 16)
        )
        parts += [PAD * gap, data]
        position += len(data)
    return np.frombuffer(b"".join(parts), dtype=np.uint8), chunks


def file_bytes(file: np.ndarray, offset: int, length: int) -> torch.Tensor:
    return torch.from_numpy(file[offset : offset + length].copy())


def execute(
    read: ChunkRead, file: np.ndarray, target: torch.Tensor, target_box: Box, whole: bool
) -> None:
    """Run ``read`` into ``target`` (holding ``target_box``) exactly as ``_execute`` does.

    Fast path: one exact range landing contiguously in the target is read straight into it.
    Otherwise the ranges are concatenated into a buffer whose strided view is the sub-box.
    """
    dtype = target.dtype
    inter = read.inter.relative_to(target_box)
    exact = len(read.ranges) == 1 and read.buffer_nbytes == read.inter.volume * dtype.itemsize
    if exact and not whole:
        start = contiguous_destination(target_box.sizes, inter)
        if start is not None:
            flat = target.reshape(-1)[start : start + read.inter.volume]
            flat.view(torch.uint8).copy_(file_bytes(file, *read.ranges[0]))
            return
    buffer = torch.cat([file_bytes(file, offset, length) for offset, length in read.ranges])
    source = buffer.view(dtype).as_strided(read.inter.sizes, read.strides, read.offset)
    target[inter.slices()].copy_(source)


# ------------------------------------------------------------------------------ reassembly


@settings(max_examples=200, deadline=None)
@given(
    layout=shape_and_grid(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
    gap=st.integers(0, 3),
    whole=st.booleans(),
    data=st.data(),
)
def test_any_target_is_reassembled_exactly_from_any_grid(
    layout: tuple[tuple[int, ...], list[Box]],
    dtype: torch.dtype,
    seed: int,
    gap: int,
    whole: bool,
    data: st.DataObject,
) -> None:
    shape, saved = layout
    original = random_tensor(shape, dtype, seed)
    file, chunks = write_file(original, data.draw(st.permutations(saved), label="file order"), gap)
    targets = data.draw(grid(shape), label="load grid") + data.draw(
        st.lists(sub_box(shape), max_size=4), label="sub-boxes"
    )
    for target_box in targets:
        expected = original[target_box.slices()]
        target = unlike(expected)
        writes = torch.zeros(target_box.sizes, dtype=torch.int32)
        reads = plan_target_reads(target_box, chunks, dtype.itemsize, whole=whole)
        for read in reads:
            chunk_end = read.chunk.offset + read.chunk.nbytes
            assert all(
                read.chunk.offset <= offset and offset + length <= chunk_end
                for offset, length in read.ranges
            ), f"{target_box}: ranges {read.ranges} leave chunk {read.chunk.box}"
            if whole:
                assert read.ranges == ((read.chunk.offset, read.chunk.nbytes),)
            execute(read, file, target, target_box, whole)
            writes[read.inter.relative_to(target_box).slices()] += 1
        assert bool((writes == 1).all()), f"{target_box}: elements written {writes.tolist()}"
        assert torch.equal(target, expected), (
            f"{target_box} of {list(shape)} {dtype} from chunks {[str(b) for b in saved]}:\n"
            f"got {target}\nexpected {expected}"
        )
        if not whole:
            read_bytes = sum(read.buffer_nbytes for read in reads)
            needed = target_box.volume * dtype.itemsize
            assert read_bytes <= MAX_READ_OVERHEAD * needed, (
                f"{target_box} of {list(shape)} {dtype}: read {read_bytes} bytes for {needed}"
            )


@pytest.mark.parametrize(
    ("cols", "ranges"),
    [
        (64, 1),  # the whole chunk: one contiguous run
        (63, 1),  # 1 element skipped per 63 needed < 1/32: read the span in one request
        (60, 64),  # 4 skipped per 60 needed > 1/32: one request per row
    ],
)
def test_span_read_only_when_gaps_are_small(cols: int, ranges: int) -> None:
    original = random_tensor((64, 64), torch.float32, seed=cols)
    file, chunks = write_file(original, [Box.full((64, 64))], gap=8)
    target_box = Box.of((0, 64 - cols), (64, cols))
    read = plan_chunk_read(chunks[0], target_box, 4)
    assert len(read.ranges) == ranges
    assert read.buffer_nbytes <= (1 + MAX_SPAN_WASTE) * target_box.volume * 4
    target = unlike(original[target_box.slices()])
    execute(read, file, target, target_box, whole=False)
    assert torch.equal(target, original[target_box.slices()])


# ------------------------------------------------------------------------------------ tiling


@settings(max_examples=100, deadline=None)
@given(layout=shape_and_grid(), data=st.data())
def test_grid_tilings_are_accepted(
    layout: tuple[tuple[int, ...], list[Box]], data: st.DataObject
) -> None:
    shape, boxes = layout
    assert tiling_problem(data.draw(st.permutations(boxes)), shape) is None


@settings(max_examples=60, deadline=None)
@given(layout=shape_and_grid(nonempty_shapes), data=st.data())
def test_missing_chunk_is_a_gap(
    layout: tuple[tuple[int, ...], list[Box]], data: st.DataObject
) -> None:
    shape, boxes = layout
    del boxes[data.draw(st.integers(0, len(boxes) - 1))]
    problem = tiling_problem(boxes, shape)
    assert problem is not None and "gap" in problem, problem


@settings(max_examples=60, deadline=None)
@given(layout=shape_and_grid(nonempty_shapes), data=st.data())
def test_duplicated_chunk_is_an_overlap(
    layout: tuple[tuple[int, ...], list[Box]], data: st.DataObject
) -> None:
    shape, boxes = layout
    boxes.append(data.draw(st.sampled_from(boxes)))
    problem = tiling_problem(boxes, shape)
    assert problem is not None and "overlap" in problem, problem


@settings(max_examples=60, deadline=None)
@given(layout=shape_and_grid(nonempty_shapes), data=st.data())
def test_enlarged_chunk_is_an_overlap(
    layout: tuple[tuple[int, ...], list[Box]], data: st.DataObject
) -> None:
    shape, boxes = layout
    growable = [
        (i, d) for i, b in enumerate(boxes) for d in range(len(shape)) if b.ends[d] < shape[d]
    ]
    assume(growable)
    i, d = data.draw(st.sampled_from(growable))
    sizes = list(boxes[i].sizes)
    sizes[d] += 1
    boxes[i] = Box.of(boxes[i].offsets, sizes)
    problem = tiling_problem(boxes, shape)
    assert problem is not None and "overlap" in problem, problem


@settings(max_examples=60, deadline=None)
@given(layout=shape_and_grid(nonempty_shapes), data=st.data())
def test_shifted_chunk_overlaps_although_volumes_add_up(
    layout: tuple[tuple[int, ...], list[Box]], data: st.DataObject
) -> None:
    shape, boxes = layout
    movable = [(i, d) for i, b in enumerate(boxes) for d in range(len(shape)) if b.offsets[d]]
    assume(movable)
    i, d = data.draw(st.sampled_from(movable))
    offsets = list(boxes[i].offsets)
    offsets[d] -= 1
    boxes[i] = Box.of(offsets, boxes[i].sizes)
    assert tiling_problem(boxes, shape) == "chunks overlap"


def diagonal_tiling(rows: int) -> list[Box]:
    """A tiling of (rows, rows + 1, rows + 1, rows + 1): row r is cut at r + 1 in each of dims
    1-3, so every dimension has ~rows cut points: too many grid cells to enumerate."""
    width = rows + 1
    boxes = []
    for r in range(rows):
        halves = [(0, r + 1), (r + 1, width - r - 1)]  # (offset, size)
        for cell in itertools.product(halves, repeat=3):
            boxes.append(Box((r, *(o for o, _ in cell)), (1, *(s for _, s in cell))))
    return boxes


def test_pathological_cut_patterns_use_pairwise_check() -> None:
    rows = 44
    shape = (rows, rows + 1, rows + 1, rows + 1)
    boxes = diagonal_tiling(rows)
    cells = math.prod(len({b.offsets[d] for b in boxes}) for d in range(4))
    assert cells > 4_000_000, "the claims grid must be too large to build"
    assert tiling_problem(boxes, shape) is None
    # Slide row 0's second piece onto its first: volumes still add up, the two overlap.
    boxes[1] = Box.of((0, 0, 0, 0), boxes[1].sizes)
    problem = tiling_problem(boxes, shape)
    assert problem == f"chunks {boxes[0]} and {boxes[1]} overlap"


def test_chunk_outside_the_shape_is_named() -> None:
    problem = tiling_problem([Box.of((0,), (4,)), Box.of((4,), (2,))], (5,))
    assert problem == "chunk [4:6] lies outside shape [5]"


# ------------------------------------------------------------------------- boxes and runs


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_intersect_is_commutative_and_exact(data: st.DataObject) -> None:
    shape = data.draw(shapes)
    a, b = data.draw(sub_box(shape)), data.draw(sub_box(shape))
    inter = a.intersect(b)
    assert inter == b.intersect(a)
    in_a, in_b = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    in_a[a.slices()] = True
    in_b[b.slices()] = True
    shared = int((in_a & in_b).sum())
    if inter is None:
        assert shared == 0, f"{a} and {b} share {shared} elements but intersect to None"
        return
    assert inter.volume == shared > 0, f"{a} & {b} = {inter}, but they share {shared} elements"
    for box in (a, b):
        assert all(o >= p for o, p in zip(inter.offsets, box.offsets, strict=True))
        assert all(e <= f for e, f in zip(inter.ends, box.ends, strict=True))
    assert bool(in_a[inter.slices()].all() and in_b[inter.slices()].all())


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_contiguous_runs_gather_the_sub_box(data: st.DataObject) -> None:
    shape = data.draw(shapes)
    sub = data.draw(sub_box(shape))
    runs = contiguous_runs(sub, shape)
    starts = runs.starts.tolist()
    assert runs.count * runs.length == sub.volume
    assert all(a + runs.length < b for a, b in itertools.pairwise(starts)), (
        f"runs of {sub} in {list(shape)} overlap, touch or are unsorted: {starts} x {runs.length}"
    )
    flat = np.arange(math.prod(shape))
    gathered = np.concatenate([flat[s : s + runs.length] for s in starts] or [flat[:0]])
    np.testing.assert_array_equal(gathered, flat.reshape(shape)[sub.slices()].reshape(-1))


@given(shapes)
def test_row_major_strides_match_torch(shape: tuple[int, ...]) -> None:
    assert row_major_strides(shape) == torch.empty(shape).stride()
