"""Chunk checksums: xxh3-64 (C-backed ``xxhash``), rendered as 16 hex digits."""

from __future__ import annotations

import xxhash

ALGORITHM = "xxh3_64"


class Checksummer:
    """Incremental checksum over a chunk's bytes, fed as they stream to storage."""

    def __init__(self) -> None:
        self._state = xxhash.xxh3_64()

    def update(self, data: memoryview | bytes | bytearray) -> None:
        self._state.update(data)

    def hexdigest(self) -> str:
        return self._state.hexdigest()


def checksum(data: memoryview | bytes | bytearray) -> str:
    """Checksum of one complete buffer."""
    return xxhash.xxh3_64_hexdigest(data)
