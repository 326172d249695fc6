"""unickpt -> Hugging Face safetensors: the model's weights, in the files ``save_pretrained``
writes, streamed one tensor at a time.

What is exported: every ``model.<name>`` tensor of the checkpoint, as ``<name>`` (optimizer state
and other entries are left out). Names go through the optional spec: the first rule whose
``match`` regex is found in ``<name>`` decides; ``drop: true`` leaves the tensor out, ``rename``
rewrites the name (``re.sub`` of the match, as in conversion); a name no rule matches is an error
for a strict spec and kept as it is otherwise. The rules' merge actions play no part: a unickpt
checkpoint holds whole tensors already. Specs are one-way, so exporting names that were renamed
on import needs a spec whose renames go the other way.

Files: ``model.safetensors`` when everything fits in ``max_shard_size``, else
``model-00001-of-0000N.safetensors`` ... plus ``model.safetensors.index.json``
(``{"metadata": {"total_size": ...}, "weight_map": {name: file}}``). Tensors are dealt into
shards in name order, a new shard starting when the next tensor would overflow the current one;
a tensor larger than ``max_shard_size`` gets a shard of its own. As in ``transformers``, the size
counts tensor bytes (``total_size`` too), not the few-KB headers. An earlier export's index and
``model.safetensors`` are deleted first; each file is written to a temporary name and renamed
into place; the index is written last; the earlier export's other ``model*.safetensors`` files
are then deleted. So no loader mixes two exports, even after one failed midway.

Weights only: ``config.json``, tokenizer and generation files are the caller's to copy (a unickpt
checkpoint does not carry them). Tied weights (e.g. GPT-2's ``lm_head.weight`` and
``transformer.wte.weight``) are saved by ``unickpt.save`` as two equal tensors, and exported as
two: a valid safetensors file (no shared storage), which ``transformers`` loads and re-ties.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from unickpt.convert.hf import INDEX_FILE, SINGLE_FILE, open_location, parse_spec
from unickpt.convert.spec import Spec
from unickpt.engine.buffers import streaming_empty, tensor_bytes
from unickpt.engine.load import CheckpointReader
from unickpt.engine.stream import LazyTensor, Progress
from unickpt.errors import ConversionError
from unickpt.format.dtypes import dtype_name, torch_dtype
from unickpt.format.safetensors_file import FileEntry, encode_header
from unickpt.storage import Storage

MODEL_PREFIX = "model."
HF_METADATA = {"format": "pt"}  # what transformers writes and checks for on load

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40})
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string like ``"5GB"`` (10^9), ``"500MB"``, ``"2GiB"``
    (2^30), ``"1.5GB"``, ``"100"`` (bytes). Units are case-insensitive, as in transformers."""
    if isinstance(size, bool) or not isinstance(size, int | str):
        raise ConversionError(f"size must be an int or a string like '5GB', not {size!r}")
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.match(size)
        if match is None:
            raise ConversionError(
                f"cannot parse size {size!r}: use bytes or a number with KB, MB, GB, TB "
                "(powers of 10) or KiB, MiB, GiB, TiB (powers of 2)"
            )
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])
    if value <= 0:
        raise ConversionError(f"size must be positive, got {size!r}")
    return value


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The floating dtype named by ``dtype`` (``bf16``, ``fp16``, ``fp32``, ``fp64`` or the
    torch names), or None for no conversion."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        found = _DTYPES.get(dtype.strip().lower().removeprefix("torch."))
        if found is None:
            raise ConversionError(
                f"unknown dtype {dtype!r}: use one of {', '.join(sorted(_DTYPES))}"
            )
        return found
    if dtype not in _DTYPES.values():
        raise ConversionError(f"export dtype must be a floating dtype, got {dtype}")
    return dtype


@dataclass(frozen=True)
class _Export:
    """One exported tensor: its HF name, where it comes from and the dtype it is written in."""

    name: str
    source: LazyTensor
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.source.shape) * self.dtype.itemsize


def _plan(reader: CheckpointReader, rules: Spec | None, cast: torch.dtype | None) -> list[_Export]:
    """The exported tensors, in name order, after the spec's renames and drops."""

    def read(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> LazyTensor:
        return LazyTensor(
            shape, dtype, lambda: reader.read(key, streaming_empty(shape, dtype)), key
        )

    model = {
        key[len(MODEL_PREFIX) :]: read(key, meta.shape, torch_dtype(meta.dtype))
        for key, meta in reader.manifest.tensors.items()
        if key.startswith(MODEL_PREFIX) and meta.encoding == "raw"
    }
    if rules is not None:  # one stage of one rank: the rules' drops and renames apply
        model = rules.merge([[model]])
    if not model:
        raise ConversionError(f"checkpoint {reader.storage.url} has no model tensor to export")
    return [
        _Export(
            name,
            lazy,
            cast if cast is not None and lazy.dtype.is_floating_point else lazy.dtype,
        )
        for name, lazy in sorted(model.items())
    ]


def shard(sizes: Sequence[int], max_bytes: int) -> list[list[int]]:
    """Indices of ``sizes`` dealt, in order, into shards of at most ``max_bytes`` (a larger item
    alone in its own shard), the way ``transformers`` shards a state dict."""
    shards: list[list[int]] = []
    used = 0
    for index, size in enumerate(sizes):
        if not shards or used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(index)
        used += size
    return shards


def _file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _write_shard(
    storage: Storage,
    file: str,
    members: Sequence[_Export],
    wrote: Callable[[int], None],
) -> None:
    entries = [
        FileEntry(e.name, dtype_name(e.dtype, key=e.name), e.source.shape, e.nbytes)
        for e in members
    ]
    header, _ = encode_header(entries, dict(HF_METADATA))
    with storage.naming_errors(file), storage.open_writer(file) as writer:
        writer.write(header)
        for export in members:
            tensor = export.source.materialize(export.name)
            if tensor.dtype != export.dtype:
                tensor = streaming_empty(tensor.shape, export.dtype).copy_(tensor)
            writer.write(tensor_bytes(tensor))
            del tensor
            wrote(export.nbytes)


def _remove_stale(storage: Storage, written: set[str]) -> None:
    """Delete weight files of an earlier export that this one replaced (top level only)."""
    for path in storage.list():
        stale = path in (SINGLE_FILE, INDEX_FILE) or _SHARD_NAME.match(path)
        if stale and path not in written:
            storage.delete(path)


def export_hf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    spec: Spec | str | os.PathLike[str] | None = None,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    progress: Progress | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Export the model of the unickpt checkpoint ``src`` as HF safetensors into directory ``dst``.

    See the module documentation for names, spec, sharding and tied weights. ``max_shard_size``
    is bytes or a string like ``"5GB"``/``"2GiB"``; ``dtype`` (``"bf16"``, ``"fp16"``,
    ``"fp32"`` or a torch dtype) casts floating tensors, others keep theirs. Memory stays at the
    tensor being written (plus its cast). ``storage_options`` configure the ``s3://`` side(s);
    ``progress(done, total)`` is called in output bytes. Returns the files written, relative to
    ``dst``: the shards, then the index if there is one.
    """
    max_bytes = parse_size(max_shard_size)
    cast = parse_dtype(dtype)
    rules = parse_spec(spec)
    storage = open_location(dst, storage_options)
    with CheckpointReader(open_location(src, storage_options)) as reader:
        plan = _plan(reader, rules, cast)
        groups = shard([e.nbytes for e in plan], max_bytes)
        files = _file_names(len(groups))
        total = sum(e.nbytes for e in plan)
        done = 0

        def wrote(nbytes: int) -> None:
            nonlocal done
            done += nbytes
            if progress is not None:
                progress(done, total)

        # What loaders open first goes before any new file is written, and the index comes
        # last: an export that fails midway must not look complete, mixing two exports' shards.
        for entry_point in (INDEX_FILE, SINGLE_FILE):
            storage.delete(entry_point)
        for file, group in zip(files, groups, strict=True):
            _write_shard(storage, file, [plan[i] for i in group], wrote)
    written = list(files)
    if len(files) > 1:
        weight_map = {
            plan[i].name: file for file, group in zip(files, groups, strict=True) for i in group
        }
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        storage.put_atomic(INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode())
        written.append(INDEX_FILE)
    _remove_stale(storage, set(written))
    return written


__all__ = ["export_hf", "parse_dtype", "parse_size", "shard"]
