"""Two real JAX processes (``jax.distributed.initialize`` on 127.0.0.1, 2 CPU devices
each) load one file with a global sharding and save one collectively."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

pytest.importorskip("jax")

import safecodec as sc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "helpers"))
import _two_processes  # noqa: E402
from jax_multiprocess_worker import expected  # noqa: E402

#: seconds the two workers get in all; each worker dumps its stacks and exits a little
#: before (``jax_multiprocess_worker.HANG_S``), so a hang shows where it hung
DEADLINE_S = 240


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("multiprocess")
    sc.save_file(expected(), directory / "in.safetensors")
    codes, logs = _two_processes.run_retrying("jax_multiprocess_worker.py", [str(directory)],
                                              directory, DEADLINE_S)
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
