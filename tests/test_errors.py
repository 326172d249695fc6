"""Every failure raises its specific CheckpointError subclass, naming the tensor, file or field."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import shutil
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from safetensors import safe_open

import unickpt
from unickpt.format.dtypes import torch_dtype
from unickpt.format.untrusted import parse_json
from unickpt.layout.state import _optimizer_param_names

from dist_harness import run_distributed


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "model.w": torch.randn(4, 8, generator=g),
        "model.b": torch.randn(8, generator=g).to(torch.bfloat16),
        "steps": torch.tensor(12),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
    }


def state() -> dict[str, Any]:
    return {**tensors(), "meta": {"lr": 0.5}}


def zeros() -> dict[str, Any]:
    """A load target for :func:`state`, every tensor zero (so any read into it shows)."""
    return {**{k: torch.zeros_like(v) for k, v in tensors().items()}, "meta": {"lr": None}}


def assert_untouched(target: dict[str, Any]) -> None:
    for key, value in target.items():
        if isinstance(value, torch.Tensor):
            assert not value.any(), f"{key!r} was written although the load was refused"


def assert_loads_bit_exact(path: str) -> None:
    target = zeros()
    unickpt.load(path, target)
    for key, expected in tensors().items():
        assert torch.equal(target[key], expected), f"{path}: {key!r} differs from what was saved"
    assert target["meta"] == {"lr": 0.5}


@pytest.fixture
def ckpt(ckpt_root: str) -> str:
    path = os.path.join(ckpt_root, "step_12")
    unickpt.save(path, state(), step=12)
    return path


def read_with(reader: str, path: str, target: dict[str, Any] | None = None) -> None:
    """Open ``path`` as ``reader`` ("load" into ``target``, "inspect" or "verify") does."""
    if reader == "load":
        unickpt.load(path, zeros() if target is None else target)
    elif reader == "inspect":
        unickpt.inspect(path)
    else:
        unickpt.verify(path)


def data_file(path: str) -> tuple[str, str]:
    """The only data file of ``path``: its manifest name and its full path."""
    (name,) = unickpt.inspect(path).files
    return name, os.path.join(path, name)


def read_manifest(path: str) -> dict[str, Any]:
    with open(os.path.join(path, "manifest.json")) as f:
        doc: dict[str, Any] = json.load(f)
    return doc


def write_manifest(path: str, doc: dict[str, Any] | bytes) -> None:
    with open(os.path.join(path, "manifest.json"), "wb") as f:
        f.write(doc if isinstance(doc, bytes) else json.dumps(doc).encode())


# ------------------------------------------------------------------------------ corrupted data


def test_flipped_byte_verify_names_tensor_chunk_and_file(ckpt: str) -> None:
    name, full = data_file(ckpt)
    chunk = unickpt.inspect(ckpt).tensors["model.w"].chunks[0]
    with open(full, "r+b") as f:
        f.seek(chunk.offset + 5)
        byte = f.read(1)[0]
        f.seek(chunk.offset + 5)
        f.write(bytes([byte ^ 0x10]))
    with pytest.raises(unickpt.CorruptCheckpointError, match="checksum mismatch") as exc:
        unickpt.verify(ckpt)
    message = str(exc.value)
    assert "'model.w'" in message, message
    assert f"chunk {chunk.box}" in message, message
    assert name in message, message
    assert "1 problem(s)" in message and "model.b" not in message, f"only model.w: {message}"


def test_flipped_byte_load_with_verify_names_tensor_and_file(ckpt: str) -> None:
    name, full = data_file(ckpt)
    chunk = unickpt.inspect(ckpt).tensors["model.b"].chunks[0]
    with open(full, "r+b") as f:
        f.seek(chunk.offset + chunk.nbytes - 1)
        byte = f.read(1)[0]
        f.seek(chunk.offset + chunk.nbytes - 1)
        f.write(bytes([byte ^ 0x01]))
    with pytest.raises(unickpt.CorruptCheckpointError, match="checksum mismatch") as exc:
        unickpt.load(ckpt, zeros(), verify=True)
    assert "'model.b'" in str(exc.value) and name in str(exc.value), str(exc.value)


@pytest.mark.parametrize("reader", ["load", "verify"])
def test_truncated_data_file(ckpt: str, reader: str) -> None:
    name, full = data_file(ckpt)
    os.truncate(full, os.path.getsize(full) - 3)
    with pytest.raises(unickpt.CorruptCheckpointError, match="truncated") as exc:
        read_with(reader, ckpt)
    assert name in str(exc.value), str(exc.value)


@pytest.mark.parametrize("reader", ["load", "verify"])
def test_deleted_data_file(ckpt: str, reader: str) -> None:
    name, full = data_file(ckpt)
    os.remove(full)
    unickpt.inspect(ckpt)  # the manifest alone is intact
    with pytest.raises(unickpt.CorruptCheckpointError, match=rf"{re.escape(name)} is missing"):
        read_with(reader, ckpt)


# -------------------------------------------------------------------------- corrupted manifest


@pytest.mark.parametrize("reader", ["load", "inspect", "verify"])
def test_manifest_with_invalid_json(ckpt: str, reader: str) -> None:
    write_manifest(ckpt, b'{"format": "unickpt", "version": 1, "tensors": {')
    with pytest.raises(unickpt.CorruptCheckpointError, match=r"manifest\.json is not valid JSON"):
        read_with(reader, ckpt)


@pytest.mark.parametrize(
    "text",
    [
        b'{"format": "unickpt", "version": 1, "step": 1' + b"7" * 5000 + b"}",
        b'{"format": "unickpt", "version": 1, "objects": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=["huge-integer", "deep-nesting"],
)
@pytest.mark.parametrize("reader", ["load", "inspect", "verify"])
def test_manifest_json_that_python_cannot_parse_is_corrupt(
    ckpt: str, reader: str, text: bytes
) -> None:
    write_manifest(ckpt, text)
    with pytest.raises(unickpt.CorruptCheckpointError, match=r"manifest\.json is not valid JSON"):
        read_with(reader, ckpt)


def test_empty_manifest_is_invalid_json(ckpt: str) -> None:
    write_manifest(ckpt, b"")
    with pytest.raises(unickpt.CorruptCheckpointError, match=r"manifest\.json is not valid JSON"):
        unickpt.inspect(ckpt)


def test_data_file_header_that_python_cannot_parse_is_corrupt(ckpt: str) -> None:
    _, full = data_file(ckpt)
    with open(full, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        f.write(b"[" * length)  # the header's bytes, all nesting
    with pytest.raises(unickpt.CorruptCheckpointError, match=r"header of data file .* not valid"):
        unickpt.verify(ckpt)


@pytest.mark.parametrize(
    ("name", "reader"),
    [("manifest.json", "load"), ("manifest.json", "inspect"), ("data", "load"), ("data", "verify")],
)
def test_a_fifo_in_the_checkpoint_is_refused_not_waited_on(
    ckpt: str, reader: str, name: str
) -> None:
    path = os.path.join(ckpt, "manifest.json") if name == "manifest.json" else data_file(ckpt)[1]
    os.replace(path, path + ".moved")
    os.mkfifo(path)  # opening it for reading would block until someone writes
    with pytest.raises(unickpt.CorruptCheckpointError, match="is not a regular file"):
        read_with(reader, ckpt)


def _first_chunk(doc: dict[str, Any]) -> dict[str, Any]:
    chunk: dict[str, Any] = doc["tensors"]["model.w"]["chunks"][0]
    return chunk


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d.update(step="12"), "step: expected an integer or null"),
        (lambda d: d.update(files=[]), "files: expected dict, found list"),
        (lambda d: d.update(writer="me"), "writer: expected dict, found str"),
        (
            lambda d: d["tensors"]["model.w"].update(shape="4x8"),
            "tensors['model.w'].shape: expected list, found str",
        ),
        (
            lambda d: d["tensors"]["model.w"].update(dtype=32),
            "tensors['model.w'].dtype: expected str, found int",
        ),
        (
            lambda d: _first_chunk(d).update(offset="264"),
            "tensors['model.w'].chunks[0].offset: expected int, found str",
        ),
        (
            lambda d: _first_chunk(d).update(nbytes=True),
            "tensors['model.w'].chunks[0].nbytes: expected int, found bool",
        ),
        (lambda d: d["tensors"].update(steps=[]), "tensors['steps']: expected an object"),
        (
            lambda d: d["tensors"]["model.w"].update(shape=[1] * 65),
            "tensors['model.w'].shape: 65 dimensions; at most 64",
        ),
        (
            lambda d: d["tensors"]["model.w"].update(shape=[2**40, 2**40]),
            "tensors['model.w'].shape: [1099511627776, 1099511627776] of float32 is too large",
        ),
        (
            lambda d: d["files"].update({next(iter(d["files"])): 2**64}),
            "expected a byte count",
        ),
    ],
    ids=[
        "step",
        "files",
        "writer",
        "shape",
        "dtype",
        "offset",
        "nbytes",
        "tensor",
        "65-dims",
        "huge-shape",
        "huge-file",
    ],
)
def test_manifest_field_of_wrong_type_is_named(ckpt: str, mutate: Any, fragment: str) -> None:
    doc = read_manifest(ckpt)
    mutate(doc)
    write_manifest(ckpt, doc)
    with pytest.raises(unickpt.CorruptCheckpointError, match=re.escape(fragment)):
        unickpt.inspect(ckpt)
    with pytest.raises(unickpt.CorruptCheckpointError, match=re.escape(fragment)):
        unickpt.load(ckpt, zeros())


def _tensor_and_object(doc: dict[str, Any]) -> None:
    doc["objects"]["model.w"] = 1


def _pickled_int64(doc: dict[str, Any]) -> None:
    doc["tensors"]["model.w"]["encoding"] = "pickle"


def _two_chunks_of_nothing(doc: dict[str, Any]) -> None:
    entry = doc["tensors"]["model.w"]
    chunk = _first_chunk(doc)
    entry["shape"], chunk["sizes"], chunk["nbytes"] = [0, 8], [0, 8], 0
    entry["chunks"].append(dict(chunk))


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (_tensor_and_object, "objects: ['model.w'] are tensors too"),
        (_pickled_int64, "tensors['model.w'].encoding: pickled bytes are uint8, not float32"),
        (_two_chunks_of_nothing, "2 chunks for a tensor with no elements"),
    ],
    ids=["key-twice", "pickle-dtype", "empty-tensor"],
)
def test_manifest_breaking_an_invariant_a_reader_could_read_otherwise_is_corrupt(
    ckpt: str, mutate: Any, fragment: str
) -> None:
    # Each was accepted, and readers following FORMAT.md could disagree on what it holds (audit Q).
    doc = read_manifest(ckpt)
    mutate(doc)
    write_manifest(ckpt, doc)
    for reader in ("inspect", "verify", "load"):
        with pytest.raises(unickpt.CorruptCheckpointError, match=re.escape(fragment)):
            read_with(reader, ckpt)


def test_a_name_twice_in_one_json_object_is_corrupt(ckpt: str) -> None:
    # Python keeps the last of two equal names, other readers the first: two checkpoints in one.
    text = json.dumps(read_manifest(ckpt))
    write_manifest(ckpt, text.replace('"step":', '"step": 3, "step":', 1).encode())
    with pytest.raises(unickpt.CorruptCheckpointError, match="the name 'step' appears twice"):
        unickpt.inspect(ckpt)


def test_a_state_nested_beyond_the_recursion_limit_is_named(ckpt_root: str) -> None:
    deep: Any = torch.ones(1)
    for level in range(2000):
        deep = {f"l{level}": deep} if level % 2 else [deep]
    with pytest.raises(unickpt.InvalidStateError, match="nested deeper than Python's"):
        unickpt.save(ckpt_root, {"t": torch.ones(1), "deep": deep})
    unickpt.save(ckpt_root, {"t": torch.ones(1)})
    with pytest.raises(unickpt.InvalidStateError, match="nested deeper than Python's"):
        unickpt.load(ckpt_root, {"t": torch.ones(1), "deep": deep})


def test_a_name_twice_among_many_is_found_in_linear_time() -> None:
    """The duplicate search was quadratic: 18 s for 50k names, 20 min for a 200k-tensor
    manifest with one name repeated."""
    names = [f"tensor.{i}" for i in range(100_000)]
    text = "{" + ",".join(f'"{name}":0' for name in [*names, names[0]]) + "}"
    started = time.monotonic()
    with pytest.raises(unickpt.CorruptCheckpointError, match=r"'tensor\.0' appears twice"):
        parse_json(text, "a manifest")
    assert time.monotonic() - started < 5.0


def test_an_optimizer_of_many_parameters_is_named_in_linear_time() -> None:
    """Finding clashing parameter names was quadratic: 23 s for 40k parameters (an MoE of
    separate expert layers), in the caller's thread of every save and load."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(40_000)]
    names = {id(p): f"experts.{i}.w" for i, p in enumerate(params)}
    optim = torch.optim.SGD(params, lr=0.1)
    started = time.monotonic()
    assert _optimizer_param_names(optim, names, "optim")[-1] == "experts.39999.w"
    assert time.monotonic() - started < 3.0


def test_writers_refuse_what_readers_would_refuse(
    ckpt_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A header or manifest over the readers' limits committed a checkpoint none could open.
    from unickpt.format import manifest, safetensors_file

    monkeypatch.setattr(safetensors_file, "MAX_HEADER_BYTES", 200)
    with pytest.raises(unickpt.InvalidStateError, match="more than the 200 safetensors"):
        unickpt.save(f"{ckpt_root}/header", state())
    monkeypatch.undo()
    monkeypatch.setattr(manifest, "MAX_MANIFEST_BYTES", 1000)
    with pytest.raises(unickpt.InvalidStateError, match="more than the 1000 readers accept"):
        unickpt.save(f"{ckpt_root}/manifest", state())
    assert not os.path.exists(f"{ckpt_root}/manifest/manifest.json")


def test_streaming_reader_checks_file_sizes_before_allocating(ckpt: str) -> None:
    from unickpt.engine.load import CheckpointReader

    doc = read_manifest(ckpt)
    entry = doc["tensors"]["model.w"]
    (chunk,) = entry["chunks"]
    entry["shape"] = chunk["sizes"] = [2**34, 4]  # 256 GiB of float32 claimed
    chunk["nbytes"] = 2**34 * 4 * 4
    doc["files"][chunk["file"]] = chunk["offset"] + chunk["nbytes"]
    write_manifest(ckpt, doc)
    with (
        CheckpointReader(ckpt) as reader,
        pytest.raises(unickpt.CorruptCheckpointError, match="the manifest says"),
    ):
        reader.read("model.w")


@pytest.mark.parametrize(
    ("field", "value"),
    [("version", 99), ("format", "torch.save"), ("version", True), ("version", 1.0)],
)
def test_unknown_format_or_version(ckpt: str, field: str, value: object) -> None:
    doc = read_manifest(ckpt)
    doc[field] = value
    write_manifest(ckpt, doc)
    with pytest.raises(unickpt.UnsupportedFormatError, match=re.escape(repr(value))):
        unickpt.inspect(ckpt)
    target = zeros()
    with pytest.raises(unickpt.UnsupportedFormatError, match=re.escape(repr(value))):
        unickpt.load(ckpt, target)
    assert_untouched(target)


# ------------------------------------------------------------------------------ path safety


def _point_data_at(ckpt: str, new_name: str) -> None:
    """Rewrite the manifest so that its data file is called ``new_name``."""
    doc = read_manifest(ckpt)
    ((old, size),) = doc["files"].items()
    doc["files"] = {new_name: size}
    for meta in doc["tensors"].values():
        for chunk in meta["chunks"]:
            assert chunk["file"] == old
            chunk["file"] = new_name
    write_manifest(ckpt, doc)


@pytest.mark.parametrize("reader", ["load", "inspect", "verify"])
@pytest.mark.parametrize("name", ["../evil.safetensors", "data/../../evil.safetensors"])
def test_manifest_file_escaping_the_checkpoint_is_refused(
    ckpt: str, ckpt_root: str, name: str, reader: str
) -> None:
    # A valid copy of the data sits at the escaping path: only the refusal stops the read.
    _, full = data_file(ckpt)
    shutil.copy(full, os.path.join(ckpt_root, "evil.safetensors"))
    _point_data_at(ckpt, name)
    target = zeros()
    with pytest.raises(unickpt.UnsafeCheckpointError, match=re.escape(f"{name!r} escapes")):
        read_with(reader, ckpt, target)
    assert_untouched(target)


@pytest.mark.parametrize("outside", ["/etc/passwd", "secret"])
def test_manifest_file_with_absolute_path_is_refused(
    ckpt: str, tmp_path: os.PathLike[str], outside: str
) -> None:
    secret = f"TOP-SECRET-{uuid.uuid4().hex}"
    if outside == "secret":
        outside = os.path.join(os.fspath(tmp_path), "secret.txt")
        with open(outside, "w") as f:
            f.write(secret)
    _point_data_at(ckpt, outside)
    target = zeros()
    refusal = re.escape(f"{outside!r} is absolute")
    with pytest.raises(unickpt.UnsafeCheckpointError, match=refusal) as on_load:
        unickpt.load(ckpt, target)
    with pytest.raises(unickpt.UnsafeCheckpointError, match=refusal) as on_verify:
        unickpt.verify(ckpt)
    assert secret not in f"{on_load.value} {on_verify.value}", "the outside file was read"
    assert_untouched(target)


@pytest.fixture(params=["file", "data-dir"])
def symlinked_out(request: pytest.FixtureRequest, ckpt: str, tmp_path: os.PathLike[str]) -> str:
    """``ckpt`` with its data file (or its data/ directory) a symlink to an identical copy
    outside the checkpoint, so that following the link would load the right bytes."""
    name, full = data_file(ckpt)
    outside = os.path.join(os.fspath(tmp_path), "outside")
    os.makedirs(outside)
    if request.param == "file":
        moved = os.path.join(outside, os.path.basename(name))
        shutil.move(full, moved)
        os.symlink(moved, full)
    else:
        shutil.move(os.path.join(ckpt, "data"), os.path.join(outside, "data"))
        os.symlink(os.path.join(outside, "data"), os.path.join(ckpt, "data"))
    return ckpt


def test_symlink_out_of_the_checkpoint_is_refused_by_load(symlinked_out: str) -> None:
    target = zeros()
    with pytest.raises(unickpt.UnsafeCheckpointError, match="outside the checkpoint directory"):
        unickpt.load(symlinked_out, target)
    assert_untouched(target)


def test_symlink_out_of_the_checkpoint_is_refused_by_verify(symlinked_out: str) -> None:
    with pytest.raises(unickpt.UnsafeCheckpointError, match="outside the checkpoint directory"):
        unickpt.verify(symlinked_out)


def test_manifest_symlinked_out_of_the_checkpoint_is_refused(
    ckpt: str, tmp_path: os.PathLike[str]
) -> None:
    outside = os.path.join(os.fspath(tmp_path), "manifest.json")
    shutil.move(os.path.join(ckpt, "manifest.json"), outside)
    os.symlink(outside, os.path.join(ckpt, "manifest.json"))
    with pytest.raises(unickpt.UnsafeCheckpointError, match=r"'manifest\.json' resolves outside"):
        unickpt.inspect(ckpt)


# ------------------------------------------------------------------------------------ pickle


@dataclass
class Opaque:
    name: str
    size: int


@pytest.mark.parametrize(
    ("value", "kind"), [({"b", "a"}, "set"), (Opaque("x", 3), "Opaque")], ids=["set", "instance"]
)
def test_non_json_object_needs_allow_pickle(ckpt_root: str, value: object, kind: str) -> None:
    path = os.path.join(ckpt_root, "c")
    with pytest.raises(
        unickpt.InvalidStateError, match=rf"'extra\.thing' of type {kind} .* allow_pickle=True"
    ):
        unickpt.save(path, {**state(), "extra": {"thing": value}})
    assert not os.path.exists(path), "a refused save must write nothing"


def test_dict_keys_json_would_stringify_need_allow_pickle(ckpt_root: str) -> None:
    path = os.path.join(ckpt_root, "c")
    value = [{"epoch": 3, "seen": {7: 120}}]  # a list of dicts: one JSON leaf
    with pytest.raises(unickpt.InvalidStateError, match=r"'loader' holds a dict with key 7"):
        unickpt.save(path, {**state(), "loader": value})
    assert not os.path.exists(path), "a refused save must write nothing"
    unickpt.save(path, {**state(), "loader": value}, allow_pickle=True)
    target = {**zeros(), "loader": None}
    unickpt.load(path, target, allow_pickle=True)
    assert target["loader"] == value


def test_empty_key_is_refused(ckpt_root: str) -> None:
    # {"": {"w": t}} would flatten to "w" and load into a differently nested state
    with pytest.raises(unickpt.InvalidStateError, match=r"key '' under 'a' must be a non-empty"):
        unickpt.save(os.path.join(ckpt_root, "c"), {"a": {"": {"w": torch.ones(2)}}})


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.empty(3, device="meta"), r"'x' is on the meta device and has no data"),
        (torch.eye(3).to_sparse(), r"'x' is a sparse_coo tensor; only dense"),
        (
            torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged),
            r"'x' is a nested tensor",
        ),
    ],
    ids=["meta", "sparse", "nested"],
)
@pytest.mark.parametrize("mode", ["sync", "lazy"])
def test_tensor_without_dense_data_is_refused_by_name(
    ckpt_root: str, tensor: torch.Tensor, message: str, mode: str
) -> None:
    path = os.path.join(ckpt_root, "c")
    with pytest.raises(unickpt.InvalidStateError, match=message):
        handle = unickpt.save(path, {**state(), "x": tensor}, mode=mode)  # type: ignore[call-overload]
        handle.wait() if mode == "lazy" else None
    unickpt.save(path, state())
    with pytest.raises(unickpt.InvalidStateError, match=message):
        unickpt.load(path, {**zeros(), "x": tensor}, strict=False)


def test_load_targets_that_cannot_be_written_are_refused_by_name(ckpt_root: str) -> None:
    path = os.path.join(ckpt_root, "c")
    unickpt.save(path, {"z": torch.tensor([1 + 2j, 3 - 4j]), "e": torch.ones(2, 3)})
    conj = {"z": torch.zeros(2, dtype=torch.complex64).conj(), "e": torch.zeros(2, 3)}
    with pytest.raises(unickpt.InvalidStateError, match=r"'z' is a conjugate or negative view"):
        unickpt.load(path, conj)
    expanded = {"z": torch.zeros(2, dtype=torch.complex64), "e": torch.zeros(3).expand(2, 3)}
    with pytest.raises(unickpt.InvalidStateError, match=r"'e' is an expanded view"):
        unickpt.load(path, expanded)


def test_pickled_entry_is_refused_without_allow_pickle_on_load(ckpt_root: str) -> None:
    path = os.path.join(ckpt_root, "c")
    unickpt.save(path, {**state(), "tags": {"b", "a"}}, allow_pickle=True)
    assert unickpt.inspect(path).tensors["tags"].encoding == "pickle"
    target = {**zeros(), "tags": None}
    with pytest.raises(unickpt.UnsafeCheckpointError, match=r"\['tags'\].*allow_pickle=True"):
        unickpt.load(path, target)
    assert target["tags"] is None
    assert_untouched(target)


def test_pickled_entries_round_trip_with_allow_pickle_on_both_sides(ckpt_root: str) -> None:
    path = os.path.join(ckpt_root, "c")
    extra = {"tags": {"b", "a"}, "spec": Opaque("x", 3)}
    unickpt.save(path, {**state(), "extra": extra}, allow_pickle=True)
    target = {**zeros(), "extra": {"tags": None, "spec": None}}
    unickpt.load(path, target, allow_pickle=True)
    assert target["extra"] == extra
    for key, expected in tensors().items():
        assert torch.equal(target[key], expected), key


# ----------------------------------------------------------------------------- state mismatch


def test_strict_load_lists_every_mismatch_in_one_error(ckpt: str) -> None:
    target = zeros()
    target["model.w"] = torch.zeros(4, 9)  # shape mismatch
    target["model.b"] = torch.zeros(8)  # float32, saved as bfloat16
    del target["steps"]  # unexpected: in the checkpoint only
    target["extra"] = torch.zeros(2)  # missing: in the state only
    with pytest.raises(unickpt.StateMismatchError) as exc:
        unickpt.load(ckpt, target)
    message = str(exc.value)
    for line in [
        "4 problem(s)",
        "model.w: shape: expected [4, 9], found [4, 8]",
        "model.b: dtype: expected torch.float32, found bfloat16",
        "extra: missing from the checkpoint",
        "steps: in the checkpoint but not in the state",
    ]:
        assert line in message, f"{line!r} not in:\n{message}"
    assert_untouched(target)


def test_non_strict_load_skips_missing_and_unexpected_keys(ckpt: str) -> None:
    target = zeros()
    target["model.b"] = torch.zeros(8)  # float32: converted from bfloat16 when not strict
    del target["steps"]
    target["extra"] = torch.zeros(2)
    result = unickpt.load(ckpt, target, strict=False)
    assert (result.missing_keys, result.unexpected_keys) == (["extra"], ["steps"])
    expected = tensors()
    assert torch.equal(target["model.w"], expected["model.w"])
    assert torch.equal(target["model.b"], expected["model.b"].float())
    assert not target["extra"].any(), "a missing key's tensor must be left alone"


def test_non_strict_load_still_refuses_a_shape_mismatch(ckpt: str) -> None:
    target = zeros()
    target["model.w"] = torch.zeros(8, 4)
    del target["steps"]
    with pytest.raises(unickpt.StateMismatchError) as exc:
        unickpt.load(ckpt, target, strict=False)
    message = str(exc.value)
    assert "1 problem(s)" in message, message
    assert "model.w: shape: expected [8, 4], found [4, 8]" in message, message
    assert_untouched(target)


@pytest.mark.parametrize("strict", [True, False])
def test_untied_weights_into_tied_ones_are_refused(ckpt_root: str, strict: bool) -> None:
    """Saved untied, loaded into a state where both names are one tensor: whichever key came
    last would win. Saved tied (same values), it loads, into tied or untied targets."""
    emb, head = torch.randn(6, 4), torch.randn(6, 4)
    unickpt.save(f"{ckpt_root}/untied", {"emb": emb, "head": head, "b": torch.ones(3)})
    shared = torch.zeros(6, 4)
    target = {"emb": shared, "head": shared, "b": torch.zeros(3)}
    with pytest.raises(unickpt.StateMismatchError) as exc:
        unickpt.load(f"{ckpt_root}/untied", target, strict=strict)
    message = str(exc.value)
    assert "emb, head: one tensor in the state (tied), but different values" in message, message
    assert not shared.any() and not target["b"].any(), "nothing may be loaded"

    unickpt.save(f"{ckpt_root}/tied", {"emb": emb, "head": emb, "b": torch.ones(3)})
    unickpt.load(f"{ckpt_root}/tied", target, strict=strict)
    assert torch.equal(shared, emb) and target["head"] is shared
    untied = {"emb": torch.zeros(6, 4), "head": torch.zeros(6, 4), "b": torch.zeros(3)}
    unickpt.load(f"{ckpt_root}/tied", untied, strict=strict)
    assert torch.equal(untied["emb"], emb) and torch.equal(untied["head"], emb)


def test_an_empty_tensor_missing_from_the_checkpoint_is_missing(ckpt_root: str) -> None:
    """Empty tensors all have data pointer 0: a second one is no tied alias of the first
    (LoRA's empty B of an unadapted layer, say). A tied empty parameter still is one."""
    unickpt.save(ckpt_root, {"a": torch.empty(0, 4)})
    with pytest.raises(unickpt.StateMismatchError, match="b: missing from the checkpoint"):
        unickpt.load(ckpt_root, {"a": torch.empty(0, 4), "b": torch.empty(0, 4)})
    result = unickpt.load(ckpt_root, {"a": torch.empty(0, 4), "b": torch.empty(0, 4)}, strict=False)
    assert result.missing_keys == ["b"]
    tied = torch.nn.Parameter(torch.empty(0, 4))
    unickpt.load(ckpt_root, {"a": tied.detach(), "b": tied.detach()})  # as state_dict() gives


@pytest.mark.parametrize("strict", [True, False])
def test_optimizer_over_other_parameters_is_refused_before_any_read(
    ckpt_root: str, strict: bool
) -> None:
    """The optimizer's param groups are checked with the keys, not after the model's tensors
    were overwritten."""
    torch.manual_seed(0)
    source = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    unickpt.save(ckpt_root, {"model": source, "optim": torch.optim.SGD(source[0].parameters())})
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optim = torch.optim.SGD(model.parameters(), lr=0.1)  # over both layers
    with pytest.raises(unickpt.StateMismatchError, match="optim: param group parameters differ"):
        unickpt.load(ckpt_root, {"model": model, "optim": optim}, strict=strict)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# -------------------------------------------------------------------- existence and commit


def snapshot(path: str) -> dict[str, bytes]:
    """Every file under ``path`` and its content."""
    return {
        os.path.join(d, f): pathlib.Path(d, f).read_bytes()
        for d, _, files in os.walk(path)
        for f in files
    }


def test_save_over_a_committed_checkpoint_is_refused(ckpt: str) -> None:
    before = snapshot(ckpt)
    with pytest.raises(unickpt.CheckpointExistsError, match="already holds a committed"):
        unickpt.save(ckpt, {"other": torch.ones(3)}, step=13)
    assert snapshot(ckpt) == before, "the refused save changed the committed checkpoint's files"
    assert_loads_bit_exact(ckpt)
    assert unickpt.inspect(ckpt).step == 12


@pytest.mark.parametrize("reader", ["load", "inspect", "verify"])
def test_nonexistent_path(ckpt_root: str, reader: str) -> None:
    path = os.path.join(ckpt_root, "never_saved")
    with pytest.raises(unickpt.CheckpointNotFoundError, match=re.escape(path)):
        read_with(reader, path)


@pytest.mark.parametrize("reader", ["load", "inspect", "verify"])
def test_data_without_manifest_is_incomplete(ckpt: str, reader: str) -> None:
    os.remove(os.path.join(ckpt, "manifest.json"))
    incomplete = rf"{re.escape(ckpt)} is incomplete: it has no committed manifest\.json"
    with pytest.raises(unickpt.IncompleteCheckpointError, match=incomplete):
        read_with(reader, ckpt)


def test_every_error_is_a_checkpoint_error() -> None:
    names = {name for name in unickpt.__all__ if name.endswith("Error")}
    assert names >= {
        "CheckpointNotFoundError",
        "CheckpointExistsError",
        "IncompleteCheckpointError",
        "CorruptCheckpointError",
        "UnsupportedFormatError",
        "UnsafeCheckpointError",
        "StateMismatchError",
        "InvalidStateError",
        "StorageError",
    }
    for name in names:
        assert issubclass(getattr(unickpt, name), unickpt.CheckpointError), name
    assert issubclass(unickpt.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(unickpt.CheckpointExistsError, FileExistsError)
    assert issubclass(unickpt.UnsupportedFormatError, unickpt.CorruptCheckpointError)


# --------------------------------------------------------------------------- storage failures


def test_unwritable_data_directory(ckpt: str, ckpt_root: str, unwritable_data_files: None) -> None:
    path = os.path.join(ckpt_root, "step_13")
    with pytest.raises(unickpt.StorageError, match="nothing was committed") as exc:
        unickpt.save(path, state(), step=13)
    created = (
        rf"cannot create {re.escape(path)}/data/r00000-[0-9a-f]+-\d+\.safetensors: "
        "Not a directory"
    )
    assert re.search(created, str(exc.value)), str(exc.value)
    with pytest.raises(unickpt.IncompleteCheckpointError):
        unickpt.inspect(path)
    assert_loads_bit_exact(ckpt)


@pytest.mark.parametrize("mode", ["sync", "async"])  # async: staged images, direct I/O
def test_disk_full_while_writing_data(
    ckpt: str, ckpt_root: str, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    real_write = os.write

    def write(fd: int, data: Any) -> int:
        if ".safetensors.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    path = os.path.join(ckpt_root, "step_13")
    monkeypatch.setattr(os, "write", write)
    with pytest.raises(unickpt.StorageError, match=r"\(disk full\)") as exc:
        if mode == "sync":
            unickpt.save(path, state(), step=13)
        else:
            unickpt.save(path, state(), step=13, mode="async").wait()
    monkeypatch.undo()
    written = rf"cannot write {re.escape(path)}/data/r00000-[0-9a-f]+-\d+\.safetensors"
    assert re.search(written, str(exc.value)), str(exc.value)
    assert os.listdir(os.path.join(path, "data")) == [], "the partial data file was not removed"
    assert not os.path.exists(os.path.join(path, "manifest.json"))
    assert_loads_bit_exact(ckpt)


# ----------------------------------------------------------------------- safetensors interop


def test_a_commit_failing_after_the_manifest_rename_leaves_nothing_visible(
    ckpt: str, ckpt_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from unickpt.storage import local

    published = local.fsync_dir

    def fsync_dir(path: str) -> None:
        if os.path.exists(os.path.join(path, "manifest.json")):  # renamed into place already
            raise OSError(errno.EIO, "Input/output error")
        published(path)

    monkeypatch.setattr(local, "fsync_dir", fsync_dir)
    path = os.path.join(ckpt_root, "step_13")
    with pytest.raises(unickpt.StorageError, match=r"nothing was committed.*Input/output error"):
        unickpt.save(path, state(), step=13)
    with pytest.raises(unickpt.IncompleteCheckpointError):
        unickpt.inspect(path)
    assert_loads_bit_exact(ckpt)


def test_data_files_are_standard_safetensors_matching_the_manifest(ckpt: str) -> None:
    manifest = unickpt.inspect(ckpt)
    expected = tensors()
    assert set(manifest.tensors) == set(expected)
    by_file: dict[str, dict[str, Any]] = {name: {} for name in manifest.files}
    for key, meta in manifest.tensors.items():
        for chunk in meta.chunks:
            by_file[chunk.file][chunk.key] = (key, meta, chunk)
    for name, chunks in by_file.items():
        with safe_open(os.path.join(ckpt, name), "pt") as f:
            assert f.metadata() == {"format": "unickpt", "version": "1"}
            assert set(f.keys()) == set(chunks), f"{name}: {f.keys()} vs manifest {chunks}"
            for st_key, (key, meta, chunk) in chunks.items():
                stored = f.get_tensor(st_key)
                assert stored.dtype == torch_dtype(meta.dtype), st_key
                assert tuple(stored.shape) == chunk.sizes, st_key
                assert torch.equal(stored, expected[key][chunk.box.slices()]), st_key


def _load_per_rank(rank: int, world_size: int, paths: list[str], template: str) -> list[str]:
    """Each rank loads ``paths[rank]`` into a state shaped as ``template`` says; returns the
    error text and whether the state was left untouched."""
    state = {"w": torch.zeros(4), "b": torch.zeros(3 if template == "ok" or rank == 0 else 5)}
    try:
        unickpt.load(paths[rank], state)
    except unickpt.CheckpointError as exc:
        message = f"{type(exc).__name__}: {exc}"
    else:
        message = ""
    return [message, str(not state["w"].any() and not state["b"].any())]


def test_ranks_loading_different_checkpoints_or_failing_write_nothing(ckpt_root: str) -> None:
    """A collective load agrees before any rank writes: ranks given different checkpoints (a
    per-node latest()) fail together, and so do the peers of a rank whose state does not match."""
    paths = [f"{ckpt_root}/a", f"{ckpt_root}/b"]
    for path, value in zip(paths, (1.0, 2.0), strict=True):
        unickpt.save(path, {"w": torch.full((4,), value), "b": torch.full((3,), value)})
    different = run_distributed(2, _load_per_rank, paths, "ok")
    for rank, (message, untouched) in enumerate(different):
        assert message.startswith("CheckpointError: ranks are loading different checkpoints"), (
            message
        )
        assert f"rank {1 - rank} {paths[1 - rank]}" in message and untouched == "True", rank
    mismatched = run_distributed(2, _load_per_rank, [paths[0]] * 2, "rank 1 differs")
    assert mismatched[1][0].startswith("StateMismatchError: ") and "b: shape" in mismatched[1][0]
    # rank 0 raises rank 1's failure as the same class, so both ranks can handle it alike
    assert mismatched[0][0].startswith(
        "StateMismatchError: load failed on rank 1: StateMismatchError: "
    )
    assert [untouched for _, untouched in mismatched] == ["True", "True"]


def _save_per_rank(rank: int, world_size: int, paths: list[str], mode: str) -> str:
    try:
        handle = unickpt.save(paths[rank], {"w": torch.full((4,), float(rank))}, mode=mode)
        if isinstance(handle, unickpt.SaveHandle):
            handle.wait()
    except unickpt.CheckpointError as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


@pytest.mark.parametrize("mode", ["sync", "lazy"])
def test_ranks_saving_to_different_paths_fail_together(ckpt_root: str, mode: str) -> None:
    """A path computed per rank (a timestamp, an off-by-one step) would commit a checkpoint
    whose files are in two places: every rank fails, naming both, and nothing is committed."""
    paths = [f"{ckpt_root}/run-120000", f"{ckpt_root}/run-120001"]
    messages = run_distributed(2, _save_per_rank, paths, mode)
    for rank, message in enumerate(messages):
        assert message.startswith("InvalidStateError: ranks disagree on the save"), message
        assert f"rank {1 - rank} saves to {paths[1 - rank]}" in message, message
    for path in paths:
        assert not os.path.exists(f"{path}/manifest.json")
        assert not [f for _, _, files in os.walk(path) for f in files], f"{path}: files left"


def _background_save_on_rank_0_only(rank: int, world_size: int, path: str) -> str:
    if rank == 1:  # never saves; reaches the harness's final barrier after rank 0's failure (at
        time.sleep(7)  # the 4 s timeout) and within 4 s of it
        return ""
    started = time.monotonic()
    try:
        unickpt.save(path, {"w": torch.ones(4)}, mode="lazy").wait()
    except unickpt.CollectiveError as exc:
        return f"{time.monotonic() - started:.1f}s {exc}"
    return "no error"


def test_a_save_on_one_rank_fails_at_the_process_groups_timeout(ckpt_root: str) -> None:
    """Not torch's 30 minutes of new_group: the timeout the caller gave its process group."""
    (message,) = run_distributed(
        2, _background_save_on_rank_0_only, f"{ckpt_root}/one", pg_timeout=4, timeout=60
    )[:1]
    seconds, _, text = message.partition(" ")
    assert float(seconds.rstrip("s")) < 10, message
    assert "every rank must make the same save/load call" in text.lower(), message


def test_a_tensor_resized_during_a_lazy_save_is_named(ckpt_root: str) -> None:
    w = torch.ones(12)
    handle = unickpt.save(f"{ckpt_root}/resized", {"w": w}, mode="lazy")
    w.resize_(10)
    with pytest.raises(unickpt.StateChangedError, match="w"):
        handle.wait()


@pytest.mark.parametrize("metadata", [["loss", 0.5], "run-1", 3])
def test_user_metadata_that_is_no_dict_is_refused_before_writing(
    ckpt_root: str, metadata: Any
) -> None:
    with pytest.raises(unickpt.InvalidStateError, match="user_metadata must be a dict"):
        unickpt.save(f"{ckpt_root}/meta", {"w": torch.ones(4)}, user_metadata=metadata)
    assert not os.path.exists(f"{ckpt_root}/meta/data")


def test_world_size_without_a_process_group_warns(
    ckpt_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun without init_process_group: every process would save the whole state alone."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.warns(UserWarning, match="no torch.distributed process group"):
        unickpt.save(f"{ckpt_root}/alone", {"w": torch.ones(4)})


def _save_with_step(rank: int, world_size: int, path: str, bad_rank: int) -> str:
    step = torch.tensor(3.0) if rank == bad_rank else 3  # e.g. optimizer.state[p]["step"]
    try:
        unickpt.save(path, {"w": torch.ones(4)}, step=step)  # type: ignore[arg-type]
    except unickpt.CheckpointError as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


@pytest.mark.parametrize("mode", ["sync", "async", "lazy"])
def test_a_step_that_is_no_int_is_refused(ckpt_root: str, mode: str) -> None:
    with pytest.raises(unickpt.InvalidStateError, match="step"):
        handle = unickpt.save(
            f"{ckpt_root}/s", {"w": torch.ones(4)}, step=torch.tensor(3.0), mode=mode
        )  # type: ignore[call-overload]
        handle.wait()


def test_a_bad_step_on_one_rank_fails_every_rank(ckpt_root: str) -> None:
    messages = run_distributed(2, _save_with_step, f"{ckpt_root}/s", 1, pg_timeout=30, timeout=60)
    assert messages[1].startswith("InvalidStateError"), messages
    # The same class on both ranks (a caller may catch it alike everywhere), naming rank 1
    assert messages[0].startswith("InvalidStateError: save failed on rank 1"), messages


# ---------------------------------------------------------------- one rank fails, all fail fast
# Each runs with a 30 s process-group timeout: a rank that hears of its peer's failure only by
# that timeout (it used to, in every case below) takes over 30 s and says nothing of the cause.


class _Exiting:
    """A Stateful whose state_dict() / load_state_dict() exits the process (SystemExit)."""

    def state_dict(self) -> dict[str, Any]:
        raise SystemExit("state_dict exits")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise SystemExit("load_state_dict exits")


def _timed(call: Any) -> str:
    started = time.monotonic()
    try:
        call()
    except BaseException as exc:  # SystemExit included: it is what rank 1 must get back
        return f"{time.monotonic() - started:.1f}s {type(exc).__name__}: {exc}"
    return f"{time.monotonic() - started:.1f}s returned"


def _assert_prompt(message: str) -> str:
    seconds, _, text = message.partition(" ")
    assert float(seconds.rstrip("s")) < 20, message  # well under the 30 s timeout
    return text


def _one_rank_fails_a_save(rank: int, world_size: int, root: str, how: str, mode: str) -> str:
    import importlib

    save_module = importlib.import_module("unickpt.engine.save")  # the package exports save()
    state: dict[str, Any] = {f"w{rank}": torch.ones(1024)}  # each rank writes its own
    path = f"{root}/ckpt"
    stage_file = save_module.stage_file
    if rank == 1 and how == "path":
        path = ""  # an unset variable on one node
    if rank == 1 and how == "stateful":
        state["extra"] = _Exiting()
    if rank == 1 and how in ("staging", "interrupted copy"):

        def fail(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("staging broke") if how == "staging" else KeyboardInterrupt

        save_module.stage_file = fail  # type: ignore[assignment]
    message = _timed(lambda: _saved(unickpt.save(path, state, mode=mode)))  # type: ignore[call-overload]
    save_module.stage_file = stage_file  # type: ignore[assignment]
    state.pop("extra", None)
    again = f"{root}/again"  # the ranks' collectives are still in step: the next save commits
    message += " | then " + _timed(
        lambda: _saved(unickpt.save(again, state, mode=mode))  # type: ignore[call-overload]
    )
    return message


def _saved(result: Any) -> None:
    if isinstance(result, unickpt.SaveHandle):
        result.wait()


@pytest.mark.parametrize(
    ("how", "mode", "cause"),
    [
        ("path", "sync", "ValueError: empty checkpoint path"),
        ("path", "lazy", "ValueError: empty checkpoint path"),
        ("stateful", "sync", "SystemExit: state_dict exits"),
        ("stateful", "async", "SystemExit: state_dict exits"),
        ("staging", "async", "RuntimeError: staging broke"),
        ("staging", "lazy", "RuntimeError: staging broke"),
        (
            "interrupted copy",
            "async",
            "KeyboardInterrupt",
        ),  # a second Ctrl-C (tests/test_interrupts)
    ],
)
def test_one_ranks_failure_to_save_fails_every_rank_at_once(
    ckpt_root: str, how: str, mode: str, cause: str
) -> None:
    """A bad path on one rank, a SystemExit in its Stateful, a failing staging copy (an
    UnboundLocalError hid it and its peer waited for the process group's timeout)."""
    first, second = run_distributed(
        2, _one_rank_fails_a_save, ckpt_root, how, mode, pg_timeout=30, timeout=120
    )
    own, _, then = _assert_prompt(second).partition(" | then ")
    assert own.startswith(cause), second
    peer = _assert_prompt(first).partition(" | then ")[0]
    assert "rank 1" in peer and cause in peer, first
    assert not os.path.exists(f"{ckpt_root}/ckpt/manifest.json")
    assert _assert_prompt(then) == "returned", second
    assert _assert_prompt(first.partition(" | then ")[2]) == "returned", first


def _one_rank_exits_in_a_load(rank: int, world_size: int, path: str) -> str:
    state: dict[str, Any] = {"w": torch.zeros(1024)}
    if rank == 1:
        state["extra"] = _Exiting()
    return _timed(lambda: unickpt.load(path, state, strict=False))


def test_a_system_exit_in_one_ranks_load_fails_every_rank_at_once(ckpt_root: str) -> None:
    unickpt.save(f"{ckpt_root}/w", {"w": torch.ones(1024)})
    first, second = run_distributed(
        2, _one_rank_exits_in_a_load, f"{ckpt_root}/w", pg_timeout=30, timeout=120
    )
    assert _assert_prompt(second) == "SystemExit: state_dict exits", second
    assert _assert_prompt(first).startswith("CheckpointError: load failed on rank 1: SystemExit"), (
        first
    )


def _save_beside_a_reservation(rank: int, world_size: int, root: str) -> str:
    state = {"w": torch.ones(1024)}
    if rank == 0:
        return _timed(lambda: unickpt.save(f"{root}/ckpt", state, mode="async").wait())
    return _timed(lambda: unickpt.reserve_staging(state).wait())


def test_a_save_beside_a_peers_reservation_is_refused_by_name(ckpt_root: str) -> None:
    """Ranks out of step (a manager saving at different steps): was an IndexError on rank 0."""
    first, second = run_distributed(
        2, _save_beside_a_reservation, ckpt_root, pg_timeout=30, timeout=120
    )
    for message in (first, second):
        text = _assert_prompt(message)
        assert text.startswith("InvalidStateError: ranks disagree on the save"), message
        assert "prepares its staging pool (reserve_staging) instead of saving" in text, message


@pytest.mark.parametrize("reader", ["load", "verify"])
def test_a_checkpoint_deleted_while_being_read_is_not_found_not_corrupt(
    ckpt_root: str, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    """Retention or gc of another job deleting it under an evaluation job's load: its files
    are missing because it is gone, not because it is damaged (audit W)."""
    from unickpt.storage import LocalStorage

    path = f"{ckpt_root}/doomed"
    unickpt.save(path, {"w": torch.ones(64)})
    open_reader = LocalStorage.open_reader

    def deleted_first(self: LocalStorage, name: str) -> Any:
        if name.startswith("data/"):
            shutil.rmtree(path, ignore_errors=True)
        return open_reader(self, name)

    monkeypatch.setattr(LocalStorage, "open_reader", deleted_first)
    with pytest.raises(unickpt.CheckpointNotFoundError, match="deleted while it was being read"):
        read_with(reader, path, {"w": torch.zeros(64)})


def test_a_tensor_of_more_dimensions_than_a_checkpoint_holds_is_refused_by_name(
    ckpt_root: str,
) -> None:
    """It failed with numpy's bare ValueError while writing."""
    with pytest.raises(unickpt.InvalidStateError, match=r"'w' has 65 dimensions; .* at most 64"):
        unickpt.save(f"{ckpt_root}/deep", {"w": torch.ones([1] * 65)})
    assert not os.path.exists(f"{ckpt_root}/deep/manifest.json")


class _Interrupted:
    """A Stateful whose state_dict() is interrupted (Ctrl-C)."""

    def state_dict(self) -> dict[str, Any]:
        raise KeyboardInterrupt

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@pytest.mark.parametrize("mode", ["sync", "async", "lazy"])
def test_an_interrupt_in_a_save_call_reaches_the_caller(ckpt_root: str, mode: str) -> None:
    """Ctrl-C while a save collects the state: never swallowed into a background handle."""
    with pytest.raises(KeyboardInterrupt):
        unickpt.save(f"{ckpt_root}/i", {"w": torch.ones(4), "s": _Interrupted()}, mode=mode)  # type: ignore[call-overload]
    assert not os.path.exists(f"{ckpt_root}/i/manifest.json")
    handle = unickpt.save(f"{ckpt_root}/next", {"w": torch.ones(4)}, mode=mode)  # type: ignore[call-overload]
    assert (handle.wait() if mode != "sync" else handle) is not None


def _interrupted_while_rank_0_tidies(rank: int, world_size: int, root: str) -> str:
    import importlib

    save_module = importlib.import_module("unickpt.engine.save")
    tidy = save_module.tidy
    if rank == 0:

        def interrupted(*args: Any) -> None:
            raise KeyboardInterrupt

        save_module.tidy = interrupted
    message = _timed(lambda: unickpt.save(f"{root}/ckpt", {f"w{rank}": torch.ones(64)}))
    save_module.tidy = tidy
    return message


def test_an_interrupt_after_the_commit_tells_the_peers_it_committed(ckpt_root: str) -> None:
    """Rank 0 interrupted while it tidies a committed checkpoint: the peers were left waiting
    for its verdict (audit Z2); they return, and rank 0 raises the interrupt."""
    first, second = run_distributed(
        2, _interrupted_while_rank_0_tidies, ckpt_root, pg_timeout=30, timeout=120
    )
    assert _assert_prompt(first) == "KeyboardInterrupt: ", first
    assert _assert_prompt(second) == "returned", second
    unickpt.verify(f"{ckpt_root}/ckpt")
