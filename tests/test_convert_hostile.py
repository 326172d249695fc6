"""Crafted foreign checkpoints: each importer refuses them quickly, with unickpt's error naming
the file, instead of hanging, exhausting memory, reading outside its source or writing escape
sequences to a terminal.

* Values that are exponentially larger as JSON, repr or str than as a pickle (a list holding
  another twice, 40 deep: a few hundred bytes) in DCP metadata and items, DeepSpeed param groups
  and version, Megatron param groups and optimizer state.
* torch.save archives whose records are compressed (torch.load would inflate them ~1000x).
* Symlinks out of the source (tracker files, tag / iteration / rank folders, ``.pt`` files) and
  oversized tracker files, whose content must not be echoed.
* A DCP ``.metadata`` that cannot be read into memory, or whose paths are long or deep; key
  names with terminal escapes.

The DeepSpeed and Megatron sources are written by hand (the few fields the importers read), so
these tests need neither DeepSpeed nor a training run.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given
from hypothesis import strategies as st
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from unickpt.convert.dcp import import_dcp
from unickpt.convert.deepspeed import import_deepspeed
from unickpt.convert.megatron import TRACKER_FILE, import_megatron
from unickpt.convert.torchfile import JsonBudget, load_torch_file
from unickpt.errors import ConversionError, CorruptCheckpointError, UnsafeCheckpointError
from unickpt.format.untrusted import json_size_bound
from unickpt.storage.local import LocalStorage

# dcp.save in one process says so even when told (no_dist=True)
pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
    # a regression hangs in C (json.dumps, repr): only the thread method can stop it
    pytest.mark.timeout(60, method="thread"),
]

DEPTH = 40  # 2**40 lists as JSON


def shared_lists(depth: int = DEPTH) -> list[Any]:
    """``x = [x, x]``, ``depth`` times: small in memory and as a pickle, 2**depth as JSON."""
    value: list[Any] = [1.0]
    for _ in range(depth):
        value = [value, value]
    return value


def torch_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def deflated(archive: bytes) -> bytes:
    """``archive`` (a torch.save zip) with every record DEFLATE-compressed."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as source, zipfile.ZipFile(out, "w") as target:
        for member in source.infolist():
            target.writestr(member.filename, source.read(member), zipfile.ZIP_DEFLATED)
    return out.getvalue()


# ------------------------------------------------------------------------------ DCP


def small_dcp(path: Path) -> None:
    state = {"model": {"w": torch.arange(8.0)}, "extra": {"cfg": 1}}
    dcp.save(state, checkpoint_id=str(path), no_dist=True)


def edit_metadata(path: Path) -> Any:
    return pickle.loads((path / ".metadata").read_bytes())  # our own file: trusted here


def add_item(path: Path, metadata: Any, key: str, blob: bytes) -> None:
    """Store ``blob`` as the non-tensor item ``key`` (in a file of its own) and save
    ``metadata``."""
    (path / "added.distcp").write_bytes(blob)
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    metadata.storage_data[MetadataIndex(key)] = _StorageInfo("added.distcp", 0, len(blob))
    metadata.planner_data.pop(key, None)
    (path / ".metadata").write_bytes(pickle.dumps(metadata))


def test_dcp_metadata_path_of_shared_lists_is_refused(tmp_path: Path) -> None:
    """``pathlib.PosixPath(x)`` in ``.metadata``, x shared lists: str(x) would never end."""
    (tmp_path / ".metadata").write_bytes(
        b"\x80\x04cpathlib\nPosixPath\n]q\x000"  # GLOBAL; x = [] (memo 0)
        + b"(h\x00h\x00lq\x000" * DEPTH  # x = [x, x]
        + b"h\x00\x85R."  # PosixPath(x)
    )
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata .*not of strings"):
        import_dcp(tmp_path, tmp_path / "out")


def test_dcp_metadata_path_of_one_string_many_times_is_refused(tmp_path: Path) -> None:
    part = b"p" * 1000
    (tmp_path / ".metadata").write_bytes(
        b"\x80\x04cpathlib\nPosixPath\n(X"
        + len(part).to_bytes(4, "little")
        + part
        + b"q\x00"
        + b"h\x00" * 10_000  # one string, referenced 10,000 times: 10 MB joined
        + b"tR."
    )
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata .*path longer than"):
        import_dcp(tmp_path, tmp_path / "out")


def test_dcp_metadata_chunk_offsets_of_shared_lists_are_refused(tmp_path: Path) -> None:
    """A malformed field is reported with a short repr, not its exponential one."""
    small_dcp(tmp_path)
    metadata = edit_metadata(tmp_path)
    metadata.state_dict_metadata["model.w"].chunks[0].offsets = shared_lists()
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata: chunk offset .* sizes") as err:
        import_dcp(tmp_path, tmp_path / "out")
    assert len(str(err.value)) < 1000


def test_dcp_value_of_shared_lists_is_refused(tmp_path: Path) -> None:
    """A non-tensor item that weights-only unpickling accepts, 2**40 lists as JSON."""
    small_dcp(tmp_path)
    add_item(tmp_path, edit_metadata(tmp_path), "extra.shared", torch_bytes(shared_lists()))
    with pytest.raises(CorruptCheckpointError, match=r"'extra\.shared'.*added\.distcp.* JSON"):
        import_dcp(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_dcp_compressed_item_is_refused(tmp_path: Path) -> None:
    small_dcp(tmp_path)
    metadata = edit_metadata(tmp_path)
    add_item(tmp_path, metadata, "extra.packed", deflated(torch_bytes(torch.zeros(1000))))
    with pytest.raises(CorruptCheckpointError, match=r"added\.distcp at byte 0.*compressed"):
        import_dcp(tmp_path, tmp_path / "out")


def test_dcp_metadata_that_does_not_fit_in_memory_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any failure to read ``.metadata`` (here memory running out) names it."""
    small_dcp(tmp_path)
    real_open = LocalStorage.open_reader

    def open_reader(self: LocalStorage, path: str) -> Any:
        reader = real_open(self, path)
        if path == ".metadata":

            def exhausted(*args: object) -> None:
                raise MemoryError

            monkeypatch.setattr(reader, "read_into", exhausted)
            monkeypatch.setattr(reader, "read", exhausted)
        return reader

    monkeypatch.setattr(LocalStorage, "open_reader", open_reader)
    with pytest.raises(CorruptCheckpointError, match=r"\.metadata is not .*MemoryError"):
        import_dcp(tmp_path, tmp_path / "out")


def test_dcp_warning_escapes_key_names(tmp_path: Path) -> None:
    """A skipped value's key is shown with its control characters escaped: a warning goes to
    the terminal unfiltered."""
    small_dcp(tmp_path)
    key = "x\x1b[2J\x1b]0;PWNED\x07"
    from fractions import Fraction  # needs unpickling beyond plain data: skipped

    add_item(tmp_path, edit_metadata(tmp_path), key, torch_bytes(Fraction(1, 3)))
    with pytest.warns(UserWarning, match="import_dcp") as caught:
        import_dcp(tmp_path, tmp_path / "out")
    (message,) = [str(w.message) for w in caught if "import_dcp" in str(w.message)]
    assert "\x1b" not in message and "\x07" not in message
    assert r"x\x1b[2J\x1b]0;PWNED\x07" in message


# ------------------------------------------------------------------------------ torch files


def test_compressed_torch_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model_optim_rng.pt"
    path.write_bytes(deflated(torch_bytes({"w": torch.zeros(1000)})))
    with pytest.raises(CorruptCheckpointError, match=r"model_optim_rng\.pt has .*compressed"):
        load_torch_file(path)


# ------------------------------------------------------------------------------ DeepSpeed

TAG = "global_step1"


def zero3(
    root: Path, *, lr: Any = 0.1, ds_version: Any = "0.16.0", group: dict[Any, Any] | None = None
) -> Path:
    """A ZeRO-3 checkpoint of one 4-element parameter ``w`` on one rank, under ``root/TAG``,
    with ``latest`` naming it; returns ``root``."""
    folder = root / TAG
    folder.mkdir(parents=True)
    torch.save(
        {
            "module": {"w": torch.empty(0)},
            "param_shapes": [{"w": torch.Size([4])}],
            "dp_world_size": 1,
            "ds_version": ds_version,
            "global_steps": 1,
        },
        folder / "zero_pp_rank_0_mp_rank_00_model_states.pt",
    )
    moments = {"exp_avg": torch.zeros(4), "exp_avg_sq": torch.ones(4), "step": 1}
    torch.save(
        {
            "optimizer_state_dict": {
                "zero_stage": 3,
                "optimizer_state_dict": {
                    "param_groups": [{"params": [0], "lr": lr, **(group or {})}],
                    "state": {0: moments},
                },
                "fp32_flat_groups": [torch.arange(4.0)],
            }
        },
        folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    )
    (root / "latest").write_text(TAG)
    return root


def test_deepspeed_hand_built_source_converts(tmp_path: Path) -> None:
    """The source the DeepSpeed cases below edit is a valid one."""
    manifest = import_deepspeed(zero3(tmp_path / "src"), str(tmp_path / "out"))
    assert "model.w" in manifest.tensors and "optim.state.w.exp_avg" in manifest.tensors


def test_deepspeed_param_group_of_shared_lists_is_refused(tmp_path: Path) -> None:
    src = zero3(tmp_path / "src", lr=shared_lists())
    with pytest.raises(CorruptCheckpointError, match=r"optim_states\.pt: .*too large as JSON"):
        import_deepspeed(src, str(tmp_path / "out"))


def test_deepspeed_param_group_key_that_is_no_string_is_refused(tmp_path: Path) -> None:
    """A tuple key of one long string many times: its str() or repr() alone would take 200 MB
    (weights-only loading accepts it, and its hash is cheap)."""
    key = tuple(["x" * 10_000] * 20_000)
    src = zero3(tmp_path / "src", group={key: 1})
    with pytest.raises(CorruptCheckpointError, match="param_groups is not a list of dicts with"):
        import_deepspeed(src, str(tmp_path / "out"))


def test_json_size_of_crafted_keys_and_nesting_is_measured_cheaply() -> None:
    key = tuple(["x" * 10_000] * 20_000)
    started = time.monotonic()
    assert json_size_bound({key: 1}, 1000) < 100  # JSON refuses such a key anyway
    assert time.monotonic() - started < 0.5
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(CorruptCheckpointError, match="lr is nested too deeply to be JSON"):
        JsonBudget().charge(deep, "lr")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text() | st.integers(), inner, max_size=4)
    ),
    max_leaves=30,
)


@given(_JSON)
def test_json_size_bound_is_a_lower_bound(value: Any) -> None:
    """Never more than the JSON a manifest writes (compact separators), so that a value the
    manifest could hold is never refused; exact for lists, dicts and ASCII strings."""
    assert json_size_bound(value, 1 << 40) <= len(
        json.dumps(value, separators=(",", ":"), allow_nan=True)
    )


def test_json_size_counts_the_digits_of_huge_integers() -> None:
    """A few hundred bytes of pickle referencing 20 integers of 4,200 digits 3,000 times
    wrote a 252 MB manifest: their digits count, without writing them."""
    groups = [{10**4200 + i: 0 for i in range(20)}] * 3000
    assert json_size_bound(groups, 1 << 40) >= 3000 * 20 * 4200
    assert json_size_bound([10**4200] * 1000, 1 << 40) >= 1000 * 4200


def test_deepspeed_version_that_is_no_string_is_left_out(tmp_path: Path) -> None:
    """Recorded only if it is text: str() of shared lists would never end."""
    manifest = import_deepspeed(
        zero3(tmp_path / "src", ds_version=shared_lists()), str(tmp_path / "out")
    )
    assert manifest.writer["converted_from"]["ds_version"] == ""


def test_deepspeed_latest_outside_is_refused_unread(tmp_path: Path) -> None:
    secret = tmp_path / "credentials"
    secret.write_text("[default]\naws_secret_access_key = SECRET\n")
    src = zero3(tmp_path / "src")
    (src / "latest").unlink()
    (src / "latest").symlink_to(secret)
    with pytest.raises(UnsafeCheckpointError, match="'latest' resolves outside") as err:
        import_deepspeed(src, str(tmp_path / "out"))
    assert "SECRET" not in str(err.value)


def test_deepspeed_tag_folder_outside_is_refused(tmp_path: Path) -> None:
    zero3(tmp_path / "elsewhere")
    src = tmp_path / "src"
    src.mkdir()
    (src / "latest").write_text(TAG)
    (src / TAG).symlink_to(tmp_path / "elsewhere" / TAG)
    with pytest.raises(UnsafeCheckpointError, match=f"'{TAG}' resolves outside"):
        import_deepspeed(src, str(tmp_path / "out"))


def test_deepspeed_file_outside_is_refused(tmp_path: Path) -> None:
    zero3(tmp_path / "elsewhere")
    src = zero3(tmp_path / "src")
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt"
    (src / TAG / name).unlink()
    (src / TAG / name).symlink_to(tmp_path / "elsewhere" / TAG / name)
    with pytest.raises(UnsafeCheckpointError, match=f"'{TAG}/{name}' resolves outside"):
        import_deepspeed(src, str(tmp_path / "out"))


def test_deepspeed_long_latest_is_refused_without_echo(tmp_path: Path) -> None:
    src = zero3(tmp_path / "src")
    (src / "latest").write_bytes(b"x" * 10_000)  # no tag is this long
    with pytest.raises(CorruptCheckpointError, match=r"latest is longer than") as err:
        import_deepspeed(src, str(tmp_path / "out"))
    assert len(str(err.value)) < 1000


def test_deepspeed_bad_tag_is_not_echoed_whole(tmp_path: Path) -> None:
    src = zero3(tmp_path / "src")
    (src / "latest").write_text("a/" + "secret " * 500)
    with pytest.raises(UnsafeCheckpointError, match="is not a folder name") as err:
        import_deepspeed(src, str(tmp_path / "out"))
    assert len(str(err.value)) < 1000


# ------------------------------------------------------------------------------ Megatron


def megatron(root: Path, *, lr: Any = 0.1, exp_avg: Any = None) -> Path:
    """A one-rank Megatron checkpoint of one 4x4 weight ``w`` with Adam state at iteration 1,
    tracked by ``latest_checkpointed_iteration.txt``; returns ``root``."""
    path = root / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    path.parent.mkdir(parents=True)
    slots = {"exp_avg": torch.zeros(4, 4) if exp_avg is None else exp_avg}
    slots |= {"exp_avg_sq": torch.ones(4, 4), "step": 1}
    group = {"params": [0], "lr": lr, "weight_decay": 0.1}
    torch.save(
        {
            "model": {"w": torch.arange(16.0).reshape(4, 4)},
            "optimizer": {"optimizer": {"param_groups": [group], "state": {0: slots}}},
            "iteration": 1,
        },
        path,
    )
    (root / TRACKER_FILE).write_text("1")
    return root


def test_megatron_hand_built_source_converts(tmp_path: Path) -> None:
    """The source the Megatron cases below edit is a valid one."""
    manifest = import_megatron(megatron(tmp_path / "src"), str(tmp_path / "out"), spec="plain")
    assert "model.w" in manifest.tensors and "optim.state.w.exp_avg" in manifest.tensors


def test_megatron_param_group_of_shared_lists_is_refused(tmp_path: Path) -> None:
    src = megatron(tmp_path / "src", lr=shared_lists())
    with pytest.raises(CorruptCheckpointError, match=r"model_optim_rng\.pt: .*too large as JSON"):
        import_megatron(src, str(tmp_path / "out"), spec="plain")


def test_megatron_optimizer_state_of_shared_lists_is_shown_short(tmp_path: Path) -> None:
    src = megatron(tmp_path / "src", exp_avg=shared_lists())
    with pytest.raises(ConversionError, match=r"exp_avg.*expected a tensor") as err:
        import_megatron(src, str(tmp_path / "out"), spec="plain")
    assert len(str(err.value)) < 1000


@pytest.mark.parametrize(
    "link",
    [TRACKER_FILE, "iter_0000001", "iter_0000001/mp_rank_00", "iter_0000001/mp_rank_00/x.pt"],
)
def test_megatron_paths_outside_are_refused(tmp_path: Path, link: str) -> None:
    outside = megatron(tmp_path / "elsewhere")
    src = megatron(tmp_path / "src")
    target = link.replace("x.pt", "model_optim_rng.pt")
    os.rename(src / target, tmp_path / "moved")  # the source's own copy goes away
    (src / target).symlink_to(outside / target)
    with pytest.raises(UnsafeCheckpointError, match=f"'{target}[^']*' resolves outside"):
        import_megatron(src, str(tmp_path / "out"), spec="plain")


def test_megatron_long_tracker_is_refused_without_echo(tmp_path: Path) -> None:
    src = megatron(tmp_path / "src")
    (src / TRACKER_FILE).write_bytes(b"7" * (1 << 20))
    with pytest.raises(CorruptCheckpointError, match=f"{TRACKER_FILE} is longer than") as err:
        import_megatron(src, str(tmp_path / "out"), spec="plain")
    assert len(str(err.value)) < 1000


@pytest.mark.timeout(20)  # quadratic: minutes
def test_dcp_deep_planner_path_is_not_walked(tmp_path: Path) -> None:
    """A key's recorded path in the saved dict, 100,000 parts long: regrouping walked each of
    its prefixes (quadratic time); past any real nesting the key is simply kept flat."""
    small_dcp(tmp_path)
    metadata = edit_metadata(tmp_path)
    parts = ("a",) * 100_000
    key = ".".join(parts)
    metadata.state_dict_metadata[key] = metadata.state_dict_metadata.pop("model.w")
    metadata.planner_data[key] = parts
    for index in list(metadata.storage_data):
        if index.fqn == "model.w":
            info = metadata.storage_data.pop(index)
            metadata.storage_data[MetadataIndex(key, index.offset, index.index)] = info
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
    manifest = import_dcp(tmp_path, tmp_path / "out")
    assert key in manifest.tensors
