"""Hostile inputs: whatever the bytes, the reader raises nothing but SafecodecError
subclasses (no IndexError, KeyError, UnicodeError, RecursionError, struct.error,
OverflowError or MemoryError), through every entry point: ``load``, ``safe_open``,
``read_header``, from memory, from a file path and from a file object without a file
descriptor. A lying header is refused before anything is allocated for it.

These tests do not use the reference wheel (they also run with it blocked).
"""

from __future__ import annotations

import io
import random
import re
import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import safecodec as sc
from _crafted import blob
from safecodec import HeaderError, OffsetError, SafecodecError

#: Every test here runs on both header paths (see conftest.header_paths).
pytestmark = pytest.mark.usefixtures("header_paths")


ENTRY = '"dtype":"U8","shape":[1],"data_offsets":[0,1]'
GOOD = sc.save({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, {"k": "v"}, alignment=8)


def _random_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _random_after_prefix(seed: int, n: int, size: int) -> bytes:
    return struct.pack("<Q", n) + _random_bytes(seed, size)


# (name, bytes, error class, message regex)
HOSTILE: list[tuple[str, bytes, type[SafecodecError], str]] = [
    ("empty", b"", HeaderError, "header too small"),
    ("one byte", b"\x00", HeaderError, "header too small.*got 1 bytes"),
    ("8 bytes claiming a 100 MB header", struct.pack("<Q", 100_000_000), HeaderError,
     "invalid header length: header claims 100000000 bytes"),
    ("8 bytes claiming 2**64-1", b"\xff" * 8, HeaderError, "header too large"),
    ("8 bytes claiming 2**63", struct.pack("<Q", 2**63), HeaderError, "header too large"),
    ("N = 0", struct.pack("<Q", 0), HeaderError, "invalid JSON"),
    ("lying huge shape, tiny file",
     blob('{"a":{"dtype":"F64","shape":[1000000,1000000,1000],"data_offsets":[0,8000000000000000]}}'),
     OffsetError, r"truncated file: the header and tensors need 8000000000000\d+ bytes, the file has \d+"),
    ("lying huge shape, offsets too short",
     blob('{"a":{"dtype":"F64","shape":[1000000,1000000],"data_offsets":[0,8]}}', b"x" * 8),
     OffsetError, "invalid shape, data type, or offset.*needs 8000000000000 bytes"),
    ("shape overflowing u64", blob('{"a":{"dtype":"F64","shape":[4294967296,4294967296],'
                                   '"data_offsets":[0,0]}}'), OffsetError, "overflow"),
    ("shape of 2**64", blob('{"a":{"dtype":"U8","shape":[18446744073709551616],'
                            '"data_offsets":[0,0]}}'), HeaderError, "shape of tensor 'a'"),
    ("offsets near 2**64", blob('{"a":{"dtype":"U8","shape":[1],'
                                '"data_offsets":[18446744073709551614,18446744073709551615]}}'),
     OffsetError, "invalid offset"),
    ("negative offsets", blob('{"a":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}}'),
     HeaderError, "data_offsets of tensor 'a'"),
    ("deep nesting 100k, whole header", blob("[" * 100_000 + "]" * 100_000), HeaderError,
     "nesting deeper|must be a JSON object"),
    ("deep nesting 100k, unclosed", blob("[" * 100_000), HeaderError, "invalid JSON"),
    ("deep nesting 100k objects", blob('{"a":' * 100_000 + "1" + "}" * 100_000), HeaderError,
     "invalid JSON"),
    ("deep nesting 100k in an ignored field",
     blob('{"a":{%s,"x":%s}}' % (ENTRY, "[" * 100_000 + "]" * 100_000), b"z"), HeaderError,
     "nesting deeper than 127"),
    ("deep nesting 100k in metadata", blob('{"__metadata__":{"k":%s}}' % ("[" * 100_000 + "]" * 100_000)),
     HeaderError, "invalid JSON"),
    ("5000-digit shape", blob('{"a":{"dtype":"U8","shape":[%s],"data_offsets":[0,1]}}' % ("7" * 5000),
                              b"z"), HeaderError, "number out of range"),
    ("5000-digit offset", blob('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,%s]}}' % ("7" * 5000),
                               b"z"), HeaderError, "number out of range"),
    ("million-digit ignored integer", blob('{"a":{%s,"x":%s}}' % (ENTRY, "1" * 1_000_000), b"z"),
     HeaderError, "number out of range"),
    ("huge exponent", blob('{"a":{%s,"x":1e99999999999999999999}}' % ENTRY, b"z"), HeaderError,
     "number out of range"),
    ("1e400 as a shape", blob('{"a":{"dtype":"U8","shape":[1e400],"data_offsets":[0,1]}}', b"z"),
     HeaderError, "number out of range"),
    ("invalid UTF-8 everywhere", blob(b"\xff" * 64), HeaderError, "invalid UTF-8"),
    ("lone surrogate escape", blob('{"\\udead":{%s}}' % ENTRY, b"z"), HeaderError, "lone surrogate"),
    ("NUL escape in a name", blob('{"\\u0000":{%s}}' % ENTRY, b"z"), HeaderError, "NUL"),
    ("header of spaces", blob(" " * 4096), HeaderError, "invalid JSON"),
    ("header of NULs", blob("\x00" * 4096), HeaderError, "invalid JSON"),
    ("65 dimensions", blob('{"a":{"dtype":"U8","shape":[%s],"data_offsets":[0,1]}}'
                           % ",".join(["1"] * 65), b"z"), OffsetError,
     "has 65 dimensions: valid in the format, but NumPy cannot"),
    ("empty tensor with a 2**63 dimension",
     blob('{"a":{"dtype":"F32","shape":[0,9223372036854775808],"data_offsets":[0,0]}}'),
     OffsetError, "NumPy cannot represent a dimension"),
    ("dtype is an object", blob('{"a":{"dtype":{"x":1},"shape":[1],"data_offsets":[0,1]}}', b"z"),
     HeaderError, "dtype of tensor 'a' must be a string"),
    ("shape of strings", blob('{"a":{"dtype":"U8","shape":["1"],"data_offsets":[0,1]}}', b"z"),
     HeaderError, "shape of tensor 'a'"),
    ("truncated good file", GOOD[:-1], OffsetError,
     f"truncated file: the header and tensors need {len(GOOD)} bytes, the file has "
     f"{len(GOOD) - 1} \\(1 missing"),
    ("truncated inside the header", GOOD[:20], HeaderError, "invalid header length"),
    ("good file plus garbage", GOOD + b"\x00" * 7, OffsetError,
     f"file not fully covered: .*account for {len(GOOD)} bytes, the file has {len(GOOD) + 7} "
     "\\(7 bytes after the last tensor\\)"),
    *[(f"random bytes {i}", _random_bytes(i, size), HeaderError, "header")
      for i, size in enumerate([8, 9, 64, 4096])],
    *[(f"random header {i}", _random_after_prefix(i, 256, 300), HeaderError, "invalid")
      for i in range(4)],
]

# Valid files (the reference accepts them) whose tensors NumPy cannot represent: the
# header is read, only materialising the tensor fails.
NUMPY_LIMITS = {"65 dimensions", "empty tensor with a 2**63 dimension"}

# Every way in: (label, function taking the bytes and the tmp_path).
ENTRY_POINTS: list[tuple[str, Callable[[bytes, Any], Any]]] = [
    ("load", lambda data, _: sc.load(data)),
    ("load copy", lambda data, _: sc.load(data, copy=True)),
    ("read_header bytes", lambda data, _: sc.read_header(data)),
    ("safe_open bytes", lambda data, _: _open_all(data)),
    ("read_header memoryview", lambda data, _: sc.read_header(memoryview(bytearray(data)))),
    ("file object without fileno", lambda data, _: _open_all(io.BytesIO(data))),
    ("load_file path", lambda data, tmp: sc.load_file(_write(tmp, data))),
    ("read_header path", lambda data, tmp: sc.read_header(_write(tmp, data))),
    ("safe_open path", lambda data, tmp: _open_all(_write(tmp, data))),
]


def _write(tmp_path: Any, data: bytes) -> str:
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(data)
    return str(path)


def _open_all(source: Any) -> None:
    with sc.safe_open(source) as f:
        names = f.keys()
        for name in names:
            f.get_tensor(name)
            f.get_slice(name)[...]


@pytest.mark.parametrize("how, call", ENTRY_POINTS, ids=[e[0] for e in ENTRY_POINTS])
@pytest.mark.parametrize("label, data, cls, match", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_raises_only_safecodec_errors(label, data, cls, match, how, call, tmp_path):
    if label in NUMPY_LIMITS and how.startswith("read_header"):
        assert len(call(data, tmp_path).tensors) == 1
        return
    try:
        call(data, tmp_path)
    except SafecodecError as exc:
        assert isinstance(exc, cls), f"{label} via {how}: {type(exc).__name__}: {exc}"
        assert exc.__class__.__module__.startswith("safecodec")
        assert re.search(match, str(exc)), f"{label} via {how}: {exc}"
    else:
        pytest.fail(f"{label} via {how}: accepted")


def test_hostile_names_are_unique() -> None:
    names = [h[0] for h in HOSTILE]
    assert len(names) == len(set(names))


def test_lying_header_is_refused_before_allocation() -> None:
    """A header promising 8 PB of F64 in a tiny file: refused without allocating more
    than a few kilobytes."""
    data = HOSTILE[6][1]
    tracemalloc.start()
    try:
        with pytest.raises(OffsetError):
            sc.load(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_seeded_random_mutations_raise_only_safecodec_errors() -> None:
    """Many cheap mutations of a good file, through ``load``: accepted, or a
    SafecodecError, nothing else."""
    rng = random.Random(1234)
    base = bytearray(GOOD)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(400):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data))
            data[at] = rng.randrange(256)
        try:
            sc.load(bytes(data))
            outcomes["ok"] += 1
        except SafecodecError:
            outcomes["error"] += 1
    assert outcomes["ok"] and outcomes["error"]  # both outcomes happen: the test can fail
