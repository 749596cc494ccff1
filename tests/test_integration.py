"""Layers working together: JAX loading of sharded checkpoints, JAX arrays through the
generic writer, sharded saves from the JAX front end."""

from __future__ import annotations

import numpy as np
import pytest

import safecodec as sc

jax = pytest.importorskip("jax", reason="jax is an optional dependency")
import safecodec.jax as scj  # noqa: E402


def _params():
    rng = np.random.default_rng(0)
    return {f"layer{i}.w": rng.standard_normal((32, 16)).astype(np.float32) for i in range(6)}


def test_jax_load_file_reads_a_sharded_checkpoint(tmp_path):
    params = _params()
    index = sc.save_file(params, tmp_path / "ckpt", max_shard_size=5000)
    del index
    shards = sorted(p.name for p in (tmp_path / "ckpt").glob("*.safetensors"))
    assert len(shards) > 1
    for source in (tmp_path / "ckpt", next((tmp_path / "ckpt").glob("*.index.json"))):
        loaded = scj.load_file(source)
        assert set(loaded) == set(params)
        for name, value in params.items():
            assert isinstance(loaded[name], jax.Array)
            np.testing.assert_array_equal(np.asarray(loaded[name]), value)


def test_jax_save_file_writes_shards(tmp_path):
    params = {k: jax.numpy.asarray(v) for k, v in _params().items()}
    scj.save_file(params, tmp_path / "out", max_shard_size=5000)
    back = sc.load_file(tmp_path / "out")
    for name, value in params.items():
        np.testing.assert_array_equal(back[name], np.asarray(value))


def test_generic_save_file_streams_jax_arrays(tmp_path):
    params = {k: jax.numpy.asarray(v) for k, v in _params().items()}
    params["host"] = np.arange(5)
    sc.save_file(params, tmp_path / "m.safetensors")
    back = sc.load_file(tmp_path / "m.safetensors")
    assert (tmp_path / "m.safetensors").read_bytes() == sc.save(params)
    for name, value in params.items():
        np.testing.assert_array_equal(back[name], np.asarray(value))


def test_tree_saved_in_shards_loads_back_whole(tmp_path):
    tree = {"enc": [np.ones((40, 40), np.float32), None], "dec": {"w": np.zeros((50, 50))},
            "step": 7}
    sc.save_tree(tree, tmp_path / "t", max_shard_size=10_000)
    assert len(list((tmp_path / "t").glob("*.safetensors"))) > 1
    back = sc.load_tree(tmp_path / "t")
    assert back["step"] == 7 and back["enc"][1] is None
    np.testing.assert_array_equal(back["dec"]["w"], tree["dec"]["w"])


def test_tree_round_trip_through_a_url_with_storage_options():
    fsspec = pytest.importorskip("fsspec", reason="fsspec is needed for URLs")
    tree = {"w": np.arange(6.0).reshape(2, 3), "meta": [1, None]}
    sc.save_tree(tree, "memory://integration/tree.safetensors", storage_options={})
    back = sc.load_tree("memory://integration/tree.safetensors", storage_options={})
    np.testing.assert_array_equal(back["w"], tree["w"])
    assert back["meta"] == [1, None]
    fsspec.filesystem("memory").rm("/integration", recursive=True)
