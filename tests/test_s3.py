"""The S3 backend against a real moto S3 server over HTTP (a subprocess on 127.0.0.1).

The storage conformance suite of ``test_storage.py`` runs here against S3; then multipart
writes, full save/load/verify/inspect/gc through ``s3://`` URLs (with multi-part data files),
a world 1 -> world 2 reshard, an endpoint outage in the middle of an upload, and unreachable or
silent endpoints. Nothing is mocked in-process: every request goes over the network to moto.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import test_storage
import torch
from s3_server import BUCKET, FaultProxy, MotoServer, OutageProxy
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

import unickpt
from unickpt.storage import LocalStorage, S3Storage, Storage, open_storage, s3

from dist_harness import free_port, run_distributed

PART = s3.MIN_PART_SIZE  # 5 MiB, the smallest S3 allows; files above it are multipart uploads


@pytest.fixture(scope="module")
def raw(env: dict[str, str]) -> Any:
    """A plain boto3 client on the moto server, to look behind the backend's back."""
    return boto3.session.Session().client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])


def fresh(name: str = "t") -> str:
    return f"s3://{BUCKET}/{name}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def storage(env: dict[str, str]) -> S3Storage:
    return S3Storage(fresh())


# The backend conformance suite: every test of test_storage.py that takes a ``storage`` runs here
# too, against the S3Storage fixture above.
for _name, _test in vars(test_storage).items():
    if _name.startswith("test_") and "storage" in inspect.signature(_test).parameters:
        globals()[_name] = _test


def test_a_conditional_put_retried_after_a_lost_response_succeeds(storage: S3Storage) -> None:
    """A put whose response was lost is retried and finds its key taken (412): by its own bytes,
    which is success, not another writer's checkpoint."""
    storage.put_atomic("manifest.json", b"ours", replace=False)
    storage.put_atomic("manifest.json", b"ours", replace=False)  # as the retry sends it
    with pytest.raises(unickpt.CheckpointExistsError):
        storage.put_atomic("manifest.json", b"theirs", replace=False)
    assert storage.read("manifest.json") == b"ours"


def pending_uploads(raw: Any, prefix: str) -> list[str]:
    return [
        u["Key"]
        for u in raw.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
        if u["Key"].startswith(prefix)
    ]


def test_url_options_and_open_storage(env: dict[str, str], tmp_path: os.PathLike[str]) -> None:
    storage = open_storage(f"s3://{BUCKET}/a/b/", {"part_size": "6MiB", "upload_threads": 3})
    assert S3Storage(f"s3://{BUCKET}/a", {"part_size": "1g"}).options.part_size == 1 << 30
    assert isinstance(storage, S3Storage)
    assert storage.url == f"s3://{BUCKET}/a/b" and storage.describe("x/y") == f"{storage.url}/x/y"
    assert storage.options.part_size == 6 << 20 and storage.options.upload_threads == 3
    assert storage.options.max_attempts == 2, "knobs not given come from UNICKPT_S3_*"
    assert storage.client.meta.endpoint_url == env["AWS_ENDPOINT_URL"]
    assert storage.child("c").url == f"s3://{BUCKET}/a/b/c"
    assert S3Storage(BUCKET).url == f"s3://{BUCKET}"
    with pytest.raises(unickpt.StorageError, match=r"unknown S3 storage option\(s\) \['colour'\]"):
        S3Storage(f"s3://{BUCKET}/x", {"colour": "blue"})
    with pytest.raises(unickpt.StorageError, match="part_size must be between 5 MiB and 5 GiB"):
        S3Storage(f"s3://{BUCKET}/x", {"part_size": 1 << 20})
    with pytest.raises(unickpt.StorageError, match="names no bucket"):
        S3Storage("s3:///x")
    with pytest.raises(unickpt.UnsafeCheckpointError):
        S3Storage(f"s3://{BUCKET}/a/../b")
    with pytest.raises(unickpt.StorageError, match="only understood for s3:// URLs"):
        open_storage(os.fspath(tmp_path), {"part_size": PART})
    assert isinstance(open_storage(os.fspath(tmp_path), None), LocalStorage)


def test_children_root_exists_and_empty_prefixes(storage: S3Storage) -> None:
    assert not storage.root_exists() and storage.children() == []
    for name in ("run/step_1/manifest.json", "run/step_2/data/x", "top", "other/y"):
        storage.put_atomic(name, b"x")
    assert storage.root_exists()
    assert storage.children() == ["other", "run"]
    assert storage.child("run").children() == ["step_1", "step_2"]
    assert storage.child("run/step_2").children() == ["data"]
    assert not storage.child("nothing").root_exists()
    assert storage.remove_if_empty("nothing") and not storage.remove_if_empty("run")
    with pytest.raises(unickpt.UnsafeCheckpointError):
        storage.delete_prefix("")  # not a way to wipe the root
    storage.delete_prefix("run")
    assert storage.children() == ["other"] and storage.list() == ["other/y", "top"]


def test_listing_pages_and_deletion_batches(
    storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3, "LIST_PAGE", 3)  # S3 pages at 1000 keys; 1000s of keys are slow here
    monkeypatch.setattr(s3, "DELETE_BATCH", 4)
    names = [f"many/{i:02d}" for i in range(11)] + [f"many/sub{i}/x" for i in range(5)]
    for name in names:
        storage.put_atomic(name, b"")
    assert storage.list("many") == sorted(names)
    assert storage.child("many").children() == [f"sub{i}" for i in range(5)]
    storage.delete_prefix("many")
    assert storage.list() == []


def test_multipart_write_and_ranged_reads(storage: S3Storage, raw: Any) -> None:
    data = os.urandom(2 * PART + 12345)
    with storage.open_writer("big.bin") as writer:
        writer.write(data[:1000])  # buffered
        writer.write(memoryview(data)[1000 : 1000 + PART + 7])  # fills part 1, starts part 2
        writer.write(bytearray(data[1000 + PART + 7 :]))
        assert not storage.exists("big.bin"), "visible only once the upload is completed"
    head = raw.head_object(Bucket=BUCKET, Key=f"{storage.prefix}/big.bin")
    assert head["ETag"].strip('"').endswith("-3"), "three parts: 5 MiB, 5 MiB and the rest"
    assert pending_uploads(raw, storage.prefix) == []
    with storage.open_reader("big.bin") as reader:
        assert reader.size() == len(data)
        for offset, length in [(0, 10), (PART - 5, 10), (2 * PART - 1, 12346), (0, len(data))]:
            assert bytes(reader.read(offset, length)) == data[offset : offset + length]


def test_whole_parts_upload_from_the_callers_memory(storage: S3Storage) -> None:
    data = bytearray(os.urandom(2 * PART + 3))
    expected = bytes(data)
    with storage.open_writer("direct.bin") as writer:
        writer.write(memoryview(data))  # two parts straight from ``data``, 3 bytes buffered
        data[:] = bytes(len(data))  # the caller may reuse its memory once write returns
    assert storage.read("direct.bin") == expected


def test_aborted_multipart_upload_leaves_nothing(storage: S3Storage, raw: Any) -> None:
    with pytest.raises(RuntimeError, match="boom"), storage.open_writer("gone.bin") as writer:
        writer.write(os.urandom(PART + 1))
        assert pending_uploads(raw, storage.prefix) != []
        raise RuntimeError("boom")
    assert not storage.exists("gone.bin")
    assert pending_uploads(raw, storage.prefix) == [], "the multipart upload was aborted"


def test_empty_and_exactly_one_part_files(storage: S3Storage) -> None:
    with storage.open_writer("empty") as writer:
        writer.write(b"")
    assert storage.exists("empty") and storage.size("empty") == 0
    data = os.urandom(PART)
    with storage.open_writer("one") as writer:
        writer.write(data)
    assert storage.read("one") == data


def test_object_replaced_during_a_read_is_detected(storage: S3Storage) -> None:
    storage.put_atomic("f.bin", b"a" * 100)
    with storage.open_reader("f.bin") as reader:
        assert bytes(reader.read(0, 4)) == b"aaaa"
        storage.put_atomic("f.bin", b"b" * 100)
        with pytest.raises(unickpt.CorruptCheckpointError, match="replaced while being read"):
            reader.read(4, 4)


def test_missing_bucket_is_named(env: dict[str, str]) -> None:
    storage = S3Storage("s3://no-such-bucket-here/x")
    with pytest.raises(unickpt.StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        storage.put_atomic("a", b"x")


def test_missing_boto3_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(unickpt.StorageError, match=r"pip install 'unickpt\[s3\]'"):
        S3Storage(f"s3://{BUCKET}/x")


def make_state(seed: int, rows: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "embed": torch.randn(rows, 1024, generator=gen),  # rows * 4 KiB
            "bias": torch.randn(17, generator=gen).to(torch.bfloat16),
        },
        "step_count": torch.arange(5, dtype=torch.int64),
        "meta": {"lr": 0.1, "names": ["a", "b"]},
    }


def zeros_like_state(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
        "step_count": torch.zeros(5, dtype=torch.int64),
        "meta": {"lr": None, "names": None},
    }


def assert_same(loaded: dict[str, Any], state: dict[str, Any]) -> None:
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value), key
    assert torch.equal(loaded["step_count"], state["step_count"])
    assert loaded["meta"] == state["meta"]


def test_save_load_verify_inspect_gc(env: dict[str, str], raw: Any) -> None:
    root = fresh("run")
    url = f"{root}/step_1"
    state = make_state(0, rows=3000)  # ~12 MiB: multi-part data files
    unickpt.save(url, state, step=1)
    manifest = unickpt.inspect(url)
    assert manifest.step == 1
    prefix = url[len(f"s3://{BUCKET}/") :]
    etags = [raw.head_object(Bucket=BUCKET, Key=f"{prefix}/{f}")["ETag"] for f in manifest.files]
    assert any("-" in etag for etag in etags), f"no multipart data file: {etags}"
    report = unickpt.verify(url)
    assert report is not None
    loaded = zeros_like_state(state)
    unickpt.load(url, loaded, verify=True)
    assert_same(loaded, state)
    with pytest.raises(unickpt.CheckpointExistsError):
        unickpt.save(url, state, step=1)

    # gc: an abandoned save (data, no manifest, no in-flight marker) goes, the committed one stays
    S3Storage(root).put_atomic("step_0/data/r00000-00000000dead-0.safetensors", b"junk")
    with pytest.raises(unickpt.IncompleteCheckpointError):
        unickpt.inspect(f"{root}/step_0")
    entries = unickpt.collect_garbage(root)
    assert [(e.name, e.removed) for e in entries] == [("step_0", True)]
    assert S3Storage(root).children() == ["step_1"]
    with pytest.raises(unickpt.CheckpointNotFoundError):
        unickpt.inspect(f"{root}/step_0")


def test_gc_ages_an_untrusted_marker_by_its_object_time(env: dict[str, str]) -> None:
    """A marker gc cannot trust is kept until the object itself is min_age old (LastModified):
    on S3 too, not for good."""
    root = fresh("gc")
    storage = S3Storage(root)
    storage.put_atomic("step_3/data/r00000-000000000003-0.safetensors", b"junk")
    storage.put_atomic("step_3/_inflight.json", b"not json")
    kept = unickpt.collect_garbage(root, min_age=3600)
    assert [(e.name, e.removed) for e in kept] == [("step_3", False)]
    assert kept[0].reason.startswith("untrusted in-flight marker") and "s ago" in kept[0].reason
    time.sleep(1.1)
    gone = unickpt.collect_garbage(root, min_age=1)
    assert [(e.name, e.removed) for e in gone] == [("step_3", True)], gone
    assert storage.children() == []


def test_gc_aborts_the_incomplete_uploads_of_a_dead_save(env: dict[str, str], raw: Any) -> None:
    """A writer killed mid-file leaves a multipart upload no listing shows but the store keeps:
    removing the checkpoint aborts it; an upload of a checkpoint that stays is left alone."""
    root = fresh("uploads")
    storage = S3Storage(root)
    storage.put_atomic(
        "step_3/_inflight.json",
        b'{"host": "gone", "pid": 1, "started": "2020-01-01T00:00:00+00:00"}',
    )
    prefix = storage.prefix
    for key in (
        "step_3/data/r00000-000000000003-0.safetensors",
        "step_30/data/r00000-000000000030-0.safetensors",
    ):
        upload = raw.create_multipart_upload(Bucket=BUCKET, Key=f"{prefix}/{key}")
        raw.upload_part(
            Bucket=BUCKET,
            Key=f"{prefix}/{key}",
            UploadId=upload["UploadId"],
            PartNumber=1,
            Body=b"x" * 1024,
        )
    storage.put_atomic("step_30/_inflight.json", b"not json")  # untrusted and young: kept
    entries = unickpt.collect_garbage(root, min_age=3600)
    assert {(e.name, e.removed) for e in entries} == {("step_3", True), ("step_30", False)}
    assert pending_uploads(raw, f"{prefix}/step_3/") == []
    assert pending_uploads(raw, f"{prefix}/step_30/") == [
        f"{prefix}/step_30/data/r00000-000000000030-0.safetensors"
    ]
    storage.delete_prefix("step_30")
    assert pending_uploads(raw, prefix) == []


RESHARD_SHAPE = (1001, 700)  # odd rows: uneven Shard(0) over two ranks


def reshard_expected() -> torch.Tensor:
    return torch.randn(RESHARD_SHAPE, generator=torch.Generator().manual_seed(7))


def load_at_world_2(
    rank: int, world_size: int, source: str, target: str, env: dict[str, str]
) -> list[int]:
    """Load ``source`` (saved at world 1) as Shard(0), check this rank's rows, save to
    ``target`` from both ranks."""
    os.environ.update(env)  # forkserver children do not inherit the test's environment changes
    mesh = DeviceMesh("cpu", list(range(world_size)))
    state = {"w": distribute_tensor(torch.zeros(RESHARD_SHAPE), mesh, [Shard(0)])}
    result = unickpt.load(source, state)
    local = state["w"].to_local()
    want = torch.chunk(reshard_expected(), world_size, 0)[rank]
    assert torch.equal(local, want), f"rank {rank}: shard differs"
    unickpt.save(target, state)
    return [result.bytes_read, local.numel() * local.element_size()]


def test_reshard_world_1_to_world_2_through_s3(env: dict[str, str]) -> None:
    root = fresh("reshard")
    source, target = f"{root}/w1", f"{root}/w2"
    unickpt.save(source, {"w": reshard_expected()})
    results = run_distributed(2, load_at_world_2, source, target, env, timeout=120)
    for bytes_read, local_bytes in results:
        assert bytes_read == local_bytes, "each rank read only its own rows"
    assert len(unickpt.inspect(target).files) >= 2, "both ranks wrote data files"
    back = {"w": torch.zeros(RESHARD_SHAPE)}
    unickpt.load(target, back)
    assert torch.equal(back["w"], reshard_expected())


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[OutageProxy]:
    with contextlib.closing(OutageProxy(moto.port)) as proxy:
        yield proxy


def saved_through(
    endpoint: str, label: str, monkeypatch: pytest.MonkeyPatch, state: dict[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """``state`` (by default a small one) saved through ``endpoint`` (a proxy in front of
    moto), which the test's later calls go through too."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    path, state = f"{fresh(label)}/step_1", state or make_state(1, rows=64)
    unickpt.save(path, state, step=1)
    return path, state


def test_an_endpoint_ignoring_ranges_fails_loads_instead_of_misreading(
    env: dict[str, str], proxy: OutageProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, state = saved_through(proxy.endpoint, "ranges", monkeypatch)
    proxy.drop_request_header("Range")  # every GET now returns the whole object
    with pytest.raises(unickpt.StorageError, match=r"data/r00000-.*without a Content-Range"):
        unickpt.load(path, zeros_like_state(state))


@pytest.fixture
def faults(moto: MotoServer) -> Iterator[FaultProxy]:
    with contextlib.closing(FaultProxy(moto.port)) as faults:
        yield faults


DATA_FILE = r"/data/r\d{5}-"


def test_a_short_ranged_response_is_read_again_not_taken_for_a_truncated_file(
    env: dict[str, str], faults: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The object's size and ETag are known (HEAD), so fewer bytes than asked for is the
    # connection's fault: it was reported as a corrupt file, and restore went back a step.
    state = {"w": torch.randn(1024, 1024)}  # 4 MiB, one ranged GET
    path, _ = saved_through(faults.endpoint, "short", monkeypatch, state)
    faults.add("short", "GET", DATA_FILE)
    loaded = {"w": torch.zeros(1024, 1024)}
    unickpt.load(path, loaded)
    assert torch.equal(loaded["w"], state["w"])
    assert faults.count("GET", DATA_FILE) == 2, "one more GET: the rest of it"
    faults.add("short", "GET", DATA_FILE, times=2)  # a gateway capping responses: each
    loaded = {"w": torch.zeros(1024, 1024)}  # answer is read, the next GET asks for the rest
    unickpt.load(path, loaded)
    assert torch.equal(loaded["w"], state["w"])
    # Answers halving down to under 1 MiB: one that small is a failed read, tried again
    faults.add("short", "GET", DATA_FILE, times=-1)
    with pytest.raises(
        unickpt.StorageError,
        match=r"cannot read .*/data/r00000-.*answered \d+ of the \d+ bytes .*on every try",
    ):
        unickpt.load(path, {"w": torch.zeros(1024, 1024)})


def test_timeouts_are_retried_by_botocore_alone(
    env: dict[str, str], faults: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Transfer retries on top of botocore's multiplied the wait of an endpoint that never
    # answers: max_attempts x (transfer_retries + 1) x read_timeout, 20 minutes per GET by default.
    path, state = saved_through(faults.endpoint, "silent", monkeypatch)
    monkeypatch.setenv("UNICKPT_S3_READ_TIMEOUT", "0.5")
    monkeypatch.setenv("UNICKPT_S3_TRANSFER_RETRIES", "3")
    reads = faults.count("GET", DATA_FILE)
    faults.add("silent", "GET", DATA_FILE, times=-1)
    with pytest.raises(unickpt.StorageError, match=r"data/r00000-.* is unreachable or not respond"):
        unickpt.load(path, zeros_like_state(state))
    assert faults.count("GET", DATA_FILE) - reads == int(env["UNICKPT_S3_MAX_ATTEMPTS"])


def test_gc_aborts_the_uploads_of_a_failed_save_whose_aborts_failed_too(
    env: dict[str, str], faults: FaultProxy, raw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store refused parts and aborts, then came back for the marker's delete: the uploads
    # sat under a directory with no object, which no listing (so no gc) ever showed (audit O).
    monkeypatch.setenv("AWS_ENDPOINT_URL", faults.endpoint)
    root = fresh("orphans")
    faults.add("503", "PUT", r"uploadId=", times=-1)  # UploadPart
    faults.add("503", "DELETE", r"uploadId=", times=-1)  # AbortMultipartUpload
    with pytest.raises(unickpt.StorageError, match="SlowDown"):
        unickpt.save(f"{root}/step_2", make_state(2, rows=6000), step=2)  # ~24 MiB: multipart
    faults.clear()
    prefix = S3Storage(root).prefix
    assert len(pending_uploads(raw, f"{prefix}/step_2/data/")) == 1, "the abort went through"
    raw.create_multipart_upload(Bucket=BUCKET, Key=f"{prefix}/export/model.safetensors")
    assert S3Storage(root).children() == [], "nothing under the root shows in a listing"
    # (moto dates every upload 2010-11-10, so min_age cannot be shown to keep a young one here)
    entries = unickpt.collect_garbage(root, dry_run=True, min_age=0)
    assert [(e.name, e.removed) for e in entries] == [("step_2", False)]
    entries = unickpt.collect_garbage(root, min_age=0)
    assert [(e.name, e.removed, e.reason) for e in entries] == [
        ("step_2", True, "incomplete uploads only")
    ]
    assert pending_uploads(raw, prefix) == [f"{prefix}/export/model.safetensors"], (
        "gc takes a save's uploads only"
    )


def test_gc_leaves_the_uploads_of_a_save_started_after_its_listing(
    env: dict[str, str], raw: Any
) -> None:
    # gc listed the root, then a save began (marker, then data uploads): its uploads sat under
    # a directory gc had not listed, and gc aborted them (audit P).
    class ListedBeforeTheSave(S3Storage):
        def children(self) -> list[str]:
            return []

    root = fresh("live")
    storage = ListedBeforeTheSave(root)
    marker = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "now"})
    storage.put_atomic("step_5/_inflight.json", marker.encode())
    key = f"{storage.prefix}/step_5/data/r00000-000000000005-0.safetensors"
    raw.create_multipart_upload(Bucket=BUCKET, Key=key)
    assert unickpt.collect_garbage(storage, min_age=0) == []
    assert pending_uploads(raw, key) == [key], "a live save's upload was aborted"
    S3Storage(root).delete_prefix("step_5")


def test_a_retried_create_leaves_no_second_upload(
    env: dict[str, str], faults: FaultProxy, raw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first CreateMultipartUpload landed but was answered after read_timeout: botocore's
    # retry started a second upload, and the first stayed under the committed checkpoint.
    monkeypatch.setenv("AWS_ENDPOINT_URL", faults.endpoint)
    monkeypatch.setenv("UNICKPT_S3_READ_TIMEOUT", "3")
    faults.add("slow", "POST", r"\?uploads", delay=4)
    path = f"{fresh('twins')}/step_1"
    state = make_state(1, rows=3000)  # ~12 MiB: multipart
    unickpt.save(path, state, step=1)
    assert faults.count("POST", r"\?uploads") == 2, "the create was not retried"
    loaded = zeros_like_state(state)
    unickpt.load(path, loaded)
    assert_same(loaded, state)
    assert pending_uploads(raw, S3Storage(path).prefix) == []


def test_endpoint_outage_mid_upload(
    env: dict[str, str],
    moto: MotoServer,
    proxy: OutageProxy,
    raw: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The endpoint dies while a data file is being uploaded: the save fails with a clear
    StorageError, nothing of it becomes visible, the previous checkpoint still loads, and once
    the endpoint is back the same save succeeds."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # unickpt talks through the proxy
    root = fresh("outage")
    first, second = make_state(1, rows=64), make_state(2, rows=6000)  # ~24 MiB: 5 parts
    unickpt.save(f"{root}/step_1", first, step=1)

    proxy.cut_after(8 << 20)  # the server dies after the first part or so arrived
    started = time.monotonic()
    with pytest.raises(unickpt.StorageError) as failure:
        unickpt.save(f"{root}/step_2", second, step=2)
    elapsed = time.monotonic() - started
    assert proxy.tripped.is_set()
    message = str(failure.value)
    assert f"{root}/step_2" in message and "nothing was committed" in message
    assert f"S3 endpoint {proxy.endpoint} is unreachable" in message, message
    assert f"bucket '{BUCKET}'" in message
    assert elapsed < 30, f"failing took {elapsed:.1f}s"

    # Behind the dead endpoint, the server holds an incomplete upload nobody can see.
    direct = S3Storage(root, {"endpoint_url": moto.endpoint})
    prefix = f"{direct.prefix}/step_2/"
    assert pending_uploads(raw, prefix), "the cut did not land mid multipart upload"
    assert not direct.exists("step_2/manifest.json")
    assert not [name for name in direct.list("step_2") if name.endswith(".safetensors")]
    with pytest.raises(unickpt.IncompleteCheckpointError):
        unickpt.inspect(direct.child("step_2"))
    previous = zeros_like_state(first)
    unickpt.load(direct.child("step_1"), previous)
    assert_same(previous, first)

    proxy.restore()
    unickpt.save(f"{root}/step_2", second, step=2)
    loaded = zeros_like_state(second)
    unickpt.load(f"{root}/step_2", loaded)
    assert_same(loaded, second)
    unickpt.verify(f"{root}/step_2")
    for key in pending_uploads(raw, prefix):  # what a lifecycle rule would reap
        for upload in raw.list_multipart_uploads(Bucket=BUCKET, Prefix=key)["Uploads"]:
            raw.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload["UploadId"])


def test_unreachable_endpoint_fails_fast(env: dict[str, str]) -> None:
    port = free_port()  # nothing listens there
    storage: Storage = S3Storage(
        f"s3://{BUCKET}/x",
        {"endpoint_url": f"http://127.0.0.1:{port}", "connect_timeout": 1, "max_attempts": 2},
    )
    started = time.monotonic()
    pattern = rf"S3 endpoint http://127\.0\.0\.1:{port} is unreachable .*\(bucket '{BUCKET}'\)"
    with pytest.raises(unickpt.StorageError, match=pattern):
        unickpt.save(storage, {"w": torch.ones(3)})
    with pytest.raises(unickpt.StorageError, match=pattern):
        unickpt.load(storage, {"w": torch.zeros(3)})
    assert time.monotonic() - started < 10


def test_silent_endpoint_times_out(env: dict[str, str]) -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        storage = S3Storage(
            f"s3://{BUCKET}/x",
            {
                "endpoint_url": endpoint,
                "read_timeout": 0.5,
                "connect_timeout": 0.5,
                "max_attempts": 1,
            },
        )
        started = time.monotonic()
        with pytest.raises(unickpt.StorageError, match="is unreachable or not responding"):
            unickpt.inspect(storage)
        assert time.monotonic() - started < 10


def test_manager_on_s3_with_explicit_storage_options(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the endpoint in the environment, only the explicit options can reach the server.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    options = {
        "endpoint_url": env["AWS_ENDPOINT_URL"],
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
        "region_name": "us-east-1",
    }
    root = fresh("managed")
    manager = unickpt.CheckpointManager(
        root, every_n_steps=1, keep_last=2, mode="lazy", storage_options=options
    )
    states = [make_state(seed, rows=64) for seed in range(3)]
    for step, state in enumerate(states, start=1):
        manager.maybe_save(step, state)
    manager.close()
    assert [info.step for info in manager.list()] == [2, 3]
    loaded = zeros_like_state(states[-1])
    assert unickpt.CheckpointManager(root, storage_options=options).restore(loaded) == 3
    assert_same(loaded, states[-1])
    unickpt.verify(f"{root}/{unickpt.CheckpointManager.name_for(3)}", storage_options=options)


def test_restore_refuses_to_start_over_while_its_only_tier_is_unreachable(
    env: dict[str, str], proxy: OutageProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Returning None would restart training from scratch beside committed checkpoints.
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    root = fresh("restore-outage")
    manager = unickpt.CheckpointManager(root, every_n_steps=1, mode="sync")
    manager.maybe_save(1, make_state(1, rows=64))
    manager.close()
    proxy.cut()
    with pytest.raises(unickpt.StorageError, match=r"tier s3://\S+ cannot be listed now"):
        unickpt.CheckpointManager(root).restore(zeros_like_state(make_state(1, rows=64)))
    proxy.restore()
    assert unickpt.CheckpointManager(root).restore(zeros_like_state(make_state(1, rows=64))) == 1
