"""Crash consistency: SIGKILL savers at random instants, then check what is left on disk.

Every checkpoint directory must be either committed, verifying and loading bit-exact to the values
of its step, or refused as incomplete; ``collect_garbage`` must remove exactly the incomplete ones.

Savers are forked by one server process per module (tests/crash_saver.py), so a trial costs one or
two saves (tens of milliseconds here), not an interpreter start with torch (seconds). Each trial
arms on a saver's "saving step k" report and kills after a delay drawn uniformly from
[0, 1.5 x the duration of the previous save], so kills land anywhere in a save and sometimes just
after it. Trials take the save modes in turn (sync, async, lazy: a background save is waited for
before the next one begins), so the background write path is killed too. Set UNICKPT_CRASH_SEED
to replay a run's schedule (the timing itself still varies).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import unickpt

from crash_saver import base_state, state_at

SAVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crash_saver.py")
MAX_STEPS = 20  # a saver stops by itself after this many saves (only if a kill never came)
WINDOW = 1.5  # kill delay ~ U[0, WINDOW x last save's duration) after the arming report
ARM_AT_FIRST_SAVE_EVERY = 4  # every 4th trial kills during the first save, the rest later
MODES = ("sync", "async", "lazy")  # trial i saves in MODES[i % 3]
EVENT_TIMEOUT = 120.0
RESAVE_TRIALS = 3


class SaverServer:
    """tests/crash_saver.py running as a fork server, and a queue of the events it reports."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, SAVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.save_seconds = 0.0  # duration of the latest completed save, the kill window's scale
        ready = self.next_event()
        assert ready == {"event": "ready"}, f"saver server did not start: {ready}"

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._events.put(json.loads(line))
        self._events.put(None)

    def next_event(self) -> dict[str, Any]:
        try:
            event = self._events.get(timeout=EVENT_TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"saver server silent for {EVENT_TIMEOUT}s") from None
        if event is None:
            self._events.put(None)  # so that later calls fail fast too
            raise AssertionError(f"saver server exited with code {self.process.wait()}")
        return event

    def request(self, **fields: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(fields) + "\n")
        self.process.stdin.flush()

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=EVENT_TIMEOUT)


@dataclass
class Trial:
    """One run of savers killed at a random instant, and what they reported before dying."""

    root: str
    world: int
    mode: str
    arm_step: int
    delay: float = 0.0
    announced: int = -1  # the highest step whose save rank 0 had begun
    reported: set[int] = field(default_factory=set)  # steps whose save returned on every rank
    codes: list[int] = field(default_factory=list)  # exit codes of the reaped savers

    def describe(self) -> str:
        return (
            f"world={self.world} {self.mode} armed at 'saving step_{self.arm_step}', killed "
            f"{self.delay * 1e3:.1f} ms later; last save begun: step_{self.announced}; "
            f"saves returned: {sorted(self.reported)}; exit codes {self.codes}"
        )


@dataclass
class Outcome:
    """What a trial left under its root, by checkpoint directory name."""

    committed: list[str]
    incomplete: list[str]
    crash_point: str  # where the last save begun stopped, judged by the files it left


def crash_point(path: str) -> str:
    """Where in the commit protocol the save of ``path`` stopped, judged by its files."""
    if not os.path.isdir(path):
        return "before creating the directory"
    files = [os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs]
    if "manifest.json" in files:
        return "after commit, marker left" if "_inflight.json" in files else "after commit"
    if any(f.startswith("manifest.json.tmp-") for f in files):
        return "writing the manifest"
    if any(f.startswith("data/") and ".tmp-" not in f for f in files):
        return "data renamed into place, no manifest"
    if any(f.startswith("data/") for f in files):
        return "writing data"
    return "in-flight marker only" if files else "empty directory"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SaverServer]:
    server = SaverServer()
    # Calibrate the kill window, and check that a saver left alone saves and exits cleanly.
    root = os.fspath(tmp_path_factory.mktemp("calibration"))
    server.request(root=root, steps=2, world=1, store="")
    while (event := server.next_event())["event"] != "reaped":
        if event["event"] == "committed":
            server.save_seconds = event["seconds"]
    assert event["codes"] == [0], f"an uninterrupted saver failed: {event}"
    assert sorted(os.listdir(root)) == ["step_0", "step_1"]
    shutil.rmtree(root)
    yield server
    server.close()


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    return base_state()


@pytest.fixture
def rng() -> random.Random:
    seed = int(os.environ.get("UNICKPT_CRASH_SEED", random.randrange(2**32)))
    print(f"UNICKPT_CRASH_SEED={seed}")
    return random.Random(seed)


def run_trial(
    server: SaverServer, tmp: str, *, world: int, mode: str, arm_step: int, rng: random.Random
) -> Trial:
    """Start ``world`` savers writing under a new root in ``tmp``; SIGKILL them all at random."""
    root = tempfile.mkdtemp(prefix="trial-", dir=tmp)
    store = os.path.join(tmp, f"store-{uuid.uuid4().hex}")  # gloo rendezvous file
    trial = Trial(root, world, mode, arm_step)
    pids: list[int] = []
    returned: dict[int, int] = {}

    def record(event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "forked":
            pids.extend(event["pids"])
        elif kind == "saving" and event["rank"] == 0:
            trial.announced = max(trial.announced, event["step"])
        elif kind == "committed":
            server.save_seconds = event["seconds"]
            returned[event["step"]] = returned.get(event["step"], 0) + 1
            if returned[event["step"]] == world:
                trial.reported.add(event["step"])
        elif kind == "reaped":
            trial.codes = event["codes"]

    server.request(root=root, steps=MAX_STEPS, world=world, store=store, mode=mode)
    try:
        while not trial.codes and (not pids or trial.announced < arm_step):
            record(server.next_event())
        if not trial.codes:
            trial.delay = rng.uniform(0.0, WINDOW * server.save_seconds)
            time.sleep(trial.delay)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
        while not trial.codes:
            record(server.next_event())
    finally:
        if not trial.codes:  # failed mid-trial: kill the savers, let the server reap them
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            while server.next_event()["event"] != "reaped":
                pass
    print(trial.describe())
    assert trial.codes == [-signal.SIGKILL] * world, (
        f"every saver should have died of SIGKILL: {trial.describe()}"
    )
    return trial


def has_files(path: str) -> bool:
    return any(files for _, _, files in os.walk(path))


def load_bit_exact(path: str, step: int, base: dict[str, torch.Tensor]) -> None:
    """Load ``path`` into zeroed tensors and compare every one with step ``step``'s values."""
    expected = state_at(base, step)
    target = {k: torch.zeros_like(v) for k, v in expected.items() if isinstance(v, torch.Tensor)}
    target["meta"] = {"step": None}
    result = unickpt.load(path, target)
    assert result.step == step, f"{path}: manifest step {result.step}, expected {step}"
    assert target["meta"] == {"step": step}, f"{path}: object meta.step is {target['meta']}"
    for key, tensor in target.items():
        if key != "meta":
            assert torch.equal(tensor, expected[key]), (
                f"{path}: tensor {key!r} does not hold step {step}'s values"
            )


def check_committed(path: str, step: int, base: dict[str, torch.Tensor]) -> None:
    manifest = unickpt.inspect(path)
    assert manifest.step == step, f"{path}: manifest step {manifest.step}, expected {step}"
    report = unickpt.verify(path)
    expected_bytes = sum(meta.nbytes for meta in manifest.tensors.values())
    assert report.bytes_checked == expected_bytes, (
        f"{path}: verify checked {report.bytes_checked} bytes of {expected_bytes}"
    )
    load_bit_exact(path, step, base)


def check_trial(trial: Trial, base: dict[str, torch.Tensor]) -> Outcome:
    """Classify and check every checkpoint directory the trial left; then gc and re-check."""
    names = set(os.listdir(trial.root))
    begun = [f"step_{i}" for i in range(trial.announced + 1)]
    # Directories exist for every save begun, except perhaps the last (killed before its mkdir).
    assert names in (set(begun[:-1]), set(begun)), (
        f"unexpected directories {sorted(names)} after saves up to step_{trial.announced} began"
    )
    outcome = Outcome([], [], crash_point(os.path.join(trial.root, begun[-1])))
    for step, name in enumerate(begun[: len(names)]):
        path = os.path.join(trial.root, name)
        try:
            unickpt.inspect(path)
        except unickpt.IncompleteCheckpointError:
            assert step == trial.announced, (
                f"{name} is incomplete, but a later save began, so this one had returned"
            )
            with pytest.raises(unickpt.IncompleteCheckpointError, match="no committed"):
                unickpt.load(path, {"scale": torch.zeros((), dtype=torch.float64)})
            with pytest.raises(unickpt.IncompleteCheckpointError):
                unickpt.verify(path)
            outcome.incomplete.append(name)
            continue
        check_committed(path, step, base)
        outcome.committed.append(name)
    returned = {f"step_{s}" for s in trial.reported}
    assert returned <= set(outcome.committed), (
        f"saves of {sorted(returned - set(outcome.committed))} returned but are not committed"
    )

    entries = unickpt.collect_garbage(trial.root)
    assert sorted(e.name for e in entries) == outcome.incomplete, (
        f"gc considered {entries}, expected exactly the incomplete {outcome.incomplete}"
    )
    assert all(e.removed for e in entries), f"gc kept an abandoned checkpoint: {entries}"
    left = sorted(os.listdir(trial.root))
    assert left == sorted(outcome.committed), f"after gc: {left}"
    for name in outcome.committed:
        load_bit_exact(os.path.join(trial.root, name), int(name.removeprefix("step_")), base)
    return outcome


def crash_trials(
    server: SaverServer,
    base: dict[str, torch.Tensor],
    rng: random.Random,
    tmp_path: os.PathLike[str],
    *,
    trials: int,
    world: int,
) -> None:
    prior_commit = interrupted = armed_later = 0
    crash_points: Counter[str] = Counter()
    for index in range(trials):
        arm_step = 0 if index % ARM_AT_FIRST_SAVE_EVERY == 0 else 1
        armed_later += arm_step
        mode = MODES[index % len(MODES)]
        trial = run_trial(
            server, os.fspath(tmp_path), world=world, mode=mode, arm_step=arm_step, rng=rng
        )
        outcome = check_trial(trial, base)
        print(f"  -> {outcome}")
        crash_points[f"{mode}: {outcome.crash_point}"] += 1
        interrupted += bool(outcome.incomplete)
        prior_commit += any(
            int(name.removeprefix("step_")) < trial.announced for name in outcome.committed
        )
        shutil.rmtree(trial.root)  # ~100 MB per trial
    print(
        f"{trials} trials: {interrupted} left an incomplete checkpoint, {prior_commit} had a "
        f"committed one before the last save; last save stopped: {dict(crash_points)}"
    )
    assert prior_commit >= armed_later, (
        f"only {prior_commit} trials kept a committed checkpoint before the killed save; "
        f"every one of the {armed_later} armed after the first save should have"
    )
    # The kill window is scaled to a save, so most kills interrupt one; a run where (almost)
    # none did would test nothing.
    assert interrupted >= max(1, trials // 10), (
        f"only {interrupted} of {trials} kills interrupted a save"
    )


def test_sigkill_during_save_leaves_committed_or_incomplete(
    server: SaverServer,
    base: dict[str, torch.Tensor],
    rng: random.Random,
    tmp_path: os.PathLike[str],
) -> None:
    crash_trials(server, base, rng, tmp_path, trials=24, world=1)


def test_sigkill_during_two_rank_save(
    server: SaverServer,
    base: dict[str, torch.Tensor],
    rng: random.Random,
    tmp_path: os.PathLike[str],
) -> None:
    crash_trials(server, base, rng, tmp_path, trials=8, world=2)


@pytest.mark.slow
def test_sigkill_during_save_soak(
    server: SaverServer,
    base: dict[str, torch.Tensor],
    rng: random.Random,
    tmp_path: os.PathLike[str],
) -> None:
    crash_trials(server, base, rng, tmp_path, trials=200, world=1)
    crash_trials(server, base, rng, tmp_path, trials=40, world=2)


def test_resave_to_an_interrupted_path_commits_a_clean_checkpoint(
    server: SaverServer,
    base: dict[str, torch.Tensor],
    rng: random.Random,
    tmp_path: os.PathLike[str],
) -> None:
    """Retrying the killed save at the same path commits; the dead save's data files go."""
    resaved = 0
    for index in range(5 * RESAVE_TRIALS):
        mode = MODES[index % len(MODES)]
        trial = run_trial(server, os.fspath(tmp_path), world=1, mode=mode, arm_step=1, rng=rng)
        path = os.path.join(trial.root, f"step_{trial.announced}")
        if has_files(path) and not os.path.exists(os.path.join(path, "manifest.json")):
            unickpt.save(path, state_at(base, trial.announced), step=trial.announced)
            manifest = unickpt.inspect(path)
            data = sorted(f"data/{name}" for name in os.listdir(os.path.join(path, "data")))
            assert data == sorted(manifest.files), f"leftovers of the killed save remain: {data}"
            assert not os.path.exists(os.path.join(path, "_inflight.json"))
            check_committed(path, trial.announced, base)
            assert unickpt.collect_garbage(trial.root) == [], "gc found something after the retry"
            resaved += 1
        shutil.rmtree(trial.root)
        if resaved == RESAVE_TRIALS:
            return
    pytest.fail(f"only {resaved} of {5 * RESAVE_TRIALS} kills interrupted a save")


def test_resave_removes_top_level_leftovers(ckpt_root: str) -> None:
    path = os.path.join(ckpt_root, "step_0")
    os.makedirs(os.path.join(path, "data"))
    leftovers = [
        "_inflight.json.tmp-0123456789ab",
        "manifest.json.tmp-0123456789ab",
        "data/r00000-0123456789ab-0.safetensors",
        "data/r00000-0123456789ab-0.safetensors.tmp-ba9876543210",
    ]
    for name in leftovers:
        with open(os.path.join(path, name), "wb") as f:
            f.write(b"written by a killed save")
    unickpt.save(path, {"w": torch.ones(3)}, step=0)
    manifest = unickpt.inspect(path)
    on_disk = sorted(
        os.path.relpath(os.path.join(d, f), path) for d, _, files in os.walk(path) for f in files
    )
    assert on_disk == sorted(["manifest.json", *manifest.files]), on_disk
