"""Saver processes for tests/test_crash.py, served by a fork server.

``python tests/crash_saver.py`` imports torch and unickpt and builds the base state once (seconds),
then forks one saver process per rank for each request read from stdin (milliseconds), so that a
crash trial costs a save, not an interpreter start. Each saver saves ``root/step_0``,
``root/step_1``, ... until it has saved ``steps`` checkpoints or is killed; the server reaps it.

Protocol, one JSON object per line.
  stdin:  {"root": DIR, "steps": N, "world": 1 or 2, "store": FILE (rendezvous, world > 1),
           "mode": "sync", "async" or "lazy" (a background save is waited for before the next)}
  stdout: {"event": "ready"} once the server can fork; then, per request,
          {"event": "forked", "pids": [...]}, the savers' {"event": "saving", "rank", "step"}
          (just before ``unickpt.save``) and {"event": "committed", "rank", "step", "seconds"}
          (once it returned, or its handle's ``wait()`` did), and last {"event": "reaped",
          "codes": [...]}: each saver's exit code, negative when a signal killed it. EOF on
          stdin ends the server.

The test imports :func:`base_state`, :func:`state_at` and :func:`rank_state` to recompute the
values a checkpoint of a given step must hold.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist

import unickpt

SEED = 20240611


def base_state() -> dict[str, torch.Tensor]:
    """About 33 MiB in tensors of several dtypes and shapes (and one 0-d)."""
    g = torch.Generator().manual_seed(SEED)
    return {
        "model.embed": torch.randn(2048, 2048, generator=g),
        "model.proj": torch.randn(2048, 1024, generator=g).to(torch.bfloat16),
        "model.head": torch.randn(1024, 2048, generator=g).to(torch.float16),
        "optim.exp_avg": torch.randn(1000, 1500, generator=g),
        "counts": torch.randint(-(2**40), 2**40, (256, 1024), generator=g),
        "mask": torch.rand(1000, 1000, generator=g) < 0.5,
        "scale": torch.tensor(3.25, dtype=torch.float64),
    }


def state_at(base: dict[str, torch.Tensor], step: int) -> dict[str, Any]:
    """The full state saved at ``step``: every tensor differs from one step to the next."""
    state: dict[str, Any] = {
        key: t ^ bool(step % 2) if t.dtype == torch.bool else t + step for key, t in base.items()
    }
    state["meta"] = {"step": step}
    return state


def rank_state(state: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """``rank``'s part of ``state``: matrices split by rows, everything else replicated."""
    if world == 1:
        return state
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            rows = value.shape[0]
            lo, hi = rows * rank // world, rows * (rank + 1) // world
            out[key] = unickpt.ShardedTensor(value[lo:hi], value.shape, (lo, 0))
        else:
            out[key] = value
    return out


def _emit(**event: Any) -> None:
    # One os.write per line: lines from the server and its savers never interleave.
    os.write(1, (json.dumps(event) + "\n").encode())


def _save_loop(request: dict[str, Any], rank: int, base: dict[str, torch.Tensor]) -> None:
    world, mode = int(request["world"]), request.get("mode", "sync")
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{request['store']}", rank=rank, world_size=world
        )
    for step in range(int(request["steps"])):
        state = rank_state(state_at(base, step), rank, world)
        _emit(event="saving", rank=rank, step=step)
        start = time.monotonic()
        saved = unickpt.save(
            os.path.join(request["root"], f"step_{step}"), state, step=step, mode=mode
        )
        if isinstance(saved, unickpt.SaveHandle):
            saved.wait()
        _emit(event="committed", rank=rank, step=step, seconds=time.monotonic() - start)


def _serve(request: dict[str, Any], base: dict[str, torch.Tensor]) -> None:
    pids = []
    for rank in range(int(request["world"])):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _save_loop(request, rank, base)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    _emit(event="forked", pids=pids)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    _emit(event="reaped", codes=codes)


def main() -> None:
    torch.set_num_threads(1)  # no intra-op threads in the server: forking it stays safe
    base = base_state()
    _emit(event="ready")
    for line in sys.stdin:
        if line.strip():
            _serve(json.loads(line), base)


if __name__ == "__main__":
    main()
