"""Checkpointing inside a CPU training loop: unickpt lazy/async/sync vs DCP async_save / save.

One run trains a stack of MLP blocks (nn.Linear, about ``--params`` weights) with Adam on
random data, single process, and checkpoints the live state (weights + Adam's exp_avg,
exp_avg_sq and step) every ``--every`` steps with each method in turn, plus a no-checkpoint
baseline before and after. Per method it measures:

* stall: wall time the loop is blocked by one checkpoint (the save call, including any wait for
  the previous save, plus the wait before the next optimizer step: ``unickpt.before_update()``
  for lazy, DCP's staging future for async staging);
* foreground speed: baseline median compute time (forward + backward + optimizer step) over the
  median compute time of the steps that overlapped a background save, also split into the
  step right after the save call (it overlaps the staging copy of lazy saves and DCP's async
  stager) and the later overlapped steps (writes only);
* end-to-end throughput: bytes / (save call -> durable completion), against the disk's own
  fdatasync write bandwidth measured in the same run;
* training time lost per checkpoint: the method's step wall times over the baseline compute
  time, summed over every step but the last, per save made in them (stalls and slowdown
  together);
* RSS: peak over the RSS before the method's first save (psutil, sampled every 50 ms), also net
  of the no-checkpoint loop's own peak over its start, and the RSS after each save completed;
* noise: CPU time other processes used while the method ran (from /proc/stat), in cores.

unickpt's background methods reserve their staging memory (``unickpt.reserve_staging``) in the
background after the first step, as ``CheckpointManager`` does at its first call; the
``unreserved`` variants (not run by default) leave it to the first save.

Medians go to stdout as markdown and, with every sample, to bench/results/async_save-<ts>.json
(and .md). See bench/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import os
import shutil
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil
import torch
import torch.distributed.checkpoint as dcp
from save_load import (
    GB,
    RESULTS_DIR,
    _check,
    _failed,
    _fmt,
    log,
    machine_info,
    parse_count,
    raw_write,
    write_results,
)
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

import unickpt
from unickpt.engine import background

warnings.filterwarnings("ignore", message=".*torch.distributed.*")  # DCP's single-process notes
warnings.filterwarnings("ignore", category=FutureWarning)

State = dict[str, Any]
# The write-rate cap of the "unickpt lazy capped" method: about half this machine's disk
# bandwidth, so a save's writes spread over about twice as many steps.
CAPPED_RATE = 0.5 * GB
TARGETS = {"stall_vs_dcp": 0.5, "speed": 0.8, "throughput_vs_dcp": 1.0, "rss_vs_state": 1.0}
RSS_PERIOD = 0.05
LIBC = ctypes.CDLL("libc.so.6")


# --------------------------------------------------------------------------- model


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class Trainer:
    """A stack of MLP blocks, Adam, one fixed random batch; the live state as a nested dict."""

    def __init__(self, n_params: int, width: int, batch: int) -> None:
        per_block = 8 * width * width + 5 * width
        self.blocks = max(1, round(n_params / per_block))
        torch.manual_seed(0)
        self.model = nn.Sequential(*(Block(width) for _ in range(self.blocks)))
        self.optim = torch.optim.Adam(self.model.parameters(), lr=1e-5)
        self.x = torch.randn(batch, width)
        self.y = torch.randn(batch, width)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.compute()  # creates (and touches) Adam's state
        self.optim.step()
        self.state = self._state()
        self.nbytes = sum(t.nbytes for t in self.tensors())

    def _state(self) -> State:
        """Live tensors: saving this dict saves what the next optimizer step will update."""
        named = dict(self.model.named_parameters())
        optim: State = {}
        for name, p in named.items():
            s = self.optim.state[p]
            optim[name] = {k: s[k] for k in ("step", "exp_avg", "exp_avg_sq")}
        return {"model": {n: p.detach() for n, p in named.items()}, "optim": optim}

    def tensors(self) -> list[torch.Tensor]:
        model, optim = self.state["model"], self.state["optim"]
        return [*model.values(), *(t for moments in optim.values() for t in moments.values())]

    def compute(self) -> None:
        """Forward and backward (the part of a step that may overlap a background save)."""
        self.optim.zero_grad(set_to_none=False)
        loss = torch.nn.functional.mse_loss(self.model(self.x), self.y)
        loss.backward()


# --------------------------------------------------------------------------- RSS sampling


class RssSampler:
    """Peak resident set size, sampled by a background thread; reset() starts a new window."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def now(self) -> int:
        return int(self.proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(RSS_PERIOD):
            self.peak = max(self.peak, self.now())

    def reset(self) -> int:
        self.peak = self.now()
        return self.peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- CPU accounting

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds every process used, CPU seconds this process used), since boot / start."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    own = int(fields[11]) + int(fields[12])  # utime, stime: every thread, dead ones included
    return (user + nice + system + irq + softirq) / TICK, own / TICK


# --------------------------------------------------------------------------- methods


@dataclass
class Ckpt:
    """One checkpoint: when it was called, how long the loop was blocked, when it was durable."""

    step: int
    t_call: float
    call_s: float = 0.0  # time inside the save call (incl. waiting for the previous save)
    pre_step_s: float = 0.0  # time blocked before the next optimizer step
    t_done: float | None = None
    bytes: int = 0
    lib_seconds: float | None = None  # unickpt's SaveResult.seconds
    phases: dict[str, float] | None = None
    rss_after: int | None = None
    error: str | None = None

    @property
    def stall_s(self) -> float:
        return self.call_s + self.pre_step_s


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Method:
    """One way of checkpointing; subclasses override save() and, if needed, the waits."""

    name = ""
    background = True  # whether the save goes on after the call returns
    pool_bytes: int | None = None  # staging buffers kept across saves, when the library says

    def __init__(self, rss: RssSampler) -> None:
        self.rss = rss
        self._watchers: list[threading.Thread] = []

    def save(self, path: Path, ckpt: Ckpt, state: State) -> None:
        raise NotImplementedError

    def prepare(self, state: State) -> None:
        """Called once, after the first step and before the first save."""

    def before_step(self) -> None:
        """Block until the state may be mutated again (nothing to wait for by default)."""

    def drain(self) -> None:
        """Wait for every save in flight."""
        for w in self._watchers:
            w.join()

    def close(self) -> None:
        """Release what the method keeps across saves."""

    def _done(self, ckpt: Ckpt, path: Path, error: BaseException | None) -> None:
        ckpt.t_done = time.perf_counter()
        ckpt.rss_after = self.rss.now()
        if error is not None:
            ckpt.error = f"{type(error).__name__}: {error}"
            log(f"  save at step {ckpt.step} failed: {ckpt.error}")
        elif not ckpt.bytes:
            ckpt.bytes = _dir_bytes(path)

    def _watch(self, ckpt: Ckpt, path: Path, wait: Callable[[], Any]) -> None:
        """Record completion of a background save from a thread that only waits."""

        def run() -> None:
            try:
                self._on_result(ckpt, wait())
            except BaseException as exc:
                self._done(ckpt, path, exc)
            else:
                self._done(ckpt, path, None)

        thread = threading.Thread(target=run, name="bench-watch", daemon=True)
        thread.start()
        self._watchers.append(thread)

    def _on_result(self, ckpt: Ckpt, result: Any) -> None:
        """Take what the library reports about a finished save."""


class UnickptMethod(Method):
    def __init__(
        self,
        rss: RssSampler,
        mode: Literal["sync", "async", "lazy"],
        max_write_rate: float | None = None,
        reserve: bool = True,
    ) -> None:
        super().__init__(rss)
        self.mode = mode
        self.max_write_rate = max_write_rate
        self.name = f"unickpt {mode}"
        if max_write_rate is not None:
            self.name += f", {max_write_rate / GB:.1f} GB/s cap"
        self.background = mode != "sync"
        self.reserve = reserve and self.background
        if self.background and not reserve:
            self.name += ", unreserved"
        background.POOL = background.StagingPool()  # each mode pays for its own staging buffers

    def prepare(self, state: State) -> None:
        if self.reserve:  # in the background, as CheckpointManager does at its first call
            unickpt.reserve_staging(state)

    def save(self, path: Path, ckpt: Ckpt, state: State) -> None:
        if self.mode == "sync":
            result = unickpt.save(str(path), state, step=ckpt.step)
            self._on_result(ckpt, result)
            self._done(ckpt, path, None)
            return
        handle = unickpt.save(
            str(path),
            state,
            mode=self.mode,
            step=ckpt.step,
            if_busy="wait",
            max_write_rate=self.max_write_rate,
        )
        self._watch(ckpt, path, handle.wait)

    def before_step(self) -> None:
        unickpt.before_update()

    def _on_result(self, ckpt: Ckpt, result: Any) -> None:
        ckpt.bytes, ckpt.lib_seconds = result.bytes_written, result.seconds
        ckpt.phases = dict(result.phases) if result.phases else None

    def close(self) -> None:
        self.pool_bytes = background.POOL.nbytes
        background.POOL = background.StagingPool()


def _writer(path: Path) -> FileSystemWriter:
    return FileSystemWriter(path, thread_count=2)


class DcpSync(Method):
    name = "DCP save (threads=2)"
    background = False

    def save(self, path: Path, ckpt: Ckpt, state: State) -> None:
        dcp.save(state, storage_writer=_writer(path), no_dist=True)
        self._done(ckpt, path, None)


class DcpAsyncDefault(Method):
    """async_save with its defaults: a fresh staging copy, made inside the call, every time."""

    name = "DCP async_save (default)"

    def __init__(self, rss: RssSampler) -> None:
        super().__init__(rss)
        self.future: Future[Any] | None = None

    def save(self, path: Path, ckpt: Ckpt, state: State) -> None:
        if self.future is not None:
            self.future.result()  # one in flight, like unickpt's if_busy="wait"
        future = dcp.async_save(state, storage_writer=_writer(path), no_dist=True)
        assert isinstance(future, Future)
        self.future = future
        self._watch(ckpt, path, future.result)


class DcpAsyncStaged(Method):
    """async_save with ONE reused DefaultStager doing async staging into cached CPU buffers
    (pinned memory and non-blocking copies need an accelerator; shared memory only helps
    the process-based checkpointer). The state may change once staging completes."""

    name = "DCP async_save (reused stager, async staging)"

    def __init__(self, rss: RssSampler) -> None:
        super().__init__(rss)
        self.stager = DefaultStager(
            StagingOptions(
                use_pinned_memory=False,
                use_shared_memory=False,
                use_async_staging=True,
                use_non_blocking_copy=False,
            )
        )
        self.upload: Future[Any] | None = None
        self.staging: Future[Any] | None = None

    def save(self, path: Path, ckpt: Ckpt, state: State) -> None:
        if self.upload is not None:
            self.upload.result()
        response = dcp.async_save(
            state, storage_writer=_writer(path), no_dist=True, async_stager=self.stager
        )
        assert not isinstance(response, Future)
        self.upload, self.staging = response.upload_completion, response.staging_completion
        self._watch(ckpt, path, response.upload_completion.result)

    def before_step(self) -> None:
        if self.staging is not None:
            self.staging.result()
            self.staging = None

    def close(self) -> None:
        self.stager.close()


# --------------------------------------------------------------------------- the loop


@dataclass
class Run:
    name: str
    compute_s: list[float] = field(default_factory=list)  # per step, blocked time excluded
    step_s: list[float] = field(default_factory=list)  # per step, wall
    overlapped: list[bool] = field(default_factory=list)
    staging: list[bool] = field(default_factory=list)  # the first step after a save call
    ckpts: list[Ckpt] = field(default_factory=list)
    rss_before: int = 0
    rss_peak: int = 0
    rss_end: int = 0
    drain_s: float = 0.0
    wall_s: float = 0.0
    own_cpu_s: float = 0.0  # this process's CPU time during the run
    others_cpu_s: float = 0.0  # every other process's (noise: the machine is shared)
    pool_bytes: int | None = None
    error: str | None = None


def train(
    trainer: Trainer, method: Method | None, steps: int, every: int, work: Path, rss: RssSampler
) -> Run:
    run = Run(method.name if method else "no checkpoint")
    gc.collect()
    LIBC.malloc_trim(0)  # hand back what earlier methods freed, so it is not silently reused
    run.rss_before = rss.reset()
    all_cpu, own_cpu = cpu_seconds()
    start_wall = time.perf_counter()
    intervals: list[tuple[float, float]] = []  # (start, end) of each step's compute
    pending: Ckpt | None = None  # the checkpoint whose pre-step wait is still to be measured
    try:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            trainer.compute()
            blocked = 0.0
            if method is not None:
                t1 = time.perf_counter()
                method.before_step()
                blocked = time.perf_counter() - t1
                if pending is not None:
                    pending.pre_step_s, pending = blocked, None
            trainer.optim.step()
            t3 = time.perf_counter()
            run.compute_s.append(t3 - t0 - blocked)
            intervals.append((t0, t3))
            if method is not None and step == 1:
                method.prepare(trainer.state)
            if method is not None and step % every == 0:
                pending = Ckpt(step, time.perf_counter())
                method.save(work / f"step{step:05d}", pending, trainer.state)
                pending.call_s = time.perf_counter() - pending.t_call
                run.ckpts.append(pending)
            run.step_s.append(time.perf_counter() - t0)
        if method is not None:
            start = time.perf_counter()
            method.drain()
            run.drain_s = time.perf_counter() - start
    except Exception:
        run.error = _failed(run.name)
        if method is not None:
            method.drain()
    finally:
        if method is not None:
            method.close()
            run.pool_bytes = method.pool_bytes
    run.rss_peak, run.rss_end = rss.peak, rss.now()
    run.wall_s = time.perf_counter() - start_wall
    all_now, own_now = cpu_seconds()
    run.own_cpu_s = own_now - own_cpu
    run.others_cpu_s = (all_now - all_cpu) - run.own_cpu_s
    in_background = [c for c in run.ckpts if method and method.background]
    busy = [(c.t_call, c.t_done or c.t_call) for c in in_background]
    run.overlapped = [any(s < b and a < e for s, e in busy) for a, b in intervals]
    calls = {c.step for c in in_background}
    run.staging = [step in calls for step in range(len(intervals))]  # step k+1 is index k
    return run


def disk_write(tensors: list[torch.Tensor], work: Path, streams: int) -> float:
    """GB/s of writing the state's bytes with os.write + fdatasync (save_load's raw writer)."""
    path = work / f"raw-{streams}-{time.monotonic_ns()}"
    os.sync()
    start = time.perf_counter()
    raw_write(path, tensors, streams)
    seconds = time.perf_counter() - start
    shutil.rmtree(path)
    return sum(t.nbytes for t in tensors) / seconds / GB


# --------------------------------------------------------------------------- summary


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize_run(
    run: Run, base_compute: float, base_rss_extra: int, nbytes: int
) -> dict[str, Any]:
    ok = [c for c in run.ckpts if c.error is None and c.t_done is not None]
    stalls = [c.stall_s for c in run.ckpts]
    over = [s for s, o in zip(run.compute_s, run.overlapped, strict=True) if o]
    # The step right after the save call overlaps the staging copy (lazy; DCP's async stager)
    # as well as the first writes; later overlapped steps only overlap writes.
    steps = list(zip(run.compute_s, run.overlapped, run.staging, strict=True))
    staging = _median([s for s, o, first in steps if o and first])
    later = _median([s for s, o, first in steps if o and not first])
    e2e = [c.bytes / (c.t_done - c.t_call) / GB for c in ok if c.t_done]
    lib = [c.bytes / c.lib_seconds / GB for c in ok if c.lib_seconds]
    rss_after = [c.rss_after for c in ok if c.rss_after is not None]
    growth = rss_after[-1] - rss_after[1] if len(rss_after) > 2 else None
    idle = [s for s, o in zip(run.compute_s, run.overlapped, strict=True) if not o]
    over_median, idle_median = _median(over), _median(idle)
    # Per save, the time steps took beyond the baseline compute; the last step (and the save
    # made in it, whose background part only overlaps the final drain) is left out.
    lost = sum(s - base_compute for s in run.step_s[:-1])
    saves_before_last = sum(1 for c in run.ckpts if c.step < len(run.step_s))
    return {
        "saves": len(run.ckpts),
        "failed": len(run.ckpts) - len(ok) + (1 if run.error else 0),
        "stall_median_s": _median(stalls),
        "stall_first_s": stalls[0] if stalls else None,
        "stall_max_s": max(stalls) if stalls else None,
        "call_median_s": _median([c.call_s for c in run.ckpts]),
        "pre_step_median_s": _median([c.pre_step_s for c in run.ckpts]),
        "overlapped_steps": len(over),
        "compute_overlapped_median_s": over_median,
        "speed_during_save": base_compute / over_median if over_median else None,
        "speed_staging_step": base_compute / staging if staging else None,
        "speed_later_steps": base_compute / later if later else None,
        "speed_vs_run_idle": idle_median / over_median if over_median and idle_median else None,
        "e2e_gbps_median": _median(e2e),
        "lib_gbps_median": _median(lib),
        "save_bytes": ok[0].bytes if ok else None,
        "lost_per_save_s": lost / saves_before_last if saves_before_last else None,
        "others_cores": run.others_cpu_s / run.wall_s if run.wall_s else None,
        "rss_extra_peak_bytes": run.rss_peak - run.rss_before,
        "rss_extra_peak_vs_state": (run.rss_peak - run.rss_before) / nbytes,
        "rss_extra_over_loop_vs_state": (run.rss_peak - run.rss_before - base_rss_extra) / nbytes,
        "rss_after_saves_over_before": [r - run.rss_before for r in rss_after],
        "rss_growth_2nd_to_last_bytes": growth,
        "rss_end_over_before": run.rss_end - run.rss_before,
        "pool_bytes": run.pool_bytes,
        "pool_vs_state": run.pool_bytes / nbytes if run.pool_bytes is not None else None,
        "drain_s": run.drain_s,
    }


def markdown(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["summary"]
    gb = result["model"]["state_bytes"] / GB
    lines = [
        f"async_save {result['timestamp']}: {result['model']['params'] / 1e6:.0f}M params + Adam "
        f"= {gb:.2f} GB state, {result['args']['steps']} steps, checkpoint every "
        f"{result['args']['every']}; {m['cores']} cores, {m['torch_threads']} torch threads, "
        f"torch {m['torch']}; load avg {m['loadavg_1m_at_start']:.2f} -> "
        f"{m['loadavg_1m_at_end']:.2f}",
        "",
        f"Baseline compute step (no checkpoint): {s['baseline_compute_s']:.3f} s median. "
        f"Disk write (fdatasync), best of 1/2 streams at start/end: {s['disk_gbps']:.2f} GB/s "
        f"({', '.join(f'{k} {v:.2f}' for k, v in s['disk_samples'].items())}). "
        f"The no-checkpoint loop itself peaks {s['baseline_rss_extra_bytes'] / GB:.2f} GB over "
        "its starting RSS.",
        "",
        "| method | stall median s | first | max | in call / before step s | "
        "speed during bg save | staging step / later | same-run idle/overlapped | "
        "e2e GB/s | vs disk | lib GB/s | "
        "lost s/save | extra RSS peak GB (x state) | net of loop (x state) | "
        "RSS after saves GB | other procs, cores | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, r in s["methods"].items():
        after = " ".join(f"{b / GB:.2f}" for b in r["rss_after_saves_over_before"])
        vs_disk = r["e2e_gbps_median"] / s["disk_gbps"] if r["e2e_gbps_median"] else None
        speed = _fmt(r["speed_during_save"], ".2f", f"x ({r['overlapped_steps']} steps)")
        lines.append(
            f"| {name} | {_fmt(r['stall_median_s'], '.3f')} | {_fmt(r['stall_first_s'], '.2f')} "
            f"| {_fmt(r['stall_max_s'], '.2f')} | {_fmt(r['call_median_s'], '.3f')} / "
            f"{_fmt(r['pre_step_median_s'], '.3f')} | {speed} "
            f"| {_fmt(r['speed_staging_step'], '.2f', 'x')} / "
            f"{_fmt(r['speed_later_steps'], '.2f', 'x')} "
            f"| {_fmt(r['speed_vs_run_idle'], '.2f', 'x')} "
            f"| {_fmt(r['e2e_gbps_median'])} | {_fmt(vs_disk, '.2f', 'x')} "
            f"| {_fmt(r['lib_gbps_median'])} | {_fmt(r['lost_per_save_s'])} "
            f"| {r['rss_extra_peak_bytes'] / GB:.2f} ({r['rss_extra_peak_vs_state']:.2f}) "
            f"| {r['rss_extra_over_loop_vs_state']:.2f} | {after} "
            f"| {_fmt(r['others_cores'])} | {r['failed']} |"
        )
    lines += ["", "| check | measured | target | status |", "|---|---:|---:|:---:|"]
    for c in s["checks"]:
        lines.append(
            f"| {c['check']} | {_fmt(c['value'], '.2f')} | {c['target']} | {c['status']} |"
        )
    errors = [(n, r["error"]) for n, r in result["runs"].items() if r["error"]]
    for name, err in errors:
        lines += ["", f"{name} failed:", "```", err.rstrip(), "```"]
    return "\n".join(lines)


def checks(methods: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    dcp_async = [k for k in methods if k.startswith("DCP async")]
    dcp_all = [k for k in methods if k.startswith("DCP")]
    best_stall = min(
        (methods[k]["stall_median_s"] for k in dcp_async if methods[k]["stall_median_s"]),
        default=None,
    )
    best_tput = max(
        (methods[k]["e2e_gbps_median"] for k in dcp_all if methods[k]["e2e_gbps_median"]),
        default=None,
    )
    lazy = methods.get("unickpt lazy", {})
    out = []

    def add(check: str, value: float | None, target: str, ok: float, higher: bool) -> None:
        out.append(
            {"check": check, "value": value, "target": target, "status": _check(value, ok, higher)}
        )

    stall = lazy.get("stall_median_s")
    add(
        "unickpt lazy stall / DCP async best stall",
        stall / best_stall if stall is not None and best_stall else None,
        f"<= {TARGETS['stall_vs_dcp']}",
        TARGETS["stall_vs_dcp"],
        False,
    )
    for name in ("unickpt lazy", f"unickpt lazy, {CAPPED_RATE / GB:.1f} GB/s cap", "unickpt async"):
        r = methods.get(name, {})
        add(
            f"{name}: compute speed during bg save vs idle",
            r.get("speed_during_save"),
            f">= {TARGETS['speed']}",
            TARGETS["speed"],
            True,
        )
        tput = r.get("e2e_gbps_median")
        add(
            f"{name}: e2e throughput / DCP best",
            tput / best_tput if tput and best_tput else None,
            f">= {TARGETS['throughput_vs_dcp']}",
            TARGETS["throughput_vs_dcp"],
            True,
        )
        add(  # exact: what the library keeps, free of the RSS sampler's noise
            f"{name}: staging pool / state",
            r.get("pool_vs_state"),
            f"<= {TARGETS['rss_vs_state']}",
            TARGETS["rss_vs_state"],
            False,
        )
        add(
            f"{name}: extra peak RSS over the no-checkpoint loop / state",
            r.get("rss_extra_over_loop_vs_state"),
            f"<= {TARGETS['rss_vs_state']}",
            TARGETS["rss_vs_state"],
            False,
        )
    return out


# --------------------------------------------------------------------------- entry point

METHODS: dict[str, Callable[[RssSampler], Method]] = {
    "unickpt lazy": lambda rss: UnickptMethod(rss, "lazy"),
    "unickpt lazy capped": lambda rss: UnickptMethod(rss, "lazy", max_write_rate=CAPPED_RATE),
    "unickpt lazy unreserved": lambda rss: UnickptMethod(rss, "lazy", reserve=False),
    "unickpt async": lambda rss: UnickptMethod(rss, "async"),
    "unickpt async unreserved": lambda rss: UnickptMethod(rss, "async", reserve=False),
    "unickpt sync": lambda rss: UnickptMethod(rss, "sync"),
    "dcp-staged": DcpAsyncStaged,
    "dcp-default": DcpAsyncDefault,
    "dcp-sync": DcpSync,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=parse_count, default=parse_count("110M"))
    parser.add_argument("--width", type=int, default=1024, help="block width (hidden = 4x)")
    parser.add_argument("--batch", type=int, default=64, help="rows per step")
    parser.add_argument("--steps", type=int, default=24, help="measured steps per method")
    parser.add_argument("--every", type=int, default=4, help="checkpoint every N steps")
    parser.add_argument(
        "--methods",
        default=",".join(m for m in METHODS if "unreserved" not in m),
        help=f"comma-separated subset of: {', '.join(METHODS)}",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for training (default: torch's, every core); fewer leaves cores "
        "free, as on a GPU host where the training loop's CPU threads mostly wait",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=RESULTS_DIR / "tmp",
        help="where checkpoints are written (a fresh subdirectory, removed after)",
    )
    args = parser.parse_args()
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(chosen) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods: {sorted(unknown)}")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"async_save-{stamp}-", dir=args.dir))
    rss = RssSampler()
    start = time.perf_counter()
    trainer = Trainer(args.params, args.width, args.batch)
    log(
        f"model: {trainer.blocks} blocks x width {args.width}, {trainer.params / 1e6:.1f}M params,"
        f" state {trainer.nbytes / GB:.2f} GB, built in {time.perf_counter() - start:.1f} s;"
        f" checkpoints under {work}"
    )
    result: dict[str, Any] = {
        "timestamp": stamp,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(work),
        "model": {
            "blocks": trainer.blocks,
            "width": args.width,
            "params": trainer.params,
            "tensors": len(trainer.tensors()),
            "state_bytes": trainer.nbytes,
        },
    }
    disk: dict[str, float] = {}
    runs: dict[str, Run] = {}
    try:
        for streams in (1, 2):
            disk[f"start {streams} stream(s)"] = disk_write(trainer.tensors(), work, streams)
        log(f"disk: {disk}")
        runs["baseline (start)"] = train(trainer, None, args.steps, args.every, work, rss)
        for key in chosen:
            method = METHODS[key](rss)
            ckpt_dir = work / key.replace(" ", "-")
            ckpt_dir.mkdir()
            log(f"{method.name} ...")
            run = train(trainer, method, args.steps, args.every, ckpt_dir, rss)
            runs[method.name] = run
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            stalls = ", ".join(f"{c.stall_s:.2f}" for c in run.ckpts)
            log(
                f"  stalls s: {stalls}; drain {run.drain_s:.1f} s; df free "
                f"{shutil.disk_usage(work).free / GB:.0f} GB"
            )
        runs["baseline (end)"] = train(trainer, None, args.steps, args.every, work, rss)
        for streams in (1, 2):
            disk[f"end {streams} stream(s)"] = disk_write(trainer.tensors(), work, streams)
    finally:
        rss.stop()
        shutil.rmtree(work, ignore_errors=True)
    result["machine"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    baselines = [runs["baseline (start)"], runs["baseline (end)"]]
    base_compute = statistics.median([s for run in baselines for s in run.compute_s])
    base_rss_extra = min(run.rss_peak - run.rss_before for run in baselines)
    methods = {
        name: summarize_run(run, base_compute, base_rss_extra, trainer.nbytes)
        for name, run in runs.items()
        if not name.startswith("baseline")
    }
    result["runs"] = {name: asdict(run) for name, run in runs.items()}
    result["summary"] = {
        "baseline_compute_s": base_compute,
        "baseline_rss_extra_bytes": base_rss_extra,
        "disk_samples": disk,
        "disk_gbps": max(disk.values()),
        "methods": methods,
        "checks": checks(methods),
    }

    write_results("async_save", stamp, result, markdown(result))


if __name__ == "__main__":
    main()
