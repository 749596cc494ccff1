"""Mappings still alive when the interpreter exits (issue 18, finding 16).

A script that imports jax and keeps what ``load_file`` returned until it ends is the
common case (the Trees guide does it). On Python 3.11 safecodec maps files through
libc (no descriptor per mapping); the owner of such a mapping is freed while module
globals are torn down, and must not need them: nothing may be printed at exit. The
script runs in a fresh interpreter (this one), its stderr captured.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import safecodec as sc
from safecodec import _source

ROOT = pathlib.Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    import safecodec as sc
    import safecodec.jax as scj

    path, tree_path = sys.argv[1], sys.argv[2]
    kept = sc.load_file(path)                      # NumPy views of a private mapping
    kept_jax = scj.load_file(path)                 # jax.Arrays aliasing a read-only one
    handle = sc.safe_open(path, framework="jax")
    kept_slice = handle.get_slice("w")[2:5]
    tree = sc.load_tree(tree_path)                 # the Trees guide's last line
    cycle = [kept]
    cycle.append(cycle)                            # freed by the collector at exit
    assert float(kept_jax["w"][1, 1]) == float(kept["w"][1, 1])
    print("ok")
""")


def test_mappings_alive_at_exit_print_nothing(tmp_path) -> None:
    pytest.importorskip("jax")
    path = tmp_path / "m.safetensors"
    sc.save_file({"w": np.arange(64 * 64, dtype=np.float32).reshape(64, 64),
                  "b": np.ones(16, np.float32)}, path)
    tree_path = tmp_path / "tree.safetensors"
    sc.save_tree({"layer": {"kernel": np.ones((8, 8), np.float32), "bias": np.zeros(8)}},
                 tree_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_")}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(tree_path)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok\n"
    assert proc.stderr == "", proc.stderr


def test_a_libc_mapping_is_unmapped_when_its_last_view_goes(tmp_path) -> None:
    """Where the libc route is used (before Python 3.13), dropping the last view unmaps
    the region (it leaves /proc/self/maps)."""
    maps = pathlib.Path("/proc/self/maps")
    if _source._libc() is None or not maps.exists():
        pytest.skip("the libc mapping route is used on Linux before Python 3.13 only")
    path = tmp_path / "m.bin"
    path.write_bytes(b"\1" * 3 * 4096)
    with open(path, "rb") as f:
        view = _source.map_file(f.fileno(), 3 * 4096, "read")
    addr = np.frombuffer(view, np.uint8).__array_interface__["data"][0]
    start = f"{addr:x}-"

    def mapped() -> bool:
        return any(line.lstrip("0").startswith(start) for line in maps.read_text().splitlines())

    assert mapped()
    assert bytes(view[:3]) == b"\1\1\1"
    del view
    assert not mapped()
