"""The ``unickpt`` command line: inspect (table and --json), verify and gc.

Most tests run the typer app in-process; one runs the installed console script.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
from typing import Any

import pytest
import torch
from typer.testing import CliRunner, Result

import unickpt
from unickpt.cli.main import _size, app
from unickpt.errors import StorageError
from unickpt.format.manifest import Manifest, TensorMeta

from dist_harness import run_distributed

STEP = 7


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "model.w": torch.randn(4, 8, generator=g),
        "model.big": torch.randn(256, 8, generator=g),
        "model.b": torch.randn(8, generator=g).to(torch.bfloat16),
        "steps": torch.tensor(12),
    }


def _save_two_ranks(rank: int, world_size: int, path: str) -> None:
    """Matrices split by rows between the ranks; the rest replicated (written once)."""
    state: dict[str, Any] = {"meta": {"lr": 0.5}}
    for key, value in tensors().items():
        if value.dim() == 2:
            rows = value.shape[0] // world_size
            local = value[rank * rows : (rank + 1) * rows]
            state[key] = unickpt.ShardedTensor(local, value.shape, (rank * rows, 0))
        else:
            state[key] = value
    unickpt.save(path, state, step=STEP, user_metadata={"run": "cli-test"})


@pytest.fixture(scope="module")
def two_rank_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A checkpoint written by 2 ranks (shared by the module: copy it before changing it)."""
    path = os.path.join(os.fspath(tmp_path_factory.mktemp("cli")), "step_7")
    run_distributed(2, _save_two_ranks, path)
    return path


@pytest.fixture
def ckpt(two_rank_ckpt: str, tmp_path: pathlib.Path) -> str:
    """A private copy of the 2-rank checkpoint."""
    return shutil.copytree(two_rank_ckpt, os.path.join(tmp_path, "step_7"))


def invoke(*args: str) -> Result:
    # Wide enough that rich never wraps the header or truncates a table cell.
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})


def flip_byte_of(path: str, key: str) -> str:
    """Corrupt the first chunk of tensor ``key``; returns the data file's manifest name."""
    chunk = unickpt.inspect(path).tensors[key].chunks[0]
    with open(os.path.join(path, chunk.file), "r+b") as f:
        f.seek(chunk.offset)
        byte = f.read(1)[0]
        f.seek(chunk.offset)
        f.write(bytes([byte ^ 0xFF]))
    return chunk.file


def tree(path: str) -> dict[str, bytes]:
    """Every file under ``path`` with its content."""
    return {
        os.path.relpath(os.path.join(d, f), path): pathlib.Path(d, f).read_bytes()
        for d, _, files in os.walk(path)
        for f in files
    }


def test_inspect_shows_tensors_chunks_bytes_step_and_writer(two_rank_ckpt: str) -> None:
    result = invoke("inspect", two_rank_ckpt)
    assert result.exit_code == 0, result.output
    out = result.stdout
    header = out.splitlines()[0]
    for fragment in [two_rank_ckpt, f"step={STEP}", "format v1", "in 2 file(s)", "world_size=2"]:
        assert fragment in header, f"{fragment!r} not in {header!r}"
    rows = [
        ("model.b", "bfloat16", "[8]", 1, "16 B"),
        ("model.big", "float32", "[256, 8]", 2, "8.0 KiB"),
        ("model.w", "float32", "[4, 8]", 2, "128 B"),
        ("steps", "int64", "[]", 1, "8 B"),
    ]
    for key, dtype, shape, chunks, size in rows:
        row = r"\s*│\s*".join(re.escape(str(cell)) for cell in (key, dtype, shape, chunks, size))
        cells = f"{key} {dtype} {shape} {chunks} {size}"
        assert re.search(rf"│\s*{row}\s*│", out), f"no row {cells}:\n{out}"
    assert 'objects: {"meta.lr": 0.5}' in out, out
    assert 'user_metadata: {"run": "cli-test"}' in out, out


def test_inspect_json_prints_the_manifest(two_rank_ckpt: str) -> None:
    result = invoke("inspect", two_rank_ckpt, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc == json.loads(unickpt.inspect(two_rank_ckpt).to_json())
    assert (doc["format"], doc["version"], doc["step"]) == ("unickpt", 1, STEP)
    assert doc["writer"]["world_size"] == 2
    assert sorted(doc["tensors"]) == sorted(tensors())
    assert [len(doc["tensors"][k]["chunks"]) for k in ("model.w", "steps")] == [2, 1]


def test_verify_passes_a_good_checkpoint(two_rank_ckpt: str) -> None:
    result = invoke("verify", two_rank_ckpt)
    assert result.exit_code == 0, result.output
    assert "OK: 4 tensors, 6 chunks in 2 file(s)" in result.stdout, result.stdout


def test_verify_fails_a_corrupted_checkpoint_naming_the_problem(ckpt: str) -> None:
    file = flip_byte_of(ckpt, "model.big")
    result = invoke("verify", ckpt)
    assert result.exit_code == 1, result.output
    assert "OK" not in result.stdout
    err = result.stderr
    assert err.startswith("ERROR: ") and "failed verification (1 problem(s))" in err, err
    for fragment in ["tensor 'model.big'", "checksum mismatch", file]:
        assert fragment in err, f"{fragment!r} not in {err!r}"


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_incomplete_checkpoint_is_reported_as_incomplete(ckpt: str, command: str) -> None:
    os.remove(os.path.join(ckpt, "manifest.json"))
    result = invoke(command, ckpt)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"INCOMPLETE: checkpoint {ckpt} is incomplete"), result.stderr


def test_inspect_of_nothing_is_an_error(tmp_path: pathlib.Path) -> None:
    result = invoke("inspect", os.fspath(tmp_path / "nowhere"))
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("ERROR: no checkpoint at"), result.stderr


def test_gc_removes_incomplete_checkpoints_only(ckpt_root: str) -> None:
    committed = os.path.join(ckpt_root, "step_1")
    unickpt.save(committed, tensors(), step=1)
    abandoned = os.path.join(ckpt_root, "step_2")
    unickpt.save(abandoned, tensors(), step=2)
    os.remove(os.path.join(abandoned, "manifest.json"))  # data/*.safetensors, no manifest
    assert os.listdir(os.path.join(abandoned, "data")), "the incomplete checkpoint holds data"
    running = os.path.join(ckpt_root, "step_3")  # an in-flight save by a live process (us)
    unickpt.save(running, tensors(), step=3)
    os.remove(os.path.join(running, "manifest.json"))
    with open(os.path.join(running, "_inflight.json"), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": "2024-01-01"}, f)
    os.makedirs(os.path.join(ckpt_root, "notes"))
    pathlib.Path(ckpt_root, "notes", "todo.txt").write_text("not a checkpoint")

    before = tree(ckpt_root)
    dry = invoke("gc", ckpt_root, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "kept step_2 (incomplete): dry run" in dry.stdout, dry.stdout
    assert tree(ckpt_root) == before, "--dry-run deleted or changed files"

    result = invoke("gc", ckpt_root)
    assert result.exit_code == 0, result.output
    assert "removed step_2 (incomplete)" in result.stdout, result.stdout
    assert f"kept step_3 (incomplete): save in progress (pid {os.getpid()} alive)" in (
        result.stdout
    ), result.stdout
    assert "step_1" not in result.stdout and "notes" not in result.stdout, result.stdout
    assert sorted(os.listdir(ckpt_root)) == ["notes", "step_1", "step_3"]
    kept = {k: v for k, v in before.items() if not k.startswith("step_2/")}
    assert tree(ckpt_root) == kept, "gc touched a file outside the incomplete checkpoint"
    assert invoke("verify", committed).exit_code == 0
    target = {k: torch.zeros_like(v) for k, v in tensors().items()}
    unickpt.load(committed, target)
    for key, expected in tensors().items():
        assert torch.equal(target[key], expected), key

    os.remove(os.path.join(running, "_inflight.json"))  # that save died without a trace
    again = invoke("gc", ckpt_root)
    assert again.exit_code == 0 and "removed step_3 (incomplete)" in again.stdout, again.output
    assert invoke("gc", ckpt_root).stdout.strip() == "nothing to collect"


def test_installed_console_script(ckpt: str) -> None:
    script = os.path.join(os.path.dirname(sys.executable), "unickpt")
    assert os.access(script, os.X_OK), f"console script not installed next to {sys.executable}"
    file = flip_byte_of(ckpt, "model.w")
    run = subprocess.run(
        [script, "verify", ckpt],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "250"},  # wrapping is test_errors_are_not_wrapped's job
    )
    assert run.returncode == 1, run
    assert run.stdout == "", run.stdout
    for fragment in ["ERROR: ", "tensor 'model.w'", "checksum mismatch", os.path.join(ckpt, file)]:
        assert fragment in run.stderr, f"{fragment!r} not in {run.stderr!r}"


def test_errors_are_not_wrapped(ckpt: str, tmp_path: pathlib.Path) -> None:
    path = shutil.move(ckpt, tmp_path / ("long-run-name-" * 6) / "step_7")  # > 80 characters
    file = flip_byte_of(path, "model.w")
    result = CliRunner().invoke(app, ["verify", os.fspath(path)], env={"COLUMNS": "80"})
    assert result.exit_code == 1, result.output
    assert os.path.join(path, file) in result.stderr, result.stderr


def test_gc_accepts_checkpoint_names_with_colons(ckpt_root: str) -> None:
    committed = os.path.join(ckpt_root, "run-2024-06-01T10:00:00")
    unickpt.save(committed, tensors(), step=1)
    result = invoke("gc", ckpt_root)
    assert result.exit_code == 0, repr(result.exception)
    assert result.stdout.strip() == "nothing to collect"
    unickpt.verify(committed)


SIZES = [
    (0, "0 B"),
    (1023, "1023 B"),
    (1024, "1.0 KiB"),
    (1280, "1.2 KiB"),  # 1.25: half to even, as before
    (1024**2 - 1, "1024.0 KiB"),
    (3 * 1024**4, "3.0 TiB"),
    (2**70 - 1, "1024.0 EiB"),
    (2**70, ">= 2^70 B"),
    (10**320, ">= 2^1063 B"),  # beyond any float: float(n) raised OverflowError
]


@pytest.mark.parametrize(("nbytes", "shown"), SIZES, ids=[shown for _, shown in SIZES])
def test_sizes_are_formatted_with_integer_arithmetic(nbytes: int, shown: str) -> None:
    assert _size(nbytes) == shown


def test_inspect_prints_absurd_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    # The manifest parser bounds sizes; the table must not depend on it to stay up.
    huge = TensorMeta("float32", (10**160, 10**160), [])
    manifest = Manifest({"w": huge}, files={"data/f.safetensors": 10**330})
    monkeypatch.setattr("unickpt.cli.main.inspect", lambda path: manifest)
    result = invoke("inspect", "ckpt")
    assert result.exit_code == 0, repr(result.exception)
    assert ">= 2^1096 B in 1 file(s)" in result.stdout.splitlines()[0], result.stdout
    assert ">= 2^1065 B" in result.stdout, result.stdout


def test_names_are_printed_verbatim_not_as_markup(tmp_path: pathlib.Path) -> None:
    path = os.fspath(tmp_path / "run[/]")
    unickpt.save(path, {"w[/]": torch.zeros(2), "cfg": {"note": "[bold]x[/]"}})
    result = invoke("inspect", path)
    assert result.exit_code == 0, repr(result.exception)
    assert result.stdout.startswith(f"{path}  step=None"), result.stdout
    assert "w[/]" in result.stdout and '"[bold]x[/]"' in result.stdout, result.stdout
    missing = invoke("inspect", path + "-missing")
    assert missing.exit_code == 1, repr(missing.exception)
    assert missing.stderr == f"ERROR: no checkpoint at {path}-missing\n", missing.stderr


def test_gc_failure_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise StorageError("cannot list s3://bucket/run: access denied")

    monkeypatch.setattr("unickpt.cli.main.collect_garbage", fail)
    result = invoke("gc", "s3://bucket/run")
    assert result.exit_code == 1, repr(result.exception)
    assert result.stderr == "ERROR: cannot list s3://bucket/run: access denied\n", result.stderr


def test_a_lone_surrogate_is_refused_at_save_and_printed_escaped(tmp_path: pathlib.Path) -> None:
    """JSON can escape a lone surrogate, but the safetensors library refuses a header naming
    one, and no encoding prints one: save refuses such a key, and inspect shows a crafted
    manifest's escaped instead of failing with UnicodeEncodeError."""
    path = tmp_path / "ck"
    with pytest.raises(unickpt.InvalidStateError, match="lone surrogate"):
        unickpt.save(os.fspath(path), {"w\ud800": torch.zeros(2)})
    unickpt.save(os.fspath(path), {"wx": torch.zeros(2)})
    manifest = path / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"wx"', '"w\\ud800"'))
    shown = invoke("inspect", os.fspath(path))
    assert shown.exit_code == 0, shown.output
    assert "w\\ud800" in shown.stdout, shown.stdout


def test_control_characters_from_a_checkpoint_are_printed_escaped(tmp_path: pathlib.Path) -> None:
    """Names from a checkpoint cannot send escape sequences to the terminal (or a log file):
    each control character (C0, DEL, C1) is printed as repr writes it."""
    key = "w\x1b[2J\x1b]0;pwned\x07\x7f\x9b31m"
    path = os.fspath(tmp_path / "run\x1b[31m")
    unickpt.save(path, {key: torch.zeros(2), "cfg": {"k\x1b": "v\x9b"}})
    (tmp_path / "root" / "gone\x1b[2J").mkdir(parents=True)  # empty: gc removes it
    shown = invoke("inspect", path)
    missing = invoke("inspect", path + "\x07-missing")
    collected = invoke("gc", os.fspath(tmp_path / "root"))
    assert shown.exit_code == collected.exit_code == 0 and missing.exit_code == 1
    for result in (shown, missing, collected):
        output = result.stdout + result.stderr
        assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", output), repr(output)
    assert shown.stdout.startswith(f"{tmp_path}/run\\x1b[31m  step=None"), shown.stdout
    assert "w\\x1b[2J\\x1b]0;pwned\\x07\\x7f\\x9b31m" in shown.stdout, shown.stdout
    assert '{"cfg.k\\u001b": "v\\u009b"}' in shown.stdout, shown.stdout  # as JSON escapes them
    assert missing.stderr == f"ERROR: no checkpoint at {tmp_path}/run\\x1b[31m\\x07-missing\n"
    assert collected.stdout == "removed gone\\x1b[2J (incomplete): empty\n", collected.stdout
