"""One of two JAX processes (``jax.distributed.initialize`` on 127.0.0.1, short heartbeat
timeout, 2 CPU devices each) in a collective ``save_file`` during which one process kills
itself (SIGKILL) in the middle of writing its shards; run by ``test_multihost_faults.py``.

Usage: ``python tests/helpers/multihost_fault_worker.py PROCESS_ID PORT DIR VICTIM MODE
[HEARTBEAT_S SAVE_TIMEOUT_S]``. ``VICTIM`` is the process that dies (1: a peer, 0: the
coordinator); ``MODE`` is ``recoverable`` (JAX's ``jax_enable_recoverability``: the
survivors keep running) or ``default``; the last two override :data:`HEARTBEAT_S` and
:data:`SAVE_TIMEOUT_S`. The survivor writes
``DIR/result-<id>.json``: what its ``save_file`` raised, after how long, and the
temporaries it saw afterwards.
"""

from __future__ import annotations

# ruff: noqa: E402  (the device count must be set before anything imports jax)
import os
import sys

#: seconds after which a worker still running dumps its stacks and exits (see _worker); it
#: counts from the start, and eight workers importing jax at once on a loaded 2-core
#: machine take a while
HANG_S = 80
#: seconds without a heartbeat after which JAX's coordination service declares a process
#: dead (the default, 100 s, is too long for a test)
HEARTBEAT_S = 5
#: the save's own barrier timeout (with ``jax_enable_recoverability`` JAX does not fail a
#: barrier when a process dies: the barrier times out)
SAVE_TIMEOUT_S = 8

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _worker import start_worker

start_worker(2, HANG_S if __name__ == "__main__" else None)

import json
import signal
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import safecodec as sc
import safecodec.jax as scj
from safecodec import _jax_save

TARGET = "m.safetensors"


def _die_mid_write(pid: int) -> None:
    """Make this process SIGKILL itself right after its first write into the file."""
    original = _jax_save._write_all

    def dying(sink: Any, *args: Any, **kwargs: Any) -> Any:
        write_at = sink.write_at

        def once_then_die(offset: int, data: Any) -> None:
            write_at(offset, data)
            print(f"process {pid}: wrote {len(memoryview(data).cast('B'))} bytes at {offset}, "
                  "SIGKILL", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        sink.write_at = once_then_die
        return original(sink, *args, **kwargs)

    _jax_save._write_all = dying


def main() -> None:
    pid, port, directory, victim = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    recoverable = sys.argv[5] == "recoverable"
    heartbeat_s = int(sys.argv[6]) if len(sys.argv) > 6 else HEARTBEAT_S
    save_timeout_s = float(sys.argv[7]) if len(sys.argv) > 7 else SAVE_TIMEOUT_S
    # Without it (the default), JAX's runtime terminates every process as soon as its
    # coordination service declares one dead: no library can report anything then.
    jax.config.update("jax_enable_recoverability", recoverable)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid, coordinator_bind_address=f"127.0.0.1:{port}",
                               initialization_timeout=40, heartbeat_timeout_seconds=heartbeat_s)
    print(f"process {pid}: connected (jax {jax.__version__})", flush=True)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"))
    sharding = NamedSharding(mesh, P("x", "y"))
    want = np.arange(64 * 256, dtype=np.float32).reshape(64, 256)
    tensors = {"w": jax.make_array_from_callback(want.shape, sharding, lambda i: want[i])}
    if pid == victim:
        _die_mid_write(pid)
    result: dict[str, Any] = {"process": pid}
    began = time.monotonic()
    try:
        scj.save_file(tensors, os.path.join(directory, TARGET), timeout_s=save_timeout_s)
        result["raised"] = None
    except BaseException as exc:  # what the survivor gets is the point of the test
        result["raised"] = type(exc).__name__
        result["mro"] = [c.__name__ for c in type(exc).__mro__]
        result["message"] = str(exc)
        result["safecodec_error"] = isinstance(exc, sc.SafecodecError)
    result["elapsed"] = time.monotonic() - began
    result["temporaries"] = sorted(n for n in os.listdir(directory) if n.endswith(".safecodec-tmp"))
    with open(os.path.join(directory, f"result-{pid}.json"), "w") as fh:
        json.dump(result, fh)
    print(f"process {pid}: {result}", flush=True)
    # the peer is dead: a clean jax.distributed.shutdown would wait for it
    os._exit(0)


if __name__ == "__main__":
    main()
