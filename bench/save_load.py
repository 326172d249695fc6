"""Checkpoint save/load benchmark: unickpt vs torch.distributed.checkpoint (DCP) vs torch.save.

One run measures, on the same pre-touched GPT-like state (weights + Adam exp_avg/exp_avg_sq, fp32):

* the floor: raw sequential write (os.write + fdatasync) and cold read (readv) of the same
  bytes, as one file and as two files written/read concurrently, and memcpy (``Tensor.copy_``
  between two pre-touched states);
* unickpt.save / unickpt.load, DCP save / load for several FileSystemWriter configs,
  torch.save (+fsync) / torch.load (fresh allocation, and mmap + copy_ into the target);
* resharding, 1-rank save -> 2-rank load and 2-rank save -> 1-rank load (gloo on CPU, every
  tensor a DTensor Shard(0) on 2 ranks), for unickpt and DCP: bytes read per rank, counted from
  /proc/self/io around the load call, against the bytes of that rank's local shards.

Every load is cold (page cache dropped first) and lands in the same pre-allocated target, which
is checked bit-exactly against the source afterwards. Medians over ``--repeats`` are reported as
a markdown table on stdout and saved, with every sample, to bench/results/save_load-<ts>.json.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.tensor import DTensor, Shard, init_device_mesh

try:
    import unickpt
except Exception:  # the library may be absent or broken; the rest of the benchmark still runs
    unickpt = None
    UNICKPT_IMPORT_ERROR: str | None = traceback.format_exc()
else:
    UNICKPT_IMPORT_ERROR = None

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
GB = 1e9
IO_CHUNK = 64 << 20
WORLD = 2  # ranks in the resharding runs; every dim 0 below is divisible by it
VOCAB, CONTEXT, LAYERS = 50304, 1024, 24
DCP_CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},  # single_file_per_rank=True, thread_count=1
    "threads=2": {"thread_count": 2},
    "file-per-tensor,threads=2": {"single_file_per_rank": False, "thread_count": 2},
}
TARGETS = {"save": 1.2, "load": 1.5, "reshard": 1.05}

warnings.filterwarnings("ignore", message=".*torch.distributed.*")  # DCP's single-process notes

State = dict[str, Any]
Extras = dict[str, Any]


# --------------------------------------------------------------------------- model state


@dataclass(frozen=True)
class Leaf:
    """One tensor of the state: its place in the nested dict, full shape and data seed."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    seed: int

    @property
    def local_shape(self) -> tuple[int, ...]:
        """Shape of one rank's Shard(0) chunk when the tensor is spread over WORLD ranks."""
        return (self.shape[0] // WORLD, *self.shape[1:])


def gpt_leaves(n_params: int) -> tuple[list[Leaf], dict[str, int]]:
    """GPT-2-like tensors (names and shapes) of about n_params weights, plus Adam's moments."""
    per_token = VOCAB + CONTEXT
    d = (-per_token + math.sqrt(per_token**2 + 48 * LAYERS * n_params)) / (24 * LAYERS)
    d_model = max(64, 64 * round(d / 64))
    per_layer = 12 * d_model**2 + 13 * d_model
    layers = max(1, round((n_params - per_token * d_model) / per_layer))
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("wte.weight", (VOCAB, d_model)),
        ("wpe.weight", (CONTEXT, d_model)),
    ]
    for i in range(layers):
        h, d = f"h.{i}", d_model
        shapes += [
            (f"{h}.ln_1.weight", (d,)),
            (f"{h}.ln_1.bias", (d,)),
            (f"{h}.attn.c_attn.weight", (3 * d, d)),
            (f"{h}.attn.c_attn.bias", (3 * d,)),
            (f"{h}.attn.c_proj.weight", (d, d)),
            (f"{h}.attn.c_proj.bias", (d,)),
            (f"{h}.ln_2.weight", (d,)),
            (f"{h}.ln_2.bias", (d,)),
            (f"{h}.mlp.c_fc.weight", (4 * d, d)),
            (f"{h}.mlp.c_fc.bias", (4 * d,)),
            (f"{h}.mlp.c_proj.weight", (d, 4 * d)),
            (f"{h}.mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d_model,)), ("ln_f.bias", (d_model,))]
    paths = [("model", name) for name, _ in shapes]
    paths += [("optim", name, m) for name, _ in shapes for m in ("exp_avg", "exp_avg_sq")]
    shape_of = dict(shapes)
    leaves = [Leaf(p, shape_of[p[1]], seed) for seed, p in enumerate(paths)]
    params = sum(math.prod(s) for _, s in shapes)
    return leaves, {"params": params, "d_model": d_model, "layers": layers}


def fill_chunk(t: torch.Tensor, leaf: Leaf, chunk: int) -> None:
    """Write the deterministic data of Shard(0) chunk `chunk` of `leaf` into t, in place."""
    t.normal_(generator=torch.Generator().manual_seed(leaf.seed * WORLD + chunk))


def nest(leaves: list[Leaf], tensors: list[Any]) -> State:
    """The nested state dict holding tensors[i] at leaves[i].path."""
    state: State = {}
    for leaf, t in zip(leaves, tensors, strict=True):
        node = state
        for key in leaf.path[:-1]:
            node = node.setdefault(key, {})
        node[leaf.path[-1]] = t
    return state


def pick(state: State, leaves: list[Leaf]) -> list[torch.Tensor]:
    """The tensors of a nested state dict, in leaf order."""
    out = []
    for leaf in leaves:
        node: Any = state
        for key in leaf.path:
            node = node[key]
        out.append(node)
    return out


def source_tensors(leaves: list[Leaf]) -> list[torch.Tensor]:
    tensors = []
    for leaf in leaves:
        t = torch.empty(leaf.shape)
        for chunk, view in enumerate(t.chunk(WORLD)):
            fill_chunk(view, leaf, chunk)
        tensors.append(t)
    return tensors


def zeroed(shapes: Iterator[tuple[int, ...]]) -> list[torch.Tensor]:
    """Freshly allocated tensors, written once so that their pages are resident."""
    return [torch.empty(shape).zero_() for shape in shapes]


def same(got: list[torch.Tensor], want: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


# --------------------------------------------------------------------------- system helpers


def proc_io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def detect_cache_drop() -> str:
    """'drop_caches' if /proc/sys/vm/drop_caches is writable, else 'fadvise'."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return "fadvise"
    return "drop_caches"


def drop_cache(method: str, root: Path) -> None:
    """Make the next read of everything under root come from the disk."""
    os.sync()
    if method == "drop_caches":
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return
    for file in (p for p in root.rglob("*") if p.is_file()):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_field(path: str, prefix: str) -> str:
    with open(path) as f:
        return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith(prefix)), "?")


def machine_info(ckpt_dir: Path) -> dict[str, Any]:
    cpu = _proc_field("/proc/cpuinfo", "model name")
    mem_kib = int(_proc_field("/proc/meminfo", "MemTotal").split()[0])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "unickpt": getattr(unickpt, "__version__", "?") if unickpt else None,
        "ckpt_dir": str(ckpt_dir),
        "ckpt_dir_free_gb": round(shutil.disk_usage(ckpt_dir).free / GB, 1),
        "loadavg_1m_at_start": os.getloadavg()[0],
    }


# --------------------------------------------------------------------------- save/load backends
# Each save function writes `state` to a path that does not exist yet; each load function
# fills the tensors of `state` in place. Both return extra facts worth recording.


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.numpy()).cast("B")


def _write_file(file: Path, tensors: list[torch.Tensor]) -> None:
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for t in tensors:
            view, off = _bytes(t), 0
            while off < len(view):
                off += os.write(fd, view[off : off + IO_CHUNK])
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _read_file(file: Path, tensors: list[torch.Tensor]) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        for t in tensors:
            view, off = _bytes(t), 0
            while off < len(view):
                n = os.readv(fd, [view[off : off + IO_CHUNK]])
                if n == 0:
                    raise EOFError(file)
                off += n
    finally:
        os.close(fd)


def _split(tensors: list[torch.Tensor], parts: int) -> list[list[torch.Tensor]]:
    """Consecutive groups of about equal bytes, one per file."""
    total, done = sum(t.nbytes for t in tensors), 0
    groups: list[list[torch.Tensor]] = [[] for _ in range(parts)]
    for t in tensors:
        groups[min(parts - 1, done * parts // total)].append(t)
        done += t.nbytes
    return groups


def raw_write(path: Path, tensors: list[torch.Tensor], streams: int) -> Extras:
    """The tensors' bytes as `streams` files, written concurrently, one thread each."""
    path.mkdir()
    files = [path / f"raw{i}.bin" for i in range(streams)]
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(_write_file, files, _split(tensors, streams)))
    return {}


def raw_read(path: Path, tensors: list[torch.Tensor], streams: int) -> Extras:
    files = [path / f"raw{i}.bin" for i in range(streams)]
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(_read_file, files, _split(tensors, streams)))
    return {}


def unickpt_save(path: Path, state: State) -> Extras:
    r = unickpt.save(str(path), state)
    return {
        "bytes_written": r.bytes_written,
        "seconds": r.seconds,
        "cache_hit": r.plan_cache_hit,
        "phases": getattr(r, "phases", None),
    }


def unickpt_load(path: Path, state: State) -> Extras:
    r = unickpt.load(str(path), state)
    return {
        "bytes_read": r.bytes_read,
        "bytes_needed": r.bytes_needed,
        "seconds": r.seconds,
        "phases": getattr(r, "phases", None),
    }


def dcp_save(path: Path, state: State, config: str = "default") -> Extras:
    writer = FileSystemWriter(path, **DCP_CONFIGS[config])
    dcp.save(state, storage_writer=writer, no_dist=not dist.is_initialized())
    return {}


def dcp_load(path: Path, state: State) -> Extras:
    dcp.load(state, storage_reader=FileSystemReader(path), no_dist=not dist.is_initialized())
    return {}


def torch_save(path: Path, state: State) -> Extras:
    path.mkdir()
    with open(path / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return {}


LIB_SAVE: dict[str, Callable[[Path, State], Extras]] = {"unickpt": unickpt_save, "dcp": dcp_save}
LIB_LOAD: dict[str, Callable[[Path, State], Extras]] = {"unickpt": unickpt_load, "dcp": dcp_load}


# --------------------------------------------------------------------------- single-process runs

SaveFn = Callable[[Path], Extras]
LoadFn = Callable[[Path], tuple[list[torch.Tensor], Extras]]  # returns the tensors to verify


@dataclass
class Suite:
    """One way of saving, and the ways of loading what it saved (op name -> function)."""

    name: str
    save_op: str
    save: SaveFn
    loads: dict[str, LoadFn]
    baseline: bool = False  # the raw disk floor rather than a checkpoint format


@dataclass
class Op:
    name: str
    kind: str  # "save", "load", "write", "read" or "copy"
    seconds: list[float] = field(default_factory=list)
    extras: list[Extras] = field(default_factory=list)
    verified: list[bool] = field(default_factory=list)
    error: str | None = None

    def gbps(self, nbytes: int) -> float | None:
        return nbytes / statistics.median(self.seconds) / GB if self.seconds else None


class Bench:
    """The pre-touched source and target states and the suites that move one to the other."""

    def __init__(self, leaves: list[Leaf], cache_method: str) -> None:
        self.leaves = leaves
        self.cache_method = cache_method
        self.source = source_tensors(leaves)
        self.target = zeroed(leaf.shape for leaf in leaves)
        self.source_state = nest(leaves, self.source)
        self.target_state = nest(leaves, self.target)
        self.nbytes = sum(t.nbytes for t in self.source)

    def in_place(self, load: Callable[[Path, State], Extras]) -> LoadFn:
        return lambda path: (self.target, load(path, self.target_state))

    def suites(self) -> list[Suite]:
        suites = [self.raw_suite(1), self.raw_suite(2)]
        if unickpt is not None:
            suites.append(
                Suite(
                    "unickpt",
                    "unickpt.save",
                    lambda p: unickpt_save(p, self.source_state),
                    {"unickpt.load": self.in_place(unickpt_load)},
                )
            )
        for cfg in DCP_CONFIGS:
            suites.append(
                Suite(
                    f"dcp[{cfg}]",
                    f"DCP save [{cfg}]",
                    lambda p, cfg=cfg: dcp_save(p, self.source_state, cfg),
                    {f"DCP load [{cfg}]": self.in_place(dcp_load)},
                )
            )
        suites.append(
            Suite(
                "torch",
                "torch.save (+fsync)",
                lambda p: torch_save(p, self.source_state),
                {
                    "torch.load (fresh tensors)": self.torch_load_fresh,
                    "torch.load(mmap) + copy_": self.torch_load_mmap,
                },
            )
        )
        return suites

    def raw_suite(self, streams: int) -> Suite:
        plural = "s" if streams > 1 else ""
        return Suite(
            f"raw{streams}",
            f"disk write, {streams} stream{plural}",
            lambda p: raw_write(p, self.source, streams),
            {
                f"disk read, {streams} stream{plural}": lambda p: (
                    self.target,
                    raw_read(p, self.target, streams),
                )
            },
            baseline=True,
        )

    def torch_load_fresh(self, path: Path) -> tuple[list[torch.Tensor], Extras]:
        return pick(torch.load(path / "state.pt", weights_only=True), self.leaves), {}

    def torch_load_mmap(self, path: Path) -> tuple[list[torch.Tensor], Extras]:
        loaded = pick(torch.load(path / "state.pt", mmap=True, weights_only=True), self.leaves)
        for dst, src in zip(self.target, loaded, strict=True):
            dst.copy_(src)
        return self.target, {}

    def memcpy(self, passes: int = 3) -> float:
        """Median seconds of one source -> target copy pass (one pass is short and jittery)."""
        times = []
        for _ in range(passes):
            start = time.perf_counter()
            for dst, src in zip(self.target, self.source, strict=True):
                dst.copy_(src)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def run_suite(self, suite: Suite, path: Path, ops: dict[str, Op], tag: str) -> None:
        """Save once, then cold-load once per load op, each into the zeroed target."""
        try:
            os.sync()
            start = time.perf_counter()
            extras = suite.save(path)
            self.record(ops[suite.save_op], time.perf_counter() - start, extras, None, tag)
            for name, load in suite.loads.items():
                for t in self.target:
                    t.zero_()
                drop_cache(self.cache_method, path)
                start = time.perf_counter()
                got, extras = load(path)
                seconds = time.perf_counter() - start
                self.record(ops[name], seconds, extras, same(got, self.source), tag)
                del got
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def record(self, op: Op, seconds: float, extras: Extras, ok: bool | None, tag: str) -> None:
        op.seconds.append(seconds)
        op.extras.append(extras)
        if ok is not None:
            op.verified.append(ok)
        check = {None: "", True: ", verified", False: ", DATA MISMATCH"}[ok]
        log(f"{tag} {op.name}: {seconds:.2f} s, {self.nbytes / seconds / GB:.2f} GB/s{check}")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_main_phase(bench: Bench, repeats: int, work: Path) -> dict[str, Op]:
    suites = bench.suites()
    ops = {"memcpy (copy_)": Op("memcpy (copy_)", "copy")}
    for s in suites:
        ops[s.save_op] = Op(s.save_op, "write" if s.baseline else "save")
        for name in s.loads:
            ops[name] = Op(name, "read" if s.baseline else "load")
    broken: set[str] = set()
    for rep in range(repeats):
        tag = f"[{rep + 1}/{repeats}]"
        seconds = bench.memcpy()
        bench.record(ops["memcpy (copy_)"], seconds, {}, None, tag)
        order = suites[rep % len(suites) :] + suites[: rep % len(suites)]  # spread disk noise
        for suite in (s for s in order if s.name not in broken):
            try:
                path = work / re.sub(r"\W+", "_", f"r{rep}-{suite.name}")
                bench.run_suite(suite, path, ops, tag)
            except Exception:
                broken.add(suite.name)
                err = _failed(f"{tag} {suite.name} (skipped from now on)")
                for name in (suite.save_op, *suite.loads):
                    if len(ops[name].seconds) <= rep:  # this one failed or never ran
                        ops[name].error = err
    return ops


# --------------------------------------------------------------------------- resharding


@dataclass
class ReshardJob:
    leaves: list[Leaf]
    libs: list[str]
    one_rank: dict[str, str]  # lib -> checkpoint saved by this process (world 1)
    two_rank: dict[str, str]  # lib -> where the 2 ranks save theirs
    out_dir: str
    cache_method: str
    port: int


def _rank_main(rank: int, job: ReshardJob) -> None:
    """One of WORLD spawned ranks: per lib, save its shards, then load the 1-rank checkpoint."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job.port))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(minutes=10)
    )
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        # Same layout as distribute_tensor(full, mesh, [Shard(0)]), without materialising `full`.
        dtensors = [
            DTensor.from_local(t, mesh, [Shard(0)])
            for t in zeroed(leaf.local_shape for leaf in job.leaves)
        ]
        state = nest(job.leaves, dtensors)
        local = [dt.to_local() for dt in dtensors]
        scratch = torch.empty(max(t.numel() for t in local)).zero_()
        needed = sum(t.nbytes for t in local)
        results: dict[str, Any] = {}
        out = Path(job.out_dir) / f"rank{rank}.json"
        for lib in job.libs:
            res = results[lib] = {"bytes_needed": needed}
            for t, leaf in zip(local, job.leaves, strict=True):
                fill_chunk(t, leaf, rank)
            dist.barrier()
            start = time.perf_counter()
            res["save_extras"] = LIB_SAVE[lib](Path(job.two_rank[lib]), state)
            res["save_seconds"] = time.perf_counter() - start
            out.write_text(json.dumps(results))
            for t in local:
                t.zero_()
            dist.barrier()
            if rank == 0 or job.cache_method == "fadvise":
                drop_cache(job.cache_method, Path(job.one_rank[lib]))
            dist.barrier()
            before = proc_io()
            start = time.perf_counter()
            res["load_extras"] = LIB_LOAD[lib](Path(job.one_rank[lib]), state)
            res["load_seconds"] = time.perf_counter() - start
            after = proc_io()
            res["rchar"] = after["rchar"] - before["rchar"]
            res["read_bytes"] = after["read_bytes"] - before["read_bytes"]
            res["verified"] = all(
                torch.equal(t, _expected(scratch, leaf, rank))
                for t, leaf in zip(local, job.leaves, strict=True)
            )
            out.write_text(json.dumps(results))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _expected(scratch: torch.Tensor, leaf: Leaf, rank: int) -> torch.Tensor:
    view = scratch[: math.prod(leaf.local_shape)].view(leaf.local_shape)
    fill_chunk(view, leaf, rank)
    return view


def run_reshard(bench: Bench, libs: list[str], work: Path, timeout: float) -> dict[str, Any]:
    """1-rank save -> 2-rank load, and 2-rank save -> 1-rank load (into bench.target)."""
    work.mkdir()
    report: dict[str, Any] = {"world": WORLD, "errors": {}, "one_to_two": {}, "two_to_one": {}}
    one_rank = {lib: work / f"{lib}-1rank" for lib in libs}
    for lib in libs:
        try:
            LIB_SAVE[lib](one_rank[lib], bench.source_state)
        except Exception:
            report["errors"][f"{lib} 1-rank save"] = _failed(f"reshard: {lib} 1-rank save")
    libs = [lib for lib in libs if f"{lib} 1-rank save" not in report["errors"]]
    job = ReshardJob(
        leaves=bench.leaves,
        libs=libs,
        one_rank={lib: str(one_rank[lib]) for lib in libs},
        two_rank={lib: str(work / f"{lib}-2rank") for lib in libs},
        out_dir=str(work),
        cache_method=bench.cache_method,
        port=free_port(),
    )
    log(f"reshard: 1-rank checkpoints saved; spawning {WORLD} ranks")
    try:
        ctx = mp.start_processes(_rank_main, args=(job,), nprocs=WORLD, join=False)
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.terminate()
                raise TimeoutError(f"ranks still running after {timeout:.0f} s")
    except Exception:
        report["errors"]["2-rank run"] = _failed("reshard: 2-rank run")
    ranks = [
        json.loads(p.read_text()) if p.exists() else {}
        for p in (work / f"rank{r}.json" for r in range(WORLD))
    ]
    for lib in libs:
        per_rank = [r.get(lib, {}) for r in ranks]
        report["one_to_two"][lib] = per_rank
        if all("save_seconds" in r for r in per_rank):
            try:
                report["two_to_one"][lib] = _load_two_rank(bench, lib, Path(job.two_rank[lib]))
            except Exception:
                report["errors"][f"{lib} 2->1 load"] = _failed(f"reshard: {lib} 2->1 load")
    shutil.rmtree(work, ignore_errors=True)
    return report


def _failed(what: str) -> str:
    """The current exception's traceback, also logged."""
    err = traceback.format_exc()
    log(f"{what} FAILED:\n{err}")
    return err


def _load_two_rank(bench: Bench, lib: str, path: Path) -> dict[str, Any]:
    for t in bench.target:
        t.zero_()
    drop_cache(bench.cache_method, path)
    before = proc_io()
    start = time.perf_counter()
    extras = LIB_LOAD[lib](path, bench.target_state)
    seconds = time.perf_counter() - start
    after = proc_io()
    return {
        "bytes_needed": bench.nbytes,
        "rchar": after["rchar"] - before["rchar"],
        "read_bytes": after["read_bytes"] - before["read_bytes"],
        "load_seconds": seconds,
        "load_extras": extras,
        "verified": same(bench.target, bench.source),
    }


# --------------------------------------------------------------------------- report


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def _check(value: float | None, target: float, higher_is_better: bool = True) -> str:
    if value is None:
        return "n/a"
    ok = value >= target if higher_is_better else value <= target
    return "PASS" if ok else "FAIL"


def summarize(ops: dict[str, Op], nbytes: int) -> dict[str, Any]:
    rate = {name: op.gbps(nbytes) for name, op in ops.items()}

    def best(prefix: str) -> tuple[str | None, float | None]:
        found = [(v, k) for k, v in rate.items() if k.startswith(prefix) and v is not None]
        return (max(found)[1], max(found)[0]) if found else (None, None)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    dcp_save_op, dcp_save = best("DCP save")
    dcp_load_op, dcp_load = best("DCP load")
    u_save, u_load = rate.get("unickpt.save"), rate.get("unickpt.load")
    disk_w_op, disk_w = best("disk write")
    disk_r_op, disk_r = best("disk read")
    return {
        "gbps": rate,
        "dcp_best_save": {"op": dcp_save_op, "gbps": dcp_save},
        "dcp_best_load": {"op": dcp_load_op, "gbps": dcp_load},
        "disk_write": {"op": disk_w_op, "gbps": disk_w},
        "disk_read": {"op": disk_r_op, "gbps": disk_r},
        "unickpt_vs_dcp_save": ratio(u_save, dcp_save),
        "unickpt_vs_dcp_load": ratio(u_load, dcp_load),
        "unickpt_save_vs_disk_write": ratio(u_save, disk_w),
        "unickpt_load_vs_disk_read": ratio(u_load, disk_r),
        "dcp_save_vs_disk_write": ratio(dcp_save, disk_w),
        "dcp_load_vs_disk_read": ratio(dcp_load, disk_r),
    }


def markdown(result: dict[str, Any]) -> str:
    m, nbytes = result["model"], result["model"]["state_bytes"]
    summary, mach = result["summary"], result["machine"]
    lines = [
        f"## save/load benchmark ({result['timestamp']})",
        "",
        f"State: {m['params'] / 1e6:.0f}M params + Adam = {m['tensors']} fp32 tensors, "
        f"{nbytes / GB:.2f} GB (d_model {m['d_model']}, {m['layers']} layers). "
        f"Medians of {result['args']['repeats']} repeats; GB/s = 1e9 B/s of state. "
        f"Cold loads: page cache dropped with {result['cache_drop_method']}. "
        f"{mach['cores']} cores; 1-min load average {mach['loadavg_1m_at_start']:.1f} at start, "
        f"{mach['loadavg_1m_at_end']:.1f} at end (above {mach['cores']}: other work competed).",
        "",
        "| operation | GB/s | seconds | min-max GB/s | vs best disk | verified |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    disk = {"save": summary["disk_write"]["gbps"], "load": summary["disk_read"]["gbps"]}
    for name, op in result["ops"].items():
        if op["error"] and not op["seconds"]:
            lines.append(f"| {name} | error | | | | |")
            continue
        secs = op["seconds"]
        lo, hi = nbytes / max(secs) / GB, nbytes / min(secs) / GB
        rate = summary["gbps"][name]
        base = disk.get(op["kind"])
        vs_disk = f"{rate / base:.2f}x" if base else ""
        ver = "" if not op["verified"] else ("yes" if all(op["verified"]) else "**NO**")
        lines.append(
            f"| {name} | {rate:.2f} | {statistics.median(secs):.2f} | {lo:.2f}-{hi:.2f} "
            f"| {vs_disk} | {ver} |"
        )
    save_t, load_t = TARGETS["save"], TARGETS["load"]
    u_save, u_load = summary["unickpt_vs_dcp_save"], summary["unickpt_vs_dcp_load"]
    lines += [
        "",
        "| check | value | target | status |",
        "|---|---:|---:|:---:|",
        f"| unickpt save / DCP best save ({summary['dcp_best_save']['op']}) "
        f"| {_fmt(u_save, '.2f', 'x')} | >= {save_t}x | {_check(u_save, save_t)} |",
        f"| unickpt load / DCP best load ({summary['dcp_best_load']['op']}), cold "
        f"| {_fmt(u_load, '.2f', 'x')} | >= {load_t}x | {_check(u_load, load_t)} |",
        f"| unickpt save / best disk write ({summary['disk_write']['op']}) "
        f"| {_fmt(summary['unickpt_save_vs_disk_write'])} | | |",
        f"| unickpt load / best disk read ({summary['disk_read']['op']}) "
        f"| {_fmt(summary['unickpt_load_vs_disk_read'])} | | |",
        f"| DCP best save / best disk write | {_fmt(summary['dcp_save_vs_disk_write'])} | | |",
        f"| DCP best load / best disk read | {_fmt(summary['dcp_load_vs_disk_read'])} | | |",
    ]
    reshard = result.get("reshard")
    if reshard:
        lines += _reshard_markdown(reshard)
    if result["unickpt_import_error"]:
        lines += ["", "unickpt not importable; its rows are missing:", "```"]
        lines += [result["unickpt_import_error"].rstrip(), "```"]
    failed = [(n, op["error"]) for n, op in result["ops"].items() if op["error"]]
    if reshard:
        failed += [(f"reshard: {k}", v) for k, v in reshard["errors"].items()]
    by_error: dict[str, list[str]] = {}
    for name, err in failed:
        by_error.setdefault(err, []).append(name)
    for err, names in by_error.items():
        lines += ["", f"{', '.join(names)} failed:", "```", err.rstrip(), "```"]
    return "\n".join(lines)


def _reshard_markdown(reshard: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"Resharding (every tensor a DTensor Shard(0) over {reshard['world']} ranks; "
        "read = /proc/self/io rchar delta around the load call in that rank; read_bytes = "
        "block-device reads in the same window, indicative only: the ranks share one page "
        "cache, so whichever rank faults a page in first is charged for it, with readahead):",
        "",
        "| lib | direction | rank | needed GB | read GB (rchar) | read / needed | "
        "read_bytes / needed | lib-reported read / needed | load s | target | verified |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|:---:|",
    ]
    rows = [
        (lib, f"1 -> {reshard['world']}", str(rank), res)
        for lib, per_rank in reshard["one_to_two"].items()
        for rank, res in enumerate(per_rank)
    ]
    rows += [
        (lib, f"{reshard['world']} -> 1", "0", res) for lib, res in reshard["two_to_one"].items()
    ]
    for lib, direction, rank, res in rows:
        if "rchar" not in res:
            lines.append(f"| {lib} | {direction} | {rank} | failed | | | | | | | |")
            continue
        need = res["bytes_needed"]
        read = res["rchar"] / need
        extras = res["load_extras"]
        reported = extras["bytes_read"] / need if "bytes_read" in extras else None
        status = _check(read, TARGETS["reshard"], higher_is_better=False)
        lines.append(
            f"| {lib} | {direction} | {rank} | {need / GB:.3f} | {res['rchar'] / GB:.3f} "
            f"| {read:.3f} | {res['read_bytes'] / need:.3f} | {_fmt(reported, '.3f')} "
            f"| {res['load_seconds']:.2f} | {status} (<= {TARGETS['reshard']}) "
            f"| {'yes' if res['verified'] else '**NO**'} |"
        )
    return lines


# --------------------------------------------------------------------------- entry point


def parse_count(text: str) -> int:
    """'300M', '1.5B', '20k' or a plain number."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}.get(text[-1:].upper())
    return int(float(text[:-1]) * scale) if scale else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--params",
        type=parse_count,
        default=parse_count("300M"),
        help="model parameters, e.g. 300M (default) or 20M; state is 3x (Adam)",
    )
    size.add_argument(
        "--size-mb",
        type=float,
        help="total state size in MB (params + Adam, fp32) instead of --params",
    )
    parser.add_argument("--repeats", type=int, default=3, help="repeats per op; medians shown")
    parser.add_argument(
        "--dir",
        type=Path,
        default=RESULTS_DIR / "tmp",
        help="where checkpoints are written (a fresh subdirectory, removed after)",
    )
    parser.add_argument("--skip-reshard", action="store_true", help="skip the 2-rank runs")
    parser.add_argument(
        "--reshard-timeout",
        type=float,
        default=1800,
        help="seconds before the 2-rank run is killed",
    )
    args = parser.parse_args()
    n_params = int(args.size_mb * 1e6 / 12) if args.size_mb else args.params

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"save_load-{stamp}-", dir=args.dir))
    leaves, shape_info = gpt_leaves(n_params)
    cache_method = detect_cache_drop()
    log(f"cache drop method: {cache_method}; checkpoints under {work}")
    if UNICKPT_IMPORT_ERROR:
        log(f"unickpt not importable, skipping it:\n{UNICKPT_IMPORT_ERROR}")

    start = time.perf_counter()
    bench = Bench(leaves, cache_method)
    log(
        f"state: {len(leaves)} tensors, {bench.nbytes / GB:.2f} GB, built and pre-touched in "
        f"{time.perf_counter() - start:.1f} s"
    )
    result: dict[str, Any] = {
        "timestamp": stamp,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(work),
        "cache_drop_method": cache_method,
        "unickpt_import_error": UNICKPT_IMPORT_ERROR,
        "model": {**shape_info, "tensors": len(leaves), "state_bytes": bench.nbytes},
    }
    try:
        ops = run_main_phase(bench, args.repeats, work)
        result["ops"] = {name: asdict(op) for name, op in ops.items()}
        result["summary"] = summarize(ops, bench.nbytes)
        if not args.skip_reshard:
            libs = ["dcp"] + (["unickpt"] if unickpt is not None else [])
            result["reshard"] = run_reshard(bench, libs, work / "reshard", args.reshard_timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["machine"]["loadavg_1m_at_end"] = os.getloadavg()[0]

    write_results("save_load", stamp, result, markdown(result))


def write_results(name: str, stamp: str, result: dict[str, Any], table: str) -> None:
    """Save ``result`` as bench/results/<name>-<stamp>.json and the table as .md; print it."""
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"{name}-{stamp}.json"
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    log(f"\nwrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
