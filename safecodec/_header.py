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
   keep the last value. Numbers anywhere (ignored fields included) must be within the
   f64 range *as serde_json computes it* (``1e400``, a 400-digit integer and even
   ``1.7976931348623158e308`` are "out of range"; see ``_f64_out_of_range``).
6. tensors walked in (BEGIN, END) order with a cursor from 0: BEGIN must equal the cursor
   and END >= BEGIN ("invalid offset"); the element count times the bit width must fit in
   64 bits ("overflow"); must be whole bytes ("misaligned"); END - BEGIN must equal the
   byte size ("invalid shape, data type, or offset").
7. 8 + N + final cursor must equal the source size: "truncated file" when the source is
   shorter (both sizes shown), "file not fully covered" when bytes follow the last tensor.

This module is the reference: :func:`parse_header` makes the checks above one at a time,
through :mod:`json` with strict hooks and a tensor-by-tensor walk, and alone words the
errors. :mod:`safecodec._header_fast` holds the faster paths for headers in the canonical
compact form that every known writer emits; readers go through it, it tries those paths
first and hands every other header (and every header with a problem to report) to this
one. The rules the two share are defined here once: the reserved key
(:data:`METADATA_KEY`), the dtype table (:data:`safecodec._dtypes.DTYPES`), the element
count with the reference's overflow rule (:func:`element_count`) and the tiling walk
(:func:`check_layout`); tests hold the fast paths' results equal to this module's on
every input they generate.

Two deliberate deviations from the reference: a tensor name that appears twice is
rejected (the reference silently keeps the last), and NUL characters in tensor names or
metadata are rejected (on write too).

The writer side (:func:`plan_layout`) produces either the reference writer's exact layout
(``alignment=8``) or safecodec's zero-copy layout (``alignment=64``): header padded with
spaces so that data starts at a multiple of 64, tensors whose byte size is a multiple of 64
first, so each of them starts 64-byte aligned.
"""

from __future__ import annotations

import gc
import json
import math
import operator
import re
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from itertools import compress, repeat
from typing import Any, Final, NamedTuple

import numpy as np

from ._dtypes import DTYPES, DType
from ._errors import HeaderError, OffsetError, counted

__all__ = [
    "MAX_HEADER_SIZE",
    "MAX_NESTING",
    "PREFIX_SIZE",
    "Header",
    "TensorInfo",
    "decode_length",
    "encode_header",
    "explain_foreign",
    "foreign_format",
    "parse_header",
    "plan_layout",
]

#: Size of the little-endian u64 that precedes the header.
PREFIX_SIZE: Final = 8
#: The reference reader refuses headers longer than this (bytes), before reading them.
MAX_HEADER_SIZE: Final = 100_000_000
#: The deepest array/object level the reference accepts, the top-level object being level
#: 1. serde_json starts with a recursion budget of 128 and fails when it reaches 0, so level
#: 128 is already rejected (measured on the 0.8.0 wheel: 125 arrays inside an unknown field
#: of a tensor entry, levels 3..127, pass; 126 fail).
MAX_NESTING: Final = 127
#: Shape entries and offsets are u64 in the reference; anything at or above is rejected.
U64_LIMIT: Final = 1 << 64
#: NumPy (np.intp) cannot hold a larger dimension, not even in an empty array.
MAX_NUMPY_DIM: Final = sys.maxsize
#: NumPy cannot make arrays of more dimensions (64 since NumPy 2, 32 before).
MAX_NUMPY_NDIM: Final = 64 if int(np.__version__.split(".")[0]) >= 2 else 32
#: Readers hand out plain views (one ndarray constructor, no checks) for tensors of at
#: most this many dimensions, which every NumPy can represent (NumPy 1.x's limit); more
#: dimensions take the checked path (:func:`check_numpy_shape`).
VIEW_MAX_NDIM: Final = 32
#: The zero-copy layout's alignment (``alignment=64``, the writers' default): the data
#: section starts at a multiple of it and every tensor whose byte size is a multiple of it
#: starts at such an offset, because JAX's CPU client aliases host memory whose address is
#: a multiple of it (and copies any other). The one definition of that number.
ZERO_COPY_ALIGNMENT: Final = 64
#: Key that holds user metadata instead of a tensor.
METADATA_KEY: Final = "__metadata__"
#: The three fields a tensor entry must have, in the order the reference writes them.
TENSOR_FIELDS: Final = ("dtype", "shape", "data_offsets")

#: First bytes of files that people mistake for safetensors files, and what to say. A
#: PyTorch checkpoint (``.pt``/``.bin``) is a zip archive (``torch.save`` since PyTorch 1.6)
#: or a pickle (older ``torch.save``: opcode PROTO, 0x80, then the protocol number). These
#: only word an error the format checks raise anyway: a file is never rejected for them.
FOREIGN_MAGIC: Final = (
    (b"PK\x03\x04",
     "a zip archive, which is how torch.save stores a PyTorch checkpoint (.pt/.bin; a NumPy "
     ".npz is one too)",
     "Load it with torch.load(path, weights_only=True) (numpy.load for an .npz) and write "
     "the tensors with safecodec.save_file"),
    *((bytes([0x80, protocol]),
       f"a Python pickle (protocol {protocol}): a PyTorch checkpoint (.pt/.bin) as older "
       "torch.save wrote them, or another pickled object",
       "Load it with torch.load(path, weights_only=True) (never unpickle an untrusted file) "
       "and write the tensors with safecodec.save_file")
      for protocol in range(2, 6)),
    (b"GGUF", "a GGUF file (llama.cpp)", "Convert it with llama.cpp's tools"),
    (b"\x93NUMPY", "a NumPy .npy file",
     "Load it with numpy.load and write it with safecodec.save_file"),
)
_U64 = struct.Struct("<Q")
# A digit run this long may be an integer beyond u64 (serde_json then makes it an f64).
_LONG_DIGITS = re.compile(r"[0-9]{20}")
# Only a float literal with a 3-digit exponent or a long digit run can reach the edge of
# the f64 range, where the reference's parser fails: only then are floats checked one by
# one (a Python call per float). With an exponent of at most 99, the integer part needs
# at least 210 digits to reach 1e308 ("1" + 289 zeros + "e20" is out of range), so runs
# of 200 digits already count as risky.
_RISKY_FLOAT = re.compile(r"[eE][+-]?[0-9]{3}|[0-9]{200}")


class ParsedHeader(NamedTuple):
    """The header's content after check 5 and before the tiling walk (checks 6-7), as
    parallel lists in document order: what every parser of check 5 hands to
    :func:`check_layout`."""

    metadata: dict[str, str] | None
    names: list[str]
    dtypes: list[DType]
    shapes: list[tuple[int, ...]]
    begins: list[int]
    ends: list[int]


class TensorInfo(NamedTuple):
    """What the header says about one tensor (an immutable named tuple).

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
    def count(self) -> int:  # type: ignore[override]  # shadows tuple.count on purpose
        """Number of logical elements."""
        return math.prod(self.shape)


class Header:
    """A parsed, validated header.

    Attributes:
        tensors: name -> :class:`TensorInfo`, in file order (ascending offsets).
        raw_metadata: The ``__metadata__`` mapping exactly as stored (safecodec's own keys
            under :data:`RESERVED_PREFIX` included), or None when the file has none.
        header_size: N, the length of the JSON text in bytes (padding included).
        file_size: Total size of the file in bytes.
    """

    # A plain slotted class: a dataclass costs ~1 ms of import time, which the first read
    # would pay.
    __slots__ = ("_sorted_names", "file_size", "header_size", "raw_metadata", "tensors")

    def __init__(self, tensors: Mapping[str, TensorInfo], raw_metadata: dict[str, str] | None,
                 header_size: int, file_size: int) -> None:
        self.tensors = tensors
        self.raw_metadata = raw_metadata
        self.header_size = header_size
        self.file_size = file_size
        self._sorted_names: list[str] = []

    def __repr__(self) -> str:
        return (f"Header({counted(len(self.tensors), 'tensor')}, metadata={self.metadata!r}, "
                f"header_size={self.header_size}, file_size={self.file_size})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Header):
            return NotImplemented
        return (self.tensors, self.raw_metadata, self.header_size, self.file_size) == (
            other.tensors, other.raw_metadata, other.header_size, other.file_size)

    __hash__ = None  # type: ignore[assignment]

    @property
    def metadata(self) -> dict[str, str] | None:
        """The user's metadata: ``raw_metadata`` without safecodec's own keys (checksums,
        tree structure), exactly as the user wrote it; None when there is none."""
        return visible_metadata(self.raw_metadata)

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


#: Metadata keys starting with this belong to safecodec (checksums, tree structure) and
#: are hidden from :attr:`Header.metadata` and ``safe_open(...).metadata()``.
RESERVED_PREFIX: Final = "safecodec."
#: The metadata key holding a saved tree's recorded structure (JSON; see ``_tree_record``).
TREE_KEY: Final = RESERVED_PREFIX + "tree"
#: The metadata key holding per-tensor checksums (:mod:`safecodec._integrity`).
CHECKSUM_KEY: Final = RESERVED_PREFIX + "checksums"
#: The metadata key naming the save a shard of a sharded checkpoint belongs to (random,
#: the same in every shard of one save): two saves never write the same shard header.
CHECKPOINT_KEY: Final = RESERVED_PREFIX + "checkpoint"
_TREE_KEY: Final = TREE_KEY


def visible_metadata(raw: dict[str, str] | None) -> dict[str, str] | None:
    """``raw`` without the keys under :data:`RESERVED_PREFIX`.

    None when the file has no metadata, or when only safecodec's keys are present and the
    recorded tree says the user gave none (the tree writer always needs ``__metadata__``).
    """
    if raw is None:
        return None
    if not any(k.startswith(RESERVED_PREFIX) for k in raw):
        return dict(raw)
    user = {k: v for k, v in raw.items() if not k.startswith(RESERVED_PREFIX)}
    if not user and set(raw) == {CHECKPOINT_KEY}:
        return None  # a shard of a sharded save without user metadata
    if not user and _TREE_KEY in raw:
        try:
            if json.loads(raw[_TREE_KEY]).get("metadata") is False:
                return None
        except (ValueError, AttributeError, RecursionError):
            pass  # a broken record is reported by whoever reads the tree
    return user


# ----------------------------------------------------------------------------- parsing


def foreign_format(prefix: bytes | bytearray | memoryview) -> tuple[str, str] | None:
    """``(what the file is, what to do)`` when a file that starts with ``prefix`` is a known
    other format (a PyTorch checkpoint...; :data:`FOREIGN_MAGIC`), else None.

    Examples:
        >>> foreign_format(b"PK\\x03\\x04\\x14\\x00\\x00\\x00")[0][:13]
        'a zip archive'
    """
    head = bytes(prefix[:8])
    for magic, what, todo in FOREIGN_MAGIC:
        if head.startswith(magic):
            return what, todo
    return None


def explain_foreign(exc: HeaderError, prefix: bytes | bytearray | memoryview) -> HeaderError:
    """``exc`` itself, or, when the file is a known other format, a :class:`HeaderError`
    of the same class that says first what the file is and what to do, then the format
    check's own words. The verdict never changes, only the words."""
    known = foreign_format(prefix)
    if known is None:
        return exc
    what, todo = known
    return type(exc)(f"not a safetensors file: this is {what}. {todo}. Format check: {exc}")


def decode_length(prefix: bytes | bytearray | memoryview, source_size: int) -> int:
    """Checks 1-3: decode N from the first 8 bytes and check it against the source size.

    Args:
        prefix: At least the first 8 bytes of the source (more is ignored).
        source_size: Total number of bytes in the source.

    Returns:
        N, the header length in bytes.

    Raises:
        HeaderError: The source is shorter than 8 bytes, N is over
            :data:`MAX_HEADER_SIZE`, or 8 + N runs past the end of the source (for a
            known other format, such as a PyTorch checkpoint, the message says so first).
    """
    try:
        return _decode_length(prefix, source_size)
    except HeaderError as exc:
        explained = explain_foreign(exc, prefix)
        if explained is exc:
            raise
        raise explained from None


def _decode_length(prefix: bytes | bytearray | memoryview, source_size: int) -> int:
    if source_size < PREFIX_SIZE or len(prefix) < PREFIX_SIZE:
        raise HeaderError(
            f"header too small: a safetensors file starts with {PREFIX_SIZE} bytes of header "
            f"length, got {source_size if source_size < PREFIX_SIZE else len(prefix)} bytes"
        )
    (n,) = _U64.unpack_from(prefix, 0)
    if n > MAX_HEADER_SIZE:
        beyond = (f"; it also exceeds the file size of {source_size} bytes: not a "
                  "safetensors file?" if PREFIX_SIZE + n > source_size else "")
        raise HeaderError(
            f"header too large: {n} bytes, the limit is {MAX_HEADER_SIZE} (the first 8 bytes "
            f"of a safetensors file are the header length{beyond})"
        )
    if PREFIX_SIZE + n > source_size:
        raise HeaderError(
            f"invalid header length: header claims {n} bytes, but only "
            f"{source_size - PREFIX_SIZE} bytes follow the length prefix (a truncated file, "
            "or not a safetensors file?)"
        )
    return int(n)


def _shape_text(shape: tuple[int, ...]) -> str:
    """A shape for an error message, shortened when a hostile header makes it huge."""
    if len(shape) <= 8:
        return str(list(shape))
    return f"[{', '.join(map(str, shape[:8]))}, ...] ({len(shape)} dimensions)"


def _invalid_json(reason: str) -> HeaderError:
    return HeaderError(f"invalid JSON in header: {reason}")


_U64_MAX_TEXT: Final = str(U64_LIMIT - 1)
# Powers of ten as the reference's table holds them (f64 literals 1e0 .. 1e308).
_POW10: Final = tuple(float(f"1e{i}") for i in range(309))


def _f64_out_of_range(text: str) -> bool:
    """Whether serde_json (as built into the reference, without its ``float_roundtrip``
    feature) fails with "number out of range" on this JSON number literal.

    serde_json does not round correctly at the edge of the f64 range: it keeps the first
    digits that fit in a u64 significand, drops the rest (counting them in the exponent),
    and multiplies by one power of ten. So ``1.7976931348623158e308``, which rounds to the
    largest f64, is out of range for it, and so is the largest f64 written as an integer.
    This replays that arithmetic exactly; the literal is known to be valid JSON.
    """
    body = text.lstrip("-")
    cut = len(body)
    for mark in ("e", "E"):
        at = body.find(mark)
        if at >= 0:
            cut = at
    mantissa, exp_text = body[:cut], body[cut + 1 :]
    int_digits, _, frac_digits = mantissa.partition(".")
    significand = 0
    exponent = 0
    full = False  # the significand stopped growing: later digits only scale
    for c in int_digits:
        if full:
            exponent += 1
            continue
        nxt = significand * 10 + (ord(c) - 48)
        if nxt >= U64_LIMIT:
            full = True
            exponent += 1
        else:
            significand = nxt
    for c in frac_digits:
        if full:
            break  # digits after the point that do not fit are dropped
        nxt = significand * 10 + (ord(c) - 48)
        if nxt >= U64_LIMIT:
            break
        significand = nxt
        exponent -= 1
    if exp_text:
        positive_exp = not exp_text.startswith("-")
        digits = exp_text.lstrip("+-")
        value = int(digits) if len(digits) <= 11 else 1 << 40
        if value > 0x7FFF_FFFF:  # the exponent itself overflows an i32
            return significand != 0 and positive_exp
        exponent = exponent + value if positive_exp else exponent - value
    f = float(significand)
    while True:
        index = abs(exponent)
        if index < len(_POW10):
            if exponent >= 0:
                return f * _POW10[index] == math.inf
            return False
        if f == 0.0:
            return False
        if exponent >= 0:
            return True
        f /= 1e308
        exponent += 308


def _parse_int_checked(text: str) -> int | float:
    """Integer literals as the reference's serde_json sees them: ``-0`` is a float (so not
    a valid shape entry or offset), and an integer beyond u64 becomes an f64, which fails
    when it is out of f64 range."""
    if text == "-0":
        return -0.0
    digits = text.lstrip("-")
    if len(digits) > 20 or (len(digits) == 20 and digits > _U64_MAX_TEXT):
        if _f64_out_of_range(text):
            raise _invalid_json(f"number out of range: {text[:40]}... ({len(text)} characters)")
        return float(text)  # beyond u64 the reference has a float, never a valid integer
    return int(text)


def _parse_float_checked(text: str) -> float:
    """Float literals: serde_json fails on those beyond f64 (see :func:`_f64_out_of_range`)."""
    value = float(text)
    if -1e308 <= value <= 1e308:
        return value  # far from the edge of the f64 range: no exact check needed
    if _f64_out_of_range(text):
        raise _invalid_json(f"number out of range: {text[:40]}")
    return float(text)


def _reject_constant(text: str) -> Any:
    raise _invalid_json(f"{text} is not valid JSON")


def has_lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate, which no file may: it is not valid UTF-8."""
    # Lone surrogates survive json.loads (valid pairs are joined); strict UTF-8 rejects them.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_surrogates(value: Any) -> None:
    """Check that no string (keys included) holds a lone surrogate escape."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if type(item) is str:
            if has_lone_surrogate(item):
                raise _invalid_json(f"lone surrogate escape in string {item!r:.60}")
        elif type(item) is _Pairs:
            for k, v in item:
                if has_lone_surrogate(k):
                    raise _invalid_json(f"lone surrogate escape in key {k!r:.60}")
                stack.append(v)
        elif type(item) is list:
            stack.extend(item)


def _nesting_depth(value: Any, start: int) -> int:
    """Deepest array/object level inside ``value``, counting from ``start`` (the level of
    the container ``value`` sits in); stops early once past :data:`MAX_NESTING`."""
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
            values = map(operator.itemgetter(1), item) if kind is _Pairs else item
            # Only containers go on the stack, selected at C level (a million numbers in
            # an unknown field cost no Python call each).
            values = list(values)
            kids = compress(values, map(isinstance, values, repeat(_CONTAINERS)))
            stack.extend(zip(kids, repeat(level)))
    return deepest


class _Pairs(list):  # type: ignore[type-arg]
    """A JSON object as the list of its (key, value) pairs, in document order, so that
    repeated keys are seen (a dict would silently keep the last)."""

    __slots__ = ()


_CONTAINERS: Final = (list,)  # _Pairs is a list subclass


def _u64_list(value: Any, what: str, name: str) -> list[int]:
    if type(value) is not list:
        raise _invalid_json(
            f"{what} of tensor {name!r} must be an array of integers, got {value!r:.60}"
        )
    for x in value:
        if type(x) is not int or x < 0 or x >= U64_LIMIT:
            raise _invalid_json(
                f"{what} of tensor {name!r} must hold integers in [0, 2**64), got {x!r:.60}"
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
        elif (type(value) is list or type(value) is _Pairs) and (
            _nesting_depth(value, 2) > MAX_NESTING
        ):
            # Unknown fields are ignored, but still bound by the nesting limit
            # (top object = 1, entry = 2, this value = 3...).
            raise _invalid_json(f"nesting deeper than {MAX_NESTING} levels in tensor {name!r}")
    if seen != 7:
        missing = [f for bit, f in zip((1, 2, 4), TENSOR_FIELDS, strict=True) if not seen & bit]
        raise _invalid_json(f"tensor {name!r} is missing field(s) {', '.join(missing)}")
    if type(dtype_code) is not str:
        raise _invalid_json(f"dtype of tensor {name!r} must be a string, got {dtype_code!r:.40}")
    dtype = DTYPES.get(dtype_code)
    if dtype is None:
        raise _invalid_json(
            f"unknown dtype {dtype_code!r:.40} for tensor {name!r} (codes are "
            "case-sensitive: BOOL, U8, I8, F16, BF16, F32, ...)"
        )
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


def _parse_general(text: str) -> ParsedHeader:
    """Check 5 for any header: strict JSON through the json module, with hooks that make
    it judge numbers, constants and repeated keys the way the reference does."""
    # Escapes are the only way to a lone surrogate or a NUL; a minus sign or a long digit
    # run the only way to "-0" or an out-of-range integer. Checking them costs a Python
    # call per value, so only headers that contain them pay for it.
    escapes = "\\" in text
    risky_ints = "-" in text or _LONG_DIGITS.search(text) is not None
    try:
        top = json.loads(
            text,
            object_pairs_hook=_Pairs,
            parse_constant=_reject_constant,
            parse_int=_parse_int_checked if risky_ints else None,
            parse_float=_parse_float_checked if _RISKY_FLOAT.search(text) else None,
        )
    except HeaderError:
        raise
    except json.JSONDecodeError as exc:
        raise _invalid_json(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise _invalid_json(f"nesting deeper than {MAX_NESTING} levels") from None
    except (ValueError, OverflowError, MemoryError) as exc:
        raise _invalid_json(f"{type(exc).__name__}: {str(exc)[:80]}") from None

    if type(top) is not _Pairs:
        kind = "array" if type(top) is list else type(top).__name__
        raise _invalid_json(f"the header must be a JSON object, got {kind}")
    if escapes:
        _check_surrogates(top)

    metadata: dict[str, str] | None = None
    metadata_seen = False
    seen_names: set[str] = set()
    parsed = ParsedHeader(None, [], [], [], [], [])
    for name, value in top:
        if name == METADATA_KEY:
            if metadata_seen:
                raise _invalid_json("duplicate field '__metadata__'")
            metadata_seen = True
            metadata = _parse_metadata(value)
            continue
        dtype, shape, offsets = _parse_entry(name, value)
        if name in seen_names:
            raise HeaderError(
                f"duplicate tensor name {name!r}: the format forbids duplicates "
                "(the reference reader would silently keep the last one)"
            )
        seen_names.add(name)
        parsed.names.append(name)
        parsed.dtypes.append(dtype)
        parsed.shapes.append(tuple(shape))
        parsed.begins.append(offsets[0])
        parsed.ends.append(offsets[1])
    # Deliberate deviation: NUL can only come from a \u0000 escape.
    if escapes:
        for name in parsed.names:
            if "\x00" in name:
                raise HeaderError(
                    f"tensor name {name!r} contains a NUL character (safecodec rejects NUL "
                    "in names and metadata; the reference accepts it)"
                )
        if metadata and any("\x00" in k or "\x00" in v for k, v in metadata.items()):
            bad = next(k for k, v in metadata.items() if "\x00" in k or "\x00" in v)
            raise HeaderError(
                f"__metadata__ entry {bad!r:.60} contains a NUL character (safecodec "
                "rejects NUL in names and metadata; the reference accepts it)"
            )
    return ParsedHeader(metadata, parsed.names, parsed.dtypes, parsed.shapes, parsed.begins,
                        parsed.ends)


#: Shapes of at most this many dimensions have their element count taken as one product
#: (an intermediate overflow is then re-checked step by step only when the product is 0
#: or huge); longer, hostile shapes are multiplied step by step and stop early.
WHOLE_PRODUCT_MAX_NDIM: Final = 16


def element_count(shape: tuple[int, ...]) -> int | None:
    """Product of ``shape`` computed as the reference does, left to right in u64 with
    overflow checks; None when an intermediate product overflows (even if a later 0 would
    bring it back: [2**63, 2, 0] overflows, [0, 2**63, 2] does not)."""
    count = 1
    for d in shape:
        count *= d
        if count >= U64_LIMIT:
            return None
    return count


def check_layout(parsed: ParsedHeader, header_size: int, source_size: int) -> Header:
    """Checks 6-7: tensors in (BEGIN, END) order must tile the data section exactly.

    Raises:
        OffsetError: The first tensor, in that order, that breaks a rule, worded as the
            reference words it.
    """
    names, dtypes, shapes = parsed.names, parsed.dtypes, parsed.shapes
    order = sorted(zip(parsed.begins, parsed.ends, range(len(names)), strict=True))
    new = tuple.__new__
    tensors: dict[str, TensorInfo] = {}
    cursor = 0
    prod = math.prod
    for begin, end, i in order:
        if begin != cursor or end < begin:
            raise OffsetError(
                f"invalid offset for tensor {names[i]!r}: data_offsets [{begin}, {end}], "
                f"expected to begin at {cursor} (tensors must be contiguous, without gaps "
                "or overlap)"
            )
        shape = shapes[i]
        dtype = dtypes[i]
        # Many dimensions: multiply step by step and stop at the first overflow, as the
        # reference does, instead of building a huge integer.
        count = prod(shape) if len(shape) <= WHOLE_PRODUCT_MAX_NDIM else (element_count(shape) or 0)
        # A count in [1, 2**64) means every prefix product is in range too; 0 (or a huge
        # count) needs the step-by-step product to see an intermediate overflow.
        if not 0 < count < U64_LIMIT:
            checked = element_count(shape)
            if checked is None:
                raise OffsetError(
                    f"overflow computing buffer size for tensor {names[i]!r}: shape "
                    f"{_shape_text(shape)} has more than 2**64 - 1 elements"
                )
        nbits = count * dtype.bits
        if nbits >= U64_LIMIT:
            raise OffsetError(
                f"overflow computing buffer size for tensor {names[i]!r}: shape "
                f"{_shape_text(shape)} x {dtype.bits} bits does not fit in 64 bits"
            )
        if nbits & 7:
            raise OffsetError(
                f"misaligned slice for tensor {names[i]!r}: {count} elements of "
                f"{dtype.code} ({dtype.bits} bits) is not a whole number of bytes"
            )
        if end - begin != nbits >> 3:
            raise OffsetError(
                f"invalid shape, data type, or offset for tensor {names[i]!r}: dtype "
                f"{dtype.code} shape {list(shape)} needs {nbits >> 3} bytes, "
                f"data_offsets [{begin}, {end}] span {end - begin}"
            )
        cursor = end
        tensors[names[i]] = new(TensorInfo, (names[i], dtype, shape, begin, end))

    expected = PREFIX_SIZE + header_size + cursor
    if expected > source_size:
        raise OffsetError(
            f"truncated file: the header and tensors need {expected} bytes, the file has "
            f"{source_size} ({expected - source_size} missing; an interrupted download or "
            "copy?)"
        )
    if expected != source_size:
        raise OffsetError(
            "incomplete metadata, file not fully covered: header and tensors account for "
            f"{expected} bytes, the file has {source_size} "
            f"({counted(source_size - expected, 'byte')} after the last tensor)"
        )
    return Header(tensors, parsed.metadata, header_size, source_size)


def check_numpy_shape(info: TensorInfo) -> None:
    """Raise :class:`OffsetError` when NumPy cannot represent the tensor's shape.

    The format allows any u64 dimension as long as the element count fits (``[0, 2**63,
    2]`` is a valid empty tensor, and the reference accepts it), but NumPy refuses a
    dimension above ``sys.maxsize`` even in an empty array, and more than
    :data:`MAX_NUMPY_NDIM` dimensions in any array. The header stays readable
    (``read_header``, ``keys()``); only materialising such a tensor fails, with this error.
    """
    if len(info.shape) > MAX_NUMPY_NDIM:
        raise OffsetError(
            f"tensor {info.name!r} has {len(info.shape)} dimensions: valid in the format, "
            f"but NumPy cannot represent more than {MAX_NUMPY_NDIM}"
        )
    if info.shape and max(info.shape) > MAX_NUMPY_DIM:
        raise OffsetError(
            f"tensor {info.name!r} has shape {list(info.shape)}: valid in the format, but "
            f"NumPy cannot represent a dimension above {MAX_NUMPY_DIM}"
        )


def header_text(header_bytes: bytes | bytearray | memoryview) -> str:
    """Check 4: the header bytes as text.

    Raises:
        HeaderError: The bytes are not valid UTF-8 (the message gives the first bad byte).
    """
    try:
        return str(header_bytes, "utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(
            f"invalid UTF-8 in header at byte {exc.start} of {len(header_bytes)}: {exc.reason}"
        ) from None


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for a block that allocates many acyclic objects.

    Parsing allocates a few objects per tensor, none of them in a reference cycle: the
    collector would only re-scan the heap over and over (seconds' worth in a large process
    for a large header).
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def parse_text(text: str, header_size: int, source_size: int) -> Header:
    """Checks 5-7 on the decoded header: the reference parser and walk, which find the
    first problem in the reference's order and word it."""
    return check_layout(_parse_general(text), header_size, source_size)


def parse_header(header_bytes: bytes | bytearray | memoryview, source_size: int) -> Header:
    """Checks 4-7: parse and validate the JSON header, one rule at a time (the reference).

    Readers call :func:`safecodec._header_fast.parse_header`, which accepts and rejects
    exactly what this function does, with the same result and the same errors, faster on
    canonical headers.

    Args:
        header_bytes: Exactly the N header bytes (after the 8-byte length prefix).
        source_size: Total size of the source, to check that the data is fully covered.

    Returns:
        The validated :class:`Header`, tensors in file order.

    Raises:
        HeaderError: Invalid UTF-8, JSON, or header structure (checks 4-5), a repeated
            tensor name or a NUL character (safecodec's two deviations).
        OffsetError: Offsets, shapes and dtypes do not tile the data section (checks 6-7).

    Examples:
        >>> h = parse_header(b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', 8 + 53 + 2)
        >>> h.tensors["a"].shape, h.data_start
        ((2,), 61)
    """
    text = header_text(header_bytes)
    with gc_paused():
        return parse_text(text, len(header_bytes), source_size)


# ----------------------------------------------------------------------------- writing


class PlannedTensor(NamedTuple):
    """A tensor's place in a file being written."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    begin: int
    end: int


def name_fault(name: object) -> str | None:
    """Why ``name`` cannot name a tensor in a file written here, or None when it can.

    The rules: a ``str``; not :data:`METADATA_KEY` (the format reserves that key); no NUL
    character and no lone surrogate (valid UTF-8; NUL is refused by this library on read
    too). :func:`check_name` raises this reason; the tree writer asks it to pick names
    that need no disambiguation.

    Examples:
        >>> name_fault("params.w") is None, name_fault("__metadata__")[:24]
        (True, 'a tensor cannot be named')
    """
    if type(name) is str and name.isascii() and "\x00" not in name and name != METADATA_KEY:
        return None  # the common case; ASCII cannot hold a lone surrogate
    if not isinstance(name, str):
        return f"tensor names must be str, got {type(name).__name__} {name!r:.60}"
    if name == METADATA_KEY:
        return f"a tensor cannot be named {METADATA_KEY!r}: that key holds metadata"
    if "\x00" in name:
        return f"tensor name {name!r} contains a NUL character"
    if has_lone_surrogate(name):
        return f"tensor name {name!r} is not valid Unicode (lone surrogate)"
    return None


def check_name(name: object) -> str:
    """Validate a tensor name for writing.

    Raises:
        HeaderError: :func:`name_fault` says why the name cannot be written.
    """
    fault = name_fault(name)
    if fault is None and isinstance(name, str):
        return name
    raise HeaderError(fault)


#: The reserved keys safecodec itself writes (and copies when rewriting a file).
INTERNAL_KEYS: Final = frozenset({TREE_KEY, CHECKSUM_KEY, CHECKPOINT_KEY})
# How many reserved keys a refusal lists.
_LISTED_KEYS: Final = 10


def check_metadata(metadata: Mapping[str, str] | None, *,
                   allow_internal: bool = True) -> dict[str, str] | None:
    """Validate user metadata for writing: a mapping of str to str, no NUL characters or
    lone surrogates, no key under :data:`RESERVED_PREFIX` (readers hide that prefix, so a
    user key there would seem lost).

    Args:
        metadata: The metadata, or None for none.
        allow_internal: Accept the :data:`INTERNAL_KEYS` (a file being rewritten carries
            them over). The tree writer passes False: it writes its own record, and a
            user's entry there would be read as one.

    Returns:
        A copy of ``metadata`` as a dict, or None.

    Raises:
        HeaderError: Not a mapping of str to str, a NUL or lone surrogate in an entry, or
            reserved keys (all of them listed).
    """
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise HeaderError(
            f"metadata must be a mapping of str to str, got {type(metadata).__name__}"
        )
    out: dict[str, str] = {}
    reserved: list[str] = []
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise HeaderError(
                f"metadata must map str to str, got {type(key).__name__} {key!r:.60} -> "
                f"{type(value).__name__} {value!r:.60}"
            )
        if "\x00" in key or "\x00" in value or has_lone_surrogate(key + value):
            raise HeaderError(
                f"metadata entry {key!r:.60} contains a NUL character or a lone surrogate"
            )
        if key.startswith(RESERVED_PREFIX) and not (allow_internal and key in INTERNAL_KEYS):
            reserved.append(key)
        out[key] = value
    if reserved:
        shown = ", ".join(f"{key!r:.60}" for key in reserved[:_LISTED_KEYS])
        more = f" and {len(reserved) - _LISTED_KEYS} more" if len(reserved) > _LISTED_KEYS else ""
        raise HeaderError(
            f"metadata keys starting with {RESERVED_PREFIX!r} are reserved for safecodec: "
            f"{shown}{more}; they hold safecodec's own entries and readers hide them; "
            "choose other keys"
        )
    return out


def plan_layout(
    tensors: Iterable[tuple[str, DType, tuple[int, ...]]],
    metadata: Mapping[str, str] | None,
    alignment: int = ZERO_COPY_ALIGNMENT,
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
    if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 8
            or alignment & (alignment - 1)):
        raise HeaderError(f"alignment must be a power of two >= 8, got {alignment!r}")
    sized: list[tuple[int, int, str, DType, tuple[int, ...], int]] = []
    for name, dtype, shape in tensors:
        count = math.prod(shape)
        nbits = count * dtype.bits
        if nbits % 8:
            raise OffsetError(
                f"tensor {name!r}: {count} elements of {dtype.code} ({dtype.bits} bits) is "
                "not a whole number of bytes; pad it to a multiple of "
                f"{8 // math.gcd(8, dtype.bits)} elements"
            )
        nbytes = nbits // 8
        group = 0 if alignment == 8 or nbytes % alignment == 0 else 1
        sized.append((group, dtype.rank, name, dtype, shape, nbytes))
    sized.sort(key=operator.itemgetter(0, 1, 2))  # names are unique: never a tie

    planned: list[PlannedTensor] = []
    cursor = 0
    for _, _, name, dtype, shape, nbytes in sized:
        planned.append(PlannedTensor(name, dtype, shape, cursor, cursor + nbytes))
        cursor += nbytes
    return encode_header(planned, metadata, alignment), planned


def encode_header(
    planned: list[PlannedTensor], metadata: Mapping[str, str] | None, alignment: int
) -> bytes:
    """Encode the length prefix and the JSON header, padded with spaces so that the data
    section starts at a multiple of ``alignment`` (8: the reference's padding)."""
    # Every character takes at least one byte: refuse hopeless headers before encoding them.
    at_least = sum(len(t.name) for t in planned)
    if metadata:
        at_least += sum(len(k) + len(v) for k, v in metadata.items())
    if at_least > MAX_HEADER_SIZE:
        raise HeaderError(
            f"header too large: at least {at_least} bytes of names and metadata, the limit "
            f"is {MAX_HEADER_SIZE}; split the tensors over several files or shorten "
            "names/metadata"
        )
    encode_basestring = json.encoder.encode_basestring  # what json.dumps(ensure_ascii=False) uses

    # Built by hand: the same bytes as json.dumps(obj, ensure_ascii=False,
    # separators=(",", ":")) of {"__metadata__": ..., name: {"dtype", "shape",
    # "data_offsets"}, ...}, about 3x faster for many small tensors (golden tests compare
    # with the reference writer byte for byte).
    parts: list[str] = []
    if metadata is not None:
        parts.append('"__metadata__":' + json.dumps(dict(metadata), ensure_ascii=False,
                                                     separators=(",", ":")))
    for t in planned:
        shape = ",".join(map(str, map(int, t.shape)))
        parts.append(f'{encode_basestring(t.name)}:{{"dtype":"{t.dtype.code}","shape":[{shape}],'
                     f'"data_offsets":[{t.begin},{t.end}]}}')
    text = ("{" + ",".join(parts) + "}").encode("utf-8")
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
