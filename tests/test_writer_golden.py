"""Writer golden bytes: ``safecodec.save(..., alignment=8)`` against the reference writer
(safetensors 0.8.0), byte for byte; the zero-copy layout (alignment=64) against its
promises; and the writer's rejections.

Byte identity is defined for what the wheel can write (every code but F6, F4 only with an
even last dimension) and for at most one metadata key (the wheel orders more at random).
"""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import _oracle
import safecodec as sc
from safecodec import DtypeError, HeaderError, SafecodecError, _header
from safecodec._dtypes import DTYPES

WRITABLE = sorted(code for code in DTYPES if not code.startswith("F6"))
SHAPES = [(), (0,), (3,), (2, 3), (4, 0, 2), (1, 1, 1, 4)]
F4_SHAPES = [(0,), (2,), (3, 4), (0, 2), (2, 0)]  # the wheel doubles an even last axis


def sample(code: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Deterministic values covering the bit patterns of ``code``."""
    dt = DTYPES[code]
    count = int(np.prod(shape, dtype=np.int64))
    rng = np.random.default_rng(seed)
    if dt.packed:
        return rng.integers(0, 1 << dt.bits, count, dtype=np.uint8).view(dt.numpy).reshape(shape)
    raw = rng.integers(0, 256, count * dt.itemsize, dtype=np.uint8)
    if code == "BOOL":
        return (raw % 2).astype(bool).reshape(shape)
    return raw.view(dt.numpy).reshape(shape)


def reference_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None) -> bytes:
    """What the wheel writes for these arrays (given as little-endian C-order bytes)."""
    specs = {}
    for name, arr in tensors.items():
        code = sc.read_header(sc.save({"t": arr})).tensors["t"].dtype.code
        c_order = np.ascontiguousarray(arr)
        if code == "F4":
            raw = sc.save({"t": c_order})
            info = sc.read_header(raw).tensors["t"]
            start = sc.read_header(raw).data_start
            data = raw[start + info.begin : start + info.end]  # packed by safecodec
        else:
            le = c_order.astype(c_order.dtype.newbyteorder("<")) if c_order.dtype.byteorder == ">" \
                else c_order
            data = le.tobytes()
        specs[name] = (code, tuple(arr.shape), data)
    return _oracle.serialize(specs, metadata)


def all_dtype_tensors(seed: int) -> dict[str, np.ndarray]:
    out = {}
    for i, code in enumerate(WRITABLE):
        for j, shape in enumerate(F4_SHAPES if code == "F4" else SHAPES):
            out[f"{code.lower()}_{j}"] = sample(code, shape, seed + 31 * i + j)
    return out


@pytest.mark.parametrize("code", WRITABLE)
def test_each_dtype_matches_reference_bytes(code: str) -> None:
    _oracle.require()
    shapes = F4_SHAPES if code == "F4" else SHAPES
    tensors = {f"t{j}": sample(code, shape, j) for j, shape in enumerate(shapes)}
    assert sc.save(tensors, alignment=8) == reference_bytes(tensors, None)


@pytest.mark.parametrize("metadata", [None, {}, {"format": "np"}, {"é": "名前\n\"quoted\""}])
def test_every_dtype_together_matches_reference_bytes(metadata) -> None:
    """Ordering across dtypes (widest first, then name) and metadata placement."""
    _oracle.require()
    tensors = all_dtype_tensors(seed=7)
    assert sc.save(tensors, metadata, alignment=8) == reference_bytes(tensors, metadata)


@pytest.mark.parametrize("names", [
    ["é", "e", "z", "Z", "名", "\U0001f600", "a.b", ""],
    ["layer.10", "layer.9", "layer.1", "layer.100"],  # code-point order, not natural order
    ["q\"uote", "back\\slash", "tab\t", "ctrl\x01", "del\x7f", "/slash"],  # JSON escapes
])
def test_names_order_and_escapes_match_reference(names) -> None:
    _oracle.require()
    tensors = {n: np.full((2,), i, np.float32) for i, n in enumerate(names)}
    tensors.update({n + "_16": np.full((1,), i, np.float16) for i, n in enumerate(names)})
    assert sc.save(tensors, alignment=8) == reference_bytes(tensors, None)


@pytest.mark.parametrize("make", [
    pytest.param(lambda a: np.asfortranarray(a), id="fortran"),
    pytest.param(lambda a: a.T, id="transposed"),
    pytest.param(lambda a: a[::2, ::-1], id="strided-reversed"),
    pytest.param(lambda a: a.astype(a.dtype.newbyteorder(">")), id="big-endian"),
    pytest.param(lambda a: np.asfortranarray(a.astype(a.dtype.newbyteorder(">"))),
                 id="big-endian-fortran"),
])
@pytest.mark.parametrize("dtype", ["<f4", "<i8", "<u2", "<c8", "<f8"])
def test_layout_of_inputs_does_not_change_bytes(make, dtype) -> None:
    """Whatever the memory layout or byte order of the input, the file holds the values in
    little-endian C order, the bytes the wheel writes for the equivalent C array (the
    0.8.0 wheel itself scrambles Fortran-order input: not copied)."""
    _oracle.require()
    base = np.arange(24, dtype=dtype).reshape(4, 6) * 3 - 5
    arr = make(base)
    expected_values = np.ascontiguousarray(arr).astype(np.dtype(dtype))
    data = sc.save({"x": arr}, alignment=8)
    assert data == reference_bytes({"x": expected_values}, None)
    verdict = _oracle.deserialize(data)
    assert verdict.tensors["x"][2] == expected_values.tobytes()
    np.testing.assert_array_equal(sc.load(data)["x"], arr)


def test_empty_dict_with_empty_metadata_is_documented_output() -> None:
    """docs/format.md: no tensors and ``{}`` metadata give ``{"__metadata__":{}}`` (the 0.8.0
    wheel writes something else here; that bug is not copied)."""
    data = sc.save({}, {}, alignment=8)
    assert data == struct.pack("<Q", 24) + b'{"__metadata__":{}}' + b" " * 5
    assert _oracle.deserialize(data).ok
    wheel = _oracle.serialize({}, {})
    assert wheel != data  # if this starts failing, the wheel was fixed: compare directly


def test_empty_dict_matches_reference() -> None:
    assert sc.save({}, alignment=8) == _oracle.serialize({}, None)
    assert sc.save({}, {"k": "v"}, alignment=8) == _oracle.serialize({}, {"k": "v"})


def test_numpy_scalars_and_python_values_match_reference() -> None:
    tensors = {"s": np.float32(2.5), "i": np.int64(-3), "b": np.bool_(True)}
    expected = {k: np.asarray(v) for k, v in tensors.items()}
    assert sc.save(tensors, alignment=8) == reference_bytes(expected, None)


# ----------------------------------------------------------------------------- alignment=64


def test_zero_copy_layout() -> None:
    _oracle.require()
    tensors = all_dtype_tensors(seed=3)
    tensors["big"] = np.arange(64, dtype=np.float32)  # 256 bytes
    tensors["odd"] = np.arange(3, dtype=np.uint8)
    data = sc.save(tensors, {"k": "v"})
    header = sc.read_header(data)
    assert header.data_start % 64 == 0
    assert (header.data_start - 8) % 8 == 0  # still space padding, N grows by whole spaces
    aligned_group = True
    for info in header.tensors.values():  # file order
        if info.nbytes % 64 == 0:
            assert aligned_group, f"{info.name} comes after a non-multiple of 64"
            assert (header.data_start + info.begin) % 64 == 0, info.name
        else:
            aligned_group = False
    verdict = _oracle.deserialize(data)
    assert verdict.ok
    for name, arr in tensors.items():
        code, shape, raw = verdict.tensors[name]
        assert shape == arr.shape
        if code != "F4":
            assert raw == np.ascontiguousarray(arr).tobytes(), name
        loaded = sc.load(data)[name]
        assert loaded.dtype == arr.dtype and loaded.shape == arr.shape
        assert loaded.tobytes() == arr.tobytes(), name


def test_zero_copy_layout_padding_is_json_whitespace() -> None:
    data = sc.save({"a": np.zeros(16, np.float32)}, alignment=64)
    n = _header.decode_length(data, len(data))
    text = data[8 : 8 + n]
    assert text == text.rstrip(b" ") + b" " * (len(text) - len(text.rstrip(b" ")))
    assert json.loads(text) == {"a": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}}


@pytest.mark.parametrize("alignment", [8, 64, 128, 4096])
def test_alignments_are_read_by_reference(alignment: int) -> None:
    tensors = {"a": np.ones((3, 5), np.float64), "b": np.arange(7, dtype=np.int16)}
    data = sc.save(tensors, alignment=alignment)
    assert (8 + _header.decode_length(data, len(data))) % alignment == 0
    verdict = _oracle.deserialize(data)
    for name, arr in tensors.items():
        assert verdict.tensors[name][2] == arr.tobytes()


# ----------------------------------------------------------------------------- rejections

REJECTIONS = [
    ("NUL in a tensor name", {"a\x00b": np.zeros(1)}, None, HeaderError, "contains a NUL"),
    ("NUL in a metadata key", {"a": np.zeros(1)}, {"k\x00": "v"}, HeaderError, "NUL character"),
    ("NUL in a metadata value", {"a": np.zeros(1)}, {"k": "v\x00"}, HeaderError, "NUL character"),
    ("name __metadata__", {"__metadata__": np.zeros(1)}, None, HeaderError,
     "cannot be named '__metadata__'"),
    ("non-str name", {1: np.zeros(1)}, None, HeaderError, "tensor names must be str, got int"),
    ("lone surrogate name", {"\ud800": np.zeros(1)}, None, HeaderError, "lone surrogate"),
    ("non-str metadata value", {"a": np.zeros(1)}, {"k": 1}, HeaderError, "metadata must map str to str"),
    ("non-str metadata key", {"a": np.zeros(1)}, {2: "v"}, HeaderError, "metadata must map str to str"),
    ("metadata not a mapping", {"a": np.zeros(1)}, [("k", "v")], HeaderError, "metadata must be a mapping"),
    ("complex128", {"weights.c": np.zeros(2, np.complex128)}, None, DtypeError,
     "tensor 'weights.c' has dtype complex128.*complex64"),
    ("object", {"obj": np.array([object()])}, None, DtypeError, "tensor 'obj' has dtype object"),
    ("int4", {"q.int4": np.zeros(2, ml_dtypes.int4)}, None, DtypeError, "tensor 'q.int4' has dtype int4"),
    ("float128", {"ld": np.zeros(2, np.longdouble)}, None, DtypeError, "tensor 'ld' has dtype"),
    ("strings", {"s": np.array(["x"])}, None, DtypeError, "tensor 's' has dtype"),
    ("F4 odd count", {"f4": np.zeros(3, ml_dtypes.float4_e2m1fn)}, None, SafecodecError,
     "tensor 'f4': 3 elements of F4"),
    ("F6 count 6", {"f6": np.zeros(6, ml_dtypes.float6_e2m3fn)}, None, SafecodecError,
     "multiple of 4 elements"),
    ("not a mapping", [("a", np.zeros(1))], None, SafecodecError, "tensors must be a mapping"),
]


@pytest.mark.parametrize("label, tensors, metadata, cls, match", REJECTIONS,
                         ids=[r[0] for r in REJECTIONS])
def test_writer_rejections(label, tensors, metadata, cls, match, tmp_path) -> None:
    with pytest.raises(cls, match=match):
        sc.save(tensors, metadata)
    target = tmp_path / "x.safetensors"
    with pytest.raises(cls, match=match):
        sc.save_file(tensors, target, metadata)
    assert list(tmp_path.iterdir()) == []  # nothing left behind, not even a temporary


def _name_for_header_size(size: int) -> str:
    """A name that makes the one-tensor header exactly ``size`` bytes (no padding)."""
    frame = len(json.dumps({"": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}},
                           separators=(",", ":")))
    return "n" * (size - frame)


def test_header_size_limit_on_write(monkeypatch) -> None:
    """The writer refuses headers past 100,000,000 bytes, from many long names (about
    100 MB of names, never gigabytes), before encoding them."""
    empty = np.zeros(0, np.uint8)
    many = {f"{i:03d}" + "m" * 999_990: empty for i in range(101)}
    with pytest.raises(HeaderError, match=r"header too large: at least 100999293 bytes.*the "
                       r"limit is 100000000"):
        sc.save(many)


@pytest.mark.parametrize("alignment", [8, 64])
def test_header_size_limit_boundary(monkeypatch, alignment: int) -> None:
    """Exactly at the limit is written and read back (by both readers); one byte more,
    after padding, is refused. The limit is lowered so that this stays small."""
    limit = 4088  # 8 + 4088 is a multiple of 64 as well as 8
    monkeypatch.setattr(_header, "MAX_HEADER_SIZE", limit)
    empty = np.zeros(0, np.uint8)
    name = _name_for_header_size(limit)
    data = sc.save({name: empty}, alignment=alignment)
    assert _header.decode_length(data, len(data)) == limit
    assert list(sc.read_header(data).tensors) == [name]
    assert _oracle.deserialize(data).ok
    with pytest.raises(HeaderError, match=f"header too large: {limit + alignment} bytes, "
                       f"the limit is {limit}"):
        sc.save({name + "n": empty}, alignment=alignment)
    too_long = struct.pack("<Q", limit + 1) + b" " * (limit + 1)
    with pytest.raises(HeaderError, match=f"header too large: {limit + 1} bytes"):
        sc.read_header(too_long)


# ----------------------------------------------------------------------------- Hypothesis

_NAME = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
                max_size=8).filter(lambda s: s != "__metadata__")


@st.composite
def _writable_tensors(draw: st.DrawFn) -> dict[str, np.ndarray]:
    out = {}
    for i, name in enumerate(draw(st.lists(_NAME, max_size=6, unique=True))):
        code = draw(st.sampled_from(WRITABLE))
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        if code == "F4":
            shape = (*shape, 2 * draw(st.integers(0, 2)))  # the wheel needs an even last axis
        out[name] = sample(code, shape, i)
    return out


@settings(max_examples=60)
@given(tensors=_writable_tensors(),
       metadata=st.none() | st.dictionaries(_NAME, _NAME, max_size=1))
def test_random_files_match_reference_bytes(tensors, metadata) -> None:
    assume(tensors or metadata != {})  # the wheel's documented bug, tested above
    assert sc.save(tensors, metadata, alignment=8) == reference_bytes(tensors, metadata)


# ----------------------------------------------------------------------------- packed, by hand
# Expected bytes worked out by hand from the format rules (docs/format.md, safecodec/_packed.py
# docstring), not produced by safecodec: elements in C order; F4 packs element 2i in the LOW
# nibble of byte i and 2i+1 in the high nibble; F6 packs four elements into a 24-bit
# little-endian group, element k at bits 6k..6k+5 (first element lowest).
#
# float4_e2m1fn (sign, 2 exponent bits with bias 1, 1 mantissa bit):
#   0.5 = 0.001 subnormal -> 0x1   1.0 = 0.01.0 -> 0x2   1.5 = 0.01.1 -> 0x3
#  -2.0 = 1.10.0          -> 0xC   6.0 = 0.11.1 -> 0x7  -0.5 = 1.00.1 -> 0x9
#   [[0.5, 1.0, 1.5], [-2.0, 6.0, -0.5]] -> bytes 0x21, 0xC3, 0x97
F4_HAND = (
    (56).to_bytes(8, "little")  # the header below is 56 bytes: a multiple of 8, no padding
    + b'{"f4":{"dtype":"F4","shape":[2,3],"data_offsets":[0,3]}}'
    + b"\x21\xc3\x97"
)
F4_VALUES = [[0.5, 1.0, 1.5], [-2.0, 6.0, -0.5]]

# float6_e2m3fn (sign, 2 exponent bits with bias 1, 3 mantissa bits):
#   1.0 = 0.01.000 -> 0x08  -0.125 = 1.00.001 -> 0x21  7.5 = 0.11.111 -> 0x1F  3.0 = 0.10.100 -> 0x14
#   g = 0x08 | 0x21<<6 | 0x1F<<12 | 0x14<<18 = 0x51F848 -> bytes 0x48, 0xF8, 0x51
# float6_e3m2fn (sign, 3 exponent bits with bias 3, 2 mantissa bits):
#   28.0 = 0.111.11 -> 0x1F  -0.0625 = 1.000.01 -> 0x21  1.0 = 0.011.00 -> 0x0C  0.25 = 0.001.00 -> 0x04
#   g = 0x1F | 0x21<<6 | 0x0C<<12 | 0x04<<18 = 0x10C85F -> bytes 0x5F, 0xC8, 0x10
# Order in the file: F6_E3M2 before F6_E2M3; the 115-byte header is padded to 120.
F6_HAND = (
    (120).to_bytes(8, "little")
    + b'{"b":{"dtype":"F6_E3M2","shape":[4],"data_offsets":[0,3]},'
    + b'"a":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[3,6]}}'
    + b"     "
    + b"\x5f\xc8\x10"
    + b"\x48\xf8\x51"
)
F6_VALUES = {"a": (ml_dtypes.float6_e2m3fn, [1.0, -0.125, 7.5, 3.0]),
             "b": (ml_dtypes.float6_e3m2fn, [28.0, -0.0625, 1.0, 0.25])}


def test_f4_hand_packed_bytes_written_and_read() -> None:
    arr = np.array(F4_VALUES, ml_dtypes.float4_e2m1fn)
    assert sc.save({"f4": arr}, alignment=8) == F4_HAND
    got = sc.load(F4_HAND)["f4"]
    assert got.dtype == ml_dtypes.float4_e2m1fn and got.shape == (2, 3)
    assert got.astype(np.float32).tolist() == F4_VALUES
    raw = sc.load(F4_HAND, unpack=False)["f4"]
    assert np.ascontiguousarray(raw).tobytes() == b"\x21\xc3\x97"


def test_f6_hand_packed_bytes_written_and_read() -> None:
    tensors = {name: np.array(values, dt) for name, (dt, values) in F6_VALUES.items()}
    assert sc.save(tensors, alignment=8) == F6_HAND
    got = sc.load(F6_HAND)
    assert list(got) == ["b", "a"]  # file order
    for name, (dt, values) in F6_VALUES.items():
        assert got[name].dtype == dt and got[name].shape == (4,)
        assert got[name].astype(np.float32).tolist() == values
