"""One of two JAX processes joined by ``jax.distributed.initialize`` on 127.0.0.1, with 4
CPU devices each; run by ``test_remap_multiprocess.py``.

Usage: ``python tests/helpers/remap_multiprocess_worker.py PROCESS_ID PORT CKPT_DIR OUT_DIR``.
Loads the Llama-shaped checkpoint (``_llama_ckpt``) through ``safecodec.remap`` onto a 2x4
mesh whose ``data`` axis spans the processes, counting the bytes and read requests this
process makes (positioned reads: every byte goes through the counted source), checks its
shards against NumPy, writes ``OUT_DIR/result-<id>.json``.
"""

from __future__ import annotations

# ruff: noqa: E402  (the device count must be set before anything imports jax)
import faulthandler
import os
import sys

#: a worker still running after this many seconds prints its stacks and exits
HANG_S = 200

if __name__ == "__main__":
    faulthandler.dump_traceback_later(HANG_S, exit=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cpu_devices import force_cpu_devices
from _worker import finish_distributed

force_cpu_devices(4)

import json

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import _llama_ckpt as ck

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import safecodec as sc
from safecodec import remap as R

#: each leaf's spec: ``data`` (across the processes) always cuts the source in half
SPECS = {
    "embed.embedding": P("data", "model"),
    "final_norm.scale": P("data"),
    "lm_head.kernel": P("data", "model"),
    "layers.attn.q": P(None, "data", "model"),
    "layers.attn.k": P(None, "data"),
    "layers.attn.v": P(None, "data"),
    "layers.attn.o": P(None, "model", None, "data"),
    "layers.mlp.gate": P(None, "data", "model"),
    "layers.mlp.up": P(None, "data", "model"),
    "layers.mlp.down": P(None, "model", "data"),
    "layers.attn_norm": P(None, "data"),
    "layers.mlp_norm": P(None, "data"),
}


def main() -> None:
    pid, port, ckpt, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid, coordinator_bind_address=f"127.0.0.1:{port}",
                               initialization_timeout=120)
    assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = Mesh(np.array(devices).reshape(2, 4), ("data", "model"))
    want = ck.reference(ck.tensors())
    like: dict[str, object] = {}
    for name, arr in want.items():
        node = like
        *head, last = name.split(".")
        for part in head:
            node = node.setdefault(part, {})  # type: ignore[assignment]
        node[last] = jax.ShapeDtypeStruct(arr.shape, arr.dtype,
                                          sharding=NamedSharding(mesh, SPECS[name]))
    result: dict[str, object] = {"process": pid}
    with sc.safe_open(ckpt, "numpy", copy=True) as handle:  # positioned reads, counted
        plan = R.plan(handle, ck.rules(), like=like)
        before = handle.stats
        summary = plan.summary()
        loaded = plan.load()
        after = handle.stats
        result["bytes_read"] = after["bytes_read"] - before["bytes_read"]
        result["requests"] = after["requests"] - before["requests"]
        result["data_bytes"] = sum(i.nbytes for i in handle.header.tensors.values())
    result["planned_bytes"] = summary["total"]["bytes"]
    result["planned_requests"] = summary["total"]["requests"]
    checked = 0
    for name, arr in want.items():
        node = loaded
        for part in name.split("."):
            node = node[part]
        assert not node.is_fully_addressable and node.shape == arr.shape, name
        assert len(node.addressable_shards) == 4, name
        for shard in node.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), arr[shard.index], err_msg=name)
            checked += 1
    result["checked"] = checked
    with open(os.path.join(out_dir, f"result-{pid}.json"), "w") as fh:
        json.dump(result, fh)
    finish_distributed()  # not jax.distributed.shutdown(): see _worker.finish_distributed


if __name__ == "__main__":
    main()
