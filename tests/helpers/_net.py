"""Loopback networking for the tests: a free port, and a TCP proxy to build on.

Everything here binds and connects to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Any

#: The only address the tests listen on or connect to.
LOCALHOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def shut(s: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    """``s.shutdown(how)``, ignoring a socket that is already gone."""
    with contextlib.suppress(OSError):
        s.shutdown(how)


class TcpProxy:
    """A TCP proxy on 127.0.0.1 (``self.port``) in front of ``upstream_port``.

    One thread accepts; each connection gets two threads, :meth:`upstream` (client to
    server) and :meth:`downstream` (server to client), which plainly forward until either
    side closes. Subclasses override them, and :meth:`connected`, to count or to inject
    faults. :meth:`close` stops accepting and closes every connection.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOCALHOST, 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((LOCALHOST, self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            state = self.connected()
            threading.Thread(target=self.upstream, args=(client, upstream, state),
                             daemon=True).start()
            threading.Thread(target=self.downstream, args=(upstream, client, state),
                             daemon=True).start()

    def connected(self) -> dict[str, Any]:
        """Called once per accepted connection; returns the state its two threads share."""
        return {}

    def upstream(self, client: socket.socket, upstream: socket.socket,
                 state: dict[str, Any]) -> None:
        self.pump(client, upstream)

    def downstream(self, upstream: socket.socket, client: socket.socket,
                   state: dict[str, Any]) -> None:
        self.pump(upstream, client)

    @staticmethod
    def pump(src: socket.socket, dst: socket.socket,
             on_data: Callable[[bytes], None] | None = None) -> None:
        """Forward ``src`` to ``dst`` until ``src`` closes (``on_data`` sees each chunk
        before it is forwarded), then shut both down."""
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if on_data is not None:
                    on_data(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            shut(src)
            shut(dst)

    def wait_closed(self) -> None:
        """Block until :meth:`close` (a stalled connection stays silent until then)."""
        self._stop.wait()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        with self._lock:
            for s in self._conns:
                with contextlib.suppress(OSError):
                    s.close()
