"""The safetensors format: header parsing, validation and layout planning. No I/O.

Layout of a file::

    [8 bytes]  N, unsigned 64-bit little-endian
    [N bytes]  UTF-8 JSON object, possibly padded with JSON whitespace
    [rest]     data section; every tensor's data_offsets are relative to byte 8 + N

The JSON object holds an optional ``"__metadata__": {str: str}`` (``null`` means absent)
and one entry per tensor, ``"name": {"dtype": CODE, "shape": [int, ...],
"data_offsets": [BEGIN, END]}``, END exclusive. Data is little-endian, C order.

The checks, in the order the reference reader makes them (each raises its own error):

1. fewer than 8 bytes                      -> "header too small"
2. N > :data:`MAX_HEADER_SIZE`             -> "header too large" (before reading it)
3. 8 + N > size of the source              -> "invalid header length"
4. header not UTF-8                        -> "invalid UTF-8 in header"
5. header not strict JSON of the right shape -> "invalid JSON in header": whitespace
   around the object is fine; NUL padding, a BOM, trailing text, NaN, comments, trailing
   commas, raw control characters, lone surrogates and nesting deeper than
   :data:`MAX_NESTING` are not. ``shape`` and ``data_offsets`` hold non-negative integers
   below 2**64 (``1.0``, ``1e0``, ``-0``, ``true`` rejected); ``data_offsets`` has two;
   all three fields are required, unknown fields are ignored, a repeated field is an
   error; ``__metadata__`` maps str to str, appears at most once, repeated keys inside it
   keep the last value.
6. tensors walked in (BEGIN, END) order with a cursor from 0: BEGIN must equal the cursor
   and END >= BEGIN ("invalid offset"); the element count times the bit width must fit in
   64 bits ("overflow"); must be whole bytes ("misaligned"); END - BEGIN must equal the
   byte size ("invalid shape, data type, or offset").
7. 8 + N + final cursor must equal the source size ("file not fully covered").

Two deliberate deviations from the reference: a tensor name that appears twice is
rejected (the reference silently keeps the last), and NUL characters in tensor names or
metadata are rejected (on write too).

The writer side (:func:`plan_layout`) produces either the reference writer's exact layout
(``alignment=8``) or safecodec's zero-copy layout (``alignment=64``): header padded with
spaces so that data starts at a multiple of 64, tensors whose byte size is a multiple of 64
first, so each of them starts 64-byte aligned.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ._dtypes import DTYPES, DType
from ._errors import HeaderError, OffsetError

__all__ = [
    "MAX_HEADER_SIZE",
    "MAX_NESTING",
    "PREFIX_SIZE",
    "Header",
    "TensorInfo",
    "decode_length",
    "encode_header",
    "parse_header",
    "plan_layout",
]

#: Size of the little-endian u64 that precedes the header.
PREFIX_SIZE: Final = 8
#: The reference reader refuses headers longer than this (bytes), before reading them.
MAX_HEADER_SIZE: Final = 100_000_000
#: serde_json's recursion limit: arrays/objects nested deeper than this are rejected.
MAX_NESTING: Final = 128
#: Shape entries and offsets are u64 in the reference; anything at or above is rejected.
U64_LIMIT: Final = 1 << 64
#: Key that holds user metadata instead of a tensor.
METADATA_KEY: Final = "__metadata__"
#: The three fields a tensor entry must have, in the order the reference writes them.
TENSOR_FIELDS: Final = ("dtype", "shape", "data_offsets")

_U64 = struct.Struct("<Q")
# A negative number right after a structural character: the only way "-0" (which the
# reference parses as a float) can reach a shape or offset. Rare, so it selects the slow path.
_NEGATIVE_NUMBER = re.compile(rb"[\[,:][ \t\r\n]*-")
# A float literal with a huge exponent or mantissa overflows f64 in the reference parser.
_EXPONENT = re.compile(rb"[0-9][eE]")


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """What the header says about one tensor.

    Attributes:
        name: The tensor's name.
        dtype: Its row of the dtype table (``info.dtype.code`` is the code string).
        shape: Logical shape (packed dtypes count elements, not bytes).
        begin: Offset of the first byte, relative to the start of the data section.
        end: Offset one past the last byte, relative to the data section.
    """

    name: str
    dtype: DType
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Number of bytes the tensor occupies in the file."""
        return self.end - self.begin

    @property
    def count(self) -> int:
        """Number of logical elements."""
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, slots=True)
class Header:
    """A parsed, validated header.

    Attributes:
        tensors: name -> :class:`TensorInfo`, in file order (ascending offsets).
        metadata: The ``__metadata__`` mapping, or None when the file has none.
        header_size: N, the length of the JSON text in bytes (padding included).
        file_size: Total size of the file in bytes.
    """

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    header_size: int
    file_size: int
    _sorted_names: list[str] = field(default_factory=list, repr=False, compare=False)

    @property
    def data_start(self) -> int:
        """Absolute offset of the data section (8 + N)."""
        return PREFIX_SIZE + self.header_size

    def names(self) -> list[str]:
        """Tensor names sorted by code point (the order ``keys()`` reports)."""
        if not self._sorted_names and self.tensors:
            self._sorted_names.extend(sorted(self.tensors))
        return list(self._sorted_names)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)


# ----------------------------------------------------------------------------- parsing


def decode_length(prefix: bytes | bytearray | memoryview, source_size: int) -> int:
    """Checks 1-3: decode N from the first 8 bytes and check it against the source size.

    Args:
        prefix: At least the first 8 bytes of the source (more is ignored).
        source_size: Total number of bytes in the source.

    Returns:
        N, the header length in bytes.

    Raises:
        HeaderError: The source is shorter than 8 bytes, N is over
            :data:`MAX_HEADER_SIZE`, or 8 + N runs past the end of the source.
    """
    if source_size < PREFIX_SIZE or len(prefix) < PREFIX_SIZE:
        raise HeaderError(
            f"header too small: a safetensors file starts with {PREFIX_SIZE} bytes of header "
            f"length, got {min(source_size, len(prefix))} bytes"
        )
    (n,) = _U64.unpack_from(prefix, 0)
    if n > MAX_HEADER_SIZE:
        raise HeaderError(f"header too large: {n} bytes, the limit is {MAX_HEADER_SIZE}")
    if PREFIX_SIZE + n > source_size:
        raise HeaderError(
            f"invalid header length: header claims {n} bytes, but only "
            f"{source_size - PREFIX_SIZE} bytes follow the length prefix"
        )
    return int(n)


def _invalid_json(reason: str) -> HeaderError:
    return HeaderError(f"invalid JSON in header: {reason}")


def _parse_int_checked(text: str) -> int | float:
    # The reference parses "-0" as a float (negative zero), so it is not an integer.
    return -0.0 if text == "-0" else int(text)


def _parse_float_checked(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _invalid_json(f"number out of range: {text[:40]}")
    return value


def _reject_constant(text: str) -> Any:
    raise _invalid_json(f"{text} is not valid JSON")


def _has_lone_surrogate(text: str) -> bool:
    # Lone surrogates survive json.loads (valid pairs are joined); strict UTF-8 rejects them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_surrogates(value: Any) -> None:
    """Slow-path check that no string (keys included) holds a lone surrogate escape."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if type(item) is str:
            if _has_lone_surrogate(item):
                raise _invalid_json(f"lone surrogate escape in string {item!r:.60}")
        elif type(item) is _Pairs:
            for k, v in item:
                if _has_lone_surrogate(k):
                    raise _invalid_json(f"lone surrogate escape in key {k!r:.60}")
                stack.append(v)
        elif type(item) is list:
            stack.extend(item)


def _nesting_depth(value: Any, start: int) -> int:
    """Deepest array/object level inside ``value``, counting from ``start``."""
    deepest = start
    stack: list[tuple[Any, int]] = [(value, start)]
    while stack:
        item, level = stack.pop()
        kind = type(item)
        if kind is list or kind is _Pairs:
            level += 1
            if level > deepest:
                deepest = level
                if deepest > MAX_NESTING:
                    return deepest
            if kind is _Pairs:
                stack.extend((v, level) for _, v in item)
            else:
                stack.extend((v, level) for v in item)
    return deepest


class _Pairs(list):  # type: ignore[type-arg]
    """A JSON object as the list of its (key, value) pairs, in document order."""

    __slots__ = ()


def _u64_list(value: Any, what: str, name: str) -> list[int]:
    if type(value) is not list:
        raise _invalid_json(f"{what} of tensor {name!r} must be an array of integers")
    for x in value:
        if type(x) is not int or x < 0 or x >= U64_LIMIT:
            raise _invalid_json(
                f"{what} of tensor {name!r} must hold integers in [0, 2**64), got {x!r}"
            )
    return value


def _parse_entry(name: str, pairs: Any) -> tuple[DType, list[int], list[int]]:
    if type(pairs) is not _Pairs:
        raise _invalid_json(f"entry of tensor {name!r} must be an object, got {pairs!r:.60}")
    dtype_code: Any = None
    shape: Any = None
    offsets: Any = None
    seen = 0
    for key, value in pairs:
        if key == "dtype":
            if seen & 1:
                raise _invalid_json(f"duplicate field 'dtype' in tensor {name!r}")
            seen |= 1
            dtype_code = value
        elif key == "shape":
            if seen & 2:
                raise _invalid_json(f"duplicate field 'shape' in tensor {name!r}")
            seen |= 2
            shape = value
        elif key == "data_offsets":
            if seen & 4:
                raise _invalid_json(f"duplicate field 'data_offsets' in tensor {name!r}")
            seen |= 4
            offsets = value
        elif type(value) is list or type(value) is _Pairs:
            # Unknown fields are ignored, but still bound by the nesting limit
            # (top object = 1, entry = 2, this value = 3...).
            if _nesting_depth(value, 2) > MAX_NESTING:
                raise _invalid_json(
                    f"nesting deeper than {MAX_NESTING} levels in tensor {name!r}"
                )
    if seen != 7:
        missing = [f for bit, f in zip((1, 2, 4), TENSOR_FIELDS, strict=True) if not seen & bit]
        raise _invalid_json(f"tensor {name!r} is missing field(s) {', '.join(missing)}")
    if type(dtype_code) is not str:
        raise _invalid_json(f"dtype of tensor {name!r} must be a string, got {dtype_code!r:.40}")
    dtype = DTYPES.get(dtype_code)
    if dtype is None:
        raise _invalid_json(f"unknown dtype {dtype_code!r:.40} for tensor {name!r}")
    shape = _u64_list(shape, "shape", name)
    offsets = _u64_list(offsets, "data_offsets", name)
    if len(offsets) != 2:
        raise _invalid_json(
            f"data_offsets of tensor {name!r} must have exactly 2 elements, got {len(offsets)}"
        )
    return dtype, shape, offsets


def _parse_metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if type(value) is not _Pairs:
        raise _invalid_json(f"__metadata__ must be an object of strings, got {value!r:.60}")
    metadata: dict[str, str] = {}
    for key, item in value:
        if type(item) is not str:
            raise _invalid_json(
                f"__metadata__ value of key {key!r} must be a string, got {item!r:.60}"
            )
        metadata[key] = item  # a repeated key keeps its last value, as in the reference
    return metadata


def parse_header(header_bytes: bytes | bytearray | memoryview, source_size: int) -> Header:
    """Checks 4-7: parse and validate the JSON header.

    Args:
        header_bytes: Exactly the N header bytes (after the 8-byte length prefix).
        source_size: Total size of the source, to check that the data is fully covered.

    Returns:
        The validated :class:`Header`.

    Raises:
        HeaderError: Invalid UTF-8, JSON, or header structure (checks 4-5).
        OffsetError: Offsets, shapes and dtypes do not tile the data section (checks 6-7).
    """
    n = len(header_bytes)
    raw = bytes(header_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"invalid UTF-8 in header at byte {exc.start}: {exc.reason}") from None

    # Rare constructs that the fast C parser cannot judge the way the reference does take
    # the slow path: escapes (lone surrogates, NUL), negative numbers ("-0"), exponents.
    slow = "\\u" in text
    negative = _NEGATIVE_NUMBER.search(raw) is not None
    exponent = _EXPONENT.search(raw) is not None
    try:
        top = json.loads(
            text,
            object_pairs_hook=_Pairs,
            parse_constant=_reject_constant,
            parse_int=_parse_int_checked if negative else None,
            parse_float=_parse_float_checked if exponent else None,
        )
    except HeaderError:
        raise
    except json.JSONDecodeError as exc:
        raise _invalid_json(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise _invalid_json(f"nesting deeper than {MAX_NESTING} levels") from None
    except (ValueError, OverflowError, MemoryError) as exc:  # e.g. int with >4300 digits
        raise _invalid_json(f"{type(exc).__name__}: {str(exc)[:80]}") from None

    if type(top) is not _Pairs:
        raise _invalid_json(f"the header must be a JSON object, got {type(top).__name__}")
    if slow:
        _check_surrogates(top)

    metadata: dict[str, str] | None = None
    metadata_seen = False
    entries: dict[str, TensorInfo] = {}
    order: list[tuple[int, int, str]] = []
    for name, value in top:
        if name == METADATA_KEY:
            if metadata_seen:
                raise _invalid_json("duplicate field '__metadata__'")
            metadata_seen = True
            metadata = _parse_metadata(value)
            if slow and metadata and any(
                "\x00" in k or "\x00" in v for k, v in metadata.items()
            ):
                raise HeaderError(
                    "NUL character in __metadata__ (safecodec rejects NUL in names and "
                    "metadata)"
                )
            continue
        if slow and "\x00" in name:
            raise HeaderError(f"tensor name {name!r} contains a NUL character")
        dtype, shape, offsets = _parse_entry(name, value)
        if name in entries:
            raise HeaderError(
                f"duplicate tensor name {name!r}: the format forbids duplicates "
                "(the reference reader would silently keep the last one)"
            )
        begin, end = offsets
        entries[name] = TensorInfo(name, dtype, tuple(shape), begin, end)
        order.append((begin, end, name))

    order.sort()
    cursor = 0
    tensors: dict[str, TensorInfo] = {}
    for begin, end, name in order:
        info = entries[name]
        if begin != cursor or end < begin:
            raise OffsetError(
                f"invalid offset for tensor {name!r}: data_offsets [{begin}, {end}], "
                f"expected to begin at {cursor} (tensors must be contiguous, without gaps "
                "or overlap)"
            )
        count = 1
        for d in info.shape:
            count *= d
            if count >= U64_LIMIT:
                raise OffsetError(
                    f"overflow computing buffer size for tensor {name!r}: shape {list(info.shape)}"
                )
        nbits = count * info.dtype.bits
        if nbits >= U64_LIMIT:
            raise OffsetError(
                f"overflow computing buffer size for tensor {name!r}: shape "
                f"{list(info.shape)} x {info.dtype.bits} bits"
            )
        if nbits % 8:
            raise OffsetError(
                f"misaligned slice for tensor {name!r}: {count} elements of "
                f"{info.dtype.code} ({info.dtype.bits} bits) is not a whole number of bytes"
            )
        if end - begin != nbits // 8:
            raise OffsetError(
                f"invalid shape, data type, or offset for tensor {name!r}: dtype "
                f"{info.dtype.code} shape {list(info.shape)} needs {nbits // 8} bytes, "
                f"data_offsets [{begin}, {end}] span {end - begin}"
            )
        cursor = end
        tensors[name] = info

    expected = PREFIX_SIZE + n + cursor
    if expected != source_size:
        raise OffsetError(
            "incomplete metadata, file not fully covered: header and tensors account for "
            f"{expected} bytes, the file has {source_size}"
        )
    return Header(tensors, metadata, n, source_size)


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True, slots=True)
class PlannedTensor:
    """A tensor's place in a file being written."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    begin: int
    end: int


def check_name(name: object) -> str:
    """Validate a tensor name for writing."""
    if not isinstance(name, str):
        raise HeaderError(f"tensor names must be str, got {type(name).__name__} {name!r:.60}")
    if name == METADATA_KEY:
        raise HeaderError(f"a tensor cannot be named {METADATA_KEY!r}: that key holds metadata")
    if "\x00" in name:
        raise HeaderError(f"tensor name {name!r} contains a NUL character")
    if _has_lone_surrogate(name):
        raise HeaderError(f"tensor name {name!r} is not valid Unicode (lone surrogate)")
    return name


def check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    """Validate user metadata for writing: a mapping of str to str, no NUL characters."""
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise HeaderError(
            f"metadata must be a mapping of str to str, got {type(metadata).__name__}"
        )
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise HeaderError(
                f"metadata must map str to str, got {type(key).__name__} {key!r:.60} -> "
                f"{type(value).__name__} {value!r:.60}"
            )
        if "\x00" in key or "\x00" in value or _has_lone_surrogate(key + value):
            raise HeaderError(
                f"metadata entry {key!r:.60} contains a NUL character or a lone surrogate"
            )
        out[key] = value
    return out


def plan_layout(
    tensors: Iterable[tuple[str, DType, tuple[int, ...]]],
    metadata: Mapping[str, str] | None,
    alignment: int = 64,
) -> tuple[bytes, list[PlannedTensor]]:
    """Decide the order and offsets of tensors and encode the header.

    Args:
        tensors: (name, dtype row, shape) for each tensor; names must be unique.
        metadata: Validated metadata, or None for none.
        alignment: 8 for the reference writer's exact layout, 64 (or a larger power of
            two) for the zero-copy layout.

    Returns:
        ``(prefix_and_header, planned)``: the 8-byte length plus the padded JSON header,
        and the tensors in file order with their offsets.

    Raises:
        HeaderError: Bad alignment, a packed tensor that is not whole bytes, or a header
            larger than :data:`MAX_HEADER_SIZE`.
    """
    if alignment < 8 or alignment & (alignment - 1):
        raise HeaderError(f"alignment must be a power of two >= 8, got {alignment}")
    sized: list[tuple[int, int, str, DType, tuple[int, ...], int]] = []
    for name, dtype, shape in tensors:
        count = 1
        for d in shape:
            count *= d
        nbits = count * dtype.bits
        if nbits % 8:
            raise OffsetError(
                f"tensor {name!r}: {count} elements of {dtype.code} ({dtype.bits} bits) is "
                "not a whole number of bytes; pad it to a multiple of "
                f"{8 // _gcd(8, dtype.bits)} elements"
            )
        nbytes = nbits // 8
        group = 0 if alignment == 8 or nbytes % alignment == 0 else 1
        sized.append((group, dtype.rank, name, dtype, shape, nbytes))
    sized.sort(key=lambda t: (t[0], t[1], t[2]))

    planned: list[PlannedTensor] = []
    cursor = 0
    for _, _, name, dtype, shape, nbytes in sized:
        planned.append(PlannedTensor(name, dtype, shape, cursor, cursor + nbytes))
        cursor += nbytes
    return encode_header(planned, metadata, alignment), planned


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def encode_header(
    planned: list[PlannedTensor], metadata: Mapping[str, str] | None, alignment: int
) -> bytes:
    """Encode the length prefix and the JSON header, padded with spaces so that the data
    section starts at a multiple of ``alignment`` (8: the reference's padding)."""
    obj: dict[str, Any] = {}
    if metadata is not None:
        obj[METADATA_KEY] = dict(metadata)
    for t in planned:
        obj[t.name] = {"dtype": t.dtype.code, "shape": list(t.shape), "data_offsets": [t.begin, t.end]}
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if alignment == 8:
        n = len(text) + (-len(text)) % 8
    else:
        n = len(text) + (-(PREFIX_SIZE + len(text))) % alignment
    if n > MAX_HEADER_SIZE:
        raise HeaderError(
            f"header too large: {n} bytes, the limit is {MAX_HEADER_SIZE}; split the "
            "tensors over several files or shorten names/metadata"
        )
    return _U64.pack(n) + text + b" " * (n - len(text))
