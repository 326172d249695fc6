"""Data files: standard safetensors (8-byte LE header length, JSON header, raw row-major data).

We write headers ourselves because the data is streamed straight from tensor memory to storage
(no intermediate serialised copy); any safetensors reader can open the result.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from unickpt.errors import CorruptCheckpointError, InvalidStateError
from unickpt.format.dtypes import safetensors_dtype
from unickpt.format.untrusted import parse_json
from unickpt.storage.base import Reader

MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library enforces (its N, bytes 8..)


@dataclass(frozen=True)
class FileEntry:
    """One tensor of a data file: name, manifest dtype, shape and byte length."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def encode_header(
    entries: Sequence[FileEntry], metadata: dict[str, str], *, align: int = 8
) -> tuple[bytes, list[int]]:
    """The header bytes and each entry's absolute byte offset in the file, in entry order.

    The JSON is padded with spaces so that the data starts at a multiple of ``align`` bytes.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    position = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": safetensors_dtype(entry.dtype),
            "shape": list(entry.shape),
            "data_offsets": [position, position + entry.nbytes],
        }
        position += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % align)  # safetensors itself aligns to 8
    if len(text) > MAX_HEADER_BYTES:  # no safetensors reader, unickpt's included, would open it
        raise InvalidStateError(
            f"a data file's header would be {len(text)} bytes, more than the "
            f"{MAX_HEADER_BYTES} safetensors readers accept: {len(entries)} chunks in one file"
        )
    prefix = struct.pack("<Q", len(text)) + text
    offsets = []
    position = len(prefix)
    for entry in entries:
        offsets.append(position)
        position += entry.nbytes
    return prefix, offsets


def read_header(reader: Reader, where: str) -> tuple[dict[str, Any], int]:
    """Parse a data file's header (never executes anything); returns it and the data start."""
    size = reader.size()
    if size < 8:
        raise CorruptCheckpointError(f"data file {where} is truncated: {size} bytes, no header")
    (length,) = struct.unpack("<Q", bytes(reader.read(0, 8)))
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise CorruptCheckpointError(f"data file {where} has an invalid header length {length}")
    header = parse_json(bytes(reader.read(8, length)), f"the header of data file {where}")
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"data file {where} has a malformed header: not an object")
    return header, 8 + length
