"""Load with resharding: intersect the boxes this rank needs with the stored chunks, read only
those byte ranges (straight into the target tensor when the run is contiguous there), in parallel.
"""

from __future__ import annotations

import json
import pickle
import reprlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from unickpt.engine.background import before_update
from unickpt.engine.buffers import byte_view, flat
from unickpt.engine.comm import Comm
from unickpt.engine.devices import DeviceWork
from unickpt.engine.interrupts import held_interrupts
from unickpt.errors import (
    CheckpointError,
    CorruptCheckpointError,
    StateMismatchError,
    UnsafeCheckpointError,
    error_vote,
    raise_first_failure,
)
from unickpt.format.checksum import checksum
from unickpt.format.dtypes import torch_dtype
from unickpt.format.manifest import (
    RESERVED_KEYS,
    Manifest,
    TensorMeta,
    deleted_while_read,
    read_manifest,
)
from unickpt.layout.box import Box
from unickpt.layout.sharded import LocalShard
from unickpt.layout.state import LoadView, MemoryView, collect_for_load, memory_view
from unickpt.plan.load_plan import ChunkRead, contiguous_destination, plan_target_reads
from unickpt.storage import Reader, Storage, open_storage
from unickpt.telemetry import PhaseTimer

READ_THREADS = 4
BATCH_READS = 256  # buffers per scatter read (IOV_MAX is 1024)
BATCH_BYTES = 32 * 1024 * 1024


@dataclass
class LoadResult:
    """What one rank's call to :func:`unickpt.load` did."""

    path: str
    step: int | None
    bytes_read: int
    bytes_needed: int
    seconds: float
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)


@held_interrupts()
def load(
    path: str | Storage,
    state: dict[str, Any],
    *,
    strict: bool = True,
    verify: bool = False,
    allow_pickle: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> LoadResult:
    """Fill ``state`` in place from the checkpoint at ``path``, resharding to ``state``'s layout.

    ``strict``: any missing or unexpected key, or dtype difference, raises StateMismatchError
    listing them all (shape differences always raise). ``verify``: check every chunk read against
    its checksum. Pickled entries are refused unless ``allow_pickle=True``.
    ``storage_options`` configure the backend of an ``s3://`` path.

    A collective under torch.distributed: before any rank writes into its state, the ranks
    agree that each can load and that all load the same checkpoint; one rank's failure raises
    on every rank. Reads go straight into ``state``: a load that fails after that agreement (a
    file deleted or damaged under it) leaves ``state`` partly filled from the checkpoint, not
    fit to train on; a checkpoint deleted while being read raises CheckpointNotFoundError.
    """
    comm = Comm()
    prepared: _PreparedLoad | None = None
    error: BaseException | None = None
    try:
        storage = open_storage(path, storage_options)
        prepared = _prepare(storage, state, strict=strict, verify=verify, allow_pickle=allow_pickle)
    except BaseException as exc:  # of any kind, told to the peers before raising: none hangs
        error = exc
    # Before any rank writes into its state: all can load, and they load the same checkpoint.
    _agree(comm, error, prepared)
    assert prepared is not None
    result: LoadResult | None = None
    try:
        result = _read(prepared)
    except BaseException as exc:
        error = deleted_while_read(prepared.storage, exc)
    _agree(comm, error, None)  # fail together, so no rank trains on with a half-loaded peer
    assert result is not None
    return result


def _agree(comm: Comm, error: BaseException | None, prepared: _PreparedLoad | None) -> None:
    """Raise, on every rank, the first rank's failure, or (``prepared``) that the ranks are
    loading different checkpoints: each would fill its part of the state from its own."""
    if comm.world_size == 1:
        if error is not None:
            raise error
        return
    mine = {
        **error_vote(error),
        "save": prepared.identity if prepared else "",
        "url": str(prepared.storage.url) if prepared else "",
    }
    votes = [json.loads(v) for v in comm.all_gather_bytes(json.dumps(mine).encode())]
    raise_first_failure(votes, error, "load")
    if prepared is not None and len({vote["save"] for vote in votes}) > 1:
        differ = [(r, v["url"]) for r, v in enumerate(votes) if v["save"] != mine["save"]]
        raise CheckpointError(
            f"ranks are loading different checkpoints: rank {comm.rank} {prepared.storage.url}, "
            f"rank {differ[0][0]} {differ[0][1]}; nothing was loaded. Every rank must load the "
            "same one (a manager's latest() lists this node's memory tier: restore() agrees)"
        )


def _drop_tied_aliases(view: LoadView, manifest: Manifest) -> None:
    """A tensor the state holds under two keys (tied embeddings) is filled through the key the
    checkpoint has; the other key is not missing (HF files often omit ``lm_head.weight``)."""
    stored = {
        memory_view(shard.local): key
        for key, shard in view.shards.items()
        if key in manifest.tensors
    }
    for key in [k for k in view.shards if k not in manifest.tensors]:
        if memory_view(view.shards[key].local) in stored:
            del view.shards[key]


def _untied_into_tied(view: LoadView, manifest: Manifest) -> list[str]:
    """Keys that are one tensor in the state (tied weights) but hold different values in the
    checkpoint (saved untied): loading both would keep whichever came last. Their chunks'
    checksums tell, when both keys were saved in the same boxes (as tied tensors are)."""
    tied: dict[MemoryView, list[str]] = {}
    for key, shard in view.shards.items():
        if key in manifest.tensors and shard.local.numel():
            tied.setdefault(memory_view(shard.local), []).append(key)
    problems = []
    for first, *others in (keys for keys in tied.values() if len(keys) > 1):
        chunks = _checksums(manifest.tensors[first])
        for other in others:
            theirs = _checksums(manifest.tensors[other])
            if chunks.keys() == theirs.keys() and chunks != theirs:
                problems.append(
                    f"  {first}, {other}: one tensor in the state (tied), but different values "
                    "in the checkpoint (saved untied): untie them in the state to load both"
                )
    return problems


def _checksums(meta: TensorMeta) -> dict[tuple[tuple[int, ...], tuple[int, ...]], str]:
    return {(c.offsets, c.sizes): c.xxh3 for c in meta.chunks}


def _check_keys(view: LoadView, manifest: Manifest, strict: bool) -> tuple[list[str], list[str]]:
    stored = set(manifest.tensors) | set(manifest.objects)
    wanted = set(view.shards) | set(view.objects)
    missing = sorted(wanted - stored)
    unexpected = sorted(stored - wanted)
    problems = []
    for key, shard in view.shards.items():
        meta = manifest.tensors.get(key)
        if meta is None:
            if key in manifest.objects:
                found = reprlib.repr(manifest.objects[key])
                problems.append(f"  {key}: expected a tensor, found an object ({found})")
            continue
        if meta.encoding != "raw":
            problems.append(f"  {key}: expected a tensor, found a pickled object")
        elif tuple(meta.shape) != shard.global_shape:
            problems.append(
                f"  {key}: shape: expected {list(shard.global_shape)}, found {list(meta.shape)}"
            )
        elif strict and torch_dtype(meta.dtype) != shard.local.dtype:
            problems.append(f"  {key}: dtype: expected {shard.local.dtype}, found {meta.dtype}")
    for key in view.objects:
        meta = manifest.tensors.get(key)
        if meta is not None and meta.encoding == "raw":
            problems.append(
                f"  {key}: expected an object, found a tensor of shape {list(meta.shape)}"
            )
    problems += _untied_into_tied(view, manifest)
    for key, check in view.checks.items():
        if key in manifest.objects:
            try:
                check(manifest.objects[key])
            except StateMismatchError as exc:
                problems.append(f"  {exc}")
    if strict:
        problems += [f"  {key}: missing from the checkpoint" for key in missing]
        problems += [
            f"  {key}: in the checkpoint but not in the state"
            for key in unexpected
            if key not in RESERVED_KEYS
        ]
    if problems:
        raise StateMismatchError(
            f"state does not match checkpoint ({len(problems)} problem(s)):\n" + "\n".join(problems)
        )
    return missing, unexpected


@dataclass
class _PreparedLoad:
    """A load checked against its checkpoint, nothing read yet."""

    storage: Storage
    manifest: Manifest
    view: LoadView
    missing: list[str]
    unexpected: list[str]
    pickled: set[str]
    verify: bool
    timer: PhaseTimer

    @property
    def identity(self) -> str:
        """The save this checkpoint holds (its data files are named by its save id; a save
        without data files has its time), the same for every copy of it (a manager's tiers)."""
        manifest = self.manifest
        mark = [sorted(manifest.files), manifest.created, manifest.step]
        return xxhash.xxh3_64_hexdigest(json.dumps(mark).encode())


def _prepare(
    storage: Storage, state: dict[str, Any], *, strict: bool, verify: bool, allow_pickle: bool
) -> _PreparedLoad:
    timer = PhaseTimer()
    with timer("manifest"):
        manifest = read_manifest(storage)
        raw = {
            k: (t.shape, torch_dtype(t.dtype))
            for k, t in manifest.tensors.items()
            if t.encoding == "raw"
        }
        pickled = {k for k, t in manifest.tensors.items() if t.encoding == "pickle"}
        with torch.no_grad():
            view = collect_for_load(state, raw, set(manifest.objects) | pickled)
        _drop_tied_aliases(view, manifest)
        missing, unexpected = _check_keys(view, manifest, strict)
        if not allow_pickle and (refused := sorted(pickled & set(view.objects))):
            raise UnsafeCheckpointError(
                f"entries {refused} hold pickled Python objects, which can run code when loaded; "
                "pass allow_pickle=True only if you trust this checkpoint"
            )
    return _PreparedLoad(storage, manifest, view, missing, unexpected, pickled, verify, timer)


def _read(prepared: _PreparedLoad) -> LoadResult:
    storage, manifest, view, verify, timer = (
        prepared.storage,
        prepared.manifest,
        prepared.view,
        prepared.verify,
        prepared.timer,
    )
    jobs: list[tuple[ChunkRead, LocalShard, TensorMeta]] = []
    needed = 0
    for key, shard in view.shards.items():
        meta = manifest.tensors.get(key)
        if meta is None:
            continue
        size = torch_dtype(meta.dtype).itemsize
        needed += shard.box.volume * size
        jobs += [
            (r, shard, meta) for r in plan_target_reads(shard.box, meta.chunks, size, whole=verify)
        ]

    with timer("read"), torch.no_grad():
        readers: dict[str, Reader] = {}
        try:
            # The reader threads overwrite tensors that work queued on the caller's streams
            # may still use, or that a lazy save has still to copy (its version check cannot
            # see writes into tensor memory).
            DeviceWork.record(s.local for s in view.shards.values()).wait()
            before_update()
            for name in sorted({job[0].chunk.file for job in jobs}):
                readers[name] = _open_checked(storage, manifest, name)
            jobs.sort(key=lambda j: (j[0].chunk.file, j[0].ranges[0][0]))
            batches = _batches(jobs, verify)
            with ThreadPoolExecutor(READ_THREADS) as pool:
                read_bytes = sum(
                    pool.map(lambda b: _execute_batch(b, readers, storage, verify), batches)
                )
        finally:
            for reader in readers.values():
                reader.close()

    with timer("objects"):
        for key, setter in view.objects.items():
            if key in manifest.objects:
                setter(manifest.objects[key])
            elif key in prepared.pickled:
                setter(_unpickle(storage, manifest.tensors[key]))
                read_bytes += manifest.tensors[key].nbytes
        for finalize in view.finalizers:
            finalize()
    return LoadResult(
        str(storage.url),
        manifest.step,
        read_bytes,
        needed,
        timer.total,
        prepared.missing,
        prepared.unexpected,
        timer.phases,
    )


Job = tuple[ChunkRead, LocalShard, TensorMeta]


def _open_checked(storage: Storage, manifest: Manifest, name: str) -> Reader:
    """Open a data file, refusing one whose size is not the manifest's."""
    reader = storage.open_reader(name)
    if reader.size() != manifest.files[name]:
        size = reader.size()
        reader.close()
        raise CorruptCheckpointError(
            f"data file {storage.describe(name)} has {size} bytes, "
            f"the manifest says {manifest.files[name]} (truncated or replaced)"
        )
    return reader


class CheckpointReader:
    """Whole tensors of one committed checkpoint, one at a time, in a single process.

    For tools that stream a checkpoint (export, merge, diff): memory is the tensor asked for,
    data files are opened once and kept open until :meth:`close`.
    """

    def __init__(
        self,
        path: str | Storage,
        *,
        verify: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.storage = open_storage(path, storage_options)
        self.manifest = read_manifest(self.storage)
        self.verify = verify
        self._readers: dict[str, Reader] = {}

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``key`` (into ``out`` if given: a CPU tensor of its shape and dtype)."""
        meta = self.manifest.tensors.get(key)
        if meta is None:
            raise StateMismatchError(f"tensor {key!r} is not in checkpoint {self.storage.url}")
        if meta.encoding != "raw":
            raise UnsafeCheckpointError(f"entry {key!r} is a pickled object, not a tensor")
        dtype = torch_dtype(meta.dtype)
        # Files first: their sizes, checked against the manifest, bound what a crafted shape
        # could make us allocate.
        for name in sorted({chunk.file for chunk in meta.chunks} - self._readers.keys()):
            self._readers[name] = _open_checked(self.storage, self.manifest, name)
        if out is None:
            out = torch.empty(meta.shape, dtype=dtype)
        elif tuple(out.shape) != meta.shape or out.dtype != dtype:
            raise StateMismatchError(
                f"{key}: expected {dtype} {list(meta.shape)}, got {out.dtype} {list(out.shape)}"
            )
        else:
            before_update()  # ``out`` may be state a lazy save has still to copy
        shard = LocalShard(out, meta.shape, Box.full(meta.shape))
        jobs: list[Job] = [
            (r, shard, meta)
            for r in plan_target_reads(shard.box, meta.chunks, dtype.itemsize, whole=self.verify)
        ]
        jobs.sort(key=lambda j: (j[0].chunk.file, j[0].ranges[0][0]))
        with torch.no_grad():
            for batch in _batches(jobs, self.verify):
                _execute_batch(batch, self._readers, self.storage, self.verify)
        return out

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _destination(job: Job, verify: bool) -> memoryview | None:
    """The target's own bytes for this read, when the read lands there unchanged."""
    read, shard, meta = job
    dtype = torch_dtype(meta.dtype)
    target = shard.local
    exact = len(read.ranges) == 1 and read.buffer_nbytes == read.inter.volume * dtype.itemsize
    if not exact or verify or target.dtype != dtype or target.device.type != "cpu":
        return None
    if not target.is_contiguous():
        return None
    start = contiguous_destination(shard.box.sizes, read.inter.relative_to(shard.box))
    if start is None:
        return None
    return byte_view(flat(target.detach())[start : start + read.inter.volume])


def _batches(jobs: list[Job], verify: bool) -> list[list[tuple[Job, memoryview | None]]]:
    """Group reads that are back to back in one file and land straight in their targets, so
    each group is one large scatter read instead of many small ones."""
    batches: list[list[tuple[Job, memoryview | None]]] = []
    end = -1
    batch_bytes = 0
    for job in jobs:
        destination = _destination(job, verify)
        offset, length = job[0].ranges[0]
        last = batches[-1] if batches else None
        if (
            destination is not None
            and last is not None
            and last[-1][1] is not None
            and last[-1][0][0].chunk.file == job[0].chunk.file
            and offset == end
            and len(last) < BATCH_READS
            and batch_bytes < BATCH_BYTES
        ):
            last.append((job, destination))
            batch_bytes += length
        else:
            batches.append([(job, destination)])
            batch_bytes = length
        end = offset + length
    return batches


def _execute_batch(
    batch: list[tuple[Job, memoryview | None]],
    readers: dict[str, Reader],
    storage: Storage,
    verify: bool,
) -> int:
    (first, destination), *_ = batch
    if destination is not None:  # the bytes land straight in the targets' memory
        buffers = [d for _, d in batch if d is not None]
        readers[first[0].chunk.file].read_into_many(first[0].ranges[0][0], buffers)
        return sum(b.nbytes for b in buffers)
    return _execute(first, readers, storage, verify)


def _execute(job: Job, readers: dict[str, Reader], storage: Storage, verify: bool) -> int:
    """Read into a scratch buffer, check it if asked, and copy the needed box into place."""
    read, shard, meta = job
    reader = readers[read.chunk.file]
    dtype = torch_dtype(meta.dtype)
    target = shard.local
    inter = read.inter.relative_to(shard.box)
    buffer = torch.empty(read.buffer_nbytes, dtype=torch.uint8)
    view = byte_view(buffer)
    position = 0
    for offset, length in read.ranges:
        reader.read_into(offset, view[position : position + length])
        position += length
    if verify and checksum(view) != read.chunk.xxh3:
        raise CorruptCheckpointError(
            f"checksum mismatch in tensor {_key_of(read)!r} chunk {read.chunk.box} "
            f"(file {storage.describe(read.chunk.file)}, bytes [{read.chunk.offset}, "
            f"{read.chunk.offset + read.chunk.nbytes}))"
        )
    source = buffer.view(dtype).as_strided(read.inter.sizes, read.strides, read.offset)
    target[inter.slices()].copy_(source)
    return read.buffer_nbytes


def _key_of(read: ChunkRead) -> str:
    return read.chunk.key.rpartition("@")[0]


def _unpickle(storage: Storage, meta: TensorMeta) -> Any:
    chunk = meta.chunks[0]
    with storage.open_reader(chunk.file) as reader:
        blob = reader.read(chunk.offset, chunk.nbytes)
    if checksum(blob) != chunk.xxh3:
        raise CorruptCheckpointError(f"checksum mismatch in pickled entry {chunk.key!r}")
    return pickle.loads(blob)


__all__ = ["CheckpointReader", "LoadResult", "load"]
