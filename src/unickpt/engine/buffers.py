"""Byte views over tensor memory: how shards move between tensors and storage without copies."""

from __future__ import annotations

import torch


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU tensor's bytes (no copy)."""
    assert tensor.device.type == "cpu" and tensor.is_contiguous()
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The row-major bytes of any tensor (copied only when not contiguous or not on the host)."""
    flat = tensor.detach().contiguous()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return byte_view(flat)
