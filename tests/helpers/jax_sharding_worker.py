"""Sharded loading checks that need 8 CPU devices; run in a subprocess by
``test_jax_sharding.py`` (the device count must be set before JAX starts).

Usage: ``python tests/helpers/jax_sharding_worker.py OUT.json TMPDIR``. Writes
``{"check[put]": "ok" | traceback}`` for every check, once with the fast placement path
and once with the public-API fallback.
"""

from __future__ import annotations

# ruff: noqa: E402  (the device count must be set before anything imports jax)
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _worker import start_worker

start_worker(8)

import json
import traceback
import tracemalloc
from collections.abc import Callable

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import safecodec as sc
import safecodec.jax as scj
from safecodec import _jax_put

CHECKS: dict[str, Callable[[str], None]] = {}


def check(fn: Callable[[str], None]) -> Callable[[str], None]:
    CHECKS[fn.__name__] = fn
    return fn


def _mesh(shape=(4, 2), order=None) -> Mesh:
    devs = np.array(jax.devices())
    if order is not None:
        devs = devs[order]
    return Mesh(devs.reshape(shape), ("x", "y"))


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "w": rng.standard_normal((16, 32)).astype(np.float32),
        "b": rng.standard_normal(32).astype(np.float32),
        "h": rng.standard_normal((8, 64)).astype(ml_dtypes.bfloat16),
        "s": np.array(2.5, np.float32),
        "z": np.zeros((0, 8), np.float32),
    }


def _assert_shards(arr: jax.Array, full: np.ndarray, sharding) -> None:
    assert arr.shape == full.shape, (arr.shape, full.shape)
    assert arr.dtype == full.dtype
    assert arr.sharding == sharding, (arr.sharding, sharding)
    assert len(arr.addressable_shards) == len(sharding.addressable_devices)
    for shard in arr.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
    np.testing.assert_array_equal(np.asarray(arr), full)


def _file(tmp: str, name: str, tensors=None, **kw) -> str:
    path = os.path.join(tmp, name)
    sc.save_file(tensors if tensors is not None else _model(), path, **kw)
    return path


@check
def named_2d_mesh(tmp: str) -> None:
    path = _file(tmp, "m.safetensors")
    model = _model()
    s = NamedSharding(_mesh(), P("x", "y"))
    with sc.safe_open(path, "jax", sharding={"w": s, "h": s}, copy=True) as f:
        before = f.stats["bytes_read"]
        out = f.get_tensors()
        # each shard's bytes read once: the whole tensors, no more
        assert f.stats["bytes_read"] - before == sum(v.nbytes for v in model.values()), f.stats
    for name in ("w", "h"):
        _assert_shards(out[name], model[name], s)
    np.testing.assert_array_equal(np.asarray(out["b"]), model["b"])


@check
def row_shards_alias_the_mapping(tmp: str) -> None:
    path = _file(tmp, "rows.safetensors")
    model = _model()
    s = NamedSharding(_mesh((8, 1)), P("x", None))
    with sc.safe_open(path, "jax", sharding={"w": s}) as f:
        buf = f.reader.buffer
        lo = np.frombuffer(buf, np.uint8).ctypes.data
        arr = f.get_tensor("w")
        start = lo + f.header.data_start + f.header.tensors["w"].begin
        # rows 2i..2i+1 of a (16, 32) float32 tensor: 256-byte aligned runs, zero copy
        ptrs = sorted(sh.data.unsafe_buffer_pointer() for sh in arr.addressable_shards)
        assert ptrs == [start + 256 * i for i in range(8)], (ptrs, start)
        assert f.output.aliased == 8
    _assert_shards(arr, model["w"], s)


@check
def column_shards_read_strided_ranges(tmp: str) -> None:
    path = _file(tmp, "cols.safetensors")
    model = _model()
    s = NamedSharding(_mesh((8, 1)), P(None, "x"))
    with sc.safe_open(path, "jax", sharding=s, copy=True) as f:
        before = f.stats
        arr = f.get_tensor("w")
        after = f.stats
    assert after["bytes_read"] - before["bytes_read"] == model["w"].nbytes
    # 8 shards x 16 rows: one range per row of each shard
    assert after["requests"] - before["requests"] == 8 * 16
    _assert_shards(arr, model["w"], s)


@check
def replicated_is_read_once(tmp: str) -> None:
    path = _file(tmp, "rep.safetensors")
    model = _model()
    s = NamedSharding(_mesh(), P())
    with sc.safe_open(path, "jax", sharding=s, copy=True) as f:
        before = f.stats["bytes_read"]
        out = f.get_tensors()
        assert f.stats["bytes_read"] - before == sum(v.nbytes for v in model.values())
    for name, value in model.items():
        _assert_shards(out[name], value, s)
    # zero copy when aligned: every device's buffer is the same mapped memory
    with sc.safe_open(path, "jax", sharding=s) as f:
        w = f.get_tensor("w")
        assert len({sh.data.unsafe_buffer_pointer() for sh in w.addressable_shards}) == 1


@check
def partially_replicated_reads_each_piece_once(tmp: str) -> None:
    path = _file(tmp, "part.safetensors")
    model = _model()
    s = NamedSharding(_mesh(), P(None, "x"))  # 4 pieces, each on 2 devices
    with sc.safe_open(path, "jax", sharding={"w": s}, copy=True) as f:
        before = f.stats["bytes_read"]
        arr = f.get_tensor("w")
        assert f.stats["bytes_read"] - before == model["w"].nbytes
    _assert_shards(arr, model["w"], s)


def _plan_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {
        "cols": rng.standard_normal((32, 1024)).astype(np.float32),    # 8 column blocks
        "grid": rng.standard_normal((64, 512)).astype(np.float32),     # 4 x 2 blocks
        "part": rng.standard_normal((16, 2048)).astype(ml_dtypes.bfloat16),  # 4 blocks x 2
        "rep": rng.standard_normal((8, 256)).astype(np.float32),       # on every device
        "plain": rng.standard_normal(300).astype(np.float32),          # not sharded
    }


def _plan_shardings() -> dict[str, NamedSharding]:
    return {
        "cols": NamedSharding(_mesh(), P(None, ("x", "y"))),
        "grid": NamedSharding(_mesh(), P("x", "y")),
        "part": NamedSharding(_mesh(), P(None, "x")),
        "rep": NamedSharding(_mesh(), P()),
    }


def _check_plan_values(out: dict, model: dict, shardings: dict) -> None:
    for name, s in shardings.items():
        _assert_shards(out[name], model[name], s)
    np.testing.assert_array_equal(np.asarray(out["plain"]), model["plain"])


@check
def per_process_plan_reads_each_byte_once(tmp: str) -> None:
    """One process, 8 devices: column blocks, a grid, partially replicated and replicated
    tensors. Locally (positioned reads, and the mapping) and from memory:// (range
    requests), every byte of the file's tensors is read once: replicated blocks once,
    neighbouring blocks never re-fetched (per device, memory:// used to fetch column-sharded
    tensors once per device: 8 times)."""
    model, shardings = _plan_model(), _plan_shardings()
    data = sum(v.nbytes for v in model.values())
    path = _file(tmp, "plan.safetensors", model)
    with sc.safe_open(path, "jax", sharding=shardings, copy=True) as f:
        before = f.stats["bytes_read"]
        out = f.get_tensors()
        assert f.stats["bytes_read"] - before == data, (f.stats, data)
    _check_plan_values(out, model, shardings)
    with sc.safe_open(path, "jax", sharding=shardings) as f:
        out = f.get_tensors()
        assert f.output.bytes_loaded == data, (f.output.bytes_loaded, data)
    _check_plan_values(out, model, shardings)
    import uuid

    url = f"memory://plan-{uuid.uuid4().hex[:8]}/plan.safetensors"
    sc.save_file(model, url)
    with sc.safe_open(url, "jax", sharding=shardings) as f:
        before = f.stats
        out = f.get_tensors()
        after = f.stats
    got = after["bytes_read"] - before["bytes_read"]
    assert got == data, (got, data, after)
    # every sharded tensor in ONE batch (blocks tile the tensors: one merged span), then
    # the unsharded one
    assert after["requests"] - before["requests"] == 2, (before, after)
    _check_plan_values(out, model, shardings)
    # a single sharded tensor: its blocks fetched by one plan too
    with sc.safe_open(url, "jax", sharding=shardings) as f:
        before = f.stats
        cols = f.get_tensor("cols")
        after = f.stats
    assert after["bytes_read"] - before["bytes_read"] == model["cols"].nbytes
    assert after["requests"] - before["requests"] == 1
    _assert_shards(cols, model["cols"], shardings["cols"])


@check
def per_process_plan_on_a_sharded_index(tmp: str) -> None:
    """A sharded checkpoint (Hugging Face index) on memory://: each shard file's tensors
    are read by one plan, every byte once."""
    import uuid

    model, shardings = _plan_model(), _plan_shardings()
    data = sum(v.nbytes for v in model.values())
    root = f"memory://plan-{uuid.uuid4().hex[:8]}"
    sc.save_file(model, f"{root}/model.safetensors", max_shard_size=70_000)
    index = f"{root}/model.safetensors.index.json"
    import fsspec

    with fsspec.open(index, "r") as fh:
        shards = len(set(json.load(fh)["weight_map"].values()))
    assert shards > 1, shards
    with sc.safe_open(index, "jax", sharding=shardings) as f:
        assert set(f.header.tensors) == set(model)  # every shard header read
        before = f.stats
        out = f.get_tensors()
        after = f.stats
    assert after["bytes_read"] - before["bytes_read"] == data, (before, after, data)
    # one batch per shard file for its sharded tensors, one read for its unsharded ones
    assert after["requests"] - before["requests"] <= 2 * shards, (before, after)
    _check_plan_values(out, model, shardings)


@check
def positional_layouts(tmp: str) -> None:
    """Devices in an arbitrary order on the mesh (what PositionalSharding expressed)."""
    path = _file(tmp, "pos.safetensors")
    model = _model()
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    for spec in (P("x", "y"), P("y", "x"), P(("x", "y"), None)):
        s = NamedSharding(_mesh((4, 2), order), spec)
        arr = scj.load_file(path, sharding=lambda n, shape, dt, s=s: s if n == "w" else None)["w"]
        _assert_shards(arr, model["w"], s)
    if hasattr(jax.sharding, "PositionalSharding"):  # removed in newer JAX
        ps = jax.sharding.PositionalSharding(np.array(jax.devices())[order]).reshape(4, 2)
        arr = scj.load_file(path, sharding={"w": ps})["w"]
        _assert_shards(arr, model["w"], ps)


@check
def callable_gets_name_shape_dtype(tmp: str) -> None:
    path = _file(tmp, "fn.safetensors")
    model = _model()
    s = NamedSharding(_mesh(), P("x"))
    seen = {}

    def fn(name, shape, dtype):
        seen[name] = (shape, np.dtype(dtype))
        return s if len(shape) == 2 and shape[0] % 4 == 0 and shape[0] else None

    out = scj.load_file(path, sharding=fn)
    assert seen == {k: (v.shape, v.dtype) for k, v in model.items()}, seen
    _assert_shards(out["w"], model["w"], s)
    _assert_shards(out["h"], model["h"], s)
    assert out["b"].sharding.num_devices == 1 and not out["b"].committed


@check
def scalars_and_zero_size_sharded(tmp: str) -> None:
    path = _file(tmp, "small.safetensors")
    model = _model()
    rep = NamedSharding(_mesh(), P())
    out = scj.load_file(path, sharding={"s": rep, "z": NamedSharding(_mesh(), P(None, "x"))})
    _assert_shards(out["s"], model["s"], rep)
    assert out["z"].shape == (0, 8)


@check
def uneven_shapes_give_a_clear_error(tmp: str) -> None:
    path = _file(tmp, "uneven.safetensors", {"u": np.zeros((6, 5), np.float32)})
    s = NamedSharding(_mesh(), P("x", "y"))
    try:
        arr = scj.load_file(path, sharding=s)["u"]
    except sc.SafecodecError as exc:
        msg = str(exc)
        assert "tensor 'u' with shape [6, 5] cannot be laid out with" in msg, msg
    else:  # a JAX that shards unevenly: then the values must still be right
        _assert_shards(arr, np.zeros((6, 5), np.float32), s)
    path = _file(tmp, "rank.safetensors", {"r": np.zeros((8, 4), np.float32)})
    bad_rank = NamedSharding(_mesh(), P("x", "y", None))
    try:
        scj.load_file(path, sharding=bad_rank)
    except sc.SafecodecError as exc:
        assert "tensor 'r' with shape [8, 4] cannot be laid out" in str(exc), str(exc)
    else:
        raise AssertionError("a 3-D spec for a 2-D tensor was accepted")


@check
def unaligned_file_shards(tmp: str) -> None:
    model = _model()
    path = _file(tmp, "ref.safetensors", metadata={"k": "v"}, alignment=8)
    s = NamedSharding(_mesh(), P("x", "y"))
    out = scj.load_file(path, sharding={"w": s, "h": s})
    _assert_shards(out["w"], model["w"], s)
    _assert_shards(out["h"], model["h"], s)


@check
def x64_sharded_narrowing(tmp: str) -> None:
    import warnings

    path = _file(tmp, "x64.safetensors", {"i": np.arange(16, dtype=np.int64).reshape(8, 2)})
    s = NamedSharding(_mesh(), P("x"))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        arr = scj.load_file(path, sharding=s)["i"]
    assert [type(w.message) for w in rec] == [scj.PrecisionWarning], rec
    _assert_shards(arr, np.arange(16, dtype=np.int32).reshape(8, 2), s)


@check
def save_sharded_streams_and_matches_numpy(tmp: str) -> None:
    model = _model()
    model["big"] = np.arange(1 << 18, dtype=np.float32).reshape(512, 512)  # 1 MiB
    s = NamedSharding(_mesh(), P("x", "y"))
    arrays = {k: (jax.device_put(v, s) if k in ("w", "h", "big") else jax.device_put(v))
              for k, v in model.items()}
    arrays["r"] = jax.device_put(model["b"], NamedSharding(_mesh(), P()))
    expect = dict(model, r=model["b"])
    tracemalloc.start()
    try:
        scj.save_file(arrays, os.path.join(tmp, "saved.safetensors"), metadata={"m": "1"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < model["big"].nbytes // 4, peak  # never a whole tensor, let alone the model
    with open(os.path.join(tmp, "saved.safetensors"), "rb") as fh:
        got = fh.read()
    assert got == sc.save(expect, metadata={"m": "1"})
    assert scj.save(arrays, metadata={"m": "1"}) == got


# ----------------------------------------------------------------------------- box engine


def _reference(path: str) -> dict[str, np.ndarray]:
    """The file as the reference wheel loads it."""
    import _oracle

    return dict(_oracle.require_module("numpy").load_file(path))


def _routes(path: str, tmp: str) -> dict[str, tuple[str, dict]]:
    """The same file on every block route: the mapping, positioned reads, copy=True, and
    a remote object (memory://)."""
    import fsspec

    url = f"memory://{os.path.basename(tmp)}/{os.path.basename(path)}"
    with open(path, "rb") as fh:
        fsspec.filesystem("memory").pipe(url, fh.read())
    return {"mmap": (path, {}), "pread": (path, {"backend": "pread"}),
            "copy": (path, {"copy": True}), "remote": (url, {})}


@check
def column_sharded_plan_is_linear_in_bytes(tmp: str) -> None:
    """An (N, 2) tensor sharded on its last axis: host memory during the load stays
    within the output plus 2x the tensor (the old plan held one tuple per row: ~120x),
    and 4x the rows cost about 4x the time, on every block route."""
    import time

    s = NamedSharding(_mesh((1, 2), order=[0, 1]), P(None, "y"))
    for rows in (1 << 17, 1 << 19):
        path = _file(tmp, f"col{rows}.safetensors",
                     {"t": np.arange(2 * rows, dtype=np.float32).reshape(rows, 2)})
        want = _reference(path)["t"]
        times = {}
        for route, (src, kw) in _routes(path, tmp).items():
            sc.load_file(src, framework="jax", sharding=s, **kw)  # warm: imports, caches
            tracemalloc.start()
            try:
                began = time.perf_counter()
                out = sc.load_file(src, framework="jax", sharding=s, **kw)["t"]
                times[route] = time.perf_counter() - began
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak <= 3 * want.nbytes, (route, rows, peak / want.nbytes)
            _assert_shards(out, want, s)
            best = min(times[route], *(_timed(src, s, kw) for _ in range(2)))
            times[route] = best
        if rows == 1 << 17:
            small = times
        else:
            for route, t in times.items():
                assert t <= 8 * small[route] + 0.05, (route, small[route], t)
                assert t < 2.0, (route, t)


def _timed(src: str, s: object, kw: dict) -> float:
    import time

    began = time.perf_counter()
    sc.load_file(src, framework="jax", sharding=s, **kw)
    return time.perf_counter() - began


@check
def sharded_verify_on_every_block_route(tmp: str) -> None:
    """verify=True with one corrupted tensor: every block route raises ChecksumError,
    including blocks that never touch the corrupted byte; intact files load."""
    model = _model()
    path = _file(tmp, "ok.safetensors", model, checksums=True)
    with open(path, "rb") as fh:
        data = bytearray(fh.read())
    header = sc.read_header(path)
    w = header.tensors["w"]
    data[header.data_start + w.end - 1] ^= 0x40  # the last element: in one block only
    bad = os.path.join(tmp, "bad.safetensors")
    with open(bad, "wb") as fh:
        fh.write(data)
    s = NamedSharding(_mesh(), P("x", "y"))
    first_block = NamedSharding(_mesh((1, 8)), P(None, "y"))  # columns of every row
    reference = _reference(path)
    for sharding in (s, first_block):
        for route, (src, kw) in _routes(bad, tmp).items():
            try:
                sc.load_file(src, framework="jax", sharding={"w": sharding}, verify=True, **kw)
            except sc.ChecksumError as exc:
                assert "'w'" in str(exc), exc
            else:
                raise AssertionError(f"{route}: a corrupted tensor loaded under verify=True")
            with sc.safe_open(src, "jax", verify=True, **kw) as f:
                try:
                    f.get_slice("w", sharding=s)[:, :16]
                except sc.ChecksumError:
                    pass
                else:
                    raise AssertionError(f"{route}: get_slice(sharding=) skipped verify")
        for src, kw in _routes(path, tmp).values():
            out = sc.load_file(src, framework="jax", sharding={"w": sharding}, verify=True, **kw)
            _assert_shards(out["w"], reference["w"], sharding)


@check
def get_slice_with_a_sharding(tmp: str) -> None:
    """get_slice(name, sharding=s)[index]: a jax.Array of tensor[index] laid out with s,
    each device's block read as one box, on every route; the handle's own sharding= is
    for whole tensors."""
    t = np.arange(64 * 48, dtype=np.float32).reshape(64, 48)
    path = _file(tmp, "slice.safetensors", {"t": t, "h": _model()["h"]})
    ref = _reference(path)
    m2 = NamedSharding(_mesh(), P("x", "y"))
    cases = [
        ("t", (slice(8, 40), slice(None, None, -2)), m2),
        ("t", (slice(None, None, -1), slice(1, None, 2)), m2),
        ("t", (None, slice(3, 35)), NamedSharding(_mesh(), P(None, "x", "y"))),
        ("t", (5,), NamedSharding(_mesh(), P(("x", "y")))),
        ("t", (slice(0, 64, 3), Ellipsis), NamedSharding(_mesh(), P(None, "y"))),
        ("t", (slice(0, 64), slice(10, 12)), NamedSharding(_mesh(), P("x"))),
        ("h", (slice(None), slice(0, 32)), m2),
    ]
    for src, kw in _routes(path, tmp).values():
        with sc.safe_open(src, "jax", sharding={"t": m2}, **kw) as f:
            for name, index, sharding in cases:
                got = f.get_slice(name, sharding=sharding)[index]
                _assert_shards(got, ref[name][index], sharding)
            # the handle's own sharding= is for whole tensors: a plain slice is one array
            plain = f.get_slice("t")[1:3]
            np.testing.assert_array_equal(np.asarray(plain), t[1:3])
            try:
                f.get_slice("t", sharding=m2)[5]  # 1-D result, 2-D sharding
            except sc.SafecodecError as exc:
                assert "cannot be laid out" in str(exc), exc
            else:
                raise AssertionError("a sharding of the wrong rank was accepted")
    # a sharded checkpoint: the slice is read from its shard, the same way
    ckpt = os.path.join(tmp, "ckpt")
    os.makedirs(ckpt)
    sc.save_file({"t": t, "h": _model()["h"]}, f"{ckpt}/model.safetensors",
                 max_shard_size=4096)
    with sc.safe_open(ckpt, "jax", backend="pread") as f:
        assert len(f.shard_files()) == 2, f.shard_files()
        for name, index, sharding in cases:
            _assert_shards(f.get_slice(name, sharding=sharding)[index], ref[name][index],
                           sharding)
    # positioned reads count one box per distinct block: 8 devices, 8 blocks, exact bytes
    with sc.safe_open(path, "jax", backend="pread") as f:
        before = dict(f.stats)
        got = f.get_slice("t", sharding=m2)[8:40, 0:48]
        assert f.stats["bytes_read"] - before["bytes_read"] == 32 * 48 * 4, f.stats
        assert f.stats["requests"] - before["requests"] <= 8 * 8, f.stats
    _assert_shards(got, t[8:40], m2)


def main() -> None:
    out_path, tmp = sys.argv[1], sys.argv[2]
    assert jax.device_count() == 8, jax.devices()
    results: dict[str, str] = {}
    fast = _jax_put.placement()
    for mode, put in (("internal", fast), ("public", _jax_put.PublicPut())):
        _jax_put.PUT = put
        for name, fn in CHECKS.items():
            key = f"{name}[{mode}]"
            if mode == "internal" and not isinstance(fast, _jax_put.InternalPut):
                results[key] = "skip: the internal placement path failed its self-check"
                continue
            d = os.path.join(tmp, key)
            os.makedirs(d)
            try:
                fn(d)
                results[key] = "ok"
            except BaseException:  # report, keep going: each check is its own test
                results[key] = traceback.format_exc()
    with open(out_path, "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main()
