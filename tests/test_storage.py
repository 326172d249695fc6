"""One conformance suite for every Storage backend, plus a full save/load through memory://."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import unickpt
from unickpt.storage import (
    LocalStorage,
    MemoryStorage,
    RateLimit,
    Reader,
    Storage,
    as_rate_limit,
    open_storage,
    rate_limited,
)
from unickpt.storage.local import DIRECT_ALIGN, DIRECT_FILESYSTEMS, filesystem_type

LIBC = ctypes.CDLL(None, use_errno=True)


@pytest.fixture(params=["local", "memory"])
def storage(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Iterator[Storage]:
    if request.param == "local":
        yield LocalStorage(os.path.join(os.fspath(tmp_path), "root"))
    else:
        yield MemoryStorage(f"test-{uuid.uuid4().hex}")


def test_stream_write_then_ranged_read(storage: Storage) -> None:
    with storage.open_writer("data/a.bin") as writer:
        writer.write(b"hello ")
        writer.write(memoryview(b"world"))
    assert storage.exists("data/a.bin")
    with storage.open_reader("data/a.bin") as reader:
        assert reader.size() == 11
        assert bytes(reader.read(6, 5)) == b"world"
        out = bytearray(3)
        reader.read_into(2, memoryview(out))
        assert out == b"llo"


def test_scatter_read_fills_buffers_in_order(storage: Storage) -> None:
    payload = bytes(range(256)) * 40
    storage.put_atomic("data/s.bin", payload)
    outs = [bytearray(n) for n in (1, 700, 0, 3000, 5)]
    with storage.open_reader("data/s.bin") as reader:
        reader.read_into_many(17, [memoryview(o) for o in outs])
        assert b"".join(outs) == payload[17 : 17 + 3706]
        with pytest.raises(unickpt.CorruptCheckpointError, match="truncated"):
            reader.read_into_many(len(payload) - 4, [memoryview(bytearray(8))])


def test_aborted_write_is_invisible(storage: Storage) -> None:
    writer = storage.open_writer("data/b.bin")
    writer.write(b"partial")
    writer.abort()
    assert not storage.exists("data/b.bin")
    assert storage.list() == []


def test_reading_past_the_end_names_the_file(storage: Storage) -> None:
    storage.put_atomic("data/c.bin", b"0123")
    with (
        storage.open_reader("data/c.bin") as reader,
        pytest.raises(unickpt.CorruptCheckpointError, match=r"data/c\.bin is truncated"),
    ):
        reader.read(2, 10)


def test_missing_file_is_named(storage: Storage) -> None:
    with pytest.raises(unickpt.CorruptCheckpointError, match=r"nothere\.bin is missing"):
        storage.open_reader("nothere.bin")


def test_put_atomic_replaces_whole(storage: Storage) -> None:
    storage.put_atomic("m.json", b"old")
    storage.put_atomic("m.json", b"new content")
    assert storage.read("m.json") == b"new content"


def test_put_atomic_without_replace_keeps_what_is_there(storage: Storage) -> None:
    """Of two writers publishing one path (two saves committing one checkpoint), exactly one
    wins, and the loser is told; its temporaries are gone."""
    storage.put_atomic("manifest.json", b"first", replace=False)
    with pytest.raises(unickpt.CheckpointExistsError, match=r"manifest\.json already exists"):
        storage.put_atomic("manifest.json", b"second", replace=False)
    assert storage.read("manifest.json") == b"first"
    assert storage.list() == ["manifest.json"]
    storage.put_atomic("manifest.json", b"third")  # replace=True (the default) still replaces
    assert storage.read("manifest.json") == b"third"


def test_put_atomic_removes_what_a_killed_put_left(tmp_path: os.PathLike[str]) -> None:
    """A kill between a put's temporary and its rename leaves the temporary (the manager's
    ``latest`` at a tier's root, which no sweep looks at): the next put of that path removes
    it, and leaves other files' temporaries alone."""
    storage = LocalStorage(str(tmp_path))
    os.makedirs(os.path.join(tmp_path, "latest.tmp-0123456789ab"))  # unremovable: ignored
    for name in ("latest.tmp-deadbeef0000", "latest.tmp-[x]", "latest2.tmp-deadbeef0000"):
        with open(os.path.join(tmp_path, name), "wb") as leftover:
            leftover.write(b"step_000")
    storage.put_atomic("latest", b"step_010")
    assert sorted(os.listdir(tmp_path)) == [
        "latest",
        "latest.tmp-0123456789ab",
        "latest2.tmp-deadbeef0000",
    ]
    assert storage.read("latest") == b"step_010"


def test_list_child_delete(storage: Storage) -> None:
    for name in ("a/x", "a/y/z", "b/w", "top"):
        storage.put_atomic(name, name.encode())
    assert storage.list() == ["a/x", "a/y/z", "b/w", "top"]
    assert storage.list("a") == ["a/x", "a/y/z"]
    child = storage.child("a")
    assert child.list() == ["x", "y/z"]
    assert child.read("y/z") == b"a/y/z"
    storage.delete("top")
    storage.delete("top")  # deleting a missing file is not an error
    storage.delete_prefix("a")
    assert storage.list() == ["b/w"]


def test_modified_time_of_a_file(storage: Storage) -> None:
    before = time.time()
    storage.put_atomic("m/a.json", b"{}")
    after = time.time()
    assert storage.modified("m/missing.json") is None
    when = storage.modified("m/a.json")
    if isinstance(storage, MemoryStorage):
        assert when is None  # an in-process namespace keeps no times
        return
    # S3's LastModified has whole seconds; the server's clock is this host's.
    assert when is not None and before - 2 <= when <= after + 2, (before, when, after)


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../x", "a//b", "./a", "a\\b", ""])
def test_escaping_paths_are_refused(storage: Storage, bad: str) -> None:
    with pytest.raises(unickpt.UnsafeCheckpointError):
        storage.open_reader(bad)
    with pytest.raises(unickpt.UnsafeCheckpointError):
        storage.put_atomic(bad, b"x")


def test_symlink_out_of_root_is_refused(tmp_path: os.PathLike[str]) -> None:
    root = os.path.join(os.fspath(tmp_path), "root")
    outside = os.path.join(os.fspath(tmp_path), "secret")
    os.makedirs(root)
    with open(outside, "w") as f:
        f.write("secret")
    os.symlink(outside, os.path.join(root, "link"))
    with pytest.raises(unickpt.UnsafeCheckpointError, match="outside the checkpoint directory"):
        LocalStorage(root).open_reader("link")


def test_open_storage_urls(tmp_path: os.PathLike[str]) -> None:
    assert isinstance(open_storage(os.fspath(tmp_path)), LocalStorage)
    assert isinstance(open_storage(f"file://{os.fspath(tmp_path)}"), LocalStorage)
    assert isinstance(open_storage("memory://ns/prefix"), MemoryStorage)
    with pytest.raises(unickpt.StorageError, match="unsupported storage URL"):
        open_storage("gopher://x/y")


def test_save_and_load_through_memory_storage() -> None:
    url = f"memory://{uuid.uuid4().hex}/run/step_1"
    torch.manual_seed(0)
    state = {"w": torch.randn(7, 5), "b": torch.arange(3, dtype=torch.int64), "meta": {"k": [1, 2]}}
    unickpt.save(url, state, step=1)
    assert unickpt.inspect(url).step == 1
    unickpt.verify(url)
    target = {"w": torch.zeros(7, 5), "b": torch.zeros(3, dtype=torch.int64), "meta": {"k": None}}
    unickpt.load(url, target)
    assert torch.equal(target["w"], state["w"]) and torch.equal(target["b"], state["b"])
    assert target["meta"] == {"k": [1, 2]}


def test_large_rank_writes_two_concurrent_files(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.modules["unickpt.engine.datafile"], "STREAM_MIN_BYTES", 1024)
    state = {f"t{i}": torch.randn(64 + i, 8) for i in range(7)}
    path = os.path.join(os.fspath(tmp_path), "ck")
    result = unickpt.save(path, state)
    manifest = unickpt.inspect(path)
    assert len(manifest.files) == 2, manifest.files
    sizes = sorted(manifest.files.values())
    assert sizes[1] < 1.5 * sizes[0], f"streams are unbalanced: {sizes}"
    assert result.bytes_written == sum(sizes)
    unickpt.verify(path)
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    unickpt.load(path, target)
    assert all(torch.equal(target[k], v) for k, v in state.items())


def _resident_pages(path: str) -> list[bool]:
    """Which pages of the file are in the page cache (mincore over a read-only mapping)."""
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mapping:
        address = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
        assert LIBC.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) == 0
    return [bool(v & 1) for v in vec]


def _aligned(nbytes: int) -> memoryview:
    buffer = mmap.mmap(-1, nbytes)  # page-aligned
    buffer.write(bytes(range(256)) * (nbytes // 256))
    return memoryview(buffer)


def test_large_aligned_writes_bypass_the_page_cache(tmp_path: os.PathLike[str]) -> None:
    storage = LocalStorage(os.fspath(tmp_path))
    header, data = b"h" * DIRECT_ALIGN, _aligned(4 * 2**20)
    if not storage.direct_io:
        pytest.skip(f"no direct I/O on {filesystem_type(storage.root)!r} by default")
    with storage.open_writer("f.bin") as writer:
        writer.write(header)  # small: buffered, leaves the position aligned
        writer.write(data)  # aligned, large: direct
        writer.write(data[:1000])  # unaligned tail: buffered
        direct = writer._direct_ok  # type: ignore[attr-defined]
    path = os.path.join(os.fspath(tmp_path), "f.bin")
    resident = _resident_pages(path)  # before reading the file back, which would cache it
    with open(path, "rb") as f:
        assert f.read() == header + bytes(data) + bytes(data[:1000])
    if not direct:
        pytest.skip("this filesystem refused O_DIRECT; the writer fell back to buffered writes")
    data_pages = slice(1, 1 + data.nbytes // DIRECT_ALIGN)
    assert not any(resident[data_pages]), "direct writes went through the page cache"
    assert resident[0] and resident[-1], "buffered writes should be in the page cache"


def test_unaligned_writes_stay_correct(tmp_path: os.PathLike[str]) -> None:
    storage = LocalStorage(os.fspath(tmp_path))
    data = _aligned(3 * 2**20)
    pieces = [data[1:], data[: 2**20 + 5], b"x" * 3, data]  # misaligned address, size, position
    with storage.open_writer("g.bin") as writer:
        for piece in pieces:
            writer.write(piece)
    with open(os.path.join(os.fspath(tmp_path), "g.bin"), "rb") as f:
        assert f.read() == b"".join(bytes(p) for p in pieces)


def test_direct_io_only_where_it_is_a_plain_dma(tmp_path: os.PathLike[str]) -> None:
    assert filesystem_type("/proc/self/status") == "proc"
    assert filesystem_type(os.path.join(os.fspath(tmp_path), "not", "yet")) == filesystem_type(
        os.fspath(tmp_path)
    )
    local = LocalStorage(os.fspath(tmp_path))
    assert local.direct_io == (filesystem_type(os.fspath(tmp_path)) in DIRECT_FILESYSTEMS)
    assert not LocalStorage("/dev/shm/unickpt-test").direct_io  # tmpfs: buffered
    forced = LocalStorage(os.fspath(tmp_path), direct_io=False)
    assert not forced.direct_io and not forced.child("sub").direct_io
    data = _aligned(2 * 2**20)
    with forced.open_writer("h.bin") as writer:
        writer.write(data)
    resident = _resident_pages(os.path.join(os.fspath(tmp_path), "h.bin"))
    assert all(resident), "direct_io=False still went around the page cache"


def test_read_only_buffers_go_buffered_and_leave_direct_io_on(tmp_path: os.PathLike[str]) -> None:
    storage = LocalStorage(os.fspath(tmp_path))
    if not storage.direct_io:
        pytest.skip(f"no direct I/O on {filesystem_type(storage.root)!r} by default")
    header, blob, data = b"h" * DIRECT_ALIGN, bytes(2 * 2**20), _aligned(4 * 2**20)
    with storage.open_writer("r.bin") as writer:
        writer.write(header)
        writer.write(blob)  # read-only, at an aligned position: its address is unknown
        writer.write(data)  # still written around the page cache
    path = os.path.join(os.fspath(tmp_path), "r.bin")
    resident = _resident_pages(path)
    with open(path, "rb") as f:
        assert f.read() == header + blob + bytes(data)
    first = (len(header) + len(blob)) // DIRECT_ALIGN
    assert all(resident[:first]), "buffered writes should be in the page cache"
    assert not any(resident[first:]), "a read-only buffer switched direct I/O off"


def test_rate_limit_caps_the_writers_that_share_it() -> None:
    storage = MemoryStorage(f"test-{uuid.uuid4().hex}")
    rate = 40 << 20
    limit = RateLimit(rate)
    pieces = [bytes([i]) * (1 << 20) for i in range(6)]

    def write(name: str) -> None:
        with rate_limited(storage.open_writer(name), limit) as writer:
            for piece in pieces:
                writer.write(piece)

    threads = [threading.Thread(target=write, args=(f"f{i}",)) for i in range(2)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    # 12 writes of 1 MiB take turns: the last one may start 11 turns after the first
    assert elapsed >= 11 * (1 << 20) / rate
    assert storage.read("f0") == storage.read("f1") == b"".join(pieces)


def test_rate_limit_is_optional_and_validated() -> None:
    writer = MemoryStorage(f"test-{uuid.uuid4().hex}").open_writer("x")
    assert rate_limited(writer, None) is writer
    assert as_rate_limit(None) is None
    shared = RateLimit(1e9)
    assert as_rate_limit(shared) is shared
    assert as_rate_limit(5e8).bytes_per_second == 5e8  # type: ignore[union-attr]
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="must be positive"):
            RateLimit(bad)
    for bad in (float("nan"), float("inf"), "1e9"):
        with pytest.raises(ValueError, match="must be a finite number"):
            RateLimit(bad)  # type: ignore[arg-type]


def test_a_file_cut_short_under_its_reader_is_reported(tmp_path: os.PathLike[str]) -> None:
    """A file truncated after its reader opened it (and checked its size) makes the OS return
    no bytes at all: the read must say the file ended early, not retry the same offset forever."""
    storage = LocalStorage(os.fspath(tmp_path))
    storage.put_atomic("data/f.bin", bytes(range(100)))
    path = os.path.join(os.fspath(tmp_path), "data", "f.bin")
    outcome: list[BaseException | None] = []

    def read(reader: Reader) -> None:
        try:
            reader.read(0, 100)
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    with storage.open_reader("data/f.bin") as reader:
        os.truncate(path, 10)
        thread = threading.Thread(target=read, args=(reader,), daemon=True)
        thread.start()
        thread.join(5)
        hung = thread.is_alive()
        if hung:  # give the stuck read its bytes back, so that it ends
            os.truncate(path, 100)
            thread.join(5)
    assert not hung, "the read of a truncated file never returned"
    (error,) = outcome
    assert isinstance(error, unickpt.CorruptCheckpointError), error
    assert "data/f.bin ended early at byte 10" in str(error)


def test_files_are_fsynced_before_they_are_published(tmp_path: os.PathLike[str]) -> None:
    """A rename can reach the disk before the data it names: a data file, the in-flight marker or
    the manifest renamed into place unsynced can survive a power cut as a name over empty or
    partial contents, and the manifest then vouches for zeros."""
    events: list[tuple[str, str]] = []
    real = {name: getattr(os, name) for name in ("fsync", "replace", "link", "rename")}

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real["fsync"](fd)

    def publisher(name: str) -> object:
        def publish(src: str, dst: str, *args: object, **kwargs: object) -> None:
            events.append(("publish", os.path.realpath(src)))
            real[name](src, dst, *args, **kwargs)

        return publish

    path = os.path.join(os.fspath(tmp_path), "ck")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "fsync", fsync)
        for name in ("replace", "link", "rename"):
            patch.setattr(os, name, publisher(name))
        unickpt.save(path, {"w": torch.ones(4)})
    published = [src for kind, src in events if kind == "publish" and ".tmp-" in src]
    names = sorted(os.path.basename(src).split(".tmp-")[0] for src in published)
    assert names[:2] == ["_inflight.json", "manifest.json"], names
    assert len(names) == 3 and names[2].endswith(".safetensors"), names
    for src in published:
        publish = events.index(("publish", src))
        assert ("fsync", src) in events[:publish], f"{src} was published before an fsync"


@pytest.mark.parametrize("target", ["loop", "notes.txt/x"])
def test_a_link_that_cannot_be_followed_is_listed_as_a_file(tmp_path: Any, target: str) -> None:
    """A link to itself (ELOOP) or through a file (ENOTDIR) is one entry, as os.walk has it:
    it hid its whole directory from the listing, so a save into a directory of user files
    went ahead, and gc took a checkpoint for empty."""
    root = tmp_path / "ck"
    (root / "data").mkdir(parents=True)
    (root / "notes.txt").write_text("mine")
    os.symlink(target, root / "loop")
    assert LocalStorage(os.fspath(root)).list() == ["loop", "notes.txt"]
    with pytest.raises(unickpt.CheckpointError, match="no unickpt save wrote"):
        unickpt.save(os.fspath(root), {"w": torch.ones(3)})
    storage = LocalStorage(os.fspath(tmp_path))
    storage.delete_prefix("ck")
    assert not root.exists()
