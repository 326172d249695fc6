"""CheckpointManager: schedule, retention, latest pointer, restore (incl. RNG), fallbacks."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pathlib
import random
import shutil
import time
from typing import Any

import numpy as np
import pytest
import torch
from gated_storage import GatedLocal
from pool_probe import count_pool_allocations
from torch.distributed.fsdp import fully_shard

import unickpt
from unickpt import CheckpointManager
from unickpt.engine import background

from dist_harness import run_distributed


def _state(seed: int = 0) -> dict[str, object]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(16, 8)
    return {
        "model": model,
        "optim": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        "loader": {"position": 0},
    }


def _train_step(state: dict[str, object], step: int) -> None:
    model, optim = state["model"], state["optim"]
    assert isinstance(model, torch.nn.Module) and isinstance(optim, torch.optim.Optimizer)
    model(torch.randn(4, 16)).sum().backward()
    optim.step()
    optim.zero_grad()
    state["loader"] = {"position": step + 1}


def _steps(manager: CheckpointManager) -> list[int | None]:
    return [info.step for info in manager.list()]


def test_schedule_and_retention(ckpt_root: str) -> None:
    manager = CheckpointManager(
        ckpt_root, every_n_steps=2, keep_last=2, keep_every=4, keep_best=("loss", 1), mode="lazy"
    )
    state = _state()
    for step in range(1, 13):
        _train_step(state, step)
        loss = 10.0 if step != 6 else 0.5  # step 6 is the best by far
        manager.maybe_save(step, state, metrics={"loss": loss})
    manager.close()
    # last two (10, 12), every 4th (4, 8, 12), best loss (6)
    assert _steps(manager) == [4, 6, 8, 10, 12]
    assert manager.latest() == os.path.join(ckpt_root, CheckpointManager.name_for(12))
    with open(os.path.join(ckpt_root, "latest")) as f:
        assert f.read() == CheckpointManager.name_for(12)
    for info in manager.list():
        unickpt.verify(info.path)
    assert sorted(os.listdir(ckpt_root)) == sorted(
        ["latest", *(CheckpointManager.name_for(s) for s in (4, 6, 8, 10, 12))]
    )


@pytest.mark.parametrize(
    ("keep_last", "keep_every", "kept"),
    [(None, None, [0, 1, 2, 3, 4, 5, 6]), (1, 3, [0, 3, 6])],  # step 0 is divisible by 3
)
def test_retention_edges(
    ckpt_root: str, keep_last: int | None, keep_every: int | None, kept: list[int]
) -> None:
    """keep_last=None keeps every checkpoint; keep_every keeps step 0 too."""
    manager = CheckpointManager(
        ckpt_root, every_n_steps=1, keep_last=keep_last, keep_every=keep_every, mode="sync"
    )
    for step in range(7):
        manager.maybe_save(step, _state(seed=step))
    manager.close()
    assert _steps(manager) == kept


def test_restore_resumes_state_and_random_streams(ckpt_root: str) -> None:
    manager = CheckpointManager(ckpt_root, every_n_steps=3, mode="async")
    state = _state()
    for step in range(1, 7):
        _train_step(state, step)
        manager.maybe_save(step, state)
    manager.wait()
    model = state["model"]
    assert isinstance(model, torch.nn.Module)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    draws = (torch.rand(3), np.random.rand(3), random.random())

    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    fresh = _state(seed=7)
    assert CheckpointManager(ckpt_root).restore(fresh) == 6
    fresh_model = fresh["model"]
    assert isinstance(fresh_model, torch.nn.Module)
    for key, value in fresh_model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert fresh["loader"] == {"position": 7}  # as of the save after step 6
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1])
    assert draws[2] == again[2]


def _save_two_steps_and_truncate_the_newest(root: str) -> dict[str, object]:
    """Steps 1 and 2 saved by a sync manager, step 2's data file cut short; the trained state."""
    manager = CheckpointManager(root, every_n_steps=1, keep_last=5, mode="sync")
    state = _state()
    for step in (1, 2):
        _train_step(state, step)
        manager.maybe_save(step, state)
    newest = manager.list()[-1].path
    (data_file,) = unickpt.inspect(newest).files
    with open(os.path.join(newest, data_file), "r+b") as f:
        f.truncate(100)
    return state


def test_restore_skips_a_corrupt_newest_checkpoint(
    ckpt_root: str, caplog: pytest.LogCaptureFixture
) -> None:
    _save_two_steps_and_truncate_the_newest(ckpt_root)
    with caplog.at_level(logging.WARNING, logger="unickpt"):
        assert CheckpointManager(ckpt_root).restore(_state(seed=3)) == 1
    assert "trying an older one" in caplog.text


def _fail_reads_under(monkeypatch: pytest.MonkeyPatch, directory: str) -> None:
    """Reads of the data files of checkpoint ``directory`` fail as a dying disk's do (EIO)."""
    from unickpt.storage import local

    real = local._LocalReader.read_into_many

    def read_into_many(reader: local._LocalReader, offset: int, outs: list[memoryview]) -> None:
        if reader._where.startswith(os.path.join(directory, "data")):
            raise local._storage_error("read", reader._where, OSError(5, "Input/output error"))
        real(reader, offset, outs)

    monkeypatch.setattr(local._LocalReader, "read_into_many", read_into_many)


def test_a_storage_error_on_the_newest_checkpoint_fails_restore_instead_of_going_back(
    ckpt_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Going back to step 1 made the run save step 2 again, deleting the committed step 2 it
    # could not read for a moment (audit O: one failed ranged GET on S3).
    manager = CheckpointManager(ckpt_root, every_n_steps=1, keep_last=5, mode="sync")
    states = []
    for step in (1, 2):
        state = _state(seed=step)
        manager.maybe_save(step, state)
        states.append(state)
    newest = os.path.join(ckpt_root, CheckpointManager.name_for(2))
    with monkeypatch.context() as patch:
        _fail_reads_under(patch, newest)
        with pytest.raises(
            unickpt.StorageError,
            match=r"cannot restore step_0000000002 from .*Input/output error.*no older checkpoint",
        ):
            CheckpointManager(ckpt_root).restore(_state(seed=9))
    unickpt.verify(newest)  # untouched
    restored = _state(seed=9)
    assert CheckpointManager(ckpt_root).restore(restored) == 2
    assert torch.equal(restored["model"].weight, states[1]["model"].weight)  # type: ignore[union-attr]


def test_a_storage_error_on_one_tier_restores_the_same_step_from_a_slower_one(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiers = [str(tmp_path / "fast"), str(tmp_path / "slow")]
    manager = CheckpointManager(tiers, every_n_steps=1, keep_last=5, mode="sync")
    for step in (1, 2):
        manager.maybe_save(step, _state(seed=step))
    manager.close()
    _fail_reads_under(monkeypatch, os.path.join(tiers[0], CheckpointManager.name_for(2)))
    assert CheckpointManager(tiers).restore(_state(seed=9)) == 2


def _restore_with_eio_on_rank_1(rank: int, world_size: int, tiers: list[str]) -> object:
    manager = CheckpointManager(tiers, every_n_steps=1, keep_last=5, mode="sync")
    for step in (1, 2):
        manager.maybe_save(step, _state(seed=step))
    manager.close()
    with pytest.MonkeyPatch.context() as patch:
        if rank == 1:
            _fail_reads_under(patch, os.path.join(tiers[0], CheckpointManager.name_for(2)))
        try:
            return CheckpointManager(tiers).restore(_state(seed=9))
        except unickpt.CheckpointError as exc:
            return f"{type(exc).__name__}: {exc}"


def test_one_ranks_storage_error_is_every_ranks(tmp_path: pathlib.Path) -> None:
    # Rank 0 heard of rank 1's failure as a plain CheckpointError, which restore took for the
    # caller's fault: both raised instead of reading step 2 from the slower tier (audit P).
    two = [str(tmp_path / "fast"), str(tmp_path / "slow")]
    assert run_distributed(2, _restore_with_eio_on_rank_1, two) == [2, 2]
    results = run_distributed(2, _restore_with_eio_on_rank_1, [str(tmp_path / "alone")])
    for result in results:  # the same class and advice on both ranks: each may retry alike
        assert isinstance(result, str) and result.startswith(
            "StorageError: cannot restore step_0000000002 from "
        ), result
        assert "try again once the storage can be read" in result


def _restore_past_one_ranks_bad_rng_row(rank: int, world_size: int, root: str) -> int | None:
    manager = CheckpointManager(root, every_n_steps=1, keep_last=5, mode="sync")
    state = _state()
    for step in (1, 2):
        _train_step(state, step)
        manager.maybe_save(step, state)
    manager.close()
    torch.distributed.barrier()
    if rank == 0:  # bit rot in rank 1's RNG row, which load() takes as it is without checksums
        newest = manager.list()[-1].path
        (chunk,) = [c for c in unickpt.inspect(newest).tensors["__rng__"].chunks if c.offsets[0]]
        with open(os.path.join(newest, chunk.file), "r+b") as f:
            f.seek(chunk.offset)
            f.write((7).to_bytes(8, "little"))  # the row's layout version
    torch.distributed.barrier()
    return CheckpointManager(root).restore(_state(seed=3), verify=False)


def test_every_rank_falls_back_when_one_cannot_restore_its_rng_states(ckpt_root: str) -> None:
    # Rank 1's load succeeded and only its RNG restore failed: it used to wait in a collective
    # that rank 0, already returned with step 2, never joined.
    assert run_distributed(2, _restore_past_one_ranks_bad_rng_row, ckpt_root) == [1, 1]


def _restore_with_a_failing_listing(rank: int, world_size: int, root: str) -> str:
    CheckpointManager(root, every_n_steps=1, mode="sync").maybe_save(1, _state())
    manager = CheckpointManager(root)
    if rank == 0:

        def fail() -> None:
            raise RuntimeError("listing broke")

        manager._listings = fail  # type: ignore[method-assign]
    try:
        manager.restore(_state())
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "restored"


def test_a_listing_failure_on_rank_0_fails_restore_on_every_rank(ckpt_root: str) -> None:
    results = run_distributed(2, _restore_with_a_failing_listing, ckpt_root)
    assert results == [
        "RuntimeError: listing broke",
        "CheckpointError: listing the checkpoints failed on rank 0: RuntimeError: listing broke",
    ]


def _reshape_rng_entry(path: str, shape: list[int]) -> None:
    """Give the RNG entry of ``path`` another shape, its one chunk still tiling it."""
    with open(os.path.join(path, "manifest.json")) as f:
        doc = json.load(f)
    entry = doc["tensors"]["__rng__"]
    (chunk,) = entry["chunks"]
    entry["shape"] = chunk["sizes"] = shape
    chunk["offsets"] = [0] * len(shape)
    chunk["nbytes"] = 8 * math.prod(shape)
    doc["files"] = {name: 1 << 62 for name in doc["files"]}  # chunks must lie inside them
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(doc, f)


@pytest.mark.parametrize("shape", [[0, 5], [5], [1, 2**40]], ids=["no-rank", "1-d", "huge"])
def test_restore_falls_back_past_a_malformed_rng_entry(ckpt_root: str, shape: list[int]) -> None:
    manager = CheckpointManager(ckpt_root, every_n_steps=1, keep_last=5, mode="sync")
    for step in (1, 2):
        manager.maybe_save(step, {"w": torch.full((4,), float(step))})
    _reshape_rng_entry(manager.list()[-1].path, shape)
    target = {"w": torch.zeros(4)}
    assert CheckpointManager(ckpt_root).restore(target) == 1
    assert torch.equal(target["w"], torch.full((4,), 1.0))


@pytest.mark.parametrize("mode", ["sync", "lazy"])
def test_a_run_resumed_past_a_corrupt_checkpoint_saves_that_step_again(
    ckpt_root: str, mode: str
) -> None:
    """Restore falls back from a corrupt step 2 to step 1; the resumed run's save of step 2
    replaces the corrupt one instead of colliding with it (which lost it, or every restart)."""
    state = _save_two_steps_and_truncate_the_newest(ckpt_root)

    resumed = CheckpointManager(ckpt_root, every_n_steps=1, keep_last=5, mode=mode)
    state = _state(seed=3)
    assert resumed.restore(state) == 1
    _train_step(state, 2)
    resumed.maybe_save(2, state)
    resumed.wait()
    assert _steps(resumed) == [1, 2]
    again = _state(seed=4)
    assert CheckpointManager(ckpt_root).restore(again) == 2
    model = state["model"]
    assert isinstance(model, torch.nn.Module) and isinstance(again["model"], torch.nn.Module)
    for key, value in model.state_dict().items():
        assert torch.equal(again["model"].state_dict()[key], value), key
    resumed.close()


def test_metrics_and_step_of_numpy_and_tensor_types(ckpt_root: str) -> None:
    """A loss tensor, numpy scalars and a numpy step are saved as numbers (they failed every
    background save at its commit, reported only in a log line)."""
    manager = CheckpointManager(ckpt_root, every_n_steps=1, mode="lazy")
    state = _state()
    manager.maybe_save(
        np.int64(3),
        state,
        metrics={"loss": torch.tensor(0.25), "acc": np.float32(0.5), "n": np.int64(7)},
    )
    manager.close()
    (info,) = manager.list()
    assert info.step == 3 and info.metrics == {"loss": 0.25, "acc": 0.5, "n": 7}
    assert unickpt.inspect(info.path).user_metadata == {"metrics": info.metrics}


def test_a_failed_background_save_is_raised_by_wait(ckpt_root: str) -> None:
    manager = CheckpointManager(ckpt_root, every_n_steps=1, mode="lazy")
    manager.maybe_save(1, _state(), metrics={"loss": object()})
    with pytest.raises(unickpt.CheckpointError, match=r"step_0000000001.*InvalidStateError.*"):
        manager.wait()
    manager.wait()  # reported once
    assert manager.list() == []
    manager.maybe_save(2, _state(), metrics={"loss": 1.0})
    manager.close()
    assert _steps(manager) == [2]


def test_metadata_without_a_json_form_is_refused_before_any_io(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "c")
    with pytest.raises(unickpt.InvalidStateError, match=r"user_metadata\['a'\]\[1\] is a set"):
        unickpt.save(path, {"w": torch.ones(2)}, user_metadata={"a": [1, {2}]})
    with pytest.raises(unickpt.InvalidStateError, match=r"step 1\.5 is not an integer"):
        unickpt.save(path, {"w": torch.ones(2)}, step=1.5)  # type: ignore[arg-type]
    assert not os.path.exists(path) or os.listdir(path) == []


def test_nan_metrics_never_rank_best(ckpt_root: str) -> None:
    for best_mode, losses, best in (
        ("min", [math.nan, 0.5, 6.0, 7.0], 2),
        ("max", [math.nan, 9.0, 1.0, 2.0], 2),
    ):
        root = os.path.join(ckpt_root, best_mode)
        manager = CheckpointManager(
            root,
            every_n_steps=1,
            keep_last=1,
            keep_best=("loss", 1),
            best_mode=best_mode,
            mode="sync",
        )
        for step, loss in enumerate(losses, start=1):
            manager.maybe_save(step, {"w": torch.full((2,), float(step))}, metrics={"loss": loss})
        manager.close()
        assert _steps(manager) == [best, 4], best_mode


def test_the_manager_keeps_to_its_own_checkpoints(ckpt_root: str, tmp_path: pathlib.Path) -> None:
    """Retention, listing and restore see only the manager's ``step_<10 digits>`` directories;
    restore's sweep of the memory tier removes only leftovers of the manager's own saves."""
    for name in ("best_model", "step_000050"):
        unickpt.save(os.path.join(ckpt_root, name), {"w": torch.zeros(2)}, step=50)
    shm = tmp_path / "shm"
    (shm / "other_app").mkdir(parents=True)
    (shm / "other_app" / "cache.bin").write_bytes(b"x")
    (shm / "step_0000000099" / "data").mkdir(parents=True)  # a crashed save of this run
    (shm / "step_0000000099" / "data" / "r00000-x.safetensors").write_bytes(b"junk")
    tiers = [f"memory://{shm}", ckpt_root]
    manager = CheckpointManager(tiers, every_n_steps=1, keep_last=1, mode="sync")
    assert manager.restore({"w": torch.zeros(2)}) is None
    assert sorted(os.listdir(shm)) == ["other_app"], "only the crashed save was swept"
    for step in (100, 200, 300):
        manager.maybe_save(step, {"w": torch.full((2,), float(step))})
    manager.close()
    assert _steps(manager) == [300]
    for name in ("best_model", "step_000050"):
        assert unickpt.inspect(os.path.join(ckpt_root, name)).step == 50, name
    assert (shm / "other_app" / "cache.bin").read_bytes() == b"x"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"every_n_steps": 0},
        {"every_n_seconds": 0},
        {"every_n_seconds": True},
        {"keep_every": 0},
        {"keep_best": ("loss")},
        {"keep_best": ("loss", "2")},
        {"keep_best": ("loss", 0)},
        {"best_mode": "Max"},
        {"mode": "later"},
        {"if_busy": "drop"},
        {"keep_last": 0},
    ],
    ids=str,
)
def test_bad_arguments_are_refused(ckpt_root: str, kwargs: dict[str, object]) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        CheckpointManager(ckpt_root, **kwargs)  # type: ignore[arg-type]


def test_one_unsafe_checkpoint_directory_does_not_hide_the_others(
    ckpt_root: str, tmp_path: pathlib.Path
) -> None:
    manager = CheckpointManager(ckpt_root, every_n_steps=1, mode="sync")
    manager.maybe_save(1, {"w": torch.ones(2)})
    planted = os.path.join(ckpt_root, CheckpointManager.name_for(9))
    os.makedirs(planted)
    (tmp_path / "manifest.json").write_text("{}")
    os.symlink(tmp_path / "manifest.json", os.path.join(planted, "manifest.json"))
    assert [info.step for info in CheckpointManager(ckpt_root).list()] == [1]
    assert CheckpointManager(ckpt_root).restore({"w": torch.zeros(2)}) == 1


def test_empty_root_restores_nothing(ckpt_root: str) -> None:
    manager = CheckpointManager(ckpt_root)
    assert manager.restore(_state()) is None
    assert manager.latest() is None and manager.list() == []


def test_time_based_schedule(ckpt_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    now = [100.0]  # the manager's clock alone: a save's own duration does not count
    clock = types.SimpleNamespace(monotonic=lambda: now[0])
    monkeypatch.setattr("unickpt.manager.manager.time", clock)
    manager = CheckpointManager(ckpt_root, every_n_seconds=0.2, keep_last=10, mode="sync")
    state = _state()
    saved = []
    for step in range(6):
        now[0] += 0.12
        saved.append(manager.maybe_save(step, state) is not None)
    assert saved == [False, True, False, True, False, True]


def _fsdp_run(rank: int, world_size: int, root: str) -> dict[str, torch.Tensor]:
    state = _state()
    model = state["model"]
    assert isinstance(model, torch.nn.Module)
    fully_shard(model)
    state["optim"] = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    manager = CheckpointManager(root, every_n_steps=2, keep_last=1, mode="lazy")
    for step in range(1, 5):
        torch.manual_seed(step)
        _train_step(state, step)
        manager.maybe_save(step, state)
    manager.close()
    return {k: v.full_tensor() for k, v in model.state_dict().items()}


def test_manager_across_world_sizes(ckpt_root: str, caplog: pytest.LogCaptureFixture) -> None:
    reference = run_distributed(2, _fsdp_run, ckpt_root)[0]
    manager = CheckpointManager(ckpt_root)
    assert _steps(manager) == [4]
    assert unickpt.inspect(manager.list()[0].path).tensors["__rng__"].shape[0] == 2
    state = _state(seed=9)
    with caplog.at_level(logging.WARNING, logger="unickpt"):
        assert manager.restore(state) == 4
    assert "RNG states not restored" in caplog.text
    model = state["model"]
    assert isinstance(model, torch.nn.Module)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_max_write_rate_caps_saves_and_drains_together(ckpt_root: str) -> None:
    fast, slow = os.path.join(ckpt_root, "fast"), os.path.join(ckpt_root, "slow")
    rate = 64 << 20
    manager = CheckpointManager([fast, slow], mode="sync", save_rng=False, max_write_rate=rate)
    state = {"w": torch.randn(6 << 20)}  # 24 MiB
    start = time.monotonic()
    manager.maybe_save(1, state, force=True)
    manager.wait()
    # the save writes 24 MiB, then the drain copies them in 8 MiB pieces through the same
    # limit: the drain's last piece waits for the 40 MiB before it
    assert time.monotonic() - start >= 40 * 2**20 / rate
    manager.close()
    target = {"w": torch.zeros(6 << 20)}
    unickpt.load(os.path.join(slow, CheckpointManager.name_for(1)), target)
    assert torch.equal(target["w"], state["w"])


@pytest.mark.parametrize("mode", ["lazy", "sync"])
def test_manager_fills_the_staging_pool_before_its_first_save(
    ckpt_root: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    allocations = count_pool_allocations(monkeypatch.setattr)
    manager = CheckpointManager(ckpt_root, every_n_steps=3, mode=mode)  # type: ignore[arg-type]
    state = _state()
    results = []
    for step in range(1, 8):
        _train_step(state, step)
        outcome = manager.maybe_save(step, state)
        if step == 1:  # not a save step: a background save would reserve its staging memory
            assert outcome is None
            manager.wait()
            reserved = list(allocations)
            assert (background.POOL.nbytes > 0) == (mode == "lazy") == bool(reserved)
        elif outcome is not None:
            results.append(outcome if isinstance(outcome, unickpt.SaveResult) else outcome.wait())
    manager.close()
    assert allocations == reserved, "a save allocated staging memory again"
    assert [r.step for r in results] == [3, 6]
    assert results[0].plan_cache_hit or mode == "sync"  # planned by the reservation
    assert background.POOL.nbytes == 0


def test_restore_fills_top_level_values_and_load_reads_manager_checkpoints(
    ckpt_root: str,
) -> None:
    manager = CheckpointManager(ckpt_root, every_n_steps=1, mode="sync")
    state = {**_state(), "step": 7, "losses": [1.0, 2.0]}
    manager.maybe_save(7, state)
    fresh = {**_state(seed=1), "step": 0, "losses": []}
    assert CheckpointManager(ckpt_root).restore(fresh) == 7
    assert (
        fresh["step"] == 7 and fresh["losses"] == [1.0, 2.0] and fresh["loader"] == {"position": 0}
    )
    plain = {**_state(seed=2), "step": 0, "losses": []}
    result = unickpt.load(manager.latest(), plain)  # strict: the RNG rows are the manager's
    assert result.unexpected_keys == ["__rng__"] and plain["step"] == 7
    model = plain["model"]
    assert isinstance(model, torch.nn.Module)
    expected = state["model"]
    assert isinstance(expected, torch.nn.Module)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), expected.parameters(), strict=True)
    )


def test_a_forced_save_of_the_step_just_saved_is_not_made_twice(ckpt_root: str) -> None:
    for mode in ("sync", "lazy"):
        manager = CheckpointManager(f"{ckpt_root}/{mode}", every_n_steps=5, mode=mode)
        state = _state()
        for step in range(1, 6):
            manager.maybe_save(step, state)
        assert manager.maybe_save(5, state, force=True) is None  # the loop's final save
        manager.close()
        assert _steps(manager) == [5]
        resumed = CheckpointManager(f"{ckpt_root}/{mode}", every_n_steps=5, mode=mode)
        assert resumed.restore(_state(seed=1)) == 5
        assert resumed.maybe_save(5, state, force=True) is None
        resumed.close()


def test_a_sync_save_skipped_while_another_is_in_flight_records_nothing(ckpt_root: str) -> None:
    manager = CheckpointManager(f"{ckpt_root}/run", every_n_steps=1, mode="sync", if_busy="skip")
    storage = GatedLocal(f"{ckpt_root}/other")
    other = unickpt.save(storage, {"w": torch.ones(8)}, mode="lazy")
    skipped = manager.maybe_save(1, _state())
    assert isinstance(skipped, unickpt.SaveHandle) and skipped.skipped
    assert skipped.path == f"{ckpt_root}/run/step_0000000001"
    storage.gate.set()
    assert other.wait() is not None
    manager.close()  # nothing failed: nothing was recorded for the skipped step
    assert _steps(manager) == [] and not os.path.exists(f"{ckpt_root}/run/latest")


def test_wrong_arguments_to_the_manager_are_named(ckpt_root: str) -> None:
    manager = CheckpointManager(ckpt_root, every_n_steps=1)
    with pytest.raises(unickpt.InvalidStateError, match="state must be a dict, not list"):
        manager.restore([torch.nn.Linear(2, 2)])  # type: ignore[arg-type]
    with pytest.raises(unickpt.InvalidStateError, match="state must be a dict, not list"):
        manager.maybe_save(1, [torch.nn.Linear(2, 2)])  # type: ignore[arg-type]
    with pytest.raises(unickpt.InvalidStateError, match="step True is not an integer"):
        manager.maybe_save(True, _state())
    with pytest.raises(ValueError, match="a memory tier needs a slower, durable tier"):
        CheckpointManager("memory:///dev/shm/unickpt-alone")  # would not outlive the process
    with pytest.raises(ValueError, match="storage_options configure s3:// tiers"):
        CheckpointManager([ckpt_root], storage_options={"endpoint": "http://x"})
    manager.close()


def test_a_run_root_given_for_a_checkpoint_is_named(ckpt_root: str) -> None:
    manager = CheckpointManager(ckpt_root, every_n_steps=1, mode="sync")
    manager.maybe_save(1, _state())
    manager.maybe_save(2, _state())
    message = "is not a checkpoint but holds checkpoints: step_0000000001, step_0000000002"
    with pytest.raises(unickpt.CheckpointNotFoundError, match=message):
        unickpt.verify(ckpt_root)


def _retry_a_failed_save(rank: int, world_size: int, root: str) -> list[str]:
    manager = CheckpointManager(root, every_n_steps=1, mode="lazy", save_rng=False)
    state = {"w": torch.full((64,), float(rank))}
    name = manager.name_for(5)
    if rank == 0:  # something committed is in the way: the save fails on every rank
        os.makedirs(os.path.join(root, name))
        with open(os.path.join(root, name, "manifest.json"), "w") as f:
            f.write("{}")
    torch.distributed.barrier()
    outcomes = []
    for attempt in range(2):
        handle = manager.maybe_save(5, state, force=attempt > 0)
        if handle is None:
            outcomes.append("not saved again")
            continue
        if rank == 1:
            time.sleep(0.5)  # the drains' bookkeeping of the failure is done by now, here only
        with pytest.raises(unickpt.CheckpointExistsError):
            handle.wait()
        outcomes.append("failed")
    with pytest.raises(unickpt.CheckpointError):
        manager.close()
    return outcomes


def test_every_rank_retries_a_failed_save_of_the_same_step(ckpt_root: str) -> None:
    """A save that failed in the background is made again when forced, on every rank: a rank
    that skipped it as 'saved already' left the others in its collective."""
    outcomes = run_distributed(2, _retry_a_failed_save, ckpt_root, timeout=120)
    assert outcomes == [["failed", "failed"]] * 2


def test_restore_checks_checksums_and_falls_back_past_flipped_bytes(ckpt_root: str) -> None:
    manager = CheckpointManager(ckpt_root, every_n_steps=1, keep_last=3, mode="sync")
    for step in (1, 2):
        manager.maybe_save(step, {"w": torch.full((1024,), float(step))})
    manager.close()
    (data,) = pathlib.Path(ckpt_root, manager.name_for(2), "data").glob("*.safetensors")
    with open(data, "r+b") as f:  # one bit of w, the file's size unchanged
        f.seek(-7, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(-7, os.SEEK_END)
        f.write(bytes([byte ^ 0x10]))
    state = {"w": torch.zeros(1024)}
    assert CheckpointManager(ckpt_root).restore(state) == 1
    assert torch.equal(state["w"], torch.ones(1024))
    assert CheckpointManager(ckpt_root).restore(state, verify=False) == 2  # trusting the disk


def _nodes_tiers(root: str, node: int) -> list[str]:
    return [f"memory://{root}/shm/node{node}", f"{root}/disk"]


def _save_three_steps(rank: int, world_size: int, root: str) -> None:
    manager = CheckpointManager(_nodes_tiers(root, rank), every_n_steps=1, keep_last=5, mode="sync")
    for step in (1, 2, 3):
        manager.maybe_save(step, {"w": torch.full((8,), float(step))})
    manager.wait()  # and the job dies: no close()


def _restart_on_swapped_nodes(rank: int, world_size: int, root: str) -> list[float]:
    manager = CheckpointManager(
        _nodes_tiers(root, 1 - rank), every_n_steps=1, keep_last=5, mode="sync"
    )
    state = {"w": torch.zeros(8)}
    restored = manager.restore(state)
    manager.maybe_save(3, {"w": torch.full((8,), 30.0)})  # the run does step 3 again
    manager.close()
    return [float(restored or -1), float(state["w"][0])]


def test_a_run_restarted_on_other_nodes_saves_its_undrained_step_again(ckpt_root: str) -> None:
    """Step 3 reached only the memory tiers of the two nodes when the job died; restarted with
    ranks on each other's nodes, the run restores step 2 from disk and saves step 3 anew, the
    stale copy on the old rank 0's node replaced instead of blocking the save."""
    run_distributed(2, _save_three_steps, ckpt_root, timeout=120)
    shutil.rmtree(f"{ckpt_root}/disk/step_0000000003")  # undrained when the job died
    assert run_distributed(2, _restart_on_swapped_nodes, ckpt_root, timeout=120) == [[2.0, 2.0]] * 2
    state = {"w": torch.zeros(8)}
    unickpt.load(f"{ckpt_root}/disk/step_0000000003", state)
    assert torch.equal(state["w"], torch.full((8,), 30.0))


def _tiers_per_rank(rank: int, world_size: int, root: str) -> str:
    try:  # a durable tier computed per rank (a clock, a cwd): its drains would split checkpoints
        CheckpointManager([f"memory://{root}/shm/node{rank}", f"{root}/disk-{rank}"])
    except ValueError as exc:
        return str(exc)
    return ""


def test_ranks_naming_different_durable_tiers_are_refused(ckpt_root: str) -> None:
    messages = run_distributed(2, _tiers_per_rank, ckpt_root, timeout=60)
    for rank, message in enumerate(messages):
        assert message.startswith("ranks disagree on the durable tiers"), message
        assert f"{ckpt_root}/disk-{1 - rank}" in message, message


# ---------------------------------------------------------------- one rank fails, all fail fast


def _restore_with_a_bug_on_rank_1(rank: int, world_size: int, root: str) -> object:
    manager = CheckpointManager(root, every_n_steps=1, keep_last=5, mode="sync")
    for step in (1, 2, 3):
        manager.maybe_save(step, _state(seed=step))
    manager.close()
    created = {info.name: unickpt.inspect(info.path).created for info in manager.list()}
    manager = CheckpointManager(root, every_n_steps=1, keep_last=5, mode="sync")
    if rank == 1:  # not a sign of a bad checkpoint: a bug, an interrupt, the caller's to fix
        import importlib

        module = importlib.import_module("unickpt.manager.manager")
        read_manifest = module.read_manifest

        def broken(storage: object) -> object:
            raise RuntimeError("reader bug")

        module.read_manifest = broken
    try:
        outcome: object = manager.restore(_state(seed=9))
    except (unickpt.CheckpointError, RuntimeError) as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    if rank == 1:
        module.read_manifest = read_manifest
    torch.distributed.barrier()
    with contextlib.suppress(unickpt.CheckpointExistsError):  # it was not superseded
        manager.maybe_save(1, _state(seed=9))  # the run's next save, had restore gone back
    manager.close()
    after = {info.name: unickpt.inspect(info.path).created for info in manager.list()}
    return outcome, after == created


def test_a_failure_that_is_no_bad_checkpoint_raises_instead_of_going_back(ckpt_root: str) -> None:
    """It used to take every checkpoint for unusable in turn and return None; the run then
    saved its steps again over the committed ones (audit T)."""
    (first, kept0), (second, kept1) = run_distributed(
        2, _restore_with_a_bug_on_rank_1, ckpt_root, pg_timeout=30, timeout=120
    )
    assert second == "RuntimeError: reader bug", second
    assert isinstance(first, str) and first.startswith(
        "CheckpointError: reading step_0000000003 on "
    ), first
    assert "failed on rank 1: RuntimeError: reader bug" in first
    assert kept0 and kept1  # no committed checkpoint was replaced


def test_rng_states_of_another_setup_are_not_restored_and_the_checkpoint_is(
    ckpt_root: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Saved with one more generator (a CUDA device) than the restoring process has: its row
    is parsed by another layout, which failed, and restore went back over every checkpoint."""
    from unickpt.manager import rng

    torch_states = rng._torch_states
    monkeypatch.setattr(
        rng, "_torch_states", lambda: [*torch_states(), torch.zeros(16, dtype=torch.uint8)]
    )
    manager = CheckpointManager(ckpt_root, every_n_steps=1, mode="sync")
    for step in (1, 2):
        manager.maybe_save(step, _state(seed=step))
    manager.close()
    monkeypatch.setattr(rng, "_torch_states", torch_states)
    restored = _state(seed=9)
    with caplog.at_level(logging.WARNING, logger="unickpt"):
        assert CheckpointManager(ckpt_root).restore(restored) == 2
    assert "another set of generators" in caplog.text and "RNG states not restored" in caplog.text
    expected = _state(seed=2)["model"].weight  # type: ignore[union-attr]
    assert torch.equal(restored["model"].weight, expected)  # type: ignore[union-attr]


def _construct_with_a_bad_tier_on_rank_1(rank: int, world_size: int, root: str) -> str:
    slow = f"{root}/slow"
    fast = f"{root}/fast" if rank == 0 else "memory://fast"  # not an absolute directory
    started = time.monotonic()
    try:
        CheckpointManager([fast, slow])
    except unickpt.CheckpointError as exc:
        return f"{time.monotonic() - started:.1f}s {type(exc).__name__}: {exc}"
    return "constructed"


def test_one_ranks_bad_tiers_fail_every_ranks_manager_at_once(ckpt_root: str) -> None:
    first, second = run_distributed(
        2, _construct_with_a_bad_tier_on_rank_1, ckpt_root, pg_timeout=30, timeout=120
    )
    for message in (first, second):
        assert float(message.partition("s ")[0]) < 20, message  # not the 30 s timeout
    assert "StorageError: tier 'memory://fast': a memory tier is 'memory' or" in second
    assert first.partition("s ")[2].startswith(
        "StorageError: creating the CheckpointManager failed on rank 1: StorageError"
    ), first


def _list_on_rank_0_alone(rank: int, world_size: int, root: str) -> list[int | None]:
    if rank == 0:  # a rank's own view of one tier: no collective, its peers need not join
        return _steps(CheckpointManager(root))
    return []


def test_a_one_tier_manager_made_on_one_rank_lists_without_its_peers(ckpt_root: str) -> None:
    CheckpointManager(ckpt_root, every_n_steps=1, mode="sync").maybe_save(1, _state())
    results = run_distributed(2, _list_on_rank_0_alone, ckpt_root, pg_timeout=10, timeout=60)
    assert results == [[1], []]


def _drain_without_memory_on_rank_1(rank: int, world_size: int, tiers: list[str]) -> list[str]:
    import importlib

    drain_module = importlib.import_module("unickpt.manager.drain")
    manager = CheckpointManager(tiers, every_n_steps=1, mode="sync")
    state = {f"w{rank}": torch.ones(1024)}  # each rank has a file of its own to copy
    outcomes = []
    for step in (1, 2):
        if rank == 1 and step == 1:

            def no_memory(size: int) -> bytearray:
                raise MemoryError("no copy buffer")

            drain_module.bytearray = no_memory  # type: ignore[attr-defined]
        started = time.monotonic()
        manager.maybe_save(step, state)
        try:
            manager.wait()
            outcomes.append(f"{time.monotonic() - started:.1f}s drained")
        except unickpt.StorageError as exc:
            outcomes.append(f"{time.monotonic() - started:.1f}s {exc}")
        if rank == 1 and step == 1:
            del drain_module.bytearray  # type: ignore[attr-defined]
    manager.close()
    return outcomes


def test_a_drain_failing_to_get_memory_on_one_rank_fails_on_every_rank(
    tmp_path: pathlib.Path,
) -> None:
    """Its copy buffer was allocated outside the error handling: the rank's drain job died,
    and from then on the ranks' drain collectives were paired wrongly."""
    tiers = [str(tmp_path / "fast"), str(tmp_path / "slow")]
    for outcomes in run_distributed(
        2, _drain_without_memory_on_rank_1, tiers, pg_timeout=30, timeout=120
    ):
        failed, drained = outcomes
        assert float(failed.partition("s ")[0]) < 20, outcomes
        assert "step_0000000001" in failed and "MemoryError: no copy buffer" in failed, outcomes
        assert drained.endswith("s drained"), outcomes
    assert unickpt.inspect(os.path.join(tiers[1], "step_0000000002")).step == 2
    assert not os.path.exists(os.path.join(tiers[1], "step_0000000001", "manifest.json"))


def _steps_1_and_2_saved(root: str) -> Any:
    """Commit steps 1 and 2 under ``root``; return the manager's module, whose read_summary
    (listing) and read_manifest (restore) the tests below replace to fail as they need."""
    import importlib

    manager = CheckpointManager(root, every_n_steps=1, keep_last=5, mode="sync")
    for step in (1, 2):
        manager.maybe_save(step, _state(seed=step))
    manager.close()
    return importlib.import_module("unickpt.manager.manager")


def test_a_candidate_deleted_under_restore_raises_instead_of_going_back(
    ckpt_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another live job (a zombie of the previous run) deleting checkpoints while restore reads
    them: restore took each for unusable, went back to older ones or returned None, and the
    run started over (audit W)."""
    module = _steps_1_and_2_saved(ckpt_root)
    read_manifest = module.read_manifest
    reads: list[str] = []

    def deleted_first(storage: Any) -> Any:
        reads.append(storage.url)
        if reads.count(storage.url) == 1 and storage.url.endswith(CheckpointManager.name_for(2)):
            shutil.rmtree(os.path.join(ckpt_root, CheckpointManager.name_for(2)))  # once listed
        return read_manifest(storage)

    monkeypatch.setattr(module, "read_manifest", deleted_first)
    with pytest.raises(unickpt.CheckpointError, match=r"was deleted from .* while restore read it"):
        CheckpointManager(ckpt_root).restore(_state(seed=9))
    monkeypatch.setattr(module, "read_manifest", read_manifest)
    assert _steps(CheckpointManager(ckpt_root)) == [1]  # nothing else was touched


def test_a_manifest_the_storage_fails_to_read_fails_restore_instead_of_going_back(
    ckpt_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storage error reading the newest manifest while listing says nothing of the
    checkpoint: the tier cannot be listed now, and restore raises rather than resume from the
    step before (the run would then save over the newest)."""
    module = _steps_1_and_2_saved(ckpt_root)
    read_summary = module.read_summary

    def flaky(storage: Any) -> Any:
        if storage.url.endswith(CheckpointManager.name_for(2)):
            raise unickpt.StorageError(f"{storage.url}: connection reset")
        return read_summary(storage)

    monkeypatch.setattr(module, "read_summary", flaky)
    with pytest.raises(unickpt.StorageError, match="cannot be listed now"):
        CheckpointManager(ckpt_root).restore(_state(seed=9))


def test_an_interrupt_while_an_async_save_copies_reaches_the_loop(
    ckpt_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or a preemption handler's sys.exit) during the copy of an async save stops the
    loop; a retry of the step saves it."""
    import importlib

    save_module = importlib.import_module("unickpt.engine.save")
    stage_file = save_module.stage_file

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    manager = CheckpointManager(ckpt_root, every_n_steps=1, mode="async")
    monkeypatch.setattr(save_module, "stage_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        manager.maybe_save(1, _state(seed=1))
    monkeypatch.setattr(save_module, "stage_file", stage_file)
    manager.wait()  # the interrupted save is not the loop's to hear of again
    manager.maybe_save(1, _state(seed=1))
    manager.close()
    restored = _state(seed=9)
    assert CheckpointManager(ckpt_root).restore(restored) == 1


def _interrupted_after_a_close(rank: int, world_size: int, tiers: list[str]) -> str:
    import importlib

    save_module = importlib.import_module("unickpt.engine.save")
    stage_file = save_module.stage_file
    manager = CheckpointManager(tiers, every_n_steps=1, mode="async")
    manager.maybe_save(1, {f"w{rank}": torch.ones(64)})
    manager.close()  # its drains' process group too: the next save makes it again
    if rank == 1:

        def interrupted(*args: Any, **kwargs: Any) -> None:
            raise KeyboardInterrupt

        save_module.stage_file = interrupted
    try:
        handle = manager.maybe_save(2, {f"w{rank}": torch.ones(64)})
        assert handle is not None
        handle.wait()
        outcome = "saved"
    except (KeyboardInterrupt, unickpt.CheckpointError) as exc:
        outcome = type(exc).__name__
    save_module.stage_file = stage_file
    with contextlib.suppress(unickpt.CheckpointError):
        manager.close()
    return outcome


def test_an_interrupted_save_after_close_leaves_the_drains_in_step(
    tmp_path: pathlib.Path,
) -> None:
    """The drains' process group, made again at the first save after close(), was made after
    the save: a rank whose save raised skipped it, and its peers waited there (audit Z2)."""
    tiers = [str(tmp_path / "fast"), str(tmp_path / "slow")]
    outcomes = run_distributed(2, _interrupted_after_a_close, tiers, pg_timeout=20, timeout=90)
    assert outcomes == ["CheckpointError", "KeyboardInterrupt"]


def test_listing_a_run_reads_only_what_it_lists(
    ckpt_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new manager's list(), latest() and restore() validated every kept checkpoint's whole
    manifest: a minute to restart a run keeping 20 checkpoints of 50k tensors. Listing reads
    their steps and metrics; a load validates the manifest it reads."""
    manager = CheckpointManager(ckpt_root, every_n_steps=1, keep_last=None, mode="sync")
    for step in range(1, 6):
        manager.maybe_save(step, {f"t{i}": torch.full((2,), float(step)) for i in range(10)})
    manager.close()
    from unickpt.format import manifest

    validated: list[str] = []
    tensor = manifest._Parser.tensor

    def counted(parser: Any, key: str, *args: Any) -> Any:
        validated.append(key)
        return tensor(parser, key, *args)

    monkeypatch.setattr(manifest._Parser, "tensor", counted)
    assert _steps(CheckpointManager(ckpt_root)) == [1, 2, 3, 4, 5]
    assert validated == []
    state = {f"t{i}": torch.zeros(2) for i in range(10)}
    assert CheckpointManager(ckpt_root).restore(state) == 5
    assert torch.equal(state["t9"], torch.full((2,), 5.0))
    assert 0 < len(validated) <= 2 * 11, validated  # the one it restores (10 tensors, RNG rows)
