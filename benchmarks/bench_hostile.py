"""Resource bounds of the header parser on hostile headers.

Issue target: a hostile header is rejected or parsed in at most 0.2 µs and 20 bytes of
memory per header byte. For each case this prints the header size, the verdict, the time
per header byte (median of several runs) and the peak Python memory (tracemalloc) per
header byte, and writes ``benchmarks/results/hostile.json``.

Run: ``python benchmarks/bench_hostile.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import safecodec as sc
from safecodec._header_fast import parse_header


def _tensors_header(count: int) -> bytes:
    parts = [f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i in range(count)]
    return ("{" + ",".join(parts) + "}").encode()


def cases(scale: int) -> dict[str, tuple[bytes, int]]:
    """name -> (header bytes, file size the header is checked against)."""
    n = 1_000_000 // scale
    million = _tensors_header(n)
    deep = b'{"a":{"dtype":"U8","shape":[],"data_offsets":[0,1],"x":' + b"[" * (5_000_000 // scale) + b"]" * (5_000_000 // scale) + b"}}"
    huge_shape = b'{"a":{"dtype":"F64","shape":[' + b",".join([b"4294967295"] * (200_000 // scale)) + b'],"data_offsets":[0,8]}}'
    meta = b'{"__metadata__":{"k":"' + b"x" * (90_000_000 // scale) + b'"}}'
    many_meta = b'{"__metadata__":{' + b",".join(b'"k%d":"v"' % i for i in range(1_000_000 // scale)) + b"}}"
    long_name = b'{"' + b"n" * (50_000_000 // scale) + b'":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'
    numbers = b'{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0],"x":[' + b",".join([b"1e308"] * (1_000_000 // scale)) + b"]}}"
    out = {
        f"{n} tensors (valid)": (million, None),
        "nesting 5M deep in an unknown field": (deep, 0),
        "shape product overflow, 200k dims": (huge_shape, 0),
        "90 MB metadata value": (meta, 0),
        "1M metadata keys": (many_meta, 0),
        "50 MB tensor name": (long_name, 0),
        "1M float literals in an unknown field": (numbers, 0),
    }
    return {k: (v, (8 + len(v) + n) if s is None else 8 + len(v)) for k, (v, s) in out.items()}


def measure(header: bytes, size: int, repeat: int) -> dict[str, object]:
    times = []
    verdict = "accepted"
    for _ in range(repeat):
        t0 = time.perf_counter()
        try:
            parse_header(header, size)
        except sc.SafecodecError as exc:
            verdict = f"rejected: {str(exc)[:60]}"
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    try:
        parse_header(header, size)
    except sc.SafecodecError:
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    t = statistics.median(times)
    return {"bytes": len(header), "verdict": verdict, "seconds": t,
            "us_per_byte": t * 1e6 / len(header), "peak_bytes_per_byte": peak / len(header)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100x smaller headers, 1 run")
    args = parser.parse_args(argv)
    scale, repeat = (100, 1) if args.quick else (1, 3)
    results = {}
    print(f"{'case':42} {'header':>10} {'µs/byte':>8} {'mem/byte':>8}  verdict")
    for name, (header, size) in cases(scale).items():
        r = measure(header, size, repeat)
        results[name] = r
        ok = r["us_per_byte"] <= 0.2 and r["peak_bytes_per_byte"] <= 20
        print(f"{name:42} {r['bytes']:>10} {r['us_per_byte']:>8.4f} {r['peak_bytes_per_byte']:>8.2f}"
              f"  {r['verdict']}{'' if ok else '   <-- over the bound'}")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out, exist_ok=True)
    if not args.quick:
        with open(os.path.join(out, "hostile.json"), "w") as f:
            json.dump({"bounds": {"us_per_byte": 0.2, "peak_bytes_per_byte": 20},
                       "python": sys.version, "cases": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
