"""Conversion streams: peak memory grows with the largest tensor, not with the checkpoint.

The checkpoint is 40 tensors of 16 MiB (640 MiB). A child process imports everything and runs
each operation once on a tiny checkpoint (so that lazily created thread pools and caches exist),
then measures ``export_hf``, ``import_hf`` and ``import_dcp`` of the big one in turn: before
each, it returns freed heap pages to the OS, takes its resident set as the baseline and restarts
the kernel's peak counter (VmHWM); the operation's cost is the peak minus the baseline. (Not
``ru_maxrss``: a child inherits its parent's across fork + exec, so it would report pytest's.)

Why 4x the largest tensor is the bound: the streaming writer has at most three tensors alive,
the one being written, one queued and the one being produced (producing a tensor may instead hold
a second buffer of it: a DCP chunk being copied into place, a dtype cast); one more tensor's worth
covers allocator slack. Holding the model would cost 640 MiB, 10x the bound. Measured: export_hf
+16 MiB, import_hf +32-48 MiB, import_dcp +48 MiB (+64 MiB once in about 20 runs while the writer
thread kept the tensor it had written until the next one arrived).

The files live on tmpfs when there is enough: the test is about process memory (tmpfs pages read
with ``pread`` are page cache, not RSS), and a noisy shared disk would spend most of the test's
time writing 2.5 GB.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from unickpt.engine.stream import LazyTensor, stream_save

COUNT = 40
ELEMENTS = 4 << 20  # float32: 16 MiB per tensor
TENSOR_BYTES = ELEMENTS * 4
BOUND = 4 * TENSOR_BYTES
MiB = 1 << 20


def _value(i: int, elements: int) -> torch.Tensor:
    return torch.full((elements,), float(i), dtype=torch.float32)


def _make_unickpt(path: str, count: int, elements: int) -> None:
    """A checkpoint of ``count`` model tensors, written streaming (one tensor in memory)."""
    entries = [
        (
            f"model.layers.{i}.weight",
            LazyTensor((elements,), torch.float32, lambda i=i: _value(i, elements)),
        )
        for i in range(count)
    ]
    stream_save(path, entries)


def _make_dcp(path: str, count: int, elements: int) -> None:
    """A single-process DCP checkpoint (dcp.save needs every tensor in memory at once)."""
    import torch.distributed.checkpoint as dcp

    state = {"model": {f"layers.{i}.weight": _value(i, elements) for i in range(count)}}
    dcp.save(state, checkpoint_id=path, no_dist=True)


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _growth(run: Callable[[], object]) -> int:
    """Bytes this process's resident set peaked above where it stood before ``run``."""
    import gc

    import psutil

    from unickpt.engine.buffers import release_freed_memory

    gc.collect()
    release_freed_memory()
    baseline = psutil.Process().memory_info().rss
    Path("/proc/self/clear_refs").write_text("5")  # restart VmHWM from the current RSS
    run()
    return _peak_rss() - baseline


def _child(scratch: str) -> None:
    """Measure the three operations on COUNT x ELEMENTS tensors; print the growths as JSON."""
    import warnings

    from unickpt.convert.dcp import import_dcp
    from unickpt.convert.export_hf import export_hf
    from unickpt.convert.hf import import_hf

    warnings.simplefilter("ignore")
    path = lambda name: os.path.join(scratch, name)  # noqa: E731
    _make_unickpt(path("tiny"), 2, 1024)
    export_hf(path("tiny"), path("tiny_hf"))
    import_hf(path("tiny_hf"), path("tiny_back"))
    _make_dcp(path("tiny_dcp"), 2, 1024)
    import_dcp(path("tiny_dcp"), path("tiny_dcp_back"))

    growth = {}
    _make_unickpt(path("source"), COUNT, ELEMENTS)
    growth["export_hf"] = _growth(
        lambda: export_hf(path("source"), path("hf"), max_shard_size="200MB")
    )
    shutil.rmtree(path("source"))
    growth["import_hf"] = _growth(lambda: import_hf(path("hf"), path("back")))
    shutil.rmtree(path("hf"))
    shutil.rmtree(path("back"))
    _make_dcp(path("dcp"), COUNT, ELEMENTS)
    growth["import_dcp"] = _growth(lambda: import_dcp(path("dcp"), path("back")))
    print(json.dumps(growth))


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and shutil.disk_usage(shm).free > 4 << 30 else str(tmp_path)
    root = Path(tempfile.mkdtemp(prefix="unickpt-memory-", dir=base))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux procfs")
def test_conversions_hold_a_few_tensors_not_the_model(scratch: Path) -> None:
    done = subprocess.run(
        [sys.executable, __file__, str(scratch)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    growth = json.loads(done.stdout.strip().splitlines()[-1])
    report = ", ".join(f"{op} +{b / MiB:.0f} MiB" for op, b in growth.items())
    print(f"peak RSS growth ({COUNT} x {TENSOR_BYTES // MiB} MiB tensors): {report}")
    assert set(growth) == {"export_hf", "import_hf", "import_dcp"}
    for operation, grown in growth.items():
        assert grown < BOUND, f"{operation}: {report}; bound {BOUND // MiB} MiB"


if __name__ == "__main__":
    _child(sys.argv[1])
