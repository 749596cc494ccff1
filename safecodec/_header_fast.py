"""The fast paths of the header parser: the same verdicts and results as the reference
(:mod:`safecodec._header`), faster on the headers every known writer emits.

Readers call :func:`parse_header` here. It tries, in order:

1. for headers of at least :data:`SCAN_MIN_BYTES`, ASCII and in the canonical compact form:
   :func:`_scan_compact`, which checks the raw bytes with NumPy (no string per tensor; names
   and ``TensorInfo`` objects are made only when asked for, see :class:`_LazyTensors`);
2. for any header in canonical form: :func:`_parse_canonical` (two regular-expression
   passes) and :func:`_tile_in_order` (checks 6-7 in C-level passes over whole lists);
3. for everything else, and for every header with a problem to report, the reference:
   :func:`safecodec._header.parse_text`, which alone words the errors.

Each fast path answers only "accepted, with this result" or "not mine" (None); it never
rejects. So it only has to be right about what it accepts: every header it accepts, the
reference accepts with an equal :class:`~safecodec._header.Header`. The rules the paths
apply are the reference's, taken from :mod:`safecodec._header` (the reserved key
``__metadata__``, the dtype table, the element count with its overflow rule); the tests
run every conformance case through the reference alone and through each fast path, and a
Hypothesis test generates headers near every rule's boundary and holds the three equal
(and equal to the Rust wheel's verdict).
"""

from __future__ import annotations

import _thread
import gc
import json
import math
import operator
import re
from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView
from itertools import accumulate, repeat
from typing import Any, Final

import numpy as np

from ._dtypes import DTYPES, DType
from ._header import (
    METADATA_KEY,
    PREFIX_SIZE,
    U64_LIMIT,
    WHOLE_PRODUCT_MAX_NDIM,
    Header,
    ParsedHeader,
    TensorInfo,
    element_count,
    gc_paused,
    header_text,
    parse_text,
)

__all__ = ["FAST_PATHS", "SCAN_MIN_BYTES", "parse_header"]

#: False makes :func:`parse_header` hand every header to the reference parser (the tests
#: run the conformance suite both ways).
FAST_PATHS: bool = True

#: Headers of at least this many bytes (about 800 tensors) are first checked by the NumPy
#: scan of the raw bytes (:func:`_scan_compact`); smaller ones go to the regex path, whose
#: fixed cost is lower (measured, parse plus every TensorInfo: 150 tensors 0.59 ms regex vs
#: 1.06 ms scan; 800 tensors 2.7 ms each; 10,000 tensors, one tensor read lazily: the scan
#: 2-3x faster).
SCAN_MIN_BYTES: int = 64 * 1024

_WS: Final = " \t\n\r"  # JSON whitespace; nothing else may surround the object

# --- the canonical form, parsed by one regular-expression pass (the fast path) -------------
# Every writer we know (the reference and safecodec) emits compact JSON: no whitespace
# inside the object, fields in the order dtype, shape, data_offsets, plain integers,
# strings without escapes. For such a header one C-level ``findall`` replaces the JSON
# parser: every match is one entry with the comma before it, and when the matches' lengths
# add up to the length of the text, the text is nothing but those entries. Anything else
# (escapes, unknown fields, whitespace, floats, numbers of 19+ digits, a repeated name, an
# unknown code...) goes to the reference parser, which alone produces error messages. The
# fast path therefore never has to be right about a rejection, only about an acceptance:
# it accepts only texts that the reference accepts with the same result (tested).
_NUM = r"(?:0|[1-9][0-9]{0,17})"  # at most 18 digits: always below 2**64
_PLAIN = r'[^"\\\x00-\x1f]*'  # string body without escapes or raw control characters
_ENTRY_RE = re.compile(
    rf',"({_PLAIN})":\{{"dtype":"([A-Z0-9_]{{1,16}})","shape":\[((?:{_NUM}(?:,{_NUM}){{0,31}})?)\],'
    rf'"data_offsets":\[({_NUM},{_NUM})\]\}}'
)
#: Characters of an ``_ENTRY_RE`` match outside its four groups.
_ENTRY_FRAME: Final = len(',"":{"dtype":"","shape":[],"data_offsets":[]}')
_METADATA_RE = re.compile(
    rf'"__metadata__":(\{{(?:"{_PLAIN}":"{_PLAIN}"(?:,"{_PLAIN}":"{_PLAIN}")*)?\}})'
)
_BITS = operator.attrgetter("bits")


def _parse_canonical(text: str) -> ParsedHeader | None:
    """Check 5 for a header in canonical form (see the comment on ``_NUM``), or None when
    the header is not in that form. Repeated names are not looked for here (see
    :func:`_tile_in_order`)."""
    body = text.strip(_WS)
    if body[:1] != "{" or body[-1:] != "}":
        return None
    metadata = None
    if body.startswith('"__metadata__":', 1):
        match = _METADATA_RE.match(body, 1)
        if match is None:
            return None
        if match.end() == len(body):
            return None  # that "}" closed the metadata: the outer object is unterminated
        metadata = json.loads(match.group(1))  # a repeated key keeps its last value
        entries = body[match.end() : -1]
        if entries[:1] != ",":
            return ParsedHeader(metadata, [], [], [], [], []) if not entries else None
    elif len(body) == 2:
        return ParsedHeader(None, [], [], [], [], [])
    else:
        entries = "," + body[1:-1]
    rows = _ENTRY_RE.findall(entries)
    if not rows:
        return None
    names, codes, shape_texts, offset_texts = zip(*rows, strict=True)
    covered = (
        _ENTRY_FRAME * len(rows)
        + sum(map(len, names))
        + sum(map(len, codes))
        + sum(map(len, shape_texts))
        + sum(map(len, offset_texts))
    )
    if covered != len(entries):
        return None  # something between or around the entries
    dtypes = list(map(DTYPES.get, codes))
    if None in dtypes:
        return None  # an unknown code: the reference words the error
    # The regex admitted only digits and commas: one C-level json call per kind turns
    # every distinct shape and every offset pair into integers at once. Models repeat a
    # few shapes many times; equal shapes share one tuple.
    distinct = list(set(shape_texts))
    parsed_shapes = map(tuple, json.loads("[[" + "],[".join(distinct) + "]]"))
    shapes = list(map(dict(zip(distinct, parsed_shapes, strict=True)).__getitem__, shape_texts))
    offsets = json.loads("[" + ",".join(offset_texts) + "]")
    return ParsedHeader(metadata, list(names), dtypes, shapes,  # type: ignore[arg-type]
                        offsets[0::2], offsets[1::2])


def _tile_in_order(parsed: ParsedHeader, header_size: int, source_size: int) -> Header | None:
    """Checks 6-7 for the common case, in C-level passes over whole lists: tensors listed
    in offset order, no repeated name, every check passing. Returns None as soon as any of
    that is not so; the reference's :func:`~safecodec._header.check_layout` then decides
    (and words the error) tensor by tensor.

    Listed-order tiling is the reference's sorted walk: if each tensor begins where the
    previous one ended and ends at or after it begins, (BEGIN, END) never decreases, so
    the list already is in the order the reference sorts into.
    """
    names, begins, ends, shapes = parsed.names, parsed.begins, parsed.ends, parsed.shapes
    if not names:
        return Header({}, parsed.metadata, header_size, source_size) if (
            PREFIX_SIZE + header_size == source_size) else None
    if max(map(len, shapes)) > WHOLE_PRODUCT_MAX_NDIM:
        return None  # hostile many-dimension shapes: the step-by-step walk stops early
    counts = list(map(math.prod, shapes))
    nbits = list(map(operator.mul, counts, map(_BITS, parsed.dtypes)))
    if max(nbits) >= U64_LIMIT:
        return None
    if 0 in counts and any(element_count(shapes[i]) is None
                           for i, c in enumerate(counts) if not c):
        return None
    # Contiguous, and each span 8 times its bit count: with the first checks, the running
    # bit total must equal 8 x END at every tensor (whole bytes and END >= BEGIN follow).
    if (
        begins[0] != 0
        or begins[1:] != ends[:-1]
        or list(accumulate(nbits)) != list(map(operator.mul, ends, repeat(8)))
        or PREFIX_SIZE + header_size + ends[-1] != source_size
    ):
        return None
    new = tuple.__new__
    infos = map(new, repeat(TensorInfo), zip(names, parsed.dtypes, shapes, begins, ends,
                                             strict=True))
    tensors = dict(zip(names, infos, strict=True))
    if len(tensors) != len(names) or METADATA_KEY in tensors:
        return None
    return Header(tensors, parsed.metadata, header_size, source_size)


# --- the compact scan: the canonical form checked on the raw bytes (the fastest path) ------
# For a large header in canonical form, with nothing but ASCII, the regular expression
# above still makes ~5 strings per tensor. This scan makes none: NumPy finds every quote
# (there are no escapes, so quotes are exactly the string delimiters: 10 per entry), checks
# the constant pieces between them as little-endian u64 windows, turns codes into dtypes
# through a table, and digit runs into integers eight digits at a time (SWAR). It accepts a
# subset of what the regex path accepts (fewer digits, fewer dimensions, shorter names),
# with the same result; anything else returns None and the regex path decides. The
# :class:`Header` it returns builds names and ``TensorInfo`` objects only when asked.
_U8: Final = np.dtype(np.uint8)
_U64LE: Final = np.dtype("<u8")
#: Compact-scan limits (anything beyond takes the regex path): digits per number, dimensions
#: per shape, bytes per tensor name.
_SCAN_MAX_DIGITS: Final = 16
_SCAN_MAX_NDIM: Final = 16
_SCAN_MAX_NAME: Final = 256
_PAD: Final = _SCAN_MAX_NAME + 32  # zero bytes after the entries, so windows stay in bounds
# MASKS[i]: the low i bytes of a u64.
_MASKS: Final = np.array([(1 << (8 * i)) - 1 for i in range(9)], dtype=np.uint64)
_ASCII_ZEROS: Final = 0x3030_3030_3030_3030
_HIGH_BITS: Final = 0x8080_8080_8080_8080


def _word(piece: bytes) -> int:
    return int.from_bytes(piece.ljust(8, b"\0"), "little")


def _template(text: bytes) -> tuple[tuple[int, int], ...]:
    """(offset, u64) windows that cover ``text`` (at least 8 bytes)."""
    starts = [*range(0, len(text) - 8, 8), len(text) - 8]
    return tuple((s, _word(text[s : s + 8])) for s in starts)


_AFTER_NAME: Final = _template(b'":{"dtype":"')  # at a name's closing quote
_AFTER_CODE: Final = _template(b'","shape":[')  # at a code's closing quote
_AFTER_SHAPE: Final = _template(b'],"data_offsets":[')  # two bytes before its quote
_BETWEEN: Final = _word(b']},"')  # end of one entry, start of the next
_METADATA_WORDS: Final = (_word(METADATA_KEY.encode()[:8]), _word(METADATA_KEY.encode()[8:]))


def _code_table() -> tuple[np.ndarray, np.ndarray, np.ndarray, list[DType]]:
    """Codes as (first 8 bytes, next bytes, length) keys, sorted by the first word (unique
    across the table), and the rows in that order."""
    rows = sorted(DTYPES.values(), key=lambda d: _word(d.code.encode()[:8]))
    first = np.array([_word(d.code.encode()[:8]) for d in rows], dtype=np.uint64)
    rest = np.array([_word(d.code.encode()[8:16]) for d in rows], dtype=np.uint64)
    lengths = np.array([len(d.code) for d in rows], dtype=np.int64)
    assert len(set(first.tolist())) == len(rows) and max(lengths) <= 16
    return first, rest, lengths, rows


_CODE_FIRST, _CODE_REST, _CODE_LEN, _CODE_ROWS = _code_table()
_CODE_BITS: Final = np.array([d.bits for d in _CODE_ROWS], dtype=np.int64)


def _all_at(words: np.ndarray, at: np.ndarray, template: tuple[tuple[int, int], ...]) -> bool:
    return all(bool((words[at + off] == value).all()) for off, value in template)


def _digits(words: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray | None:
    """The decimal numbers of 0..8 digits at ``starts`` (0 for length 0), or None when a
    byte there is not a digit. Eight digits at once: the SWAR reduction of a u64."""
    mask = _MASKS[lengths]
    x: np.ndarray = (words[starts] & mask) | (np.uint64(_ASCII_ZEROS) & ~mask)  # left-pad with "0"
    # A byte below "0" sets its high bit in x - "0"s (borrows only reach higher bytes,
    # already condemned); a byte above "9" in x + 0x46s (ASCII: no carry out of a byte).
    if (((x + np.uint64(0x4646_4646_4646_4646)) | (x - np.uint64(_ASCII_ZEROS)))
            & np.uint64(_HIGH_BITS)).any():
        return None
    x = x - np.uint64(_ASCII_ZEROS)
    shift = np.uint64(8) * (np.uint64(8) - lengths.astype(np.uint64))
    x = x << shift  # the digits to the top bytes: the first one is the most significant
    x = (x * np.uint64(10) + (x >> np.uint64(8))) & np.uint64(0x00FF_00FF_00FF_00FF)
    x = (x * np.uint64(100) + (x >> np.uint64(16))) & np.uint64(0x0000_FFFF_0000_FFFF)
    x = (x * np.uint64(10000) + (x >> np.uint64(32))) & np.uint64(0xFFFF_FFFF)
    return x


def _numbers(raw: np.ndarray, words: np.ndarray, starts: np.ndarray,
             ends: np.ndarray) -> np.ndarray | None:
    """The decimal numbers in [starts, ends) as int64, or None unless each is 1 to
    :data:`_SCAN_MAX_DIGITS` digits without a leading zero."""
    lengths: np.ndarray = ends - starts
    if not len(lengths):
        return lengths
    if lengths.min() < 1 or lengths.max() > _SCAN_MAX_DIGITS:
        return None
    low_len = np.minimum(lengths, 8)
    high_len = lengths - low_len
    low = _digits(words, starts + high_len, low_len)
    if low is None:
        return None
    # A leading zero: the first byte is "0" and more digits follow.
    if (raw[starts] == 0x30)[lengths > 1].any():
        return None
    if high_len.max():  # more than 8 digits somewhere
        high = _digits(words, starts, high_len)
        if high is None:
            return None
        low += high * np.uint64(100_000_000)
    values: np.ndarray = low.astype(np.int64)
    return values


_HASH_MUL: Final = np.uint64(0x0000_0100_0000_01B3)  # FNV-1's 64-bit prime


def _names_distinct(words: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> bool:
    """Whether no two names are equal, judged on a 64-bit hash of each (equal names hash
    alike; equal hashes are settled by the caller)."""
    h = lengths.astype(np.uint64)
    for at in range(0, int(lengths.max()), 8):
        h = h * _HASH_MUL + (words[starts + at] & _MASKS[np.clip(lengths - at, 0, 8)])
    h.sort()
    return not bool((h[1:] == h[:-1]).any())


def _scan_compact(header: bytes | bytearray | memoryview, text: str, header_size: int,
                  source_size: int) -> Header | None:
    """Checks 5-7 for an ASCII header in canonical form, on its bytes; None when the
    header is not such or anything is to report (see the comment above ``_U8``)."""
    if not text.isascii() or "\\" in text:
        return None
    first = len(text) - len(text.lstrip(_WS))
    tail_start = max(len(text) - 64, 0)  # padding is short: no copy of the whole text
    tail = text[tail_start:].rstrip(_WS)
    stop = tail_start + len(tail) if tail else len(text.rstrip(_WS))
    if stop - first < 2 or text[first] != "{" or text[stop - 1] != "}":
        return None
    start = first + 1
    metadata = None
    if text.startswith('"__metadata__":', start):
        match = _METADATA_RE.match(text, start, stop)
        if match is None or match.end() >= stop - 1 or text[match.end()] != ",":
            return None
        metadata = json.loads(match.group(1))  # a repeated key keeps its last value
        start = match.end() + 1
    size = stop - 1 - start  # the entries: text[start : stop - 1]
    if size < 2:
        return None
    raw = np.zeros(size + _PAD, _U8)
    entries = raw[:size]
    entries[:] = np.frombuffer(header, _U8, size, start)
    if (entries < 0x20).any():
        return None  # a control character: never canonical
    quotes = np.flatnonzero(entries == 0x22)
    count = len(quotes) // 10
    if not count or len(quotes) != 10 * count or quotes[0] or entries[-2:].tobytes() != b"]}":
        return None
    q = quotes.reshape(count, 10)
    words = np.ndarray((len(raw) - 7,), _U64LE, raw, 0, (1,))  # u64 at every byte offset
    # With every quote known, a template that holds quotes also fixes the quotes it holds:
    # q[:, 2:5] after a name, q[:, 6:8] after a code, q[:, 9] after a shape.
    name_start, name_end, code_end, offsets_quote = q[:, 0] + 1, q[:, 1], q[:, 5], q[:, 8]
    code_start = q[:, 4] + 1
    shape_start, shape_end = code_end + 11, offsets_quote - 2
    if not (
        _all_at(words, name_end, _AFTER_NAME)
        and _all_at(words, code_end, _AFTER_CODE)
        and _all_at(words, shape_end, _AFTER_SHAPE)
        and bool(((words[q[1:, 0] - 3] & _MASKS[4]) == _BETWEEN).all())
        and bool((shape_end >= shape_start).all())
    ):
        return None

    # dtype codes: (first word, second word, length) must be a row of the table.
    code_len = code_end - code_start
    if code_len.min() < 1 or code_len.max() > 16:
        return None
    first_word = words[code_start] & _MASKS[np.minimum(code_len, 8)]
    rest_word = words[code_start + 8] & _MASKS[np.clip(code_len - 8, 0, 8)]
    row = np.minimum(np.searchsorted(_CODE_FIRST, first_word), len(_CODE_ROWS) - 1)
    if not ((_CODE_FIRST[row] == first_word) & (_CODE_REST[row] == rest_word)
            & (_CODE_LEN[row] == code_len)).all():
        return None  # an unknown code: the reference words the error

    # Numbers: the shapes' digit runs, then BEGIN, then END.
    commas = np.append(np.flatnonzero(entries == 0x2C), size)
    low = np.searchsorted(commas, shape_start)
    n_commas = np.searchsorted(commas, shape_end) - low
    ndim = np.where(shape_end > shape_start, n_commas + 1, 0)
    if ndim.max() > _SCAN_MAX_NDIM:
        return None
    shaped = ndim > 0
    n_dims = int(ndim.sum())
    first_dim = (np.cumsum(ndim) - ndim)[shaped]
    dim_start = np.empty(n_dims, np.int64)
    dim_end = np.empty(n_dims, np.int64)
    inner = np.ones(n_dims, bool)
    inner[first_dim] = False
    dim_start[first_dim] = shape_start[shaped]
    n_inner = int(n_commas.sum())
    at = np.repeat(low - (np.cumsum(n_commas) - n_commas), n_commas) + np.arange(n_inner)
    dim_start[inner] = commas[at] + 1
    inner[:] = True
    inner[first_dim + ndim[shaped] - 1] = False
    dim_end[inner] = commas[at]
    dim_end[~inner] = shape_end[shaped]
    offsets_start = offsets_quote + 16
    offsets_end = np.empty(count, np.int64)
    offsets_end[:-1] = q[1:, 0] - 3
    offsets_end[-1] = size - 2
    comma = commas[np.searchsorted(commas, offsets_start)]
    values = _numbers(raw, words, np.concatenate((dim_start, offsets_start, comma + 1)),
                      np.concatenate((dim_end, comma, offsets_end)))
    if values is None:
        return None
    dims, begins, ends = values[:n_dims], values[n_dims:-count], values[-count:]

    # Checks 6-7 as in _tile_in_order; products of at most 16 dims of at most 16 digits
    # are estimated in floats first (zeros count as 1: no intermediate product overflows),
    # so that the exact int64 products cannot wrap.
    bits = _CODE_BITS[row]
    counts = np.ones(count, np.int64)
    if n_dims:
        approx = np.multiply.reduceat(np.maximum(dims, 1).astype(np.float64), first_dim)
        if not (approx * bits[shaped] < 2.0**62).all():
            return None
        counts[shaped] = np.multiply.reduceat(dims, first_dim)
    if (
        begins[0] != 0
        or not (begins[1:] == ends[:-1]).all()
        or not (counts * bits == (ends - begins) * 8).all()
        or PREFIX_SIZE + header_size + int(ends[-1]) != source_size
    ):
        return None

    name_len = name_end - name_start
    if name_len.max() > _SCAN_MAX_NAME:
        return None
    twelve = name_start[name_len == 12]  # a tensor called __metadata__ takes the long way
    if ((words[twelve] == _METADATA_WORDS[0])
            & ((words[twelve + 8] & _MASKS[4]) == _METADATA_WORDS[1])).any():
        return None
    tensors = _LazyTensors(text, start, name_start, name_end, row, shape_start, shape_end,
                           begins, ends)
    if not _names_distinct(words, name_start, name_len) and len(tensors) != len(
            set(tensors._names())):
        return None
    return Header(tensors, metadata, header_size, source_size)


#: Lookups by name that the lazy mapping answers by searching the header text before it
#: builds the whole dict (one search costs about as much as building ~10 entries).
_LAZY_LOOKUPS: Final = 32


class _LazyTensors(Mapping[str, TensorInfo]):
    """``Header.tensors`` for a header read by :func:`_scan_compact`: name ->
    :class:`TensorInfo` in file order, like the dict it stands for (equal to it, same
    iteration order, same errors). A few lookups by name search the header text; anything
    else (iteration, views, many lookups, a key that is not a str) first builds the dict,
    once, under a lock, and then delegates to it."""

    __slots__ = ("_begins", "_cache", "_dict", "_ends", "_lock", "_lookups", "_name_end",
                 "_name_start", "_rows", "_shape_end", "_shape_start", "_text")

    def __init__(self, text: str, base: int, name_start: np.ndarray, name_end: np.ndarray,
                 rows: np.ndarray, shape_start: np.ndarray, shape_end: np.ndarray,
                 begins: np.ndarray, ends: np.ndarray) -> None:
        self._text = text
        self._name_start = name_start + base  # positions in ``text``
        self._name_end = name_end + base
        self._rows = rows
        self._shape_start = shape_start + base
        self._shape_end = shape_end + base
        self._begins = begins
        self._ends = ends
        self._dict: dict[str, TensorInfo] | None = None
        self._cache: dict[str, TensorInfo] = {}
        self._lookups = 0
        self._lock = _thread.allocate_lock()

    def _names(self) -> list[str]:
        text = self._text
        return [text[i:j] for i, j in zip(self._name_start.tolist(), self._name_end.tolist(),
                                          strict=True)]

    def _shape(self, i: int) -> tuple[int, ...]:
        dims = self._text[int(self._shape_start[i]) : int(self._shape_end[i])]
        return tuple(map(int, dims.split(","))) if dims else ()

    def _materialize(self) -> dict[str, TensorInfo]:
        built = self._dict
        if built is not None:
            return built
        with self._lock:
            if self._dict is None:
                with gc_paused():  # acyclic objects only
                    self._dict = self._build()
            return self._dict

    def _build(self) -> dict[str, TensorInfo]:
        text = self._text
        names = self._names()
        shape_texts = [text[i:j] for i, j in zip(self._shape_start.tolist(),
                                                 self._shape_end.tolist(), strict=True)]
        # Models repeat a few shapes many times; equal shapes share one tuple.
        distinct = {s: tuple(map(int, s.split(","))) if s else () for s in set(shape_texts)}
        shapes = map(distinct.__getitem__, shape_texts)
        dtypes = map(_CODE_ROWS.__getitem__, self._rows.tolist())
        new = tuple.__new__
        infos = map(new, repeat(TensorInfo), zip(names, dtypes, shapes, self._begins.tolist(),
                                                 self._ends.tolist(), strict=True))
        built = dict(zip(names, infos, strict=True))
        built.update(self._cache)  # the objects already handed out stay the ones in the dict
        return built

    def _find(self, name: str) -> TensorInfo | None:
        """The entry called ``name``, found by a search of the header text."""
        if not name.isascii() or '"' in name:
            return None  # every name here is ASCII without quotes
        needle = f'"{name}":{{"dtype":"'
        text, starts = self._text, self._name_start
        lo = int(starts[0]) - 1
        hi = int(self._name_end[-1]) + len(needle)
        at = text.find(needle, lo, hi)
        while at >= 0:
            # A match starts at a name's opening quote or (a name ending in "},", read
            # from the previous entry's END on) at an END's closing quote: only the first
            # kind is a name.
            i = int(np.searchsorted(starts, at + 1))
            if i < len(starts) and int(starts[i]) == at + 1:
                info = TensorInfo(name, _CODE_ROWS[int(self._rows[i])], self._shape(i),
                                  int(self._begins[i]), int(self._ends[i]))
                return self._cache.setdefault(name, info)
            at = text.find(needle, at + 1, hi)
        return None

    def __getitem__(self, name: str) -> TensorInfo:
        built = self._dict
        if built is None:
            self._lookups += 1
            if type(name) is str and self._lookups <= _LAZY_LOOKUPS:
                found = self._cache.get(name) or self._find(name)
                if found is None:
                    raise KeyError(name)
                return found
            built = self._materialize()
        return built[name]

    def __contains__(self, name: object) -> bool:
        try:
            self[name]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def __len__(self) -> int:
        return len(self._begins) if self._dict is None else len(self._dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self._materialize())

    def keys(self) -> KeysView[str]:
        return self._materialize().keys()

    def values(self) -> ValuesView[TensorInfo]:
        return self._materialize().values()

    def items(self) -> ItemsView[str, TensorInfo]:
        return self._materialize().items()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _LazyTensors):
            other = other._materialize()
        return self._materialize() == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._materialize())

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (self._materialize(),))  # pickles (and copies) as the plain dict


def parse_header(header_bytes: bytes | bytearray | memoryview, source_size: int) -> Header:
    """Checks 4-7, as :func:`safecodec._header.parse_header` makes them (same result, same
    errors), through the fast paths first (module docstring).

    Args:
        header_bytes: Exactly the N header bytes (after the 8-byte length prefix).
        source_size: Total size of the source, to check that the data is fully covered.

    Returns:
        The validated :class:`~safecodec._header.Header`, tensors in file order.

    Raises:
        HeaderError: As the reference parser (checks 4-5 and the two deviations).
        OffsetError: As the reference parser (checks 6-7).
    """
    n = len(header_bytes)
    text = header_text(header_bytes)
    # As gc_paused(), written out: this runs once per file opened, and a generator-based
    # context manager would cost a few microseconds of a 0.3 ms parse.
    collecting = gc.isenabled()
    gc.disable()
    try:
        if FAST_PATHS:
            if n >= SCAN_MIN_BYTES:
                header = _scan_compact(header_bytes, text, n, source_size)
                if header is not None:
                    return header
            parsed = _parse_canonical(text)
            if parsed is not None:
                header = _tile_in_order(parsed, n, source_size)
                if header is not None:
                    return header
        return parse_text(text, n, source_size)
    finally:
        if collecting:
            gc.enable()
