"""The few collectives a save or load needs, over torch.distributed, exchanging bytes (no pickle).

Without an initialised process group, a single process is a world of one.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist

from unickpt.errors import CollectiveError


def world_timeout() -> datetime.timedelta | None:
    """The timeout the caller gave its default process group (None: not known)."""
    world = dist.group.WORLD
    for device in ("cpu", "cuda"):
        with contextlib.suppress(Exception):
            timeout = world._get_backend(torch.device(device)).options._timeout  # type: ignore[union-attr]
            return timeout if isinstance(timeout, datetime.timedelta) else None
    return None


@contextlib.contextmanager
def naming_failures(what: str) -> Iterator[None]:
    """A collective's failure (torch's DistBackendError, DistStoreError, gloo timeouts, all
    RuntimeErrors) as a CollectiveError that says what to look for."""
    try:
        yield
    except RuntimeError as exc:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        raise CollectiveError(
            f"{what} on rank {rank} of {world} failed: {exc}. Every rank must make the same "
            "save/load call (same path, mode and step); a peer that did not, or failed or died, "
            "leaves the others here until the process group's timeout"
        ) from exc


def new_gloo_group() -> dist.ProcessGroup:
    """A gloo group of every rank (a collective), for checkpoint traffic off the caller's
    collectives, with the default group's timeout: ``new_group``'s own is 30 minutes, whatever
    the caller chose."""
    with naming_failures("creating unickpt's process group"):
        group: dist.ProcessGroup = dist.new_group(backend="gloo", timeout=world_timeout())
    return group


class Comm:
    """Rank, world size, and byte-string collectives on a process group (default: the world)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.active = dist.is_available() and dist.is_initialized()
        if not self.active and os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):
            # torchrun started several processes, but none set up a process group: each takes
            # itself for a world of one, and they would all save the whole state to one path.
            warnings.warn(
                f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but no torch.distributed process "
                "group is initialised: unickpt runs as a world of one in this process. Call "
                "torch.distributed.init_process_group() first.",
                stacklevel=3,
            )
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
        with naming_failures("a checkpoint all-gather"):
            return self._all_gather_bytes(data)

    def _all_gather_bytes(self, data: bytes) -> list[bytes]:
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
        with naming_failures(f"a checkpoint broadcast from rank {src}"):
            return self._broadcast_bytes(data, src)

    def _broadcast_bytes(self, data: bytes, src: int) -> bytes:
        size = torch.tensor([len(data)], dtype=torch.int64, device=self._device)
        dist.broadcast(size, self._global(src), group=self.group)
        payload = torch.zeros(int(size.item()), dtype=torch.uint8, device=self._device)
        if self.rank == src and data:
            payload[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        dist.broadcast(payload, self._global(src), group=self.group)
        return payload.cpu().numpy().tobytes()
