"""``verify`` checks each data file's whole safetensors header (docs/FORMAT.md §3), not only the
entries the manifest names: ``unickpt.load`` goes by the manifest, but other readers (the
safetensors library among them) read the header, and refuse the whole file over a damaged
``__metadata__`` or a malformed entry.

* Every bit of the header length and JSON text (and of the padding's ends) flipped in turn:
  verify reports the file, unless the safetensors library still reads the same tensors.
* Crafted headers (valid JSON, the manifest's entries intact): each is reported, naming the file,
  in a message of bounded length, never with an exception other than CorruptCheckpointError.

The manifest that points into those files is checked as it is read: a chunk whose fields
contradict each other or its file, or a manifest larger than readers accept, is reported naming
the field (or the size) before any data is read.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import unickpt
from unickpt import CorruptCheckpointError
from unickpt.format import manifest as manifest_format


def _checkpoint(tmp_path: Path) -> tuple[str, Path]:
    """A small checkpoint (a matrix, a vector, a 0-d tensor) and its one data file."""
    path = tmp_path / "ckpt"
    state = {"w": torch.randn(4, 4), "b": torch.arange(3), "s": torch.tensor(2.0)}
    unickpt.save(str(path), state, step=1)
    (data,) = path.glob("data/*.safetensors")
    return str(path), data


def _json_end(raw: bytes) -> int:
    """The file offset just past the header's JSON text (where the space padding starts)."""
    (length,) = struct.unpack("<Q", raw[:8])
    return 8 + len(raw[8 : 8 + length].rstrip(b" "))


def test_every_header_bit_flip_is_reported_or_harmless(tmp_path: Path) -> None:
    path, data = _checkpoint(tmp_path)
    original = data.read_bytes()
    want = load_file(data)
    end = _json_end(original)
    (length,) = struct.unpack("<Q", original[:8])
    positions = [*range(end), end, 8 + length - 1]  # length, JSON, the padding's first and last
    harmless = 0
    for position in positions:
        for bit in range(8):
            damaged = bytearray(original)
            damaged[position] ^= 1 << bit
            data.write_bytes(damaged)
            try:
                unickpt.verify(path)
            except CorruptCheckpointError as exc:
                assert data.name in str(exc), (position, bit, str(exc))
                continue
            # Passed: only right if any safetensors reader still reads the same file.
            try:
                got = load_file(data)
            except Exception as exc:  # the library refuses the header
                pytest.fail(f"bit {bit} of byte {position} flipped: verify passes, {exc}")
            assert got.keys() == want.keys(), (position, bit)
            assert all(torch.equal(got[k], want[k]) for k in want), (position, bit)
            harmless += 1
    assert harmless < len(positions)  # the sweep did find damage (and was not all skipped)


def _add_entry(name: str, entry: Any) -> Callable[[dict[str, Any]], None]:
    return lambda header: header.__setitem__(name, entry)


CRAFTED: dict[str, Callable[[dict[str, Any]], None]] = {
    "metadata missing": lambda header: header.pop("__metadata__"),
    "metadata of another format": lambda header: header["__metadata__"].update(format="x"),
    "metadata of another version": lambda header: header["__metadata__"].update(version="2"),
    "metadata value not a string": lambda header: header["__metadata__"].update(n=1),
    "metadata not an object": lambda header: header.__setitem__("__metadata__", ["unickpt"]),
    "entry not an object": _add_entry("x", [1, 2]),
    "entry with a huge string": _add_entry("x", "y" * 3000),
    "entry nested deeply": _add_entry("x", json.loads("[" * 500 + "]" * 500)),
    "entry with an unknown dtype": _add_entry(
        "x", {"dtype": "F4", "shape": [0], "data_offsets": [0, 0]}
    ),
    "entry with a bool in its shape": _add_entry(
        "x", {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}
    ),
    "entry with a huge shape": _add_entry(
        "x", {"dtype": "U8", "shape": [2**70], "data_offsets": [0, 2**70]}
    ),
    "entry with negative offsets": _add_entry(
        "x", {"dtype": "U8", "shape": [1], "data_offsets": [-1, 0]}
    ),
    "entry with offsets not holding its shape": _add_entry(
        "x", {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}
    ),
    "entry with a field too many": lambda header: header["w@0,0"].update(extra=1),
    "entries overlapping": _add_entry("x", {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}),
    "entry past the data": _add_entry("x", {"dtype": "U8", "shape": [4], "data_offsets": [92, 96]}),
    "key with control characters": _add_entry("\x1b[2J\x07", {"dtype": "F32"}),
}


@pytest.mark.parametrize("change", CRAFTED.values(), ids=CRAFTED.keys())
def test_crafted_headers_are_reported_naming_the_file(
    tmp_path: Path, change: Callable[[dict[str, Any]], None]
) -> None:
    path, data = _checkpoint(tmp_path)
    raw = data.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    change(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length  # same length: the data, and the manifest's offsets, stay put
    data.write_bytes(raw[:8] + text.ljust(length) + raw[8 + length :])
    with pytest.raises(CorruptCheckpointError) as caught:
        unickpt.verify(path)
    message = str(caught.value)
    assert f"{data.name}: safetensors header" in message, message
    assert len(message) < 2000 and "\x1b" not in message, message


def _file_size(manifest: dict[str, Any], chunk: dict[str, Any]) -> int:
    return int(manifest["files"][chunk["file"]])


CRAFTED_CHUNKS: dict[str, tuple[Callable[[dict[str, Any], dict[str, Any]], None], str]] = {
    "nbytes not the sizes' bytes": (
        lambda manifest, chunk: chunk.update(nbytes=chunk["nbytes"] - 4),
        r"\.nbytes: 60 does not match sizes \[4, 4\] of float32",
    ),
    "bytes running past the file's end": (
        lambda manifest, chunk: chunk.update(offset=_file_size(manifest, chunk) - 4),
        r"\.offset: bytes \[\d+, \d+\) lie outside",
    ),
    "checksum in capitals": (
        lambda manifest, chunk: chunk.update(xxh3="F" + chunk["xxh3"][1:].upper()),
        r"\.xxh3: '[0-9A-F]{16}' is not 16 lowercase hex digits",
    ),
    "checksum too short": (
        lambda manifest, chunk: chunk.update(xxh3=chunk["xxh3"][:15]),
        r"\.xxh3: '[0-9a-f]{15}' is not 16 lowercase hex digits",
    ),
}


@pytest.mark.parametrize(("change", "field"), CRAFTED_CHUNKS.values(), ids=CRAFTED_CHUNKS.keys())
def test_crafted_manifest_chunks_are_reported_naming_the_field(
    tmp_path: Path, change: Callable[[dict[str, Any], dict[str, Any]], None], field: str
) -> None:
    """A chunk's byte count, its place in its file and its checksum are checked against each
    other and the file's size as the manifest is read: otherwise a reader trusts them, reading
    another tensor's bytes or past the file, or never matching a checksum it cannot compare."""
    path, _ = _checkpoint(tmp_path)
    manifest_file = Path(path) / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    (chunk,) = manifest["tensors"]["w"]["chunks"]
    change(manifest, chunk)
    manifest_file.write_text(json.dumps(manifest))
    for read in (unickpt.inspect, unickpt.verify):
        with pytest.raises(CorruptCheckpointError, match=r"tensors\['w'\]\.chunks\[0\]" + field):
            read(path)


def test_a_manifest_over_the_size_limit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest is untrusted input read whole into memory: one larger than readers accept
    (a damaged or hostile file, gigabytes long) is refused by its size, not parsed."""
    path, _ = _checkpoint(tmp_path)
    size = (Path(path) / "manifest.json").stat().st_size
    monkeypatch.setattr(manifest_format, "MAX_MANIFEST_BYTES", size - 1)
    with pytest.raises(
        CorruptCheckpointError, match=rf"manifest\.json is {size} bytes, more than the {size - 1}"
    ):
        unickpt.inspect(path)
    monkeypatch.setattr(manifest_format, "MAX_MANIFEST_BYTES", size)  # at the limit: read
    assert unickpt.inspect(path).step == 1
