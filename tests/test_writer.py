"""The writer: input kinds, byte order and memory layout, atomic replacement, streaming.

These tests never import the reference wheel (they also run with it blocked).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

import safecodec as sc
from safecodec import _sink, _writer


def test_accepts_anything_numpy_asarray_accepts():
    tensors = {
        "np_scalar": np.float32(2.5),
        "py_float": 1.5,
        "py_int": 7,
        "py_bool": True,
        "nested_list": [[1, 2], [3, 4]],
        "bf16_scalar": ml_dtypes.bfloat16(3.0),
    }
    back = sc.load(sc.save(tensors))
    assert back["np_scalar"].shape == () and back["np_scalar"].dtype == np.float32
    assert back["py_float"].dtype == np.float64 and back["py_float"] == 1.5
    assert back["py_int"].dtype == np.int64 and back["py_int"] == 7
    assert back["py_bool"].dtype == np.bool_ and bool(back["py_bool"])
    assert back["nested_list"].tolist() == [[1, 2], [3, 4]]
    assert back["bf16_scalar"].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda a: np.asfortranarray(a), id="fortran"),
        pytest.param(lambda a: a.T, id="transposed"),
        pytest.param(lambda a: a[::2, 1::3], id="strided"),
        pytest.param(lambda a: a.astype(a.dtype.newbyteorder(">")), id="big-endian"),
        pytest.param(lambda a: np.asfortranarray(a.astype(">i8")), id="big-endian-fortran"),
    ],
)
def test_layout_and_byte_order_of_inputs_do_not_change_values(make):
    base = np.arange(6 * 9, dtype=np.int64).reshape(6, 9)
    value = make(base)
    back = sc.load(sc.save({"x": value}))["x"]
    assert back.dtype == np.dtype("<i8")
    assert np.array_equal(back, value)


def test_big_endian_bytes_on_disk_are_little_endian():
    data = sc.save({"x": np.array([1], dtype=">u4")}, alignment=8)
    assert data[-4:] == b"\x01\x00\x00\x00"


def test_empty_metadata_without_tensors():
    data = sc.save({}, metadata={}, alignment=8)
    assert data[8:].rstrip(b" ") == b'{"__metadata__":{}}'
    assert sc.load(data) == {}
    assert sc.read_header(data).metadata == {}


def test_save_equals_save_file(tmp_path):
    tensors = {"a": np.arange(10, dtype=np.float16), "b": np.ones((3, 3), np.uint8)}
    path = tmp_path / "x.safetensors"
    sc.save_file(tensors, path, {"k": "v"})
    assert path.read_bytes() == sc.save(tensors, {"k": "v"})


def test_save_file_is_atomic_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "model.safetensors"
    sc.save_file({"w": np.ones(4)}, path)
    before = path.read_bytes()

    class Exploding:
        dtype = np.dtype(np.float32)
        shape = (4,)

        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        sc.save_file({"a": np.zeros(1000), "z": Exploding()}, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_save_file_permissions_follow_umask(tmp_path):
    path = tmp_path / "p.safetensors"
    old = os.umask(0o022)
    try:
        sc.save_file({"w": np.ones(1)}, path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_stale_temporaries_of_dead_writers_are_cleaned(tmp_path):
    path = tmp_path / "m.safetensors"
    # A writer killed mid-write leaves its temporary file behind.
    script = textwrap.dedent(
        f"""
        import os, safecodec._sink as sink
        out = sink.LocalAtomicFile({str(path)!r})
        out.write(b"partial" * 10_000)
        os._exit(9)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=False, cwd=os.getcwd())
    leftovers = [n for n in os.listdir(tmp_path) if n.endswith(_sink.TMP_SUFFIX)]
    assert len(leftovers) == 1 and not path.exists()
    sc.save_file({"w": np.ones(2)}, path)
    assert os.listdir(tmp_path) == ["m.safetensors"]
    assert np.array_equal(sc.load_file(path)["w"], np.ones(2))


def test_writer_rejections():
    with pytest.raises(sc.HeaderError, match="NUL"):
        sc.save({"a\x00b": np.ones(1)})
    with pytest.raises(sc.HeaderError, match="__metadata__"):
        sc.save({"__metadata__": np.ones(1)})
    with pytest.raises(sc.HeaderError, match="str to str"):
        sc.save({"a": np.ones(1)}, metadata={"k": 1})  # type: ignore[dict-item]
    with pytest.raises(sc.HeaderError, match="NUL"):
        sc.save({"a": np.ones(1)}, metadata={"k": "v\x00"})
    with pytest.raises(sc.HeaderError, match="names must be str"):
        sc.save({1: np.ones(1)})  # type: ignore[dict-item]
    with pytest.raises(sc.DtypeError, match=r"'c'.*complex128.*complex64"):
        sc.save({"c": np.ones(2, np.complex128)})
    with pytest.raises(sc.DtypeError, match=r"'i4'.*int4.*int8"):
        sc.save({"i4": np.ones(2, ml_dtypes.int4)})
    with pytest.raises(sc.DtypeError, match=r"'o'.*object"):
        sc.save({"o": np.array([object()])})
    with pytest.raises(sc.SafecodecError, match="mapping"):
        sc.save([("a", np.ones(1))])  # type: ignore[arg-type]
    with pytest.raises(sc.HeaderError, match="alignment"):
        sc.save({"a": np.ones(1)}, alignment=48)


def test_zero_copy_layout_properties():
    tensors = {
        "odd": np.ones(3, np.float32),  # 12 bytes: not a multiple of 64
        "big": np.ones(64, np.float32),  # 256 bytes
        "bf": np.ones(32, ml_dtypes.bfloat16),  # 64 bytes
        "bytes": np.ones(7, np.uint8),
        "empty": np.ones((0, 3), np.float64),
    }
    data = sc.save(tensors, {"a": "b"})
    header = sc.read_header(data)
    assert header.data_start % 64 == 0
    for info in header.tensors.values():
        if info.nbytes % 64 == 0:
            assert (header.data_start + info.begin) % 64 == 0, info.name


def test_contiguous_arrays_are_streamed_without_a_copy(tmp_path):
    big = np.ones(8 << 20, dtype=np.float32)  # 32 MiB
    tracemalloc.start()
    try:
        sc.save_file({"big": big, "small": np.ones(3)}, tmp_path / "s.safetensors")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"peak {peak} bytes while saving a 32 MiB contiguous array"


def test_non_contiguous_arrays_copy_in_bounded_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(_writer, "WRITE_CHUNK", 1 << 20)
    arr = np.asfortranarray(np.ones((2048, 1024), np.float32))  # 8 MiB, not C order
    tracemalloc.start()
    try:
        sc.save_file({"f": arr}, tmp_path / "f.safetensors")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 << 20, f"peak {peak} bytes for 1 MiB pieces of an 8 MiB array"
    assert np.array_equal(sc.load_file(tmp_path / "f.safetensors")["f"], arr)


def test_header_size_limit_is_enforced_on_write(monkeypatch):
    from safecodec import _header

    monkeypatch.setattr(_header, "MAX_HEADER_SIZE", 1000)
    tensors = {f"tensor_with_a_long_name_{i:04d}": np.ones(1, np.uint8) for i in range(40)}
    with pytest.raises(sc.HeaderError, match="header too large"):
        sc.save(tensors)
