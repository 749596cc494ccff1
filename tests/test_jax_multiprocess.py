"""Two real JAX processes (``jax.distributed.initialize`` on 127.0.0.1, 2 CPU devices
each) load one file with a global sharding and save one collectively."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("jax")

import safecodec as sc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from jax_multiprocess_worker import expected  # noqa: E402


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("multiprocess")
    sc.save_file(expected(), directory / "in.safetensors")
    port = str(_free_port())
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen([sys.executable, os.path.join(HERE, "jax_multiprocess_worker.py"),
                          str(i), port, str(directory)], env=env, cwd=os.path.dirname(HERE),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(out)
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(logs)
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
