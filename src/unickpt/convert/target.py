"""What every importer writes: the checkpoint ``unickpt.save(path, {"model": m, "optim": o})``
would have written for the same model and torch optimizer (docs/FORMAT.md §5), streamed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from unickpt.engine.stream import LazyTensor, Progress, stream_save
from unickpt.format.manifest import Manifest
from unickpt.storage import Storage

MODEL = "model"
OPTIM = "optim"


def optimizer_step(step: int | float) -> LazyTensor:
    """Adam's per-parameter ``step`` as torch keeps it: a 0-d float32 tensor."""
    return LazyTensor.of(torch.tensor(float(step), dtype=torch.float32))


def write_converted(
    dst: str | Storage,
    model: Mapping[str, LazyTensor],
    *,
    optimizer_state: Mapping[str, Mapping[str, LazyTensor]] | None = None,
    param_groups: Sequence[Mapping[str, Any]] | None = None,
    objects: Mapping[str, Any] | None = None,
    step: int | None = None,
    source: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Stream a converted model (FQN -> tensor) and optimizer state into a checkpoint at ``dst``.

    ``optimizer_state`` maps a parameter FQN to its state (``exp_avg``, ``exp_avg_sq``,
    ``step``...); ``param_groups`` are the optimizer's groups, hyper-parameters plus ``params``
    as lists of FQNs. Tensors are written parameter by parameter: the model tensor and its
    optimizer state together, which keeps the reads of interleaved sources (ZeRO partitions)
    sequential. ``source`` is recorded in the manifest's ``writer.converted_from``.
    """
    entries: list[tuple[str, LazyTensor]] = []
    state = dict(optimizer_state or {})
    for fqn, tensor in model.items():
        entries.append((f"{MODEL}.{fqn}", tensor))
        for name, value in state.pop(fqn, {}).items():
            entries.append((f"{OPTIM}.state.{fqn}.{name}", value))
    for fqn, values in state.items():  # state of parameters the model does not list (frozen...)
        entries += [(f"{OPTIM}.state.{fqn}.{name}", value) for name, value in values.items()]
    all_objects = dict(objects or {})
    if param_groups is not None:
        all_objects[f"{OPTIM}.param_groups"] = [dict(g) for g in param_groups]
    return stream_save(
        dst,
        entries,
        objects=all_objects,
        step=step,
        writer_info={"converted_from": dict(source or {})},
        storage_options=storage_options,
        progress=progress,
    )


__all__ = ["MODEL", "OPTIM", "optimizer_step", "write_converted"]
