"""One of two JAX processes joined by ``jax.distributed.initialize`` on 127.0.0.1, with
2 CPU devices each, loading files from an S3-compatible server with a global sharding;
run by ``test_jax_multiprocess_remote.py``.

Usage: ``python tests/helpers/jax_remote_worker.py PROCESS_ID PORT CONFIG.json``. For every case
of the configuration (a file URL, a layout, and the endpoint of a byte-counting proxy
that only this process and this case use), loads the file, checks every addressable shard
against the expected values, and reports the source's ``stats`` and the bytes of its
distinct addressable blocks. Writes ``<dir>/result-<id>.json``.
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
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import safecodec as sc


def gpt2_like() -> dict[str, np.ndarray]:
    """The 2-D tensors of a small GPT-2-shaped checkpoint (vocab 4096, context 512, width
    256, 2 layers; ~10.5 MiB of float32)."""
    from safecodec._bench import ModelShape, model_shapes

    shapes = model_shapes(ModelShape(vocab=4096, context=512, width=256, layers=2))
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items() if len(s) == 2}


def wide_rows() -> dict[str, np.ndarray]:
    """2-D tensors with wide rows (48-64 KiB; ~8 MiB in all), where column blocks are
    strided runs of many KiB: each process's half (or quarters) of a row is a range
    request of its own."""
    rng = np.random.default_rng(1)
    shapes = {"proj.a": (32, 16384), "proj.b": (48, 12288), "proj.c": (64, 16384)}
    return {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}


FILES = {"gpt2": gpt2_like, "wide": wide_rows}


def layout(name: str) -> tuple[Mesh, P]:
    """The mesh and spec of a case, over the 4 devices of both processes.

    * ``rows``: mesh (2, 2) ("data", "model"), ``P("data", "model")``; process p's devices
      are mesh row p: each process holds the rows of one half (a contiguous range).
    * ``columns``: ``P(None, ("data", "model"))``: 4 column blocks, process p holding blocks
      2p and 2p+1: the left or right half of every row (one strided run per row).
    * ``interleaved``: the same spec on a mesh whose devices alternate between processes:
      process p holds column blocks p and p+2 (two runs per row, a quarter row each).
    """
    devices = np.array(jax.devices())
    if name == "interleaved":
        devices = devices[[0, 2, 1, 3]]
    mesh = Mesh(devices.reshape(2, 2), ("data", "model"))
    spec = P("data", "model") if name == "rows" else P(None, ("data", "model"))
    return mesh, spec


def main() -> None:
    pid, port, config_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    with open(config_path) as fh:
        config = json.load(fh)
    print(f"process {pid}: jax {jax.__version__}, coordinator 127.0.0.1:{port}", flush=True)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid, coordinator_bind_address=f"127.0.0.1:{port}",
                               initialization_timeout=120)
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    results = {}
    for case in config["cases"]:
        key = case["name"]
        want = FILES[case["file"]]()
        mesh, spec = layout(case["layout"])
        sharding = NamedSharding(mesh, spec)
        options = dict(config["storage_options"])
        options["client_kwargs"] = {"endpoint_url": case["endpoints"][pid]}
        with sc.safe_open(case["url"], "jax", sharding=sharding, storage_options=options) as f:
            before = f.stats
            out = f.get_tensors()
            after = f.stats
            size = f.header.file_size
            header_bytes = f.header.data_start
        blocks: dict[tuple[str, str], int] = {}
        for name, arr in out.items():
            assert arr.sharding == sharding and not arr.is_fully_addressable
            for shard in arr.addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), want[name][shard.index])
                blocks[(name, str(shard.index))] = math.prod(shard.data.shape) * 4
        results[key] = {
            "file_size": size,
            "header_bytes": header_bytes,
            "data_bytes": sum(v.nbytes for v in want.values()),
            "addressable_bytes": sum(blocks.values()),
            "stats_before": before,
            "stats": {k: after[k] - before.get(k, 0) for k in after},
            "shards": sorted(f"{n}{i}" for n, i in blocks),
        }
        print(f"process {pid}: {key}: {results[key]['stats']}", flush=True)
    with open(os.path.join(config["dir"], f"result-{pid}.json"), "w") as fh:
        json.dump(results, fh)
    print(f"process {pid}: done", flush=True)
    finish_distributed()  # not jax.distributed.shutdown(): see _worker.finish_distributed


if __name__ == "__main__":
    main()
