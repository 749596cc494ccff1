"""Orbax checks that need 8 CPU devices; run in a subprocess by ``test_orbax.py`` (the
device count must be set before JAX starts, so this module imports JAX only when run).

Usage: ``python tests/helpers/orbax_worker.py save DIR`` saves sharded arrays through a real
``CheckpointManager`` (steps 0-2, ``max_to_keep=2``, async) and restores the last step
onto other shardings; ``python tests/helpers/orbax_worker.py restore DIR`` restores a checkpoint
another process wrote onto a 4x2 mesh; ``python tests/helpers/orbax_worker.py multihost DIR PID
PORT`` is one of two processes joined by ``jax.distributed`` (2 CPU devices each) that
save arrays spanning both processes through one manager, collectively, and restore them.
Any failed check raises (exit status 1).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

#: seconds after which a worker dumps its threads' stacks and exits (the test waits longer)
HANG_S = 200


def values(step: int) -> dict[str, np.ndarray]:
    """The arrays saved at ``step`` (test_orbax.py checks and writes the same)."""
    return {
        "kernel": np.arange(16 * 8, dtype=np.float32).reshape(16, 8) + step,
        "bias": np.arange(8, dtype=np.int32) * (step + 1),
    }


def _check(tree: dict[str, Any], step: int, shardings: dict[str, Any]) -> None:
    import jax

    for name, want in values(step).items():
        got = tree["params"][name]
        assert isinstance(got, jax.Array), (name, type(got))
        assert got.sharding == shardings[name], (name, got.sharding, shardings[name])
        if got.is_fully_addressable:
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=name)
        for shard in got.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index], err_msg=name)
    assert tree["step"] == step, tree["step"]


def _template(shardings: dict[str, Any]) -> dict[str, Any]:
    import jax

    params = {name: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[name])
              for name, v in values(0).items()}
    return {"params": params, "step": 0}


def save(directory: str) -> None:
    import jax
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from safecodec.orbax import SafetensorsHandler, SafetensorsRestore, SafetensorsSave

    mesh = jax.make_mesh((4, 2), ("x", "y"))
    saved = {"kernel": NamedSharding(mesh, P("x", "y")), "bias": NamedSharding(mesh, P("y"))}
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(directory, item_handlers=SafetensorsHandler(),
                               options=options) as manager:
        for step in range(3):
            params = {name: jax.device_put(v, saved[name]) for name, v in values(step).items()}
            manager.save(step, args=SafetensorsSave({"params": params, "step": step}))
        manager.wait_until_finished()
        assert manager.all_steps() == [1, 2], manager.all_steps()
        # The same step back onto other shardings: columns over x, replicated.
        other = {"kernel": NamedSharding(mesh, P(None, "x")), "bias": NamedSharding(mesh, P())}
        _check(manager.restore(2, args=SafetensorsRestore(_template(other))), 2, other)
        _check(manager.restore(2, args=SafetensorsRestore(_template(saved))), 2, saved)


def restore(directory: str) -> None:
    import jax
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from safecodec.orbax import SafetensorsHandler, SafetensorsRestore

    mesh = jax.make_mesh((4, 2), ("x", "y"))
    shardings = {"kernel": NamedSharding(mesh, P("y", "x")), "bias": NamedSharding(mesh, P("x"))}
    with ocp.CheckpointManager(directory, item_handlers=SafetensorsHandler()) as manager:
        assert len(jax.devices()) == 8, jax.devices()
        assert manager.latest_step() == 2, manager.latest_step()
        _check(manager.restore(2, args=SafetensorsRestore(_template(shardings))), 2, shardings)


def multihost(directory: str, pid: str, port: str) -> None:
    import jax
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from safecodec.orbax import SafetensorsHandler, SafetensorsRestore, SafetensorsSave

    # loopback only, and a timeout well before the test's own (see jax_multiprocess_worker)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=int(pid), coordinator_bind_address=f"127.0.0.1:{port}",
                               initialization_timeout=120)
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((2, 2), ("x", "y"))  # x: one process per row
    saved = {"kernel": NamedSharding(mesh, P("x", "y")), "bias": NamedSharding(mesh, P())}
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(directory, item_handlers=SafetensorsHandler(),
                               options=options) as manager:
        for step in range(3):
            params = {name: jax.make_array_from_callback(v.shape, saved[name],
                                                         lambda index, v=v: v[index])
                      for name, v in values(step).items()}
            assert not params["kernel"].is_fully_addressable
            manager.save(step, args=SafetensorsSave({"params": params, "step": step}))
        # every process holds all of step 3: only the primary process writes it
        manager.save(3, args=SafetensorsSave({"params": values(3), "step": 3}))
        manager.wait_until_finished()
        assert manager.all_steps() == [2, 3], manager.all_steps()
        other = {"kernel": NamedSharding(mesh, P("y", "x")), "bias": NamedSharding(mesh, P("x"))}
        for step in (2, 3):
            _check(manager.restore(step, args=SafetensorsRestore(_template(other))), step, other)


def main() -> None:
    import faulthandler

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    sys.path.insert(0, os.path.dirname(os.path.dirname(here)))
    from _cpu_devices import force_cpu_devices
    from _warning_policy import strict

    mode = sys.argv[1]
    # a hang prints every thread's stack and exits before the test gives up
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    force_cpu_devices(2 if mode == "multihost" else 8)
    strict()  # the suite's warning policy (tests/helpers/_warning_policy.py)
    {"save": save, "restore": restore, "multihost": multihost}[mode](*sys.argv[2:])
    print("worker ok", flush=True)


if __name__ == "__main__":
    main()
