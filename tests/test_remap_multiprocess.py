"""safecodec.remap across two real JAX processes (``jax.distributed`` on 127.0.0.1, 4 CPU
devices each, the mesh's ``data`` axis across the processes): each process reads only its
half of a Hugging Face checkpoint, through transposes and splits, in few requests."""

from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip("jax")
pytest.importorskip("safetensors")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "helpers"))
import _llama_ckpt as ck  # noqa: E402
import _two_processes  # noqa: E402

#: seconds the two workers get in all (each dumps its stacks a little before)
DEADLINE_S = 240


def test_each_process_reads_its_half_in_few_requests(tmp_path) -> None:
    ckpt = tmp_path / "hf"
    ck.write(ckpt)
    codes, logs = _two_processes.run_retrying("remap_multiprocess_worker.py",
                                              [str(ckpt), str(tmp_path)], tmp_path, DEADLINE_S)
    report = "\n".join(f"---- process {i} (exit {c}) ----\n{log}"
                       for i, (c, log) in enumerate(zip(codes, logs, strict=True)))
    assert codes == [0, 0], report
    results = [json.loads((tmp_path / f"result-{i}.json").read_text()) for i in range(2)]
    for r in results:
        assert r["checked"] == 12 * 4  # every leaf, each of this process's 4 devices
        # counted at the reads: at most 0.55 of the file (inv_freq, ignored, is not read)
        assert 0 < r["bytes_read"] <= 0.55 * r["data_bytes"], r
        assert r["bytes_read"] == r["planned_bytes"], r  # the plan's bytes are what is read
        assert 0 < r["requests"] <= 2048, r
        assert r["planned_requests"] >= r["requests"], r  # the estimate is an upper bound
