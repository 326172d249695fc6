"""Single-writer streaming saves (converters, tools) and whole-tensor reads of a checkpoint."""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
from safetensors import safe_open

import unickpt
from unickpt.convert.torchfile import load_torch_file
from unickpt.engine.load import CheckpointReader
from unickpt.engine.stream import LazyTensor, stream_save
from unickpt.errors import (
    CheckpointError,
    CheckpointExistsError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    StateMismatchError,
    UnsafeCheckpointError,
)


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "a.w": torch.randn(64, 32, generator=g),
        "a.b": torch.randn(32, generator=g).to(torch.bfloat16),
        "n": torch.tensor(5),
        "e": torch.zeros(0, 4),
        "z.big": torch.randn(300, 100, generator=g),
    }


def test_stream_save_round_trip_with_rolled_files(tmp_path: pathlib.Path) -> None:
    tensors = sample()
    calls: list[tuple[int, int]] = []
    manifest = stream_save(
        str(tmp_path / "c"),
        [(k, LazyTensor.of(v)) for k, v in tensors.items()],
        objects={"meta.lr": 0.1},  # flat keys, as save() flattens nested dicts
        step=7,
        file_bytes=100_000,  # z.big alone is 120 000 bytes: it gets a file of its own
        progress=lambda done, total: calls.append((done, total)),
    )
    assert len(manifest.files) == 2
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    assert calls[-1] == (total, total) and len(calls) == len(tensors)
    assert unickpt.verify(str(tmp_path / "c")).bytes_checked == total
    target = {k: torch.zeros_like(v) for k, v in tensors.items()}
    result = unickpt.load(str(tmp_path / "c"), {**target, "meta": {"lr": None}})
    assert result.step == 7
    for key, value in tensors.items():
        assert torch.equal(target[key], value), key
    with CheckpointReader(str(tmp_path / "c"), verify=True) as reader:
        for key, value in tensors.items():
            assert torch.equal(reader.read(key), value), key
        out = torch.empty(64, 32)
        assert reader.read("a.w", out) is out and torch.equal(out, tensors["a.w"])
        with pytest.raises(StateMismatchError, match="'nope' is not in checkpoint"):
            reader.read("nope")
        with pytest.raises(StateMismatchError, match=r"a\.w: expected torch.float32 \[64, 32\]"):
            reader.read("a.w", torch.empty(32, 64))
    for file in manifest.files:  # plain safetensors, as every unickpt data file
        with safe_open(str(tmp_path / "c" / file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                key = name.rpartition("@")[0]
                assert torch.equal(f.get_tensor(name), tensors[key])


def test_tensors_are_produced_one_at_a_time_in_order(tmp_path: pathlib.Path) -> None:
    alive: list[int] = []
    produced: list[str] = []

    def producer(key: str) -> LazyTensor:
        def load() -> torch.Tensor:
            produced.append(key)
            alive.append(len(produced))
            return torch.full((1000,), float(len(produced)))

        return LazyTensor((1000,), torch.float32, load, origin=f"gen:{key}")

    stream_save(str(tmp_path / "c"), [(f"t{i}", producer(f"t{i}")) for i in range(20)])
    assert produced == [f"t{i}" for i in range(20)]


def test_the_writer_thread_lets_go_of_what_it_wrote() -> None:
    """The background writer must not keep the last tensor it wrote while it waits for the next:
    that made four tensors alive beside the one being produced (a rare peak of 4x the largest
    tensor in tests/test_convert_memory.py)."""
    import weakref

    import numpy as np

    from unickpt.engine.stream import _BackgroundWriter

    class Sink:
        def write(self, data: memoryview | bytes) -> None:
            pass

    background = _BackgroundWriter()
    try:
        written = np.ones(1 << 16, dtype=np.uint8)
        alive = weakref.ref(written)
        background.write(Sink(), memoryview(written))  # type: ignore[arg-type]
        del written
        background.drain()
        assert alive() is None, "the idle writer thread still holds the tensor it wrote"
    finally:
        background.close()


def test_a_failing_producer_leaves_nothing_visible(tmp_path: pathlib.Path) -> None:
    def boom() -> torch.Tensor:
        raise RuntimeError("source file vanished")

    entries = [
        ("ok", LazyTensor.of(torch.ones(3))),
        ("bad", LazyTensor((3,), torch.float32, boom, "x.pt:bad")),
    ]
    with pytest.raises(
        CheckpointError,
        match=r"producing tensor 'bad' \(from x\.pt:bad\): RuntimeError: source file vanished",
    ):
        stream_save(str(tmp_path / "c"), entries)
    with pytest.raises(IncompleteCheckpointError):
        unickpt.inspect(str(tmp_path / "c"))
    assert [e.name for e in unickpt.collect_garbage(str(tmp_path)) if e.removed] == ["c"]
    assert not (tmp_path / "c").exists()


def test_declared_shape_and_dtype_are_enforced(tmp_path: pathlib.Path) -> None:
    lying = LazyTensor((4, 4), torch.float32, lambda: torch.ones(4, 5), origin="src:w")
    with pytest.raises(
        CheckpointError,
        match=r"'w' \(from src:w\): produced torch.float32 \[4, 5\], "
        r"declared torch.float32 \[4, 4\]",
    ):
        stream_save(str(tmp_path / "c"), [("w", lying)])
    with pytest.raises(CheckpointError, match=r"two output tensors share a key: \['w'\]"):
        stream_save(str(tmp_path / "d"), [("w", LazyTensor.of(torch.ones(1)))] * 2)


def test_an_existing_checkpoint_is_never_overwritten(tmp_path: pathlib.Path) -> None:
    stream_save(str(tmp_path / "c"), [("w", LazyTensor.of(torch.ones(2)))])
    with pytest.raises(CheckpointExistsError):
        stream_save(str(tmp_path / "c"), [("w", LazyTensor.of(torch.zeros(2)))])
    with CheckpointReader(str(tmp_path / "c")) as reader:
        assert torch.equal(reader.read("w"), torch.ones(2))


# -------------------------------------------------------------------------- foreign .pt files


class Exploit:
    """Unpickling this would create a marker file (stands in for arbitrary code)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (os.system, (f"touch {self.marker}",))


def test_torch_files_load_weights_only_and_refuse_code(tmp_path: pathlib.Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"args": argparse.Namespace(hidden=8), "w": torch.arange(6.0)}, good)
    data = load_torch_file(good)
    assert data["args"].hidden == 8 and torch.equal(data["w"], torch.arange(6.0))

    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    torch.save({"w": torch.ones(1), "x": Exploit(str(marker))}, bad)
    with pytest.raises(
        UnsafeCheckpointError,
        match=r"bad\.pt needs .*global 'posix\.system' is not allow-listed.*--trust-pickle",
    ):
        load_torch_file(bad)
    assert not marker.exists()

    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CorruptCheckpointError, match=r"junk\.pt is not a readable torch file"):
        load_torch_file(tmp_path / "junk.pt")


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.99])
def test_a_cut_off_torch_file_is_corrupt_not_an_os_error(
    tmp_path: pathlib.Path, keep: float
) -> None:
    # torch's zip reader raises OSError(EINVAL) for an archive whose end is missing: it came
    # out bare, naming no file (audit S).
    path = tmp_path / "optim_states.pt"
    torch.save({"w": torch.arange(1 << 16, dtype=torch.float32)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptCheckpointError, match=r"optim_states\.pt is not a readable torch"):
        load_torch_file(path)


def test_bytes_that_are_no_pickle_are_corrupt_not_unsafe(tmp_path: pathlib.Path) -> None:
    # The weights-only unpickler's refusal of a bad opcode was called unsafe, with torch's
    # advice to turn weights_only off (audit S): only a refused global is unsafe.
    path = tmp_path / "item.pt"
    torch.save({"w": torch.ones(2)}, path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    pickled = next(name for name in members if name.endswith("data.pkl"))
    members[pickled] = b"\x7f" + members[pickled][1:]  # not an opcode
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    with pytest.raises(CorruptCheckpointError, match=r"item\.pt cannot be unpickled") as error:
        load_torch_file(path)
    assert not isinstance(error.value, UnsafeCheckpointError)
    assert "weights_only" not in str(error.value)


def test_release_pages_returns_mapped_memory(tmp_path: pathlib.Path) -> None:
    # In a child: the RSS of this test process is shared with everything pytest has loaded.
    script = textwrap.dedent(
        f"""
        import psutil, torch
        from unickpt.convert.torchfile import load_torch_file, release_pages
        torch.save({{"w": torch.ones(64 << 20)}}, {str(tmp_path / "w.pt")!r})
        proc = psutil.Process()
        base = proc.memory_info().rss
        w = load_torch_file({str(tmp_path / "w.pt")!r})["w"]
        assert w.sum().item() == 64 << 20
        touched = proc.memory_info().rss - base
        release_pages(w)
        released = proc.memory_info().rss - base
        assert w.sum().item() == 64 << 20  # still valid: pages come back from the file
        print(touched >> 20, released >> 20)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    touched, released = map(int, out.stdout.split())
    assert touched >= 200 and released <= 32, (touched, released)


def test_a_stream_save_refused_at_commit_leaves_no_live_marker(tmp_path: pathlib.Path) -> None:
    # The data is written before the manifest is validated: a tensor the format cannot describe
    # (65 dimensions) is refused then, and the save must still hand its files over to gc.
    shape = (1,) * 65
    lazy = LazyTensor(shape, torch.float32, lambda: torch.zeros(shape), "test")
    with pytest.raises(unickpt.CorruptCheckpointError, match="65 dimensions"):
        stream_save(str(tmp_path / "c"), [("t", lazy)])
    assert not (tmp_path / "c" / "_inflight.json").exists()
    assert not (tmp_path / "c" / "manifest.json").exists()
