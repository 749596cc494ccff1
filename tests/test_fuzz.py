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

import _oracle
import safecodec as sc

#: Every test here runs on both header paths (see conftest.header_paths).
pytestmark = pytest.mark.usefixtures("header_paths")


def _framed(parts: tuple[bytes, bytes]) -> bytes:
    """A length prefix, then ``header``, then ``tail``."""
    header, tail = parts
    return len(header).to_bytes(8, "little") + header + tail


CORPUS = pathlib.Path(__file__).parent / "fuzz" / "corpus"
BASE_FILES = [
    sc.save({"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.int8(-3),
             "c": np.zeros((0, 2), np.float16)}, {"k": "v"}, alignment=8),
    sc.save({"w": np.ones((2, 2, 2), np.uint16), "x": np.array([True, False])}),
    # The documented deviations (the reference accepts, we reject), so that mutations keep
    # exercising the one excused direction: a repeated name (the reference keeps the last
    # entry, here of another dtype), and a NUL in a name.
    _framed((b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},'
             b'"a":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}}', b"\x01\xff")),
    _framed((b'{"a\\u0000":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"\x01\x02")),
]


Tensors = dict[str, tuple[str, tuple[int, ...], bytes]]


def _exercise(source) -> Tensors | sc.SafecodecError:
    """Every read path; returns name -> (code, shape, raw bytes), or the SafecodecError
    that rejected the bytes (any other exception fails the test)."""
    try:
        with sc.safe_open(source, unpack=False) as f:
            out = {}
            for name in f.offset_keys():
                arr = f.get_tensor(name)
                info = f.header.tensors[name]
                out[name] = (info.dtype.code, tuple(info.shape),
                             np.ascontiguousarray(arr).view(np.uint8).tobytes())
                if info.shape and not info.dtype.packed:
                    s = f.get_slice(name)
                    s[::-1]
                    s[..., :1]
            return out
    except sc.SafecodecError as exc:
        return exc


def _same(a: Tensors | sc.SafecodecError, b: Tensors | sc.SafecodecError) -> bool:
    """Two results of :func:`_exercise` agree: same tensors, or both rejected the same way."""
    if isinstance(a, dict) or isinstance(b, dict):
        return a == b
    return (type(a), str(a)) == (type(b), str(b))


#: Our messages for the documented deviations (docs/format.md): the reference accepts these
#: files, safecodec rejects them on purpose (a duplicate name, a NUL, a shape NumPy cannot
#: hold), the same excuses as test_conformance.py's ``_same_verdict``.
DELIBERATE = ("format forbids", "safecodec rejects", "NumPy cannot represent")


def _agrees_with_reference(data: bytes, ours: Tensors | sc.SafecodecError) -> None:
    """The verdict matches the reference wheel's. The only disagreement allowed is one way:
    the reference accepts, safecodec rejects with a documented-deviation message."""
    verdict = _oracle.deserialize(data)
    if isinstance(ours, dict):
        assert verdict.ok, f"reference rejects ({verdict.error}); safecodec accepts {data[:120]!r}"
        assert ours == verdict.tensors, data[:120]
    elif verdict.ok:
        assert any(m in str(ours) for m in DELIBERATE), (
            f"reference accepts; safecodec says {type(ours).__name__}: {ours}; {data[:120]!r}")
        assert _is_deviation(data) or "NumPy cannot represent" in str(ours), data[:120]


def _is_deviation(data: bytes) -> bool:
    """The bytes hold one of the documented deviations (NUL escape or a repeated key)."""
    if b"\\u0000" in data:
        return True
    n = int.from_bytes(data[:8], "little")
    try:
        pairs = json.loads(data[8 : 8 + n], object_pairs_hook=lambda p: p)
    except (ValueError, RecursionError):  # not even JSON (or not UTF-8): no deviation possible
        return False
    if not (isinstance(pairs, list) and all(isinstance(p, tuple) for p in pairs)):
        return False  # not an object
    names = [k for k, _ in pairs]
    return len(names) != len(set(names))


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


@pytest.mark.parametrize("base", BASE_FILES, ids=["f32-i8-f16", "u16-bool", "repeated-name", "nul"])
def test_base_files_agree_with_the_reference(base):
    """The seeds themselves, unmutated (the deviations must be rejected, nothing else)."""
    _agrees_with_reference(base, _exercise(base))


@settings(max_examples=300)
@given(base=st.sampled_from(BASE_FILES), ops=st.lists(mutations, min_size=1, max_size=4))
def test_mutated_files_only_raise_safecodec_errors_and_agree_with_the_reference(base, ops):
    data = _mutate(base, ops)
    ours = _exercise(data)
    assert _same(_exercise(io.BytesIO(data)), ours)  # plain-read path agrees with the view path
    _agrees_with_reference(data, ours)


_HEADERISH = (
    st.binary(max_size=300)
    | st.text(' {}[]":,0123456789', max_size=40).map(str.encode)
    | st.sampled_from([b"{}", b' {"__metadata__":{}}\t',
                       b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}'])
)


@settings(max_examples=200)
@given(st.binary(max_size=300) | st.tuples(_HEADERISH, st.binary(max_size=8)).map(_framed))
def test_random_bytes(data):
    """Any bytes (some with a consistent length prefix and a JSON-ish header, so that
    some are accepted): the same verdict as the reference, and read_header agrees."""
    ours = _exercise(data)
    _agrees_with_reference(data, ours)
    try:
        header = sc.read_header(data)
    except sc.SafecodecError as exc:
        assert not isinstance(ours, dict), f"read_header rejects what a load accepts: {exc}"
    else:
        if isinstance(ours, dict):
            assert list(header.tensors) == list(ours)


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
    _agrees_with_reference(data, _exercise(data))


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*")), ids=lambda p: p.name[:16])
def test_corpus_regressions(path, tmp_path):
    data = path.read_bytes()
    ours = _exercise(data)
    file_copy = tmp_path / "f.safetensors"
    file_copy.write_bytes(data)
    assert _same(_exercise(str(file_copy)), ours)
    _agrees_with_reference(data, ours)
