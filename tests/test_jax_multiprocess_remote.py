"""Two real JAX processes (``jax.distributed.initialize`` on 127.0.0.1, 2 CPU devices
each) load files from a real S3-compatible server (moto, on 127.0.0.1) with a global
sharding. Each process, and each case, talks to the server through its own byte-counting
proxy, so the bytes that crossed the wire are counted per process: each fetches its own
blocks (about half the file) plus headers and merge slack, never the other half."""

from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip("jax")

import safecodec as sc
from safecodec import _remote

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "helpers"))
import _two_processes  # noqa: E402
from jax_remote_worker import FILES  # noqa: E402

#: Fixtures (servers on 127.0.0.1, memory:// prefixes) live in tests/helpers/conftest_remote.py.
pytest_plugins = ["conftest_remote"]

#: The goal of the per-process read plan: each process fetches at most this fraction of
#: the file (its blocks are half of it), headers and merge slack included.
BOUND = 0.55
#: Response headers per request as counted at the socket (moto sends ~570 bytes).
HTTP_OVERHEAD = 1024
#: seconds the two workers get in all (each dumps its stacks a little before)
DEADLINE_S = 240
#: what gRPC prints when process 0's coordinator cannot bind its port
#: no credentials or AWS configuration in the workers but the ones passed
_AWS_ISOLATION = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
                  "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

CASES = [
    {"name": "gpt2-rows", "file": "gpt2", "layout": "rows"},
    {"name": "wide-columns", "file": "wide", "layout": "columns"},
    {"name": "wide-interleaved", "file": "wide", "layout": "interleaved"},
]


@pytest.fixture(scope="module")
def run(s3_server, tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("multiprocess-remote")
    bucket = s3_server.new_bucket()
    urls = {}
    for name, make in FILES.items():
        urls[name] = f"s3://{bucket}/{name}.safetensors"
        sc.save_file(make(), urls[name], storage_options=s3_server.storage_options)
    proxy_type = type(s3_server.proxy)  # conftest_remote.CountingProxy, one more per (case, process)
    proxies = {c["name"]: [proxy_type(s3_server.proxy.upstream_port) for _ in range(2)]
               for c in CASES}
    options = {k: v for k, v in s3_server.storage_options.items() if k != "client_kwargs"}
    config = directory / "config.json"
    config.write_text(json.dumps({"dir": str(directory), "storage_options": options, "cases": [
        dict(c, url=urls[c["file"]],
             endpoints=[f"http://127.0.0.1:{p.port}" for p in proxies[c["name"]]])
        for c in CASES]}))
    try:
        for _attempt in range(3):  # a new port when another program took the one picked
            for pair in proxies.values():
                for p in pair:
                    p.counter.reset()
            codes, logs = _two_processes.run("jax_remote_worker.py", [str(config)], directory,
                                             DEADLINE_S, **_AWS_ISOLATION)
            if not (codes[0] and _two_processes.PORT_TAKEN in logs[0]):
                break
        report = "\n".join(f"---- process {i} (exit {c}) ----\n{log}"
                           for i, (c, log) in enumerate(zip(codes, logs, strict=True)))
        assert codes == [0, 0], report
        results = [json.loads((directory / f"result-{i}.json").read_text()) for i in range(2)]
        wire = {name: [p.counter.bytes_sent for p in pair] for name, pair in proxies.items()}
    finally:
        for pair in proxies.values():
            for p in pair:
                p.close()
    return results, wire


@pytest.mark.parametrize("case", [c["name"] for c in CASES])
def test_each_process_fetches_only_its_half(run, case: str) -> None:
    results, wire = run
    for pid in range(2):
        r = results[pid][case]
        got = r["stats"]
        size = r["file_size"]
        # the bytes the source received: its distinct blocks, plus merge slack at most
        assert r["addressable_bytes"] <= got["bytes_read"], r
        assert got["bytes_read"] <= r["addressable_bytes"] * (1 + _remote.MERGE_SLACK), r
        # what crossed the wire for this process alone: the header read, the blocks,
        # identity checks and every response's headers
        on_wire = wire[case][pid]
        requests = got["requests"] + got["metadata_requests"] + sum(r["stats_before"].values())
        assert on_wire <= r["stats_before"]["bytes_read"] + got["bytes_read"] + \
            HTTP_OVERHEAD * requests, (case, pid, on_wire, r)
        assert on_wire <= BOUND * size, (
            f"{case}: process {pid} fetched {on_wire} bytes = {on_wire / size:.3f} of the file")
    # the two processes hold different halves
    assert set(results[0][case]["shards"]).isdisjoint(results[1][case]["shards"])
    assert results[0][case]["addressable_bytes"] + results[1][case]["addressable_bytes"] == \
        results[0][case]["data_bytes"]
