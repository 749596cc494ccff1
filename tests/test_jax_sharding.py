"""Sharded JAX loading and saving over 8 CPU devices in one process.

The checks live in ``jax_sharding_worker.py`` and run in one subprocess (JAX's device
count is fixed when it starts, and this test process must keep its own); each check is
reported as its own test here, once with the fast placement path and once with the
public-API fallback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "helpers"))
from _placement import missing_fast_path  # noqa: E402
from jax_sharding_worker import CHECKS  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("sharding")
    out = tmp / "results.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "helpers", "jax_sharding_worker.py"), str(out), str(tmp)],
        env=env, capture_output=True, text=True, timeout=300, cwd=os.path.dirname(HERE),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["internal", "public"])
@pytest.mark.parametrize("name", list(CHECKS))
def test_sharded(results: dict[str, str], name: str, mode: str) -> None:
    outcome = results[f"{name}[{mode}]"]
    if outcome.startswith("skip:"):
        missing_fast_path(outcome[5:].strip())
    assert outcome == "ok", outcome
