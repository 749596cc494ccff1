"""safecodec.orbax with real Orbax: a ``CheckpointManager`` keeping the last N steps,
async and sync saves, restores onto templates (other shardings on 8 CPU devices, in
another process), and step folders that the reference ``safetensors`` wheel reads."""

from __future__ import annotations

import collections
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

ocp = pytest.importorskip(
    "orbax.checkpoint", reason="orbax-checkpoint is not installed (the 'orbax' extra)")
jax = pytest.importorskip("jax")
jnp = jax.numpy

import ml_dtypes  # noqa: E402
import safetensors.numpy as st_numpy  # noqa: E402
from etils import epath  # noqa: E402

import safecodec as sc  # noqa: E402
from safecodec.orbax import (  # noqa: E402
    DEFAULT_FILENAME,
    SafetensorsHandler,
    SafetensorsRestore,
    SafetensorsSave,
)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "helpers"))
from _cpu_devices import cpu_device_env  # noqa: E402
from _net import free_port  # noqa: E402
from orbax_worker import HANG_S, values  # noqa: E402  (its data only: it imports jax when run)

_WORKER = os.path.join(HERE, "helpers", "orbax_worker.py")

Pair = collections.namedtuple("Pair", ["left", "right"])


def _state(step: int) -> dict:
    return {
        "params": {"w": jnp.arange(12, dtype=jnp.float32).reshape(4, 3) + step,
                   "b": jnp.full((3,), step, jnp.bfloat16)},
        "opt": [np.arange(4, dtype=np.int32) * step, None, ()],
        "step": step,
    }


def _manager(directory: pathlib.Path, *, asynchronous: bool = True,
             max_to_keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                           enable_async_checkpointing=asynchronous)
    return ocp.CheckpointManager(directory, item_handlers=SafetensorsHandler(), options=options)


def _step_file(directory: pathlib.Path, step: int) -> pathlib.Path:
    files = sorted((directory / str(step)).rglob("*.safetensors"))
    assert [f.name for f in files] == [DEFAULT_FILENAME], files
    return files[0]


def _assert_state_equal(got: dict, want: dict) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert list(got["params"]) == list(want["params"])  # insertion order kept
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert type(g) is type(w) or (isinstance(g, jax.Array) and isinstance(w, jax.Array))
        assert np.asarray(g).dtype == np.asarray(w).dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("asynchronous", [True, False], ids=["async", "sync"])
def test_manager_keeps_the_last_steps_and_restores_them(tmp_path, asynchronous):
    with _manager(tmp_path, asynchronous=asynchronous, max_to_keep=2) as manager:
        for step in range(4):
            assert manager.save(step, args=SafetensorsSave(_state(step)))
        manager.wait_until_finished()
        assert manager.all_steps() == [2, 3]
        assert manager.latest_step() == 3
        restored = manager.restore(3, args=SafetensorsRestore(_state(0)))
        _assert_state_equal(restored, _state(3))
        assert manager.restore(2, args=SafetensorsRestore(_state(0)))["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["2", "3"]


def test_async_and_sync_saves_write_the_same_bytes(tmp_path):
    for asynchronous in (True, False):
        with _manager(tmp_path / str(asynchronous), asynchronous=asynchronous) as manager:
            manager.save(5, args=SafetensorsSave(_state(5)))
            manager.wait_until_finished()
    assert (_step_file(tmp_path / "True", 5).read_bytes()
            == _step_file(tmp_path / "False", 5).read_bytes())


def test_step_files_open_with_the_reference_wheel(tmp_path):
    with _manager(tmp_path) as manager:
        for step in (1, 2):
            manager.save(step, args=SafetensorsSave(_state(step), metadata={"run": "a"}))
        manager.wait_until_finished()
    for step in (1, 2):
        path = _step_file(tmp_path, step)
        tensors = st_numpy.load_file(str(path))
        assert sorted(tensors) == ["opt.0", "params.b", "params.w", "step"]
        np.testing.assert_array_equal(tensors["params.w"], np.asarray(_state(step)["params"]["w"]))
        assert tensors["params.b"].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(tensors["opt.0"], np.arange(4, dtype=np.int32) * step)
        assert tensors["step"].shape == () and int(tensors["step"]) == step
        with sc.safe_open(path) as f:
            assert f.metadata() == {"run": "a"}


def test_restore_without_a_target_gives_the_tree_as_saved(tmp_path):
    with _manager(tmp_path) as manager:
        manager.save(0, args=SafetensorsSave(_state(7)))
        manager.wait_until_finished()
        for restored in (manager.restore(0), manager.restore(0, args=SafetensorsRestore())):
            assert isinstance(restored["params"]["w"], jax.Array)
            assert isinstance(restored["opt"][0], jax.Array)  # arrays come back as jax.Array
            assert restored["opt"][1:] == [None, ()]
            assert restored["step"] == 7 and type(restored["step"]) is int
            np.testing.assert_array_equal(np.asarray(restored["params"]["b"]),
                                          np.full(3, 7, ml_dtypes.bfloat16))


def test_custom_nodes_and_keys_round_trip_onto_a_template(tmp_path):
    tree = {"pair": Pair(jnp.ones(2), (np.float32(2.5), True)), "key": jax.random.key(3),
            "empty": {}, "mixed": [1, 2.0, None]}
    with _manager(tmp_path) as manager:
        manager.save(0, args=SafetensorsSave(tree))
        manager.wait_until_finished()
        like = {"pair": Pair(jax.ShapeDtypeStruct((2,), jnp.float32), (np.float32(0), False)),
                "key": jax.random.key(0), "empty": {}, "mixed": [0, 0.0, None]}
        restored = manager.restore(0, args=SafetensorsRestore(like))
        plain = manager.restore(0)
    assert type(restored["pair"]) is Pair
    np.testing.assert_array_equal(np.asarray(restored["pair"].left), np.ones(2))
    assert restored["pair"].right == (np.float32(2.5), True)
    assert type(restored["pair"].right[0]) is np.float32
    assert jax.random.key_impl(restored["key"]) == jax.random.key_impl(tree["key"])
    np.testing.assert_array_equal(jax.random.key_data(restored["key"]),
                                  jax.random.key_data(tree["key"]))
    assert restored["empty"] == {} and restored["mixed"] == [1, 2.0, None]
    assert plain["pair"]["right"] == (np.float32(2.5), True)  # a dict without a template


def test_async_save_copies_before_returning(tmp_path):
    """Training goes on while the file is written: the saved values are those at save()."""
    w = jnp.arange(6.0).reshape(2, 3)
    counts = np.arange(3, dtype=np.int32)
    with _manager(tmp_path) as manager:
        manager.save(0, args=SafetensorsSave({"w": w, "counts": counts}))
        w.delete()  # what donating it to the next train step does
        counts += 100  # an in-place NumPy update
        manager.wait_until_finished()
        restored = manager.restore(0)
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(np.asarray(restored["counts"]), np.arange(3))


def test_arguments_alone_find_the_handler(tmp_path):
    """register_with_handler: a manager given no handler picks this one from the args."""
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(1, args=SafetensorsSave({"w": np.ones(2, np.float32)}))
        manager.wait_until_finished()
        restored = manager.restore(1, args=SafetensorsRestore({"w": np.zeros(2, np.float32)}))
    assert isinstance(restored["w"], np.ndarray)  # a NumPy template gives NumPy
    np.testing.assert_array_equal(restored["w"], np.ones(2, np.float32))
    st_numpy.load_file(str(_step_file(tmp_path, 1)))


def test_several_items_in_one_step(tmp_path):
    handlers = {"params": SafetensorsHandler(), "opt": SafetensorsHandler("opt.safetensors")}
    with ocp.CheckpointManager(tmp_path, item_handlers=handlers) as manager:
        manager.save(0, args=ocp.args.Composite(
            params=SafetensorsSave({"w": jnp.ones(3)}), opt=SafetensorsSave([np.int32(4)])))
        manager.wait_until_finished()
        restored = manager.restore(0)
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.ones(3))
    assert restored.opt == [np.int32(4)]
    assert sorted(p.relative_to(tmp_path / "0").as_posix()
                  for p in (tmp_path / "0").rglob("*.safetensors")) == [
        "opt/opt.safetensors", "params/checkpoint.safetensors"]


def test_item_metadata_describes_the_tree_without_loading_it(tmp_path):
    with _manager(tmp_path) as manager:
        manager.save(0, args=SafetensorsSave(_state(1)))
        manager.wait_until_finished()
        meta = manager.item_metadata(0)
    assert meta["params"]["w"] == jax.ShapeDtypeStruct((4, 3), jnp.float32)
    assert meta["params"]["b"] == jax.ShapeDtypeStruct((3,), jnp.bfloat16)
    assert meta["opt"] == [jax.ShapeDtypeStruct((4,), jnp.int32), None, ()]
    assert meta["step"] == 1


def test_a_mismatched_target_is_refused_with_both_shapes(tmp_path):
    with _manager(tmp_path) as manager:
        manager.save(0, args=SafetensorsSave({"w": jnp.ones((2, 3))}))
        manager.wait_until_finished()
        with pytest.raises(sc.TreeStructureError, match=r"template float32\[3, 2\], file 'w' float32\[2, 3\]"):
            manager.restore(0, args=SafetensorsRestore({"w": jax.ShapeDtypeStruct((3, 2), jnp.float32)}))


def test_handler_errors_name_the_problem(tmp_path):
    handler = SafetensorsHandler()
    directory = epath.Path(tmp_path)
    (tmp_path / "other.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no 'checkpoint.safetensors' in .*\['other.bin'\]"):
        handler.restore(directory, args=SafetensorsRestore())
    assert handler.metadata(directory) is None
    with pytest.raises(TypeError, match=r"args=SafetensorsSave\(tree\), got dict"):
        handler.save(directory, args={"w": 1})
    with pytest.raises(TypeError, match=r"args=SafetensorsRestore\(target\), got SafetensorsSave"):
        handler.restore(directory, args=SafetensorsSave({}))
    with pytest.raises(ValueError, match=r"plain file name, got 'a/b\.safetensors'"):
        SafetensorsHandler("a/b.safetensors")


def test_the_callers_tree_is_not_modified(tmp_path):
    state = _state(2)
    before = jax.tree.map(lambda x: x, state)
    with _manager(tmp_path) as manager:
        manager.save(0, args=SafetensorsSave(state))
        manager.wait_until_finished()
    assert jax.tree.structure(state) == jax.tree.structure(before)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(before), strict=True):
        assert a is b


def _run_worker(*args: str) -> None:
    proc = subprocess.run([sys.executable, _WORKER, *args], env=cpu_device_env(8),
                          capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(HERE))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "worker ok" in proc.stdout


def test_sharded_save_then_restore_in_another_process(tmp_path):
    """8 devices: sharded arrays saved through a manager (max_to_keep=2), restored onto
    other shardings there; then read here, in another process with one device, and by
    the reference wheel."""
    _run_worker("save", str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["1", "2"]
    tensors = st_numpy.load_file(str(_step_file(tmp_path, 2)))
    assert sorted(tensors) == ["params.bias", "params.kernel", "step"]
    for name, want in values(2).items():
        np.testing.assert_array_equal(tensors[f"params.{name}"], want)
    with _manager(tmp_path) as manager:
        restored = manager.restore(2)
    np.testing.assert_array_equal(np.asarray(restored["params"]["kernel"]), values(2)["kernel"])
    assert restored["step"] == 2


def test_restore_onto_a_mesh_in_another_process(tmp_path):
    with _manager(tmp_path) as manager:
        for step in range(3):
            manager.save(step, args=SafetensorsSave(
                {"params": {k: jnp.asarray(v) for k, v in values(step).items()}, "step": step}))
        manager.wait_until_finished()
    _run_worker("restore", str(tmp_path))


def _run_two_processes(directory: pathlib.Path) -> list[str]:
    """Both multihost workers, never leaving a child behind; their outputs, or fail."""
    # no proxies: gRPC would send the workers' 127.0.0.1 traffic there (see
    # test_jax_multiprocess.py)
    base = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env = cpu_device_env(2, base, no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost")
    port = str(free_port())
    logs = [directory.parent / f"{directory.name}-worker-{i}.log" for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as out:  # files, not pipes: a full pipe would stall a barrier
            procs.append(subprocess.Popen(
                [sys.executable, _WORKER, "multihost", str(directory), str(i), port], env=env,
                cwd=os.path.dirname(HERE), stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + HANG_S + 40
    try:
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = [log.read_text() for log in logs]
    report = "\n".join(f"---- process {i} (exit {p.returncode}) ----\n{out[-4000:]}"
                       for i, (p, out) in enumerate(zip(procs, outputs, strict=True)))
    assert [p.returncode for p in procs] == [0, 0], report
    return outputs


def test_two_processes_save_collectively_through_one_manager(tmp_path):
    """jax.distributed with 2 processes: arrays spanning both are written into one file by
    both (async, in Orbax's background thread); a step every process holds whole is written
    by process 0 alone; both restore onto other shardings; the files are plain."""
    directory = tmp_path / "ckpt"
    outputs = _run_two_processes(directory)
    assert all("worker ok" in out for out in outputs), outputs
    assert sorted(p.name for p in directory.iterdir() if not p.name.startswith(".")) == ["2", "3"]
    for step in (2, 3):
        tensors = st_numpy.load_file(str(_step_file(directory, step)))
        for name, want in values(step).items():
            np.testing.assert_array_equal(tensors[f"params.{name}"], want)
        assert int(tensors["step"]) == step
