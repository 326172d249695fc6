"""Async and lazy saves: snapshots as of the call, bounded reused memory, one save in flight."""

from __future__ import annotations

import gc
import importlib
import logging
import os
import random
import subprocess
import sys
import threading
import time
import weakref
from typing import Any

import psutil
import pytest
import torch
import torch.distributed as dist
from gated_storage import GatedLocal
from pool_probe import count_pool_allocations
from safetensors import safe_open
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import unickpt
from unickpt.engine import background
from unickpt.engine.load import CheckpointReader
from unickpt.format.manifest import DATA_DIR
from unickpt.layout.state import collect_for_save
from unickpt.storage import LocalStorage, Writer
from unickpt.storage.local import BUFFERED_WRITE_BYTES

from dist_harness import free_port, run_distributed


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 96),
        torch.nn.BatchNorm1d(96),  # its running statistics change in forward, not in the step
        torch.nn.Tanh(),
        torch.nn.Linear(96, 33),
        torch.nn.LayerNorm(33),
    )


def _step(model: torch.nn.Module, optim: torch.optim.Optimizer, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    model(torch.randn(16, 64, generator=generator)).square().mean().backward()
    optim.step()
    optim.zero_grad()


def _full(value: torch.Tensor) -> torch.Tensor:
    return (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()


def _snapshot(model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optim.param_groups for p in g["params"]]
    out = {f"model.{k}": _full(v) for k, v in model.state_dict().items()}
    for index, entries in optim.state_dict()["state"].items():
        for key, value in entries.items():
            out[f"optim.{names[id(params[index])]}.{key}"] = _full(value)
    return out


def _lazy_training(
    model: torch.nn.Module, root: str, steps: int, seed: int, save_probability: float
) -> dict[int, dict[str, torch.Tensor]]:
    """Train, lazily saving at random steps with random delays; returns the state at each call."""
    rng = random.Random(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    expected: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for step in range(steps):
        if rng.random() < save_probability:
            expected[step] = _snapshot(model, optim)
            state = {"model": model, "optim": optim, "trainer": {"step": step}}
            handles.append(unickpt.save(f"{root}/step_{step:03d}", state, mode="lazy", step=step))
        if rng.random() < 0.5:  # let the background copy run ahead, or not, at random
            torch.randn(200, 200).matmul(torch.randn(200, 200))
        _step(model, optim, step)  # with FSDP2, its all-gathers run beside the save's collectives
    for handle in handles:
        assert handle.wait() is not None
    return expected


def _check_checkpoints(root: str, expected: dict[int, dict[str, torch.Tensor]]) -> None:
    assert expected, "the random schedule saved nothing"
    for step, reference in expected.items():
        model = _model(seed=99)
        optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
        trainer = {"step": -1}
        unickpt.load(
            f"{root}/step_{step:03d}", {"model": model, "optim": optim, "trainer": trainer}
        )
        loaded = _snapshot(model, optim)
        assert loaded.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(loaded[key], value), (
                f"step {step}: {key} is not the state at the call"
            )
        assert trainer["step"] == step


def test_lazy_saves_capture_the_state_at_the_call(ckpt_root: str) -> None:
    expected = _lazy_training(_model(), ckpt_root, steps=60, seed=1234, save_probability=0.3)
    _check_checkpoints(ckpt_root, expected)


def test_async_returns_staged_and_memory_is_reused(ckpt_root: str) -> None:
    model = _model()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, optim, 0)
    state_bytes = sum(t.nbytes for t in _snapshot(model, optim).values())
    process = psutil.Process()
    rss = []
    for i in range(24):
        handle = unickpt.save(f"{ckpt_root}/s{i}", {"model": model, "optim": optim}, mode="async")
        assert handle.staged(timeout=0), "async save returned before its copy was made"
        before = _snapshot(model, optim)
        _step(model, optim, i + 1)  # mutate right away: the staged copy must be unaffected
        result = handle.wait()
        assert result is not None and handle.done
        target_model = _model(seed=5)
        target_optim = torch.optim.AdamW(target_model.parameters(), lr=1e-2)
        unickpt.load(result.path, {"model": target_model, "optim": target_optim})
        after = _snapshot(target_model, target_optim)
        assert all(torch.equal(after[k], v) for k, v in before.items()), f"save {i} is not exact"
        assert 0 < background.POOL.nbytes <= state_bytes
        rss.append(process.memory_info().rss)
    # After warm-up, resident memory stays flat: buffers are reused, not reallocated.
    assert max(rss[4:]) - rss[4] < 4 * state_bytes + 8 * 2**20, [r >> 20 for r in rss]
    unickpt.release_staging_memory()
    assert background.POOL.nbytes == 0


def test_busy_policy_skip_and_wait(ckpt_root: str, caplog: pytest.LogCaptureFixture) -> None:
    state = {"w": torch.randn(512, 512)}
    first = unickpt.save(f"{ckpt_root}/a", state, mode="lazy")
    with caplog.at_level(logging.INFO, logger="unickpt"):
        second = unickpt.save(f"{ckpt_root}/b", state, mode="async", if_busy="skip")
    if not first.done:  # the first was still in flight: the second must have been skipped
        assert second.skipped and second.wait() is None
        assert "skipping" in caplog.text
        assert not os.path.exists(f"{ckpt_root}/b")
    first.wait()
    third = unickpt.save(f"{ckpt_root}/c", state, mode="async")
    fourth = unickpt.save(f"{ckpt_root}/d", state, mode="sync", if_busy="wait")
    assert third.done, "a save with if_busy='wait' started before the one in flight finished"
    assert fourth.bytes_written > 0
    for name in ("a", "c", "d"):
        unickpt.verify(f"{ckpt_root}/{name}")


@pytest.mark.usefixtures("unwritable_data_files")
def test_background_failure_surfaces_on_wait(ckpt_root: str) -> None:
    path = f"{ckpt_root}/broken"
    handle = unickpt.save(path, {"w": torch.ones(10)}, mode="async")
    with pytest.raises(unickpt.StorageError, match="nothing was committed"):
        handle.wait()
    with pytest.raises(unickpt.IncompleteCheckpointError):
        unickpt.inspect(path)


def _fsdp_lazy(rank: int, world_size: int, root: str) -> dict[int, dict[str, torch.Tensor]]:
    model = _model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return _lazy_training(model, root, steps=12, seed=7, save_probability=0.4)


def test_lazy_saves_alongside_fsdp2_collectives(ckpt_root: str) -> None:
    expected = run_distributed(2, _fsdp_lazy, ckpt_root)[0]
    _check_checkpoints(ckpt_root, expected)


class _RecordingWriter(Writer):
    """Passes writes through, appending each one's size to ``sizes``."""

    def __init__(self, inner: Writer, sizes: list[int]) -> None:
        self._inner, self._sizes = inner, sizes

    def write(self, data: memoryview | bytes) -> None:
        self._sizes.append(memoryview(data).nbytes)
        self._inner.write(data)

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()


class _RecordingLocal(LocalStorage):
    """Local storage recording the size of every write() call to a data file."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.sizes: list[int] = []

    def open_writer(self, path: str) -> Writer:
        inner = super().open_writer(path)
        return _RecordingWriter(inner, self.sizes) if path.startswith(DATA_DIR + "/") else inner


def test_local_files_are_written_in_small_checksummed_pieces(ckpt_root: str) -> None:
    state = {"big": torch.randn(1000, 1000), "small": torch.arange(10.0), "empty": torch.ones(0)}
    storage = _RecordingLocal(f"{ckpt_root}/pieces")
    unickpt.save(storage, state)
    _header, *pieces = storage.sizes
    assert max(pieces) <= BUFFERED_WRITE_BYTES < state["big"].nbytes
    assert sum(pieces) == sum(t.nbytes for t in state.values())
    report = unickpt.verify(storage.root)  # raises unless every chunk matches its checksum
    assert report.bytes_checked == sum(pieces)
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    unickpt.load(storage.root, target)
    assert all(torch.equal(target[k], v) for k, v in state.items())


def test_staging_copies_strided_and_misaligned_chunks(ckpt_root: str) -> None:
    # "flag" (3 bytes) leaves "wt" at an offset no float32 view can start at; "wt" and "xt" are
    # transposed (not contiguous) and "y" lies at an aligned offset after them.
    state = {
        "flag": torch.tensor([True, False, True]),
        "wt": torch.randn(5, 7).T,
        "xt": torch.randn(6, 4, dtype=torch.float64).T,
        "y": torch.arange(9, dtype=torch.int16),
    }
    for mode in ("async", "lazy"):
        result = unickpt.save(f"{ckpt_root}/{mode}", state, mode=mode).wait()
        assert result is not None
        unickpt.verify(result.path)
        stored = {}
        for name in unickpt.inspect(result.path).files:  # standard safetensors, data aligned
            with open(os.path.join(result.path, name), "rb") as f:
                assert (8 + int.from_bytes(f.read(8), "little")) % 4096 == 0
            with safe_open(os.path.join(result.path, name), "pt") as f:
                names = f.keys()
                stored.update({n.split("@")[0]: f.get_tensor(n) for n in names})
        assert stored.keys() == state.keys()
        assert all(torch.equal(stored[k], state[k]) for k in state)
        target = {k: torch.zeros_like(v) for k, v in state.items()}
        unickpt.load(result.path, target)
        assert all(torch.equal(target[k], v) for k, v in state.items()), mode


def _replicated_pool(rank: int, world_size: int, root: str) -> tuple[int, int]:
    # Every rank holds the same two 48 MiB tensors (as under DDP); the plan has each rank write
    # about half, and a rank stages only what it writes.
    torch.manual_seed(0)
    state = {"a": torch.randn(12 * 2**20), "b": torch.randn(12 * 2**20)}
    for i in range(3):
        assert unickpt.save(f"{root}/r{i}", state, mode="async").wait() is not None
    return background.POOL.nbytes, sum(t.nbytes for t in state.values())


def test_a_rank_stages_only_what_it_writes(ckpt_root: str) -> None:
    results = run_distributed(2, _replicated_pool, ckpt_root)
    state_bytes = results[0][1]
    for pool_bytes, _ in results:
        assert pool_bytes <= 0.55 * state_bytes, (pool_bytes, state_bytes)
    assert sum(pool for pool, _ in results) == state_bytes  # the replicas are written once
    target = {"a": torch.zeros(12 * 2**20), "b": torch.zeros(12 * 2**20)}
    unickpt.load(f"{ckpt_root}/r2", target)
    torch.manual_seed(0)
    assert torch.equal(target["a"], torch.randn(12 * 2**20))


def test_lazy_save_call_does_no_storage_io(ckpt_root: str) -> None:
    storage = GatedLocal(f"{ckpt_root}/gated")
    state = {"w": torch.randn(256, 256)}
    expected = state["w"].clone()
    handle = unickpt.save(storage, state, mode="lazy")  # returns although storage would block
    assert not handle.done and not os.path.exists(storage.root)
    storage.gate.set()
    unickpt.before_update()
    state["w"].add_(1.0)
    assert handle.wait() is not None
    target = {"w": torch.zeros(256, 256)}
    unickpt.load(storage.root, target)
    assert torch.equal(target["w"], expected)


def test_lazy_save_keeps_buffers_as_of_the_call(ckpt_root: str) -> None:
    model = _model()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, optim, 0)
    expected = _snapshot(model, optim)
    storage = GatedLocal(f"{ckpt_root}/gated")  # holds the background copy back
    handle = unickpt.save(storage, {"model": model, "optim": optim}, mode="lazy")
    model(torch.randn(16, 64)).square().mean().backward()  # updates the running statistics
    assert not torch.equal(model[1].running_mean, expected["model.1.running_mean"])
    storage.gate.set()
    optim.step()  # waits for the copy
    assert handle.wait() is not None
    target = _model(seed=5)
    target_optim = torch.optim.AdamW(target.parameters(), lr=1e-2)
    unickpt.load(storage.root, {"model": target, "optim": target_optim})
    loaded = _snapshot(target, target_optim)
    for key in ("model.1.running_mean", "model.1.running_var", "model.1.num_batches_tracked"):
        assert torch.equal(loaded[key], expected[key]), f"{key} is not as of the call"
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_lazy_save_refuses_a_state_updated_before_its_copy(ckpt_root: str) -> None:
    model = _model()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, optim, 0)
    expected = _snapshot(model, optim)
    unickpt.save(f"{ckpt_root}/before", {"model": model, "optim": optim})
    # The loop's own update, not an optimizer step (every step waits for the copy, which the
    # gate holds back); state_dict()s, so that buffers are not known as buffers either.
    state = {"model": model.state_dict(), "optim": optim.state_dict()}
    storage = GatedLocal(f"{ckpt_root}/torn")
    handle = unickpt.save(storage, state, mode="lazy")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(0.5)
    storage.gate.set()
    with pytest.raises(
        unickpt.StateChangedError,
        match=r"model.0.weight, model.0.bias, model.1.weight and \d+ more changed in place",
    ) as err:
        handle.wait()
    assert "nothing was committed" in str(err.value) and "before_update()" in str(err.value)
    assert os.listdir(storage.root) == [], "the refused save left files behind"
    target = _model(seed=5)
    target_optim = torch.optim.AdamW(target.parameters(), lr=1e-2)
    unickpt.load(f"{ckpt_root}/before", {"model": target, "optim": target_optim})
    assert all(torch.equal(_snapshot(target, target_optim)[k], v) for k, v in expected.items())
    # The same bare dicts save fine when the loop waits before updating them.
    handle = unickpt.save(f"{ckpt_root}/waited", state, mode="lazy")
    unickpt.before_update()
    _step(model, optim, 2)
    assert handle.wait() is not None


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
def test_every_optimizer_step_waits_for_a_lazy_copy_not_only_those_in_the_state(
    ckpt_root: str, implementation: str
) -> None:
    # A model saved without its optimizer: the step ran beside the copy, and a fused step bumps
    # no version counter, so the torn snapshot committed without an error (audit M).
    model = _model()
    optim = torch.optim.Adam(model.parameters(), lr=1e-2, **{implementation: True})
    _step(model, optim, 0)
    expected = {key: value.clone() for key, value in model.state_dict().items()}
    storage = GatedLocal(f"{ckpt_root}/model")
    handle = unickpt.save(storage, {"model": model}, mode="lazy")
    threading.Timer(0.3, storage.gate.set).start()
    _step(model, optim, 1)  # its step waits until the copy is done
    assert handle.wait() is not None
    target = _model(seed=5)
    unickpt.load(storage.root, {"model": target})
    for key, value in target.state_dict().items():
        assert torch.equal(value, expected[key]), f"{key} is not the state at the call"


def _one_rank_updates_early(rank: int, world_size: int, root: str) -> tuple[str, str]:
    state = {"w": torch.full((1024,), float(rank))}
    storage = GatedLocal(f"{root}/torn")
    handle = unickpt.save(storage, state, mode="lazy")
    if rank == 1:
        state["w"].add_(1.0)  # without before_update(): rank 1's copy would be torn
    storage.gate.set()
    try:
        handle.wait()
    except unickpt.CheckpointError as exc:
        failure = (type(exc).__name__, str(exc))
    unickpt.before_update()
    # The background process group is still in step: the next save commits on every rank.
    assert unickpt.save(f"{root}/next", state, mode="lazy").wait() is not None
    return failure


def test_a_rank_whose_lazy_state_changed_fails_the_save_on_every_rank(ckpt_root: str) -> None:
    (kind0, message0), (kind1, message1) = run_distributed(2, _one_rank_updates_early, ckpt_root)
    assert kind1 == "StateChangedError" and "w changed in place" in message1
    assert kind0 == "StateChangedError", message0  # rank 1's class on every rank
    assert "nothing was committed" in message0 and "rank 1 staging: StateChangedError" in message0
    assert not os.path.exists(f"{ckpt_root}/torn/manifest.json")
    target = {"w": torch.zeros(1024)}
    unickpt.load(f"{ckpt_root}/next", target)  # every rank saved a replica of one tensor
    assert target["w"][0].item() in (0.0, 2.0)


@pytest.mark.parametrize("mode", ["sync", "async", "lazy"])
def test_conjugate_and_negative_views_save_their_values(ckpt_root: str, mode: str) -> None:
    z = torch.tensor([1 + 2j, 3 - 4j])
    state = {"conj": z.conj(), "neg": z.conj().imag}  # contiguous, flags set: memory != values
    assert state["conj"].is_conj() and state["neg"].is_neg()
    expected = {k: v.resolve_conj().resolve_neg().clone() for k, v in state.items()}
    result = unickpt.save(f"{ckpt_root}/c", state, mode=mode)  # type: ignore[call-overload]
    assert (result.wait() if mode != "sync" else result) is not None
    target = {k: torch.zeros_like(v) for k, v in expected.items()}
    unickpt.load(f"{ckpt_root}/c", target)
    assert all(torch.equal(target[k], v) for k, v in expected.items())


@pytest.mark.parametrize("mode", ["async", "lazy"])
def test_background_save_of_only_empty_tensors(ckpt_root: str, mode: str) -> None:
    handle = unickpt.save(f"{ckpt_root}/e", {"t": torch.empty(0, 4), "step": 3}, mode=mode)
    assert handle.wait() is not None
    target = {"t": torch.ones(0, 4), "step": None}
    unickpt.load(f"{ckpt_root}/e", target)
    assert target["step"] == 3


@pytest.mark.parametrize("mode", ["sync", "async", "lazy"])
def test_empty_tensors_to_memory_storage(mode: str) -> None:
    """Whole-chunk writes (any storage but a local path) of a chunk of no bytes."""
    path = f"memory://unickpt-test-{os.getpid()}/empty-{mode}"
    result = unickpt.save(path, {"t": torch.empty(0, 3), "u": torch.ones(2)}, mode=mode)
    assert (result.wait() if mode != "sync" else result) is not None
    target = {"t": torch.ones(0, 3), "u": torch.zeros(2)}
    unickpt.load(path, target)
    assert torch.equal(target["u"], torch.ones(2))


@pytest.mark.parametrize("mode", ["sync", "async", "lazy"])
def test_one_element_tensors_of_any_stride(ckpt_root: str, mode: str) -> None:
    """torch counts a tensor of at most one element contiguous whatever its strides: saved
    and loaded into like any other, without touching its neighbours."""
    base = torch.arange(6.0)
    state = {"one": base[1::2][:1], "none": base[::2][:0], "bf": base.bfloat16()[3::4]}
    assert state["one"].stride() == (2,) and state["bf"].stride() == (4,)
    result = unickpt.save(f"{ckpt_root}/s", state, mode=mode)
    assert (result.wait() if mode != "sync" else result) is not None
    into = torch.zeros(6)
    target = {"one": into[1::2][:1], "none": into[::2][:0], "bf": torch.zeros(6).bfloat16()[3::4]}
    unickpt.load(f"{ckpt_root}/s", target)
    assert into.tolist() == [0, 1, 0, 0, 0, 0] and target["bf"].item() == 3


def test_lazy_save_of_inference_tensors(ckpt_root: str) -> None:
    with torch.inference_mode():
        weights = torch.randn(64, 64)
    handle = unickpt.save(f"{ckpt_root}/i", {"w": weights}, mode="lazy")
    assert handle.wait() is not None
    target = {"w": torch.zeros(64, 64)}
    unickpt.load(f"{ckpt_root}/i", target)
    assert torch.equal(target["w"], weights)


class _AppState:
    """A DCP-style Stateful wrapper: its state dict hides the model and optimizer it holds."""

    def __init__(self, model: torch.nn.Module, optim: torch.optim.Optimizer) -> None:
        self.model, self.optim = model, optim

    def state_dict(self) -> dict[str, object]:
        return {"model": self.model.state_dict(), "optim": self.optim.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optim.load_state_dict(state["optim"])


def test_lazy_save_finds_the_model_and_optimizer_inside_a_stateful_wrapper(
    ckpt_root: str,
) -> None:
    model = _model()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, optim, 0)
    expected = _snapshot(model, optim)
    storage = GatedLocal(f"{ckpt_root}/gated")  # holds the background copy back
    handle = unickpt.save(storage, {"app": _AppState(model, optim)}, mode="lazy")
    model(torch.randn(16, 64)).square().mean().backward()  # buffers: snapshotted at the call
    storage.gate.set()
    optim.step()  # the step hook waits for the copy
    assert handle.wait() is not None
    target = _model(seed=5)
    target_optim = torch.optim.AdamW(target.parameters(), lr=1e-2)
    _step(target, target_optim, 3)  # a plain state_dict() lists only the state that exists
    unickpt.load(storage.root, {"app": _AppState(target, target_optim)})
    loaded = _snapshot(target, target_optim)
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_lazy_snapshot_clones_buffers_not_the_parameters_beside_them() -> None:
    flat = torch.arange(10.0)  # one storage, as after an mmap load with assign=True
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(flat[:6])
    module.register_buffer("stat", flat[6:])
    view = collect_for_save({"m": module}, allow_pickle=False, snapshot_buffers=True)
    assert view.shards["m.weight"].local.data_ptr() == module.weight.data_ptr(), "copied"
    stat = view.shards["m.stat"].local
    module.stat.add_(1.0)
    assert torch.equal(stat, torch.arange(6.0, 10.0)), "the buffer's snapshot moved with it"


@pytest.mark.parametrize("mode", ["sync", "lazy"])
def test_max_write_rate_spreads_the_write_not_the_copy(ckpt_root: str, mode: str) -> None:
    state = {"w": torch.randn(8 << 20)}  # 32 MiB: four 8 MiB writes, taking turns
    expected = state["w"].clone()
    rate = 64 << 20
    start = time.monotonic()
    result = unickpt.save(f"{ckpt_root}/capped", state, mode=mode, max_write_rate=rate)
    if mode == "lazy":
        assert isinstance(result, background.SaveHandle)
        assert result.staged(timeout=60)
        assert not result.done, "the copy is not held back, the write is"
        unickpt.before_update()
        state["w"].add_(1.0)
        assert result.wait() is not None
    assert time.monotonic() - start >= 24 * 2**20 / rate  # the last write's turn
    target = {"w": torch.zeros(8 << 20)}
    unickpt.load(f"{ckpt_root}/capped", target)
    assert torch.equal(target["w"], expected)


def _reserve_then_save(rank: int, world_size: int, root: str) -> tuple[list[int], list[int], int]:
    # A rank whose state cannot be saved fails every rank's reservation, with its reason, and
    # nobody is left blocked in a collective.
    bad = {"w": torch.ones(4), "o": object() if rank == 1 else 0}
    with pytest.raises(unickpt.InvalidStateError) as e:  # rank 1's class on every rank
        unickpt.reserve_staging(bad).wait()
    assert "'o'" in str(e.value) and (rank == 1 or "failed on rank 1" in str(e.value))
    allocations = count_pool_allocations()
    # Replicated tensors (as under DDP): the pool's size depends on the global plan.
    torch.manual_seed(0)
    state = {"a": torch.randn(3 << 20), "b": torch.randn(1 << 20), "c": torch.arange(10)}
    reservation = unickpt.reserve_staging(state)
    # Started at once: the save's collectives must wait for the reservation's, on every rank.
    handle = unickpt.save(f"{root}/first", state, mode="lazy")
    unickpt.before_update()
    for tensor in state.values():
        tensor.add_(1)
    result = handle.wait()
    assert reservation.wait() is None and result is not None and result.plan_cache_hit
    # A new layout, reserved ahead: its first save neither plans nor allocates.
    grown = {**state, "d": torch.ones(1 << 20)}
    assert unickpt.reserve_staging(grown).wait() is None
    reserved = list(allocations)
    again = unickpt.save(f"{root}/grown", grown, mode="lazy").wait()
    assert again is not None and again.plan_cache_hit
    return reserved, allocations, background.POOL.nbytes


def test_reserved_staging_is_what_the_first_save_uses(ckpt_root: str) -> None:
    results = run_distributed(2, _reserve_then_save, ckpt_root)
    for reserved, allocations, _ in results:
        assert reserved == allocations, "the save allocated staging memory again"
    torch.manual_seed(0)
    expected = {"a": torch.randn(3 << 20), "b": torch.randn(1 << 20), "c": torch.arange(10)}
    # each replicated tensor is staged once, by the rank that writes it
    grown_bytes = sum(t.nbytes for t in expected.values()) + (4 << 20)
    assert grown_bytes <= sum(pool for _, _, pool in results) < grown_bytes + 4096
    target = {k: torch.zeros_like(v) for k, v in expected.items()}
    unickpt.load(f"{ckpt_root}/first", target)
    assert all(torch.equal(target[k], v) for k, v in expected.items())


def test_reservation_takes_filling_the_pool_off_the_first_save(
    ckpt_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    allocate = background._aligned_buffer

    def slow(nbytes: int) -> torch.Tensor:  # as on hosts where fresh memory faults in slowly
        time.sleep(1.0)
        return allocate(nbytes)

    monkeypatch.setattr(background, "_aligned_buffer", slow)

    def first_save_stall(name: str) -> float:
        start = time.perf_counter()
        handle = unickpt.save(f"{ckpt_root}/{name}", state, mode="lazy")
        unickpt.before_update()
        stall = time.perf_counter() - start
        assert handle.wait() is not None
        return stall

    state = {"w": torch.randn(1 << 20)}
    monkeypatch.setattr(background, "POOL", background.StagingPool())
    unreserved = first_save_stall("unreserved")
    monkeypatch.setattr(background, "POOL", background.StagingPool())
    assert unickpt.reserve_staging(state).wait() is None  # at setup, or beside early steps
    reserved = first_save_stall("reserved")
    assert unreserved >= 1.0 > 0.5 > reserved, (unreserved, reserved)


def test_async_saves_from_two_threads_take_turns(ckpt_root: str) -> None:
    states = {"a": {"w": torch.zeros(1 << 20)}, "b": {"w": torch.ones(1 << 20)}}
    handles: dict[str, Any] = {}

    def save(path: str, name: str, start: threading.Barrier) -> None:
        start.wait()
        handles[path] = unickpt.save(path, states[name], mode="async")

    for trial in range(6):
        start = threading.Barrier(2)
        threads = [
            threading.Thread(target=save, args=(f"{ckpt_root}/{trial}{name}", name, start))
            for name in states
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    for path, handle in handles.items():
        assert handle.wait() is not None
        target = {"w": torch.empty(1 << 20)}
        unickpt.load(path, target)
        assert torch.equal(target["w"], states[path[-1]]["w"]), f"{path} holds the other's data"


def test_loading_during_a_lazy_save_waits_for_its_copy(ckpt_root: str) -> None:
    model = torch.nn.Linear(64, 64)
    state = {"model": model, "optim": torch.optim.SGD(model.parameters(), lr=0.1)}
    with torch.no_grad():
        model.weight.zero_()
    unickpt.save(f"{ckpt_root}/zeros", state)
    with torch.no_grad():
        model.weight.fill_(1.0)
    storage = GatedLocal(f"{ckpt_root}/ones")  # the copy has not started when load() runs
    handle = unickpt.save(storage, state, mode="lazy")
    threading.Timer(0.3, storage.gate.set).start()
    unickpt.load(f"{ckpt_root}/zeros", state)  # a rollback, into the state being saved
    assert handle.wait() is not None
    assert torch.equal(model.weight, torch.zeros(64, 64))
    target = {"model": torch.nn.Linear(64, 64)}
    unickpt.load(storage.root, target, strict=False)
    assert torch.equal(target["model"].weight, torch.ones(64, 64)), "the snapshot was overwritten"


_SCRIPT_ENDS_WITH_A_SAVE = """
import sys, torch, unickpt
model = torch.nn.Linear(256, 256)
torch.save(model.state_dict(), sys.argv[1] + ".pt")
unickpt.save(sys.argv[1], {"model": model}, mode=sys.argv[2], max_write_rate=4e6)
if sys.argv[3] == "raise":
    raise RuntimeError("the loop broke")
"""


@pytest.mark.parametrize("mode", ["lazy", "async"])
@pytest.mark.parametrize("ending", ["end", "raise"])
def test_a_save_left_running_at_interpreter_exit_commits(
    ckpt_root: str, mode: str, ending: str
) -> None:
    path = f"{ckpt_root}/final"
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT_ENDS_WITH_A_SAVE, path, mode, ending],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == (0 if ending == "end" else 1), run.stderr
    assert "unickpt" not in run.stderr, run.stderr
    target = {"model": torch.nn.Linear(256, 256)}
    unickpt.load(path, target)
    expected = torch.load(path + ".pt")
    assert all(torch.equal(v, expected[k]) for k, v in target["model"].state_dict().items())


def test_a_child_forked_during_a_background_save_saves_and_steps(ckpt_root: str) -> None:
    model = torch.nn.Linear(8, 8)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    storage = GatedLocal(f"{ckpt_root}/parent")  # the parent's save stays pending across fork
    handle = unickpt.save(storage, {"model": model, "optim": optim}, mode="lazy")
    # Forked while another thread holds the plan cache's lock, as a planning save does briefly
    plans = importlib.import_module("unickpt.engine.save")._PLANS
    held, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with plans._lock:
            held.set()
            release.wait()

    planner = threading.Thread(target=hold_the_lock)
    planner.start()
    held.wait()
    pid = os.fork()
    if pid == 0:  # a DataLoader worker, say: the parent's save thread does not exist here
        code = 1
        try:
            threading.Timer(30, os._exit, args=(2,)).start()
            model(torch.ones(1, 8)).sum().backward()
            optim.step()
            unickpt.save(f"{ckpt_root}/child", {"w": torch.ones(4)})
            code = 0
        finally:
            os._exit(code)
    release.set()
    planner.join()
    storage.gate.set()
    assert handle.wait() is not None
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, (
        "the child hung on a lock of the parent's threads"
    )
    target = {"w": torch.zeros(4)}
    unickpt.load(f"{ckpt_root}/child", target)
    assert torch.equal(target["w"], torch.ones(4))
    unickpt.verify(storage.root)


@pytest.mark.usefixtures("unwritable_data_files")
def test_a_failed_background_save_lets_the_state_go(ckpt_root: str) -> None:
    def failed_save() -> weakref.ref[torch.nn.Module]:
        model = torch.nn.Linear(256, 256)
        handle = unickpt.save(f"{ckpt_root}/broken", {"model": model}, mode="lazy")
        with pytest.raises(unickpt.StorageError):
            handle.wait()
        return weakref.ref(model)

    model = failed_save()
    gc.collect()  # the error and the frame it was raised into hold each other
    assert model() is None, "the failed save still holds the state it was given"

    def kept_failed_save() -> tuple[weakref.ref[torch.Tensor], unickpt.SaveHandle]:
        weights = torch.ones(1 << 16)
        handle = unickpt.save(f"{ckpt_root}/kept", {"w": weights}, mode="lazy")
        while not handle.done:  # not waited on: its error stays in the handle
            time.sleep(0.01)
        return weakref.ref(weights), handle

    weights, handle = kept_failed_save()  # as a manager keeps its newest save's handle
    gc.collect()
    assert weights() is None, "a failed save's kept handle still holds the state"
    with pytest.raises(unickpt.StorageError):
        handle.wait()


def test_if_busy_is_checked() -> None:
    with pytest.raises(ValueError, match="if_busy must be 'wait' or 'skip', not 'Skip'"):
        unickpt.save("unused", {"w": torch.ones(1)}, mode="async", if_busy="Skip")  # type: ignore[arg-type]


def _destroy_during_save(
    rank: int, world_size: int, root: str, port: int, reinit: bool
) -> str | None:
    storage = GatedLocal(f"{root}/cut")
    queued = threading.Event()  # the save's job starts only once the group is gone
    background._jobs.submit(queued.wait)
    handle = unickpt.save(storage, {"w": torch.ones(1 << 20)}, mode="lazy")
    dist.destroy_process_group()  # at the end of a script, without waiting for the save
    os.environ["MASTER_PORT"] = str(port)  # the harness ends with a barrier
    if reinit:  # a new group before the save's job runs
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    queued.set()
    storage.gate.set()
    try:
        handle.wait()
        message = None
    except unickpt.CheckpointError as exc:
        message = str(exc)
    if not reinit:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    return message


@pytest.mark.parametrize("reinit", [False, True])
def test_destroying_the_process_group_under_a_save_is_named(ckpt_root: str, reinit: bool) -> None:
    """The save's job runs once the group is gone. Taking its group only then, it saw a world
    of one, and each rank saved alone into one path (one committed, unaware). It runs on the
    group it was given when the save was called: its collectives may get as far as the
    commit, and every rank is told that the save was cut off, also when a new group was made
    meanwhile (it was a bare ValueError from the old group then)."""
    messages = run_distributed(2, _destroy_during_save, ckpt_root, free_port(), reinit)
    for message in messages:
        assert message is not None, "a rank saved without its group"
        assert "destroy_process_group() cut off the save to" in message
        assert "wait() for its handle" in message
    if os.path.exists(f"{ckpt_root}/cut/manifest.json"):  # "before or after it committed"
        unickpt.verify(f"{ckpt_root}/cut")


def test_reading_into_a_tensor_of_a_pending_lazy_save_waits_for_its_copy(ckpt_root: str) -> None:
    unickpt.save(f"{ckpt_root}/zeros", {"w": torch.zeros(64)})
    state = {"w": torch.ones(64)}
    storage = GatedLocal(f"{ckpt_root}/ones")
    handle = unickpt.save(storage, state, mode="lazy")
    threading.Timer(0.3, storage.gate.set).start()
    with CheckpointReader(f"{ckpt_root}/zeros") as reader:  # as the tools read
        reader.read("w", out=state["w"])
    assert handle.wait() is not None and torch.equal(state["w"], torch.zeros(64))
    target = {"w": torch.zeros(64)}
    unickpt.load(storage.root, target)
    assert torch.equal(target["w"], torch.ones(64)), "the snapshot was overwritten"


def test_a_save_that_waits_its_turn_starts_after_the_one_in_flight(ckpt_root: str) -> None:
    """With ``if_busy="wait"`` a save started while another is in flight waits for it: one
    that went ahead would run beside it, and the two would share the staging pool."""
    state = {"w": torch.ones(1024)}
    storage = GatedLocal(f"{ckpt_root}/first")  # holds the first save in flight
    first = unickpt.save(storage, state, mode="lazy")
    threading.Timer(0.5, storage.gate.set).start()
    second = unickpt.save(f"{ckpt_root}/second", state, mode="sync", if_busy="wait")
    assert first.done, "the second save returned while the first was still in flight"
    assert first.wait() is not None and second.bytes_written > 0
    for path in (storage.root, f"{ckpt_root}/second"):
        target = {"w": torch.zeros(1024)}
        unickpt.load(path, target)
        assert torch.equal(target["w"], state["w"])


@pytest.mark.usefixtures("unwritable_data_files")
def test_staged_raises_the_error_of_a_failed_background_save(ckpt_root: str) -> None:
    """A loop that only ever calls ``staged()`` (to know when it may update the state) must
    still learn that the save failed, once it has."""
    handle = unickpt.save(f"{ckpt_root}/broken", {"w": torch.ones(10)}, mode="async")
    with pytest.raises(unickpt.StorageError, match="nothing was committed") as waited:
        handle.wait()
    with pytest.raises(unickpt.StorageError) as staged:
        handle.staged()
    assert staged.value is waited.value


def test_the_pool_frees_the_old_layout_before_allocating_the_new(
    ckpt_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the state's layout changes, the buffers of the old one are freed before the new
    ones are allocated: extra host memory peaks at the larger layout, not at both."""
    allocations = count_pool_allocations(monkeypatch.setattr)
    allocate = background._aligned_buffer
    buffers: list[weakref.ref[torch.Tensor]] = []
    alive_at_allocation: list[int] = []

    def watched(nbytes: int) -> torch.Tensor:
        alive_at_allocation.append(sum(ref() is not None for ref in buffers))
        buffer = allocate(nbytes)
        buffers.append(weakref.ref(buffer))
        return buffer

    monkeypatch.setattr(background, "_aligned_buffer", watched)
    for name, numel in (("small", 1 << 14), ("large", 1 << 16)):
        handle = unickpt.save(f"{ckpt_root}/{name}", {"w": torch.ones(numel)}, mode="async")
        assert handle.wait() is not None
    assert len(allocations) == 2 and allocations[0] < allocations[1], allocations
    assert alive_at_allocation == [0, 0], "the old buffer was alive when the new one was made"
    assert background.POOL.nbytes == allocations[1]


def test_a_tensor_shrunk_before_its_lazy_copy_fails_the_save(ckpt_root: str) -> None:
    """A tensor resized smaller between a lazy save's call and its copy (an inference tensor:
    no version counter tells) fails the save: copying the size planned at the call reads past
    the tensor's end and commits bytes it no longer holds."""
    with torch.inference_mode():
        weights = torch.arange(1024, dtype=torch.float32)
    storage = GatedLocal(f"{ckpt_root}/shrunk")  # the copy has not started when it shrinks
    handle = unickpt.save(storage, {"w": weights}, mode="lazy")
    with torch.inference_mode():
        weights.resize_(16)
    storage.gate.set()
    with pytest.raises(unickpt.StateChangedError, match="'w' changed size since the save"):
        handle.wait()
    assert not os.path.exists(f"{storage.root}/manifest.json"), "the shrunk state was committed"


@pytest.mark.timeout(60, method="thread")  # the hang was in C (an Event's wait)
@pytest.mark.parametrize("mode", ["async", "lazy"])
def test_a_save_without_a_thread_is_made_in_the_call(
    ckpt_root: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No thread for a background save (a container's pids limit): the call makes it, so that
    its peers, whose jobs run its collectives, are not left waiting (the next optimizer step
    and save waited forever for the save that never ran)."""
    start = threading.Thread.start
    refused: list[str] = []

    def once(thread: threading.Thread) -> None:
        if thread.name == "unickpt-save" and not refused:
            refused.append(thread.name)
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", once)
    model = torch.nn.Linear(4, 4)
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    first = unickpt.save(f"{ckpt_root}/a", {"m": model, "o": optim}, mode=mode)
    assert refused and first.done
    model(torch.ones(1, 4)).sum().backward()
    optim.step()
    unickpt.save(f"{ckpt_root}/b", {"m": model, "o": optim}, mode=mode).wait()
    for name in ("a", "b"):
        unickpt.verify(f"{ckpt_root}/{name}")
