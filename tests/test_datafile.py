"""Data-file writing: pieces, spans and checksums agree however the bytes are cut."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from unickpt.engine.datafile import _write_checksummed
from unickpt.format.checksum import checksum
from unickpt.storage import Writer


class _Collect(Writer):
    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def write(self, data: memoryview | bytes) -> None:
        self.calls.append(bytes(data))

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 300), max_size=12),
    piece=st.integers(1, 257),
    seed=st.integers(0, 255),
)
def test_spans_are_checksummed_whatever_the_piece_size(
    sizes: list[int], piece: int, seed: int
) -> None:
    data = bytes((seed + i * 7) % 256 for i in range(sum(sizes)))
    spans, begin = [], 0
    for size in sizes:
        spans.append((begin, begin + size))
        begin += size
    writer = _Collect()
    digests = _write_checksummed(writer, memoryview(data), spans, piece)
    assert digests == [checksum(data[b:e]) for b, e in spans]
    assert b"".join(writer.calls) == data
    assert all(len(call) <= piece for call in writer.calls)
