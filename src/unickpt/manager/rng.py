"""Per-rank RNG state as one fixed-length int64 row: torch CPU (and CUDA), numpy, python."""

from __future__ import annotations

import random
import struct

import numpy as np
import torch

# Layout of the row: a version tag, then each generator's state as raw int64 words.
_VERSION = 1


def _float_bits(value: float) -> int:
    return int(struct.unpack("<q", struct.pack("<d", value))[0])


def _bits_float(bits: int) -> float:
    return float(struct.unpack("<d", struct.pack("<q", bits))[0])


def _torch_states() -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if torch.cuda.is_available():
        states += list(torch.cuda.get_rng_state_all())
    return states


def capture() -> torch.Tensor:
    """This process's RNG states, packed into an int64 vector of fixed length for this setup."""
    words: list[int] = [_VERSION]
    for state in _torch_states():
        padded = state.numpy().tobytes()
        padded += b"\0" * (-len(padded) % 8)
        words += [len(state), *np.frombuffer(padded, dtype=np.int64).tolist()]
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    assert name == "MT19937"
    words += [int(k) for k in keys] + [int(pos), int(has_gauss), _float_bits(float(cached))]
    version, internal, gauss = random.getstate()
    words += [int(version), *internal]
    words += [0, 0] if gauss is None else [1, _float_bits(gauss)]
    return torch.tensor(words, dtype=torch.int64)


def restore(row: torch.Tensor) -> None:
    """Set this process's RNG states from a row made by :func:`capture` in the same setup."""
    words = row.tolist()
    if words[0] != _VERSION:
        raise ValueError(f"unknown RNG state layout version {words[0]}")
    at = 1
    torch_states = []
    for _ in _torch_states():
        length = words[at]
        count = -(-length // 8)
        raw = np.array(words[at + 1 : at + 1 + count], dtype=np.int64).tobytes()[:length]
        torch_states.append(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        at += 1 + count
    torch.set_rng_state(torch_states[0])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all(torch_states[1:])
    keys = np.array(words[at : at + 624], dtype=np.uint32)
    pos, has_gauss, cached = words[at + 624 : at + 627]
    np.random.set_state(("MT19937", keys, pos, has_gauss, _bits_float(cached)))
    at += 627
    version, internal = words[at], tuple(words[at + 1 : at + 626])
    flag, gauss = words[at + 626 : at + 628]
    random.setstate((version, internal, _bits_float(gauss) if flag else None))
