"""Distributed save: plan, write each rank's shards, commit the manifest last.

Protocol (every rank): (1) flatten the local state and exchange a layout digest (with rank 0's
save id and any local error) — the only collective before writing when the plan is cached;
(2) write this rank's assigned boxes into its data files (engine/datafile.py), fsynced;
(3) exchange the chunk records; rank 0 validates the tiling and atomically publishes
manifest.json; (4) rank 0 broadcasts the outcome so that every rank returns or raises together.
Background saves (async, lazy) run (1) and stage the data files' bytes into the reused pool
before the state may change, then (2)-(4) on a background thread.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import pickle
import socket
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
import xxhash

from unickpt.engine import background
from unickpt.engine.comm import Comm
from unickpt.engine.datafile import (
    FileLayout,
    check_target,
    file_layouts,
    stage_file,
    stream_file,
    write_image,
)
from unickpt.engine.devices import DeviceWork
from unickpt.engine.interrupts import held_interrupts
from unickpt.engine.result import SaveResult
from unickpt.errors import (
    CheckpointError,
    CheckpointExistsError,
    InvalidStateError,
    StateChangedError,
    StorageError,
    error_class,
    error_vote,
    first_few,
    raise_first_failure,
)
from unickpt.format.dtypes import dtype_name
from unickpt.format.manifest import (
    INFLIGHT,
    MAX_DIMS,
    Chunk,
    Manifest,
    TensorMeta,
    commit_manifest,
    written_by_a_save,
)
from unickpt.layout.box import Box
from unickpt.layout.sharded import LocalShard
from unickpt.layout.state import SaveView, collect_for_save, plain_step, plain_user_metadata
from unickpt.plan.save_plan import PlanCache, SavePlan, ShardMeta, build_save_plan, layout_digest
from unickpt.storage import RateLimit, Storage, as_rate_limit, open_storage, rate_limited
from unickpt.telemetry import PhaseTimer

_PLANS = PlanCache()
log = logging.getLogger("unickpt")


@dataclass
class _Planned:
    """A save after its first collective: the save id, the plan, and this rank's files (with
    their data images, once a background save has staged them, or the error staging raised:
    it is carried to the commit, the next collective, so that every rank fails together)."""

    uid: str
    plan: SavePlan
    cache_hit: bool
    layouts: list[FileLayout]
    objects: list[str]  # the non-tensor entries this rank reports for the manifest
    images: list[torch.Tensor] | None = None
    error: BaseException | None = None


def _write_files(prepared: PreparedSave, rank: int, planned: _Planned) -> dict[str, Any]:
    """Write this rank's files as concurrent streams; failures are reported, not raised."""
    storage, view = prepared.storage, prepared.view
    report: dict[str, Any] = {
        "files": {},
        "chunks": [],
        "error": None,
        "writing": True,
        "objects": {key: view.objects[key] for key in planned.objects},
    }

    def write(index: int) -> tuple[str, int, list[dict[str, Any]]]:
        layout = planned.layouts[index]
        file = layout.name(rank, planned.uid)
        try:
            with rate_limited(storage.open_writer(file), prepared.write_limit) as writer:
                if planned.images is None:
                    checksums = stream_file(writer, layout, view, storage)
                else:
                    checksums = write_image(writer, layout, planned.images[index])
        except BaseException as exc:  # reported to the peers at the commit, never raised here
            raise StorageError(
                f"rank {rank} writing {storage.describe(file)}: {type(exc).__name__}: {exc}"
            ) from exc
        return file, layout.size, layout.records(file, checksums)

    with ThreadPoolExecutor(max(1, len(planned.layouts))) as pool:
        futures = [pool.submit(write, i) for i in range(len(planned.layouts))]
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
class _Collected:
    """The flattened local state and what the peers must be told about it.

    Collecting never raises: a local error, of any kind (a ``SystemExit`` from a Stateful's
    ``state_dict()`` too), is carried to the first collective, so that every rank learns of it
    and raises together instead of leaving peers blocked.
    """

    view: SaveView
    metas: list[ShardMeta]
    digest: str
    error: BaseException | None
    timer: PhaseTimer
    device_work: DeviceWork  # what the caller queued on its GPUs before the save
    versions: dict[str, int]  # lazy saves: each tensor's version counter at the call


def _collect(
    state: dict[str, Any], *, rank: int, allow_pickle: bool, lazy: bool = False
) -> _Collected:
    timer = PhaseTimer()
    error: BaseException | None = None
    view = SaveView()
    metas: list[ShardMeta] = []
    digest = ""
    device_work = DeviceWork([])
    versions: dict[str, int] = {}
    with timer("collect"):
        try:
            with torch.no_grad():
                view = collect_for_save(state, allow_pickle=allow_pickle, snapshot_buffers=lazy)
            if rank == 0:
                _add_opaque(view)
            for key, shard in view.shards.items():
                if len(shard.global_shape) > MAX_DIMS:
                    raise InvalidStateError(
                        f"tensor {key!r} has {len(shard.global_shape)} dimensions; a "
                        f"checkpoint holds at most {MAX_DIMS} (numpy's limit): reshape it"
                    )
            metas = [
                ShardMeta(
                    key,
                    dtype_name(s.local.dtype, key=key),
                    s.global_shape,
                    s.box,
                    buffer=key in view.buffers,
                )
                for key, s in view.shards.items()
            ]
            digest = layout_digest(metas)
            device_work = DeviceWork.record(s.local for s in view.shards.values())
            if lazy:  # inference tensors have no version counter (nor autograd to need one)
                versions = {
                    key: s.local._version
                    for key, s in view.shards.items()
                    if not s.local.is_inference()
                }
        except BaseException as exc:
            error = exc
    return _Collected(view, metas, digest, error, timer, device_work, versions)


def _check_unchanged(prepared: PreparedSave) -> None:
    """Refuse a lazy save whose state was updated in place before its copy was complete.

    Every in-place op through a tensor, or a view of it, bumps the tensor's version counter
    (autograd relies on it), so this catches most in-place updates that did not wait for
    :func:`before_update`: a safety net, not a guarantee. Kernels that update their inputs
    behind autograd's back (batch_norm's running statistics: hence the buffer snapshots; fused
    optimizer kernels), writes through ``.data`` or a ``.numpy()`` view, and collectives into a
    state tensor go unseen, and so does an update still running when the copy ends (the counter
    moves when its kernel returns).
    """
    changed = [
        key
        for key, version in prepared.versions.items()
        if prepared.view.shards[key].local._version != version
    ]
    if changed:
        raise StateChangedError(
            f"lazy save to {prepared.url}: {first_few(changed)} changed in "
            "place before the save had copied the state, so the copy would mix two states; "
            "nothing was committed. Nothing may update the state of a lazy save until "
            "unickpt.before_update() returns: every optimizer's step calls it from a step "
            "pre-hook; call it yourself before any other in-place update, or save with "
            "mode='async'"
        )


@dataclass
class PreparedSave(_Collected):
    """The caller-side half of a save: the collected state and where and how it goes."""

    opened: Storage | None  # None if opening it failed: ``error`` says why
    url: str
    step: int | None
    user_metadata: dict[str, Any] | None
    write_limit: RateLimit | None

    def let_go(self) -> None:
        """Drop the references to the saved state: a failed background save's handle keeps its
        error, whose traceback keeps these frames' functions, whose closures keep this."""
        self.view = SaveView()
        self.versions = {}

    @property
    def storage(self) -> Storage:
        """The storage saved to; used only once the first collective found no rank failing."""
        if self.opened is None:
            raise CheckpointError(f"save to {self.url}: the storage was never opened")
        return self.opened


def prepare_save(
    path: str | Storage,
    state: dict[str, Any],
    *,
    rank: int,
    step: int | None,
    user_metadata: dict[str, Any] | None,
    allow_pickle: bool,
    storage_options: Mapping[str, Any] | None = None,
    write_limit: RateLimit | None = None,
    lazy: bool = False,
) -> PreparedSave:
    opened: Storage | None = None
    failed_to_open: BaseException | None = None
    url = path.url if isinstance(path, Storage) else str(path)
    try:  # a bad path or storage option on one rank: carried to the first collective too
        opened = open_storage(path, storage_options)
        url = opened.url
    except BaseException as exc:
        failed_to_open = exc
    collected = _collect(state, rank=rank, allow_pickle=allow_pickle, lazy=lazy)
    collected.error = failed_to_open or collected.error
    try:  # an error is carried to the first collective, like the state's own
        if step is not None:
            step = plain_step(step)
        user_metadata = plain_user_metadata(user_metadata)
    except InvalidStateError as exc:
        collected.error = collected.error or exc
        step, user_metadata = None, {}  # the error goes to the first collective, not these
    return PreparedSave(
        **vars(collected),
        opened=opened,
        url=url,
        step=step,
        user_metadata=user_metadata,
        write_limit=write_limit,
    )


def _claim(prepared: PreparedSave, rank: int) -> None:
    """Refuse a path holding a committed checkpoint; rank 0 marks the save in flight. Storage
    I/O, so a lazy save does it in the background. A failure is kept for the first collective,
    like any local error."""
    if prepared.error is not None:
        return
    with prepared.timer("claim"):
        try:
            check_target(prepared.storage)
            if rank == 0:
                mark_inflight(prepared.storage)
        except BaseException as exc:
            prepared.error = exc


@contextlib.contextmanager
def _abandon_on_failure(prepared: PreparedSave, comm: Comm) -> Iterator[None]:
    """On any failure, leave the save to gc: drop its in-flight marker (rank 0), re-raise."""
    try:
        yield
    except BaseException:
        if comm.rank == 0 and prepared.error is None:
            with contextlib.suppress(Exception):
                prepared.storage.delete(INFLIGHT)
        raise


@contextlib.contextmanager
def _let_go_on_failure(prepared: PreparedSave) -> Iterator[None]:
    """A background save that fails before its last step lets go of its state too."""
    try:
        yield
    except BaseException:
        prepared.let_go()
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
    if_busy: Literal["wait"] = ...,
    storage_options: Mapping[str, Any] | None = ...,
    max_write_rate: float | RateLimit | None = ...,
) -> SaveResult: ...


@overload
def save(
    path: str | Storage,
    state: dict[str, Any],
    *,
    mode: Literal["sync"] = ...,
    step: int | None = ...,
    user_metadata: dict[str, Any] | None = ...,
    allow_pickle: bool = ...,
    if_busy: background.BusyPolicy,
    storage_options: Mapping[str, Any] | None = ...,
    max_write_rate: float | RateLimit | None = ...,
) -> SaveResult | background.SaveHandle: ...


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
    max_write_rate: float | RateLimit | None = ...,
) -> background.SaveHandle: ...


@held_interrupts()
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
    max_write_rate: float | RateLimit | None = None,
) -> SaveResult | background.SaveHandle:
    """Save ``state`` (every rank calls this with its own shards) as one committed checkpoint.

    Leaves may be tensors, DTensors, :class:`ShardedTensor`s, objects with ``state_dict()``
    (modules, optimizers, schedulers) or JSON values; anything else needs ``allow_pickle=True``.
    ``path`` must not hold a committed checkpoint already. JSON values and ``user_metadata``
    are recorded as rank 0 passes them; other ranks' are not compared.

    ``mode="sync"`` returns a :class:`SaveResult` once committed. ``"async"`` copies the state
    into a reused host buffer pool, then returns a :class:`SaveHandle` while writing and commit
    go on in the background. ``"lazy"`` returns at once and makes that copy in the background
    too, overlapping the caller's next forward/backward; every optimizer's step waits for the
    copy in a step pre-hook, and any other in-place update of the state must call
    :func:`before_update` first. The buffers of modules in ``state``, which forward passes may
    update (BatchNorm's running statistics), are copied at the call instead. As a safety net, a
    lazy save whose tensors' version counters moved before its copy was done fails with
    :class:`StateChangedError` (nothing is committed) rather than saving a mix of two states;
    it misses writes that bump no counter (through ``.data`` or ``.numpy()``, collectives such
    as ``dist.all_reduce`` into a state tensor, fused optimizer kernels called directly) and an
    update still running when the copy ends. One save is in flight per process: ``if_busy``
    says whether a new one waits for it or is skipped (every rank makes the same choice; it is
    logged); a skipped save, a sync one too, returns a :class:`SaveHandle` whose ``skipped``
    is True.
    Background saves need the process group until they finish: ``wait()`` on the handle before
    ``dist.destroy_process_group()``.
    ``storage_options`` configure the backend of an ``s3://`` path (endpoint, credentials, ...).
    ``max_write_rate`` caps the bytes per second this process writes for the save (pass one
    :class:`~unickpt.storage.RateLimit` to several operations to cap them together), for
    storage or networks shared with other traffic; the save commits later for it.
    """
    if mode not in ("sync", "async", "lazy"):
        raise ValueError(f"mode must be 'sync', 'async' or 'lazy', not {mode!r}")
    if if_busy not in ("wait", "skip"):
        raise ValueError(f"if_busy must be 'wait' or 'skip', not {if_busy!r}")
    with background.one_caller():  # threads of one process take turns: the pool is one
        return _save(
            path,
            state,
            mode=mode,
            step=step,
            user_metadata=user_metadata,
            allow_pickle=allow_pickle,
            if_busy=if_busy,
            storage_options=storage_options,
            write_limit=as_rate_limit(max_write_rate),
        )


def _save(
    path: str | Storage,
    state: dict[str, Any],
    *,
    mode: SaveMode,
    step: int | None,
    user_metadata: dict[str, Any] | None,
    allow_pickle: bool,
    if_busy: background.BusyPolicy,
    storage_options: Mapping[str, Any] | None,
    write_limit: RateLimit | None,
) -> SaveResult | background.SaveHandle:
    comm = Comm()
    if not background.admit(if_busy, comm):
        return background.SaveHandle.skipped_save(path.url if isinstance(path, Storage) else path)
    prepared = prepare_save(
        path,
        state,
        rank=comm.rank,
        step=step,
        user_metadata=user_metadata,
        allow_pickle=allow_pickle,
        storage_options=storage_options,
        write_limit=write_limit,
        lazy=mode == "lazy",
    )
    if mode == "sync":
        _claim(prepared, comm.rank)
        with _abandon_on_failure(prepared, comm):
            planned = _plan(prepared, comm)
            prepared.device_work.wait()  # before the writer threads read the live tensors
            return _commit(prepared, planned, _write(prepared, planned, comm), comm)
    staged: list[_Planned] = []  # filled by stage(), read by finish()
    interrupts: list[BaseException] = []  # in an async copy (a second Ctrl-C): the caller's

    def stage(comm: Comm) -> None:  # in the caller (async) or in the background (lazy)
        _claim(prepared, comm.rank)
        with _abandon_on_failure(prepared, comm), _let_go_on_failure(prepared):
            planned = _plan(prepared, comm)
            with prepared.timer("stage"):
                try:
                    prepared.device_work.wait()
                    images = background.POOL.images([f.data_bytes for f in planned.layouts])
                    for layout, image in zip(planned.layouts, images, strict=True):
                        stage_file(layout, prepared.view, image, all_cores=mode == "async")
                    _check_unchanged(prepared)
                    planned.images = images
                except BaseException as failure:  # told to the peers at the commit
                    planned.error = failure
                    if not isinstance(failure, Exception):
                        interrupts.append(failure)
                    try:  # a state changed under the copy (resized, say) explains any failure
                        _check_unchanged(prepared)
                    except StateChangedError as changed:
                        planned.error = changed
            staged.append(planned)

    def finish(comm: Comm) -> SaveResult:
        if interrupts:  # raised in the caller already (below)
            staged[0].error = CheckpointError(
                f"save to {prepared.url} was interrupted while copying the state "
                f"({type(interrupts[0]).__name__}); nothing was committed"
            )
            staged[0].error.__cause__ = interrupts[0]
        try:
            with _abandon_on_failure(prepared, comm):
                return _commit(prepared, staged[0], _write(prepared, staged[0], comm), comm)
        finally:
            prepared.let_go()

    # An interrupt (KeyboardInterrupt, SystemExit) in the call is the caller's: staged here, not
    # in the background, it reaches the caller once the peers were told of it.
    interrupted = prepared.error is not None and not isinstance(prepared.error, Exception)
    handle = background.start(prepared.url, stage, finish, lazy=mode == "lazy" and not interrupted)
    if interrupts and mode == "async":  # the commit in the background tells the peers
        raise interrupts[0]
    return handle


@held_interrupts()
def reserve_staging(state: dict[str, Any], *, allow_pickle: bool = False) -> background.SaveHandle:
    """Get ready for background saves of ``state`` without saving it: plan the save and fill
    the staging pool for it, in the background. The first async or lazy save of the same
    layout then neither plans nor waits for host memory to be allocated and faulted in.

    A collective: every rank calls it at the same point, as for :func:`save`. It runs after
    the save in flight, and saves started meanwhile wait for it in the background (a lazy save
    blocks the caller only if the copy is still not done at the optimizer step). The returned
    handle's ``wait()`` returns None once the pool is filled; a failure is logged and raised
    there, and the next save reports the same cause as it would have anyway.
    """
    comm = Comm()
    collected = _collect(state, rank=comm.rank, allow_pickle=allow_pickle)

    def reserve(comm: Comm) -> None:
        planned = _plan(collected, comm)
        with collected.timer("reserve"):
            background.POOL.images([f.data_bytes for f in planned.layouts])
        log.info(
            "unickpt: staging pool ready: %.1f MiB in %.2fs",
            background.POOL.nbytes / 2**20,
            collected.timer.total,
        )

    with background.one_caller():
        return background.reserve(reserve)


def mark_inflight(storage: Storage) -> None:
    """Create the checkpoint directory and its in-flight marker (docs/FORMAT.md §6)."""
    storage.ensure_root()
    marker = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(),
    }
    storage.put_atomic(INFLIGHT, json.dumps(marker).encode())


def _target(prepared: PreparedSave) -> list[Any]:
    """What every rank's save must agree on: the path (on node-local storage, whose root each
    node has its own copy of, only the checkpoint's name under it) and the step."""
    storage = prepared.opened
    node_local = storage is not None and storage.node_local
    where = prepared.url.rstrip("/").rsplit("/", 1)[-1] if node_local else prepared.url
    return [where, prepared.step]


def _plan(prepared: _Collected, comm: Comm) -> _Planned:
    """The first collective (layout digests, the save id, every rank's local error, the plans
    each rank has cached), then the plan: the cached one if every rank holds it, else one built
    from every rank's shards. Ranks must agree, since building it takes a second collective;
    their caches can differ (a reservation filling one in the background, evictions). Saves
    check that every rank saves to the same path, the same step: each would otherwise commit a
    piece of one checkpoint, in two places."""
    with prepared.timer("plan"):
        error = prepared.error
        cached = _PLANS.snapshot()
        target = _target(prepared) if isinstance(prepared, PreparedSave) else []
        hello = {
            "target": target,
            "digest": prepared.digest,
            "uid": uuid.uuid4().hex[:12],
            **error_vote(error),
            "cached": sorted(cached),
            "objects": xxhash.xxh3_64_hexdigest(json.dumps(_object_keys(prepared.view)).encode()),
        }
        replies = [json.loads(r) for r in comm.all_gather_bytes(json.dumps(hello).encode())]
        raise_first_failure(replies, error, "save")
        others = [(rank, r["target"]) for rank, r in enumerate(replies) if r["target"] != target]
        if others:
            theirs = "; ".join(f"rank {rank} {_doing(t)}" for rank, t in others)
            raise InvalidStateError(
                f"ranks disagree on the save: rank {comm.rank} {_doing(target)}, {theirs}; "
                "every rank must pass the same path and step"
            )
        objects = []
        if any(r["objects"] != replies[0]["objects"] for r in replies):
            objects = _objects_from_here(prepared.view, comm)
        global_digest = xxhash.xxh3_128_hexdigest("|".join(r["digest"] for r in replies).encode())
        cache_hit = all(global_digest in r["cached"] for r in replies)
        if cache_hit:
            plan = cached[global_digest]
        else:
            metas = json.dumps([m.to_json() for m in prepared.metas]).encode()
            per_rank = [
                [ShardMeta.from_json(m) for m in json.loads(g)]
                for g in comm.all_gather_bytes(metas)
            ]
            plan = build_save_plan(per_rank)
        _PLANS.put(global_digest, plan)  # the newest use, or a new plan
        layouts = file_layouts(plan.writes[comm.rank], plan)
    return _Planned(replies[0]["uid"], plan, cache_hit, layouts, objects)


def _object_keys(view: SaveView) -> list[list[str]]:
    """The keys of a rank's non-tensor entries: JSON values, and pickled ones."""
    return [sorted(view.objects), sorted(view.opaque)]


def _objects_from_here(view: SaveView, comm: Comm) -> list[str]:
    """The JSON entries this rank reports for the manifest, when ranks hold different ones (a
    pipeline's last stage, the only one with a loss scaler): those no lower rank holds. Rank
    0's are its own; it records the lowest rank's value of each key, as for module buffers.
    Pickled entries are saved from rank 0 only: one held elsewhere is refused, on every rank."""
    held = [json.loads(k) for k in comm.all_gather_bytes(json.dumps(_object_keys(view)).encode())]
    elsewhere = {
        key: rank for rank, (_, pickled) in reversed(list(enumerate(held))) for key in pickled
    }
    lost = sorted(key for key in elsewhere if key not in held[0][1])
    if lost:
        raise InvalidStateError(
            f"pickled state entries are saved from rank 0 only, and rank 0 does not hold "
            f"{first_few([f'{k!r} (rank {elsewhere[k]})' for k in lost])}: hold them on rank 0 "
            "too, or make them JSON values"
        )
    if comm.rank == 0:
        return []
    below = {key for keys, _ in held[: comm.rank] for key in keys}
    return [key for key in held[comm.rank][0] if key not in below]


def _write(prepared: PreparedSave, planned: _Planned, comm: Comm) -> dict[str, Any]:
    if planned.error is not None:  # staging failed: nothing to write, only peers to tell
        return _not_written(f"rank {comm.rank} staging", planned.error)
    with prepared.timer("write"):
        try:
            return _write_files(prepared, comm.rank, planned)
        except BaseException as exc:  # a second Ctrl-C (the first is held), once the writers
            planned.error = exc  # are done (the process would wait for them to exit anyway):
            # raised when the commit has told the peers
            return _not_written(f"rank {comm.rank} interrupted while writing", exc)


def _not_written(what: str, error: BaseException) -> dict[str, Any]:
    """The report of a rank that wrote nothing, for ``error`` (its class goes to the peers)."""
    kind = type(error).__name__
    return {
        "files": {},
        "chunks": [],
        "error": f"{what}: {kind}: {error}",
        "writing": False,
        "type": kind,
    }


def _commit(
    prepared: PreparedSave, planned: _Planned, report: dict[str, Any], comm: Comm
) -> SaveResult:
    """Gather every rank's report; rank 0 validates and publishes the manifest; all agree."""
    storage, timer = prepared.storage, prepared.timer
    with timer("commit"):
        reports = [json.loads(r) for r in comm.all_gather_bytes(json.dumps(report).encode())]
        failed: dict[str, Any] = {}  # rank 0's verdict: {"message", "storage"} if not committed
        tidied: BaseException | None = None
        if comm.rank == 0:
            failures = [r for r in reports if r["error"]]
            if failures:
                message = "; ".join(r["error"] for r in failures)
                staging = [r["type"] for r in failures if not r["writing"]]
                failed = {"message": message, "type": staging[0] if staging else "StorageError"}
            else:
                try:
                    manifest = _build_manifest(
                        reports,
                        planned.plan,
                        prepared.view,
                        prepared.step,
                        prepared.user_metadata,
                        comm.world_size,
                    )
                    commit_manifest(storage, manifest)
                except CheckpointExistsError as exc:  # another writer committed this path first
                    failed = {"message": str(exc), "exists": True}
                    with contextlib.suppress(Exception):  # our files are clutter in its checkpoint
                        for name in (name for r in reports for name in r["files"]):
                            storage.delete(name)
                except Exception as exc:  # the storage's mostly; a manifest too large to read
                    ours = isinstance(exc, CheckpointError)
                    failed = {
                        "message": f"{type(exc).__name__}: {exc}",
                        "type": type(exc).__name__ if ours else "StorageError",
                    }
                except BaseException as exc:  # an interrupt: raised here once the peers know
                    planned.error = exc
                    failed = {
                        "message": f"rank 0 interrupted while committing: {exc!r}",
                        "type": type(exc).__name__,
                    }
                else:
                    try:
                        tidy(storage, manifest)
                    except Exception:  # committed; leftovers are only clutter
                        pass
                    except BaseException as exc:  # an interrupt: raised once the peers know
                        tidied = exc  # that the checkpoint is committed
        failed = json.loads(comm.broadcast_bytes(json.dumps(failed).encode()))
        if tidied is not None:
            raise tidied
        if planned.error is not None:
            raise planned.error  # this rank's own failure, as raised
        if failed.get("exists"):
            raise CheckpointExistsError(
                f"save to {storage.url}: another save committed a checkpoint there first "
                f"({failed['message']}); it is kept as it is, and this save was not committed"
            )
        if failed:
            kind = error_class(failed["type"])
            raise kind(f"save to {storage.url} failed, nothing was committed: {failed['message']}")
    written = sum(report["files"].values())
    return SaveResult(
        str(storage.url), prepared.step, written, timer.total, planned.cache_hit, timer.phases
    )


def _doing(target: list[Any]) -> str:
    """What a rank's first collective was for, from its target (empty for a reservation)."""
    if not target:
        return "prepares its staging pool (reserve_staging) instead of saving"
    return f"saves to {target[0]} (step {target[1]})"


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
    objects = dict(view.objects)
    for report in reports:  # in rank order: each key's value from the lowest rank holding it
        for key, value in report["objects"].items():
            objects.setdefault(key, value)
    mixed = sorted(objects.keys() & tensors.keys())
    if mixed:
        raise InvalidStateError(
            f"state entries {', '.join(map(repr, mixed[:3]))} are tensors on some ranks and "
            "non-tensor values on others"
        )
    manifest = Manifest(
        tensors=tensors,
        objects=objects,
        files=files,
        step=step,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(),
        writer=_writer_layout(view, world_size),
        user_metadata=dict(user_metadata or {}),
    )
    # Round-trip through the validating parser: a manifest we could not load is never committed.
    return Manifest.from_json(manifest.to_json(), where="(about to commit)")


def tidy(storage: Storage, manifest: Manifest) -> None:
    """Drop what saves wrote here that the manifest does not reference: the in-flight marker,
    and what a crashed earlier save to this path left behind (data files, temporaries)."""
    for name in storage.list():
        if written_by_a_save(name) and name not in manifest.files:
            storage.delete(name)
