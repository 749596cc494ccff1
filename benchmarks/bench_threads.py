"""Thread scaling of the copies safecodec cannot avoid, side by side with the wheel.

A GPT-2-small-shaped file written by the reference writer (8-aligned: no tensor can be
aliased, every byte is copied once into fresh memory) is loaded by

* ``safetensors.flax.load_file`` and ``safecodec.jax.load_file`` at each thread count
  (``safecodec.set_threads(n)``);
* ``safetensors.numpy.load_file`` and ``safecodec.load_file(copy=True)`` (positioned reads,
  the ``backend="pread"`` path) at each thread count;
* ``floor``: one positioned read of the data section into a fresh NumPy array, split the
  same way: what any loader that copies into fresh memory pays on this machine.

Each round runs every contender once, in a random order (seeded, drawn anew each round),
after one warm-up round. Reported
per contender: median, min-max and quartiles of the times, and the median of the per-round
ratios to the reference loader of the same output (the ratio is taken within a round,
so that load from other processes, which comes and goes, cancels as far as it can).

    python benchmarks/bench_threads.py                  # writes benchmarks/results/
    python benchmarks/bench_threads.py --quick --out /tmp/t.json
    python benchmarks/bench_threads.py --threads 1 2 4 8 --repeats 15
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

import safecodec as sc
import safecodec.jax as scj
from safecodec import _source, _threads

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def default_threads() -> list[int]:
    """1, 2, 4, ... up to the CPUs this process may use (and that count itself)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    out, n = [], 1
    while n < cpus:
        out.append(n)
        n *= 2
    return [*out, cpus]


def _ready(out: Any) -> None:
    if isinstance(out, dict):
        for v in out.values():
            if hasattr(v, "block_until_ready"):
                v.block_until_ready()


def _with_threads(n: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    def call() -> Any:
        sc.set_threads(n)
        return fn()

    return call


def _floor(path: str) -> Callable[[], Any]:
    header = sc.read_header(path)

    def read() -> Any:
        src = _source.FileSource(path)
        try:
            out = np.empty(src.size - header.data_start, np.uint8)
            src.readinto(header.data_start, memoryview(out))
        finally:
            src.close()
        return {"data": out}

    return read


def rounds(fns: dict[str, Callable[[], Any]], repeats: int,
           seed: int = 0) -> tuple[dict[str, list[float]], list[list[str]]]:
    """Every contender once per round, in a random order drawn anew each round (seeded);
    round 0 warms up.

    Random, not rotated: on a VM that takes freed memory back (free page reporting), the
    contender that runs right after one that freed a lot pays for memory backed anew. A
    rotation keeps each contender's predecessor fixed, which biases the comparison."""
    names = list(fns)
    rng = random.Random(seed)
    times: dict[str, list[float]] = {k: [] for k in names}
    orders: list[list[str]] = []
    for rnd in range(repeats + 1):
        order = rng.sample(names, len(names))
        if rnd:
            orders.append(order)
        for name in order:
            gc.collect()
            t0 = time.perf_counter()
            out = fns[name]()
            _ready(out)
            dt = time.perf_counter() - t0
            del out
            if rnd:
                times[name].append(dt)
    sc.set_threads(None)
    return times, orders


def summary(times: list[float], ref: list[float] | None) -> dict[str, Any]:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    row: dict[str, Any] = {"median_s": statistics.median(times), "min_s": min(times),
                           "max_s": max(times), "q1_s": q[0], "q3_s": q[2]}
    if ref is not None:
        ratios = [a / b for a, b in zip(times, ref, strict=True)]
        rq = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        row.update(ratio_median=statistics.median(ratios), ratio_min=min(ratios),
                   ratio_max=max(ratios), ratio_q1=rq[0], ratio_q3=rq[2],
                   ratio_of_medians=statistics.median(times) / statistics.median(ref))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small file, few runs (smoke test)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, nargs="+", default=None)
    ap.add_argument("--no-numpy", action="store_true", help="skip the NumPy copy=True cases")
    ap.add_argument("--dir", default=None, help="where to write the test file")
    ap.add_argument("--out", default=None, help="results JSON path")
    args = ap.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 11)
    counts = args.threads or default_threads()

    import safetensors.flax as st_flax
    import safetensors.numpy as st_numpy

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_jax import gpt2_shapes, make_tensors

    shapes = gpt2_shapes(n_layer=1, vocab=2048) if args.quick else gpt2_shapes()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "gpt2-reference.safetensors")
        st_numpy.save_file(make_tensors(shapes), path)
        nbytes = os.path.getsize(path)

        jax_fns: dict[str, Callable[[], Any]] = {"safetensors.flax": lambda: st_flax.load_file(path)}
        for n in counts:
            jax_fns[f"safecodec.jax t={n}"] = _with_threads(n, lambda: scj.load_file(path))
        for n in counts:
            jax_fns[f"floor t={n}"] = _with_threads(n, _floor(path))
        jax_times, jax_orders = rounds(jax_fns, repeats)
        np_times: dict[str, list[float]] = {}
        np_orders: list[list[str]] = []
        if not args.no_numpy:
            np_fns: dict[str, Callable[[], Any]] = {
                "safetensors.numpy": lambda: st_numpy.load_file(path)}
            for n in counts:
                np_fns[f"safecodec copy=True t={n}"] = _with_threads(
                    n, lambda: sc.load_file(path, copy=True))
            np_times, np_orders = rounds(np_fns, repeats, seed=1)

    cases: dict[str, Any] = {}
    for name, t in jax_times.items():
        cases[name] = summary(t, None if name == "safetensors.flax" else jax_times["safetensors.flax"])
    for name, t in np_times.items():
        cases[name] = summary(t, None if name == "safetensors.numpy" else np_times["safetensors.numpy"])

    print(f"\nGPT-2-small-shaped file from the reference writer ({nbytes / 1e6:.0f} MB), "
          f"jax {jax.__version__}, python {platform.python_version()}, "
          f"{len(os.sched_getaffinity(0))} CPUs, {repeats} rounds in random order\n")
    print(f"{'contender':<28} {'median':>9} {'min-max':>19} {'ratio (per round)':>26}")
    for name, r in cases.items():
        ratio = (f"{r['ratio_median']:.3f} [{r['ratio_min']:.3f}-{r['ratio_max']:.3f}]"
                 if "ratio_median" in r else "1 (reference)")
        print(f"{name:<28} {r['median_s'] * 1e3:7.1f}ms {r['min_s'] * 1e3:8.1f}-"
              f"{r['max_s'] * 1e3:7.1f}ms {ratio:>26}")

    result = {
        "benchmark": "bench_threads", "quick": args.quick, "jax": jax.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)), "loadavg_after": os.getloadavg(),
        "file_bytes": nbytes, "thread_counts": counts, "repeats": repeats,
        "min_piece": _threads.MIN_PIECE, "cases": cases,
        "runs": {**jax_times, **np_times}, "orders": {"jax": jax_orders, "numpy": np_orders},
    }
    out = args.out or os.path.join(
        RESULTS, f"bench_threads-py{sys.version_info.major}{sys.version_info.minor}"
        f"-jax{jax.__version__}{'-quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
