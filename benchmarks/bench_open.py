"""Opening cost: one tensor read lazily from a 10,000-tensor file, side by side with the wheel.

Issue target (issue 12, item 3): ``safecodec.safe_open(path, "numpy")`` + ``get_tensor``
on a 10,000-tensor file written by the reference wheel takes at most the wheel's time
(``safetensors.safe_open(path, "np")`` + ``get_tensor``). Also timed: ``parse_header``
alone on the same header bytes (already in memory), and ``read_header`` + iterating every
``TensorInfo`` (what a full load pays once the lazy mapping builds its dict).

Each round runs every contender once, in a rotating order; figures are medians with
min-max spreads, and the per-round ratio ours/wheel (median, quartiles, min-max). The
machine this was written on is shared (2 cores, several jobs): trust ratios, not times.

Run: ``python benchmarks/bench_open.py [--rounds N] [--count N] [--quick]``; writes
``benchmarks/results/open_10k.json`` (not with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

import safecodec as sc
from safecodec._header_fast import parse_header


def write_file(path: str, count: int) -> str:
    """``count`` float32 tensors of 1 KiB, written by the wheel; returns a name to read."""
    import safetensors.numpy as stn

    block = np.random.default_rng(1).random((count, 256), dtype=np.float32)
    stn.save_file({f"layers.{i:05d}.weight": block[i].copy() for i in range(count)}, path)
    return f"layers.{count // 2:05d}.weight"


def contenders(path: str, name: str) -> dict[str, Callable[[], Any]]:
    import safetensors

    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header, size = bytearray(data[8 : 8 + n]), len(data)  # a bytearray, as _reader passes

    def ours() -> Any:
        with sc.safe_open(path, "numpy") as f:
            return f.get_tensor(name)

    def wheel() -> Any:
        with safetensors.safe_open(path, "np") as f:
            return f.get_tensor(name)

    def parse() -> Any:
        return parse_header(header, size)

    def parse_all() -> Any:
        return list(parse_header(header, size).tensors.values())

    return {"safecodec open + get_tensor": ours, "wheel open + get_tensor": wheel,
            "safecodec parse_header alone": parse,
            "safecodec parse_header + every TensorInfo": parse_all}


def stats(s: list[float]) -> dict[str, float]:
    q = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
    return {"median": statistics.median(s), "q1": q[0], "q3": q[2], "min": min(s),
            "max": max(s), "n": len(s)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="1,000 tensors, 5 rounds")
    args = parser.parse_args(argv)
    count, rounds = (1_000, 5) if args.quick else (args.count, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "many.safetensors")
        name = write_file(path, count)
        fns = contenders(path, name)
        for fn in fns.values():  # warm up: imports, page cache
            fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        order = list(fns)
        for r in range(rounds):
            for key in order[r % len(order):] + order[: r % len(order)]:
                start = time.perf_counter()
                fns[key]()
                times[key].append(time.perf_counter() - start)
    ours, wheel = times["safecodec open + get_tensor"], times["wheel open + get_tensor"]
    ratios = [a / b for a, b in zip(ours, wheel, strict=True)]
    result = {
        "tensors": count, "rounds": rounds, "python": sys.version.split()[0],
        "numpy": np.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "figures": {k: stats(v) for k, v in times.items()},
        "ratio ours/wheel per round": stats(ratios),
        "ratio of medians": statistics.median(ours) / statistics.median(wheel),
        "samples": times,
    }
    print(f"{count} tensors, {rounds} rounds (rotating order)")
    print(f"{'contender':44} {'median':>9} {'q1 - q3':>19} {'min - max':>19}")
    for k, s in result["figures"].items():
        print(f"{k:44} {s['median'] * 1e3:7.2f}ms {s['q1'] * 1e3:8.2f}-{s['q3'] * 1e3:7.2f}ms "
              f"{s['min'] * 1e3:8.2f}-{s['max'] * 1e3:7.2f}ms")
    r = result["ratio ours/wheel per round"]
    print(f"ours/wheel per round: median {r['median']:.3f} (q1-q3 {r['q1']:.3f}-{r['q3']:.3f}, "
          f"min-max {r['min']:.3f}-{r['max']:.3f}); ratio of medians "
          f"{result['ratio of medians']:.3f}")
    if not args.quick:
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "open_10k.json"), "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
