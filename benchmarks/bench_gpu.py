"""GPU loads, side by side: GB/s of ``safecodec.jax.load_file(device=gpu)`` next to
``jax.device_put`` of the same bytes already in host memory (the practical ceiling: one
host-to-device copy per byte, nothing read) and ``safetensors.flax.load_file`` followed by
``jax.device_put`` (the peer: two host copies, then the transfer). With several GPUs, the
same for a load sharded over all of them.

Runs only where JAX sees a GPU; elsewhere it says so and exits 0, so it can be one
prepared script on a lent accelerator machine:

    python benchmarks/bench_gpu.py [--size gpt2|small] [--repeats 7]

Results: ``benchmarks/results/bench_gpu-<device kind>.json`` (medians of alternating runs,
with every sample).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

import safecodec as sc
import safecodec.jax as scj
from safecodec._bench import build_model

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _ready(tree: Any) -> None:
    jax.block_until_ready(list(tree.values()) if isinstance(tree, dict) else tree)


def _time(fn: Any) -> float:
    start = time.perf_counter()
    _ready(fn())
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="gpt2", choices=("gpt2", "small", "tiny"))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus:
        print("bench_gpu: JAX sees no GPU here; nothing to measure (exit 0)")
        return 0
    gpu = gpus[0]
    model = build_model(args.size)
    nbytes = sum(a.nbytes for a in model.values())
    contenders: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.safetensors")
        sc.save_file(model, path)
        contenders["safecodec.jax.load_file(device=gpu)"] = lambda: scj.load_file(path, device=gpu)
        contenders["jax.device_put(host arrays) [ceiling]"] = lambda: jax.device_put(model, gpu)
        try:
            from safetensors import flax as st_flax

            contenders["safetensors.flax.load_file + device_put"] = (
                lambda: jax.device_put(st_flax.load_file(path), gpu))
        except ImportError:
            print("bench_gpu: safetensors not installed; the peer is not measured")
        if len(gpus) > 1:
            mesh = jax.sharding.Mesh(np.array(gpus), ("d",))
            rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))

            def spec(name: str, shape: tuple[int, ...], dtype: Any) -> Any:
                return rows if shape and shape[0] % len(gpus) == 0 else None

            contenders[f"safecodec sharded over {len(gpus)} GPUs"] = (
                lambda: scj.load_file(path, sharding=spec))
        for fn in contenders.values():  # warm up (compilation, allocator)
            _ready(fn())
        samples: dict[str, list[float]] = {k: [] for k in contenders}
        names = list(contenders)
        for r in range(args.repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                samples[name].append(_time(contenders[name]))
    report = {"device": str(gpu), "device_kind": gpu.device_kind, "gpus": len(gpus),
              "jax": jax.__version__, "bytes": nbytes, "repeats": args.repeats,
              "median_s": {k: statistics.median(v) for k, v in samples.items()},
              "gb_per_s": {k: nbytes / statistics.median(v) / 1e9 for k, v in samples.items()},
              "samples": samples}
    print(f"{gpu.device_kind}: {nbytes / 1e6:.0f} MB, medians of {args.repeats} alternating runs")
    for k in names:
        print(f"  {k:<45} {report['median_s'][k] * 1e3:9.1f} ms  {report['gb_per_s'][k]:7.2f} GB/s")
    os.makedirs(RESULTS, exist_ok=True)
    kind = "".join(c if c.isalnum() else "-" for c in gpu.device_kind)
    with open(os.path.join(RESULTS, f"bench_gpu-{kind}.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
