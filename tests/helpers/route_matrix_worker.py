"""Runs the route matrix's cells (``route_matrix.py``) in a process with 4 virtual CPU
devices, so that ``sharding=`` cuts real blocks; run by ``test_route_matrix.py``.

Usage: ``python tests/helpers/route_matrix_worker.py CELLS.json OUT.json WORKDIR``, where
CELLS.json lists cell ids. Writes ``{cell id: {"ok": "1" or "", "why": text}}``.
"""

from __future__ import annotations

# ruff: noqa: E402  (the device count must be set before anything imports jax)
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.append(os.path.dirname(os.path.dirname(HERE)))  # safecodec, unless PYTHONPATH has one
from _cpu_devices import force_cpu_devices

#: Devices of the worker: a 2 x 2 mesh.
DEVICES = 4
force_cpu_devices(DEVICES)

import json
import logging
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import route_matrix as rm


def mesh_sharding() -> Any:
    """``sharding=`` of the "mesh" cells: every axis that divides evenly is split across a
    2 x 2 mesh (rows over "x", columns over "y": strided blocks), the rest replicated."""
    mesh = Mesh(np.array(jax.devices()[:DEVICES]).reshape(2, 2), ("x", "y"))

    def pick(name: str, shape: tuple[int, ...], dtype: Any) -> Any:
        axes = [("x", "y")[i] if i < 2 and shape[i] and shape[i] % 2 == 0 else None
                for i in range(len(shape))]
        return NamedSharding(mesh, P(*axes))

    return pick


#: A hang prints every thread's stack and exits before the test gives up on the worker.
HANG_S = 420


def main() -> None:
    import faulthandler

    from _warning_policy import strict

    cells_file, out_file, workdir = sys.argv[1:4]
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    strict()  # the suite's warning policy: a warning of ours fails its cell
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    with open(cells_file) as fh:
        wanted = set(json.load(fh))
    chosen = [c for c in rm.cells() if c.id in wanted]
    missing = wanted - {c.id for c in chosen}
    if missing:
        raise SystemExit(f"unknown cells: {sorted(missing)[:5]}")
    results = rm.run_all(chosen, workdir, mesh_sharding())
    with open(out_file, "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main()
