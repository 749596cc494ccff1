"""save_tree / load_tree with JAX: jax.Array outputs, templates of ShapeDtypeStructs,
shardings carried to the loader, PRNG keys, the 64-bit policy."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from _cpu_devices import cpu_device_env

jax = pytest.importorskip("jax")
jnp = jax.numpy

import safecodec as sc  # noqa: E402
from safecodec.jax import PrecisionWarning  # noqa: E402


def test_framework_jax_gives_jax_arrays_aliasing_the_mapping(tmp_path):
    tree = {"w": np.arange(16, dtype=np.float32), "l": [np.ones(16, np.int32)], "n": 3}
    path = tmp_path / "t.safetensors"
    sc.save_tree(tree, path)
    out = sc.load_tree(path, framework="jax")
    assert isinstance(out["w"], jax.Array) and isinstance(out["l"][0], jax.Array)
    assert out["n"] == 3 and type(out["n"]) is int
    with sc.safe_open(path, "jax") as f:
        # The same bytes as the JAX layer gives (64-byte aligned tensors are aliased).
        np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(f.get_tensor("w")))
    if jax.devices()[0].platform == "cpu":
        with sc.safe_open(path) as f:
            start = f.header.data_start + f.header.tensors["w"].begin
        assert start % 64 == 0


def test_jax_leaves_round_trip_and_bf16_stays_bf16():
    tree = {"a": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.arange(4, dtype=jnp.int8),
            "c": jnp.zeros((0,), jnp.float32)}
    out = sc.load_tree(sc.save_tree(tree), like=tree)
    for k in tree:
        assert isinstance(out[k], jax.Array) and out[k].dtype == tree[k].dtype
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(tree[k]))


def test_shape_dtype_struct_template_checks_and_places():
    saved = {"w": np.ones((4, 2), np.float32), "b": np.zeros(2, np.float32)}
    device = jax.devices()[0]
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    named = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    like = {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=named),
            "b": jax.ShapeDtypeStruct((2,), jnp.float32)}
    out = sc.load_tree(sc.save_tree(saved), like=like)
    assert out["w"].sharding == named
    assert out["b"].devices() == {device}
    bad = {"w": jax.ShapeDtypeStruct((2, 4), jnp.float32), "b": jax.ShapeDtypeStruct((2,), jnp.int32)}
    with pytest.raises(sc.TreeStructureError, match=r"(?s)0 missing, 0 unexpected, 2 mismatched.*"
                       r"\['w'\]: template float32\[2, 4\], file 'w' float32\[4, 2\].*"
                       r"\['b'\]: template int32\[2\], file 'b' float32\[2\]"):
        sc.load_tree(sc.save_tree(saved), like=bad)


def test_template_of_jax_arrays_keeps_their_sharding():
    device = jax.devices()[-1]
    like = {"w": jax.device_put(jnp.zeros(8, jnp.float32), device)}
    out = sc.load_tree(sc.save_tree({"w": np.arange(8, dtype=np.float32)}), like=like)
    assert out["w"].sharding == like["w"].sharding
    assert out["w"].tolist() == list(range(8))


def test_framework_numpy_overrides_a_jax_template():
    like = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
    out = sc.load_tree(sc.save_tree({"w": np.ones(2, np.float32)}), like=like, framework="numpy")
    assert type(out["w"]) is np.ndarray


def test_mixed_template_gives_numpy_copies_next_to_jax_arrays():
    saved = {"j": np.ones(2, np.float32), "n": np.zeros(2, np.float32)}
    like = {"j": jnp.zeros(2, jnp.float32), "n": np.ones(2, np.float32)}
    out = sc.load_tree(sc.save_tree(saved), like=like)
    assert isinstance(out["j"], jax.Array) and type(out["n"]) is np.ndarray
    out["n"][0] = 5  # a writable copy
    assert out["n"].tolist() == [5, 0]


def test_prng_keys_round_trip():
    key = jax.random.key(42)
    data = sc.save_tree({"rng": key, "w": np.ones(1, np.float32)})
    assert sc.read_header(data).tensors["rng"].dtype.code == "U32"
    out = sc.load_tree(data, framework="jax")
    assert jax.random.key_impl(out["rng"]) == jax.random.key_impl(key)
    np.testing.assert_array_equal(jax.random.key_data(out["rng"]), jax.random.key_data(key))
    like = {"rng": jax.ShapeDtypeStruct(key.shape, key.dtype), "w": np.zeros(1, np.float32)}
    out2 = sc.load_tree(data, like=like)
    assert jnp.issubdtype(out2["rng"].dtype, jax.dtypes.prng_key)
    raw = sc.load_tree(data)["rng"]
    assert raw.dtype == np.uint32 and raw.shape == (2,)


@pytest.mark.skipif(jax.config.jax_enable_x64, reason="needs x64 off (JAX's default)")
def test_float64_stays_float64_in_numpy_and_jax_narrowing_warns():
    data = sc.save_tree({"d": np.array([0.1], np.float64)})
    assert sc.load_tree(data)["d"].dtype == np.float64
    with pytest.warns(PrecisionWarning, match=r"x64 mode is off.*'d'"):
        out = sc.load_tree(data, framework="jax")
    assert out["d"].dtype == np.float32


def test_shardings_reach_the_loader_on_several_devices(tmp_path):
    """Four CPU devices in a subprocess: a template with a NamedSharding over all four
    gives an array split into four shards, each holding its rows."""
    path = tmp_path / "s.safetensors"
    code = textwrap.dedent(f"""
        import numpy as np, jax, jax.numpy as jnp, safecodec as sc
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        mesh = Mesh(np.array(jax.devices()), ("x",))
        sh = NamedSharding(mesh, P("x"))
        sc.save_tree({{"w": np.arange(32, dtype=np.float32).reshape(8, 4), "b": np.ones(4, np.float32)}},
                     {str(path)!r})
        like = {{"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sh), "b": jnp.zeros(4)}}
        out = sc.load_tree({str(path)!r}, like=like)
        assert out["w"].sharding == sh, out["w"].sharding
        rows = sorted(int(s.data[0, 0]) for s in out["w"].addressable_shards)
        print(len(jax.devices()), len(out["w"].addressable_shards), rows)
    """)
    env = cpu_device_env(4)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n")[-2] == "4 4 [0, 8, 16, 24]"
