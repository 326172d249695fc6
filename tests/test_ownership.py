"""unickpt deletes only what its saves wrote: a save refuses a target holding anything else, cleans
up only its own kind of leftovers, never publishes over another save's commit, and gc leaves
directories that are not checkpoints (an HF export) alone."""

from __future__ import annotations

import os
import pathlib
import uuid
from typing import Any

import pytest
import torch
from s3_server import BUCKET

import unickpt
from unickpt.convert import import_hf
from unickpt.engine.save import tidy
from unickpt.format.manifest import read_manifest
from unickpt.storage import LocalStorage, S3Storage

MODES = ["sync", "async", "lazy"]


def state() -> dict[str, Any]:
    return {"w": torch.arange(12.0).reshape(3, 4), "step": 7}


def assert_holds_state(path: str) -> None:
    target = {"w": torch.zeros(3, 4), "step": 0}
    unickpt.load(path, target)
    assert torch.equal(target["w"], state()["w"]) and target["step"] == 7


def save(path: Any, mode: str) -> None:
    handle = unickpt.save(path, state(), mode=mode)  # type: ignore[call-overload]
    if isinstance(handle, unickpt.SaveHandle):
        handle.wait()


def files_under(root: pathlib.Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("mode", MODES)
def test_a_save_into_a_run_directory_is_refused_and_deletes_nothing(
    tmp_path: pathlib.Path, mode: str
) -> None:
    """The step sub-directory left out: the run directory holds a log and a committed
    checkpoint, and both stay as they are."""
    run = tmp_path / "run"
    unickpt.save(str(run / "step_100"), state())
    (run / "train.log").write_text("epoch 1\n")
    before = files_under(run)
    with pytest.raises(unickpt.CheckpointError, match=r"holds files that no unickpt save wrote"):
        save(str(run), mode)
    assert files_under(run) == before
    assert_holds_state(str(run / "step_100"))


def test_a_save_over_its_own_leftovers_is_allowed(tmp_path: pathlib.Path) -> None:
    """What an interrupted save to the path left (marker, data files, temporaries) is no reason
    to refuse; the new save deletes it after its commit."""
    path = tmp_path / "step_5"
    (path / "data").mkdir(parents=True)
    leftovers = [
        "_inflight.json",
        "manifest.json.tmp-0123456789ab",
        "data/r00000-0123456789ab-0.safetensors",
        "data/r00001-0123456789ab-0.safetensors.tmp-0123456789ab",
    ]
    for name in leftovers:
        (path / name).write_bytes(b"half")
    unickpt.save(str(path), state())
    assert not set(leftovers) & set(files_under(path))
    assert_holds_state(str(path))


def test_tidy_deletes_only_what_saves_write(tmp_path: pathlib.Path) -> None:
    """Files put into a checkpoint's directory after its save claimed it are not the save's."""
    path = tmp_path / "ckpt"
    unickpt.save(str(path), state())
    (path / "data" / "r00003-0123456789ab-0.safetensors").write_bytes(b"an earlier attempt's")
    (path / "notes.md").write_text("mine")
    (path / "data" / "README").write_text("mine too")
    (path / "model.safetensors.tmp-0123456789ab").write_text("an HF export's temporary")
    storage = LocalStorage(str(path))
    tidy(storage, read_manifest(storage))
    assert sorted(set(files_under(path)) - set(read_manifest(storage).files)) == [
        "data/README",
        "manifest.json",
        "model.safetensors.tmp-0123456789ab",
        "notes.md",
    ]


def test_a_conversion_into_its_own_source_is_refused(tmp_path: pathlib.Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    from safetensors.torch import save_file

    save_file({"w": torch.ones(4)}, str(hf / "model.safetensors"))
    (hf / "config.json").write_text("{}")
    before = files_under(hf)
    with pytest.raises(unickpt.CheckpointError, match=r"config\.json, model\.safetensors"):
        import_hf(hf, hf)
    assert files_under(hf) == before


@pytest.mark.usefixtures("env")
def test_a_save_into_a_bucket_prefix_of_other_objects_is_refused() -> None:
    url = f"s3://{BUCKET}/shared-{uuid.uuid4().hex[:8]}"
    S3Storage(url).put_atomic("datasets/train.bin", b"not a checkpoint's")
    with pytest.raises(unickpt.CheckpointError, match=r"datasets/train\.bin"):
        unickpt.save(url, state())
    assert S3Storage(url).list() == ["datasets/train.bin"]


class _Blind(LocalStorage):
    """Local storage whose listing is empty: a save's check of its target passes, as when
    another save to the path had not committed yet at the time."""

    def list(self, prefix: str = "") -> list[str]:
        return [] if not prefix else super().list(prefix)


def test_the_second_commit_to_one_path_fails_and_the_first_stays_whole(
    tmp_path: pathlib.Path,
) -> None:
    """Two saves racing to one path (two jobs; processes that took themselves for a world of
    one): the later commit must not replace the first, nor leave its files in it."""
    path = tmp_path / "ckpt"
    unickpt.save(str(path), state())
    before = files_under(path)
    later = {"w": torch.full((3, 4), -1.0), "step": 8}
    with pytest.raises(unickpt.CheckpointExistsError, match="another save committed"):
        unickpt.save(_Blind(str(path)), later)
    assert files_under(path) == before
    assert_holds_state(str(path))


def test_gc_leaves_an_hf_export_alone(tmp_path: pathlib.Path) -> None:
    """An export killed mid-file leaves ``model.safetensors.tmp-*`` beside the user's config:
    not a checkpoint, so not gc's."""
    export = tmp_path / "hf"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / "model.safetensors.tmp-0123456789ab").write_bytes(b"half")
    assert unickpt.collect_garbage(str(tmp_path), min_age=0) == []
    assert sorted(os.listdir(export)) == ["config.json", "model.safetensors.tmp-0123456789ab"]


def test_gc_of_an_abandoned_save_keeps_files_no_save_wrote(tmp_path: pathlib.Path) -> None:
    ckpt = tmp_path / "step_3"
    (ckpt / "data").mkdir(parents=True)
    (ckpt / "data" / "r00000-0123456789ab-0.safetensors").write_bytes(b"half")
    (ckpt / "notes.md").write_text("mine")
    (entry,) = unickpt.collect_garbage(str(tmp_path), min_age=0)
    assert not entry.removed and "kept 1 other" in entry.reason
    assert files_under(ckpt) == {"notes.md": b"mine"}


def test_gc_of_a_missing_root_is_an_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(unickpt.CheckpointNotFoundError, match="no directory"):
        unickpt.collect_garbage(str(tmp_path / "typo"))


def test_a_directory_that_is_no_checkpoint_is_not_called_incomplete(
    tmp_path: pathlib.Path,
) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(unickpt.CheckpointNotFoundError, match="is not a unickpt checkpoint"):
        unickpt.inspect(str(tmp_path))
    (tmp_path / "_inflight.json").write_text("{}")
    with pytest.raises(unickpt.IncompleteCheckpointError):
        unickpt.inspect(str(tmp_path))


@pytest.mark.parametrize(
    ("path", "error"),
    [(None, TypeError), (b"/tmp/x", TypeError), ("", ValueError), (3, TypeError)],
)
def test_a_path_that_is_no_path_is_refused(path: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="checkpoint path"):
        unickpt.save(path, state())


class _Overtaken(LocalStorage):
    """Another save commits the path while this one publishes, and this one's publish then fails
    otherwise than by finding a manifest (its temporary deleted by the other's cleanup)."""

    def put_atomic(self, path: str, data: bytes, *, replace: bool = True) -> None:
        if path == "manifest.json" and not replace:
            super().put_atomic(path, b'{"the other save": 1}', replace=False)
            raise unickpt.StorageError("cannot commit manifest.json: No such file or directory")
        super().put_atomic(path, data, replace=replace)


def test_a_failed_commit_takes_back_only_its_own_manifest(tmp_path: pathlib.Path) -> None:
    with pytest.raises(unickpt.CheckpointExistsError, match="another save committed"):
        unickpt.save(_Overtaken(str(tmp_path / "ckpt")), state())
    assert (tmp_path / "ckpt" / "manifest.json").read_bytes() == b'{"the other save": 1}'


def test_gc_leaves_other_safetensors_files_in_a_data_directory_alone(
    tmp_path: pathlib.Path,
) -> None:
    """Only names a save gives its data files (rank, save id, stream) are a save's."""
    (tmp_path / "dataset" / "data").mkdir(parents=True)
    (tmp_path / "dataset" / "data" / "train-00000.safetensors").write_bytes(b"not a save's")
    assert unickpt.collect_garbage(str(tmp_path), min_age=0) == []
    assert (tmp_path / "dataset" / "data" / "train-00000.safetensors").exists()
