"""Fixtures for the remote tests: real servers on 127.0.0.1 only, counting what they send.

* :func:`http_server`: a threaded HTTP/1.1 server over a temporary directory that honours
  single ``Range: bytes=a-b`` requests (206 + Content-Range), answers HEAD with size and
  ETag, and counts requests and body bytes sent. ``ignore_range = True`` makes it answer
  every GET with the whole file (a server that does not do ranges). ``etags`` says where it
  sends ETags: ``"all"`` (default: HEAD, 200 and 206, and ``If-Match`` honoured: 412),
  ``"head"`` (on HEAD only, and ``If-Match`` ignored: servers like this exist) or ``"none"``
  (never, ``If-Match`` ignored).
* :func:`s3_server`: a moto S3 server (``moto.server.ThreadedMotoServer``) behind a small
  TCP proxy that counts every byte sent to the client (HTTP headers included), so a test
  can assert how much crossed the wire.
* :func:`mem_url`: a fresh ``memory://`` prefix, removed afterwards.

Test modules import the fixtures they use: ``from conftest_remote import http_server``.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from _net import LOCALHOST, TcpProxy, free_port


class Counter:
    """Thread-safe counters of requests and bytes a server sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes_sent = 0
        self.log: list[str] = []

    def add(self, requests: int = 0, nbytes: int = 0, line: str | None = None) -> None:
        with self._lock:
            self.requests += requests
            self.bytes_sent += nbytes
            if line is not None:
                self.log.append(line)

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.bytes_sent = 0
            self.log = []


# ----------------------------------------------------------------------------- HTTP


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _RangeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _RangeServer

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _path(self) -> str | None:
        rel = self.path.split("?", 1)[0].lstrip("/")
        full = os.path.realpath(os.path.join(self.server.root, rel))
        if not full.startswith(os.path.realpath(self.server.root) + os.sep):
            return None
        return full if os.path.isfile(full) else None

    def _headers_for(self, full: str) -> tuple[int, str]:
        st = os.stat(full)
        return st.st_size, f'"{st.st_mtime_ns:x}-{st.st_size:x}"'

    def _not_found(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:
        self.server.counter.add(requests=1, line=f"HEAD {self.path}")
        full = self._path()
        if full is None:
            self._not_found()
            return
        size, etag = self._headers_for(full)
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.send_header("Accept-Ranges", "bytes")
        if self.server.etags != "none":
            self.send_header("ETag", etag)
        self.end_headers()

    def do_GET(self) -> None:
        full = self._path()
        header = self.headers.get("Range")
        self.server.counter.add(requests=1, line=f"GET {self.path} {header}")
        if full is None:
            self._not_found()
            return
        size, etag = self._headers_for(full)
        pinned = self.headers.get("If-Match") if self.server.etags == "all" else None
        if pinned and pinned != "*" and etag not in (p.strip() for p in pinned.split(",")):
            self.send_response(412)  # as real servers (S3, GCS, nginx) answer a stale If-Match
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = 0, size  # end exclusive
        status = 200
        m = _RANGE.match(header or "")
        if m and not self.server.ignore_range:
            a, b = m.groups()
            if a == "":
                start, end = max(0, size - int(b or 0)), size
            else:
                start = int(a)
                end = min(size, int(b) + 1) if b else size
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        with open(full, "rb") as f:
            f.seek(start)
            body = f.read(end - start)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if self.server.etags == "all":
            self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{size}")
        self.end_headers()
        # Counted before sending, so that a client that has the bytes sees them counted.
        self.server.counter.add(nbytes=len(body))
        self.wfile.write(body)


class _RangeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: str) -> None:
        super().__init__((LOCALHOST, 0), _RangeHandler)
        self.root = root
        self.counter = Counter()
        self.ignore_range = False
        self.etags = "all"

    def url(self, rel: str = "") -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/{rel.lstrip('/')}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that stops reading on purpose (safecodec cuts off an answer longer than
        # the range it asked for) resets the connection: expected, not worth a traceback.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


@contextlib.contextmanager
def serve_http(root: str, etags: str = "all") -> Iterator[_RangeServer]:
    """A running :class:`_RangeServer` over ``root`` (``etags``: see the module docstring)."""
    server = _RangeServer(root)
    server.etags = etags
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_RangeServer]:
    """A Range-honouring HTTP server on 127.0.0.1 over a fresh directory (``.root``)."""
    pytest.importorskip("aiohttp", reason="fsspec's HTTP filesystem needs aiohttp")
    with serve_http(str(tmp_path_factory.mktemp("http-root"))) as server:
        yield server


# ----------------------------------------------------------------------------- S3


class CountingProxy(TcpProxy):
    """A TCP proxy on 127.0.0.1 that forwards to ``upstream`` and counts the bytes sent
    back to clients (``counter.bytes_sent``) and connections (``counter.requests``)."""

    def __init__(self, upstream_port: int) -> None:
        self.counter = Counter()
        super().__init__(upstream_port)

    def connected(self) -> dict[str, Any]:
        self.counter.add(requests=1)
        return {}

    def downstream(self, upstream: socket.socket, client: socket.socket,
                   state: dict[str, Any]) -> None:
        # counted before forwarding: no race with the client
        self.pump(upstream, client, lambda data: self.counter.add(nbytes=len(data)))


class S3Server:
    """What :func:`s3_server` yields."""

    def __init__(self, proxy: CountingProxy) -> None:
        self.proxy = proxy
        self.counter = proxy.counter
        self.endpoint = f"http://{LOCALHOST}:{proxy.port}"
        self.storage_options: dict[str, Any] = {
            "key": "testing",
            "secret": "testing",
            "use_listings_cache": False,
            "client_kwargs": {"endpoint_url": self.endpoint},
        }

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options)

    def new_bucket(self) -> str:
        name = f"b-{uuid.uuid4().hex[:12]}"
        self.filesystem().mkdir(name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 behind a byte-counting proxy."""
    pytest.importorskip("s3fs", reason="the S3 tests need s3fs")
    pytest.importorskip("moto.server", reason="the S3 tests need moto[server]")
    with serve_s3() as server:
        yield server


@contextlib.contextmanager
def serve_s3() -> Iterator[S3Server]:
    """A running moto S3 server on 127.0.0.1 behind a byte-counting proxy; AWS
    configuration and credentials from anywhere but our arguments are switched off
    meanwhile."""
    import moto.server as server_mod

    saved = {k: os.environ.get(k) for k in ("AWS_EC2_METADATA_DISABLED", "AWS_CONFIG_FILE",
                                             "AWS_SHARED_CREDENTIALS_FILE")}
    # Never look for credentials or configuration anywhere but the arguments we pass.
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    os.environ["AWS_CONFIG_FILE"] = os.devnull
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    port = free_port()
    moto = server_mod.ThreadedMotoServer(ip_address=LOCALHOST, port=port, verbose=False)
    moto.start()
    proxy = CountingProxy(port)
    try:
        yield S3Server(proxy)
    finally:
        proxy.close()
        moto.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------- memory


@pytest.fixture
def mem_url() -> Iterator[str]:
    """A fresh ``memory://`` prefix; everything under it is removed afterwards."""
    import fsspec

    root = f"/t-{uuid.uuid4().hex[:12]}"
    yield f"memory://{root}"
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)
