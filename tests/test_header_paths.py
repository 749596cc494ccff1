"""The header parser's fast paths against its reference, on headers generated near every
rule's boundary, and both against the reference Rust wheel.

``safecodec._header.parse_header`` is the reference (one rule per check, the module
docstring is the spec); ``safecodec._header_fast.parse_header`` tries the compact NumPy scan
(forced here for every header as well as taken at its shipped size threshold) and the
canonical regex path first. For every generated file the three must give the same verdict:
an equal ``Header``, or the same exception class with the same message. And the reference
wheel must reach the same verdict (accept or reject), except for safecodec's two documented
deviations (a repeated tensor name, a NUL character), which it accepts.

The generator starts from a valid canonical header and moves it across the edges the
rules draw: the reserved name ``__metadata__`` and repeated names (rule 5), tensors that
tile the data section exactly or miss by one byte, begin out of order, overlap, overflow
64 bits in their element count or bit count, or are not whole bytes (rule 6), the final
size one byte short or long (rule 7), dtype codes one character off (the dtype lookup),
and the limits of each fast path (digits per number, dimensions per shape, name length,
ASCII), plus JSON spellings that leave the canonical form (whitespace, escapes, unknown or
repeated fields, reordered fields, ``1.0`` / ``-0`` / ``01`` numbers, trailing commas,
metadata that is null, empty, not a string, repeated).
"""

from __future__ import annotations

import json
import struct
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

import _oracle
from safecodec import SafecodecError, _header, _header_fast
from safecodec._dtypes import DTYPES

#: Names at the edges: the reserved key and its neighbours, escapes (quote, backslash,
#: control characters), non-ASCII, the scan's name-length limit (256 bytes), a NUL.
NAMES = st.sampled_from([
    "a", "b", "w.0", "", "__metadata__", "__metadata", "__metadata__x", "_metadata__",
    'q"uote', "back\\slash", "tab\t", "é", "\u2028", "x" * 256, "y" * 257, "a\x00",
    ":[0,4]},", "dtype",
]) | st.text(max_size=4)

VALID_CODES = sorted(DTYPES)
#: Codes one step off a valid one: case, length, a trailing space, the 16/17-byte limit.
BAD_CODES = ["f32", "F31", "F32 ", "BF", "F8_E4M3FNUZX", "A" * 16, "A" * 17, "", "bool"]
CODES = st.sampled_from(VALID_CODES * 4 + BAD_CODES)  # about one in ten is bad

#: Dimensions at the edges: 0 and small ones; the scan's 16-digit limit and the regex's
#: 18-digit one; the u64 limit and just beyond; values that overflow once multiplied.
BIG_DIMS = [10**16 - 1, 10**16, 10**18 - 1, 10**18, 2**32, 2**62, 2**63, 2**64 - 1, 2**64]
SMALL_DIMS = st.sampled_from([0, 1, 2, 3, 4, 5, 8])


@st.composite
def shapes(draw: st.DrawFn) -> list[int]:
    """Mostly small shapes of 0-3 dimensions; sometimes 15-17 or 31-33 dimensions (the
    fast paths' limits), or a huge dimension beside a zero (before it: no overflow;
    after: an intermediate overflow)."""
    kind = draw(st.sampled_from(["small"] * 6 + ["many", "huge"]))
    if kind == "small":
        return draw(st.lists(SMALL_DIMS, max_size=3))
    if kind == "many":
        ndim = draw(st.sampled_from([15, 16, 17, 31, 32, 33]))
        return [1] * (ndim - 1) + [draw(SMALL_DIMS)]
    big = draw(st.lists(st.sampled_from(BIG_DIMS), min_size=1, max_size=3))
    zero_first = draw(st.booleans())
    return [0, *big] if zero_first else [*big, draw(st.sampled_from([0, 1, 2]))]


def _nbytes(code: str, shape: list[int]) -> int | None:
    """The byte size the rules give the tensor, or None when no size is valid."""
    dtype = DTYPES.get(code)
    count = _header.element_count(tuple(shape))
    if dtype is None or count is None or count * dtype.bits >= 2**64 or count * dtype.bits % 8:
        return None
    return count * dtype.bits // 8


#: Ways to spell a number: the canonical one, spellings the reference rejects, and one it
#: accepts outside the canonical form (whitespace). One file in six uses them.
NUMBER_SPELLINGS = ["{}"] * 6 + ["{}.0", "-{}", "0{}", "{}e0", " {}"]
#: Data sections larger than this are not written out (the header still claims them).
MAX_DATA = 1 << 12


def _number(draw: st.DrawFn, value: int, odd: bool) -> str:
    if not odd:
        return str(value)
    spelling = draw(st.sampled_from(NUMBER_SPELLINGS))
    if spelling == "-{}" and value == 0:
        return "-0"
    return spelling.format(value)


@st.composite
def boundary_files(draw: st.DrawFn) -> bytes:
    """A whole file (length prefix, header, data) near one or more rules' boundaries."""
    entries: list[str] = []
    cursor = 0
    odd = draw(st.integers(0, 5)) == 0  # numbers spelled other than canonically
    for _ in range(draw(st.integers(0, 4))):
        name, code, shape = draw(NAMES), draw(CODES), draw(shapes())
        size = _nbytes(code, shape)
        if size is None:
            size = draw(st.sampled_from([0, 1, 3]))
        begin, end = cursor, cursor + size
        shift = draw(st.sampled_from([0] * 12 + [-1, 1, 2]))
        if shift and draw(st.booleans()):
            begin = max(begin + shift, 0)
        elif shift:
            end = max(end + shift, 0)
        cursor = max(cursor, end)
        nums = [_number(draw, d, odd) for d in shape]
        fields = {
            "dtype": json.dumps(code),
            "shape": "[" + ",".join(nums) + "]",
            "data_offsets": f"[{_number(draw, begin, odd)},{_number(draw, end, odd)}]",
        }
        order = list(fields)
        if draw(st.integers(0, 9)) == 0:
            order = draw(st.permutations(order))
        parts = [f'"{key}":{fields[key]}' for key in order]
        extra = draw(st.sampled_from([None] * 24 + ["unknown", "repeat", "nested", "missing"]))
        if extra == "unknown":
            parts.append('"x":[1,{"y":null}]')
        elif extra == "repeat":
            parts.append(parts[0])
        elif extra == "nested":
            depth = draw(st.sampled_from([124, 125, 126]))  # the nesting limit: 125 pass
            parts.append('"x":' + "[" * depth + "]" * depth)
        elif extra == "missing":
            parts.pop(draw(st.integers(0, len(parts) - 1)))
        ascii_only = draw(st.integers(0, 9)) == 0
        entries.append(json.dumps(name, ensure_ascii=ascii_only) + ":{" + ",".join(parts) + "}")
    if len(entries) > 1 and draw(st.integers(0, 4)) == 0:
        entries = draw(st.permutations(entries))  # listed out of offset order

    metadata = draw(st.sampled_from([
        None, None, None, None, None, "null", "{}", '{"k":"v"}', '{"k":"v"}', '{"k":"1","k":"2"}', '{"k":1}',
        '{"format":"pt"}', '{"k":"\\u0000"}', '{"\\u00e9":"v"}', "[]", "REPEAT",
    ]))
    if metadata == "REPEAT":
        entries = ['"__metadata__":{}', *entries, '"__metadata__":{}']
    elif metadata is not None:
        entries.insert(draw(st.integers(0, len(entries))), '"__metadata__":' + metadata)

    separator = draw(st.sampled_from([","] * 16 + [", ", ",\n"]))
    text = "{" + separator.join(entries) + draw(st.sampled_from([""] * 20 + [","])) + "}"
    padding = draw(st.sampled_from(["", "", "", "  ", " " * 7, "\n", "\x00", "\t "]))
    if draw(st.integers(0, 9)) == 0:
        text = " " + text
    header = (text + padding).encode("utf-8", "surrogatepass")
    data_size = min(max(cursor + draw(st.sampled_from([0] * 8 + [-1, 1])), 0), MAX_DATA)
    return struct.pack("<Q", len(header)) + header + bytes(data_size)


def _file(header: str, data_size: int) -> bytes:
    raw = header.encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(data_size)


def _entry(name: str, code: str, shape: list[int], begin: int, end: int) -> str:
    return (f'"{name}":{{"dtype":"{code}","shape":{json.dumps(shape, separators=(",", ":"))},'
            f'"data_offsets":[{begin},{end}]}}')


#: Files on a boundary that the generator reaches only now and then, checked every run.
EDGES = [
    # the reserved key as a later entry: canonical in form, metadata in meaning (rule 5)
    _file("{" + _entry("a", "U8", [1], 0, 1) + "," + _entry("__metadata__", "U8", [1], 1, 2)
          + "}", 2),
    _file("{" + _entry("a", "U8", [1], 0, 1) + "," + _entry("a", "U8", [1], 1, 2) + "}", 2),
    # dimensions at the scan's and the whole-product limits (16, 17) and the regex's (32, 33)
    *(_file("{" + _entry("t", "U8", [1] * (ndim - 1) + [2], 0, 2) + "}", 2)
      for ndim in (16, 17, 32, 33)),
    # 16 and 17 digits (the scan's limit), 18 and 19 (the regex's), beside a zero
    *(_file("{" + _entry("t", "F32", [0, 10**digits - 1], 0, 0) + "}", 0)
      for digits in (16, 17, 18, 19, 20)),
    # an intermediate overflow, and none
    _file("{" + _entry("t", "U8", [2**63, 2, 0], 0, 0) + "}", 0),
    _file("{" + _entry("t", "U8", [0, 2**63, 2], 0, 0) + "}", 0),
    # whole bytes or not (packed codes), listed out of offset order, one byte short
    _file("{" + _entry("t", "F4", [3], 0, 2) + "}", 2),
    _file("{" + _entry("t", "F6_E2M3", [4], 0, 3) + "}", 3),
    _file("{" + _entry("b", "U8", [1], 1, 2) + "," + _entry("a", "U8", [1], 0, 1) + "}", 2),
    _file("{" + _entry("a", "U16", [2], 0, 4) + "}", 3),
    # a code one byte longer than any in the table
    _file("{" + _entry("t", "F8_E4M3FNUZX", [1], 0, 1) + "}", 1),
]


def _verdict(parse: Any, header: bytes, size: int) -> tuple[str, Any]:
    try:
        result = parse(header, size)
    except SafecodecError as exc:
        return type(exc).__name__, str(exc)
    return "ok", (dict(result.tensors), result.raw_metadata, result.header_size,
                  result.file_size)


def _scan_forced(header: bytes, size: int) -> _header.Header:
    saved = _header_fast.SCAN_MIN_BYTES
    _header_fast.SCAN_MIN_BYTES = 0
    try:
        return _header_fast.parse_header(header, size)
    finally:
        _header_fast.SCAN_MIN_BYTES = saved


def _with_edges(test: Any) -> Any:
    for data in EDGES:
        test = example(data=data)(test)
    return test


@settings(max_examples=400)
@given(data=boundary_files())
@_with_edges
def test_fast_paths_reference_and_wheel_agree(data: bytes) -> None:
    (n,) = struct.unpack_from("<Q", data)
    header = data[8 : 8 + n]
    reference = _verdict(_header.parse_header, header, len(data))
    assert _verdict(_header_fast.parse_header, header, len(data)) == reference
    assert _verdict(_scan_forced, header, len(data)) == reference

    wheel = _oracle.deserialize(data)
    kind, detail = reference
    if kind == "ok":
        assert wheel.ok, wheel.error
        tensors = detail[0]
        assert sorted(wheel.tensors) == sorted(tensors)
        for name, info in tensors.items():
            assert wheel.tensors[name][:2] == (info.dtype.code, info.shape)
    elif "safecodec rejects" in detail or "format forbids" in detail:
        pass  # a documented deviation; the wheel may accept it or reject it for another rule
    else:
        assert not wheel.ok, f"the wheel accepts what safecodec rejects with {reference}"


def test_generator_reaches_every_path() -> None:
    """The strategy above produces headers that each path accepts, and headers that each
    rule rejects (else the differential test would prove little)."""
    seen: dict[str, int] = {}

    @settings(max_examples=300, database=None, derandomize=True)
    @given(data=boundary_files())
    def collect(data: bytes) -> None:
        (n,) = struct.unpack_from("<Q", data)
        header = data[8 : 8 + n]
        text = header.decode("utf-8", "replace")
        kind, detail = _verdict(_header.parse_header, header, len(data))
        key = kind if kind == "ok" else detail.split(":")[0].split(" for tensor")[0]
        seen[key] = seen.get(key, 0) + 1
        if _header_fast._parse_canonical(text) is not None:
            seen["canonical"] = seen.get("canonical", 0) + 1
        if kind == "ok" and text.isascii() and "\\" not in text:
            seen["scannable"] = seen.get("scannable", 0) + 1

    collect()
    for key in ("ok", "canonical", "scannable", "invalid JSON in header", "invalid offset",
                "invalid shape, data type, or offset", "incomplete metadata, file not fully "
                "covered"):
        assert seen.get(key, 0) > 0, (key, seen)
