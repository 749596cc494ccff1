"""The start of every JAX worker script that the tests run in subprocesses.

A worker's first lines put this directory on ``sys.path`` and call :func:`start_worker`
before anything imports jax (its device count is fixed when its backend starts).
"""

from __future__ import annotations

import faulthandler
import os
import sys

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
