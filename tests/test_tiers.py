"""CheckpointManager storage tiers: memory (node-local tmpfs) -> disk -> S3 (a real moto server).

Saves are made by 2 gloo ranks (tests/dist_harness.py) or by a trainer subprocess that is killed
with SIGKILL; the test process then looks at every tier directly (files, manifests, S3 objects)
and restores at world 1 or 2. S3 faults come from a TCP proxy that cuts the connection mid-upload
(tests/s3_server.py) or an endpoint that never answers; nothing is mocked in-process.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from s3_server import BUCKET, MotoServer, OutageProxy
from tier_trainer import blank_state, local_rows, rank_state

import unickpt
from unickpt import CheckpointManager
from unickpt.manager import drain
from unickpt.storage import LocalStorage, S3Storage, Storage

from dist_harness import run_distributed

TRAINER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tier_trainer.py")
name = CheckpointManager.name_for


@pytest.fixture
def shm() -> Iterator[str]:
    """A fresh directory on tmpfs for an explicit memory tier, removed afterwards."""
    path = f"/dev/shm/unickpt-test-{uuid.uuid4().hex[:10]}"
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fresh_s3(label: str) -> str:
    return f"s3://{BUCKET}/{label}-{uuid.uuid4().hex[:10]}"


def committed(storage: Storage) -> list[str]:
    return [n for n in storage.children() if storage.exists(f"{n}/manifest.json")]


def assert_restored(state: dict[str, Any], step: int, rank: int = 0, world: int = 1) -> None:
    expected = rank_state(step, rank, world)
    assert torch.equal(local_rows(state), local_rows(expected)), f"w differs (step {step})"
    assert torch.equal(state["b"], expected["b"]) and state["loader"] == expected["loader"]


def train(
    rank: int, world: int, tiers: list[str], env: dict[str, str], steps: int, close: bool = True
) -> None:
    """Lazy saves of steps 1..``steps`` through every tier, keeping the last 2 per durable
    tier and 1 in memory; closing the manager (empties the memory tier) or, as a trainer that
    died, not."""
    os.environ.update(env)  # forkserver children do not see the test's environment changes
    drain.COPY_CHUNK = 1 << 20  # several chunks per file: copies must stream
    manager = CheckpointManager(tiers, every_n_steps=1, keep_last=2, mode="lazy")
    for step in range(1, steps + 1):
        manager.maybe_save(step, rank_state(step, rank, world))
    manager.wait()
    memory, disk = LocalStorage(tiers[0].removeprefix("memory://")), LocalStorage(tiers[1])
    if rank == 0:
        assert committed(memory) == [name(steps)], "the memory tier keeps only the newest"
    newest = memory.child(name(steps))
    for file in newest.list():  # this rank's node holds its own files of the newest
        assert newest.read(file) == disk.read(f"{name(steps)}/{file}"), file
    if close:
        manager.close()
        assert committed(memory) == [] and memory.children() == [], "closed: durable elsewhere"


def test_tier_spelling(tmp_path: os.PathLike[str]) -> None:
    disk = os.path.join(os.fspath(tmp_path), "run1")
    derived = CheckpointManager(["memory", disk]).tiers[0]
    assert derived.memory and derived.root.startswith("/dev/shm/unickpt/run1-")
    assert derived.url == f"memory://{derived.root}"
    assert CheckpointManager(["memory", disk]).tiers[0].root == derived.root, "stable per run"
    assert CheckpointManager(["memory", f"{disk}x"]).tiers[0].root != derived.root
    single = CheckpointManager(disk)
    assert [(t.url, t.memory) for t in single.tiers] == [(disk, False)] and single.root == disk
    with pytest.raises(ValueError, match="memory tier must come first"):
        CheckpointManager([disk, "memory"])
    with pytest.raises(ValueError, match="needs a slower, durable tier"):
        CheckpointManager(["memory"])
    with pytest.raises(unickpt.StorageError, match="process-local memory:// namespaces"):
        CheckpointManager(["memory://scratch", disk])
    with pytest.raises(ValueError, match="keep_in_memory must be at least 1"):
        CheckpointManager(["memory", disk], keep_in_memory=0)


def test_memory_disk_s3_hold_identical_copies(
    env: dict[str, str], shm: str, tmp_path: os.PathLike[str]
) -> None:
    disk_dir, s3_root = os.path.join(os.fspath(tmp_path), "disk"), fresh_s3("tiers")
    tiers = [f"memory://{shm}", disk_dir, s3_root]
    run_distributed(2, train, tiers, env, 3, timeout=120)

    disk, s3 = LocalStorage(disk_dir), S3Storage(s3_root)
    assert committed(disk) == committed(s3) == [name(2), name(3)], "keep_last=2 on each"
    for step in (2, 3):
        manifest = disk.read(f"{name(step)}/manifest.json")
        assert s3.read(f"{name(step)}/manifest.json") == manifest
        files = unickpt.inspect(disk.child(name(step))).files
        assert {f.split("/")[-1][:6] for f in files} == {"r00000", "r00001"}, files
        assert s3.child(name(step)).list() == sorted([*files, "manifest.json"]), "no debris"
        for file, size in files.items():
            data = disk.read(f"{name(step)}/{file}")
            assert len(data) == size and s3.read(f"{name(step)}/{file}") == data, file
        unickpt.verify(s3.child(name(step)))
    assert s3.read("latest") == disk.read("latest") == name(3).encode()

    listed = [(i.step, i.tiers, i.path) for i in CheckpointManager(tiers).list()]
    assert listed == [
        (2, (disk_dir, s3_root), f"{disk_dir}/{name(2)}"),
        (3, (disk_dir, s3_root), f"{disk_dir}/{name(3)}"),
    ]
    state = blank_state(0, 1)
    unickpt.load(s3.child(name(3)), state, strict=False)  # strict: the state has no RNG rows
    assert_restored(state, 3)


def restore_after_kill(rank: int, world: int, root: str, env: dict[str, str]) -> int | None:
    os.environ.update(env)
    manager = CheckpointManager(["memory", root])
    state = blank_state(rank, world)
    step = manager.restore(state)
    assert_restored(state, 2, rank, world)
    manager.close()  # waits for the restored checkpoint's drain to S3
    return step


def test_memory_tier_outlives_a_killed_trainer(env: dict[str, str]) -> None:
    """kill -9 after the memory-tier commit, with the drain stuck on an S3 endpoint that never
    answers: a new run (2 ranks) restores that step from the node's memory tier, bit-exact,
    and drains it to S3."""
    root = fresh_s3("killed")
    memory_dir = CheckpointManager(["memory", root]).tiers[0].root
    try:
        with socket.socket() as silent:  # accepts connections, never answers
            silent.bind(("127.0.0.1", 0))
            silent.listen(16)
            stuck = {
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{silent.getsockname()[1]}",
                "UNICKPT_S3_READ_TIMEOUT": "300",
                "UNICKPT_S3_MAX_ATTEMPTS": "1",
            }
            trainer = subprocess.Popen(
                [sys.executable, TRAINER, "memory", root],
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, **env, **stuck},
            )
            try:
                assert trainer.stdout is not None
                lines = [trainer.stdout.readline().strip() for _ in range(2)]
                assert lines == ["committed 1", "committed 2"], lines
                os.kill(trainer.pid, signal.SIGKILL)
                assert trainer.wait(30) == -signal.SIGKILL
            finally:
                if trainer.poll() is None:
                    trainer.kill()
                    trainer.wait()
        memory, s3 = LocalStorage(memory_dir), S3Storage(root)
        assert committed(memory) == [name(1), name(2)], "nothing drained, nothing retired"
        assert s3.list() == [], "the kill came before any drain"
        crashed_save = f"{name(3)}/data/r00000-0123456789ab-0.safetensors"
        memory.put_atomic(crashed_save, b"what a save killed mid-write leaves")

        manifest = memory.read(f"{name(2)}/manifest.json")
        assert run_distributed(2, restore_after_kill, root, env, timeout=120) == [2, 2]
        # step 1 too: keep_last=3 would have kept it on S3 had the trainer lived to drain it
        assert committed(s3) == [name(1), name(2)]
        assert s3.read(f"{name(2)}/manifest.json") == manifest
        unickpt.verify(s3.child(name(2)))
        assert memory.children() == [], "durable on S3: closing the run emptied the memory tier"
    finally:
        shutil.rmtree(memory_dir, ignore_errors=True)


_ENDS_WITHOUT_CLOSE = """
import sys, torch, unickpt
manager = unickpt.CheckpointManager(sys.argv[1:], every_n_steps=1, mode="lazy")
for step in (1, 2):  # 8 MiB: a multipart upload, its parts sent from a thread pool
    manager.maybe_save(step, {"w": torch.full((2 << 20,), float(step))})
"""


def test_a_script_that_ends_without_close_still_drains_every_tier(
    env: dict[str, str], shm: str, tmp_path: os.PathLike[str]
) -> None:
    disk_dir, s3_root = os.path.join(os.fspath(tmp_path), "disk"), fresh_s3("ended")
    script = subprocess.run(
        [sys.executable, "-c", _ENDS_WITHOUT_CLOSE, f"memory://{shm}", disk_dir, s3_root],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )
    assert script.returncode == 0 and script.stderr == "", script.stderr
    disk, s3 = LocalStorage(disk_dir), S3Storage(s3_root)
    assert committed(disk) == committed(s3) == [name(1), name(2)]
    state = {"w": torch.zeros(2 << 20)}
    unickpt.load(s3.child(name(2)), state, strict=False)
    assert torch.equal(state["w"], torch.full((2 << 20,), 2.0))


def test_restore_picks_the_newest_complete_copy_across_tiers(
    env: dict[str, str], shm: str, tmp_path: os.PathLike[str], caplog: pytest.LogCaptureFixture
) -> None:
    disk_dir, s3_root = os.path.join(os.fspath(tmp_path), "disk"), fresh_s3("restore")
    tiers = [f"memory://{shm}", disk_dir, s3_root]
    run_distributed(2, train, tiers, env, 3, False, timeout=120)  # saved at world 2, not closed
    memory, disk, s3 = LocalStorage(shm), LocalStorage(disk_dir), S3Storage(s3_root)
    manager = CheckpointManager(tiers)  # restored at world 1: every load reshards

    def restore(tier: str) -> None:
        caplog.clear()
        state = blank_state(0, 1)
        with caplog.at_level(logging.INFO, logger="unickpt"):
            assert manager.restore(state) == 3
            manager.wait()
        assert f"restored {name(3)} from {tier}\n" in caplog.text + "\n", caplog.text
        assert_restored(state, 3)

    restore(f"memory://{shm}")  # the same step on every tier: the fastest wins

    (data_file,) = [f for f in memory.list(name(3)) if f.endswith(".safetensors")][:1]
    with open(os.path.join(shm, data_file), "r+b") as f:
        f.truncate(100)
    restore(disk_dir)
    assert "trying the same step on a slower tier" in caplog.text

    shutil.rmtree(shm)
    s3.delete(f"{name(3)}/manifest.json")  # S3 now stops at step 2: disk holds the newest
    s3.delete_prefix(name(3))
    restore(disk_dir)
    assert committed(s3) == [name(2), name(3)], "restoring from disk drained it to S3 again"
    assert s3.read(f"{name(3)}/manifest.json") == disk.read(f"{name(3)}/manifest.json")

    shutil.rmtree(disk_dir)
    restore(s3_root)  # from S3 alone, world 2 -> world 1
    manager.close()


def outage_run(
    rank: int, world: int, tiers: list[str], env: dict[str, str], moto_port: int
) -> dict[str, Any]:
    """Rank 0 runs the proxy both ranks reach S3 through; it dies while step 2 drains."""
    os.environ.update(env)
    port = torch.zeros(1, dtype=torch.int64)
    proxy = OutageProxy(moto_port) if rank == 0 else None
    if proxy is not None:
        port[0] = proxy.port
    dist.broadcast(port, 0)
    manager = CheckpointManager(
        tiers,
        every_n_steps=1,
        keep_last=10,
        mode="async",
        storage_options={"endpoint_url": f"http://127.0.0.1:{int(port)}"},
    )

    def save(step: int) -> None:
        handle = manager.maybe_save(step, rank_state(step, rank, world))
        assert isinstance(handle, unickpt.SaveHandle)
        handle.wait()  # committed on the memory tier, S3 or not

    save(1)
    manager.wait()
    dist.barrier()
    if proxy is not None:
        proxy.cut_after(1 << 20)  # S3 goes down once 1 MiB of step 2's drain went up
    dist.barrier()
    for step in (2, 3, 4):  # training goes on
        save(step)
    try:
        manager.wait()
        message = ""
    except unickpt.StorageError as exc:
        message = str(exc)
    errors = [(e.name, e.tier) for e in manager.drain_errors]
    tripped = proxy.tripped.is_set() if proxy is not None else None
    dist.barrier()
    if proxy is not None:
        proxy.restore()
    dist.barrier()
    save(5)
    manager.close()  # raises if step 5 did not reach S3
    if proxy is not None:
        proxy.close()
    return {"message": message, "errors": errors, "tripped": tripped}


def test_s3_outage_during_a_drain(
    env: dict[str, str], moto: MotoServer, shm: str, tmp_path: os.PathLike[str]
) -> None:
    disk_dir, s3_root = os.path.join(os.fspath(tmp_path), "disk"), fresh_s3("outage")
    tiers = [f"memory://{shm}", disk_dir, s3_root]
    results = run_distributed(2, outage_run, tiers, env, moto.port, timeout=120)
    assert results[0]["tripped"], "the proxy never cut: the outage missed the drain"
    for result in results:
        message = result["message"]
        assert f"checkpoint {name(2)} did not reach tier {s3_root}" in message, message
        assert "they remain on the faster tiers" in message
        failed = {n for n, tier in result["errors"] if tier == s3_root}
        assert failed == {name(2), name(3), name(4)}, result["errors"]
        assert all(tier == s3_root for _, tier in result["errors"])
    s3, disk = S3Storage(s3_root), LocalStorage(disk_dir)  # straight to moto, not the proxy
    assert committed(s3) == [name(1), name(5)], "failed drains never became visible"
    assert committed(disk) == [name(s) for s in range(1, 6)], "training and saving went on"
    state = blank_state(0, 1)
    unickpt.load(s3.child(name(1)), state, strict=False)
    assert_restored(state, 1)
    unickpt.verify(s3.child(name(5)))


def blocked_disk_run(rank: int, world: int, shm: str, disk_dir: str) -> dict[str, Any]:
    """The disk tier is a regular file (every drain to it fails) for steps 1-3, then a
    directory again for step 4."""
    manager = CheckpointManager(
        [f"memory://{shm}", disk_dir], every_n_steps=1, keep_last=1, mode="async"
    )
    for step in (1, 2, 3):
        manager.maybe_save(step, rank_state(step, rank, world))
    try:
        manager.wait()
        message = ""
    except unickpt.StorageError as exc:
        message = str(exc)
    undrained = committed(LocalStorage(shm))
    dist.barrier()
    if rank == 0:
        os.remove(disk_dir)
    dist.barrier()
    manager.maybe_save(4, rank_state(4, rank, world))
    manager.wait()
    after = committed(LocalStorage(shm))
    manager.close()
    return {"message": message, "undrained": undrained, "after": after}


def test_retention_keeps_undrained_checkpoints(shm: str, tmp_path: os.PathLike[str]) -> None:
    disk_dir = os.path.join(os.fspath(tmp_path), "disk")
    with open(disk_dir, "w") as f:
        f.write("not a directory")
    results = run_distributed(2, blocked_disk_run, shm, disk_dir, timeout=120)
    for result in results:
        for step in (1, 2, 3):
            assert f"checkpoint {name(step)} did not reach tier {disk_dir}" in result["message"]
        assert result["undrained"] == [name(1), name(2), name(3)], "keep_in_memory=1 yields"
        assert result["after"] == [name(4)], "drained: the older ones are superseded"
    assert committed(LocalStorage(disk_dir)) == [name(4)]


def test_restore_drains_the_undrained_checkpoints_that_retention_keeps(
    shm: str, tmp_path: os.PathLike[str]
) -> None:
    """A run died with steps 1-8 in memory only (its disk was unreachable): restore drains the
    step it restores and the older ones the disk's retention keeps, keep_every's step 4 and
    keep_last's step 7. Only step 8 was drained, and the memory tier's retention then dropped
    the rest, step 4 with them (audit N)."""
    disk_dir = os.path.join(os.fspath(tmp_path), "disk")
    with open(disk_dir, "w") as f:
        f.write("not a directory")
    tiers = [f"memory://{shm}", disk_dir]
    policy: dict[str, Any] = {"every_n_steps": 1, "keep_last": 2, "keep_every": 4, "mode": "sync"}
    crashed = CheckpointManager(tiers, **policy)
    for step in range(1, 9):
        crashed.maybe_save(step, rank_state(step, 0, 1))
    with pytest.raises(unickpt.StorageError, match="did not reach tier"):
        crashed.wait()  # and the process dies here, before close()
    assert committed(LocalStorage(shm)) == [name(step) for step in range(1, 9)]
    os.remove(disk_dir)
    manager = CheckpointManager(tiers, **policy)
    assert manager.restore(blank_state(0, 1)) == 8
    manager.close()
    assert committed(LocalStorage(disk_dir)) == [name(4), name(7), name(8)]
    for step in (4, 7):
        state = blank_state(0, 1)
        unickpt.load(os.path.join(disk_dir, name(step)), state, verify=True)
        assert_restored(state, step)


def test_restore_does_not_start_over_while_a_tier_that_may_hold_checkpoints_is_unlisted(
    env: dict[str, str], moto: MotoServer, shm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The node rebooted (an empty memory tier) while S3 was down: restore returned None, the
    # run started over, and its new checkpoints lost to the old step 2 at the next restore.
    proxy = OutageProxy(moto.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    tiers = [f"memory://{shm}", fresh_s3("unlisted")]
    manager = CheckpointManager(tiers, every_n_steps=1, mode="sync")
    for step in (1, 2):
        manager.maybe_save(step, rank_state(step, 0, 1))
    manager.close()  # durable on S3: the memory tier is emptied
    proxy.cut()
    try:
        with pytest.raises(unickpt.StorageError, match=r"tier s3://\S+ cannot be listed now"):
            CheckpointManager(tiers).restore(blank_state(0, 1))
        proxy.restore()
        state = blank_state(0, 1)
        assert CheckpointManager(tiers).restore(state) == 2
        assert_restored(state, 2)
    finally:
        proxy.close()


def test_restore_does_not_go_back_while_a_tier_that_may_hold_newer_ones_is_unlisted(
    env: dict[str, str],
    moto: MotoServer,
    tmp_path: os.PathLike[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The disk of the node the run restarts on missed step 2 (its drain failed, or another
    # node's disk): with S3 down, restore took step 1 and the run saved step 2 again (audit P).
    proxy = OutageProxy(moto.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    disk_dir = os.path.join(os.fspath(tmp_path), "disk")
    tiers = [disk_dir, fresh_s3("behind")]
    manager = CheckpointManager(tiers, every_n_steps=1, mode="sync")
    for step in (1, 2):
        manager.maybe_save(step, rank_state(step, 0, 1))
    manager.close()
    shutil.rmtree(os.path.join(disk_dir, name(2)))
    proxy.cut()
    try:
        with pytest.raises(unickpt.StorageError, match=r"tier s3://\S+ cannot be listed now"):
            CheckpointManager(tiers).restore(blank_state(0, 1))
        proxy.restore()
        assert CheckpointManager(tiers).restore(blank_state(0, 1)) == 2
    finally:
        proxy.close()


def test_close_after_a_restart_frees_what_retention_would_have_dropped(
    shm: str, tmp_path: os.PathLike[str]
) -> None:
    """keep_in_memory=3 > keep_last=1: a crashed run's steps 1-3, never drained and not kept by
    the disk's retention, stayed in RAM for good after the restarted run's close() (audit P)."""
    disk_dir = os.path.join(os.fspath(tmp_path), "disk")
    with open(disk_dir, "w") as f:
        f.write("not a directory")
    tiers = [f"memory://{shm}", disk_dir]
    policy: dict[str, Any] = {"every_n_steps": 1, "keep_last": 1, "keep_in_memory": 3}
    crashed = CheckpointManager(tiers, mode="sync", **policy)
    for step in range(1, 5):
        crashed.maybe_save(step, rank_state(step, 0, 1))
    with pytest.raises(unickpt.StorageError, match="did not reach tier"):
        crashed.wait()
    os.remove(disk_dir)
    manager = CheckpointManager(tiers, mode="sync", **policy)
    assert manager.restore(blank_state(0, 1)) == 4
    manager.close()
    assert committed(LocalStorage(disk_dir)) == [name(4)]
    assert LocalStorage(shm).list() == [], "closed: nothing left in RAM, not even `latest`"


def test_a_drain_never_overwrites_a_different_checkpoint(
    shm: str, tmp_path: os.PathLike[str]
) -> None:
    """A run that went back and saved a step again: the slower tier's older copy of that name is
    reported, not replaced nor silently taken for the new one."""
    disk_dir = os.path.join(os.fspath(tmp_path), "disk")
    manager = CheckpointManager([f"memory://{shm}", disk_dir], every_n_steps=1, mode="sync")
    manager.maybe_save(1, rank_state(1, 0, 1))
    manager.wait()
    before = LocalStorage(disk_dir).read(f"{name(1)}/manifest.json")
    manager.close()  # empties the memory tier: step 1 is on disk
    manager = CheckpointManager([f"memory://{shm}", disk_dir], every_n_steps=1, mode="sync")
    manager.maybe_save(1, rank_state(2, 0, 1))  # a new run, not restored from the old one
    with pytest.raises(unickpt.StorageError, match="already holds a different checkpoint"):
        manager.close()
    assert LocalStorage(disk_dir).read(f"{name(1)}/manifest.json") == before
    assert committed(LocalStorage(shm)) == [name(1)], "the only copy of the new save stays"


def test_close_releases_what_retention_dropped_from_the_durable_tiers(
    shm: str, tmp_path: os.PathLike[str]
) -> None:
    disk_dir = os.path.join(os.fspath(tmp_path), "disk")
    tiers = [f"memory://{shm}", disk_dir]
    manager = CheckpointManager(tiers, every_n_steps=1, keep_last=1, keep_in_memory=2, mode="sync")
    for step in (1, 2, 3):
        manager.maybe_save(step, rank_state(step, 0, 1))
    manager.wait()
    assert committed(LocalStorage(shm)) == [name(2), name(3)], "keep_in_memory=2 while running"
    manager.close()
    assert committed(LocalStorage(shm)) == [], "a closed run leaves no RAM behind"
    assert committed(LocalStorage(disk_dir)) == [name(3)]


def test_restore_keeps_a_memory_checkpoint_it_cannot_read(
    shm: str, tmp_path: os.PathLike[str]
) -> None:
    disk_dir = os.path.join(os.fspath(tmp_path), "disk")
    tiers = [f"memory://{shm}", disk_dir]
    manager = CheckpointManager(tiers, every_n_steps=1, keep_in_memory=2, mode="sync")
    manager.maybe_save(1, rank_state(1, 0, 1))
    manager.wait()
    newer = LocalStorage(shm).child(name(2))  # as a newer unickpt leaves it, undrained
    newer.put_atomic("manifest.json", b'{"format": "unickpt", "version": 2}')
    newer.put_atomic("data/r00000-0123456789ab-0.safetensors", b"the only copy")
    state = blank_state(0, 1)
    assert CheckpointManager(tiers).restore(state, strict=False) == 1
    assert_restored(state, 1)
    assert newer.read("data/r00000-0123456789ab-0.safetensors") == b"the only copy"


def test_a_drain_clears_what_a_killed_drain_left(shm: str, tmp_path: os.PathLike[str]) -> None:
    disk_dir = os.path.join(os.fspath(tmp_path), "disk")
    tiers = [f"memory://{shm}", disk_dir]
    manager = CheckpointManager(tiers, every_n_steps=1, mode="sync")
    manager.maybe_save(1, rank_state(1, 0, 1))
    manager.wait()
    disk, debris = LocalStorage(disk_dir), "data/r00000-0123456789ab-0.safetensors.tmp-5f3a"
    files = sorted([*unickpt.inspect(disk.child(name(1))).files, "manifest.json"])
    for killed in ("after publishing", "mid-copy"):
        if killed == "mid-copy":
            shutil.rmtree(os.path.join(disk_dir, name(1)))
        else:
            disk.put_atomic(f"{name(1)}/_inflight.json", b"{}")
        disk.put_atomic(f"{name(1)}/{debris}", b"half a file")
        resumed = CheckpointManager(tiers, every_n_steps=1, mode="sync")
        assert resumed.restore(blank_state(0, 1), strict=False) == 1  # and drains it again
        resumed.wait()
        assert disk.child(name(1)).list() == files, f"debris of a drain killed {killed}"
        unickpt.verify(disk.child(name(1)))


def test_a_retried_save_is_not_cleared_by_the_bookkeeping_of_its_failed_attempt(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first attempt of step 10 fails (a full disk) while the drainer is still busy with
    step 8; the retry starts at once. The drainer's later bookkeeping of the failure clears
    step 10's leftovers on the memory tier: it must not clear the retry's files."""
    root = os.fspath(tmp_path)
    manager = CheckpointManager(
        [f"memory://{root}/mem", f"{root}/disk"],
        mode="async",
        keep_last=10,
        keep_in_memory=10,
        max_write_rate=4 << 20,  # step 8's drain to disk takes about a second
    )
    state = {"model": torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])}
    manager.maybe_save(8, state, force=True).wait()
    open_writer, failed = LocalStorage.open_writer, []

    def full_disk_once(storage: LocalStorage, path: str) -> Any:
        if "step_0000000010" in storage.url and path.startswith("data/") and not failed:
            failed.append(path)
            raise OSError(28, "No space left on device")
        return open_writer(storage, path)

    monkeypatch.setattr(LocalStorage, "open_writer", full_disk_once)
    with pytest.raises(unickpt.StorageError, match="No space left"):
        manager.maybe_save(10, state, force=True).wait()
    retry = manager.maybe_save(10, state, force=True)
    assert retry is not None and retry.wait() is not None
    with pytest.raises(unickpt.CheckpointError, match="No space left"):
        manager.wait()  # the failed attempt, reported once
    manager.close()
    target = {"model": torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)])}
    unickpt.load(f"{root}/disk/step_0000000010", target, verify=True)
    assert all(
        torch.equal(a, b)
        for a, b in zip(target["model"].parameters(), state["model"].parameters(), strict=True)
    )


def test_a_forced_save_of_the_restored_step_is_not_made_after_a_failed_one(
    tmp_path: os.PathLike[str],
) -> None:
    """A save fails, the loop rolls back (restore), then saves the restored step: that step
    is committed already, so nothing is saved (the failed save's handle does not count)."""
    manager = CheckpointManager(os.fspath(tmp_path), mode="lazy", keep_last=5)
    state = {"w": torch.ones(4)}
    manager.maybe_save(8, state, force=True).wait()
    manager.maybe_save(10, state, metrics={"loss": object()}, force=True)  # fails in the background
    with pytest.raises(unickpt.CheckpointError, match="step_0000000010"):
        manager.wait()
    assert manager.restore(state) == 8
    assert manager.maybe_save(8, state, force=True) is None
    manager.close()


def test_a_memory_tier_directory_another_user_could_plant_in_is_refused(
    tmp_path: pathlib.Path, shm: str
) -> None:
    """Restore trusts the memory tier. Its derived directory under the world-writable
    /dev/shm/unickpt has a predictable name: another local user could make it first (or a
    symlink in its place) and plant a checkpoint there that the run then resumed from and
    drained to its durable tier (audit W). It is this user's alone now, mode 0700."""
    disk = os.fspath(tmp_path / "run")
    derived = CheckpointManager(["memory", disk]).tiers[0].root
    try:
        assert stat.S_IMODE(os.lstat(derived).st_mode) == 0o700
        os.chmod(derived, 0o755)  # as earlier versions left it: every user could read it
        CheckpointManager(["memory", disk])
        assert stat.S_IMODE(os.lstat(derived).st_mode) == 0o700
        os.rmdir(derived)
        planted = tmp_path / "planted"
        planted.mkdir()
        os.symlink(planted, derived)
        with pytest.raises(unickpt.StorageError, match="is a symlink: refused"):
            CheckpointManager(["memory", disk])
        os.symlink(planted, shm)  # one the caller names is the caller's to secure (k8s emptyDir)
        CheckpointManager([f"memory://{shm}", disk])
        os.unlink(derived)
        if os.geteuid() == 0:  # only root can give a directory away
            os.mkdir(derived)
            os.chown(derived, 65534, 65534)
            with pytest.raises(unickpt.StorageError, match=r"owned by another user \(uid 65534\)"):
                CheckpointManager(["memory", disk])
    finally:
        if os.path.islink(derived):
            os.unlink(derived)
        shutil.rmtree(derived, ignore_errors=True)
        if os.path.islink(shm):
            os.unlink(shm)


def test_the_memory_tier_keeps_what_never_reached_a_slower_tier(
    tmp_path: pathlib.Path, shm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """keep_in_memory=1 keeps only the newest of the checkpoints a slower tier holds: one whose
    drain failed is its only copy, and stays however many newer ones come."""
    import importlib

    module = importlib.import_module("unickpt.manager.manager")
    copy = module.drain

    def failing(comm: Any, source: Storage, target: Storage, name: str, **kw: Any) -> Any:
        if name != CheckpointManager.name_for(1):
            raise unickpt.StorageError(f"{target.url}: disk full")
        return copy(comm, source, target, name, **kw)

    monkeypatch.setattr(module, "drain", failing)
    tiers = [f"memory://{shm}", os.fspath(tmp_path / "disk")]
    manager = CheckpointManager(tiers, every_n_steps=1, keep_in_memory=1, mode="sync")
    for step in (1, 2, 3):
        manager.maybe_save(step, rank_state(step, 0, 1))
    with pytest.raises(unickpt.StorageError, match="disk full"):
        manager.wait()
    memory = LocalStorage(shm)
    assert committed(memory) == [name(2), name(3)], "the only copies of steps 2 and 3"
    assert committed(LocalStorage(tiers[1])) == [name(1)]


def test_a_growing_drain_backlog_is_logged_at_each_doubling(
    shm: str,
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Saves outpacing drains make every save a new high of the backlog: it is logged at 2, 4,
    8... waiting, not at every save (470 warnings in 600 saves)."""
    from unickpt.manager import manager as manager_module

    gate = threading.Event()

    def held(*args: Any, **kwargs: Any) -> Any:
        assert gate.wait(timeout=60)
        return drain.drain(*args, **kwargs)

    monkeypatch.setattr(manager_module, "drain", held)
    tiers = [f"memory://{shm}", os.fspath(tmp_path)]
    manager = CheckpointManager(tiers, every_n_steps=1, keep_last=None, mode="sync")
    try:
        for step in range(1, 21):
            manager.maybe_save(step, {"w": torch.full((4,), float(step))})
        backlog = [
            r.getMessage() for r in caplog.records if "still to be drained" in r.getMessage()
        ]
        assert [m.split()[1] for m in backlog] == ["2", "4", "8", "16"], backlog
    finally:
        gate.set()
        manager.close()
    assert committed(LocalStorage(os.fspath(tmp_path))) == [name(s) for s in range(1, 21)]
