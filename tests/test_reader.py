"""The reader: sources, views vs copies, lifetime, the lazy handle, slicing, byte order.

These tests never import the reference wheel (they also run with it blocked).
"""

from __future__ import annotations

import gc
import io
import os
import pathlib

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import safecodec as sc
from safecodec import _dtypes, _source
from safecodec._dtypes import DTYPES

BYTE_SHAPES = [(), (0,), (3,), (2, 3), (4, 0, 2), (1, 1, 1, 4), (5, 7)]
PACKED_SHAPES = [(0,), (4,), (2, 4), (3, 0), (8, 12)]  # element counts divisible by 4


def _sample(code: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Deterministic values of the code's dtype, covering the bit patterns."""
    dt = DTYPES[code].numpy
    count = int(np.prod(shape, dtype=np.int64))
    rng = np.random.default_rng(seed)
    if DTYPES[code].packed:
        bits = rng.integers(0, 1 << DTYPES[code].bits, size=count, dtype=np.uint8)
        return bits.view(dt).reshape(shape)
    raw = rng.integers(0, 256, size=count * dt.itemsize, dtype=np.uint8)
    arr = raw.view(dt).reshape(shape)
    if code == "BOOL":
        arr = (raw % 2).astype(bool).reshape(shape)
    return arr


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality (NaNs included)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    )


def _all_dtypes_tensors() -> dict[str, np.ndarray]:
    out = {}
    for code, row in DTYPES.items():
        for i, shape in enumerate(PACKED_SHAPES if row.packed else BYTE_SHAPES):
            out[f"{code}/{i}"] = _sample(code, shape, seed=i)
    return out


@pytest.fixture(scope="module")
def corpus() -> dict[str, np.ndarray]:
    return _all_dtypes_tensors()


@pytest.mark.parametrize("alignment", [8, 64])
def test_round_trip_every_dtype_and_shape(corpus, alignment):
    data = sc.save(corpus, {"k": "v"}, alignment=alignment)
    back = sc.load(data)
    assert set(back) == set(corpus)
    for name, arr in corpus.items():
        assert _same(back[name], arr), name


def _sources(data: bytes, path: pathlib.Path):
    path.write_bytes(data)
    yield "bytes", data
    yield "bytearray", bytearray(data)
    yield "memoryview", memoryview(data)
    yield "str path", str(path)
    yield "PathLike", path
    yield "BytesIO", io.BytesIO(data)
    with open(path, "rb") as f:
        yield "file object", f


def test_every_source_kind_gives_the_same_tensors(corpus, tmp_path):
    data = sc.save(corpus)
    for label, source in _sources(data, tmp_path / "c.safetensors"):
        with sc.safe_open(source) as f:
            got = f.get_tensors()
        assert set(got) == set(corpus), label
        for name, arr in corpus.items():
            assert _same(got[name], arr), (label, name)


def test_without_mmap_everything_reads_through_plain_reads(corpus, tmp_path, restore_flags):
    path = tmp_path / "c.safetensors"
    sc.save_file(corpus, path)
    _source.MMAP_AVAILABLE = False
    with sc.safe_open(path) as f:
        assert isinstance(f.reader.source, _source.FileSource)
        got = f.get_tensors()
        assert _same(f.get_slice("F32/6")[1:3, ::2], corpus["F32/6"][1:3, ::2])
    for name, arr in corpus.items():
        assert _same(got[name], arr), name
    loaded = sc.load_file(path)
    assert _same(loaded["I64/5"], corpus["I64/5"])


def test_load_file_views_are_copy_on_write(tmp_path):
    path = tmp_path / "w.safetensors"
    original = np.arange(16, dtype=np.float32)
    sc.save_file({"w": original}, path)
    before = path.read_bytes()
    first = sc.load_file(path)["w"]
    assert first.flags.writeable
    first[:] = -1  # writes to private pages only
    assert path.read_bytes() == before
    second = sc.load_file(path)["w"]
    assert np.array_equal(second, original)


def test_load_file_copy_true_is_independent_of_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    sc.save_file({"w": np.arange(16, dtype=np.int32)}, path)
    arr = sc.load_file(path, copy=True)["w"]
    assert arr.flags.owndata or arr.base is None or isinstance(arr.base, np.ndarray)
    # Overwrite the file's data in place: the copied array must not change.
    with open(path, "r+b") as f:
        f.seek(-64, os.SEEK_END)
        f.write(b"\xff" * 64)
    assert np.array_equal(arr, np.arange(16, dtype=np.int32))


def test_arrays_outlive_handle_gc_deletion_and_replacement(tmp_path):
    path = tmp_path / "m.safetensors"
    values = np.arange(1024, dtype=np.float64).reshape(32, 32)
    sc.save_file({"m": values}, path)
    with sc.safe_open(path) as f:
        kept = f.get_tensor("m")
        sliced = f.get_slice("m")[3:5]
    assert f.closed
    del f
    gc.collect()
    assert np.array_equal(kept, values)
    os.unlink(path)
    gc.collect()
    assert np.array_equal(kept, values) and np.array_equal(sliced, values[3:5])
    loaded = sc.load_file(_save(tmp_path / "r.safetensors", values))["m"]
    sc.save_file({"m": np.zeros_like(values)}, tmp_path / "r.safetensors")  # atomic replace
    assert np.array_equal(loaded, values)
    assert not sc.load_file(tmp_path / "r.safetensors")["m"].any()


def _save(path: pathlib.Path, values: np.ndarray) -> pathlib.Path:
    sc.save_file({"m": values}, path)
    return path


def test_bytes_views_are_read_only_and_bytearray_views_share_memory():
    data = sc.save({"x": np.arange(4, dtype=np.int16)})
    assert not sc.load(data)["x"].flags.writeable
    buf = bytearray(data)
    x = sc.load(buf)["x"]
    assert np.shares_memory(x, np.frombuffer(buf, np.uint8))
    copied = sc.load(buf, copy=True)["x"]
    assert not np.shares_memory(copied, np.frombuffer(buf, np.uint8))


def test_handle_api(tmp_path):
    tensors = {"b": np.ones(2, np.float32), "a": np.zeros((2, 2), np.int64), "c": np.array(1.5)}
    data = sc.save(tensors, {"format": "np"}, alignment=8)
    with sc.safe_open(data) as f:
        assert f.keys() == ["a", "b", "c"]
        assert f.offset_keys() == ["a", "c", "b"]  # reference order: I64, F64, F32
        assert f.metadata() == {"format": "np"}
        s = f.get_slice("a")
        assert s.get_shape() == [2, 2] and s.get_dtype() == "I64"
        assert "a" in f and len(f) == 3 and list(f) == ["a", "b", "c"]
        assert f.header.tensors["b"].dtype.code == "F32"
    with sc.safe_open(sc.save(tensors)) as f:
        assert f.metadata() is None
    with pytest.raises(sc.ClosedHandleError, match="closed"):
        f.get_tensor("a")
    with pytest.raises(sc.ClosedHandleError):
        f.keys()


def test_missing_name_is_a_key_error_with_close_matches():
    data = sc.save({"layer.0.weight": np.ones(1), "layer.1.weight": np.ones(1)})
    with sc.safe_open(data) as f:
        with pytest.raises(sc.TensorNotFoundError, match=r"did you mean 'layer\.0\.weight'"):
            f.get_tensor("layer.0.weigth")
        with pytest.raises(KeyError):
            f.get_slice("nope")


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(sc.SafecodecError, match="bytes-like"):
        sc.load("not bytes")  # type: ignore[arg-type]
    with pytest.raises(sc.SafecodecError, match="unsupported framework"):
        sc.safe_open(sc.save({}), framework="torch")
    with pytest.raises(sc.SafecodecError, match="expected a path"):
        sc.safe_open(12345)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(sc.HeaderError, match="header too small"):
        sc.load_file(empty)
    with pytest.raises(FileNotFoundError):
        sc.load_file(tmp_path / "missing.safetensors")


def test_file_truncated_after_open_is_reported_not_zero_filled(tmp_path, restore_flags):
    path = tmp_path / "t.safetensors"
    sc.save_file({"t": np.arange(1000, dtype=np.float32)}, path)
    _source.MMAP_AVAILABLE = False
    with sc.safe_open(path) as f:
        os.truncate(path, f.header.data_start + 100)
        with pytest.raises(sc.RemoteIOError, match="truncated"):
            f.get_tensor("t")


def test_forced_big_endian_host_path_gives_native_values(corpus, restore_flags):
    data = sc.save(corpus)
    _dtypes.HOST_IS_LITTLE_ENDIAN = False
    back = sc.load(data)
    for name, arr in corpus.items():
        got = back[name]
        assert got.dtype.isnative
        assert _same(got, arr), name
        if arr.dtype.itemsize > 1 and arr.size:
            # the swapping path copies: it must not alias the source bytes
            assert not np.shares_memory(got, np.frombuffer(data, np.uint8)), name
    with sc.safe_open(data) as f:
        assert _same(f.get_slice("BF16/6")[::2, 1:], corpus["BF16/6"][::2, 1:])


def test_packed_bit_order_is_low_bits_first():
    f4 = np.array([0.5, 1.0, 6.0, -0.0], dtype=ml_dtypes.float4_e2m1fn)
    codes = f4.view(np.uint8)  # 0x1, 0x2, 0x7, 0x8
    data = sc.save({"x": f4}, alignment=8)
    payload = data[-2:]
    assert payload == bytes([codes[0] | codes[1] << 4, codes[2] | codes[3] << 4])
    f6 = np.array([1.0, 2.0, 3.0, 0.5], dtype=ml_dtypes.float6_e2m3fn)
    v = f6.view(np.uint8).astype(np.uint32)
    group = int(v[0] | v[1] << 6 | v[2] << 12 | v[3] << 18)
    assert sc.save({"y": f6}, alignment=8)[-3:] == group.to_bytes(3, "little")
    raw = sc.load(data, unpack=False)["x"]
    assert raw.dtype == np.uint8 and raw.tolist() == list(payload)
    assert _same(sc.load(data)["x"], f4)


def test_packed_odd_counts_are_rejected_on_write():
    with pytest.raises(sc.SafecodecError, match="whole number of bytes"):
        sc.save({"x": np.zeros(3, ml_dtypes.float4_e2m1fn)})
    with pytest.raises(sc.SafecodecError, match="whole number of bytes"):
        sc.save({"y": np.zeros(6, ml_dtypes.float6_e3m2fn)})


# ----------------------------------------------------------------------------- slicing

@st.composite
def shapes_and_indices(draw):
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.integers(0, 6)) for _ in range(ndim))
    items = []
    for size in shape:
        kind = draw(st.sampled_from(["int", "slice", "slice", "full"]))
        if kind == "int" and size > 0:
            items.append(draw(st.integers(-size, size - 1)))
        elif kind == "full":
            items.append(slice(None))
        else:
            start = draw(st.none() | st.integers(-8, 8))
            stop = draw(st.none() | st.integers(-8, 8))
            step = draw(st.none() | st.integers(-3, 3).filter(lambda s: s != 0))
            items.append(slice(start, stop, step))
    # Optionally replace a run of trailing/leading entries by an Ellipsis, add a None.
    if items and draw(st.booleans()):
        cut = draw(st.integers(0, len(items)))
        items = [*items[:cut], Ellipsis]
    if draw(st.booleans()):
        items.insert(draw(st.integers(0, len(items))), None)
    index = tuple(items) if len(items) != 1 or draw(st.booleans()) else items[0]
    return shape, index


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
@pytest.mark.parametrize("code", ["F32", "U8", "BF16", "F4", "F6_E3M2"])
@settings(max_examples=60)
@given(case=shapes_and_indices())
def test_slices_match_numpy_basic_indexing(code, mapped, case):
    shape, index = case
    if DTYPES[code].packed and int(np.prod(shape, dtype=np.int64)) % 4:
        shape = (*shape[:-1], 4) if shape else (4,)
        index = tuple(i if not isinstance(i, int) or i is None else 0 for i in
                      (index if isinstance(index, tuple) else (index,)))
    full = _sample(code, shape, seed=len(shape))
    data = sc.save({"t": full})
    source = data if mapped else io.BytesIO(data)
    try:
        expected = full[index]
    except IndexError:
        with sc.safe_open(source) as f, pytest.raises(sc.SliceIndexError):
            f.get_slice("t")[index]
        return
    with sc.safe_open(source) as f:
        got = f.get_slice("t")[index]
    assert _same(np.asarray(got), np.asarray(expected)), (shape, index)


def test_slice_index_errors():
    data = sc.save({"t": np.zeros((3, 4), np.float32)})
    with sc.safe_open(data) as f:
        s = f.get_slice("t")
        with pytest.raises(sc.SliceIndexError, match="out of bounds for axis 1 with size 4"):
            s[0, 4]
        with pytest.raises(IndexError):
            s[-4]
        with pytest.raises(sc.SliceIndexError, match="too many indices"):
            s[0, 0, 0]
        with pytest.raises(sc.SliceIndexError, match="basic indexing"):
            s[[0, 1]]
        with pytest.raises(sc.SliceIndexError, match="basic indexing"):
            s[np.array([True, False, True])]
        with pytest.raises(sc.SliceIndexError, match="single ellipsis"):
            s[..., ...]


def test_slices_read_only_the_bytes_they_need(tmp_path, restore_flags):
    rows, cols = 64, 256
    full = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    path = tmp_path / "s.safetensors"
    sc.save_file({"t": full, "other": np.ones(10_000, np.float32)}, path)
    _source.MMAP_AVAILABLE = False
    with sc.safe_open(path) as f:
        before = f.stats["bytes_read"]
        got = f.get_slice("t")[10:14]
        assert f.stats["bytes_read"] - before == 4 * cols * 4
        assert np.array_equal(got, full[10:14])
        before = f.stats["bytes_read"]
        col = f.get_slice("t")[:, 5]
        assert f.stats["bytes_read"] - before == rows * 4
        assert np.array_equal(col, full[:, 5])
        before = f.stats["bytes_read"]
        f.get_slice("t")[2]
        assert f.stats["bytes_read"] - before == cols * 4
