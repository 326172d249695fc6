"""manifest.json: the commit point and the global description of a checkpoint (docs/FORMAT.md)."""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from unickpt.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidStateError,
    UnsupportedFormatError,
    first_few,
)
from unickpt.format.dtypes import is_known, itemsize
from unickpt.format.untrusted import parse_json, read_json
from unickpt.layout.box import Box, tiling_problem
from unickpt.storage.base import TEMP_INFIX, Storage, check_relative_path

FORMAT_NAME = "unickpt"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INFLIGHT = "_inflight.json"  # present while a save is running (see docs/FORMAT.md, "gc")
DATA_DIR = "data"
DATA_SUFFIX = ".safetensors"
# A data file's name in DATA_DIR (rank, save id, stream; §1 of docs/FORMAT.md), or its temporary.
_DATA_FILE = re.compile(r"r\d{5,}-[0-9a-f]{12}-\d+\.safetensors(\.tmp-[^/]+)?")
MAX_MANIFEST_BYTES = 1 << 30
# The RNG states a CheckpointManager saved, one row per rank: a key reserved for unickpt, which a
# strict load does not ask the state to name (docs/FORMAT.md, "Keys").
RNG_KEY = "__rng__"
RESERVED_KEYS = frozenset({RNG_KEY})
MAX_DIMS = 64  # dimensions of a tensor (numpy's and torch's limit)
MAX_COUNT = 1 << 63  # bound of every count: elements, bytes, offsets, sizes (int64)
_CHECKSUM = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class Chunk:
    """One box of a tensor stored contiguously (row-major) in a data file."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    key: str  # the tensor name inside the safetensors file
    offset: int  # absolute byte offset of the data in the file
    nbytes: int
    xxh3: str

    @property
    def box(self) -> Box:
        return Box(self.offsets, self.sizes)

    def to_json(self) -> dict[str, Any]:
        return {
            "offsets": list(self.offsets),
            "sizes": list(self.sizes),
            "file": self.file,
            "key": self.key,
            "offset": self.offset,
            "nbytes": self.nbytes,
            "xxh3": self.xxh3,
        }


@dataclass
class TensorMeta:
    """A global tensor: dtype, shape and the chunks that tile it."""

    dtype: str
    shape: tuple[int, ...]
    chunks: list[Chunk]
    encoding: str = "raw"  # "pickle": a uint8 tensor holding a pickled object (opt-in only)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape)}
        if self.encoding != "raw":
            out["encoding"] = self.encoding
        out["chunks"] = [c.to_json() for c in self.chunks]
        return out


@dataclass
class Manifest:
    """Everything needed to load a checkpoint, at any layout, without opening a data file first."""

    tensors: dict[str, TensorMeta]
    objects: dict[str, Any] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)  # data file -> size in bytes
    step: int | None = None
    created: str = ""
    writer: dict[str, Any] = field(default_factory=dict)
    user_metadata: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def to_json(self) -> str:
        doc = {
            "format": FORMAT_NAME,
            "version": self.version,
            "step": self.step,
            "created": self.created,
            "writer": self.writer,
            "files": self.files,
            "tensors": {k: t.to_json() for k, t in self.tensors.items()},
            "objects": self.objects,
            "user_metadata": self.user_metadata,
        }
        return json.dumps(doc, separators=(",", ":"), allow_nan=True)

    @staticmethod
    def from_json(text: bytes | str, *, where: str) -> Manifest:
        """Parse and validate; any defect raises CorruptCheckpointError naming what is wrong."""
        return _Parser(where).manifest(parse_json(text, f"manifest {where}"))


class _Parser:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field_path: str, problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"manifest {self.where}: {field_path}: {problem}")

    def get(self, doc: dict[str, Any], name: str, kind: type | tuple[type, ...], at: str) -> Any:
        if name not in doc:
            raise self.fail(f"{at}{name}", "missing")
        value = doc[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(
                f"{at}{name}",
                f"expected {getattr(kind, '__name__', kind)}, found {type(value).__name__}",
            )
        return value

    def ints(self, value: Any, at: str) -> tuple[int, ...]:
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_COUNT for v in value
        ):
            raise self.fail(at, f"expected a list of integers in [0, {MAX_COUNT})")
        return tuple(value)

    def summary(self, doc: Any) -> ManifestSummary:
        """The fields a listing needs, checked; the rest of ``doc`` is not looked at."""
        if not isinstance(doc, dict):
            raise self.fail("(root)", "expected a JSON object")
        if doc.get("format") != FORMAT_NAME:
            raise UnsupportedFormatError(
                f"manifest {self.where}: format is {doc.get('format')!r}, not {FORMAT_NAME!r}"
            )
        version = doc.get("version")
        if type(version) is not int or version != FORMAT_VERSION:  # not True, not 1.0
            raise UnsupportedFormatError(
                f"manifest {self.where}: format version {version!r} is not supported "
                f"(this unickpt reads version {FORMAT_VERSION}); upgrade unickpt"
            )
        step = doc.get("step")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
            raise self.fail("step", "expected an integer or null")
        return ManifestSummary(step, self.get(doc, "user_metadata", dict, ""))

    def manifest(self, doc: Any) -> Manifest:
        summary = self.summary(doc)
        files: dict[str, int] = {}
        for name, size in self.get(doc, "files", dict, "").items():
            check_relative_path(name)
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < MAX_COUNT:
                raise self.fail(f"files[{name!r}]", "expected a byte count")
            files[name] = size
        tensors = {
            key: self.tensor(key, value, files)
            for key, value in self.get(doc, "tensors", dict, "").items()
        }
        objects = self.get(doc, "objects", dict, "")
        if both := sorted(tensors.keys() & objects.keys())[:3]:
            raise self.fail("objects", f"{both} are tensors too: a key names one value")
        return Manifest(
            tensors=tensors,
            objects=objects,
            files=files,
            step=summary.step,
            created=str(doc.get("created", "")),
            writer=self.get(doc, "writer", dict, ""),
            user_metadata=summary.user_metadata,
        )

    def tensor(self, key: str, doc: Any, files: dict[str, int]) -> TensorMeta:
        at = f"tensors[{key!r}]"
        if not isinstance(doc, dict):
            raise self.fail(at, "expected an object")
        dtype = self.get(doc, "dtype", str, at + ".")
        if not is_known(dtype):
            raise self.fail(at + ".dtype", f"unknown dtype {dtype!r}")
        shape = self.ints(self.get(doc, "shape", list, at + "."), at + ".shape")
        if len(shape) > MAX_DIMS:
            raise self.fail(at + ".shape", f"{len(shape)} dimensions; at most {MAX_DIMS}")
        if math.prod(shape) * itemsize(dtype) >= MAX_COUNT:
            raise self.fail(at + ".shape", f"{list(shape)} of {dtype} is too large for a tensor")
        encoding = doc.get("encoding", "raw")
        if encoding not in ("raw", "pickle"):
            raise self.fail(at + ".encoding", f"unknown encoding {encoding!r}")
        if encoding == "pickle" and dtype != "uint8":
            raise self.fail(at + ".encoding", f"pickled bytes are uint8, not {dtype}")
        chunks = []
        for i, chunk in enumerate(self.get(doc, "chunks", list, at + ".")):
            chunks.append(self.chunk(chunk, f"{at}.chunks[{i}]", dtype, len(shape), files))
        problem = tiling_problem([c.box for c in chunks], shape)
        if problem:
            raise self.fail(at, f"chunks do not tile shape {list(shape)}: {problem}")
        return TensorMeta(dtype, shape, chunks, encoding)

    def chunk(self, doc: Any, at: str, dtype: str, ndim: int, files: dict[str, int]) -> Chunk:
        if not isinstance(doc, dict):
            raise self.fail(at, "expected an object")
        offsets = self.ints(self.get(doc, "offsets", list, at + "."), at + ".offsets")
        sizes = self.ints(self.get(doc, "sizes", list, at + "."), at + ".sizes")
        if len(offsets) != ndim or len(sizes) != ndim:
            raise self.fail(at, f"offsets/sizes must have {ndim} entries")
        file = check_relative_path(self.get(doc, "file", str, at + "."))
        if file not in files:
            raise self.fail(at + ".file", f"{file!r} is not listed in 'files'")
        nbytes = self.get(doc, "nbytes", int, at + ".")
        if nbytes != math.prod(sizes) * itemsize(dtype):
            raise self.fail(
                at + ".nbytes", f"{nbytes} does not match sizes {list(sizes)} of {dtype}"
            )
        offset = self.get(doc, "offset", int, at + ".")
        if offset < 0 or offset + nbytes > files[file]:
            raise self.fail(
                at + ".offset",
                f"bytes [{offset}, {offset + nbytes}) lie outside {file!r} ({files[file]} bytes)",
            )
        digest = self.get(doc, "xxh3", str, at + ".")
        if not _CHECKSUM.match(digest):
            raise self.fail(at + ".xxh3", f"{digest!r} is not 16 lowercase hex digits")
        return Chunk(
            offsets, sizes, file, self.get(doc, "key", str, at + "."), offset, nbytes, digest
        )


def written_by_a_save(path: str) -> bool:
    """Whether ``path`` (inside a checkpoint's directory) is where a save writes: its in-flight
    marker or the temporary of it or of the manifest, or a data file (or the temporary of one)
    in ``data/``. Nothing else there is a save's to delete, nor a sign that the directory is a
    checkpoint (an HF export's ``model.safetensors.tmp-*`` is not)."""
    top, _, rest = path.partition("/")
    if not rest:
        return path == INFLIGHT or path.startswith(
            (f"{INFLIGHT}{TEMP_INFIX}", f"{MANIFEST}{TEMP_INFIX}")
        )
    return top == DATA_DIR and _DATA_FILE.fullmatch(rest) is not None


def deleted_while_read(storage: Storage, error: BaseException) -> BaseException:
    """``error``, or, if it says a file is missing or cut short and the checkpoint's manifest
    has gone since (retention or gc of another job deleting it under the reader), a
    :class:`CheckpointNotFoundError` saying so: the checkpoint is not corrupt, it is gone."""
    if isinstance(error, CorruptCheckpointError) and not isinstance(error, UnsupportedFormatError):
        try:
            gone = not storage.exists(MANIFEST)
        except Exception:  # cannot tell: the error stands as it is
            gone = False
        if gone:
            deleted = CheckpointNotFoundError(
                f"{storage.url} was deleted while it was being read ({error})"
            )
            deleted.__cause__ = error
            return deleted
    return error


@dataclass(frozen=True)
class ManifestSummary:
    """What listing a committed checkpoint takes from its manifest."""

    step: int | None
    user_metadata: dict[str, Any]


def read_summary(storage: Storage) -> ManifestSummary:
    """The step and user metadata of the committed checkpoint rooted at ``storage``, checked
    as :func:`read_manifest` checks them, its tensors and files not looked at: a manager
    listing its run (every restart, every retention) parsed every checkpoint in full, a minute
    for 20 checkpoints of 50k tensors. Loads validate what they read. Raises as
    :func:`read_manifest` does."""
    where, doc = _committed_document(storage)
    return _Parser(where).summary(doc)


def read_manifest(storage: Storage) -> Manifest:
    """The committed manifest of the checkpoint rooted at ``storage``.

    Raises CheckpointNotFoundError (nothing there), IncompleteCheckpointError (data but no
    committed manifest), CorruptCheckpointError/UnsupportedFormatError/UnsafeCheckpointError.
    """
    where, doc = _committed_document(storage)
    manifest = _Parser(where).manifest(doc)
    for name in manifest.files:  # symlinks out of the checkpoint are refused before any read
        storage.check_inside(name)
    return manifest


def _committed_document(storage: Storage) -> tuple[str, Any]:
    """Where the manifest of the checkpoint rooted at ``storage`` is, and its JSON document;
    raises what :func:`read_manifest` documents if there is none, or it is no JSON."""
    if not storage.exists(MANIFEST):
        raise _absent(storage)
    where = storage.describe(MANIFEST)
    return where, read_json(
        storage, MANIFEST, max_bytes=MAX_MANIFEST_BYTES, what=f"manifest {where}"
    )


def _absent(storage: Storage) -> CheckpointError:
    """Why ``storage`` has no manifest: the error to raise."""
    if not storage.root_exists():
        return CheckpointNotFoundError(f"no checkpoint at {storage.url}")
    # (the first 100 directories: an error path, kept cheap on object stores)
    held = [c for c in storage.children()[:100] if storage.exists(f"{c}/{MANIFEST}")]
    if held:  # a run's root (a manager's tier), given for one of its checkpoints
        return CheckpointNotFoundError(
            f"{storage.url} is not a checkpoint but holds checkpoints: "
            f"{first_few(held)}; name one of them"
        )
    names = storage.list()
    if names and not any(written_by_a_save(name) for name in names):
        return CheckpointNotFoundError(
            f"{storage.url} is not a unickpt checkpoint: it has no {MANIFEST}, nor "
            f"anything a save writes (it holds {', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''})"
        )
    return IncompleteCheckpointError(
        f"checkpoint {storage.url} is incomplete: it has no committed {MANIFEST} "
        "(the save was interrupted or is still running); `unickpt gc` removes it"
    )


def commit_manifest(storage: Storage, manifest: Manifest) -> None:
    """Publish the manifest atomically: from this instant the checkpoint exists.

    Never over another one: of two writers racing to commit one path (two jobs, or processes
    that each took themselves for a world of one), the second gets CheckpointExistsError and
    the first's checkpoint stays whole. Publishing can fail after the manifest became visible
    (a directory fsync after the rename, a lost response to the PUT): it is then taken back,
    best effort, so that a failed commit stays invisible; but only if the manifest there is
    this one (it names this save's files), never another writer's.
    """
    data = manifest.to_json().encode()
    if len(data) > MAX_MANIFEST_BYTES:  # committed, it could never be loaded
        chunks = sum(len(t.chunks) for t in manifest.tensors.values())
        raise InvalidStateError(
            f"the manifest of {storage.url} would be {len(data)} bytes, more than the "
            f"{MAX_MANIFEST_BYTES} readers accept: {chunks} chunks; save fewer, larger shards"
        )
    try:
        storage.put_atomic(MANIFEST, data, replace=False)
    except CheckpointExistsError:
        raise
    except BaseException as exc:
        there = None
        with contextlib.suppress(Exception):
            there = storage.read(MANIFEST)
            if there == data:
                storage.delete(MANIFEST)
        if there is not None and there != data:  # another save committed meanwhile, and its
            raise CheckpointExistsError(  # cleanup took our temporary: the race, lost
                f"{storage.describe(MANIFEST)} already exists"
            ) from exc
        raise
