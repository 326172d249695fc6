"""Synchronous distributed save: plan, stream each rank's shards, commit the manifest last.

Protocol (every rank): (1) flatten the local state and exchange a layout digest (with rank 0's
save id and any local error) — the only collective before writing when the plan is cached;
(2) write this rank's assigned boxes into one safetensors file, fsynced; (3) exchange the chunk
records; rank 0 validates the tiling and atomically publishes manifest.json; (4) rank 0
broadcasts the outcome so that every rank returns or raises together.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import pickle
import socket
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
import xxhash

from unickpt.engine import background
from unickpt.engine.buffers import tensor_bytes
from unickpt.engine.comm import Comm
from unickpt.engine.result import SaveResult
from unickpt.errors import CheckpointError, CheckpointExistsError, StorageError
from unickpt.format.checksum import Checksummer
from unickpt.format.dtypes import dtype_name, itemsize
from unickpt.format.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INFLIGHT,
    MANIFEST,
    Chunk,
    Manifest,
    TensorMeta,
    commit_manifest,
)
from unickpt.format.safetensors_file import FileEntry, encode_header
from unickpt.layout.box import Box
from unickpt.layout.sharded import LocalShard
from unickpt.layout.state import SaveView, collect_for_save
from unickpt.plan.save_plan import PlanCache, SavePlan, ShardMeta, build_save_plan, layout_digest
from unickpt.storage import LocalStorage, Storage, Writer, open_storage
from unickpt.telemetry import PhaseTimer

_PLANS = PlanCache()
DATA_DIR = "data"
WRITE_STREAMS = 2  # concurrent files per rank: disks here sustain ~1.5-2x more with two
STREAM_MIN_BYTES = 64 * 1024 * 1024  # below this, a second stream is only another file
# Local files get write() calls of this size. On the VMs measured (Linux 6.18, ext4), larger
# calls made the page cache allocate large folios out of whole free pageblocks, which the
# balloon's free-page reporting had handed back to the host, so every page faulted in from the
# host again: 3.9 CPU-s per GB written with 4 MiB calls vs 0.34 with 256 KiB ones (same
# process, interleaved). Smaller calls cost no more anywhere else. Other backends get whole
# chunks (S3 sends a large write as a part without copying it).
LOCAL_WRITE_BYTES = 256 * 1024


def shard_key(key: str, box: Box) -> str:
    """A chunk's name in its data file's safetensors header (docs/FORMAT.md §3)."""
    return f"{key}@{','.join(map(str, box.offsets))}"


def _local_slice(shard: LocalShard, box: Box) -> torch.Tensor:
    return shard.local[box.relative_to(shard.box).slices()]


def _write_file(
    storage: Storage, file: str, writes: list[tuple[str, Box]], view: SaveView, plan: SavePlan
) -> tuple[int, list[dict[str, Any]]]:
    """Stream this rank's boxes into one safetensors file; returns its size and chunk records."""
    entries = []
    for key, box in writes:
        dtype = plan.tensors[key][0]
        entries.append(
            FileEntry(shard_key(key, box), dtype, box.sizes, box.volume * itemsize(dtype))
        )
    header, offsets = encode_header(
        entries, {"format": FORMAT_NAME, "version": str(FORMAT_VERSION)}
    )
    records = []
    piece = LOCAL_WRITE_BYTES if isinstance(storage, LocalStorage) else None
    with storage.open_writer(file) as writer:
        writer.write(header)
        for (key, box), entry, offset in zip(writes, entries, offsets, strict=True):
            data = tensor_bytes(_local_slice(view.shards[key], box))
            records.append(
                {
                    "key": key,
                    "offsets": list(box.offsets),
                    "sizes": list(box.sizes),
                    "file": file,
                    "st_key": entry.name,
                    "offset": offset,
                    "nbytes": entry.nbytes,
                    "xxh3": _write_chunk(writer, data, piece or data.nbytes),
                }
            )
    return offsets[-1] + entries[-1].nbytes if entries else len(header), records


def _write_chunk(writer: Writer, data: memoryview, piece: int) -> str:
    """Write ``data`` in pieces of ``piece`` bytes, each checksummed just before it is written
    (while it is in cache: one pass over memory, not two); returns the chunk's checksum."""
    digest = Checksummer()
    for start in range(0, data.nbytes, max(piece, 1)):
        block = data[start : start + piece]
        digest.update(block)
        writer.write(block)
    return digest.hexdigest()


def _streams(writes: list[tuple[str, Box]], plan: SavePlan) -> list[list[tuple[str, Box]]]:
    """This rank's boxes dealt into files of near-equal size (largest first): as many as
    WRITE_STREAMS, each carrying at least STREAM_MIN_BYTES."""
    size = {key: itemsize(dtype) for key, (dtype, _) in plan.tensors.items()}
    total = sum(box.volume * size[key] for key, box in writes)
    count = max(1, min(WRITE_STREAMS, total // STREAM_MIN_BYTES))
    streams: list[list[tuple[str, Box]]] = [[] for _ in range(count)]
    load = [0] * count
    for key, box in sorted(writes, key=lambda w: -w[1].volume * size[w[0]]):
        lightest = load.index(min(load))
        streams[lightest].append((key, box))
        load[lightest] += box.volume * size[key]
    return [sorted(s, key=lambda w: (w[0], w[1].offsets)) for s in streams if s]


def _write_streams(
    storage: Storage, rank: int, uid: str, plan: SavePlan, view: SaveView
) -> dict[str, Any]:
    """Write this rank's boxes as concurrent file streams."""
    report: dict[str, Any] = {"files": {}, "chunks": [], "error": None}
    streams = _streams(plan.writes[rank], plan)

    def write(index: int) -> tuple[str, int, list[dict[str, Any]]]:
        file = f"{DATA_DIR}/r{rank:05d}-{uid}-{index}.safetensors"
        try:
            return (file, *_write_file(storage, file, streams[index], view, plan))
        except Exception as exc:
            raise StorageError(
                f"rank {rank} writing {storage.describe(file)}: {type(exc).__name__}: {exc}"
            ) from exc

    with ThreadPoolExecutor(max(1, len(streams))) as pool:
        futures = [pool.submit(write, i) for i in range(len(streams))]
        for future in futures:
            try:
                file, size, chunks = future.result()
            except StorageError as exc:
                report["error"] = str(exc)
                continue
            report["files"][file] = size
            report["chunks"] += chunks
    return report


def _add_opaque(view: SaveView) -> None:
    """Pickle opted-in opaque objects into uint8 tensors (rank 0 only: they are not sharded)."""
    for key, value in view.opaque.items():
        blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        tensor = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        view.shards[key] = LocalShard(tensor, (len(blob),), Box.full((len(blob),)))


def _writer_layout(view: SaveView, world_size: int) -> dict[str, Any]:
    meshes = []
    for shard in view.shards.values():
        if shard.mesh is not None and shard.mesh not in meshes:
            meshes.append(shard.mesh)
    return {
        "world_size": world_size,
        "meshes": meshes,
        "torch": torch.__version__,
        "host": socket.gethostname(),
    }


@dataclass
class PreparedSave:
    """The caller-side half of a save: the flattened state and what the peers must be told.

    Preparing never raises: a local error is carried to the first collective, so that every
    rank learns of it and raises together instead of leaving peers blocked.
    """

    storage: Storage
    view: SaveView
    metas: list[ShardMeta]
    digest: str
    error: Exception | None
    step: int | None
    user_metadata: dict[str, Any] | None
    timer: PhaseTimer


def prepare_save(
    path: str | Storage,
    state: dict[str, Any],
    *,
    rank: int,
    step: int | None,
    user_metadata: dict[str, Any] | None,
    allow_pickle: bool,
    storage_options: Mapping[str, Any] | None = None,
) -> PreparedSave:
    timer = PhaseTimer()
    storage = open_storage(path, storage_options)
    error: Exception | None = None
    view = SaveView()
    metas: list[ShardMeta] = []
    digest = ""
    with timer("collect"):
        try:
            with torch.no_grad():
                view = collect_for_save(state, allow_pickle=allow_pickle)
            if rank == 0:
                _add_opaque(view)
            metas = [
                ShardMeta(key, dtype_name(s.local.dtype, key=key), s.global_shape, s.box)
                for key, s in view.shards.items()
            ]
            if storage.exists(MANIFEST):
                raise CheckpointExistsError(
                    f"{storage.url} already holds a committed checkpoint; save to a new path"
                )
            if rank == 0:
                mark_inflight(storage)
            digest = layout_digest(metas)
        except Exception as exc:
            error = exc
    return PreparedSave(storage, view, metas, digest, error, step, user_metadata, timer)


def finish_save(prepared: PreparedSave, comm: Comm) -> SaveResult:
    """Plan, write and commit a prepared save (in any thread, over ``comm``'s process group)."""
    try:
        return _plan_write_commit(prepared, comm)
    except BaseException:
        if comm.rank == 0 and prepared.error is None:  # the save is over: gc may take its debris
            with contextlib.suppress(Exception):
                prepared.storage.delete(INFLIGHT)
        raise


SaveMode = Literal["sync", "async", "lazy"]


@overload
def save(
    path: str | Storage,
    state: dict[str, Any],
    *,
    mode: Literal["sync"] = ...,
    step: int | None = ...,
    user_metadata: dict[str, Any] | None = ...,
    allow_pickle: bool = ...,
    if_busy: background.BusyPolicy = ...,
    storage_options: Mapping[str, Any] | None = ...,
) -> SaveResult: ...


@overload
def save(
    path: str | Storage,
    state: dict[str, Any],
    *,
    mode: Literal["async", "lazy"],
    step: int | None = ...,
    user_metadata: dict[str, Any] | None = ...,
    allow_pickle: bool = ...,
    if_busy: background.BusyPolicy = ...,
    storage_options: Mapping[str, Any] | None = ...,
) -> background.SaveHandle: ...


def save(
    path: str | Storage,
    state: dict[str, Any],
    *,
    mode: SaveMode = "sync",
    step: int | None = None,
    user_metadata: dict[str, Any] | None = None,
    allow_pickle: bool = False,
    if_busy: background.BusyPolicy = "wait",
    storage_options: Mapping[str, Any] | None = None,
) -> SaveResult | background.SaveHandle:
    """Save ``state`` (every rank calls this with its own shards) as one committed checkpoint.

    Leaves may be tensors, DTensors, :class:`ShardedTensor`s, objects with ``state_dict()``
    (modules, optimizers, schedulers) or JSON values; anything else needs ``allow_pickle=True``.
    ``path`` must not hold a committed checkpoint already.

    ``mode="sync"`` returns a :class:`SaveResult` once committed. ``"async"`` copies the state
    into a reused host buffer pool, then returns a :class:`SaveHandle` while writing and commit
    go on in the background. ``"lazy"`` returns at once and makes that copy in the background
    too, overlapping the caller's next forward/backward; optimizers in ``state`` get a step
    pre-hook that blocks until the copy is done (call :func:`before_update` before any other
    in-place update). One save is in flight per process: ``if_busy`` says whether a new one
    waits for it or is skipped (every rank makes the same choice; it is logged).
    ``storage_options`` configure the backend of an ``s3://`` path (endpoint, credentials, ...).
    """
    comm = Comm()
    if not background.admit(if_busy, comm):
        return background.SaveHandle.skipped_save(str(path))
    prepared = prepare_save(
        path,
        state,
        rank=comm.rank,
        step=step,
        user_metadata=user_metadata,
        allow_pickle=allow_pickle,
        storage_options=storage_options,
    )
    if mode == "sync":
        return finish_save(prepared, comm)
    if mode not in ("async", "lazy"):
        raise ValueError(f"mode must be 'sync', 'async' or 'lazy', not {mode!r}")

    def stage() -> None:
        with prepared.timer("stage"):
            prepared.view = background.POOL.stage(prepared.view)

    return background.start(
        prepared.storage.url,
        stage,
        lambda: finish_save(prepared, background.checkpoint_comm()),
        lazy=mode == "lazy",
        state=state,
    )


def mark_inflight(storage: Storage) -> None:
    """Create the checkpoint directory and its in-flight marker (docs/FORMAT.md §6)."""
    storage.ensure_root()
    marker = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    storage.put_atomic(INFLIGHT, json.dumps(marker).encode())


def _plan_write_commit(prepared: PreparedSave, comm: Comm) -> SaveResult:
    storage, timer, view, metas = prepared.storage, prepared.timer, prepared.view, prepared.metas
    digest, local_error = prepared.digest, prepared.error
    step, user_metadata = prepared.step, prepared.user_metadata
    with timer("plan"):
        hello = {
            "digest": digest,
            "uid": uuid.uuid4().hex[:12],
            "error": None
            if local_error is None
            else f"{type(local_error).__name__}: {local_error}",
        }
        replies = [json.loads(r) for r in comm.all_gather_bytes(json.dumps(hello).encode())]
        _raise_first_failure(replies, local_error, "save")
        uid = replies[0]["uid"]
        global_digest = xxhash.xxh3_128_hexdigest("|".join(r["digest"] for r in replies).encode())
        plan = _PLANS.get(global_digest)
        cache_hit = plan is not None
        if plan is None:
            gathered = comm.all_gather_bytes(json.dumps([m.to_json() for m in metas]).encode())
            per_rank = [[ShardMeta.from_json(m) for m in json.loads(g)] for g in gathered]
            plan = build_save_plan(per_rank)
            _PLANS.put(global_digest, plan)

    with timer("write"):
        report = _write_streams(storage, comm.rank, uid, plan, view)

    with timer("commit"):
        reports = [json.loads(r) for r in comm.all_gather_bytes(json.dumps(report).encode())]
        outcome = ""
        if comm.rank == 0:
            try:
                failures = [r["error"] for r in reports if r["error"]]
                if failures:
                    raise StorageError("; ".join(failures))
                manifest = _build_manifest(
                    reports, plan, view, step, user_metadata, comm.world_size
                )
                commit_manifest(storage, manifest)
            except Exception as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            else:
                with contextlib.suppress(Exception):  # committed; leftovers are only clutter
                    tidy(storage, manifest)
        outcome = comm.broadcast_bytes(outcome.encode()).decode()
        if outcome:
            raise StorageError(f"save to {storage.url} failed, nothing was committed: {outcome}")
    written = sum(report["files"].values())
    return SaveResult(str(storage.url), step, written, timer.total, cache_hit, timer.phases)


def _raise_first_failure(
    replies: list[dict[str, Any]], local_error: Exception | None, what: str
) -> None:
    if local_error is not None:
        raise local_error
    for rank, reply in enumerate(replies):
        if reply["error"]:
            raise CheckpointError(f"{what} aborted: rank {rank} failed: {reply['error']}")


def _build_manifest(
    reports: list[dict[str, Any]],
    plan: SavePlan,
    view: SaveView,
    step: int | None,
    user_metadata: dict[str, Any] | None,
    world_size: int,
) -> Manifest:
    chunks: dict[str, list[Chunk]] = {key: [] for key in plan.tensors}
    files: dict[str, int] = {}
    for report in reports:
        files.update(report["files"])
        for c in report["chunks"]:
            chunks[c["key"]].append(
                Chunk(
                    tuple(c["offsets"]),
                    tuple(c["sizes"]),
                    c["file"],
                    c["st_key"],
                    c["offset"],
                    c["nbytes"],
                    c["xxh3"],
                )
            )
    tensors = {
        key: TensorMeta(
            dtype,
            shape,
            sorted(chunks[key], key=lambda c: c.offsets),
            "pickle" if key in view.opaque else "raw",
        )
        for key, (dtype, shape) in sorted(plan.tensors.items())
    }
    manifest = Manifest(
        tensors=tensors,
        objects=view.objects,
        files=files,
        step=step,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(),
        writer=_writer_layout(view, world_size),
        user_metadata=dict(user_metadata or {}),
    )
    # Round-trip through the validating parser: a manifest we could not load is never committed.
    return Manifest.from_json(manifest.to_json(), where="(about to commit)")


def tidy(storage: Storage, manifest: Manifest) -> None:
    """Drop everything the manifest does not reference: the in-flight marker, and whatever a
    crashed earlier save to this path left behind (data files, temporary files)."""
    for name in storage.list():
        if name != MANIFEST and name not in manifest.files:
            storage.delete(name)
