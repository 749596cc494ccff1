"""The single-file reader: a validated :class:`~safecodec._header.Header` plus an opened
source become arrays, lazily, one tensor or one slice at a time.

Views, not copies. How a tensor's bytes reach its array is decided by ONE function,
:func:`read_route`, from the source, the options and the tensor; its value, a
:class:`Route`, is what every reader here, the JAX output and the tree loader (through
them) follow. When the source is memory (bytes, a mapping: routes ALIAS and VIEW),
tensors are NumPy views of it. Whole tensors are read into fresh memory (READ, FETCH)
only when the caller asked (``copy=True``) or the source is not addressable memory (a
file object without mmap, a remote object), and decoded (DECODE) when the dtype is
packed (F4/F6 are unpacked) or the host is big-endian. With stored checksums and
``verify=True``, where a tensor is checked on its route is decided by ONE function,
:func:`verify_point` (:class:`Check`): before anything of it is handed out, on its stored
bytes (FIRST: the buffer a view is cut from, or the whole tensor read in pieces before a
part of it), or on the bytes a read returns (RESULT: what is checked is what is returned,
read once). One method checks, :meth:`TensorReader.verify`; a route begins at
:meth:`TensorReader.begin` (FIRST) and ends in a read (RESULT).
Every option of a read travels as one frozen :class:`ReadOptions`, built once by the
routers.

Parts of tensors (slices without a mapping, the blocks of sharded JAX loads, remote
batches) are *boxes*, read by ONE engine, :class:`BoxReader` (through
:meth:`TensorReader.read_boxes`): a plan of O(ndim) numbers per box
(:func:`safecodec._indexing.box_layout`), one strided copy from memory, or as few reads as
the source allows within a read-amplification budget (:data:`READ_BUDGET`). Under ``verify=True`` a box is returned only once its whole tensor
has been checked (a box that is the whole tensor: on the bytes read).

A :class:`SafeOpen` handle produces NumPy arrays itself; other outputs (JAX) come from an
:class:`Output` object given at construction, which receives the handle's
:class:`TensorReader` with every call. The reader does not choose sources (the resolver
does) nor outputs (the routers in :mod:`safecodec._api` do).
"""

from __future__ import annotations

import _thread
import bisect
import enum
import itertools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, Protocol

import numpy as np

from . import _dtypes, _integrity, _threads
from ._dtypes import DType
from ._errors import (
    ChecksumError,
    ClosedHandleError,
    HeaderError,
    SafecodecError,
    SliceIndexError,
    TensorNotFoundError,
    counted,
)
from ._header import (
    CHECKSUM_KEY,
    PREFIX_SIZE,
    VIEW_MAX_NDIM,
    Header,
    TensorInfo,
    check_numpy_shape,
    decode_length,
    explain_foreign,
)
from ._header_fast import parse_header
from ._indexing import (
    Box,
    BoxLayout,
    ascending_box,
    box_layout,
    coalesce,
    finish_block,
    normalize_index,
    numpy_index,
    span_starts,
    span_strides,
)
from ._packed import unpack
from ._progress import ProgressBar
from ._resolve import open_source
from ._source import BufferSource, MapMode, SourceBase

__all__ = [
    "BACKENDS",
    "FIRST_READ",
    "JAX_FRAMEWORKS",
    "MEMORY_ROUTES",
    "NUMPY_FRAMEWORKS",
    "READ_BUDGET",
    "SMALL_GAP",
    "BoxReader",
    "Check",
    "Output",
    "ReadOptions",
    "Route",
    "SafeOpen",
    "TensorReader",
    "TensorSlice",
    "check_numpy_placement",
    "check_output",
    "handle_options",
    "missing_tensor",
    "normalize_framework",
    "read_header_bytes",
    "read_header_from",
    "read_route",
    "verify_point",
]

#: Bytes fetched by the first read of a source: the length prefix and, usually, the whole
#: header, in one request (remote sources) or one syscall.
FIRST_READ: Final = 64 * 1024

#: Read-amplification budget of a box read from a source that is not memory (positioned
#: reads, remote objects): the gaps between a box's runs are read with the data only
#: while the bytes read stay within this many times the box's own bytes, so a process
#: never reads another process's half of a column-sharded tensor.
READ_BUDGET: Final = 1.25
#: ...except a gap of at most this many bytes, which is always read with its neighbours:
#: it costs less than the request (or syscall) it saves (an S3 answer's headers alone are
#: about 400-600 bytes). ``safecodec._remote.MERGE_ALWAYS`` is the same rule.
SMALL_GAP: Final = 512
#: A tensor checked under ``verify=True`` without being read whole is hashed in pieces
#: of this many bytes (one read each): host memory holds one piece, not the tensor.
VERIFY_PIECE: Final = 16 << 20
#: Positioned reads of a box pass through at most about this many bytes of the file at a
#: time (spans are read into scratch memory of that size, then copied into the result).
PREAD_WINDOW: Final = 16 << 20
#: Spans of a box that is not read whole are copied with a vectorised gather when shorter
#: than this (one NumPy call per batch of spans), one slice copy each when longer.
GATHER_RUN: Final = 4096
#: At most this many ranges go to one ``read_ranges`` call of :meth:`TensorReader.read_boxes`
#: (the smallest gaps are merged first, as ``safecodec._remote.MAX_SPANS``).
BOX_REQUESTS: Final = 1024

#: ``framework=`` spellings for NumPy outputs.
NUMPY_FRAMEWORKS: Final = frozenset({"numpy", "np"})
#: ``framework=`` spellings for jax.Array outputs.
JAX_FRAMEWORKS: Final = frozenset({"jax", "flax"})


def normalize_framework(framework: Any) -> str:
    """``"numpy"`` or ``"jax"`` for an accepted ``framework=`` spelling.

    Raises:
        SafecodecError: Any other framework (``pt``, ``tf``... are not supported).
    """
    fw = str(framework).lower()
    if fw in NUMPY_FRAMEWORKS:
        return "numpy"
    if fw in JAX_FRAMEWORKS:
        return "jax"
    raise SafecodecError(
        f"unsupported framework {framework!r}; use 'numpy' (or 'np'), 'jax' or 'flax'"
    )


#: ``backend=`` values, as in the reference wheel: ``"mmap"`` maps the file (views),
#: ``"pread"`` reads every tensor with positioned reads into private memory (``copy=True``).
BACKENDS: Final = ("mmap", "pread")


class ReadOptions:
    """Every option of a read (``safe_open``, ``load_file``, ``safecodec.jax.load_file``...),
    in one frozen value: built once by the routers (:mod:`safecodec._api`) from the public
    keyword arguments, then passed down whole (sharded handles give it to every shard).

    Building one checks it: ``backend`` is one of :data:`BACKENDS` (``"pread"`` sets
    ``copy``), and ``framework`` is normalised (:func:`normalize_framework`). A plain
    class with slots, not a dataclass: the read path does not import ``dataclasses``.

    Attributes:
        framework: ``"numpy"`` or ``"jax"`` (normalised).
        copy: Every read is a copy (positioned reads, no mapping); True for
            ``backend="pread"``.
        unpack: Unpack F4/F6 tensors.
        verify: Check stored checksums on every tensor read.
        progress: A progress bar on loads.
        backend: ``"mmap"`` or ``"pread"``.
        device, sharding, strict_x64: Placement and dtype policy of JAX outputs (NumPy
            outputs accept only device None or ``"cpu"`` and no sharding).
        fs, storage_options: For remote sources.

    Raises:
        SafecodecError: An unknown backend or framework.
    """

    __slots__ = ("backend", "copy", "device", "framework", "fs", "progress", "sharding",
                 "storage_options", "strict_x64", "unpack", "verify")

    framework: str
    copy: bool
    unpack: bool
    verify: bool
    progress: bool
    backend: str
    device: Any
    sharding: Any
    strict_x64: bool
    fs: Any
    storage_options: dict[str, Any] | None

    def __init__(self, *, framework: str = "numpy", copy: bool = False, unpack: bool = True,
                 verify: bool = False, progress: bool = False, backend: str = "mmap",
                 device: Any = None, sharding: Any = None, strict_x64: bool = False,
                 fs: Any = None, storage_options: dict[str, Any] | None = None) -> None:
        if backend not in BACKENDS:
            raise SafecodecError(
                f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}"
            )
        values = {"framework": normalize_framework(framework),
                  "copy": bool(copy) or backend == "pread", "unpack": unpack,
                  "verify": verify, "progress": progress, "backend": backend,
                  "device": device, "sharding": sharding, "strict_x64": strict_x64,
                  "fs": fs, "storage_options": storage_options}
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"ReadOptions is frozen: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"ReadOptions is frozen: cannot delete {name!r}")

    def _values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ReadOptions):
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]  # holds a dict (storage_options)

    def __repr__(self) -> str:
        return "ReadOptions(" + ", ".join(f"{k}={v!r}" for k, v in self._values().items()) + ")"

    def replace(self, **changes: Any) -> ReadOptions:
        """A copy with ``changes`` (checked like a new one)."""
        return ReadOptions(**{**self._values(), **changes})

    def located(self, fs: Any) -> ReadOptions:
        """These options for a file the resolver located (a shard, the one file of a
        directory): on ``fs`` (None: local), the caller's ``storage_options`` already
        spent on building ``fs``."""
        return self.replace(fs=fs, storage_options=None)


def read_header_from(source: Any) -> Header:
    """Read and validate the header of an opened source (at most two reads; a long header's
    remainder is read straight into the one buffer that holds it)."""
    return read_header_bytes(source)[0]


def read_header_bytes(source: Any) -> tuple[Header, memoryview]:
    """:func:`read_header_from`, plus the header's bytes as stored (length prefix
    included): what a sharded index's shard identity hashes, without another read."""
    size = source.size
    if size < PREFIX_SIZE:
        decode_length(b"", size)  # raises "header too small"
    first = memoryview(source.read(0, min(size, FIRST_READ), "header"))
    n = decode_length(first, size)
    end = PREFIX_SIZE + n
    if end <= len(first):
        view = first[:end]
    else:
        whole = bytearray(end)
        whole[: len(first)] = first
        source.readinto(len(first), memoryview(whole)[len(first) :], "header")
        view = memoryview(whole)
    try:
        return parse_header(view[PREFIX_SIZE:], size), view
    except HeaderError as exc:  # e.g. a zip whose first bytes read as a plausible length
        explained = explain_foreign(exc, first)
        if explained is exc:
            raise
        raise explained from None


def missing_tensor(name: object, names: Sequence[str], where: str) -> TensorNotFoundError:
    """The error for a tensor name that is not in ``names`` (with close matches)."""
    import difflib

    close = difflib.get_close_matches(str(name), names, n=3) if len(names) < 100_000 else []
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    return TensorNotFoundError(f"no tensor named {name!r} in {where} ({counted(len(names), 'tensor')}){hint}")


class Route(enum.Enum):
    """How a tensor's bytes reach the array returned for it: the value of THE read-route
    decision, :func:`read_route`, which every reader (NumPy views and copies, slices,
    the JAX output, the tree loader through them) asks."""

    #: A view of memory nothing can change while an array uses it (safecodec's read-only
    #: mapping, immutable ``bytes``): JAX may alias it.
    ALIAS = "alias"
    #: A view of memory its owner can change (a copy-on-write mapping, a caller's
    #: buffer): NumPy outputs view it; JAX outputs copy it once.
    VIEW = "view"
    #: Positioned reads into fresh memory (``copy=True``, ``backend="pread"``, no mmap).
    READ = "read"
    #: Range requests of a remote object (or a source without positioned reads) into
    #: fresh memory.
    FETCH = "fetch"
    #: Values converted into fresh memory from the source's bytes: F4/F6 unpacked,
    #: byte-swapped on big-endian hosts, or cast to the dtype the output holds.
    DECODE = "decode"


#: The routes whose tensors are views of the reader's buffer.
MEMORY_ROUTES: Final = frozenset({Route.ALIAS, Route.VIEW})


def read_route(reader: TensorReader, dtype: DType, target: np.dtype | None = None) -> Route:
    """THE read-route decision for a whole tensor of ``dtype`` read by ``reader``.

    It depends on the source and the options (their half is fixed when the reader opens:
    :attr:`TensorReader.route`: a buffer that cannot change -> ALIAS, one that can ->
    VIEW, no buffer -> READ with positioned reads, else FETCH) and on the tensor's
    dtype: packed dtypes, big-endian hosts and a ``target`` dtype other than the file's
    (JAX with x64 off) -> DECODE. It depends on nothing else, so hot loops ask it once
    per dtype. Where the route checks checksums: :func:`verify_point`.
    """
    if (dtype.packed or not _dtypes.HOST_IS_LITTLE_ENDIAN
            or (target is not None and target != dtype.numpy)):
        return Route.DECODE
    return reader.route


class Check(enum.Enum):
    """Where a tensor's stored checksum is checked on its route (stored checksums and
    ``verify=True``): the value of THE verification decision, :func:`verify_point`."""

    #: Nothing is checked: the reader does not verify.
    NONE = "none"
    #: Before anything of the tensor is handed out, on its stored bytes, once per tensor
    #: (:meth:`TensorReader.begin`): the reader's buffer (ALIAS and VIEW, DECODE from
    #: memory), or, for a part of a tensor read without a buffer, the whole tensor read
    #: :data:`VERIFY_PIECE` bytes at a time.
    FIRST = "first"
    #: On the bytes a read returns, as they land in fresh memory (READ, FETCH, DECODE of
    #: bytes read, a box that is the whole tensor): the bytes checked are the bytes
    #: returned, read once (:meth:`TensorReader.read_span`, the box engine).
    RESULT = "result"


def verify_point(reader: TensorReader, *, whole: bool, read: bool) -> Check:
    """THE verification decision: where a tensor is checked on its route.

    Args:
        reader: The reader (its ``digests``: None when it does not verify).
        whole: The route returns the whole tensor (not a box or slice of it).
        read: The route reads (or copies) the tensor's stored bytes into fresh memory,
            where they can be checked as they arrive; False when it hands out a view of
            the reader's buffer or decodes what it reads (the bytes returned are not the
            stored ones).

    Returns:
        NONE without checksums to check; RESULT for a whole tensor read into fresh
        memory; FIRST otherwise (a view, a decode, a part).
    """
    if reader.digests is None:
        return Check.NONE
    return Check.RESULT if whole and read else Check.FIRST


def _native(arr: np.ndarray, dtype: DType) -> np.ndarray:
    """Little-endian data into native byte order (only runs on big-endian hosts, or when
    tests force the path): a byte-swapping copy through the unsigned storage type."""
    if dtype.bits <= 8:
        return arr
    swapped = arr.view(dtype.storage).astype(dtype.storage.newbyteorder("="))
    return swapped.view(dtype.numpy.newbyteorder("=") if dtype.numpy.byteorder != "|" else dtype.numpy)


def _view(buf: memoryview, offset: int, info: TensorInfo) -> np.ndarray:
    if info.end == info.begin:  # zero elements (packed dtypes never reach here)
        return np.empty(info.shape, info.dtype.numpy)
    # One constructor call, shape included: ~2.5x cheaper per tensor than frombuffer +
    # reshape, which is what 10,000 small tensors pay (benchmarks/run.py). Same result: a
    # view whose base keeps ``buf`` alive, writable exactly when ``buf`` is.
    return np.ndarray(info.shape, info.dtype.numpy, buf, offset)


def _views(reader: TensorReader, infos: list[TensorInfo]) -> dict[str, np.ndarray]:
    """Every tensor as a view of the reader's buffer: the hot loop of ``load``/``load_file``
    (10,000 small tensors cost one ndarray constructor each). Tensors that need more than
    a plain view (packed, zero-size, more dimensions than NumPy may hold) take
    :meth:`TensorReader.array`."""
    buf = reader.buffer
    base = reader.header.data_start
    make = np.ndarray
    # dtype code -> its NumPy dtype when read_route views it, None when it decodes
    dtypes: dict[str, np.dtype | None] = {}
    out: dict[str, np.ndarray] = {}
    for info in infos:
        dt = info.dtype
        shape = info.shape
        try:
            np_dtype = dtypes[dt.code]
        except KeyError:
            np_dtype = dtypes[dt.code] = (dt.numpy if read_route(reader, dt) in MEMORY_ROUTES
                                          else None)
        if np_dtype is None or info.end == info.begin or len(shape) > VIEW_MAX_NDIM:
            out[info.name] = reader.array(info)
            continue
        out[info.name] = make(shape, np_dtype, buf, base + info.begin)
    return out


class TensorReader:
    """Turns tensor infos into arrays for one opened source; owned by a :class:`SafeOpen`.

    Attributes:
        source: The opened source.
        header: Its header.
        buffer: The source's memory (a mapping or the caller's buffer) when tensors are
            handed out as views of it; None when every read is a copy (``copy=True``, no
            mmap, remote).
        unpack: Whether F4/F6 tensors are unpacked.
        digests: name -> stored checksum when reads are verified, else None.
    """

    def __init__(self, source: Any, header: Header, options: ReadOptions, *,
                 mode: MapMode, digests: dict[str, str] | None = None) -> None:
        self.source = source
        self.header = header
        self.options = options
        self.copy = options.copy
        self.unpack = options.unpack
        self.mode = mode
        self.digests = digests
        self.buffer: memoryview | None = None if options.copy else source.buffer(mode)
        #: Whether ``buffer`` can never change while an array uses it (outputs that must
        #: not change, JAX's, may alias it only then; see ``Source.stable``).
        self.stable = self.buffer is not None and bool(source.stable(mode))
        #: The source's and the options' half of :func:`read_route`, decided once.
        self.route: Route = (
            (Route.ALIAS if self.stable else Route.VIEW) if self.buffer is not None
            else Route.READ if source.positioned else Route.FETCH)
        self._verified: set[str] = set()
        self._lock = _thread.allocate_lock()
        #: The bar a load in progress advances, per tensor, by its bytes (None: no bar).
        self.progress: ProgressBar | None = None

    # -- checksums
    def begin(self, infos: Sequence[TensorInfo], *, whole: bool = True,
              read: bool | None = None) -> None:
        """Where a route begins: the tensors whose :func:`verify_point` is
        :attr:`Check.FIRST` are checked now, before anything of them is handed out.
        Every route begins here: the handle's whole tensors and slices
        (:class:`SafeOpen`), the boxes of the read engine (:meth:`read_boxes`).

        Args:
            infos: The tensors the route is about to read.
            whole: They are read whole (False: boxes or slices of them).
            read: Their stored bytes are read into fresh memory (see
                :func:`verify_point`); default: when the reader has no buffer.

        Raises:
            ChecksumError: A tensor's stored bytes do not match its checksum.
        """
        if verify_point(self, whole=whole,
                        read=self.buffer is None if read is None else read) is Check.FIRST:
            for info in infos:
                self.verify(info)

    def verify(self, info: TensorInfo, data: Any = None) -> None:
        """THE checksum check (with stored checksums and ``verify=True``; where each
        route calls it: :func:`verify_point`).

        * ``data`` None (:attr:`Check.FIRST`): the tensor's stored bytes, once per
          tensor: the buffer's, or read :data:`VERIFY_PIECE` bytes at a time.
        * ``data`` (:attr:`Check.RESULT`): the whole tensor's bytes just read, checked
          every time, since they are the bytes returned.

        Raises:
            ChecksumError: The bytes do not match the stored checksum.
        """
        if self.digests is None:
            return
        if data is None:
            if info.name in self._verified:
                return
            start = self.header.data_start + info.begin
            if self.buffer is not None:
                _integrity.check(info.name, self.buffer[start : start + info.nbytes],
                                 self.digests)
            else:
                _integrity.check_pieces(info.name, self._pieces(start, info.nbytes, info.name),
                                        self.digests)
        else:
            _integrity.check(info.name, data, self.digests)
        with self._lock:
            self._verified.add(info.name)

    def _pieces(self, start: int, length: int, name: str) -> Iterator[Any]:
        """The bytes ``start..start+length`` of the source, :data:`VERIFY_PIECE` at a time."""
        for at in range(start, start + length, VERIFY_PIECE):
            yield self.source.read(at, min(VERIFY_PIECE, start + length - at), f"tensor {name!r}")

    def raw_bytes(self, info: TensorInfo) -> Any:
        """The tensor's bytes exactly as stored (a view when the source is memory; else
        one positioned read: ``copy=True`` never maps the file)."""
        start = self.header.data_start + info.begin
        if self.buffer is not None:
            return self.buffer[start : start + info.nbytes]
        return self.source.read(start, info.nbytes, f"tensor {info.name!r}")

    # -- copies
    def read_span(self, infos: Sequence[TensorInfo], out: memoryview) -> None:
        """THE copy out of the source: the bytes of ``infos`` (tensors that follow each other
        in the file) into ``out``, in one read (a large one split across threads, see
        :mod:`safecodec._threads`); each tensor is checked against its stored
        checksum when reads are verified (:attr:`Check.RESULT`: the bytes checked are the
        bytes returned)."""
        first, last = infos[0], infos[-1]
        start = self.header.data_start + first.begin
        what = f"tensor {first.name!r}" if len(infos) == 1 else f"tensors {first.name!r}.."
        if last.end != first.begin:
            if self.buffer is not None and not self.source.positioned:
                _threads.copy(np.frombuffer(out, np.uint8), np.frombuffer(
                    self.buffer, np.uint8, last.end - first.begin, start))
            else:  # positioned reads from the page cache beat faulting a mapping in
                self.source.readinto(start, out, what)
            if self.progress is not None:
                self.progress.update(len(out))
        if verify_point(self, whole=True, read=True) is Check.RESULT:
            for info in infos:
                a = info.begin - first.begin
                self.verify(info, out[a : a + info.nbytes])

    def copies(self, infos: list[TensorInfo]) -> dict[str, np.ndarray]:
        """Every tensor as an array of its own, read with positioned reads (``copy=True``
        on a local file) using every core: a tensor large enough is split by
        :meth:`read_span` itself; smaller ones are shared out, whole, among the threads
        (each tensor is still one read, with the same errors and checksums)."""
        small: list[tuple[TensorInfo, np.ndarray]] = []
        out: dict[str, np.ndarray] = {}
        total = 0
        for info in infos:
            dt = info.dtype
            if (read_route(self, dt) is not Route.READ or not info.nbytes
                    or len(info.shape) > VIEW_MAX_NDIM
                    or info.nbytes >= 2 * _threads.MIN_PIECE):
                out[info.name] = None  # type: ignore[assignment]  # keeps file order
                continue
            arr = np.empty(info.shape, dt.numpy)
            out[info.name] = arr
            small.append((info, arr))
            total += info.nbytes
        parts = _threads.pieces(total)
        starts = list(itertools.accumulate((i.nbytes for i, _ in small), initial=0))
        # piece k reads the tensors that start in it
        cut = [bisect.bisect_left(starts, a, hi=len(small)) for a, _ in parts] + [len(small)]

        def group(a: int, b: int) -> None:
            k = parts.index((a, b))
            for info, arr in small[cut[k] : cut[k + 1]]:
                self.read_span([info], _dtypes.as_memoryview(arr.reshape(-1).view(np.uint8)))

        _threads.run(group, parts)
        for info in infos:
            if out[info.name] is None:
                out[info.name] = self.array(info)
        return out

    def array(self, info: TensorInfo) -> np.ndarray:
        """The whole tensor as an array: a view when possible (see module docstring)."""
        if 0 in info.shape or len(info.shape) > VIEW_MAX_NDIM:  # shapes NumPy may not hold
            check_numpy_shape(info)
        offset = self.header.data_start + info.begin
        dt = info.dtype
        if dt.packed:  # DECODE from the source's bytes
            if self.buffer is not None:
                raw = np.frombuffer(self.buffer, np.uint8, info.nbytes, offset)
            else:
                raw = np.empty(info.nbytes, np.uint8)
                if info.nbytes:
                    self.read_span([info], _dtypes.as_memoryview(raw))
            if not self.unpack:
                return raw if not self.copy or raw.flags.owndata else raw.copy()
            return unpack(raw, dt, info.count).reshape(info.shape)
        if self.buffer is not None:
            arr = _view(self.buffer, offset, info)
        else:
            arr = np.empty(info.shape, dt.numpy)
            if info.nbytes:
                self.read_span([info], _dtypes.as_memoryview(arr.reshape(-1).view(np.uint8)))
        if not _dtypes.HOST_IS_LITTLE_ENDIAN:
            arr = _native(arr, dt)
        return arr

    # -- boxes: parts of tensors, read by the engine (BoxReader)
    def read_box(self, info: TensorInfo, box: tuple[slice, ...], *,
                 empty: Callable[[tuple[int, ...], np.dtype], np.ndarray] | None = None,
                 ) -> np.ndarray:
        """``tensor[box]`` as a fresh C-contiguous array of the file's dtype (decoded as
        :meth:`array` decodes), reading only the box's bytes (see :meth:`read_boxes`).

        Args:
            info: The tensor.
            box: One slice per axis, start and stop in ``0..size``, step >= 1.

        Raises:
            SliceIndexError: ``box`` is not such a box.
            ChecksumError: ``verify=True`` and the tensor's bytes do not match.
        """
        return self.read_boxes([(info, box)], empty=empty)[0]

    def read_boxes(self, requests: Sequence[tuple[TensorInfo, tuple[slice, ...]]], *,
                   empty: Callable[[tuple[int, ...], np.dtype], np.ndarray] | None = None,
                   ) -> list[np.ndarray]:
        """Many boxes (tensor, one slice per axis) read by one plan; each comes back as a
        fresh C-contiguous array, in the order asked. The plan holds O(ndim) numbers per
        box, never one per row (:func:`safecodec._indexing.box_layout`).

        * **Memory** (a mapping or a buffer): one strided NumPy copy per box (a box that
          is one run of a local file: one positioned read, split across threads).
        * **Positioned reads** (``copy=True``, no mmap): the box's runs widened into spans
          while the bytes read stay within :data:`READ_BUDGET`, one read per span (bounded
          row runs otherwise), then one strided copy.
        * **Remote** (and other sources): runs widened the same way, gaps of at most
          :data:`SMALL_GAP` bytes included (a request costs more); the spans of every box
          go to ONE ``read_ranges`` call (at most :data:`BOX_REQUESTS` ranges, the
          smallest gaps merged first; merged and fetched concurrently by the source), and
          each box is cut out of what arrived.

        With ``verify=True``, a tensor that has a stored checksum is checked once before
        any box of it is returned: a box that is the whole tensor is checked on the bytes
        read; any other box costs one more pass over the whole tensor (from memory, or
        :data:`VERIFY_PIECE`-sized reads: remotely, its bytes are fetched once more).
        Every read counts in the handle's ``stats`` (a copy from memory is one request).

        Args:
            requests: ``(info, box)`` pairs; ``box`` as for :meth:`read_box`.
            empty: Allocates each result (``empty(shape, dtype)``); default ``np.empty``.

        Raises:
            SliceIndexError: A box is malformed.
            ChecksumError: ``verify=True`` and a tensor's bytes do not match.
        """
        return BoxReader(self, empty).read(requests)

    def fetched(self, infos: list[TensorInfo]) -> TensorReader:
        """Remote whole loads: stream the tensors' bytes into memory in one pass (merged,
        concurrent range requests), check that the object did not change meanwhile, and
        return a reader whose tensors are views of that private memory."""
        start = self.header.data_start
        memory = bytearray(self.header.file_size)
        # the source checks (or pins) the object's identity with every fetch
        self.source.readinto_ranges(
            memoryview(memory), [(start + i.begin, start + i.end) for i in infos], "tensors"
        )
        return TensorReader(BufferSource(memory, self.source.name), self.header,
                            self.options.replace(copy=False, backend="mmap"), mode="copy",
                            digests=self.digests)


class BoxReader:
    """THE read engine for parts of tensors (boxes) of one reader: many boxes read by one
    plan, each into a fresh C-contiguous array (see :meth:`TensorReader.read_boxes`,
    which builds one per call). A class of its own: how a box's bytes leave the source
    (a strided copy from memory, positioned reads within :data:`READ_BUDGET` and
    :data:`PREAD_WINDOW`, one merged ``read_ranges`` call remotely, packed groups) is a
    concern apart from whole tensors; it reads through the reader's source and checks
    through the reader (:meth:`TensorReader.begin`, :meth:`TensorReader.verify`).

    Args:
        reader: The reader whose tensors the boxes are cut from.
        empty: Allocates each result (``empty(shape, dtype)``); default ``np.empty``.
    """

    __slots__ = ("alloc", "reader")

    def __init__(self, reader: TensorReader,
                 empty: Callable[[tuple[int, ...], np.dtype], np.ndarray] | None = None) -> None:
        self.reader = reader
        self.alloc = empty or _empty

    def read(self, requests: Sequence[tuple[TensorInfo, tuple[slice, ...]]]) -> list[np.ndarray]:
        """Every ``(info, box)`` of ``requests``, in the order asked (see
        :meth:`TensorReader.read_boxes`)."""
        reader, alloc = self.reader, self.alloc
        out: list[Any] = [None] * len(requests)
        fetch: list[tuple[int, TensorInfo, BoxLayout, BoxLayout]] = []
        for k, (info, box) in enumerate(requests):
            dt = info.dtype
            key = _key(info, box)
            if dt.packed:  # decoded: the stored bytes are checked first
                reader.begin([info], read=False)
                out[k] = self._packed(info, key)
                continue
            layout = box_layout(info.shape, key, dt.itemsize)
            whole = not layout.outer and layout.nbytes == info.nbytes
            reader.begin([info], whole=whole, read=True)  # a part: the whole tensor first
            if not layout.nbytes:
                out[k] = alloc(layout.shape, dt.numpy)
                continue
            if reader.buffer is not None and not (reader.source.positioned and not layout.outer):
                arr = alloc(layout.shape, dt.numpy)
                _copy_strided(arr, self._strided(info, layout))
            elif reader.source.positioned:
                try:
                    arr = self._pread(info, key, layout)
                except ClosedHandleError:
                    if reader.buffer is None:
                        raise
                    # The handle is closed, its mapping is not: a slice of a mapped file
                    # outlives its handle (TensorSlice), whichever way its box is read.
                    arr = alloc(layout.shape, dt.numpy)
                    _copy_strided(arr, self._strided(info, layout))
            else:
                fetch.append((k, info, layout,
                              coalesce(layout, READ_BUDGET, SMALL_GAP, BOX_REQUESTS)))
                continue
            out[k] = self._finish(info, arr, whole)
        if fetch:
            for (k, info, layout, _), arr in zip(fetch, self._fetch(fetch), strict=True):
                out[k] = self._finish(info, arr, not layout.outer
                                      and layout.nbytes == info.nbytes)
        return out

    def _finish(self, info: TensorInfo, arr: np.ndarray, whole: bool) -> np.ndarray:
        reader = self.reader
        if verify_point(reader, whole=whole, read=True) is Check.RESULT:
            reader.verify(info, _dtypes.as_memoryview(arr.reshape(-1).view(np.uint8)))
        if reader.progress is not None:
            reader.progress.update(arr.nbytes)
        return arr if _dtypes.HOST_IS_LITTLE_ENDIAN else _native(arr, info.dtype)

    def _strided(self, info: TensorInfo, layout: BoxLayout) -> np.ndarray:
        """The box as a strided view of the buffer (one request in ``stats``)."""
        reader = self.reader
        assert reader.buffer is not None
        stats = reader.source.stats
        stats.requests += 1
        stats.bytes_read += layout.nbytes
        start = reader.header.data_start + info.begin + layout.offset
        if not layout.nbytes:
            return np.empty(layout.shape, info.dtype.numpy)
        return np.ndarray(layout.shape, info.dtype.numpy, reader.buffer, start, layout.strides)

    def _pread(self, info: TensorInfo, key: Box, layout: BoxLayout) -> np.ndarray:
        """A box of a local file by positioned reads: one per span (:func:`coalesce`:
        exact bytes unless the budget allows a gap, at most :data:`BOX_REQUESTS` spans),
        :data:`PREAD_WINDOW` bytes of the file at a time along the box's first long axis
        (the memory the spans pass through stays bounded)."""
        reader = self.reader
        base = reader.header.data_start + info.begin
        arr = self.alloc(layout.shape, info.dtype.numpy)
        what = f"tensor {info.name!r}"
        if not layout.outer:  # one run: straight into the result
            reader.source.readinto(base + layout.offset,
                                   _dtypes.as_memoryview(arr.reshape(-1).view(np.uint8)), what)
            return arr
        axis = next(d for d, n in enumerate(layout.shape) if n > 1)
        start, _, step = key[axis]
        rows = layout.shape[axis]
        per = max(1, PREAD_WINDOW // max(1, layout.strides[axis]))
        itemsize = info.dtype.itemsize
        for a in range(0, rows, per):
            b = min(rows, a + per)
            part = (*key[:axis], (start + a * step, start + (b - 1) * step + 1, step),
                    *key[axis + 1 :])
            sub = box_layout(info.shape, part, itemsize)
            spans = coalesce(sub, READ_BUDGET, 0, BOX_REQUESTS)
            packed = np.empty(spans.spans * spans.run, np.uint8)
            view = _dtypes.as_memoryview(packed)
            run = spans.run
            for i, at in enumerate(span_starts(spans).tolist()):
                reader.source.readinto(base + at, view[i * run : (i + 1) * run], what)
            dst = arr[(slice(None),) * axis + (slice(a, b),)]
            _copy_strided(dst, np.ndarray(sub.shape, info.dtype.numpy, packed, 0,
                                          span_strides(spans)))
        return arr

    def _fetch(self, boxes: list[tuple[int, TensorInfo, BoxLayout, BoxLayout]],
               ) -> list[np.ndarray]:
        """Boxes of a remote object (or a source without positioned reads): every span
        of every box in ONE ``read_ranges`` call, each box cut out of what arrived."""
        reader = self.reader
        data = reader.header.data_start
        starts = [data + info.begin + span_starts(spans) for _, info, _, spans in boxes]
        lengths = [spans.run for *_, spans in boxes]
        merged = _merge(np.concatenate(starts),
                        np.concatenate([s + n for s, n in zip(starts, lengths, strict=True)]),
                        BOX_REQUESTS)
        first, last = boxes[0][1].name, boxes[-1][1].name
        what = f"tensor {first!r}" if first == last else f"tensors {first!r}..{last!r}"
        ranges = [(int(a), int(b)) for a, b in merged]
        pieces = [np.frombuffer(p, np.uint8) for p in reader.source.read_ranges(ranges, what)]
        lo = merged[:, 0]
        out: list[np.ndarray] = []
        for (_, info, layout, spans), at, run in zip(boxes, starts, lengths, strict=True):
            arr = self.alloc(layout.shape, info.dtype.numpy)
            p0, p1 = np.searchsorted(lo, [at[0], at[-1]], "right") - 1
            if p0 == p1:  # the whole box arrived in one piece: one strided copy
                src = np.ndarray(layout.shape, info.dtype.numpy, pieces[p0], int(at[0] - lo[p0]),
                                 layout.strides)
            else:
                packed = np.empty(len(at) * run, np.uint8)
                for p in range(int(p0), int(p1) + 1):
                    i, j = np.searchsorted(at, [lo[p], merged[p, 1]])
                    _gather(packed[i * run : j * run], pieces[p], at[i:j] - lo[p], run)
                src = np.ndarray(layout.shape, info.dtype.numpy, packed, 0, span_strides(spans))
            _copy_strided(arr, src)
            out.append(arr)
        return out

    def _packed(self, info: TensorInfo, box: Any) -> np.ndarray:
        """A box of a packed (F4/F6) tensor: the bytes from its first element to its last
        are read once, unpacked, and the box copied out of them."""
        reader = self.reader
        dt = info.dtype
        layout = box_layout(info.shape, box, 1)  # in elements
        if not layout.nbytes:
            return np.empty(layout.shape, dt.numpy)
        group = 8 // math.gcd(8, dt.bits)  # elements per packed group (F4: 2, F6: 4)
        gbytes = group * dt.bits // 8
        first, stop = layout.offset, layout.offset + layout.extent
        lo, hi = (first // group) * gbytes, -(-stop // group) * gbytes
        start = reader.header.data_start + info.begin + lo
        if reader.buffer is not None:
            raw = np.frombuffer(reader.buffer, np.uint8, hi - lo, start)
        else:
            raw = np.frombuffer(reader.source.read(start, hi - lo, f"tensor {info.name!r}"),
                                np.uint8)
        if not reader.unpack:
            raise SafecodecError(
                f"tensor {info.name!r} is packed {dt.code}; slicing needs unpack=True"
            )
        vals = unpack(raw, dt, (hi - lo) * 8 // dt.bits)
        skip = first - (lo // gbytes) * group
        item = vals.itemsize
        src = np.ndarray(layout.shape, vals.dtype, vals, skip * item,
                         tuple(st * item for st in layout.strides))
        return np.ascontiguousarray(src)


def _empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.empty(shape, dtype)


def _key(info: TensorInfo, box: tuple[Any, ...]) -> Box:
    """A box (one slice per axis, or ``(start, stop, step)`` triples) as triples, checked:
    start and stop within the axis, step >= 1.

    Raises:
        SliceIndexError: Anything else.
    """
    shape = info.shape
    if len(box) != len(shape):
        raise SliceIndexError(
            f"tensor {info.name!r}: a box needs one slice per axis ({len(shape)}), got {len(box)}"
        )
    key = []
    for n, item in zip(shape, box, strict=True):
        if isinstance(item, slice):
            start, stop, step = item.start, item.stop, item.step
            start = 0 if start is None else start
            stop = n if stop is None else stop
            step = 1 if step is None else step
        else:
            start, stop, step = item
        if not (isinstance(start, int) and isinstance(stop, int) and isinstance(step, int)
                and 0 <= start <= n and 0 <= stop <= n and step >= 1):
            raise SliceIndexError(
                f"tensor {info.name!r} with shape {list(shape)}: a box takes slices with "
                f"start and stop in 0..size and step >= 1, got {item!r}"
            )
        key.append((start, max(start, stop), step))
    return tuple(key)


def _copy_strided(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` (a C-contiguous ``dst``, a strided ``src``); a large copy is
    split along its first axis across threads (:mod:`safecodec._threads`)."""
    rows = dst.shape[0] if dst.ndim else 0
    if dst.nbytes < 2 * _threads.MIN_PIECE or rows < 2:
        np.copyto(dst, src)
        return
    n = min(_threads.get_threads(), rows, dst.nbytes // _threads.MIN_PIECE)
    cuts = [rows * i // n for i in range(n + 1)]

    def part(a: int, b: int) -> None:
        np.copyto(dst[a:b], src[a:b])

    _threads.run(part, list(itertools.pairwise(cuts)))


def _merge(starts: np.ndarray, ends: np.ndarray, limit: int) -> np.ndarray:
    """Ranges ``(start, end)`` (int64 arrays) sorted and merged where they overlap or
    touch; while more than ``limit`` remain, the smallest gaps are merged (vectorised,
    no Python object per range). Returns an ``(n, 2)`` int64 array."""
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    reach = np.maximum.accumulate(e)
    cut = np.flatnonzero(s[1:] > reach[:-1]) + 1
    heads = np.concatenate([[0], cut]).astype(np.intp)
    lo, hi = s[heads], np.maximum.reduceat(reach, heads)
    if len(lo) > limit > 0:
        gaps = lo[1:] - hi[:-1]
        keep = np.sort(np.argpartition(gaps, len(gaps) - (limit - 1))[len(gaps) - (limit - 1):])
        heads = np.concatenate([[0], keep + 1]).astype(np.intp)
        lo, hi = lo[heads], np.maximum.reduceat(hi, heads)
    return np.stack([lo, hi], axis=1)


def _gather(dst: np.ndarray, piece: np.ndarray, offsets: np.ndarray, run: int) -> None:
    """Copy ``len(offsets)`` runs of ``run`` bytes at ``offsets`` in ``piece`` back to back
    into ``dst``: one slice copy each when runs are long, a vectorised gather of a batch
    of them at a time when they are short."""
    if run >= GATHER_RUN:
        for i, at in enumerate(offsets.tolist()):
            dst[i * run : (i + 1) * run] = piece[at : at + run]
        return
    rows = dst.reshape(len(offsets), run)
    step = max(1, (1 << 20) // run)
    inner = np.arange(run, dtype=np.int64)
    for a in range(0, len(offsets), step):
        rows[a : a + step] = piece[offsets[a : a + step, None] + inner]


class Output(Protocol):
    """What a handle needs from a non-NumPy output (the JAX output implements it). Every
    call receives the handle's reader; the output keeps no reference to the handle."""

    def convert(self, reader: TensorReader, arr: np.ndarray, info: TensorInfo) -> Any:
        """A NumPy array cut from tensor ``info`` (a slice) -> the output's type."""

    def load_tensor(self, reader: TensorReader, info: TensorInfo) -> Any:
        """The whole tensor ``info``."""

    def load_slice(self, reader: TensorReader, info: TensorInfo, per_dim: list[Any],
                   new_axes: list[int], sharding: Any) -> Any:
        """``tensor[index]`` (normalised: :func:`safecodec._indexing.normalize_index`)
        laid out with ``sharding``, each device's block read as a box."""

    def load_all(self, reader: TensorReader, infos: list[TensorInfo], *,
                 sharding: Any = None, check_names: bool = True) -> dict[str, Any]:
        """Every tensor of ``infos``, in order (``sharding`` replaces the output's own for
        this call; ``check_names``: a mapping may only name tensors of ``infos``)."""

    def check_names(self, infos: list[TensorInfo], sharding: Any, where: str) -> None:
        """Raise when a ``sharding=`` mapping names tensors that ``infos`` lacks."""


class TensorSlice:
    """A lazy view of one tensor: ``get_shape()``, ``get_dtype()``, and ``[index]`` with
    NumPy basic-indexing semantics (ints, negative ints, slices with any step, Ellipsis,
    None, and ``[]``), reading only the bytes the index needs.

    Like the reference wheel's, a slice outlives its handle when the file is mapped (the
    mapping stays alive); where every read is a positioned read (``backend="pread"``,
    ``copy=True``, remote sources), indexing it after the handle closed raises
    :class:`~safecodec.ClosedHandleError`."""

    def __init__(self, handle: SafeOpen, info: TensorInfo, sharding: Any = None) -> None:
        self._handle = handle
        self._info = info
        self._reader = handle.reader
        self._sharding = sharding

    def get_shape(self) -> list[int]:
        """The tensor's shape, as a list (like the reference wheel)."""
        return list(self._info.shape)

    def get_dtype(self) -> str:
        """The tensor's dtype code, e.g. ``"F32"`` (like the reference wheel)."""
        return self._info.dtype.code

    @property
    def shape(self) -> tuple[int, ...]:
        return self._info.shape

    @property
    def dtype(self) -> np.dtype:
        return self._info.dtype.numpy

    @property
    def ndim(self) -> int:
        return len(self._info.shape)

    def __len__(self) -> int:
        if not self._info.shape:
            raise TypeError("len() of unsized object")
        return self._info.shape[0]

    def __repr__(self) -> str:
        return f"TensorSlice({self._info.name!r}, dtype={self.get_dtype()}, shape={self.get_shape()})"

    def __getitem__(self, index: Any) -> Any:
        output = self._handle.output
        if self._sharding is not None:
            assert output is not None  # get_slice refuses sharding= on NumPy handles
            per_dim, new_axes = self._normalized(index)
            return output.load_slice(self._reader, self._info, per_dim, new_axes,
                                     self._sharding)
        arr = self.numpy(index)
        return arr if output is None else output.convert(self._reader, arr, self._info)

    def _normalized(self, index: Any) -> tuple[list[Any], list[int]]:
        info = self._info
        if 0 in info.shape or len(info.shape) > VIEW_MAX_NDIM:
            check_numpy_shape(info)
        return normalize_index(index, info.shape, info.name)

    def numpy(self, index: Any = ()) -> np.ndarray:
        """The selected part as a NumPy array (whatever the handle's framework): a view
        of the mapping or buffer when there is one, else a box read by
        :meth:`TensorReader.read_box` (only the bytes the index selects)."""
        reader = self._reader
        info = self._info
        per_dim, new_axes = self._normalized(index)
        if reader.route in MEMORY_ROUTES and not info.dtype.packed:
            full = reader.array(info)
            part: np.ndarray = full[numpy_index(per_dim, new_axes)]
            return part
        box = ascending_box(per_dim)
        block = reader.read_box(info, tuple(slice(*b) for b in box))
        return finish_block(block, per_dim, new_axes)


# ----------------------------------------------------------------------------- handle


class SafeOpen:
    """A lazy, read-only handle on one safetensors file or buffer; open it with
    :func:`safecodec.safe_open`.

    Thread-safe for reads: many threads may call ``get_tensor``/``get_slice`` at once;
    closing it while they do makes their reads finish or raise
    :class:`~safecodec.ClosedHandleError`, never read another file.

    Args:
        source: A path, fsspec URL, bytes-like object or binary file object (resolved by
            :func:`safecodec._resolve.open_source`).
        framework: ``"numpy"``/``"np"``, or ``"jax"``/``"flax"`` (then ``output`` is the
            JAX output that :func:`safecodec.safe_open` builds).
        fs, storage_options: For remote sources.
        progress: A progress bar on loads (local: bytes per tensor; remote: the transfer).
        copy: Every read is a copy (positioned reads, no mapping).
        unpack: Unpack F4/F6 tensors.
        device: NumPy outputs accept only None or ``"cpu"`` (as the reference wheel does);
            JAX outputs take their device from ``output``.
        sharding: Only for JAX outputs (taken from ``output``).
        verify: Check stored checksums on every tensor read.
        output: The output converter for non-NumPy frameworks.
        options: Every option above in one :class:`ReadOptions` (what the routers
            pass); given, it replaces the keyword options.

    It is the reference wheel's handle: one short method per verb of that API (``keys``,
    ``offset_keys``, ``metadata``, ``get_tensor``, ``get_slice``, ``get_tensors``) plus the
    few the tree, sharded and remap layers use; it decides nothing about bytes. Routes come
    from :func:`read_route`, checks from :func:`verify_point`, reads from
    :class:`TensorReader` and :class:`BoxReader`, whole loads from :func:`_load_by_route`.
    """

    def __init__(
        self,
        source: Any,
        framework: str = "numpy",
        *,
        fs: Any = None,
        copy: bool = False,
        unpack: bool = True,
        device: Any = None,
        sharding: Any = None,
        storage_options: dict[str, Any] | None = None,
        progress: bool = False,
        verify: bool = False,
        output: Output | None = None,
        options: ReadOptions | None = None,
    ) -> None:
        options, fw, output = handle_options(
            options, output, framework=framework, fs=fs, copy=copy, unpack=unpack,
            device=device, sharding=sharding, storage_options=storage_options,
            progress=progress, verify=verify)
        self.framework: str = fw
        #: The output converter (None for NumPy outputs).
        self.output: Output | None = output
        #: The options this handle reads with.
        self.options: ReadOptions = options
        self._reader: TensorReader | None = None
        self._source = open_source(source, fs=options.fs,
                                   storage_options=options.storage_options,
                                   progress=options.progress)
        try:
            self._header, self._raw_header = read_header_bytes(self._source)
            self._reader = _open_reader(self._source, self._header, options, fw)
        except BaseException:
            self._source.close()
            raise

    # -- plumbing
    @property
    def reader(self) -> TensorReader:
        """The handle's :class:`TensorReader`.

        Raises:
            ClosedHandleError: The handle is closed.
        """
        reader = self._reader
        if reader is None:
            raise ClosedHandleError("this safe_open handle is closed")
        return reader

    def _info(self, name: str) -> TensorInfo:
        self.reader  # noqa: B018 - raises when closed
        try:
            return self._header.tensors[name]
        except (KeyError, TypeError):
            raise missing_tensor(name, list(self._header.tensors), "this file") from None

    # -- the reference API
    def keys(self) -> list[str]:
        """Tensor names, sorted."""
        self.reader  # noqa: B018 - raises when closed
        return self._header.names()

    def offset_keys(self) -> list[str]:
        """Tensor names in file order (ascending offsets)."""
        self.reader  # noqa: B018 - raises when closed
        return list(self._header.tensors)

    def metadata(self) -> dict[str, str] | None:
        """The file's ``__metadata__`` (a new dict) as the user wrote it, or None when it
        has none. safecodec's own keys (prefix ``safecodec.``: checksums, tree structure)
        are hidden; ``header.raw_metadata`` has everything."""
        self.reader  # noqa: B018 - raises when closed
        return self._header.metadata

    def get_tensor(self, name: str) -> Any:
        """The whole tensor ``name``: a NumPy array (or a jax.Array for framework='jax')."""
        info = self._info(name)
        reader = self.reader
        reader.begin([info])
        if self.output is not None:
            return self.output.load_tensor(reader, info)
        return reader.array(info)

    def get_slice(self, name: str, sharding: Any = None) -> TensorSlice:
        """A lazy :class:`TensorSlice` of tensor ``name``. With verify=True the whole
        tensor is read and checked once, before the first slice.

        Args:
            name: The tensor.
            sharding: JAX handles only: a ``jax.sharding.Sharding`` laid over the shape of
                each *slice* taken (``f.get_slice(name, sharding=s)[index]`` is a
                ``jax.Array`` of ``tensor[index]`` placed with ``s``); each device's block
                is read as one box of the tensor, and nothing else is read. The handle's
                own ``sharding=`` applies to whole tensors, not to slices.

        Raises:
            SafecodecError: ``sharding`` on a NumPy handle, or not a Sharding.
        """
        info = self._info(name)
        if sharding is not None:
            if self.output is None:
                check_numpy_placement(None, sharding)
            elif not _is_sharding(sharding):
                raise SafecodecError(
                    f"get_slice(sharding=) takes a jax.sharding.Sharding, got "
                    f"{type(sharding).__name__}"
                )
        self.reader.begin([info], whole=False)
        return TensorSlice(self, info, sharding)

    def get_tensors(self) -> dict[str, Any]:
        """Every tensor, in file order."""
        return self._load_infos(list(self._header.tensors.values()), None)

    # -- what the tree and sharded layers use (framework-independent)
    def get_numpy(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a NumPy array whatever the framework (a JAX handle maps the
        file read-only, so there it is a private copy)."""
        info = self._info(name)
        reader = self.reader
        reader.begin([info])
        arr = reader.array(info)
        return arr if self.output is None else np.array(arr)

    def load_tensors(self, names: Sequence[str], *, sharding: Any = None,
                     check_names: bool = True) -> dict[str, Any]:
        """Tensors ``names`` with the handle's framework, in the order given.

        Args:
            names: Tensor names of this file.
            sharding: JAX outputs: replaces the handle's ``sharding=`` for this call.
            check_names: JAX outputs: a ``sharding=`` mapping may only name ``names``.
        """
        return self._load_infos([self._info(n) for n in names], sharding, check_names)

    def _load_infos(self, infos: list[TensorInfo], sharding: Any,
                    check_names: bool = True) -> dict[str, Any]:
        return _load_whole(self.reader, self._source, infos, self.output, sharding,
                           check_names, self.options.progress)

    # -- extras
    @property
    def header(self) -> Header:
        """The parsed :class:`~safecodec.Header`."""
        return self._header

    def raw_header(self) -> bytes:
        """The file's first ``header.data_start`` bytes: length prefix and header, as
        stored (what a sharded index's shard identity hashes)."""
        return bytes(self._raw_header)

    @property
    def name(self) -> str:
        """The source's path, URL or ``"buffer"``, for messages."""
        return str(self._source.name)

    @property
    def stats(self) -> dict[str, int]:
        """Bytes read and read requests made so far (header included)."""
        stats: dict[str, int] = self._source.stats.as_dict()
        return stats

    @property
    def closed(self) -> bool:
        return self._reader is None

    def __contains__(self, name: object) -> bool:
        return name in self._header.tensors

    def __len__(self) -> int:
        return len(self._header.tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def close(self) -> None:
        """Close the handle. Arrays already handed out stay valid; reads in flight in
        other threads finish (or raise ClosedHandleError)."""
        if self._reader is not None:
            self._reader = None
            self._source.close()

    def __enter__(self) -> SafeOpen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else counted(len(self), "tensor")
        return f"<safecodec.safe_open {self._source.name!r} ({state}), framework={self.framework!r}>"


def _open_reader(source: SourceBase, header: Header, options: ReadOptions,
                 framework: str) -> TensorReader:
    """The :class:`TensorReader` of a handle on ``source`` (NumPy handles map copy-on-write,
    JAX ones read-only), with the stored checksums when ``options.verify``.

    Raises:
        ChecksumError: ``verify=True`` and the file stores no checksums.
    """
    digests = None
    if options.verify:
        digests = _integrity.decode(header.raw_metadata)
        if digests is None:
            raise ChecksumError(
                f"verify=True, but {source.name} stores no checksums "
                f"(metadata key {CHECKSUM_KEY!r}; write them with checksums=True)"
            )
    mode: MapMode = "copy" if framework == "numpy" else "read"
    return TensorReader(source, header, options, mode=mode, digests=digests)


def _load_whole(reader: TensorReader, source: SourceBase, infos: list[TensorInfo],
                output: Output | None, sharding: Any, check_names: bool,
                progress: bool) -> dict[str, Any]:
    """Whole tensors ``infos`` of a handle, with a progress bar of their bytes when asked
    for (a remote source shows its transfer's bar instead)."""
    if not progress or source.remote:
        return _load_by_route(reader, source, infos, output, sharding, check_names)
    total = sum(i.nbytes for i in infos)
    with ProgressBar(total, f"load {os.path.basename(str(source.name))}", True) as bar:
        reader.progress = bar
        try:
            out = _load_by_route(reader, source, infos, output, sharding, check_names)
        finally:
            reader.progress = None
        if bar.done < total:  # tensors handed out as views are counted here
            bar.update(total - bar.done)
    return out


def _load_by_route(reader: TensorReader, source: SourceBase, infos: list[TensorInfo],
                   output: Output | None, sharding: Any, check_names: bool) -> dict[str, Any]:
    """Every tensor of ``infos``, by the route :func:`read_route` gives the reader: a
    remote FETCH of a whole load streams the tensors into private memory in one pass
    first (their route is then VIEW); memory routes hand out views (a tensor that
    needs DECODE takes :meth:`TensorReader.array`), READ spreads positioned reads
    over the threads (:meth:`TensorReader.copies`). Checksums: tensors handed out as
    views are checked before any is returned, read ones as they are read
    (:meth:`TensorReader.begin`, :func:`verify_point`)."""
    route = reader.route
    if route is Route.FETCH and infos and output is None and source.remote:
        reader = reader.fetched(infos)
        route = reader.route
    reader.begin(infos)
    if output is not None:
        return output.load_all(reader, infos, sharding=sharding, check_names=check_names)
    if route in MEMORY_ROUTES and _dtypes.HOST_IS_LITTLE_ENDIAN:
        return _views(reader, infos)
    if route is Route.READ:
        return reader.copies(infos)
    array = reader.array
    return {info.name: array(info) for info in infos}


def handle_options(options: ReadOptions | None, output: Output | None,
                   **fields: Any) -> tuple[ReadOptions, str, Output | None]:
    """What a handle reads with: ``options``, or (None) a :class:`ReadOptions` of the
    handle's keyword arguments ``fields``; with the framework and output
    :func:`check_output` gives."""
    if options is None:
        options = ReadOptions(**fields)
    fw, output = check_output(options.framework, options.device, options.sharding, output)
    return options, fw, output


def check_output(framework: Any, device: Any, sharding: Any,
                 output: Output | None) -> tuple[str, Output | None]:
    """``(framework, output)`` for a handle: NumPy outputs take no output object and only
    the ``"cpu"`` device; JAX outputs need the output object the routers build.

    Raises:
        SafecodecError: An unknown framework, a device or sharding NumPy cannot honour, or
            a JAX handle opened without its output.
    """
    fw = normalize_framework(framework)
    if fw == "numpy":
        check_numpy_placement(device, sharding)
        return fw, None
    if output is None:
        raise SafecodecError(
            "framework='jax' handles are opened with safecodec.safe_open(..., "
            "framework='jax'), which builds their JAX output"
        )
    return fw, output


def _is_sharding(obj: Any) -> bool:
    """Whether ``obj`` is a ``jax.sharding.Sharding`` (without importing JAX here)."""
    return any(c.__name__ == "Sharding" and c.__module__.startswith("jax")
               for c in type(obj).__mro__)


def check_numpy_placement(device: Any, sharding: Any) -> None:
    """NumPy outputs live in host memory: ``device`` may be None or ``"cpu"`` (the
    reference wheel's spelling), ``sharding`` must be None.

    Raises:
        SafecodecError: Anything else.
    """
    if sharding is not None:
        raise SafecodecError("sharding= needs framework='jax'")
    if device is not None and not (isinstance(device, str) and device.lower() == "cpu"):
        raise SafecodecError(
            f"framework='numpy' reads into host memory: device= may only be 'cpu', got "
            f"{device!r}; use framework='jax' to place tensors on a device"
        )
