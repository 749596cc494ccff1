"""JAX outputs in one process on JAX's default device: zero-copy aliasing, the one copy,
dtypes, x64, lifetime, the public-API fallback, and saving.

Multi-device and multi-process behaviour is tested in subprocesses
(``test_jax_sharding.py``, ``test_jax_multiprocess.py``) so that this process keeps JAX's
default device count.
"""

from __future__ import annotations

import gc
import os
import tracemalloc
import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
ml_dtypes = pytest.importorskip("ml_dtypes")

import safecodec as sc  # noqa: E402
import safecodec.flax as scf  # noqa: E402
import safecodec.jax as scj  # noqa: E402
from _placement import FORCE_PUBLIC, fast_path_required, missing_fast_path  # noqa: E402
from safecodec import _jax_put  # noqa: E402
from safecodec.jax import PrecisionWarning  # noqa: E402

CPU = jax.devices()[0].platform == "cpu"
cpu_only = pytest.mark.skipif(not CPU, reason="aliasing of host memory happens on JAX's CPU backend")


@pytest.fixture(params=["internal", "public"])
def put(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the fast placement path and again with the public-API fallback."""
    if request.param == "public":
        monkeypatch.setattr(_jax_put, "PUT", _jax_put.PublicPut())
    else:
        if not isinstance(_jax_put.placement(), _jax_put.InternalPut):
            missing_fast_path("the internal placement path failed its self-check")
    return request.param


def test_fast_placement_path_is_selected_and_used(monkeypatch):
    """On the supported JAX versions the private fast path passes its self-check, is the
    one selected, and is the one a load goes through (the [internal] variants rely on it)."""
    if not fast_path_required():
        pytest.skip(f"jax {jax.__version__} is older than the supported versions")
    monkeypatch.delenv(FORCE_PUBLIC, raising=False)
    InternalPut = _jax_put.InternalPut
    InternalPut()  # the private API exists (an exception here names what changed)
    selected = _jax_put._select_put()
    assert isinstance(selected, InternalPut), f"fell back to {type(selected).__name__}"
    assert selected.name == "xla_client.batched_device_put"
    calls = []
    real = selected._put

    def counting(*args):
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(selected, "_put", counting)
    monkeypatch.setattr(_jax_put, "PUT", selected)
    model = _model()
    out = scj.load(sc.save(model))
    assert isinstance(_jax_put.placement(), InternalPut)
    assert len(calls) >= 1
    assert {tuple(c.shape) for c in calls} <= {v.shape for v in model.values()}
    assert all(np.array_equal(np.asarray(out[k]), v) for k, v in model.items())


def _mapping_range(handle: sc.SafeOpen) -> tuple[int, int]:
    buf = handle.reader.buffer
    base = np.frombuffer(buf, np.uint8).ctypes.data
    return base, base + len(buf)


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "wte": rng.standard_normal((64, 32)).astype(np.float32),
        "bias": rng.standard_normal(32).astype(np.float32),  # 128 bytes: aligned
        "odd": rng.standard_normal(5).astype(np.float32),  # 20 bytes: not a multiple of 64
        "odd2": rng.standard_normal(3).astype(np.float32),  # ...so this one lands unaligned
        "half": rng.standard_normal((16, 16)).astype(ml_dtypes.bfloat16),
    }


# ----------------------------------------------------------------------------- zero copy


@cpu_only
def test_aligned_tensors_alias_the_mapping(tmp_path, put):
    path = tmp_path / "m.safetensors"
    model = _model()
    sc.save_file(model, path)
    with sc.safe_open(path, "jax") as f:
        lo, hi = _mapping_range(f)
        out = f.get_tensors()
        for name in ("wte", "bias", "half"):
            ptr = out[name].unsafe_buffer_pointer()
            assert lo <= ptr < hi, name
            assert ptr % 64 == 0
            assert ptr == lo + f.header.data_start + f.header.tensors[name].begin
        # odd2 follows the 20-byte tensor: not 64-aligned, so copied once, outside the map
        assert (f.header.data_start + f.header.tensors["odd2"].begin) % 64 != 0
        ptr = out["odd2"].unsafe_buffer_pointer()
        assert not lo <= ptr < hi and ptr % 64 == 0
        aligned = [n for n, i in f.header.tensors.items() if (f.header.data_start + i.begin) % 64 == 0]
        assert f.output.aliased == len(aligned) == 4
    for name, value in model.items():
        np.testing.assert_array_equal(np.asarray(out[name]), value)
    assert all(isinstance(v, jax.Array) for v in out.values())


@cpu_only
def test_mixed_file_every_kind_of_tensor_in_one_load(tmp_path, put):
    # get_tensors() views aligned tensors in one hot loop and sends every other kind
    # (empty, packed, narrowed, unaligned, a run of unaligned neighbours) down the general
    # path: every one must come out right, in file order, and only the aligned ones alias.
    rng = np.random.default_rng(3)
    model = {
        "a_aligned": rng.standard_normal((8, 16)).astype(np.float32),
        "b_empty": np.zeros((0, 4), np.float32),
        "c_f4": np.array([0.5, -1, 6, 0], dtype=ml_dtypes.float4_e2m1fn),
        "d_odd": rng.standard_normal(5).astype(np.float32),  # 20 bytes: what follows is unaligned
        "e_run1": rng.standard_normal(3).astype(np.float32),
        "f_run2": rng.standard_normal(4).astype(np.float32),
        "g_bf16": rng.standard_normal((4, 8)).astype(ml_dtypes.bfloat16),
    }
    if not jax.config.jax_enable_x64:
        model["h_i64"] = np.array([1, -(2**40)], np.int64)  # narrowed: a copy, with a warning
    path = tmp_path / "mixed.safetensors"
    sc.save_file(model, path, alignment=8)  # the reference layout: many misaligned tensors
    ctx = pytest.warns(PrecisionWarning) if "h_i64" in model else warnings.catch_warnings()
    with ctx, sc.safe_open(path, "jax") as f:
        lo, hi = _mapping_range(f)
        out = f.get_tensors()
        assert list(out) == list(f.header.tensors)  # file order
        base = f.header.data_start
        aliased = []
        for name, info in f.header.tensors.items():
            ptr = out[name].unsafe_buffer_pointer() if info.nbytes else None
            if ptr is not None and lo <= ptr < hi:
                assert ptr == lo + base + info.begin and (base + info.begin) % 64 == 0, name
                aliased.append(name)
        assert f.output.aliased == len(aliased) > 0, aliased
        assert not {"b_empty", "c_f4", "h_i64"} & set(aliased)
    want = sc.load_file(path)
    for name, value in want.items():
        got = np.asarray(out[name])
        if name == "h_i64":
            value = value.astype(np.int32)
        assert got.dtype == value.dtype and got.shape == value.shape, name
        np.testing.assert_array_equal(got.view(np.uint8), np.ascontiguousarray(value).view(np.uint8))


@cpu_only
def test_unaligned_tensor_is_copied_once_into_aligned_memory(tmp_path, put):
    # alignment=8 writes the reference layout: data starts 8-aligned, not 64-aligned here.
    model = {"a": np.arange(16, dtype=np.float32), "b": np.arange(16, dtype=np.float32)}
    path = tmp_path / "ref.safetensors"
    sc.save_file(model, path, metadata={"k": "v"}, alignment=8)  # header of 136 bytes
    start = sc.read_header(path).data_start
    assert start % 64 != 0, "test needs a misaligned data section"
    with sc.safe_open(path, "jax") as f:
        lo, hi = _mapping_range(f)
        out = f.get_tensors()
        for name, value in model.items():
            ptr = out[name].unsafe_buffer_pointer()
            assert not lo <= ptr < hi  # a copy, outside the mapping
            assert ptr % 64 == 0  # ...into memory JAX aliased (no second copy)
            np.testing.assert_array_equal(np.asarray(out[name]), value)
        assert f.output.aliased == 0
        # one read for the run of both tensors, into one buffer placed to align them
        t = f.header.tensors
        gap = out["b"].unsafe_buffer_pointer() - out["a"].unsafe_buffer_pointer()
        assert gap == t["b"].begin - t["a"].begin


@cpu_only
def test_reference_wheel_file_loads_right(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    model = _model()
    path = tmp_path / "ref.safetensors"
    st_numpy.save_file(model, str(path))
    out = scj.load_file(path)
    for name, value in model.items():
        np.testing.assert_array_equal(np.asarray(out[name]), value)


@cpu_only
def test_copy_true_owns_its_memory(tmp_path, put):
    path = tmp_path / "m.safetensors"
    sc.save_file(_model(), path)
    with sc.safe_open(path, "jax", copy=True) as f:
        out = f.get_tensors()
        assert f.reader.buffer is None
        assert f.stats["bytes_read"] >= sum(i.nbytes for i in f.header.tensors.values())
    assert out["wte"].unsafe_buffer_pointer() % 64 == 0
    np.testing.assert_array_equal(np.asarray(out["wte"]), _model()["wte"])


@cpu_only
def test_bytes_are_aliased_but_a_bytearray_is_copied(put):
    data = sc.save({"x": np.arange(32, dtype=np.float32)})
    mutable = bytearray(data)
    out = scj.load(mutable)
    mutable[-128:] = bytes(128)  # writes to the caller's buffer never reach the array
    np.testing.assert_array_equal(np.asarray(out["x"]), np.arange(32, dtype=np.float32))


def test_load_rejects_a_path():
    with pytest.raises(sc.SafecodecError, match="bytes-like"):
        scj.load("model.safetensors")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- dtypes


ROUND_TRIP = [
    np.bool_, np.uint8, np.int8, np.int16, np.uint16, np.float16, ml_dtypes.bfloat16,
    np.int32, np.uint32, np.float32, np.complex64,
    ml_dtypes.float8_e5m2, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e8m0fnu,
    ml_dtypes.float8_e4m3fnuz, ml_dtypes.float8_e5m2fnuz,
]  # fmt: skip


@pytest.mark.parametrize("dtype", ROUND_TRIP, ids=lambda d: np.dtype(d).name)
def test_dtypes_round_trip_bit_for_bit(dtype, put):
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 256, size=(3, 40), dtype=np.uint8)
    dt = np.dtype(dtype)
    if dt == np.bool_:
        host = bits % 2 == 1
    else:
        host = bits.view(dt)  # every bit pattern, NaNs and all
    host = np.ascontiguousarray(host)
    tensors = {"t": jnp.asarray(host), "scalar": jnp.asarray(host.reshape(-1)[0]),
               "empty": jnp.zeros((0, 4), dt)}
    out = scj.load(scj.save(tensors))
    assert out["t"].dtype == dt and out["t"].shape == host.shape
    np.testing.assert_array_equal(np.asarray(out["t"]).view(np.uint8), host.view(np.uint8))
    assert out["scalar"].shape == ()
    assert np.asarray(out["scalar"]).tobytes() == host.reshape(-1)[:1].tobytes()
    assert out["empty"].shape == (0, 4) and out["empty"].dtype == dt


def test_f4_loads_as_float4_e2m1fn(tmp_path, put):
    values = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -6], dtype=ml_dtypes.float4_e2m1fn)
    path = tmp_path / "f4.safetensors"
    sc.save_file({"q": values.reshape(2, 5)}, path)
    out = scj.load_file(path)["q"]
    assert out.dtype == np.dtype(ml_dtypes.float4_e2m1fn)
    np.testing.assert_array_equal(np.asarray(out).astype(np.float32), values.astype(np.float32).reshape(2, 5))
    # and jax.Array F4 values save to the same bytes as NumPy ones
    assert scj.save({"q": jnp.asarray(values.reshape(2, 5))}) == sc.save({"q": values.reshape(2, 5)})


def test_f6_raises_pointing_to_numpy(tmp_path):
    path = tmp_path / "f6.safetensors"
    sc.save_file({"s": np.zeros(8, ml_dtypes.float6_e2m3fn)}, path)
    with pytest.raises(sc.DtypeError, match=r"tensor 's' has dtype F6_E2M3.*framework='numpy'"):
        scj.load_file(path)
    assert sc.load_file(path)["s"].dtype == np.dtype(ml_dtypes.float6_e2m3fn)


@pytest.mark.parametrize(
    ("dtype", "cast"),
    [("int4", "int8"), ("uint4", "uint8"), ("int2", "int8"), ("float8_e3m4", "bfloat16"),
     ("float8_e4m3", "float8_e4m3fn"), ("float8_e4m3b11fnuz", "float8_e4m3fn")],
)
def test_saving_a_dtype_without_code_names_tensor_dtype_and_cast(dtype, cast):
    dt = getattr(jnp, dtype, None) or getattr(ml_dtypes, dtype, None)
    if dt is None:
        pytest.skip(f"this ml_dtypes/JAX has no {dtype}")
    value = jnp.zeros((4,), dt)
    with pytest.raises(sc.DtypeError, match=rf"tensor 'w' has dtype {dtype}\b.*{cast}"):
        scj.save({"w": value})


def test_saving_complex128_suggests_complex64():
    with pytest.raises(sc.DtypeError, match=r"tensor 'c' has dtype complex128.*complex64"):
        scj.save({"c": np.zeros(2, np.complex128)})


# ----------------------------------------------------------------------------- x64


def _x64_file(tmp_path):
    path = tmp_path / "x64.safetensors"
    sc.save_file({"i": np.array([2**40 + 5, -3], np.int64), "f": np.array([0.1], np.float64),
                  "u": np.array([7], np.uint64), "ok": np.ones(2, np.float32)}, path)
    return path


@pytest.mark.skipif(jax.config.jax_enable_x64, reason="needs JAX's default x64=False")
def test_x64_off_warns_once_naming_tensors_and_follows_jax(tmp_path, put):
    path = _x64_file(tmp_path)
    with pytest.warns(PrecisionWarning, match=r"3 64-bit tensor.*'u' \(uint64 -> uint32\), 'i' \(int64 -> int32\), 'f'") as rec:
        out = scj.load_file(path)
    assert len(rec) == 1
    assert out["i"].dtype == np.int32 and out["f"].dtype == np.float32 and out["u"].dtype == np.uint32
    np.testing.assert_array_equal(np.asarray(out["i"]), np.array([2**40 + 5, -3]).astype(np.int32))
    assert np.asarray(out["f"])[0] == np.float32(0.1)


@pytest.mark.skipif(jax.config.jax_enable_x64, reason="needs JAX's default x64=False")
def test_x64_off_strict_raises(tmp_path):
    path = _x64_file(tmp_path)
    with pytest.raises(sc.DtypeError, match=r"tensor '(i|f|u)' is (I64|F64|U64).*x64"):
        scj.load_file(path, strict_x64=True)


@pytest.mark.skipif(jax.config.jax_enable_x64, reason="needs JAX's default x64=False")
def test_x64_get_tensor_warns_once_per_handle(tmp_path):
    path = _x64_file(tmp_path)
    with sc.safe_open(path, "jax") as f:
        with pytest.warns(PrecisionWarning, match="tensor 'i' is int64"):
            f.get_tensor("i")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert f.get_tensor("f").dtype == np.float32


def test_x64_on_keeps_64_bit(tmp_path):
    path = _x64_file(tmp_path)
    with jax.enable_x64(True) if hasattr(jax, "enable_x64") else jax.experimental.enable_x64():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = scj.load_file(path)
        assert out["i"].dtype == np.int64
        assert int(out["i"][0]) == 2**40 + 5


# ----------------------------------------------------------------------------- lifetime


@cpu_only
def test_arrays_outlive_handle_gc_delete_and_replace(tmp_path):
    path = tmp_path / "m.safetensors"
    model = _model()
    sc.save_file(model, path)
    f = sc.safe_open(path, "jax")
    lo, hi = _mapping_range(f)
    w = f.get_tensor("wte")
    assert lo <= w.unsafe_buffer_pointer() < hi
    f.close()
    with pytest.raises(sc.ClosedHandleError):
        f.get_tensor("wte")
    del f
    gc.collect()
    np.testing.assert_array_equal(np.asarray(w), model["wte"])
    os.unlink(path)
    gc.collect()
    np.testing.assert_array_equal(np.asarray(w + 0), model["wte"])
    # atomic replacement: a new inode; the old mapping is untouched
    sc.save_file(model, path)
    v = scj.load_file(path)["wte"]
    sc.save_file({"wte": np.zeros_like(model["wte"])}, path)
    gc.collect()
    np.testing.assert_array_equal(np.asarray(v), model["wte"])
    assert float(scj.load_file(path)["wte"].sum()) == 0.0


@cpu_only
def test_in_place_modification_shows_in_aliased_arrays_but_not_copies(tmp_path):
    """What the docstrings promise: writes into the mapped file reach aliased arrays;
    copy=True arrays own their memory."""
    path = tmp_path / "m.safetensors"
    sc.save_file({"x": np.zeros(16, np.float32)}, path)
    aliased = scj.load_file(path)["x"]
    copied = scj.load_file(path, copy=True)["x"]
    start = sc.read_header(path).data_start
    with open(path, "r+b") as fh:
        fh.seek(start)
        fh.write(np.ones(1, np.float32).tobytes())
    assert float(np.asarray(aliased)[0]) == 1.0
    assert float(np.asarray(copied)[0]) == 0.0


# ----------------------------------------------------------------------------- handle API


def test_safe_open_jax_slices_and_device(tmp_path, put):
    path = tmp_path / "m.safetensors"
    model = _model()
    sc.save_file(model, path)
    dev = jax.devices()[0]
    for fw in ("jax", "flax"):
        with sc.safe_open(path, fw, device=dev) as f:
            s = f.get_slice("wte")[3:9, ::2]
            assert isinstance(s, jax.Array) and s.devices() == {dev} and s.committed
            np.testing.assert_array_equal(np.asarray(s), model["wte"][3:9, ::2])
            t = f.get_tensor("odd")
            assert t.committed
            np.testing.assert_array_equal(np.asarray(t), model["odd"])
    default = scj.load_file(path)["wte"]
    assert not default.committed  # like jax.device_put(x) without a device


def test_sharding_argument_validation(tmp_path):
    path = tmp_path / "m.safetensors"
    sc.save_file(_model(), path)
    with pytest.raises(sc.SafecodecError, match="sharding= takes"):
        scj.load_file(path, sharding=42)
    with pytest.raises(sc.TensorNotFoundError, match="'nope'"):
        scj.load_file(path, sharding={"nope": jax.sharding.make_single_device_sharding(jax.devices()[0])})
    with pytest.raises(sc.SafecodecError, match=r"tensor 'bias'.*got str"):
        scj.load_file(path, sharding=lambda name, shape, dtype: "bad" if name == "bias" else None)


def test_sharding_callable_and_mapping_single_device(tmp_path, put):
    path = tmp_path / "m.safetensors"
    model = _model()
    sc.save_file(model, path)
    dev = jax.devices()[0]
    single = jax.sharding.make_single_device_sharding(dev)
    seen = []

    def fn(name, shape, dtype):
        seen.append((name, shape, np.dtype(dtype)))
        return single if name == "wte" else None

    out = scj.load_file(path, sharding=fn)
    assert ("wte", (64, 32), np.dtype(np.float32)) in seen
    assert out["wte"].sharding == single and out["wte"].committed
    assert not out["bias"].committed
    out2 = scj.load_file(path, sharding={"half": single})
    assert out2["half"].sharding == single
    for name, value in model.items():
        np.testing.assert_array_equal(np.asarray(out[name]), value)
        np.testing.assert_array_equal(np.asarray(out2[name]), value)


def test_flax_matches_reference_flax(tmp_path):
    st_flax = pytest.importorskip("safetensors.flax")
    model = {k: jnp.asarray(v) for k, v in _model().items()}
    path = tmp_path / "m.safetensors"
    scf.save_file(model, path)
    assert all(isinstance(v, jax.Array) for v in model.values())  # input not rewritten
    ref = st_flax.load_file(str(path))
    ours = scf.load_file(path)
    assert set(ours) == set(ref)
    for name in ref:
        assert ours[name].dtype == ref[name].dtype
        np.testing.assert_array_equal(np.asarray(ours[name]), np.asarray(ref[name]))
    # and the reference flax writer's output loads here (it rewrites its input: give a copy)
    st_flax.save_file(dict(model), str(tmp_path / "r.safetensors"))
    back = scf.load((tmp_path / "r.safetensors").read_bytes())
    assert set(back) == set(model)
    for name in model:
        np.testing.assert_array_equal(np.asarray(back[name]), np.asarray(model[name]))


# ----------------------------------------------------------------------------- saving


def test_save_file_of_jax_arrays_matches_numpy_bytes(tmp_path):
    model = _model()
    scj.save_file({k: jnp.asarray(v) for k, v in model.items()}, tmp_path / "j.safetensors",
                  metadata={"format": "flax"})
    sc.save_file(model, tmp_path / "n.safetensors", metadata={"format": "flax"})
    assert (tmp_path / "j.safetensors").read_bytes() == (tmp_path / "n.safetensors").read_bytes()
    assert scj.save(model, alignment=8) == sc.save(model, alignment=8)


def test_save_file_streams_tensor_by_tensor(tmp_path):
    # 16 tensors of 256 KiB: a writer that built the file in memory would peak at 4 MiB.
    model = {f"t{i:02d}": jnp.full((256, 256), i, jnp.float32) for i in range(16)}
    jax.block_until_ready(model)
    tracemalloc.start()
    try:
        scj.save_file(model, tmp_path / "big.safetensors")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024 + 64 * 1024, peak
    out = sc.load_file(tmp_path / "big.safetensors")
    assert all(float(out[k][0, 0]) == i for i, k in enumerate(sorted(model)))


def test_save_file_failure_leaves_nothing(tmp_path):
    with pytest.raises(sc.DtypeError):
        scj.save_file({"a": jnp.zeros(2), "b": jnp.zeros(2, jnp.int4)}, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


def test_public_put_is_forced_by_environment(tmp_path):
    import subprocess
    import sys

    code = ("import safecodec._jax_put as j, safecodec.jax as s, numpy as np;"
            "assert j.PUT is None;"  # importing selects nothing (and starts no backend)
            "print(s.load(s.save({'a': np.ones(3, np.float32)}))['a'].tolist(), j.PUT.name)")
    env = dict(os.environ, SAFECODEC_JAX_PUBLIC_API="1", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.split() == ["[1.0,", "1.0,", "1.0]", "jax.device_put"]


def _gpus() -> list:
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


@pytest.mark.skipif(not _gpus(), reason="needs a GPU")
def test_gpu_values_and_shardings(tmp_path):
    gpu = _gpus()[0]
    model = _model()
    path = tmp_path / "m.safetensors"
    sc.save_file(model, path)
    out = scj.load_file(path, device=gpu)
    single = jax.sharding.make_single_device_sharding(gpu)
    for name, value in model.items():
        assert out[name].devices() == {gpu} and out[name].sharding == single
        np.testing.assert_array_equal(np.asarray(out[name]), value)
    mesh = jax.sharding.Mesh(np.array(_gpus()), ("x",))
    s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    w = scj.load_file(path, sharding={"wte": s})["wte"]
    assert w.sharding == s
    np.testing.assert_array_equal(np.asarray(w), model["wte"])
