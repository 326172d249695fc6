"""Amazon S3 (and S3-compatible stores) through boto3: ``s3://bucket/prefix``.

Configuration comes from the standard AWS chain (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, ``~/.aws``, instance roles),
overridden by an explicit ``storage_options`` dict:

* client keys: ``endpoint_url``, ``aws_access_key_id``, ``aws_secret_access_key``,
  ``aws_session_token``, ``region_name``, ``verify``, ``profile_name``, ``addressing_style``;
* unickpt knobs, each also read from ``UNICKPT_S3_<NAME>`` (e.g. ``UNICKPT_S3_PART_SIZE=8MiB``)
  because :func:`unickpt.save` and :func:`unickpt.load` take a URL only: ``part_size`` (default
  64 MiB, between 5 MiB and 5 GiB), ``upload_threads`` (2), ``max_attempts`` (botocore's
  per-request attempts, 5), ``transfer_retries`` (further tries of a data transfer, with
  exponential backoff from ``retry_backoff`` seconds, after botocore gave up: 3 and 0.5),
  ``connect_timeout`` (10 s) and ``read_timeout`` (60 s). Timeouts are botocore's to retry
  only: an endpoint that accepts connections and never answers fails a request after about
  ``max_attempts`` times ``read_timeout`` (5 minutes by default; lower them to fail sooner).

Semantics: a written file becomes visible only when its writer closes (one PutObject for a file
smaller than ``part_size``, otherwise a multipart upload completed on close); a failed or aborted
write aborts its upload. If the store is unreachable even the abort fails, leaving an incomplete
upload that no reader can see but the store keeps (and bills): ``delete_prefix`` (gc, the
manager's sweeps) aborts those under its prefix, and a bucket lifecycle rule
(AbortIncompleteMultipartUpload) reaps the rest. ``put_atomic`` is one PutObject, which S3
publishes whole, and S3 reads after writes are strongly consistent, so the manifest stays the
commit point. There are no directories: children are common prefixes, and an empty prefix does
not exist.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from queue import SimpleQueue
from typing import Any, TypeVar

from unickpt.errors import (
    CheckpointError,
    CheckpointExistsError,
    CorruptCheckpointError,
    StorageError,
)
from unickpt.storage.base import Reader, Storage, Writer, check_relative_path, require_range

log = logging.getLogger("unickpt")

T = TypeVar("T")

MiB = 1 << 20
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PART_SIZE = 5 * 1024 * MiB
MAX_PARTS = 10_000
DELETE_BATCH = 1000  # keys per DeleteObjects request (S3's maximum)
LIST_PAGE = 1000  # keys per ListObjectsV2 page (S3's maximum)
ENV_PREFIX = "UNICKPT_S3_"

_CLIENT_KEYS = frozenset(
    {
        "endpoint_url",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "region_name",
        "verify",
    }
)
_SESSION_KEYS = frozenset({"profile_name"})
_CONFIG_KEYS = frozenset({"addressing_style"})
_TRANSIENT_CODES = frozenset(
    {
        "RequestTimeout",
        "RequestTimeoutException",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "InternalError",
        "ServiceUnavailable",
    }
)
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
# What S3-compatible stores that lack an optional call answer (ListMultipartUploads).
_UNSUPPORTED_CODES = frozenset({"NotImplemented", "501", "MethodNotAllowed", "405"})
_DENIED_CODES = frozenset(
    {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}
)


@dataclass(frozen=True)
class S3Options:
    """unickpt's own knobs for the S3 backend (see the module docstring)."""

    part_size: int = 64 * MiB
    upload_threads: int = 2
    max_attempts: int = 5
    transfer_retries: int = 3
    retry_backoff: float = 0.5
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    def __post_init__(self) -> None:
        problems = []
        if not MIN_PART_SIZE <= self.part_size <= MAX_PART_SIZE:
            problems.append(f"part_size must be between 5 MiB and 5 GiB, not {self.part_size}")
        if self.upload_threads < 1 or self.max_attempts < 1:
            problems.append("upload_threads and max_attempts must be at least 1")
        if self.transfer_retries < 0 or self.retry_backoff < 0:
            problems.append("transfer_retries and retry_backoff must not be negative")
        if self.connect_timeout <= 0 or self.read_timeout <= 0:
            problems.append("connect_timeout and read_timeout must be positive")
        if problems:
            raise StorageError("invalid S3 storage options: " + "; ".join(problems))


_SIZE = re.compile(r"\s*(\d+)\s*(?:([kmg])i?b?)?\s*", re.IGNORECASE)  # binary units: 8MiB, 8M
_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _parse_knob(name: str, kind: type, value: object) -> Any:
    if not isinstance(value, str):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise StorageError(f"S3 storage option {name}={value!r} is not a number")
        return kind(value)
    if name == "part_size" and (match := _SIZE.fullmatch(value)):
        return int(match[1]) * (_UNITS[match[2].lower()] if match[2] else 1)
    try:
        return kind(value)
    except ValueError:
        raise StorageError(
            f"S3 storage option {name}={value!r} is not a valid {kind.__name__}"
        ) from None


def _split_options(
    storage_options: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], S3Options]:
    """(client kwargs, session kwargs, botocore s3 config, knobs) from options and the env."""
    given = dict(storage_options or {})
    knob_types = {f.name: (int if f.type in ("int", int) else float) for f in fields(S3Options)}
    unknown = sorted(set(given) - _CLIENT_KEYS - _SESSION_KEYS - _CONFIG_KEYS - set(knob_types))
    if unknown:
        accepted = sorted(_CLIENT_KEYS | _SESSION_KEYS | _CONFIG_KEYS | set(knob_types))
        raise StorageError(f"unknown S3 storage option(s) {unknown}; accepted: {accepted}")
    knobs: dict[str, Any] = {}
    for name, kind in knob_types.items():
        value = given.get(name, os.environ.get(ENV_PREFIX + name.upper()))
        if value is not None:
            knobs[name] = _parse_knob(name, kind, value)
    client = {k: v for k, v in given.items() if k in _CLIENT_KEYS and v is not None}
    session = {k: v for k, v in given.items() if k in _SESSION_KEYS and v is not None}
    config = {k: v for k, v in given.items() if k in _CONFIG_KEYS and v is not None}
    return client, session, config, S3Options(**knobs)


def _error_code(exc: BaseException) -> tuple[str, int]:
    """The S3 error code and HTTP status of a botocore ClientError (("", 0) for others)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return "", 0
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


# A ranged GET answered with fewer bytes than this (and than asked for) is a failed one; more,
# and the rest is asked for at once (gateways that cap response sizes cap at megabytes).
MIN_SHORT_ANSWER = 1 << 20


class _ShortResponse(Exception):
    """A ranged GET of an object of known size and ETag answered far fewer bytes than asked
    for, was cut or stalled: the connection or a gateway did it, not the object (a shorter one
    fails its ETag). botocore does not retry a response body; :meth:`_Shared.transfer` does."""


def _is_transient(exc: BaseException) -> bool:
    """Whether trying ``exc``'s request again later may succeed where botocore's own retries
    did not. Not a timeout: botocore waited ``read_timeout`` (or ``connect_timeout``) on each
    of its attempts already, and more tries would multiply that wait, to many minutes per
    request on an endpoint that accepts connections and never answers."""
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError,
    )
    from botocore.exceptions import (
        ConnectTimeoutError,
        HTTPClientError,
        IncompleteReadError,
        ReadTimeoutError,
    )

    if isinstance(exc, ConnectTimeoutError | ReadTimeoutError):
        return False
    if isinstance(
        exc, BotoConnectionError | HTTPClientError | IncompleteReadError | _ShortResponse
    ):
        return True
    code, status = _error_code(exc)
    return status >= 500 or code in _TRANSIENT_CODES


class _ViewStream:
    """A seekable file-like view over a memoryview, so that uploads do not copy the buffer whole
    (botocore reads it in small blocks to hash and send, and seeks back to retry)."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def __len__(self) -> int:
        return self._view.nbytes

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._view.nbytes}[whence]
        self._pos = min(max(base + offset, 0), self._view.nbytes)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = self._view.nbytes if size is None or size < 0 else self._pos + size
        chunk = bytes(self._view[self._pos : end])
        self._pos += len(chunk)
        return chunk


class _Shared:
    """What a storage and its children share: the bucket, the options and one boto3 client
    (created on first use; boto3 clients are thread-safe)."""

    def __init__(self, bucket: str, storage_options: Mapping[str, Any] | None) -> None:
        try:
            import boto3  # noqa: F401 - fail now, not at the first request
        except ImportError as exc:
            raise StorageError("s3:// storage needs boto3: pip install 'unickpt[s3]'") from exc
        self.bucket = bucket
        self._client_kwargs, self._session_kwargs, s3_config, self.options = _split_options(
            storage_options
        )
        self._s3_config = s3_config
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        if self._client is not None:
            return str(self._client.meta.endpoint_url)
        return str(
            self._client_kwargs.get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or "the default AWS S3 endpoint"
        )

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._create_client()
            return self._client

    def _create_client(self) -> Any:
        import boto3
        from botocore.config import Config

        opts = self.options
        config = Config(
            retries={"mode": "standard", "total_max_attempts": opts.max_attempts},
            connect_timeout=opts.connect_timeout,
            read_timeout=opts.read_timeout,
            max_pool_connections=max(10, opts.upload_threads + 8),
            s3=self._s3_config or None,
        )
        try:
            session = boto3.session.Session(**self._session_kwargs)
            return session.client("s3", config=config, **self._client_kwargs)
        except Exception as exc:
            raise StorageError(
                f"cannot create an S3 client for bucket {self.bucket!r} at {self.endpoint}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    @property
    def use_crc32(self) -> bool:
        """Whether botocore checksums uploads, so multipart parts must carry CRC32s too."""
        config = self.client.meta.config
        return getattr(config, "request_checksum_calculation", None) == "when_supported"

    def error(self, action: str, where: str, exc: BaseException) -> CheckpointError:
        """A StorageError naming what failed, where, and what the store said."""
        if isinstance(exc, CheckpointError):
            return exc
        from botocore.exceptions import (
            ConnectionError as BotoConnectionError,
        )
        from botocore.exceptions import (
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        prefix = f"cannot {action} {where}"
        code, status = _error_code(exc)
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            detail = (
                f"no usable AWS credentials for {self.endpoint} ({exc}); set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or pass storage_options"
            )
        elif isinstance(exc, BotoConnectionError | HTTPClientError):
            detail = (
                f"S3 endpoint {self.endpoint} is unreachable or not responding "
                f"(bucket {self.bucket!r}): {exc}"
            )
        elif isinstance(exc, _ShortResponse):
            detail = f"{exc}, on every try"
        elif code == "NoSuchBucket":
            detail = f"bucket {self.bucket!r} does not exist at {self.endpoint}"
        elif code in _DENIED_CODES:
            detail = (
                f"access denied by {self.endpoint} to bucket {self.bucket!r} ({code}); "
                "check the credentials and the bucket policy"
            )
        elif code:
            message = getattr(exc, "response", {}).get("Error", {}).get("Message", "")
            detail = f"{code} (HTTP {status}) from {self.endpoint}: {message or exc}"
        else:
            detail = f"{type(exc).__name__}: {exc}"
        return StorageError(f"{prefix}: {detail}")

    def call(self, action: str, where: str, fn: Callable[[], T]) -> T:
        """``fn()``, its failure translated (botocore already retried transient errors)."""
        try:
            return fn()
        except Exception as exc:
            raise self.error(action, where, exc) from exc

    def transfer(
        self,
        action: str,
        where: str,
        fn: Callable[[], T],
        cancelled: threading.Event | None = None,
    ) -> T:
        """``fn()`` (a data transfer), tried again with exponential backoff while it fails
        transiently: a whole file is lost if one part of it fails, so a store that stays down
        for longer than botocore's quick retries is given a few more seconds."""
        opts = self.options
        attempt = 0
        while True:
            try:
                return fn()
            except CheckpointError:
                raise
            except Exception as exc:
                if attempt >= opts.transfer_retries or not _is_transient(exc):
                    raise self.error(action, where, exc) from exc
                delay = min(opts.retry_backoff * 2**attempt, 20.0) * random.uniform(0.5, 1.0)
                log.warning(
                    "unickpt: %s %s failed (%s: %s); retry %d/%d in %.2fs",
                    action,
                    where,
                    type(exc).__name__,
                    exc,
                    attempt + 1,
                    opts.transfer_retries,
                    delay,
                )
                if cancelled is None:
                    time.sleep(delay)
                elif cancelled.wait(delay):  # the writer was aborted: stop trying
                    raise self.error(action, where, exc) from exc
                attempt += 1


class _S3Writer(Writer):
    """Buffers ``part_size`` bytes, then streams parts of a multipart upload from a few threads;
    a write of whole parts into an empty buffer is uploaded straight from the caller's memory
    (and waited for before ``write`` returns, so the caller may reuse it at once)."""

    def __init__(self, shared: _Shared, key: str, where: str) -> None:
        self._shared = shared
        self._key = key
        self._where = where
        self._part_size = shared.options.part_size
        self._max_buffers = shared.options.upload_threads + 1
        self._buffer: bytearray | None = None
        self._fill = 0
        self._size = 0
        self._buffers = 0
        self._free: SimpleQueue[bytearray] = SimpleQueue()
        self._upload_id: str | None = None
        self._crc32 = False
        self._parts: list[Future[dict[str, Any]]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._failure: BaseException | None = None
        self._cancelled = threading.Event()
        self._may_have_twins = False
        self._done = False

    def write(self, data: memoryview | bytes) -> None:
        if self._done:
            raise StorageError(f"write to {self._where} after it was closed or aborted")
        view = memoryview(data).cast("B")
        self._size += view.nbytes
        direct: list[Future[dict[str, Any]]] = []
        try:
            while view:
                if self._fill == 0 and view.nbytes >= self._part_size:
                    direct.append(self._submit(view[: self._part_size], None))
                    view = view[self._part_size :]
                    continue
                if self._buffer is None:
                    self._buffer = self._take_buffer()
                n = min(self._part_size - self._fill, view.nbytes)
                self._buffer[self._fill : self._fill + n] = view[:n]
                self._fill += n
                view = view[n:]
                if self._fill == self._part_size:
                    self._submit(memoryview(self._buffer), self._buffer)
                    self._buffer, self._fill = None, 0
            for future in direct:  # they read the caller's memory: done before we return
                future.result()
            if self._failure is not None:
                raise self._failure
        except BaseException:
            self.abort()
            raise

    def _take_buffer(self) -> bytearray:
        """A part buffer; blocks while ``upload_threads + 1`` of them are in flight."""
        if self._failure is not None:
            raise self._failure
        if self._free.empty() and self._buffers < self._max_buffers:
            self._buffers += 1
            return bytearray(self._part_size)
        return self._free.get()  # every part hands its buffer back, failed or not

    def _submit(self, view: memoryview, owned: bytearray | None) -> Future[dict[str, Any]]:
        if self._failure is not None:
            raise self._failure
        shared = self._shared
        if self._upload_id is None:
            self._crc32 = shared.use_crc32
            extra = {"ChecksumAlgorithm": "CRC32"} if self._crc32 else {}
            tries = 0

            def create() -> dict[str, Any]:
                nonlocal tries
                tries += 1
                response: dict[str, Any] = shared.client.create_multipart_upload(
                    Bucket=shared.bucket, Key=self._key, **extra
                )
                return response

            response = shared.transfer("start uploading", self._where, create)
            self._upload_id = str(response["UploadId"])
            # A create retried after its answer was lost may have started an upload of its own
            # (S3 cannot tell a retry from a new request): found and aborted when this one ends.
            retried = response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
            self._may_have_twins = tries > 1 or bool(retried)
            self._pool = ThreadPoolExecutor(
                shared.options.upload_threads, thread_name_prefix="unickpt-s3-upload"
            )
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise StorageError(
                f"cannot write {self._where}: more than {MAX_PARTS} parts of {self._part_size} "
                "bytes; raise the part_size storage option (UNICKPT_S3_PART_SIZE)"
            )
        assert self._pool is not None
        future = self._pool.submit(self._upload_part, number, view, owned)
        future.add_done_callback(self._note_failure)
        self._parts.append(future)
        return future

    def _note_failure(self, future: Future[dict[str, Any]]) -> None:
        if not future.cancelled() and future.exception() is not None and self._failure is None:
            self._failure = future.exception()

    def _upload_part(
        self, number: int, view: memoryview, owned: bytearray | None
    ) -> dict[str, Any]:
        shared = self._shared
        extra = {"ChecksumAlgorithm": "CRC32"} if self._crc32 else {}
        try:
            response = shared.transfer(
                f"upload part {number} ({view.nbytes} bytes) of",
                self._where,
                lambda: shared.client.upload_part(
                    Bucket=shared.bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    PartNumber=number,
                    Body=_ViewStream(view),
                    **extra,
                ),
                self._cancelled,
            )
        finally:
            if owned is not None:
                self._free.put(owned)
        part = {"PartNumber": number, "ETag": response["ETag"]}
        if self._crc32 and "ChecksumCRC32" in response:
            part["ChecksumCRC32"] = response["ChecksumCRC32"]
        return part

    def close(self) -> None:
        if self._done:
            return
        shared = self._shared
        try:
            if self._upload_id is None:  # small: one request publishes it whole
                body = memoryview(self._buffer)[: self._fill] if self._buffer else memoryview(b"")
                shared.transfer(
                    "upload",
                    self._where,
                    lambda: shared.client.put_object(
                        Bucket=shared.bucket, Key=self._key, Body=_ViewStream(body)
                    ),
                )
            else:
                if self._fill:
                    assert self._buffer is not None
                    self._submit(memoryview(self._buffer)[: self._fill], self._buffer)
                    self._buffer, self._fill = None, 0
                parts = [future.result() for future in self._parts]
                self._complete(parts)
        except BaseException:
            self.abort()
            raise
        self._abort_twins()
        self._finish()

    def _complete(self, parts: list[dict[str, Any]]) -> None:
        shared = self._shared
        tries = 0

        def complete() -> None:
            nonlocal tries
            tries += 1
            try:
                shared.client.complete_multipart_upload(
                    Bucket=shared.bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": parts},
                )
            except Exception as exc:
                # A retried completion whose first try succeeded unseen finds no upload left.
                if tries == 1 or _error_code(exc)[0] != "NoSuchUpload" or not self._landed(parts):
                    raise

        shared.transfer("complete the upload of", self._where, complete)

    def _landed(self, parts: list[dict[str, Any]]) -> bool:
        """Whether the object now at our key is the one our upload would have produced."""
        shared = self._shared
        with contextlib.suppress(Exception):
            head = shared.client.head_object(Bucket=shared.bucket, Key=self._key)
            return bool(
                int(head["ContentLength"]) == self._size
                and str(head.get("ETag", "")).strip('"').endswith(f"-{len(parts)}")
            )
        return False

    def abort(self) -> None:
        if self._done:
            return
        self._cancelled.set()
        with contextlib.suppress(Exception):
            for future in self._parts:
                future.cancel()
            if self._pool is not None:
                self._pool.shutdown(wait=True)  # no part may land after the abort
            if self._upload_id is not None:
                shared = self._shared
                shared.client.abort_multipart_upload(
                    Bucket=shared.bucket, Key=self._key, UploadId=self._upload_id
                )
        self._abort_twins()
        self._finish()

    def _abort_twins(self) -> None:
        """Abort the other uploads of our key that a retried create may have started."""
        if not self._may_have_twins:
            return
        with contextlib.suppress(Exception):  # empty uploads: a lifecycle rule takes what stays
            _abort_uploads_of(self._shared, self._key, self._where, but=self._upload_id)

    def _finish(self) -> None:
        self._done = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._buffer = None
        self._free = SimpleQueue()


class _S3Reader(Reader):
    """Ranged GETs of one object whose size (and ETag) one HEAD fetched; every GET requires the
    same ETag, so an object replaced in the middle of a load is reported, not mixed in."""

    def __init__(self, shared: _Shared, key: str, where: str) -> None:
        self._shared = shared
        self._key = key
        self._where = where
        head = _head(shared, key, where)
        if head is None:
            raise CorruptCheckpointError(f"file {where} is missing")
        self._size = int(head["ContentLength"])
        self._etag = str(head.get("ETag") or "")

    def size(self) -> int:
        return self._size

    def read_into(self, offset: int, out: memoryview) -> None:
        view = out.cast("B")
        want = view.nbytes
        require_range(self._where, offset, want, self._size)
        if want == 0:
            return
        done = 0

        from botocore.exceptions import ReadTimeoutError

        def attempt() -> None:  # a retry resumes after the bytes already received
            while done < want:
                asked = want - done
                received = get_rest()
                if received < min(asked, MIN_SHORT_ANSWER):  # no gateway caps this low
                    raise _ShortResponse(
                        f"the endpoint answered {received} of the {asked} bytes asked for "
                        f"from byte {offset + done - received}"
                    )

        def get_rest() -> int:
            """One GET of the bytes still missing; how many it delivered. A response may
            announce fewer (a gateway capping response sizes): the next GET asks for the rest.
            One that ends before what it announced was cut."""
            nonlocal done
            shared = self._shared
            extra = {"IfMatch": self._etag} if self._etag else {}
            try:
                response = shared.client.get_object(
                    Bucket=shared.bucket,
                    Key=self._key,
                    Range=f"bytes={offset + done}-{offset + want - 1}",
                    **extra,
                )
            except Exception as exc:
                translated = self._translate(exc, offset + done)
                if translated is None:
                    raise
                raise translated from exc
            body, start = response["Body"], done
            try:
                # Gateways and caches may ignore Range and send the whole object (200, no
                # Content-Range): read from its start, that fills in the wrong bytes unless
                # they were the ones asked for.
                served = response.get("ContentRange", "")
                whole = not served and offset + done == 0
                if not whole and not served.startswith(f"bytes {offset + done}-"):
                    raise StorageError(
                        f"reading {self._where}: asked for bytes from {offset + done}, the "
                        f"endpoint answered {served or 'without a Content-Range'} (does a proxy "
                        "or gateway in between ignore ranged GETs?)"
                    )
                end = done + min(int(response.get("ContentLength", want - done)), want - done)
                while done < end:
                    try:
                        got = body.readinto(view[done:end])
                    except ReadTimeoutError as exc:
                        raise _ShortResponse(
                            f"the response stalled at byte {offset + done}: {exc}"
                        ) from exc
                    if not got:
                        raise _ShortResponse(
                            f"the response ended at byte {offset + done}, before the "
                            f"{end - start} bytes it announced"
                        )
                    done += got
            finally:
                body.close()
            return done - start

        self._shared.transfer("read", self._where, attempt)

    def _translate(self, exc: Exception, at: int) -> CorruptCheckpointError | None:
        code, _ = _error_code(exc)
        if code in _MISSING_CODES:
            return CorruptCheckpointError(f"file {self._where} is missing")
        if code == "PreconditionFailed":
            return CorruptCheckpointError(
                f"file {self._where} was replaced while being read (its ETag changed)"
            )
        if code == "InvalidRange":
            return CorruptCheckpointError(f"file {self._where} is truncated: it ends before {at}")
        return None

    def close(self) -> None:
        pass


def _head(shared: _Shared, key: str, where: str) -> dict[str, Any] | None:
    """The object's metadata, or None if there is no such object."""
    try:
        response: dict[str, Any] = shared.client.head_object(Bucket=shared.bucket, Key=key)
    except Exception as exc:
        if _error_code(exc)[0] in _MISSING_CODES:
            return None
        raise shared.error("look up", where, exc) from exc
    return response


def _uploads(shared: _Shared, key_prefix: str, where: str) -> Iterator[dict[str, Any]]:
    """The incomplete multipart uploads under ``key_prefix`` (invisible to listings, stored and
    billed until aborted); none, logged, where the store does not let us list them."""
    markers: dict[str, str] = {}
    while True:
        try:
            page = shared.client.list_multipart_uploads(
                Bucket=shared.bucket, Prefix=key_prefix, **markers
            )
        except Exception as exc:
            if _error_code(exc)[0] not in _UNSUPPORTED_CODES | _DENIED_CODES:
                raise shared.error("list the incomplete uploads under", where, exc) from exc
            # Not allowed or not implemented here: a bucket lifecycle rule must reap them.
            log.warning("unickpt: cannot list incomplete uploads under %s: %s", where, exc)
            return
        yield from page.get("Uploads", [])
        if not page.get("IsTruncated"):
            return
        markers = {
            "KeyMarker": page.get("NextKeyMarker", ""),
            "UploadIdMarker": page.get("NextUploadIdMarker", ""),
        }


def _abort_upload(shared: _Shared, key: str, upload_id: str, where: str) -> None:
    try:
        shared.client.abort_multipart_upload(Bucket=shared.bucket, Key=key, UploadId=upload_id)
    except Exception as exc:
        code = _error_code(exc)[0]
        if code == "NoSuchUpload":  # completed or aborted since
            return
        if code not in _UNSUPPORTED_CODES | _DENIED_CODES:
            raise shared.error("abort the incomplete upload of", where, exc) from exc
        log.warning("unickpt: cannot abort the incomplete upload of %s: %s", where, exc)


def _abort_uploads_of(shared: _Shared, key: str, where: str, *, but: str | None = None) -> None:
    """Abort the incomplete uploads of exactly ``key`` (not of keys it is a prefix of), all
    but upload ``but``."""
    for upload in _uploads(shared, key, where):
        if upload["Key"] == key and upload["UploadId"] != but:
            _abort_upload(shared, key, upload["UploadId"], where)


def _parse_url(url: str) -> tuple[str, str]:
    rest = url[len("s3://") :] if url.startswith("s3://") else url
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise StorageError(f"S3 URL {url!r} names no bucket: use s3://BUCKET/PREFIX")
    if prefix:
        check_relative_path(prefix)
    return bucket, prefix


class S3Storage(Storage):
    """Objects under ``s3://bucket/prefix``. Paths are keys relative to the prefix."""

    def __init__(
        self, url_or_bucket_prefix: str, storage_options: Mapping[str, Any] | None = None
    ) -> None:
        bucket, prefix = _parse_url(url_or_bucket_prefix)
        self._init(_Shared(bucket, storage_options), prefix)

    def _init(self, shared: _Shared, prefix: str) -> None:
        self._shared = shared
        self.bucket = shared.bucket
        self.prefix = prefix
        self.url = f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    @property
    def options(self) -> S3Options:
        return self._shared.options

    @property
    def client(self) -> Any:
        """The boto3 S3 client (created on first use)."""
        return self._shared.client

    def __repr__(self) -> str:
        return f"S3Storage({self.url!r}, endpoint={self._shared.endpoint!r})"

    def _key(self, path: str) -> str:
        check_relative_path(path)
        return f"{self.prefix}/{path}" if self.prefix else path

    def _dir(self, prefix: str) -> str:
        """The key prefix of everything under the directory path ``prefix`` ('' for the root)."""
        if prefix:
            return self._key(prefix) + "/"
        return self.prefix + "/" if self.prefix else ""

    def open_writer(self, path: str) -> Writer:
        return _S3Writer(self._shared, self._key(path), self.describe(path))

    def open_reader(self, path: str) -> Reader:
        return _S3Reader(self._shared, self._key(path), self.describe(path))

    def put_atomic(self, path: str, data: bytes, *, replace: bool = True) -> None:
        shared, key, where = self._shared, self._key(path), self.describe(path)
        body = data if isinstance(data, bytes | bytearray) else bytes(data)

        def put() -> None:
            if replace:
                shared.client.put_object(Bucket=shared.bucket, Key=key, Body=body)
                return
            try:  # a conditional write: the store refuses it if the key exists
                shared.client.put_object(Bucket=shared.bucket, Key=key, Body=body, IfNoneMatch="*")
            except Exception as exc:
                code, status = _error_code(exc)
                if code in _UNSUPPORTED_CODES or status in (501, 405):  # check first (racy)
                    if _head(shared, key, where) is not None:
                        raise CheckpointExistsError(f"{where} already exists") from exc
                    shared.client.put_object(Bucket=shared.bucket, Key=key, Body=body)
                elif status == 409:  # another conditional write of the key is in progress
                    raise CheckpointExistsError(f"{where} is being written by another") from exc
                elif status == 412 and not self._holds(key, body):  # a retry finds its own put
                    raise CheckpointExistsError(f"{where} already exists") from exc
                elif status != 412:
                    raise

        shared.transfer("upload", where, put)

    def _holds(self, key: str, body: bytes | bytearray) -> bool:
        """Whether the object at ``key`` is ``body``: a put whose response was lost, retried."""
        shared = self._shared
        with contextlib.suppress(Exception):
            response = shared.client.get_object(Bucket=shared.bucket, Key=key)
            with contextlib.closing(response["Body"]) as stored:
                return bool(stored.read() == body)
        return False

    def read(self, path: str) -> bytes:
        shared, key, where = self._shared, self._key(path), self.describe(path)

        def get() -> bytes:
            try:
                response = shared.client.get_object(Bucket=shared.bucket, Key=key)
            except Exception as exc:
                if _error_code(exc)[0] in _MISSING_CODES:
                    raise CorruptCheckpointError(f"file {where} is missing") from exc
                raise
            with contextlib.closing(response["Body"]) as body:
                return bytes(body.read())

        return shared.transfer("read", where, get)

    def exists(self, path: str) -> bool:
        return _head(self._shared, self._key(path), self.describe(path)) is not None

    def modified(self, path: str) -> float | None:
        head = _head(self._shared, self._key(path), self.describe(path))
        return None if head is None else float(head["LastModified"].timestamp())

    def _pages(self, key_prefix: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        shared = self._shared
        where = f"s3://{shared.bucket}/{key_prefix}"
        paginator = shared.call(
            "list", where, lambda: shared.client.get_paginator("list_objects_v2")
        )
        pages = iter(
            paginator.paginate(
                Bucket=shared.bucket,
                Prefix=key_prefix,
                PaginationConfig={"PageSize": LIST_PAGE},
                **kwargs,
            )
        )
        while True:
            page = shared.call("list", where, lambda: next(pages, None))
            if page is None:
                return
            yield page

    def _keys(self, key_prefix: str) -> builtins.list[str]:
        return [obj["Key"] for page in self._pages(key_prefix) for obj in page.get("Contents", [])]

    def list(self, prefix: str = "") -> builtins.list[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(k[strip:] for k in self._keys(self._dir(prefix)) if not k.endswith("/"))

    def delete(self, path: str) -> None:
        shared, key = self._shared, self._key(path)
        shared.call(
            "delete",
            self.describe(path),
            lambda: shared.client.delete_object(Bucket=shared.bucket, Key=key),
        )

    def _abort_uploads(self, key_prefix: str, where: str) -> None:
        """Abort the incomplete multipart uploads under ``key_prefix``: a writer killed mid-file
        leaves one, invisible to listings but stored (and billed) until it is aborted."""
        for upload in _uploads(self._shared, key_prefix, where):
            _abort_upload(self._shared, upload["Key"], upload["UploadId"], where)

    def abandoned_uploads(self, older_than: float) -> builtins.list[str]:
        base, cutoff = self._dir(""), time.time() - older_than
        return sorted(
            {
                upload["Key"][len(base) :]
                for upload in _uploads(self._shared, base, self.url)
                if upload["Initiated"].timestamp() < cutoff
            }
        )

    def abort_uploads(self, path: str) -> None:
        _abort_uploads_of(self._shared, self._key(path), self.describe(path))

    def delete_prefix(self, prefix: str) -> None:
        shared = self._shared
        self._abort_uploads(self._key(prefix) + "/", self.describe(prefix))
        keys = self._keys(self._key(prefix) + "/")  # never '': that would be the whole root
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": key} for key in keys[start : start + DELETE_BATCH]]
            request = functools.partial(
                shared.client.delete_objects,
                Bucket=shared.bucket,
                Delete={"Objects": batch, "Quiet": True},
            )
            response = shared.call("delete", self.describe(prefix), request)
            if errors := response.get("Errors"):
                first = errors[0]
                raise StorageError(
                    f"cannot delete {len(errors)} object(s) under {self.describe(prefix)}, "
                    f"e.g. s3://{shared.bucket}/{first.get('Key')}: "
                    f"{first.get('Code')}: {first.get('Message')}"
                )

    def children(self) -> builtins.list[str]:
        base = self._dir("")
        names = {
            common["Prefix"][len(base) :].rstrip("/")
            for page in self._pages(base, Delimiter="/")
            for common in page.get("CommonPrefixes", [])
        }
        return sorted(name for name in names if name)

    def _any_under(self, key_prefix: str) -> bool:
        shared = self._shared
        response = shared.call(
            "list",
            f"s3://{shared.bucket}/{key_prefix}",
            lambda: shared.client.list_objects_v2(
                Bucket=shared.bucket, Prefix=key_prefix, MaxKeys=1
            ),
        )
        return bool(response.get("KeyCount", 0) or response.get("Contents"))

    def root_exists(self) -> bool:
        return self._any_under(self._dir(""))

    def remove_if_empty(self, prefix: str) -> bool:
        # An S3 prefix with nothing under it does not exist: there is nothing to remove.
        return not self._any_under(self._key(prefix) + "/")

    def child(self, prefix: str) -> S3Storage:
        storage = S3Storage.__new__(S3Storage)
        storage._init(self._shared, self._key(prefix))
        return storage
