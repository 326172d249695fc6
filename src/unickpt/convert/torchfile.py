"""Reading foreign ``.pt`` files without running their code, and without holding them in memory.

``torch.load(weights_only=True)`` unpickles only tensors, containers and the globals allow-listed
here (or by the importer asking); anything else is refused with an error that names the global
and points at ``trust_pickle`` / ``--trust-pickle``. Files are memory-mapped, so a tensor's bytes
are read when used; :func:`release_pages` hands them back to the kernel afterwards, which keeps a
converter's resident memory at the tensors in flight instead of the files it has touched.

What the importers of local sources (DeepSpeed, Megatron) share besides: every file and folder
they read must resolve inside the source (:func:`inside`), tracker files are read only as far as
a tag can be long (:func:`read_tracker`), archives with compressed members are refused
(:func:`refuse_compressed`), the non-tensor values bound for the manifest are sized before they
are turned into JSON (:class:`JsonBudget`).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import functools
import mmap
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, ParamSpec, TypeVar

import torch

from unickpt.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StorageError,
    UnsafeCheckpointError,
    printable,
    short_repr,
)
from unickpt.format.manifest import MAX_MANIFEST_BYTES
from unickpt.format.untrusted import json_size_bound
from unickpt.storage import LocalStorage

_P = ParamSpec("_P")
_R = TypeVar("_R")


def reports_malformed_source(kind: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """For an importer whose first argument is its source: the exceptions that plain data of
    the wrong shape raises while it is taken apart (a missing key, a list where a dict belongs,
    a string where a number does; a crafted or foreign file loads fine weights-only) become a
    CorruptCheckpointError naming the source."""

    def wrap(importer: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(importer)
        def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return importer(*args, **kwargs)
            except CheckpointError:
                raise
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                source = args[0] if args else kwargs.get("src")
                # the message may quote a crafted value (int() of a huge string quotes it whole)
                text = str(exc)
                cause = text if len(text) <= 300 else f"{text[:300]}..."
                raise CorruptCheckpointError(
                    f"{source} is not a well-formed {kind} checkpoint: {type(exc).__name__}: "
                    f"{printable(cause)}"
                ) from exc

        return run

    return wrap


# Plain data that Megatron and DeepSpeed files commonly carry besides tensors.
SAFE_GLOBALS: tuple[Any, ...] = (argparse.Namespace,)

_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages (clean file pages are simply dropped)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_PAGE = mmap.PAGESIZE


def load_torch_file(
    path: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    extra_globals: Iterable[Any] = (),
) -> Any:
    """Unpickle a ``torch.save`` file onto the CPU, memory-mapped when its format allows.

    Without ``trust_pickle`` only tensors, containers, :data:`SAFE_GLOBALS` and
    ``extra_globals`` (classes, functions, or ``(stand_in, "module.Name")`` pairs that map a
    foreign class to a harmless local one) are accepted; anything else raises
    UnsafeCheckpointError naming the global. ``trust_pickle=True`` runs the full unpickler:
    only for files you trust, since unpickling can execute arbitrary code.
    """
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise CheckpointNotFoundError(f"no such file: {where}")
    use_mmap = zipfile.is_zipfile(where)  # the legacy (pre-1.6) format cannot be mapped
    try:
        if use_mmap:
            refuse_compressed(where, where)
        if trust_pickle:
            return torch.load(where, map_location="cpu", weights_only=False, mmap=use_mmap)
        with torch.serialization.safe_globals([*SAFE_GLOBALS, *extra_globals]):
            return torch.load(where, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        raise unpickling_error(where, exc, trusted=trust_pickle) from exc
    except (ImportError, AttributeError) as exc:  # trusted, but its classes are not importable
        raise CorruptCheckpointError(
            f"{where} cannot be unpickled here: {type(exc).__name__}: {exc} (the code that "
            "wrote it must be installed to unpickle its objects)"
        ) from exc
    except OSError as exc:  # torch's zip reader says EINVAL for a cut-off archive
        if exc.errno != errno.EINVAL:
            raise StorageError(f"cannot read {where}: {exc}") from exc
        raise CorruptCheckpointError(f"{where} is not a readable torch file: {exc}") from exc
    # KeyError/ValueError: the legacy format's loader on a file that is no torch file at all
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise CorruptCheckpointError(
            f"{where} is not a readable torch file: {type(exc).__name__}: {exc}"
        ) from exc


def refuse_compressed(archive: str | IO[bytes], where: str) -> None:
    """Raise CorruptCheckpointError naming ``where`` unless every member of the zip ``archive``
    (a path or a seekable file) is stored uncompressed, as ``torch.save`` writes them all.

    ``torch.load`` inflates a compressed member into memory: DEFLATE packs a run of zeros about
    1000x, so a file of megabytes could make a converter allocate and write gigabytes. Only the
    central directory is read (the member sizes and methods ``torch.load`` goes by too).
    """
    try:
        with zipfile.ZipFile(archive) as listing:
            packed = [m for m in listing.infolist() if m.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise CorruptCheckpointError(f"{where} is not a readable torch file: {exc}") from exc
    if packed:
        raise CorruptCheckpointError(
            f"{where} has {len(packed)} compressed record(s) ({packed[0].filename!r}, ...); "
            "torch.save writes none, and unickpt does not inflate them"
        )


def unpickling_error(
    where: str, exc: pickle.UnpicklingError, *, trusted: bool
) -> CorruptCheckpointError | UnsafeCheckpointError:
    """What a failed ``torch.load`` of ``where`` means: a global the safe unpickler refuses
    (UnsafeCheckpointError, naming it), or bytes that are no pickle at all (corrupt)."""
    global_name = re.search(r"GLOBAL (\S+)", str(exc))
    if trusted or global_name is None:  # garbage, not a class we refuse to import
        return CorruptCheckpointError(f"{where} cannot be unpickled: {_weights_only_cause(exc)}")
    return UnsafeCheckpointError(
        f"{where} needs Python objects that unickpt does not load by default "
        f"(global {global_name.group(1)!r} is not allow-listed). Unpickling them can execute "
        "arbitrary code: re-run with --trust-pickle (trust_pickle=True) only if you trust "
        "where this file came from"
    )


def _weights_only_cause(exc: BaseException) -> str:
    """What the unpickler tripped on, without torch's advice to turn weights_only off."""
    text = str(exc)
    if match := re.search(r"WeightsUnpickler error:\s*(.+)", text):
        return match.group(1).strip()
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def release_pages(tensor: torch.Tensor) -> None:
    """Hint that ``tensor``'s memory will not be needed soon (its contents stay valid).

    For a memory-mapped file this drops the pages from the process's resident set (they are
    re-read on the next access); for ordinary memory it is a no-op without swap.
    """
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    # Only the tensor's own span: its neighbours in a shared (memory-mapped) storage may be next.
    steps = zip(tensor.shape, tensor.stride(), strict=True)
    extent = 1 + sum((size - 1) * stride for size, stride in steps)
    start = tensor.data_ptr() // _PAGE * _PAGE
    end = tensor.data_ptr() + extent * tensor.element_size()
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)


def source_storage(root: str | os.PathLike[str]) -> LocalStorage:
    """The local directory ``root`` of a source to convert, as storage that refuses paths
    resolving outside it: a source must not make a conversion read, and write into its output,
    files its owner did not put in it. Its layout may keep files elsewhere: a snapshot of the
    Hugging Face cache (``<repo>/snapshots/<revision>``, what ``snapshot_download`` returns)
    links each file to ``<repo>/blobs``, where it may resolve too."""
    parent = os.path.dirname(os.path.realpath(root))
    blobs = os.path.join(os.path.dirname(parent), "blobs")
    hub = os.path.basename(parent) == "snapshots" and os.path.isdir(blobs)
    return LocalStorage(os.fspath(root), also_inside=(blobs,) if hub else ())


def inside(root: Path, path: Path) -> Path:
    """``path``, a file or folder below ``root``, once known to resolve inside the source
    ``root`` (:func:`source_storage`); UnsafeCheckpointError naming it otherwise (a symlink to
    elsewhere), the check every path of an HF or DCP source passes."""
    source_storage(root).check_inside(path.relative_to(root).as_posix())
    return path


MAX_TRACKER_BYTES = 4096  # a tag or an iteration number; anything longer names no checkpoint


def read_tracker(root: Path, name: str) -> str:
    """The stripped text of ``root``'s tracker file ``name`` (DeepSpeed's ``latest``,
    Megatron's ``latest_checkpointed_iteration.txt``): inside ``root``, at most
    :data:`MAX_TRACKER_BYTES` of UTF-8, or CorruptCheckpointError naming it. Only that much is
    read, however large the file claims to be."""
    path = inside(root, root / name)
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_TRACKER_BYTES + 1)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc}") from exc
    if len(data) > MAX_TRACKER_BYTES:
        raise CorruptCheckpointError(
            f"{path} is longer than the {MAX_TRACKER_BYTES} bytes a tag or an iteration takes: "
            f"{short_repr(data)}"
        )
    try:
        return data.decode().strip()
    except UnicodeDecodeError as exc:
        raise CorruptCheckpointError(f"{path} is not UTF-8 text: {short_repr(data)}") from exc


class JsonBudget:
    """What the non-tensor values one conversion takes from its source may add up to as JSON.

    They all go into one manifest, which readers refuse beyond ``MAX_MANIFEST_BYTES``; and a
    value unpickled from a few hundred bytes can be exponentially larger as JSON (a list that
    holds another twice, 40 deep), so that ``json.dumps``, ``repr`` or a recursive walk of it
    would never end. :meth:`charge` each value before anything walks it.
    """

    def __init__(self, limit: int = MAX_MANIFEST_BYTES) -> None:
        self.left = limit

    def charge(self, value: Any, what: str) -> None:
        """Count ``value`` against the budget; CorruptCheckpointError naming ``what`` (its key
        and file) once the values so far would not fit in a manifest."""
        try:
            size = json_size_bound(value, self.left)
        except RecursionError:
            raise CorruptCheckpointError(f"{what} is nested too deeply to be JSON") from None
        if size > self.left:
            raise CorruptCheckpointError(
                f"{what} is too large as JSON: with the values before it, more than the "
                f"{MAX_MANIFEST_BYTES} bytes a manifest may hold"
            )
        self.left -= size


def tensor_files(root: str | os.PathLike[str], pattern: str) -> list[Path]:
    """Files under ``root`` matching a glob ``pattern``, sorted; CheckpointNotFoundError if none."""
    found = sorted(Path(root).glob(pattern))
    if not found:
        raise CheckpointNotFoundError(f"no {pattern} under {os.fspath(root)}")
    return found


__all__ = [
    "MAX_TRACKER_BYTES",
    "SAFE_GLOBALS",
    "JsonBudget",
    "inside",
    "load_torch_file",
    "read_tracker",
    "refuse_compressed",
    "release_pages",
    "tensor_files",
]
