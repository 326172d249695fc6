"""Test plumbing for the S3 backend: a real moto S3 server over HTTP, and a TCP proxy in front of
it that can simulate the endpoint going down (and coming back) while the server keeps its data.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from dist_harness import free_port


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1 and a free port, in a subprocess."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None
        # moto logs every request: a pipe nobody reads would fill up and block it
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()

    def start(self, timeout: float = 30.0) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"moto server exited: {self._log.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1.0):
                    return
            except urllib.error.HTTPError:
                return  # it answers
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server on {self.endpoint} did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        self._log.close()


class OutageProxy:
    """Forwards 127.0.0.1:``port`` to ``target_port``. :meth:`cut` takes the endpoint down the way
    a crashed server would (live connections reset, new ones refused); :meth:`restore` brings it
    back on the same port. :meth:`cut_after` arms a cut once that many more bytes went upstream.
    :meth:`drop_request_header` makes it forward requests without one header, as some gateways do.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.tripped = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._budget: int | None = None
        self._renamed: tuple[bytes, bytes] | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        with self._lock:
            self._listener = listener
            self._budget = None
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut_after(self, nbytes: int) -> None:
        with self._lock:
            self._budget = nbytes
        self.tripped.clear()

    def drop_request_header(self, name: str) -> None:
        """Rename header ``name`` in the requests from now on (same length, so nothing else
        moves), so that the server does not see it."""
        stand_in = "X-" + "x" * (len(name) - 2)
        self._renamed = (f"\r\n{name}: ".encode(), f"\r\n{stand_in}: ".encode())

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._connections = self._connections, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in connections:  # wakes the pumps, which close them with a reset
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.shutdown(socket.SHUT_RDWR)
        self.tripped.set()

    def close(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._connections |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                if upstream and self._spend(len(data)):
                    self.cut()
                    return
                if upstream and self._renamed is not None:
                    data = data.replace(*self._renamed)
                sink.sendall(data)
        except OSError:
            pass
        finally:  # each pump closes its source; the other one's recv then ends too
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._connections.discard(source)
            source.close()

    def _spend(self, nbytes: int) -> bool:
        """Count bytes going upstream; True when the armed budget is exhausted."""
        with self._lock:
            if self._budget is None:
                return False
            self._budget -= nbytes
            return self._budget <= 0


class FaultProxy:
    """An HTTP proxy in front of the moto server that answers chosen requests wrongly, to show
    what the backend does with responses a real store or gateway sends now and then.

    :meth:`add` a fault for requests of one method whose path matches a regex: ``"short"``
    answers a ranged GET with half the bytes asked for (an honest 206), ``"silent"`` never
    answers (the connection stays open until :meth:`close`), ``"slow"`` answers after
    ``delay`` seconds, ``"503"`` answers SlowDown. It fires ``times`` times (-1: always).
    :meth:`count` says how many requests matched a method and path regex.
    """

    def __init__(self, target_port: int) -> None:
        import http.client
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self._faults: list[dict[str, object]] = []
        self._seen: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                out = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    out += self.rfile.read(size)
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b""):  # trailers
                    pass
                return out

            def _answer(
                self, status: int, headers: list[tuple[str, str]], body: bytes, size: int = -1
            ) -> None:
                self.send_response_only(status)
                length = str(len(body) if size < 0 else size)
                for key, value in [*headers, ("Content-Length", length)]:
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def _relay(self) -> None:
                body = self._body()
                fault = proxy._fault(self.command, self.path)
                if fault is not None and fault["kind"] == "silent":
                    proxy._closed.wait()
                    self.close_connection = True
                    return
                if fault is not None and fault["kind"] == "503":
                    error = b"<Error><Code>SlowDown</Code><Message>Slow down</Message></Error>"
                    self._answer(503, [("Content-Type", "application/xml")], error)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", target_port, timeout=60)
                upstream.putrequest(self.command, self.path, skip_host=True)
                for key, value in self.headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        upstream.putheader(key, value)
                upstream.putheader("Content-Length", str(len(body)))
                upstream.endheaders(body)
                response = upstream.getresponse()
                data = response.read()
                upstream.close()
                skip = ("content-length", "transfer-encoding", "connection", "date", "server")
                headers = [(k, v) for k, v in response.getheaders() if k.lower() not in skip]
                if fault is not None and fault["kind"] == "slow":
                    time.sleep(float(fault["delay"]))  # type: ignore[arg-type]
                if fault is not None and fault["kind"] == "short" and response.status == 206:
                    first, total = response.getheader("Content-Range", "").split(" ")[1].split("/")
                    start, half = int(first.split("-")[0]), len(data) // 2
                    headers = [(k, v) for k, v in headers if k.lower() != "content-range"]
                    headers.append(("Content-Range", f"bytes {start}-{start + half - 1}/{total}"))
                    data = data[:half]
                head = self.command == "HEAD"  # no body, the object's length
                self._answer(
                    response.status,
                    headers,
                    data,
                    int(response.getheader("Content-Length") or 0) if head else -1,
                )

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def add(self, kind: str, method: str, path: str, *, times: int = 1, delay: float = 0) -> None:
        with self._lock:
            self._faults.append(
                {"kind": kind, "method": method, "path": path, "times": times, "delay": delay}
            )

    def clear(self) -> None:
        """No more faults: the store behaves again."""
        with self._lock:
            self._faults.clear()

    def count(self, method: str, path: str) -> int:
        with self._lock:
            return sum(m == method and re.search(path, p) is not None for m, p in self._seen)

    def _fault(self, method: str, path: str) -> dict[str, object] | None:
        with self._lock:
            self._seen.append((method, path))
            for fault in self._faults:
                if fault["method"] == method and re.search(str(fault["path"]), path):
                    if fault["times"] == 0:
                        continue
                    fault["times"] = int(fault["times"]) - 1  # type: ignore[call-overload]
                    return fault
        return None

    def close(self) -> None:
        self._closed.set()
        self._server.shutdown()
        self._server.server_close()


BUCKET = "unickpt-test"


def s3_env(endpoint: str) -> dict[str, str]:
    """Configuration through the environment, as a training job would set it (unickpt.save and
    unickpt.load take a URL only), isolated from any real AWS configuration on the machine."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        "UNICKPT_S3_PART_SIZE": "5MiB",
        "UNICKPT_S3_MAX_ATTEMPTS": "2",
        "UNICKPT_S3_TRANSFER_RETRIES": "1",
        "UNICKPT_S3_RETRY_BACKOFF": "0.05",
        "UNICKPT_S3_CONNECT_TIMEOUT": "2",
        "UNICKPT_S3_READ_TIMEOUT": "20",
    }
