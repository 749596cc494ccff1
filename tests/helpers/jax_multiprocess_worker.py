"""One of two JAX processes joined by ``jax.distributed.initialize`` on 127.0.0.1, with
2 CPU devices each; run by ``test_jax_multiprocess.py``.

Usage: ``python tests/helpers/jax_multiprocess_worker.py PROCESS_ID PORT DIR``. Reads
``DIR/in.safetensors`` with a global sharding, checks its own shards, measures the bytes it
read, then saves a global array collectively to ``DIR/out.safetensors``. Writes
``DIR/result-<id>.json``.
"""

from __future__ import annotations

# ruff: noqa: E402  (the device count must be set before anything imports jax)
import os
import sys

#: seconds after which a worker still running dumps its stacks and exits (see _worker)
HANG_S = 200

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _worker import finish_distributed, start_worker

start_worker(2, HANG_S if __name__ == "__main__" else None)

import json

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import safecodec as sc
import safecodec.jax as scj


def expected() -> dict[str, np.ndarray]:
    """The tensors of the input file (the test writes the same ones)."""
    return {
        "w": np.arange(64 * 256, dtype=np.float32).reshape(64, 256),
        "v": np.arange(128 * 64, dtype=np.int32).reshape(128, 64) * -3,
    }


def main() -> None:
    pid, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    print(f"process {pid}: jax {jax.__version__}, coordinator 127.0.0.1:{port}", flush=True)
    # bind the coordinator to loopback only (the default, [::], needs IPv6); time out well
    # before the test does, so a failure to connect is reported, not waited out
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid, coordinator_bind_address=f"127.0.0.1:{port}",
                               initialization_timeout=120)
    print(f"process {pid}: connected", flush=True)
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"))
    shardings = {"w": NamedSharding(mesh, P("x", "y")), "v": NamedSharding(mesh, P("x", None))}
    want = expected()
    result: dict[str, object] = {"process": pid}

    # 1. load, counting the bytes this process reads (copy=True: every byte goes through
    #    positioned reads, which the handle counts)
    path = os.path.join(directory, "in.safetensors")
    with sc.safe_open(path, "jax", sharding=shardings, copy=True) as f:
        before = f.stats["bytes_read"]
        out = f.get_tensors()
        result["bytes_read"] = f.stats["bytes_read"] - before
        result["data_bytes"] = sum(i.nbytes for i in f.header.tensors.values())
    # ...and through the mapping (what the converter touched)
    with sc.safe_open(path, "jax", sharding=shardings) as f:
        mapped = f.get_tensors()
        result["mapped_bytes"] = f.output.bytes_loaded
    for arrays in (out, mapped):
        for name, arr in arrays.items():
            assert not arr.is_fully_addressable and arr.sharding == shardings[name]
            assert len(arr.addressable_shards) == 2
            for shard in arr.addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), want[name][shard.index])
    result["shards"] = sorted(str(s.index) for s in out["w"].addressable_shards)

    # 2. collective save of global arrays no process holds whole (+ a host value)
    target = os.path.join(directory, "out.safetensors")
    saved = {
        "w2": jax.make_array_from_callback(want["w"].shape, shardings["w"], lambda i: want["w"][i] * 2),
        "v": out["v"],
        "host": np.array([1.5, -2.0], np.float32),
    }
    print(f"process {pid}: loaded, saving", flush=True)
    scj.save_file(saved, target, metadata={"by": "multihost"}, timeout_s=120)
    assert os.path.exists(target)  # visible to every process when save_file returns
    # (only this save's temporaries: process 0 may already have begun the next save)
    leftovers = [n for n in os.listdir(directory)
                 if n.startswith(".out.safetensors.") and n.endswith(".safecodec-tmp")]
    assert not leftovers, leftovers
    # a failing process: nothing appears, every process raises
    bad = os.path.join(directory, "bad.safetensors")
    try:
        scj.save_file({"w2": saved["w2"], "x": FailOn(pid)}, bad, timeout_s=120)
    except (sc.SafecodecError, RuntimeError) as exc:
        result["failure"] = f"{type(exc).__name__}: {exc}"
    result["bad_exists"] = os.path.exists(bad)
    # process 0 cannot even create the file (no such directory): every process raises
    try:
        scj.save_file({"w2": saved["w2"]}, os.path.join(directory, "missing", "x.safetensors"),
                      timeout_s=120)
    except (sc.SafecodecError, OSError) as exc:
        result["create_failure"] = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(directory, f"result-{pid}.json"), "w") as fh:
        json.dump(result, fh)
    print(f"process {pid}: saved, done", flush=True)
    finish_distributed()  # not jax.distributed.shutdown(): see _worker.finish_distributed


class FailOn:
    """A host value whose bytes cannot be produced on process 1 (process 0 writes host
    values, so process 0's write fails there... on process 1 nothing is asked of it): the
    failure happens on process 0 and process 1 must learn of it."""

    shape = (2,)
    dtype = np.dtype(np.float32)

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError(f"cannot produce bytes on process {self.pid}")


if __name__ == "__main__":
    main()
