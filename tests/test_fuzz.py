"""Bounded fuzzing in the test suite: Hypothesis mutations of valid files, and replay of the
corpus that coverage-guided fuzzing (tests/fuzz/fuzz_reader.py) kept.

The property: whatever the bytes, safecodec raises nothing but SafecodecError subclasses,
through every entry point (bytes, mapped file, plain-read file), and agrees with the
reference wheel on accept/reject and on the tensors (documented deviations aside).
"""

from __future__ import annotations

import io
import json
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import safecodec as sc

CORPUS = pathlib.Path(__file__).parent / "fuzz" / "corpus"
BASE_FILES = [
    sc.save({"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.int8(-3),
             "c": np.zeros((0, 2), np.float16)}, {"k": "v"}, alignment=8),
    sc.save({"w": np.ones((2, 2, 2), np.uint16), "x": np.array([True, False])}),
]


def _exercise(source) -> dict | None:
    """Every read path; returns name -> (code, shape, bytes) or None when rejected."""
    try:
        with sc.safe_open(source, unpack=False) as f:
            out = {}
            for name in f.offset_keys():
                arr = f.get_tensor(name)
                info = f.header.tensors[name]
                out[name] = (info.dtype.code, list(info.shape),
                             np.ascontiguousarray(arr).view(np.uint8).tobytes())
                if info.shape and not info.dtype.packed:
                    s = f.get_slice(name)
                    s[::-1]
                    s[..., :1]
            return out
    except sc.SafecodecError:
        return None


def _oracle(data: bytes) -> dict | None:
    safetensors = pytest.importorskip("safetensors", reason="reference wheel not installed")
    try:
        return {n: (d["dtype"], list(d["shape"]), bytes(d["data"]))
                for n, d in safetensors.deserialize(data)}
    except Exception:  # the wheel's SafetensorError; any rejection counts as a verdict
        return None


def _is_deviation(data: bytes) -> bool:
    if b"\\u0000" in data:
        return True
    try:
        n = int.from_bytes(data[:8], "little")
        names = [k for k, _ in json.loads(data[8 : 8 + n], object_pairs_hook=lambda p: p)]
        return len(names) != len(set(names))
    except Exception:  # not even JSON: no deviation possible
        return False


mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("set"), st.integers(0, 10_000), st.integers(0, 255)),
)


def _mutate(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in ops:
        if not buf:
            break
        pos %= len(buf)
        if kind == "flip":
            buf[pos] ^= 1 << arg
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf.insert(pos, arg)
        elif kind == "delete":
            del buf[pos]
        else:
            buf[pos] = arg
    return bytes(buf)


@settings(max_examples=300)
@given(base=st.sampled_from(BASE_FILES), ops=st.lists(mutations, min_size=1, max_size=4))
def test_mutated_files_only_raise_safecodec_errors_and_agree_with_the_reference(base, ops):
    data = _mutate(base, ops)
    ours = _exercise(data)
    assert _exercise(io.BytesIO(data)) == ours  # plain-read path agrees with the view path
    ref = _oracle(data)
    if ours != ref:
        assert _is_deviation(data), (ours, ref, data[:120])


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_random_bytes(data):
    assert _exercise(data) is None or isinstance(_exercise(data), dict)
    try:
        sc.read_header(data)
    except sc.SafecodecError:
        pass


@settings(max_examples=150)
@given(header=st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**65) | st.floats() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "x"]),
                      children, max_size=4),
    max_leaves=12,
), pad=st.integers(0, 16))
def test_random_json_headers(header, pad):
    text = json.dumps({"t": header}).encode() + b" " * pad
    data = len(text).to_bytes(8, "little") + text + b"\x00" * pad
    ours = _exercise(data)
    ref = _oracle(data)
    if ours != ref:
        assert _is_deviation(data), (ours, ref, data[:120])


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*")), ids=lambda p: p.name[:16])
def test_corpus_regressions(path, tmp_path):
    data = path.read_bytes()
    ours = _exercise(data)
    file_copy = tmp_path / "f.safetensors"
    file_copy.write_bytes(data)
    assert _exercise(str(file_copy)) == ours
    ref = _oracle(data)
    if ours != ref:
        assert _is_deviation(data), (ours, ref)
