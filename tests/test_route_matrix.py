"""Every route gives the same answer (issue 18): the route matrix.

Entry point x source x ``backend``/``copy``/``verify``/``framework``/``sharding`` x
condition, generated and sampled by ``tests/helpers/route_matrix.py`` (its docstring has
the axes, the rules that exclude combinations and the rules that decide each cell's
answer). The cells run in one subprocess with 4 virtual CPU devices and its own servers
on 127.0.0.1 (``route_matrix_worker.py``); each cell is reported as its own test here.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")
pytest.importorskip("s3fs", reason="the S3 sources need s3fs")
pytest.importorskip("moto.server", reason="the S3 sources need moto[server]")
pytest.importorskip("aiohttp", reason="the HTTP sources need aiohttp")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "helpers"))
import route_matrix as rm  # noqa: E402

EVERY = rm.cells()
CELLS = rm.sample(EVERY)

@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("route-matrix")
    cells_file, out = tmp / "cells.json", tmp / "results.json"
    cells_file.write_text(json.dumps([c.id for c in CELLS]))
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "helpers", "route_matrix_worker.py"),
         str(cells_file), str(out), str(tmp)],
        env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=480,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got: dict[str, dict[str, str]] = json.loads(out.read_text())
    return got


@pytest.mark.parametrize("cell", CELLS, ids=[c.id for c in CELLS])
def test_cell(results: dict[str, dict[str, str]], cell: rm.Cell) -> None:
    outcome = results[cell.id]
    assert outcome["ok"], f"{cell.id}: {outcome['why']}"


# ----------------------------------------------------------------------------- the sample


def test_the_sample_covers_every_value_of_every_axis() -> None:
    axes = {"entry": rm.ENTRIES, "source": rm.SOURCES, "condition": rm.CONDITIONS,
            **rm.OPTIONS}
    for axis, values in axes.items():
        seen = {getattr(c, axis) for c in CELLS}
        assert seen == set(values), (axis, set(values) - seen)


def test_the_sample_covers_every_triple_and_every_option_combination() -> None:
    wanted = {k for c in EVERY for k in rm.coverage_keys(c)}
    got = {k for c in CELLS for k in rm.coverage_keys(c)}
    assert got == wanted
    assert len(CELLS) < len(EVERY) / 2  # a sample, not the product
    assert {c.condition for c in CELLS if rm.is_reference(c)} == set(rm.CONDITIONS) - {"closed"}


def test_the_sample_is_the_same_on_every_run() -> None:
    assert [c.id for c in rm.sample(rm.cells())] == [c.id for c in CELLS]
    assert [c.id for c in rm.sample(EVERY, seed=rm.SEED + 1)] != [c.id for c in CELLS]


def test_every_exclusion_rule_excludes_something_and_only_by_its_reason() -> None:
    used = collections.Counter(rm.excluded(c) for c in rm.product())
    assert set(used) - {None} == set(rm.RULES), set(rm.RULES) - set(used)
    # the example of the issue: bytes with backend="pread" is excluded, by a rule
    cell = rm.Cell("get_tensor", "bytes", "pread", False, False, "numpy", None, "intact")
    assert rm.excluded(cell) == "pread-needs-a-file"


def test_the_issue_items_are_cells_of_the_sample() -> None:
    """Items 1-4, 12 and 15 of issue 18 each fail cells of this sample on the code before
    the fixes (checked when the matrix was written); here: those cells exist."""
    def has(**want: object) -> bool:
        return any(all(getattr(c, k) == v for k, v in want.items()) for c in CELLS)

    assert has(source="s3", condition="corrupted", verify=True, sharding="mesh")  # 1
    assert has(source="http-etag-on-head-only", condition="replaced")  # 2
    assert has(source="ro-view", condition="replaced", framework="jax")  # 3
    assert has(source="fileobj", condition="replaced", backend="pread")  # 4
    assert has(source="s3-versioned-sharded", condition="intact")  # 12
    assert has(entry="get_slice", condition="closed", source="s3")  # 15
