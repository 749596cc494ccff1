"""The start of every JAX worker script that the tests run in subprocesses.

A worker's first lines put this directory on ``sys.path`` and call :func:`start_worker`
before anything imports jax (its device count is fixed when its backend starts).
"""

from __future__ import annotations

import faulthandler
import os
import sys
from typing import NoReturn

from _cpu_devices import force_cpu_devices

#: The repository root: workers import the safecodec of this checkout.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start_worker(devices: int, hang_s: float | None = None) -> None:
    """Give this process ``devices`` virtual CPU devices and make safecodec importable.

    Args:
        devices: The CPU device count JAX will see.
        hang_s: When given (a worker run as a script), a worker still running after this
            many seconds prints every thread's stack and exits, so that a hang in CI says
            where it hung (the test's own deadline is longer). None when a test imports
            the worker's module for its data.
    """
    if hang_s is not None:
        faulthandler.dump_traceback_later(hang_s, exit=True)
    force_cpu_devices(devices)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


def finish_distributed(timeout_s: float = 120.0) -> NoReturn:
    """End a ``jax.distributed`` worker whose results are written and flushed: wait until
    every process is here (a barrier of JAX's coordination service), then leave with
    status 0 without ``jax.distributed.shutdown()``.

    Why not the shutdown (which JAX would also run at exit): with jax 0.12.1 it can abort
    the coordinator process. The gRPC server's destructor fails a check (``queue.Pop() ==
    nullptr``, SIGABRT) when a peer's last request is still queued as the service goes
    down; CI saw it on every two-process test of one run under load, after every result had
    been checked. After this barrier no process needs another, so leaving without the
    shutdown loses nothing, and a worker's exit status says whether its own checks passed.
    """
    from jax._src import distributed  # the coordination client: JAX has no public handle

    client = distributed.global_state.client
    if client is not None:
        client.wait_at_barrier("safecodec-tests-finish", int(timeout_s * 1000))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
