"""safecodec.jax.load_file against safetensors.flax.load_file, side by side.

Cases (CPU):

* ``gpt2-safecodec``: a GPT-2-small-shaped file (~500 MB) written by safecodec (64-byte
  aligned layout). Target: safecodec >= 100x faster; every eligible tensor aliased.
* ``gpt2-reference``: the same tensors written by the reference writer (8-aligned).
  Target: safecodec <= 0.3x the time.
* ``small-10k``: 10,000 tensors of 1 KiB. Target: safecodec <= 0.5x the time.

With a GPU: GB/s of safecodec.jax.load_file(device=gpu) against safetensors.flax.load_file
+ jax.device_put, and against a transfer of the same bytes from pinned host memory.

Runs alternate between the two loaders; medians over ``--repeats`` runs are reported.

    python benchmarks/bench_jax.py            # full run, writes benchmarks/results/*.json
    python benchmarks/bench_jax.py --quick    # small smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
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
from safecodec import _jax_put

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def gpt2_shapes(n_layer: int = 12, vocab: int = 50257, ctx: int = 1024, d: int = 768) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of GPT-2 small (124M parameters with the defaults), from the
    main job's model table."""
    from safecodec._bench import ModelShape, model_shapes

    return model_shapes(ModelShape(vocab=vocab, context=ctx, width=d, layers=n_layer))


def make_tensors(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}


def ready(tree: dict[str, Any]) -> None:
    for v in tree.values():
        v.block_until_ready()


def alternate(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Run each loader once per round, alternating, after one warm-up round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rnd in range(repeats + 1):
        for name, fn in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            out = fn()
            ready(out)
            dt = time.perf_counter() - t0
            del out
            if rnd:
                times[name].append(dt)
    return times


def aliased_report(path: str) -> dict[str, int]:
    """How many tensors are 64-byte aligned in the file, and how many came out aliased."""
    with sc.safe_open(path, "jax") as f:
        out = f.get_tensors()
        eligible = sum(1 for i in f.header.tensors.values()
                       if (f.header.data_start + i.begin) % 64 == 0 and i.nbytes)
        aliased = f.output.aliased  # type: ignore[union-attr]
        del out
    return {"tensors": len(f.header.tensors), "eligible": eligible, "aliased": aliased}


def bench_case(name: str, path: str, repeats: int, target: str) -> dict[str, Any]:
    import safetensors.flax as st_flax

    times = alternate({"safecodec": lambda: scj.load_file(path),
                       "safetensors.flax": lambda: st_flax.load_file(path)}, repeats)
    ours = statistics.median(times["safecodec"])
    theirs = statistics.median(times["safetensors.flax"])
    row = {"case": name, "file_mb": os.path.getsize(path) / 1e6, "safecodec_s": ours,
           "safetensors_flax_s": theirs, "ratio": ours / theirs, "speedup": theirs / ours,
           "target": target, "runs": times}
    row.update(aliased_report(path))
    return row


def bench_gpu(path: str, repeats: int) -> dict[str, Any] | None:
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return None
    if not gpus:
        return None
    import safetensors.flax as st_flax
    import safetensors.numpy as st_numpy

    gpu = gpus[0]
    nbytes = os.path.getsize(path)
    host = st_numpy.load_file(path)
    pinned_sharding = jax.sharding.make_single_device_sharding(gpu, memory_kind="pinned_host")
    pinned = {k: jax.device_put(v, pinned_sharding) for k, v in host.items()}
    ready(pinned)
    fns = {
        "safecodec": lambda: scj.load_file(path, device=gpu),
        "safetensors.flax+device_put": lambda: jax.device_put(st_flax.load_file(path), gpu),
        "pinned->device": lambda: jax.device_put(pinned, jax.sharding.make_single_device_sharding(gpu)),
    }
    times = alternate(fns, repeats)
    return {"case": "gpu", "device": str(gpu),
            "gb_per_s": {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()},
            "runs": times}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small files, few runs (smoke test)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--dir", default=None, help="where to write the test files (default: a temp dir)")
    ap.add_argument("--out", default=None, help="results JSON path")
    args = ap.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 7)
    shapes = gpt2_shapes(n_layer=1, vocab=2048) if args.quick else gpt2_shapes()
    n_small = 1000 if args.quick else 10_000

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        import safetensors.numpy as st_numpy

        tensors = make_tensors(shapes)
        ours_path = os.path.join(tmp, "gpt2-safecodec.safetensors")
        ref_path = os.path.join(tmp, "gpt2-reference.safetensors")
        small_path = os.path.join(tmp, "small.safetensors")
        sc.save_file(tensors, ours_path)
        st_numpy.save_file(tensors, ref_path)
        del tensors
        rng = np.random.default_rng(1)
        small = {f"t{i:05d}": rng.standard_normal(256, dtype=np.float32) for i in range(n_small)}
        sc.save_file(small, small_path)
        del small

        rows = [
            bench_case("gpt2-safecodec", ours_path, repeats, "speedup >= 100x"),
            bench_case("gpt2-reference", ref_path, repeats, "ratio <= 0.3"),
            bench_case(f"small-{n_small}", small_path, repeats, "ratio <= 0.5"),
        ]
        gpu = bench_gpu(ours_path, repeats)

    print(f"\njax {jax.__version__} on {jax.devices()[0].platform}, python "
          f"{platform.python_version()}, placement: {_jax_put.placement().name}, "
          f"median of {repeats} alternating runs\n")
    print(f"{'case':<16} {'MB':>7} {'safecodec':>11} {'st.flax':>11} {'ratio':>8} "
          f"{'speedup':>9} {'aliased':>11}  target")
    for r in rows:
        print(f"{r['case']:<16} {r['file_mb']:7.1f} {r['safecodec_s'] * 1e3:9.2f}ms "
              f"{r['safetensors_flax_s'] * 1e3:9.2f}ms {r['ratio']:8.4f} {r['speedup']:8.1f}x "
              f"{r['aliased']:>5}/{r['eligible']:<5}  {r['target']}")
    if gpu:
        print("\nGPU GB/s:", {k: round(v, 2) for k, v in gpu["gb_per_s"].items()})
    else:
        print("\nGPU: none present, GPU benchmark skipped")

    result = {
        "benchmark": "bench_jax", "quick": args.quick, "jax": jax.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "placement": _jax_put.placement().name, "repeats": repeats,
        "cases": rows, "gpu": gpu,
    }
    out = args.out or os.path.join(
        RESULTS, f"bench_jax-py{sys.version_info.major}{sys.version_info.minor}-jax{jax.__version__}"
        f"{'-quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
