"""gc on roots holding corrupt or crafted incomplete checkpoints.

However a directory's in-flight marker is broken, gc neither crashes nor deletes a checkpoint a
live saver may be writing or one that is committed, and it still collects the other directories.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pathlib
import socket
import time
from typing import Any

import pytest
import torch

import unickpt
from unickpt.errors import StorageError
from unickpt.storage import LocalStorage
from unickpt.tools import gc

HOST = socket.gethostname()
OLD = 2 * 3600.0  # seconds: older than gc's default min_age of an hour


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def incomplete(root: pathlib.Path, name: str) -> pathlib.Path:
    """A real checkpoint at ``root/name`` whose manifest was never written (data files only)."""
    path = root / name
    unickpt.save(os.fspath(path), {"w": torch.ones(4)})
    (path / "manifest.json").unlink()
    return path


def backdate(path: pathlib.Path, seconds: float) -> None:
    """Set the modification time of ``path`` itself (a symlink, not its target) to the past."""
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def mark(path: pathlib.Path, marker: str | dict[str, Any], age: float = 0.0) -> None:
    """Write ``path``'s in-flight marker, its file ``age`` seconds old."""
    text = marker if isinstance(marker, str) else json.dumps(marker)
    (path / "_inflight.json").write_text(text)
    backdate(path / "_inflight.json", age)


def collect(root: pathlib.Path) -> dict[str, tuple[bool, str]]:
    return {e.name: (e.removed, e.reason) for e in unickpt.collect_garbage(os.fspath(root))}


def test_well_formed_markers_keep_their_policy(tmp_path: pathlib.Path) -> None:
    mark(incomplete(tmp_path, "live"), {"host": HOST, "pid": os.getpid(), "started": now_iso()})
    mark(incomplete(tmp_path, "young"), {"host": "elsewhere", "pid": 7, "started": now_iso()})
    old = {"host": "elsewhere", "pid": 7, "started": "2020-01-01T00:00:00+00:00"}
    mark(incomplete(tmp_path, "old"), old)
    entries = collect(tmp_path)
    assert entries["live"] == (False, f"save in progress (pid {os.getpid()} alive)")
    assert not entries["young"][0] and entries["young"][1].endswith("ago on elsewhere")
    assert entries["old"] == (True, "")
    assert sorted(os.listdir(tmp_path)) == ["live", "young"]


def test_a_start_without_timezone_is_read_as_utc(tmp_path: pathlib.Path) -> None:
    naive_now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None).isoformat()
    mark(incomplete(tmp_path, "young"), {"host": "elsewhere", "pid": 7, "started": naive_now})
    old = {"host": "elsewhere", "pid": 7, "started": "2020-01-01T00:00:00"}
    mark(incomplete(tmp_path, "old"), old)
    entries = collect(tmp_path)
    assert not entries["young"][0] and entries["young"][1].startswith("save started")
    assert entries["old"] == (True, "")


UNTRUSTED = {
    "pid beyond any pid_t": {"host": HOST, "pid": 2**70, "started": "2020-01-01T00:00:00+00:00"},
    "pid -1 (every process)": {"host": HOST, "pid": -1, "started": "2020-01-01T00:00:00+00:00"},
    "pid 0 (own group)": {"host": HOST, "pid": 0, "started": "2020-01-01T00:00:00+00:00"},
    "pid true": {"host": HOST, "pid": True, "started": "2020-01-01T00:00:00+00:00"},
    "no host": {"pid": 7, "started": "2020-01-01T00:00:00+00:00"},
    "bad start": {"host": "elsewhere", "pid": 7, "started": "last tuesday"},
    "start in the future": {"host": "elsewhere", "pid": 7, "started": "2999-01-01T00:00:00+00:00"},
    "not JSON": "{",
    "not an object": "[]",
    "deeply nested": "[" * 10_000 + "]" * 10_000,
    "oversized": json.dumps({"host": "elsewhere", "pad": "x" * gc.MAX_MARKER_BYTES}),
}


@pytest.mark.parametrize("marker", UNTRUSTED.values(), ids=UNTRUSTED.keys())
def test_an_untrusted_marker_is_kept_while_its_file_is_young(
    tmp_path: pathlib.Path, marker: str | dict[str, Any]
) -> None:
    mark(incomplete(tmp_path, "a"), marker)
    removed, reason = collect(tmp_path)["a"]
    assert not removed and reason.startswith("untrusted in-flight marker"), reason
    assert (tmp_path / "a" / "_inflight.json").exists()


@pytest.mark.parametrize("marker", UNTRUSTED.values(), ids=UNTRUSTED.keys())
def test_an_untrusted_marker_is_abandoned_once_its_file_is_old(
    tmp_path: pathlib.Path, marker: str | dict[str, Any]
) -> None:
    mark(incomplete(tmp_path, "a"), marker, age=OLD)
    assert collect(tmp_path) == {"a": (True, "")}
    assert os.listdir(tmp_path) == []


def test_a_marker_linking_out_is_not_followed_nor_stops_gc(tmp_path: pathlib.Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    target = outside / "_inflight.json"
    target.write_text("keep me")
    linked = incomplete(root, "linked")
    (linked / "_inflight.json").symlink_to(target)
    incomplete(root, "sibling")  # abandoned: no marker at all

    entries = collect(root)
    assert entries["sibling"] == (True, "")
    assert not entries["linked"][0], entries
    assert "resolves outside the checkpoint directory" in entries["linked"][1], entries

    backdate(linked / "_inflight.json", OLD)  # the link's own age, whatever its target's
    assert collect(root) == {"linked": (True, "")}
    assert os.listdir(root) == [] and target.read_text() == "keep me"


def test_a_fifo_marker_does_not_block_gc(tmp_path: pathlib.Path) -> None:
    path = incomplete(tmp_path, "a")
    os.mkfifo(path / "_inflight.json")
    removed, reason = collect(tmp_path)["a"]
    assert not removed and "not a regular file" in reason, reason


def test_a_failing_directory_is_reported_and_the_others_collected(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    incomplete(tmp_path, "bad")
    incomplete(tmp_path, "good")
    listing = LocalStorage.list

    def failing_list(self: LocalStorage, prefix: str = "") -> list[str]:
        if os.path.basename(self.root) == "bad":
            raise StorageError(f"cannot list {self.root}: connection reset")
        return listing(self, prefix)

    monkeypatch.setattr(LocalStorage, "list", failing_list)
    entries = collect(tmp_path)
    assert entries["good"] == (True, "")
    assert entries["bad"] == (False, f"error: cannot list {tmp_path / 'bad'}: connection reset")
    assert os.listdir(tmp_path) == ["bad"]


def test_a_save_committing_while_gc_runs_is_not_deleted(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "step_1"
    unickpt.save(os.fspath(path), {"w": torch.ones(4)})
    manifest = (path / "manifest.json").read_bytes()
    (path / "manifest.json").unlink()
    mark(path, {"host": "elsewhere", "pid": 7, "started": now_iso()})
    in_progress = gc._in_progress

    def commit_first(*args: Any) -> str | None:
        # The saver commits after gc listed the directory and before gc reads its marker:
        # manifest.json appears, then the marker goes (docs/FORMAT.md §2).
        (path / "manifest.json").write_bytes(manifest)
        (path / "_inflight.json").unlink()
        return in_progress(*args)

    monkeypatch.setattr(gc, "_in_progress", commit_first)
    assert collect(tmp_path) == {}
    loaded = {"w": torch.zeros(4)}
    unickpt.load(os.fspath(path), loaded)
    assert torch.equal(loaded["w"], torch.ones(4))


def test_gc_given_the_parent_of_runs_deletes_no_run(tmp_path: pathlib.Path) -> None:
    """`unickpt gc` pointed one level too high sees run directories whose nested checkpoints
    hold data/*.safetensors: they are runs, not abandoned checkpoints."""
    for run in ("run1", "run2"):
        unickpt.save(str(tmp_path / run / "step_1"), {"w": torch.ones(4)})
    crashed = tmp_path / "run3" / "step_1"  # a run whose only save died: no manifest anywhere
    unickpt.save(str(crashed), {"w": torch.ones(4)})
    (crashed / "manifest.json").unlink()
    assert unickpt.collect_garbage(str(tmp_path), min_age=0) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run1", "run2", "run3"]
    unickpt.load(str(tmp_path / "run1" / "step_1"), {"w": torch.zeros(4)})
    (entry,) = unickpt.collect_garbage(str(tmp_path / "run3"), min_age=0)  # the right level
    assert entry.name == "step_1" and entry.removed


def test_a_marker_being_published_speaks_for_its_saver(tmp_path: pathlib.Path) -> None:
    """A saver writes, syncs (seconds on a slow disk) and renames a temporary of its marker;
    gc took the directory for abandoned meanwhile and removed it under the save (audit W)."""

    def publishing(name: str, text: str, age: float = 0.0) -> None:
        path = tmp_path / name
        path.mkdir()
        temporary = path / "_inflight.json.tmp-0123456789ab"
        temporary.write_text(text)
        backdate(temporary, age)

    alive = json.dumps({"host": HOST, "pid": os.getpid(), "started": now_iso()})
    publishing("live", alive)
    publishing("garbled", "{not json")  # some other writer's: kept until min_age
    publishing("dead", json.dumps({"host": HOST, "pid": 2**31 - 1, "started": now_iso()}))
    publishing("empty", "")  # a put killed before it wrote anything (kill -9 tests hit it)
    outcome = collect(tmp_path)
    assert outcome["live"] == (False, f"save in progress (pid {os.getpid()} alive)")
    assert not outcome["garbled"][0] and "untrusted in-flight marker" in outcome["garbled"][1]
    assert outcome["dead"] == (True, "") and outcome["empty"] == (True, "")
    assert sorted(os.listdir(tmp_path)) == ["garbled", "live"]


def test_a_directory_thousands_deep_is_collected_not_a_recursion_error(
    tmp_path: pathlib.Path,
) -> None:
    """A crafted tree deeper than Python's recursion limit (os.walk and shutil.rmtree recurse
    in Python 3.11) inside an abandoned save: listed, removed (a link in it unlinked, not
    followed), and the other directories still collected."""
    deep = incomplete(tmp_path, "aa_deep")
    leaf = os.fspath(deep)
    for _ in range(1500):  # os.makedirs recurses too
        leaf = os.path.join(leaf, "d")
        os.mkdir(leaf)
    os.symlink(tmp_path / "outside", os.path.join(deep, "d", "linked"))  # a link: not walked
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "kept").write_bytes(b"k")
    incomplete(tmp_path, "zz_abandoned")
    assert len(LocalStorage(os.fspath(deep)).list()) == 1  # its data file
    try:
        outcome = collect(tmp_path)
    finally:  # else pytest's own cleanup of old temporary trees recurses on it
        LocalStorage(os.fspath(tmp_path)).delete_prefix("aa_deep")
    assert outcome["aa_deep"][0] and outcome["zz_abandoned"] == (True, ""), outcome
    assert sorted(os.listdir(tmp_path)) == ["outside"]
    assert (tmp_path / "outside" / "kept").read_bytes() == b"k"
