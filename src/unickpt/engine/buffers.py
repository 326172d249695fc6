"""Host memory for tensors: byte views (shards move between tensors and storage without
copies) and buffers in their own memory mappings (page-aligned, handed back when freed)."""

from __future__ import annotations

import ctypes
import math
import mmap
from typing import Any

import torch

MAPPED_BYTES = 1 << 20  # streaming tools map buffers at least this large


def _malloc_trim() -> Any:
    try:  # glibc only; the C library this process already uses
        return ctypes.CDLL(None).malloc_trim
    except (OSError, TypeError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def flat(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's elements in one dimension of stride 1 (no copy). ``reshape(-1)``
    keeps the stride of a tensor of at most one element, which torch counts as contiguous
    whatever its strides (``arange(3.)[1::2]``), and ``view(torch.uint8)`` then refuses it."""
    assert tensor.is_contiguous()
    return tensor.as_strided((tensor.numel(),), (1,))


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU tensor's bytes (no copy)."""
    assert tensor.device.type == "cpu"
    return memoryview(flat(tensor.detach()).view(torch.uint8).numpy())  # type: ignore[arg-type]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The row-major bytes of any tensor (copied only when not contiguous or not on the host)."""
    flat = tensor.detach().contiguous()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return byte_view(flat)


def mapped_empty(
    shape: tuple[int, ...], dtype: torch.dtype, *, populate: bool = False
) -> torch.Tensor:
    """An uninitialised CPU tensor in its own private anonymous memory mapping: page-aligned
    (direct I/O can write from it) and unmapped as soon as the tensor is freed. ``populate``
    faults every page in now, in one kernel call (much faster than touching them one by one).
    """
    count = math.prod(shape)
    if count == 0:  # nothing to map (frombuffer refuses an empty count)
        return torch.empty(shape, dtype=dtype)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (mmap.MAP_POPULATE if populate else 0)
    memory = mmap.mmap(-1, max(count * dtype.itemsize, 1), flags=flags)
    # The tensor holds a reference to the mapping: it is unmapped with the tensor.
    return torch.frombuffer(memory, dtype=dtype, count=count).view(shape)


def streaming_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor for streaming tools, which allocate and free one large
    tensor after another: one of ``MAPPED_BYTES`` or more is :func:`mapped_empty`.

    glibc serves sizes below its dynamic mmap threshold (up to 32 MiB) from the heap, where the
    small allocations made in between land in freed blocks, so that the next large one no longer
    fits and the heap grows: importing 40 tensors of 16 MiB grew the process by 144 MiB instead
    of 34 MiB (tests/test_convert_memory.py).
    """
    if math.prod(shape) * dtype.itemsize < MAPPED_BYTES:
        return torch.empty(shape, dtype=dtype)
    return mapped_empty(shape, dtype)


def release_freed_memory() -> None:
    """Hand the pages of freed heap blocks back to the OS (glibc ``malloc_trim``; elsewhere a
    no-op). For buffers others allocate on the heap (``torch.load``), where
    :func:`streaming_empty` cannot be used: the blocks stay for reuse, their memory does not."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
