"""Run a function on N gloo ranks (torch.multiprocessing spawn) and collect each rank's result.

``fn(rank, world_size, *args)`` runs with the default process group initialised; whatever it
returns (picklable: this is test plumbing, not checkpoint data) comes back in rank order. A
failure in any rank raises here with that rank's traceback; a hang is killed after ``timeout``.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Children fork from a server that imported torch (and what fully_shard pulls in lazily) once,
# instead of each re-importing it: process start drops from seconds to milliseconds.
_PRELOAD = [
    "torch",
    "torch.distributed.tensor",
    "torch.distributed.fsdp",
    "torch._dynamo",
    "unickpt",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int,
    world_size: int,
    port: int,
    out_dir: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    pg_timeout: float | None,
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    timeout = None if pg_timeout is None else datetime.timedelta(seconds=pg_timeout)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
    try:
        result = fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_distributed(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    timeout: float = 300.0,
    pg_timeout: float | None = None,
) -> list[Any]:
    """Results of ``fn`` on each of ``world_size`` ranks, in rank order; ``pg_timeout``: the
    process group's timeout in seconds (torch's default if None)."""
    multiprocessing.set_forkserver_preload(_PRELOAD)
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _entry,
            args=(world_size, free_port(), out_dir, fn, args, pg_timeout),
            nprocs=world_size,
            join=False,
            start_method="forkserver",
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{world_size}-rank run of {fn.__name__} exceeded {timeout}s")
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
