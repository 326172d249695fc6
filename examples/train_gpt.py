"""unickpt demo: train a GPT with FSDP2 on two ranks, crash, resume on one plain process.

Run with no arguments (``make demo``). The script plays out a small resharding story:

Phase 1, world 2
    The script relaunches itself under ``torchrun`` with two CPU ranks (gloo). Each rank builds
    the same GPT, wraps every block and the root with FSDP2 ``fully_shard`` and trains with
    AdamW; a ``unickpt.CheckpointManager`` in lazy mode checkpoints every ``CKPT_EVERY`` steps:
    the copy of the state overlaps the next forward/backward and the loop only blocks (the
    "stall") if the optimizer step arrives before the copy is done. At the last step the job
    "crashes" right before the checkpoint is committed: the shards are on disk, the manifest is
    not.

Phase 2, world 1
    ``CheckpointManager.restore`` finds the newest *committed* checkpoint (the torn one has no
    manifest), and loads model, optimizer and trainer state into the same model built without
    FSDP, and trains on. The steps lost in the crash are
    replayed on the same data, so their losses can be compared with the ones phase 1 saw.

Checkpoints go to ``out/demo`` (wiped at start); phase 1 hands its losses and save statistics
to phase 2 in ``out/demo/phase1.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from gpt import GPT, GPTConfig, synthetic_batch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import unickpt

ROOT = Path(__file__).resolve().parents[1] / "out" / "demo"
REPORT = ROOT / "phase1.json"
WORKER_FLAG = "--phase1-worker"

CFG = GPTConfig()
PHASE1_WORLD = 2
SEED = 0
GLOBAL_BATCH = 8  # sequences per step, split evenly across the ranks
LR = 3e-4
CKPT_EVERY = 10
CRASH_STEP = 40  # phase 1 dies while committing this step's checkpoint
TOTAL_STEPS = 60  # phase 2 trains until here
LOG_EVERY = 5


@dataclass
class SaveStats:
    """One checkpoint save, aggregated over all ranks."""

    step: int
    world: int
    bytes: int  # sum over ranks
    seconds: float  # slowest rank, background time from the call to the commit
    stall: float  # slowest rank, time the training loop was blocked by this save
    committed: bool


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW with the demo's hyper-parameters (identical in both phases)."""
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)


def train_step(model: GPT, optim: torch.optim.Optimizer, tokens: torch.Tensor) -> torch.Tensor:
    """One optimizer step on ``tokens``; returns the (detached) local loss."""
    loss = model.loss(tokens)
    loss.backward()
    optim.step()
    optim.zero_grad(set_to_none=True)
    return loss.detach()


def checkpoint_path(step: int) -> Path:
    """Where the checkpoint of ``step`` lives."""
    return ROOT / unickpt.CheckpointManager.name_for(step)


def log(phase: int, message: str) -> None:
    """Print one progress line, tagged with the phase and its world size."""
    world = PHASE1_WORLD if phase == 1 else 1
    print(f"[phase {phase} | world {world}] {message}", flush=True)


# --------------------------------------------------------------------------------------------
# Phase 1: FSDP2 on two ranks (runs inside torchrun)
# --------------------------------------------------------------------------------------------


def phase1_worker() -> None:
    """Train with FSDP2 up to ``CRASH_STEP``, checkpointing every ``CKPT_EVERY`` steps."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    torch.manual_seed(SEED)  # same initial weights on every rank; fully_shard keeps each slice
    model = GPT(CFG)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = make_optimizer(model)
    manager = unickpt.CheckpointManager(
        str(ROOT), every_n_steps=CKPT_EVERY, keep_last=3, mode="lazy"
    )

    per_rank = GLOBAL_BATCH // world
    losses: dict[int, float] = {}
    handles: dict[int, unickpt.SaveHandle] = {}
    stalls: dict[int, float] = {}
    for step in range(1, CRASH_STEP + 1):
        tokens = synthetic_batch(CFG, step, GLOBAL_BATCH, SEED)[rank * per_rank :][:per_rank]
        loss = model.loss(tokens)
        loss.backward()
        blocked = time.perf_counter()
        manager.before_update()  # what optim.step's pre-hook does: wait for a pending copy
        if handles:
            stalls[max(handles)] += time.perf_counter() - blocked
        optim.step()
        optim.zero_grad(set_to_none=True)
        loss = loss.detach()
        dist.all_reduce(loss)  # gloo has no AVG: sum, then divide
        losses[step] = loss.item() / world
        if rank == 0 and step % LOG_EVERY == 0:
            log(1, f"step {step:3d}  loss {losses[step]:.4f}")

        called = time.perf_counter()
        handle = manager.maybe_save(
            step, {"model": model, "optim": optim, "trainer": {"step": step}}
        )
        if isinstance(handle, unickpt.SaveHandle):
            handles[step] = handle
            stalls[step] = time.perf_counter() - called

    manager.close()
    saves = []
    for step, handle in handles.items():
        result = handle.wait()
        assert result is not None
        stats = torch.tensor([result.seconds, stalls[step]], dtype=torch.float64)
        total = torch.tensor([result.bytes_written], dtype=torch.int64)
        dist.all_reduce(total)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        committed = step != CRASH_STEP
        saves.append(SaveStats(step, world, int(total), *stats.tolist(), committed))
        if rank == 0 and committed:
            log(
                1,
                f"saved step {step}: {_rate(int(total), stats[0].item())}, training "
                f"stalled {stats[1].item() * 1e3:.1f} ms",
            )

    if rank == 0:
        # unickpt commits a checkpoint by publishing manifest.json last; without it the
        # directory is exactly what a crash between writing the shards and the commit leaves.
        (checkpoint_path(CRASH_STEP) / "manifest.json").unlink()
        log(1, f"simulated crash while committing {checkpoint_path(CRASH_STEP).name}")
        report = {"losses": losses, "saves": [asdict(s) for s in saves]}
        REPORT.write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


def run_phase1() -> tuple[dict[int, float], list[SaveStats]]:
    """Run :func:`phase1_worker` on two ranks under torchrun; return its losses and saves."""
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", f"--nproc_per_node={PHASE1_WORLD}", __file__, WORKER_FLAG]
    # One intra-op thread per rank: two ranks share the machine's cores.
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    report = json.loads(REPORT.read_text())
    losses = {int(step): loss for step, loss in report["losses"].items()}
    return losses, [SaveStats(**s) for s in report["saves"]]


# --------------------------------------------------------------------------------------------
# Phase 2: resume in this plain process (world 1, no FSDP)
# --------------------------------------------------------------------------------------------


def run_phase2() -> tuple[dict[int, float], int, tuple[int, float]]:
    """Resume from the newest committed checkpoint and train to ``TOTAL_STEPS``.

    Returns the losses, the step resumed from and the load's (bytes, seconds).
    """
    manager = unickpt.CheckpointManager(str(ROOT))
    committed = [info.name for info in manager.list()]
    log(
        2,
        f"committed checkpoints: {committed}; {checkpoint_path(CRASH_STEP).name} has no "
        "manifest, so it does not exist",
    )
    model = GPT(CFG)  # fresh random weights: everything that matters comes from the checkpoint
    optim = make_optimizer(model)
    trainer = {"step": 0}
    started = time.perf_counter()
    restored = manager.restore({"model": model, "optim": optim, "trainer": trainer})
    seconds = time.perf_counter() - started
    assert restored is not None and restored == trainer["step"]
    resumed_from = restored
    size = unickpt.inspect(str(checkpoint_path(restored))).total_bytes
    log(2, f"restored step {restored}: {_rate(size, seconds)}; trainer {trainer}")

    losses: dict[int, float] = {}
    for step in range(resumed_from + 1, TOTAL_STEPS + 1):
        tokens = synthetic_batch(CFG, step, GLOBAL_BATCH, SEED)
        losses[step] = train_step(model, optim, tokens).item()
        if step % LOG_EVERY == 0:
            log(2, f"step {step:3d}  loss {losses[step]:.4f}")
    return losses, resumed_from, (size, seconds)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _rate(n_bytes: int, seconds: float) -> str:
    """``n_bytes`` moved in ``seconds``, human-readable."""
    return f"{n_bytes / 1e6:.1f} MB in {seconds:.2f} s ({n_bytes / 1e9 / seconds:.2f} GB/s)"


def print_loss_chart(
    phase1: dict[int, float], phase2: dict[int, float], resumed_from: int, width: int = 50
) -> None:
    """ASCII chart of both phases' losses; steps trained by both phases appear side by side."""
    top = max(*phase1.values(), *phase2.values())
    replayed = sorted(phase1.keys() & phase2.keys())
    shown = sorted({s for s in phase1.keys() | phase2.keys() if s % LOG_EVERY == 0 or s == 1})
    print(
        f"\nLoss  (# phase 1: FSDP2, world 2    = phase 2: plain, world 1, "
        f"resumed from step {resumed_from})"
    )
    print(f"{'step':>5}  {'phase 1':>8}  {'phase 2':>8}")
    for step in shown:
        cells = [f"{d[step]:8.4f}" if step in d else " " * 8 for d in (phase1, phase2)]
        loss, mark = (phase2[step], "=") if step in phase2 else (phase1[step], "#")
        note = "  <- resumed here" if step == resumed_from else ""
        print(f"{step:5d}  {cells[0]}  {cells[1]}  {mark * round(width * loss / top)}{note}")
    if replayed:
        drift = max(abs(phase1[s] - phase2[s]) for s in replayed)
        print(
            f"Steps {replayed[0]}-{replayed[-1]} ran in both phases (lost in the crash, then "
            f"replayed): max |loss difference| = {drift:.2e}"
        )


def print_io_table(saves: list[SaveStats], load: tuple[int, float], resumed_from: int) -> None:
    """Checkpoint size, throughput and training stall of every save, and the load."""
    rows = [
        (
            f"lazy save step {s.step}" + ("" if s.committed else " (crashed)"),
            s.world,
            s.bytes,
            s.seconds,
            f"{s.stall * 1e3:.1f}",
        )
        for s in saves
    ]
    rows.append((f"restore step {resumed_from}", 1, load[0], load[1], "-"))
    header = f"{'operation':<28}{'world':>6}{'MB':>9}{'seconds':>9}{'GB/s':>7}{'stall ms':>10}"
    print("\n" + header)
    for name, world, n_bytes, seconds, stall in rows:
        print(
            f"{name:<28}{world:>6}{n_bytes / 1e6:>9.1f}{seconds:>9.2f}"
            f"{n_bytes / 1e9 / seconds:>7.2f}{stall:>10}"
        )


def main() -> None:
    """Run both phases and print the loss curve and the I/O table."""
    start = time.perf_counter()
    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    n_params = sum(p.numel() for p in GPT(CFG).parameters())
    print(f"GPT: {n_params / 1e6:.1f}M parameters, {CFG}; checkpoints in {ROOT}", flush=True)

    phase1_losses, saves = run_phase1()
    phase2_losses, resumed_from, load = run_phase2()

    print_loss_chart(phase1_losses, phase2_losses, resumed_from)
    print_io_table(saves, load, resumed_from)
    print(f"\nDone in {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    if WORKER_FLAG in sys.argv[1:]:
        phase1_worker()
    else:
        main()
