"""Real signals (SIGINT, SIGTERM) arriving while a save runs its collectives.

Raised between two collectives, an interrupt left the rank's peers waiting in the next one until
the process group's timeout, or paired their collectives with the rank's later ones (a peer
then failed with a JSON or UTF-32 decoding error and died of SIGABRT in gloo). Saves, loads and
the manager's collective calls hold the signal and deliver it when they end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import torch

import unickpt

from dist_harness import run_distributed

RATE = 4e6  # bytes/s: a save of 8 MiB then takes about two seconds


def _signal_in(seconds: float, *signums: int) -> None:
    """Send this process ``signums``, one per 0.2 s, starting ``seconds`` from now."""

    def send() -> None:
        time.sleep(seconds)
        for signum in signums:
            os.kill(os.getpid(), signum)
            time.sleep(0.2)

    threading.Thread(target=send, daemon=True).start()


def _timed_save(path: str, state: dict[str, Any], **options: Any) -> tuple[str, float]:
    started = time.monotonic()
    try:
        unickpt.save(path, state, **options)
    except BaseException as exc:  # the interrupt is what is asked about
        return type(exc).__name__, time.monotonic() - started
    return "returned", time.monotonic() - started


def test_ctrl_c_during_a_save_is_raised_when_the_save_has_committed(
    ckpt_root: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """The user is told at once that the interrupt is held, and how to act sooner."""
    state = {"w": torch.ones(2 << 20)}
    _signal_in(0.5, signal.SIGINT)
    outcome, seconds = _timed_save(f"{ckpt_root}/held", state, max_write_rate=RATE)
    assert outcome == "KeyboardInterrupt" and seconds > 1.5, (outcome, seconds)
    assert "unickpt: SIGINT held until this checkpoint operation ends" in capfd.readouterr().err
    unickpt.verify(f"{ckpt_root}/held")  # committed before the interrupt was raised
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_a_second_ctrl_c_stops_the_save_uncommitted(ckpt_root: str) -> None:
    """The second is not held: in the write phase it is raised once the writer threads are
    done (the process would wait for them to exit anyway), after the commit told the peers."""
    state = {"w": torch.ones(2 << 20)}
    _signal_in(0.3, signal.SIGINT, signal.SIGINT)
    outcome, _ = _timed_save(f"{ckpt_root}/twice", state, max_write_rate=RATE)
    assert outcome == "KeyboardInterrupt"
    assert not os.path.exists(f"{ckpt_root}/twice/manifest.json")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


class _Looking:
    """A Stateful that records the handlers in place while the save collects it, and installs
    one of its own for SIGTERM."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def mine(self, signum: int, frame: object) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        self.seen = {
            "INT": signal.getsignal(signal.SIGINT),
            "TERM": signal.getsignal(signal.SIGTERM),
        }
        signal.signal(signal.SIGTERM, self.mine)
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def test_only_python_handlers_are_held_and_one_installed_meanwhile_is_kept(
    ckpt_root: str,
) -> None:
    """SIGTERM's default disposition ends the process at once and is left alone (held, a rank
    waiting in a collective for a late peer stopped dying on SIGTERM); a handler the call
    itself installs is not overwritten when it ends."""
    looking = _Looking()
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        unickpt.save(f"{ckpt_root}/look", {"w": torch.ones(4), "s": looking})
        assert looking.seen["INT"] is not signal.default_int_handler  # held
        assert looking.seen["TERM"] == signal.SIG_DFL  # not held
        assert signal.getsignal(signal.SIGTERM) == looking.mine  # kept
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_preemption_handler_runs_once_the_save_is_done(ckpt_root: str) -> None:
    """SIGTERM with a handler that exits, as preempted SLURM and Kubernetes jobs get."""
    calls: list[float] = []

    def preempted(signum: int, frame: object) -> None:
        calls.append(time.monotonic())
        raise SystemExit(143)

    previous = signal.signal(signal.SIGTERM, preempted)
    try:
        _signal_in(0.5, signal.SIGTERM)
        started = time.monotonic()
        outcome, _ = _timed_save(
            f"{ckpt_root}/term", {"w": torch.ones(2 << 20)}, max_write_rate=RATE
        )
    finally:
        handler = signal.signal(signal.SIGTERM, previous)
    assert outcome == "SystemExit" and len(calls) == 1 and calls[0] - started > 1.5
    assert handler is preempted
    unickpt.verify(f"{ckpt_root}/term")


def _interrupted_in_the_first_collective(rank: int, world_size: int, root: str) -> str:
    state = {f"w{rank}": torch.ones(1024)}
    if rank == 0:
        time.sleep(3)  # rank 1 waits for it in the save's first collective
    else:
        _signal_in(1, signal.SIGINT)
    outcome, seconds = _timed_save(f"{root}/ckpt", state)
    return f"{outcome} {seconds:.1f}"


def test_an_interrupt_while_waiting_for_a_peer_leaves_the_save_whole(ckpt_root: str) -> None:
    first, second = run_distributed(
        2, _interrupted_in_the_first_collective, ckpt_root, pg_timeout=20, timeout=90
    )
    assert first.startswith("returned"), first
    assert second.startswith("KeyboardInterrupt"), second
    assert float(second.split()[1]) < 10, second  # after the save, not the timeout
    unickpt.verify(f"{ckpt_root}/ckpt")


_CLOSED_STDERR_SAVE = """
import os, signal, sys, threading, time, torch, unickpt
def later():
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGINT)
threading.Thread(target=later).start()
try:
    unickpt.save(sys.argv[1], {"w": torch.ones(2 << 20)}, max_write_rate=4e6)
except KeyboardInterrupt:
    sys.exit(3)
"""


def test_the_notice_of_a_held_signal_never_goes_to_a_file_in_place_of_stderr(
    ckpt_root: str,
) -> None:
    """A process started with stderr closed: file descriptor 2 goes to the first file opened,
    a data file of the save, which then held the notice among its bytes and failed to load."""
    path = f"{ckpt_root}/closed"
    child = subprocess.run(
        [sys.executable, "-c", _CLOSED_STDERR_SAVE, path],
        preexec_fn=lambda: os.close(2),  # in the child alone, before exec
        timeout=120,
        check=False,
    )
    assert child.returncode == 3  # the interrupt, raised once the save had committed
    unickpt.verify(path)
