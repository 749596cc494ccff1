"""Bytes each process fetches in a multi-process sharded load from S3, before and after the
per-process read plan, side by side.

Two real JAX processes (``jax.distributed.initialize`` on 127.0.0.1, 2 CPU devices each,
mesh (2, 2) ("data", "model")) load one file from a moto S3 server on 127.0.0.1; each
process talks to it through its own byte-counting proxy, so the bytes on the wire (HTTP
headers and identity checks included) are counted per process. Each case runs with the
code of ``--before`` (a git revision, the per-device reads) and with this tree.

Cases:

* ``gpt2-rows``: a GPT-2-small-shaped file (vocabulary padded to 50304; every 2-D tensor
  ``P("data", "model")``, the 1-D ones unsharded): each process's blocks are half the file.
* ``wide-columns``: 2-D tensors with rows of 16 KiB, ``P(None, ("data", "model"))``: each
  device holds a quarter of every row and each process the left or right half (strided
  runs of 8 KiB with 8 KiB gaps: the previous 16 KiB merging made every device fetch the
  whole tensor).

Then, without a server, the bytes and requests that three merge rules plan for one
process's runs of the GPT-2 file with column blocks (each process: half of every row):
the previous ``merge_ranges`` (16 KiB gap), ``fsspec.utils.merge_offset_ranges``
(``max_gap`` 16 KiB, ``max_block`` 16 MiB) and the current ``merge_ranges``.

    python benchmarks/bench_perprocess.py            # writes benchmarks/results/perprocess.{json,md}
    python benchmarks/bench_perprocess.py --quick    # 2 layers instead of 12
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
LOCALHOST = "127.0.0.1"


# ----------------------------------------------------------------------------- the files


def gpt2_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    sys.path.insert(0, ROOT)
    from safecodec._bench import ModelShape, model_shapes

    return model_shapes(ModelShape(vocab=50304, context=1024, width=768, layers=layers))


def wide_shapes() -> dict[str, tuple[int, ...]]:
    return {"proj.a": (256, 4096), "proj.b": (384, 4096), "proj.c": (512, 4096)}


def tensors(case: str, layers: int) -> dict[str, Any]:
    import numpy as np

    shapes = gpt2_shapes(layers) if case == "gpt2-rows" else wide_shapes()
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}


# ----------------------------------------------------------------------------- a worker


def worker(pid: int, port: str, config_path: str) -> None:
    """One of the two processes (run with ``--worker``): loads the case's file with the
    code under ``config["code"]`` and writes what its source counted and how long it took."""
    with open(config_path) as fh:
        config = json.load(fh)
    sys.path.insert(0, config["code"])
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", 2)
    except (AttributeError, KeyError, RuntimeError):
        pass
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import safecodec as sc

    jax.distributed.initialize(coordinator_address=f"{LOCALHOST}:{port}", num_processes=2,
                               process_id=pid, coordinator_bind_address=f"{LOCALHOST}:{port}",
                               initialization_timeout=120)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    spec = P("data", "model") if config["case"] == "gpt2-rows" else P(None, ("data", "model"))
    two_d = NamedSharding(mesh, spec)

    def sharding(name: str, shape: tuple[int, ...], dtype: Any) -> Any:
        return two_d if len(shape) == 2 else None

    options = dict(config["storage_options"])
    options["client_kwargs"] = {"endpoint_url": config["endpoints"][pid]}
    t0 = time.perf_counter()
    with sc.safe_open(config["url"], "jax", sharding=sharding, storage_options=options) as f:
        out = f.get_tensors()
        for v in out.values():
            v.block_until_ready()
        stats = f.stats
        size = f.header.file_size
    elapsed = time.perf_counter() - t0
    shard_bytes = sum(s.data.nbytes for v in out.values() for s in v.addressable_shards
                      if len(v.shape) == 2 and s.replica_id == 0)
    with open(os.path.join(config["dir"], f"result-{pid}.json"), "w") as fh:
        json.dump({"stats": stats, "seconds": elapsed, "file_size": size,
                   "shard_bytes": shard_bytes}, fh)
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def run_pair(config: dict[str, Any], directory: str, timeout: float = 900) -> list[dict[str, Any]]:
    """Both workers, output to files, killed and reaped on a timeout."""
    path = os.path.join(directory, "config.json")
    with open(path, "w") as fh:
        json.dump(config, fh)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost",
               AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull, JAX_PLATFORMS="cpu")
    port = str(_free_port())
    procs, logs = [], []
    for pid in range(2):
        log = open(os.path.join(directory, f"worker-{pid}.log"), "w")  # noqa: SIM115
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                                       str(pid), port, path], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, cwd=directory))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    if any(p.returncode for p in procs):
        texts = [pathlib.Path(log.name).read_text()[-3000:] for log in logs]
        raise RuntimeError("a worker failed:\n" + "\n----\n".join(texts))
    out = []
    for pid in range(2):
        with open(os.path.join(directory, f"result-{pid}.json")) as fh:
            out.append(json.load(fh))
    return out


# ----------------------------------------------------------------------------- merge rules


def merge_rules(layers: int) -> dict[str, Any]:
    """Bytes and requests one process's column-half runs of the GPT-2 file cost under
    three merge rules (no server: the plan only)."""
    sys.path.insert(0, ROOT)
    from fsspec.utils import merge_offset_ranges

    from safecodec import _remote
    from safecodec._indexing import plan_runs

    runs: list[tuple[int, int]] = []
    offset = 0
    asked = 0
    for shape in gpt2_shapes(layers).values():
        n = math.prod(shape) * 4
        if len(shape) == 2:
            rows, cols = shape
            for a, b in plan_runs(shape, [(0, rows, 1), (0, cols // 2, 1)])[0]:
                runs.append((offset + 4 * a, offset + 4 * b))
                asked += 4 * (b - a)
        offset += n

    def previous(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        spans: list[list[int]] = []
        for start, end in sorted(ranges):
            if spans and start <= spans[-1][1] + _remote.MERGE_GAP:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
        out = []
        for a, b in spans:  # split as it did
            while b - a > _remote.MAX_REQUEST:
                out.append((a, a + _remote.MAX_REQUEST))
                a += _remote.MAX_REQUEST
            out.append((a, b))
        return out

    def fsspec_rule(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        _, starts, ends = merge_offset_ranges(["f"] * len(ranges), [a for a, _ in ranges],
                                              [b for _, b in ranges],
                                              max_gap=_remote.MERGE_GAP,
                                              max_block=_remote.MAX_REQUEST)
        return list(zip(starts, ends, strict=True))  # type: ignore[arg-type]

    out: dict[str, Any] = {"file_data_bytes": offset, "asked_bytes": asked, "rules": {}}
    for name, fn in (("previous merge_ranges (gap 16 KiB)", previous),
                     ("fsspec merge_offset_ranges (max_gap 16 KiB)", fsspec_rule),
                     ("merge_ranges (gap 16 KiB, slack <= 1/16)", _remote.merge_ranges)):
        t0 = time.perf_counter()
        spans = fn(runs)
        ms = (time.perf_counter() - t0) * 1000
        fetched = sum(b - a for a, b in spans)
        out["rules"][name] = {"bytes": fetched, "of_file": round(fetched / offset, 4),
                              "requests": len(spans), "plan_ms": round(ms, 1)}
    return out


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 layers instead of 12")
    ap.add_argument("--before", default="39b5553", help="git revision of the 'before' code")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    layers = 2 if args.quick else 12
    sys.path.insert(0, os.path.join(ROOT, "tests", "helpers"))
    sys.path.insert(0, ROOT)
    from moto.server import ThreadedMotoServer

    import safecodec as sc
    from conftest_remote import CountingProxy, S3Server, free_port

    os.environ.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull,
                      AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    work = tempfile.mkdtemp(prefix="bench-perprocess-")
    before_code = os.path.join(work, "before")
    os.makedirs(before_code)
    archive = subprocess.run(["git", "archive", args.before, "safecodec"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    archive_path = os.path.join(work, "before.tar")
    with open(archive_path, "wb") as fh:
        fh.write(archive)
    with tarfile.open(archive_path) as tar:
        tar.extractall(before_code, filter="data")
    moto_port = free_port()
    moto = ThreadedMotoServer(ip_address=LOCALHOST, port=moto_port, verbose=False)
    moto.start()
    upload = CountingProxy(moto_port)
    server = S3Server(upload)
    report: dict[str, Any] = {
        "python": platform.python_version(), "machine": platform.machine(),
        "before": args.before, "layers": layers, "cases": {},
    }
    try:
        bucket = server.new_bucket()
        options = {k: v for k, v in server.storage_options.items() if k != "client_kwargs"}
        for case in ("gpt2-rows", "wide-columns"):
            url = f"s3://{bucket}/{case}.safetensors"
            sc.save_file(tensors(case, layers), url, storage_options=server.storage_options)
            report["cases"][case] = {}
            for label, code in (("before", before_code), ("after", ROOT)):
                proxies = [CountingProxy(moto_port) for _ in range(2)]
                directory = os.path.join(work, f"{case}-{label}-{uuid.uuid4().hex[:6]}")
                os.makedirs(directory)
                config = {"case": case, "url": url, "code": code, "dir": directory,
                          "storage_options": options,
                          "endpoints": [f"http://{LOCALHOST}:{p.port}" for p in proxies]}
                try:
                    results = run_pair(config, directory)
                finally:
                    for p in proxies:
                        p.close()
                size = results[0]["file_size"]
                report["cases"][case][label] = [{
                    "wire_bytes": p.counter.bytes_sent,
                    "of_file": round(p.counter.bytes_sent / size, 4),
                    "source_bytes": r["stats"]["bytes_read"],
                    "requests": r["stats"]["requests"],
                    "seconds": round(r["seconds"], 2),
                    "shard_bytes": r["shard_bytes"],
                    "file_size": size,
                } for p, r in zip(proxies, results, strict=True)]
                print(case, label, report["cases"][case][label], flush=True)
    finally:
        upload.close()
        moto.stop()
    report["merge_rules_gpt2_columns"] = merge_rules(layers)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "perprocess.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    with open(os.path.join(args.out, "perprocess.md"), "w") as fh:
        fh.write(markdown(report))
    print(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Bytes per process, multi-process sharded load from S3",
        "",
        f"2 JAX processes x 2 CPU devices, mesh (2, 2), moto S3 on 127.0.0.1, one counting "
        f"proxy per process (bytes on the wire, headers included). GPT-2 shapes with "
        f"{report['layers']} layers. Before: `{report['before']}` (per-device reads); after: "
        "the per-process read plan. Python " + report["python"] + ".",
        "",
        "| case | file | code | process | fetched (wire) | of file | requests | load s |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for case, runs in report["cases"].items():
        for label in ("before", "after"):
            for pid, r in enumerate(runs[label]):
                lines.append(
                    f"| {case} | {r['file_size'] / 1e6:.1f} MB | {label} | {pid} | "
                    f"{r['wire_bytes'] / 1e6:.1f} MB | {r['of_file']:.3f} | {r['requests']} | "
                    f"{r['seconds']:.2f} |")
    rules = report["merge_rules_gpt2_columns"]
    lines += [
        "",
        "Merge rules, planned for one process of the GPT-2 file with column blocks (each "
        f"process: half of every row; asked {rules['asked_bytes'] / 1e6:.1f} MB of "
        f"{rules['file_data_bytes'] / 1e6:.1f} MB):",
        "",
        "| rule | fetched | of file | requests | plan ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rules["rules"].items():
        lines.append(f"| {name} | {r['bytes'] / 1e6:.1f} MB | {r['of_file']:.3f} | "
                     f"{r['requests']} | {r['plan_ms']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        main()
