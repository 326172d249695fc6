"""The save plan: every box written exactly once, by a rank holding it, with balanced bytes.

Unit tests of ``build_save_plan`` / ``layout_digest`` / ``PlanCache`` on hand-built layouts, and
one 4-rank run of ``unickpt.save`` checking the same properties on the committed manifest plus
the plan cache's hit/miss reporting.
"""

from __future__ import annotations

import importlib
import math
import os
import pathlib
import random
from collections import Counter, defaultdict

import pytest
import torch

import unickpt
from unickpt.errors import InvalidStateError
from unickpt.format.dtypes import itemsize
from unickpt.layout.box import Box, tiling_problem
from unickpt.plan.save_plan import (
    SPLIT_BYTES,
    PlanCache,
    SavePlan,
    ShardMeta,
    build_save_plan,
    layout_digest,
)

from dist_harness import run_distributed

MAX_IMBALANCE = 1.2  # max bytes written by one rank / mean bytes per rank


def full(key: str, shape: tuple[int, ...], dtype: str = "float32") -> ShardMeta:
    """A replicated (plain) tensor: the rank holds the whole box."""
    return ShardMeta(key, dtype, shape, Box.full(shape))


def shard(
    key: str,
    shape: tuple[int, ...],
    offsets: tuple[int, ...],
    sizes: tuple[int, ...],
    dtype: str = "float32",
) -> ShardMeta:
    return ShardMeta(key, dtype, shape, Box.of(offsets, sizes))


def row_shards(
    key: str, shape: tuple[int, ...], parts: int, dtype: str = "float32"
) -> list[ShardMeta]:
    """DTensor ``Shard(0)`` boxes over ``parts`` ranks (torch.chunk sizes, tail short or empty)."""
    piece = -(-shape[0] // parts)
    out = []
    for i in range(parts):
        lo, hi = min(i * piece, shape[0]), min((i + 1) * piece, shape[0])
        out.append(shard(key, shape, (lo, *(0,) * (len(shape) - 1)), (hi - lo, *shape[1:]), dtype))
    return out


def contains(outer: Box, inner: Box) -> bool:
    """Whether ``inner`` lies inside ``outer`` (also for empty boxes)."""
    return all(o <= i for o, i in zip(outer.offsets, inner.offsets, strict=True)) and all(
        i <= o for o, i in zip(outer.ends, inner.ends, strict=True)
    )


def writers(plan: SavePlan) -> dict[tuple[str, Box], list[int]]:
    """(key, box) -> the ranks writing it."""
    out: dict[tuple[str, Box], list[int]] = defaultdict(list)
    for rank, writes in enumerate(plan.writes):
        for key, box in writes:
            out[(key, box)].append(rank)
    return out


def check_plan(per_rank: list[list[ShardMeta]], plan: SavePlan) -> None:
    """Every tensor's written boxes tile it exactly, each written by a rank that holds it."""
    held: dict[int, dict[str, list[Box]]] = {
        rank: defaultdict(list) for rank in range(len(per_rank))
    }
    specs = {}
    for rank, metas in enumerate(per_rank):
        for meta in metas:
            held[rank][meta.key].append(meta.box)
            specs[meta.key] = (meta.dtype, meta.shape)
    assert plan.tensors == specs
    boxes: dict[str, list[Box]] = defaultdict(list)
    for (key, box), ranks in writers(plan).items():
        assert len(ranks) == 1, f"{key} {box} is written by ranks {ranks}"
        assert any(contains(h, box) for h in held[ranks[0]][key]), (
            f"rank {ranks[0]} writes {key} {box} but holds only {held[ranks[0]][key]}"
        )
        boxes[key].append(box)
    for key, (_dtype, shape) in specs.items():
        if math.prod(shape) == 0:
            assert len(boxes[key]) == 1, f"empty tensor {key}: chunks {boxes[key]}"
        else:
            problem = tiling_problem(boxes[key], shape)
            assert problem is None, f"{key} written as {boxes[key]}: {problem}"
    total = sum(math.prod(shape) * itemsize(dtype) for dtype, shape in specs.values())
    assert sum(plan.bytes_per_rank()) == total


def offsets(box: Box) -> tuple[int, ...]:
    return box.offsets


def assert_balanced(per_rank_bytes: list[int]) -> None:
    mean = sum(per_rank_bytes) / len(per_rank_bytes)
    assert max(per_rank_bytes) <= MAX_IMBALANCE * mean, f"bytes per rank {per_rank_bytes}"


# ------------------------------------------------------------------------ deduplication


def test_replicated_tensors_are_written_once() -> None:
    model = [full("w", (10, 10)), full("b", (10,)), full("scalar", ()), full("empty", (0, 5))]
    per_rank = [model] * 4
    plan = build_save_plan(per_rank)
    check_plan(per_rank, plan)
    assert sorted(key for writes in plan.writes for key, _ in writes) == sorted(
        ["w", "b", "scalar", "empty"]
    ), "a small replicated tensor is one chunk"


def test_tensors_held_by_some_ranks_only_are_written_by_a_holder() -> None:
    # Pipeline stages: each rank holds its own layers; both hold the embedding.
    per_rank = [
        [full("emb", (100, 8)), full("stage0.w", (8, 8)), full("stage0.empty", (0,))],
        [full("emb", (100, 8)), full("stage1.w", (8, 8)), full("stage1.empty", (0,))],
    ]
    check_plan(per_rank, build_save_plan(per_rank))


def test_empty_tensor_held_by_another_rank_only_is_written_by_it() -> None:
    per_rank = [[full("w", (4,))], [full("w", (4,)), full("stage1.empty", (0, 3))]]
    check_plan(per_rank, build_save_plan(per_rank))


def test_fsdp_shards_are_written_by_their_owner() -> None:
    layouts = [
        row_shards("even", (8, 3), 4),
        row_shards("uneven", (7, 3), 4),
        row_shards("tail_empty", (5,), 4),  # chunk sizes 2, 2, 1, 0
    ]
    per_rank = [[layout[rank] for layout in layouts] for rank in range(4)]
    plan = build_save_plan(per_rank)
    check_plan(per_rank, plan)
    for rank, writes in enumerate(plan.writes):
        assert writes == sorted((m.key, m.box) for m in per_rank[rank] if m.box.volume), (
            f"rank {rank} must write exactly its own non-empty shards"
        )


def test_dp_times_fsdp_writes_each_shard_once_and_balances_replicas() -> None:
    # Ranks 0 and 2 hold shard 0 of every tensor, ranks 1 and 3 shard 1 (2 replicas x 2 shards).
    layouts = [row_shards(f"layer{i}.w", (16, 4), 2) for i in range(8)]
    per_rank = [[layout[rank % 2] for layout in layouts] for rank in range(4)]
    plan = build_save_plan(per_rank)
    check_plan(per_rank, plan)
    assert plan.bytes_per_rank() == [4 * 8 * 4 * 4] * 4, "each replica writes half its shards"


def test_mixed_dtypes_and_shapes() -> None:
    replicated = [
        full("f32", (5, 7)),
        full("bf16", (3, 1, 4), "bfloat16"),
        full("i8", (9,), "int8"),
        full("flag", (), "bool"),
        full("step", (), "int64"),
        full("none", (0,), "float16"),
    ]
    sharded = [row_shards("emb", (11, 6), 2, "bfloat16"), row_shards("mask", (3, 2), 2, "bool")]
    per_rank = [replicated + [layout[rank] for layout in sharded] for rank in range(2)]
    plan = build_save_plan(per_rank)
    check_plan(per_rank, plan)
    assert plan.tensors["bf16"] == ("bfloat16", (3, 1, 4))
    assert plan.tensors["flag"] == ("bool", ())


def test_many_replicated_tensors_are_balanced() -> None:
    rng = random.Random(0)
    dtypes = ["float32", "bfloat16", "int8"]
    model = [
        full(f"p{i}", (rng.randint(1, 300), rng.choice([1, 7, 64, 256])), rng.choice(dtypes))
        for i in range(200)
    ]
    per_rank = [model] * 4
    plan = build_save_plan(per_rank)
    check_plan(per_rank, plan)
    assert_balanced(plan.bytes_per_rank())


def test_module_buffers_are_written_whole_by_their_lowest_holder() -> None:
    """Buffers' replicas may differ (DDP's BatchNorm statistics): the lowest rank holding one
    writes all of it, however large; the rest is balanced around it."""
    params = [full(f"p{i}", (64, 64)) for i in range(8)]
    buffers = [
        ShardMeta(f"bn{i}", "float32", (n,), Box.full((n,)), buffer=True)
        for i, n in enumerate((4, 4000, SPLIT_BYTES))  # the last one 4x the split size
    ]
    late = ShardMeta("late", "float32", (16,), Box.full((16,)), buffer=True)
    per_rank = [params + buffers, params + buffers + [late], params + buffers + [late]]
    plan = build_save_plan(per_rank)
    check_plan(per_rank, plan)
    pieces = writers(plan)
    for meta in buffers:
        assert pieces[(meta.key, meta.box)] == [0], meta.key
    assert pieces[("late", late.box)] == [1]
    params_per_rank = [sum(key.startswith("p") for key, _ in w) for w in plan.writes]
    assert params_per_rank == [0, 4, 4], "rank 0's 128 MiB of buffers count in the balance"


def test_large_replicated_tensor_is_split_across_its_holders() -> None:
    big = full("big", (64, 1024, 1024))  # 256 MiB, 8 x SPLIT_BYTES
    wide = full("wide", (1, 8, 2**22))  # 128 MiB: the first dimension longer than 1 is cut
    small = full("small", (SPLIT_BYTES // 4 - 1,))  # just under the threshold: one writer
    per_rank = [[big, wide, small]] * 4
    plan = build_save_plan(per_rank)
    check_plan(per_rank, plan)
    pieces = writers(plan)
    assert sorted((box for key, box in pieces if key == "big"), key=offsets) == [
        Box.of((16 * i, 0, 0), (16, 1024, 1024)) for i in range(4)
    ]
    assert sorted((box for key, box in pieces if key == "wide"), key=offsets) == [
        Box.of((0, 2 * i, 0), (1, 2, 2**22)) for i in range(4)
    ]
    assert [key for key, _ in pieces].count("small") == 1
    big_writers = sorted(ranks[0] for (key, _), ranks in pieces.items() if key == "big")
    assert big_writers == [0, 1, 2, 3], "each holder writes one piece"


def test_split_is_limited_by_holders_and_size() -> None:
    mid = full("mid", (3 * SPLIT_BYTES // 4 + 1,))  # a bit over 3 x SPLIT_BYTES: 3 pieces
    pair = full("pair", (4, SPLIT_BYTES), "int8")  # 4 x SPLIT_BYTES, but only 2 holders
    per_rank = [[mid, pair], [mid, pair], [mid], [mid]]
    plan = build_save_plan(per_rank)
    check_plan(per_rank, plan)
    counts = Counter(key for key, _ in writers(plan))
    assert counts == {"mid": 3, "pair": 2}, "pieces = min(holders, nbytes // SPLIT_BYTES)"


def test_split_never_makes_more_pieces_than_rows() -> None:
    """A large tensor with fewer rows than holders is cut into one piece per row: more pieces
    would be empty boxes, each an empty chunk in the manifest and a write for nothing."""
    short = full("short", (2, 4 * SPLIT_BYTES), "int8")  # 8 x SPLIT_BYTES, but 2 rows
    per_rank = [[short]] * 8
    plan = build_save_plan(per_rank)
    check_plan(per_rank, plan)
    pieces = sorted((box for key, box in writers(plan) if key == "short"), key=offsets)
    assert pieces == [Box.of((i, 0), (1, 4 * SPLIT_BYTES)) for i in range(2)], pieces
    assert all(box.volume > 0 for writes in plan.writes for _, box in writes)


# ------------------------------------------------------------------------- invalid layouts


@pytest.mark.parametrize(
    ("other", "shown"),
    [
        (full("layer.w", (4, 5)), "(4, 5)"),
        (full("layer.w", (4, 4), "bfloat16"), "'bfloat16'"),
    ],
)
def test_ranks_disagreeing_on_a_tensor_are_refused(other: ShardMeta, shown: str) -> None:
    per_rank = [[full("ok", (2,)), full("layer.w", (4, 4))], [full("ok", (2,)), other]]
    with pytest.raises(InvalidStateError, match=r"'layer\.w'.*disagree.*rank 1") as info:
        build_save_plan(per_rank)
    assert shown in str(info.value), "the message shows the conflicting spec"


@pytest.mark.parametrize(
    ("boxes", "problem"),
    [
        ([((0, 0), (4, 8)), ((5, 0), (5, 8))], "gap"),  # row 4 missing
        ([((0, 0), (6, 8)), ((5, 0), (5, 8))], "overlap"),  # row 5 twice
        ([((0, 0), (10, 4)), ((2, 2), (8, 6))], "overlap"),  # partial, columns and rows
        ([((0, 0), (10, 5)), ((0, 4), (10, 4))], "overlap"),  # equal volume, one column twice
    ],
)
def test_shards_that_do_not_tile_are_refused(
    boxes: list[tuple[tuple[int, int], tuple[int, int]]], problem: str
) -> None:
    per_rank = [[shard("enc.w", (10, 8), *box)] for box in boxes]
    with pytest.raises(InvalidStateError, match=rf"'enc\.w'.*do not tile.*{problem}"):
        build_save_plan(per_rank)


# ------------------------------------------------------------------- digest and plan cache


def test_layout_digest_is_order_independent_and_layout_sensitive() -> None:
    metas = [full("a", (4, 4)), *row_shards("b", (8, 2), 2)[:1], full("c", (), "int64")]
    digest = layout_digest(metas)
    assert layout_digest(metas[::-1]) == digest
    changed = [
        [full("a", (4, 4)), row_shards("b", (8, 2), 2)[1], metas[2]],  # another box
        [full("a", (4, 4)), shard("b", (9, 2), (0, 0), (4, 2)), metas[2]],  # another shape
        [full("a", (4, 4), "bfloat16"), *metas[1:]],  # another dtype
        [full("A", (4, 4)), *metas[1:]],  # another key
        metas[:2],  # a tensor fewer
    ]
    digests = {layout_digest(m) for m in changed}
    assert digest not in digests and len(digests) == len(changed)


def test_plan_cache_is_lru() -> None:
    cache = PlanCache(capacity=2)
    plans = {name: build_save_plan([[full(name, (2,))]]) for name in "abc"}
    cache.put("a", plans["a"])
    cache.put("b", plans["b"])
    before = cache.snapshot()
    cache.put("a", plans["a"])  # a save used "a": it becomes the most recent
    cache.put("c", plans["c"])
    assert cache.snapshot() == {"a": plans["a"], "c": plans["c"]}, "the LRU plan is evicted"
    assert before == {"a": plans["a"], "b": plans["b"]}, "a snapshot does not change"
    cache.put("a", plans["b"])
    assert cache.snapshot()["a"] is plans["b"], "put replaces a plan under the same digest"


# -------------------------------------------------------------------- 4 ranks, real saves


def plain_model(extra: bool = False) -> dict[str, torch.Tensor]:
    """The same replicated model on every rank: many tensors of random sizes and dtypes."""
    rng = random.Random(1)
    gen = torch.Generator().manual_seed(1)
    state = {}
    for i in range(120):
        shape = (rng.randint(1, 200), rng.choice([1, 16, 64, 96]))
        values = torch.randn(shape, generator=gen)
        state[f"layers.{i}.w"] = values.to(rng.choice([torch.float32, torch.bfloat16]))
    state["step"] = torch.tensor(7)
    if extra:
        state["head.bias"] = torch.arange(33, dtype=torch.float32)
    return state


def save_four_times(rank: int, world_size: int, root: str) -> list[tuple[bool, int]]:
    """(plan_cache_hit, bytes_written) of each save: a, b (same layout), c (a tensor more), d."""
    state = plain_model()
    results = [
        unickpt.save(os.path.join(root, "a"), state),
        unickpt.save(os.path.join(root, "b"), state),
        unickpt.save(os.path.join(root, "c"), plain_model(extra=True)),
        unickpt.save(os.path.join(root, "d"), state),
    ]
    return [(r.plan_cache_hit, r.bytes_written) for r in results]


def check_manifest(path: str, expected: dict[str, torch.Tensor], world_size: int) -> None:
    manifest = unickpt.inspect(path)
    assert sorted(manifest.tensors) == sorted(expected)
    per_file: Counter[str] = Counter()
    for key, meta in manifest.tensors.items():
        boxes = [chunk.box for chunk in meta.chunks]
        assert boxes == [Box.full(meta.shape)], f"{path} {key}: chunks {boxes}, want one"
        per_file.update({chunk.file: chunk.nbytes for chunk in meta.chunks})
    assert len(per_file) == world_size, f"{path}: every rank writes a file, got {per_file}"
    assert_balanced(list(per_file.values()))
    loaded = {key: torch.zeros_like(value) for key, value in expected.items()}
    unickpt.load(path, loaded)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), f"{path} {key} differs after a round trip"


def test_four_rank_replicated_save_dedups_balances_and_caches_the_plan(ckpt_root: str) -> None:
    results = run_distributed(4, save_four_times, ckpt_root)
    hits = [[hit for hit, _ in per_rank] for per_rank in results]
    assert hits == [[False, True, False, True]] * 4, (
        "per rank: first save misses, same layout hits, new layout misses, old layout hits"
    )
    for name in "abcd":  # b and d were written with cached plans
        expected = plain_model(extra=name == "c")
        check_manifest(os.path.join(ckpt_root, name), expected, 4)
    data = os.path.join(ckpt_root, "a", "data")
    sizes = sorted(os.path.getsize(os.path.join(data, name)) for name in os.listdir(data))
    assert sizes == sorted(per_rank[0][1] for per_rank in results), (
        "SaveResult.bytes_written is the size of the rank's data file"
    )


def _save_with_one_rank_forgetting_the_plan(rank: int, world_size: int, root: str) -> list[bool]:
    state = plain_model()
    first = unickpt.save(os.path.join(root, "a"), state)
    if rank == 1:  # as when a background reservation has not filled this rank's cache yet
        importlib.import_module("unickpt.engine.save")._PLANS = PlanCache()
    second = unickpt.save(os.path.join(root, "b"), state)
    return [first.plan_cache_hit, second.plan_cache_hit]


def test_ranks_use_a_cached_plan_only_if_every_rank_has_it(tmp_path: pathlib.Path) -> None:
    # One rank skipping the metadata exchange that its peer ran paired the peer's exchange
    # with the commit's: garbage plans, or a rank waiting forever.
    results = run_distributed(2, _save_with_one_rank_forgetting_the_plan, str(tmp_path))
    assert results == [[False, False], [False, False]]
    target = {k: torch.zeros_like(v) for k, v in plain_model().items()}
    unickpt.load(str(tmp_path / "b"), target)
    assert all(torch.equal(target[k], v) for k, v in plain_model().items())
