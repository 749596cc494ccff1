"""Two real JAX processes (``jax.distributed.initialize`` on 127.0.0.1, 2 CPU devices
each) load one file with a global sharding and save one collectively."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("jax")

import safecodec as sc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "helpers"))
from _cpu_devices import cpu_device_env  # noqa: E402
from jax_multiprocess_worker import expected  # noqa: E402


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_env() -> dict[str, str]:
    """The workers' environment: 2 CPU devices each, and no proxy variables. gRPC (which JAX's
    coordination service uses) honours ``http_proxy``/``https_proxy``/``grpc_proxy``; a CI
    machine that reaches its package registries through a proxy would send the workers'
    127.0.0.1 connections there, and JAX's own docs warn this can hang ``initialize``."""
    base = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return cpu_device_env(2, base, no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost",
                          PYTHONFAULTHANDLER="1")


#: seconds the two workers get in all; each worker dumps its stacks and exits a little
#: before (``jax_multiprocess_worker.HANG_S``), so a hang shows where it hung
DEADLINE_S = 240


#: what gRPC prints when process 0's coordinator cannot bind its port (then the process
#: crashes): another program took the port between :func:`_free_port` and the bind
PORT_TAKEN = "Failed to add port to server"


def _run_workers(directory: pathlib.Path) -> tuple[list[int], list[str]]:
    """Start both workers, wait for both (never leaving a child behind), return their exit
    codes and outputs. Output goes to files, not pipes: a worker blocked on a full pipe
    that nobody reads would stall the other one at its next barrier."""
    port = str(_free_port())
    logs = [directory / f"worker-{i}.log" for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as fh:
            procs.append(subprocess.Popen(
                [sys.executable, os.path.join(HERE, "helpers", "jax_multiprocess_worker.py"), str(i), port,
                 str(directory)], env=_child_env(), cwd=os.path.dirname(HERE), stdout=fh,
                stderr=subprocess.STDOUT))
    deadline = time.monotonic() + DEADLINE_S
    notes = ["", ""]
    try:
        for i, p in enumerate(procs):
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                notes[i] = f"\n[killed after {DEADLINE_S} s]"
            if i == 0 and p.returncode and PORT_TAKEN in logs[0].read_text():
                break  # process 1 would only wait for a coordinator that never starts
    finally:
        for p in procs:  # on a timeout or an exception: no child outlives the fixture
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], [log.read_text() + n for log, n in zip(logs, notes, strict=True)]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("multiprocess")
    sc.save_file(expected(), directory / "in.safetensors")
    for _attempt in range(3):  # a new port when another program took the one picked
        codes, logs = _run_workers(directory)
        if not (codes[0] and PORT_TAKEN in logs[0]):
            break
    report = "\n".join(f"---- process {i} (exit {c}) ----\n{log}"
                       for i, (c, log) in enumerate(zip(codes, logs, strict=True)))
    assert codes == [0, 0], report
    results = [json.loads((directory / f"result-{i}.json").read_text()) for i in range(2)]
    return directory, results


def test_each_process_reads_about_half(run) -> None:
    _, results = run
    total = results[0]["data_bytes"]
    for r in results:
        # exactly its own shards: half of every tensor
        assert r["bytes_read"] == total // 2, r
        assert r["mapped_bytes"] == total // 2, r
    assert results[0]["shards"] != results[1]["shards"]


def test_collective_save_loads_in_reference_wheel(run) -> None:
    st_numpy = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open

    directory, _ = run
    path = str(directory / "out.safetensors")
    got = st_numpy.load_file(path)
    want = expected()
    np.testing.assert_array_equal(got["w2"], want["w"] * 2)
    np.testing.assert_array_equal(got["v"], want["v"])
    np.testing.assert_array_equal(got["host"], np.array([1.5, -2.0], np.float32))
    with safe_open(path, "np") as f:
        assert f.metadata() == {"by": "multihost"}
    # the layout is the one a single process would write
    assert (directory / "out.safetensors").read_bytes() == sc.save(
        {"w2": want["w"] * 2, "v": want["v"], "host": np.array([1.5, -2.0], np.float32)},
        metadata={"by": "multihost"})


def test_collective_save_failure_leaves_nothing_and_every_process_raises(run) -> None:
    directory, results = run
    assert not (directory / "bad.safetensors").exists()
    assert "cannot produce bytes on process 0" in results[0]["failure"]
    assert "another process failed" in results[1]["failure"]
    assert "process 0: RuntimeError" in results[1]["failure"]
    assert not any(r["bad_exists"] for r in results)
    assert not [n for n in os.listdir(directory) if n.endswith(".safecodec-tmp")]


def test_collective_save_that_cannot_create_the_file_raises_everywhere(run) -> None:
    _, results = run
    assert results[0]["create_failure"].startswith("FileNotFoundError")
    assert "process 0 could not create the file" in results[1]["create_failure"]
    assert "FileNotFoundError" in results[1]["create_failure"]
