"""The few collectives a save or load needs, over torch.distributed, exchanging bytes (no pickle).

Without an initialised process group, a single process is a world of one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Comm:
    """Rank, world size, and byte-string collectives on a process group (default: the world)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.active = dist.is_available() and dist.is_initialized()
        self.group = group
        self.rank = dist.get_rank(group) if self.active else 0
        self.world_size = dist.get_world_size(group) if self.active else 1
        self._device = torch.device("cpu")
        if self.active and dist.get_backend(group) == "nccl":
            self._device = torch.device("cuda", torch.cuda.current_device())

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order, on every rank."""
        if self.world_size == 1:
            return [data]
        size = torch.tensor([len(data)], dtype=torch.int64, device=self._device)
        sizes = [torch.empty_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self.group)
        lengths = [int(s.item()) for s in sizes]
        longest = max(lengths)
        payload = torch.zeros(longest, dtype=torch.uint8, device=self._device)
        if data:
            payload[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        gathered = [torch.empty_like(payload) for _ in range(self.world_size)]
        dist.all_gather(gathered, payload, group=self.group)
        return [g[:n].cpu().numpy().tobytes() for g, n in zip(gathered, lengths, strict=True)]

    def _global(self, group_rank: int) -> int:
        return (
            dist.get_global_rank(self.group, group_rank) if self.group is not None else group_rank
        )

    def broadcast_bytes(self, data: bytes, src: int = 0) -> bytes:
        """Rank ``src``'s ``data`` on every rank."""
        if self.world_size == 1:
            return data
        size = torch.tensor([len(data)], dtype=torch.int64, device=self._device)
        dist.broadcast(size, self._global(src), group=self.group)
        payload = torch.zeros(int(size.item()), dtype=torch.uint8, device=self._device)
        if self.rank == src and data:
            payload[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        dist.broadcast(payload, self._global(src), group=self.group)
        return payload.cpu().numpy().tobytes()
