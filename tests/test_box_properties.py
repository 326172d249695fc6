"""Property tests of the layout math: boxes, contiguous runs, tiling checks and chunk reads.

The central property: for a tensor of any shape (0-d, size-1 and 0-size dims included) saved as
any grid of row-major chunks in one byte "file", any target box is reassembled exactly by
executing its ``plan_target_reads`` the way ``engine/load.py``'s ``_execute`` does, while reading
at most 5% more bytes than the target holds.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from unickpt.format.manifest import Chunk
from unickpt.layout import box as box_module
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
    problem = tiling_problem(data.draw(st.permutations(boxes)), shape)
    if math.prod(shape) or boxes == [Box.full(shape)]:
        assert problem is None
    else:  # a tensor with no elements has one chunk, of its whole shape (FORMAT §4)
        assert problem is not None and "no elements" in problem


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


def test_diagonal_cut_patterns_are_checked() -> None:
    rows = 44
    shape = (rows, rows + 1, rows + 1, rows + 1)
    boxes = diagonal_tiling(rows)
    cells = math.prod(len({b.offsets[d] for b in boxes}) for d in range(4))
    assert cells > 4_000_000, "the claims grid would be too large to build"
    assert tiling_problem(boxes, shape) is None
    # Slide row 0's second piece onto its first: volumes still add up, the two overlap.
    boxes[1] = Box.of((0, 0, 0, 0), boxes[1].sizes)
    assert tiling_problem(boxes, shape) == "chunks overlap"


def test_chunk_outside_the_shape_is_named() -> None:
    problem = tiling_problem([Box.of((0,), (4,)), Box.of((4,), (2,))], (5,))
    assert problem == "chunk [4:6] lies outside shape [5]"


# The two ways `tiling_problem` decides once volumes add up: claims on the grid of cut points,
# and the linear check at a random point it uses when that grid is too large (forced here).
METHODS = {"grid": box_module.MAX_GRID_CELLS, "random point": 0}


@contextmanager
def deciding_by(method: str) -> Iterator[None]:
    with mock.patch.object(box_module, "MAX_GRID_CELLS", METHODS[method]):
        yield


@contextmanager
def without_randomized_check() -> Iterator[None]:
    with mock.patch.object(
        box_module,
        "_covers_once_at_random_point",
        side_effect=AssertionError("randomized check"),
    ):
        yield


def tiles(boxes: list[Box], shape: tuple[int, ...]) -> bool:
    """Brute-force reference: at least one chunk, and every element claimed exactly once; a
    shape with no elements has one chunk, of the whole shape (FORMAT §4)."""
    if not boxes or not all(b.within(shape) for b in boxes):
        return False
    if not math.prod(shape):
        return boxes == [Box.full(shape)]
    claims = np.zeros(shape, dtype=np.int64)
    for b in boxes:
        claims[b.slices()] += 1
    return bool((claims == 1).all())


small_shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)


@st.composite
def split_tiling(draw: st.DrawFn, shape: tuple[int, ...], max_boxes: int = 24) -> list[Box]:
    """A tiling by recursive random cuts: neighbours need not share whole faces, unlike a grid."""
    done, todo = [], [Box.full(shape)]
    while todo:
        box = todo.pop()
        cuttable = [d for d, s in enumerate(box.sizes) if s > 1]
        if not cuttable or len(done) + len(todo) >= max_boxes or not draw(st.booleans()):
            done.append(box)
            continue
        d = draw(st.sampled_from(cuttable))
        at = draw(st.integers(1, box.sizes[d] - 1))
        for lo, size in ((0, at), (at, box.sizes[d] - at)):
            offsets, sizes = list(box.offsets), list(box.sizes)
            offsets[d] += lo
            sizes[d] = size
            todo.append(Box.of(offsets, sizes))
    return draw(st.permutations(done))


@st.composite
def perturbed(draw: st.DrawFn, boxes: list[Box], shape: tuple[int, ...]) -> list[Box]:
    """``boxes`` with one of them shifted, resized or moved anywhere (which keeps the volume)."""
    boxes = list(boxes)
    i = draw(st.integers(0, len(boxes) - 1))
    offsets, sizes = list(boxes[i].offsets), list(boxes[i].sizes)
    d = draw(st.integers(0, len(shape) - 1))
    delta = draw(st.sampled_from([-2, -1, 1, 2]))
    match draw(st.sampled_from(["shift", "resize", "move"])):
        case "shift":
            offsets[d] += delta
        case "resize":
            sizes[d] = max(0, sizes[d] + delta)
        case "move":
            offsets = [draw(st.integers(0, n - s)) for n, s in zip(shape, sizes, strict=True)]
    boxes[i] = Box.of(offsets, sizes)
    return boxes


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_random_tilings_are_accepted(method: str, data: st.DataObject) -> None:
    shape = data.draw(small_shapes)
    boxes = data.draw(split_tiling(shape))
    assert tiles(boxes, shape)
    with deciding_by(method):
        assert tiling_problem(boxes, shape) is None


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_perturbed_tilings_match_brute_force(method: str, data: st.DataObject) -> None:
    shape = data.draw(small_shapes)
    boxes = data.draw(perturbed(data.draw(split_tiling(shape)), shape))
    with deciding_by(method):
        problem = tiling_problem(boxes, shape)
    assert (problem is None) == tiles(boxes, shape), f"{[str(b) for b in boxes]}: {problem}"


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_box_sets_match_brute_force(method: str, data: st.DataObject) -> None:
    shape = data.draw(shapes)
    boxes = data.draw(st.lists(sub_box(shape), max_size=6))
    if data.draw(st.booleans(), label="pad to the full volume"):
        # A box of the missing volume along the first dimension, so that the volumes add up.
        missing = math.prod(shape) - sum(b.volume for b in boxes)
        rest = math.prod(shape[1:])
        assume(shape and missing > 0 and rest and missing % rest == 0)
        boxes.append(Box.of((0,) * len(shape), (missing // rest, *shape[1:])))
    with deciding_by(method):
        problem = tiling_problem(boxes, shape)
    assert (problem is None) == tiles(boxes, shape), f"{[str(b) for b in boxes]}: {problem}"


def pinwheel() -> list[Box]:
    """The smallest tiling no straight cut separates: four bars around a centre cell."""
    return [
        Box.of(o, s)
        for o, s in [
            ((0, 0), (2, 1)),
            ((2, 0), (1, 2)),
            ((1, 2), (2, 1)),
            ((0, 1), (1, 2)),
            ((1, 1), (1, 1)),
        ]
    ]


def corner_and_chain(ndim: int) -> list[Box]:
    """A tiling of (3,) * ndim: the corner [0:2]**ndim, then box j has coordinate 2 in dim j and
    below 2 in the dims before. No two pieces share a whole face; its grid has 2**ndim cells."""
    boxes = [Box.of((0,) * ndim, (2,) * ndim)]
    for j in range(ndim):
        offsets = (0,) * j + (2,) + (0,) * (ndim - j - 1)
        boxes.append(Box.of(offsets, (2,) * j + (1,) + (3,) * (ndim - j - 1)))
    return boxes


def product(a: list[Box], b: list[Box]) -> list[Box]:
    return [Box(x.offsets + y.offsets, x.sizes + y.sizes) for x in a for y in b]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("boxes", "shape"),
    [
        (pinwheel(), (3, 3)),
        (product(pinwheel(), [Box.of((0,), (1,)), Box.of((1,), (2,))]), (3, 3, 3)),
        (product(pinwheel(), pinwheel()), (3, 3, 3, 3)),
        (corner_and_chain(6), (3,) * 6),
    ],
    ids=["pinwheel", "pinwheel x split", "pinwheel x pinwheel", "corner and chain"],
)
def test_tilings_without_straight_cuts(
    boxes: list[Box], shape: tuple[int, ...], method: str
) -> None:
    with deciding_by(method):
        assert tiling_problem(boxes, shape) is None
        for i, box in enumerate(boxes):  # every piece moved by one, every way that stays inside
            for d in range(len(shape)):
                for delta in (-1, 1):
                    offsets = list(box.offsets)
                    offsets[d] += delta
                    moved = [*boxes[:i], Box.of(offsets, box.sizes), *boxes[i + 1 :]]
                    if moved[i].within(shape):
                        assert tiling_problem(moved, shape) == "chunks overlap"


def flat_shard(shape: tuple[int, ...], start: int, stop: int) -> list[Box]:
    """Elements [start, stop) of the row-major flattening of ``shape`` as few boxes (FSDP-style)."""
    if start >= stop:
        return []
    if not shape:
        return [Box.of((), ())]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner

    def rows(row: int, lo: int, hi: int) -> list[Box]:
        return [
            Box((row, *b.offsets), (1, *b.sizes))
            for b in flat_shard(shape[1:], lo - row * inner, hi - row * inner)
        ]

    if first == last:
        return rows(first, start, stop)
    head = rows(first, start, (first + 1) * inner) if start % inner else []
    tail = rows(last, last * inner, stop) if stop % inner else []
    full_from, full_to = first + bool(head), last + 1 - bool(tail)
    middle = [Box.of((full_from, *(0 for _ in shape[1:])), (full_to - full_from, *shape[1:]))]
    return head + (middle if full_to > full_from else []) + tail


@settings(max_examples=100, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=5).map(tuple), data=st.data())
def test_flat_shards_are_decided_exactly(shape: tuple[int, ...], data: st.DataObject) -> None:
    total = math.prod(shape)
    cuts = sorted(data.draw(st.sets(st.integers(1, total - 1), max_size=12)) if total > 1 else [])
    bounds = [0, *cuts, total]
    boxes = [b for lo, hi in itertools.pairwise(bounds) for b in flat_shard(shape, lo, hi)]
    assert tiles(boxes, shape)
    with without_randomized_check():
        assert tiling_problem(boxes, shape) is None


def staircase(rows: int) -> list[Box]:
    """The audit's manifest: row r of a (rows, rows + 1) tensor cut at column r + 1."""
    width = rows + 1
    return [
        Box((r, o), (1, s)) for r in range(rows) for o, s in ((0, r + 1), (r + 1, width - r - 1))
    ]


def columns_and_rows(k: int) -> list[Box]:
    """k full-height columns beside k single rows: every column stays in view of every row."""
    return [Box((0, j), (k, 1)) for j in range(k)] + [Box((i, k), (1, k)) for i in range(k)]


def grid_of(shape: tuple[int, ...], pieces: tuple[int, ...]) -> list[Box]:
    """A DTensor-style grid: dim d cut into pieces[d] near-equal parts."""
    axes = [
        [(n * i // p, n * (i + 1) // p) for i in range(p)]
        for n, p in zip(shape, pieces, strict=True)
    ]
    return [
        Box(tuple(lo for lo, _ in cell), tuple(hi - lo for lo, hi in cell))
        for cell in itertools.product(*axes)
    ]


@pytest.mark.parametrize(
    ("boxes", "shape", "exact"),
    [
        (staircase(4000), (4000, 4001), False),
        (columns_and_rows(3000), (3000, 6000), False),
        (grid_of((4096, 4096), (64, 64)), (4096, 4096), True),
        (grid_of((64, 64, 64, 64), (8, 8, 4, 4)), (64, 64, 64, 64), True),
        (grid_of((2,) * 12, (2,) * 12), (2,) * 12, True),
    ],
    ids=["staircase", "columns and rows", "grid", "4-d grid", "12-d binary grid"],
)
def test_large_layouts_are_checked_in_near_linear_time(
    boxes: list[Box], shape: tuple[int, ...], exact: bool
) -> None:
    """Guards against quadratic behaviour (the audit's staircase took minutes), not a benchmark;
    DTensor-style grids are still decided exactly."""
    start = time.perf_counter()
    with without_randomized_check() if exact else contextlib.nullcontext():
        assert tiling_problem(boxes, shape) is None
    # Slide the second piece onto the first: the volumes still add up.
    slid = [boxes[0], Box(boxes[0].offsets, boxes[1].sizes), *boxes[2:]]
    assert tiling_problem(slid, shape) == "chunks overlap"
    assert time.perf_counter() - start < 2


def test_crafted_high_dimensional_layouts_are_checked_in_linear_time() -> None:
    chain = corner_and_chain(64)
    staircase_x_chain = product(staircase(100), corner_and_chain(20))
    start = time.perf_counter()
    assert tiling_problem(chain, (3,) * 64) is None
    assert tiling_problem(staircase_x_chain, (100, 101, *(3,) * 20)) is None
    # Slide the last piece of the chain down by one, into the corner.
    chain[-1] = Box.of((0,) * 63 + (1,), chain[-1].sizes)
    assert tiling_problem(chain, (3,) * 64) == "chunks overlap"
    assert time.perf_counter() - start < 2


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
