"""Where bytes come from: sources over memory and local files (the fsspec source is in
:mod:`safecodec._remote`; choosing one for a path, URL or object is the resolver's job,
:mod:`safecodec._resolve`).

A :class:`Source` offers exact reads at absolute offsets (``read``), batched reads of many
ranges (``read_ranges``), and, when the whole content is addressable memory (a bytes-like
object or a memory mapping), that memory as a buffer (``buffer``) so the reader can hand
out views instead of copies.

* bytes / bytearray / memoryview / any buffer  -> :class:`BufferSource` (views, no copy)
* local path or a file object with a usable ``fileno()`` -> :class:`MappedSource`
  (a private copy-on-write mapping for NumPy outputs, a read-only one for JAX)
* the same without mmap, or a file object without ``fileno()`` -> :class:`FileSource`
  (positioned reads, one copy)
* an fsspec URL, or a path with ``fs=`` -> ``FsspecSource`` (byte-range requests).
"""

from __future__ import annotations

import _thread
import os
import sys
from collections.abc import Sequence
from functools import partial
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np

from . import _threads
from ._errors import ClosedHandleError, RemoteIOError, SafecodecError

try:  # some platforms (Pyodide, WASI) have no mmap
    import mmap as _mmap
except ImportError:  # pragma: no cover - exercised by forcing MMAP_AVAILABLE = False
    _mmap = None  # type: ignore[assignment]

__all__ = [
    "MMAP_AVAILABLE",
    "BufferSource",
    "FileSource",
    "MappedSource",
    "Source",
    "SourceBase",
    "SourceStats",
]

#: Whether memory mapping is used for local files. Tests set it to False to exercise the
#: plain-read path that platforms without mmap take.
MMAP_AVAILABLE: bool = _mmap is not None

#: Largest single read() asked of a file object: a lying length must never make us
#: allocate more than what actually arrives.
READ_CHUNK = 1 << 24

MapMode = Literal["copy", "read"]


@runtime_checkable
class Source(Protocol):
    """What the reader needs from a byte source."""

    size: int
    name: str

    def read(self, offset: int, length: int, what: str = "data") -> bytes | bytearray | memoryview: ...

    def read_ranges(
        self, ranges: Sequence[tuple[int, int]], what: str = "data"
    ) -> list[bytes | bytearray | memoryview]: ...

    def buffer(self, mode: MapMode = "copy") -> memoryview | None: ...

    def stable(self, mode: MapMode = "copy") -> bool: ...

    def readinto(self, offset: int, out: memoryview, what: str = "data") -> None: ...

    def close(self) -> None: ...


class _InFlight:
    """Reads in flight on a descriptor the source owns, so that closing the source while
    other threads read never closes the descriptor under them: the process could reuse
    its number for another file, and a read in flight would return that file's bytes.
    :meth:`close` waits for nothing: the last read to finish closes the file."""

    __slots__ = ("_close", "_closed", "_lock", "_users", "name")

    def __init__(self, name: str) -> None:
        self._lock = _thread.allocate_lock()
        self._users = 0
        self._closed = False
        self._close: Any = None
        self.name = name

    def enter(self) -> None:
        with self._lock:
            if self._closed:
                raise ClosedHandleError(f"{self.name}: read after the handle was closed")
            self._users += 1

    def exit(self) -> None:
        with self._lock:
            self._users -= 1
            close = self._close if self._closed and not self._users else None
            if close is not None:
                self._close = None
        if close is not None:
            close()

    def close(self, close: Any) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._users:
                self._close = close
                return
        close()


class SourceStats:
    """Bytes and requests a source has served (for remote sources, what crossed the wire)."""

    __slots__ = ("bytes_read", "requests")

    def __init__(self) -> None:
        self.bytes_read = 0
        self.requests = 0

    def as_dict(self) -> dict[str, int]:
        return {"bytes_read": self.bytes_read, "requests": self.requests}


class SourceBase:
    """The base of every source: byte accounting, range checks, and defaults for
    ``read_ranges``, ``readinto`` and ``buffer`` built on ``read``.

    Attributes:
        size: Total size in bytes.
        name: A path or URL, for messages.
        stats: Bytes and requests served (:class:`SourceStats`).
        positioned: True when ``readinto`` is a positioned read from a local file (the page
            cache): then copying through it beats faulting a mapping in.
        remote: True when every read crosses a network (whole loads then fetch in one
            streamed pass, and the object's identity is checked).
    """

    size: int
    name: str
    positioned: bool = False
    remote: bool = False

    def __init__(self) -> None:
        self.stats = SourceStats()

    if TYPE_CHECKING:  # every subclass defines it; declared here for the type checker only

        def read(self, offset: int, length: int, what: str = "data") -> bytes | bytearray | memoryview: ...

    def read_ranges(
        self, ranges: Sequence[tuple[int, int]], what: str = "data"
    ) -> list[bytes | bytearray | memoryview]:
        """Read each ``(start, end)`` range; the default reads them one by one."""
        return [self.read(start, end - start, what) for start, end in ranges]

    def readinto(self, offset: int, out: memoryview, what: str = "data") -> None:
        """Fill ``out`` with the bytes at ``offset``."""
        data = self.read(offset, len(out), what)
        out[:] = data

    def buffer(self, mode: MapMode = "copy") -> memoryview | None:
        """The whole content as memory, or None when it is not addressable."""
        return None

    def stable(self, mode: MapMode = "copy") -> bool:
        """Whether the memory ``buffer(mode)`` returns can never change while anything
        uses it, so that an output may alias it (see :func:`immutable_memory`). False
        when there is no buffer."""
        return False

    def close(self) -> None:
        """Release what the source holds; views already handed out stay valid."""

    def check_range(self, offset: int, length: int, what: str) -> None:
        """Raise :class:`~safecodec.RemoteIOError` unless the range lies inside the source."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RemoteIOError(
                f"unexpected end of {self.name} while reading {what}: wanted {length} bytes "
                f"at offset {offset}, the source has {self.size}"
            )


class BufferSource(SourceBase):
    """An in-memory bytes-like object. Reads are zero-copy memoryview slices."""

    def __init__(self, data: Any, name: str = "buffer") -> None:
        super().__init__()
        try:
            view = memoryview(data)
        except TypeError:
            raise SafecodecError(
                f"expected bytes, bytearray, memoryview or another buffer, got "
                f"{type(data).__name__}"
            ) from None
        if not view.c_contiguous:
            data = view.tobytes()  # our own copy, which nobody else can write
            view = memoryview(data)
        self._view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        self._stable = immutable_memory(data)
        self._closed = False
        self.size = self._view.nbytes
        self.name = name

    def read(self, offset: int, length: int, what: str = "data") -> memoryview:
        if self._closed:  # views handed out stay valid; reads (copies) end with the handle
            raise ClosedHandleError(f"{self.name}: read after the handle was closed")
        self.check_range(offset, length, what)
        self.stats.requests += 1
        self.stats.bytes_read += length
        return self._view[offset : offset + length]

    def buffer(self, mode: MapMode = "copy") -> memoryview:
        return self._view

    def close(self) -> None:
        """Later reads raise ClosedHandleError, as on every other source (``copy=True``
        reads are reads); the buffer and views of it stay valid."""
        self._closed = True

    def stable(self, mode: MapMode = "copy") -> bool:
        """True only for immutable memory (``bytes``, or views of it): a read-only view
        of a ``bytearray`` still changes when its owner writes the ``bytearray``."""
        return self._stable


def immutable_memory(data: Any) -> bool:
    """THE answer to "can these bytes change under us?" for memory a caller handed over:
    True only when they cannot, whoever holds a reference to them.

    ``readonly`` does not say that: a read-only memoryview (or a non-writeable NumPy
    array) of a ``bytearray`` changes whenever the ``bytearray``'s owner writes it. So the
    answer follows views down to the object that owns the memory (``memoryview.obj``,
    ``ndarray.base``) and trusts only ``bytes``, the one immutable buffer type. Everything
    else (``bytearray``, ``array.array``, ``mmap.mmap`` even with ``ACCESS_READ``, since the
    file under it can be written, NumPy arrays owning their memory, ctypes arrays) can
    change. Mappings safecodec makes itself answer through
    :meth:`MappedSource.stable`.

    Example:
        >>> immutable_memory(b"abc"), immutable_memory(memoryview(b"abc")[1:])
        (True, True)
        >>> immutable_memory(memoryview(bytearray(b"abc")).toreadonly())
        False
    """
    seen = 0
    while seen < 64:  # a chain of views is short; a cycle is not possible, but be finite
        seen += 1
        if isinstance(data, bytes):
            return True
        if isinstance(data, memoryview):
            if data.obj is None or data.obj is data:
                return False
            data = data.obj
        elif isinstance(data, np.ndarray):
            if data.base is None:
                return False  # the array owns its memory, and its owner may write it
            data = data.base
        else:
            return False
    return False


class FileSource(SourceBase):
    """A file read with positioned reads (``os.pread`` when there is a descriptor, else
    seek + read under a lock). Every read is a copy; used when mmap is unavailable."""

    def __init__(self, file: IO[bytes] | str | os.PathLike[str], name: str | None = None) -> None:
        super().__init__()
        self._owned = isinstance(file, (str, os.PathLike))
        self._file: Any = open(file, "rb") if isinstance(file, (str, os.PathLike)) else file  # noqa: SIM115
        self.name = name or str(getattr(self._file, "name", "file object"))
        self._lock = _thread.allocate_lock()
        self._inflight = _InFlight(self.name)
        self._fd: int | None = None
        self._close: Any = self._file.close if self._owned else _nothing
        if hasattr(os, "pread"):
            try:
                fd = self._file.fileno()
                os.fstat(fd)
            except Exception:  # BytesIO raises UnsupportedOperation; a closed file ValueError
                fd = None
            if fd is not None and not self._owned:
                fd = own_descriptor(fd, self.name)
                self._close = partial(os.close, fd)
            self._fd = fd
            self.positioned = fd is not None
        if self._fd is not None:
            try:
                self.size = os.fstat(self._fd).st_size
            except BaseException:
                self._close()
                raise
        else:
            try:
                self.size = self._file.seek(0, os.SEEK_END)
            except (AttributeError, OSError, ValueError) as exc:
                raise SafecodecError(
                    f"file object {self.name} is not seekable; pass its bytes instead"
                ) from exc

    def read(self, offset: int, length: int, what: str = "data") -> bytearray:
        self.check_range(offset, length, what)
        out = bytearray(length)
        self.readinto(offset, memoryview(out), what)
        return out

    def readinto(self, offset: int, out: memoryview, what: str = "data") -> None:
        self._inflight.enter()
        try:
            self._readinto(offset, out, what)
        finally:
            self._inflight.exit()

    def _readinto(self, offset: int, out: memoryview, what: str) -> None:
        if self._fd is not None:
            _pread_into(self._fd, offset, out, self, what)
            return
        length = len(out)
        self.check_range(offset, length, what)
        self.stats.requests += 1
        done = 0
        out = out.cast("B") if out.format != "B" else out
        while done < length:
            want = min(length - done, READ_CHUNK)
            with self._lock:
                try:
                    self._file.seek(offset + done)
                    chunk = self._file.read(want)
                except ValueError as exc:  # "I/O operation on closed file"
                    raise RemoteIOError(
                        f"reading {what} from {self.name} failed: its owner closed the file "
                        f"object ({exc})"
                    ) from exc
            if not chunk:
                raise RemoteIOError(
                    f"unexpected end of {self.name} while reading {what}: wanted {length} "
                    f"bytes at offset {offset}, got {done} (was the file truncated?)"
                )
            out[done : done + len(chunk)] = chunk
            done += len(chunk)
        self.stats.bytes_read += length

    def close(self) -> None:
        """Close the file, or the duplicate of a caller's descriptor (once no read is in
        flight); later reads raise ClosedHandleError."""
        self._inflight.close(self._close)


def _nothing() -> None:
    """Closing a file object the caller owns and that has no descriptor: nothing to do."""


def own_descriptor(fd: int, name: str) -> int:
    """A duplicate of a caller's descriptor ``fd``, which the source owns and closes.

    Reading through the caller's descriptor number would be wrong as soon as the caller
    closes its file object: the process reuses the number for the next file it opens, and
    a later read would return that file's bytes. The duplicate refers to the same open
    file (the same inode, whatever happens to the path) and lives until the source closes.

    Raises:
        SafecodecError: The descriptor cannot be duplicated (EMFILE, a closed file...).
    """
    try:
        return os.dup(fd)
    except OSError as exc:
        raise SafecodecError(f"cannot duplicate the descriptor of {name}: {exc}") from exc


class MappedSource(SourceBase):
    """A local file, memory-mapped lazily.

    ``buffer("copy")`` is a private copy-on-write mapping: writable, nothing is copied
    until a page is written, nothing written reaches the file. ``buffer("read")`` is a
    read-only mapping, for outputs (JAX) that must never change behind the caller's back.
    Views keep their mapping alive; :meth:`close` only drops the source's references.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, file: Any = None) -> None:
        super().__init__()
        assert _mmap is not None
        if file is None:
            assert path is not None
            self._file: Any = open(path, "rb")  # noqa: SIM115
            self._owned = True
            self.name = os.fspath(path)
            self._fd = self._file.fileno()
            self._close: Any = self._file.close
            self._caller_writes = False
        else:
            self._file = file
            self._owned = False
            self.name = str(getattr(file, "name", "file object"))
            self._fd = own_descriptor(self._file.fileno(), self.name)
            self._close = partial(os.close, self._fd)
            self._caller_writes = _writable(file)
        self.positioned = True
        try:
            self.size = os.fstat(self._fd).st_size
        except BaseException:
            self._close()
            raise
        self._maps: dict[str, memoryview] = {}
        self._lock = _thread.allocate_lock()
        self._inflight = _InFlight(self.name)

    def buffer(self, mode: MapMode = "copy") -> memoryview:
        view = self._maps.get(mode)
        if view is None:
            with self._lock:
                view = self._maps.get(mode)
                if view is None:
                    view = map_file(self._fd, self.size, mode)
                    self._maps[mode] = view
        return view

    def stable(self, mode: MapMode = "copy") -> bool:
        """The read-only mapping is stable (outputs may alias it); the copy-on-write one is
        not (NumPy views of it are writable). Short of one exception: a file that another
        program modifies in place changes every mapping of it (and a truncation kills
        the process with SIGBUS, see SECURITY.md), so a file object the caller opened for
        writing is never aliased: the caller holds the means to change it."""
        return mode == "read" and not self._caller_writes

    def read(self, offset: int, length: int, what: str = "data") -> bytearray:
        # Small reads (the header) go through pread: no mapping is created for them.
        out = bytearray(length)
        self.readinto(offset, memoryview(out), what)
        return out

    def readinto(self, offset: int, out: memoryview, what: str = "data") -> None:
        # A copy straight from the page cache, without touching a mapping.
        self._inflight.enter()
        try:
            _pread_into(self._fd, offset, out, self, what)
        finally:
            self._inflight.exit()

    def close(self) -> None:
        """Drop the mappings and close the file once no read is in flight. Mappings are
        not closed: arrays handed out keep them alive through their base."""
        self._maps = {}
        self._inflight.close(self._close)


def _writable(file: Any) -> bool:
    """Whether a caller's file object can write its file (then its mapping can change)."""
    try:
        return bool(file.writable())
    except Exception:  # no writable(), or a closed file: assume the worst
        return True


def map_file(fd: int, size: int, mode: MapMode) -> memoryview:
    """Map ``size`` bytes of ``fd``: ``"copy"`` a private copy-on-write mapping (writable
    views), ``"read"`` a read-only one. The mapping lives as long as the memoryview (and
    anything built on it) and, unlike a plain :class:`mmap.mmap`, keeps no file descriptor
    of its own: JAX's CPU client holds aliased host arrays in reference cycles that only the
    garbage collector frees, and a descriptor per mapping waiting for it would exhaust the
    process's descriptors (EMFILE) long before memory runs short."""
    assert _mmap is not None
    access = _mmap.ACCESS_COPY if mode == "copy" else _mmap.ACCESS_READ
    if _TRACKFD:  # Python 3.13+: the mapping does not duplicate the descriptor
        return memoryview(_mmap.mmap(fd, size, access=access, trackfd=False))  # type: ignore[call-arg]  # 3.13+
    raw = _libc_mmap(fd, size, mode)
    if raw is not None:
        return raw
    return memoryview(_mmap.mmap(fd, size, access=access))


_TRACKFD = _mmap is not None and sys.version_info >= (3, 13)


class _Unmap:
    """Owns a mapping made with libc's mmap: unmapped when the last view goes.

    ``munmap`` is bound at construction (libc's function, its argument types declared):
    a mapping still alive at interpreter exit is freed while module globals are being torn
    down (``_libc`` and ``ctypes`` may be None by then), so ``__del__`` looks nothing up.
    """

    __slots__ = ("addr", "munmap", "size")

    def __init__(self, addr: int, size: int, munmap: Any) -> None:
        self.addr, self.size, self.munmap = addr, size, munmap

    def __del__(self) -> None:
        self.munmap(self.addr, self.size)


def _libc_mmap(fd: int, size: int, mode: MapMode) -> memoryview | None:
    """A mapping through libc (no descriptor kept), or None where that is unavailable."""
    libc = _libc()
    if libc is None or not size:
        return None
    import ctypes

    prot = _mmap.PROT_READ | (_mmap.PROT_WRITE if mode == "copy" else 0)
    addr = libc.mmap(None, ctypes.c_size_t(size), prot, _mmap.MAP_PRIVATE, fd,
                      ctypes.c_int64(0))
    if addr is None or addr == ctypes.c_void_p(-1).value:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap failed: {os.strerror(err)}")
    array = (ctypes.c_ubyte * size).from_address(addr)
    array._safecodec_owner = _Unmap(addr, size, libc.munmap)  # type: ignore[attr-defined]
    view = memoryview(array).cast("B")
    return view if mode == "copy" else view.toreadonly()


def _libc() -> Any:
    """libc's mmap/munmap through ctypes, loaded on the first mapping (ctypes costs a few
    milliseconds that ``import safecodec`` should not pay); None where unavailable."""
    global _LIBC
    if _LIBC is False:
        _LIBC = _load_libc()
    return _LIBC


def _load_libc() -> Any:
    if _mmap is None or _TRACKFD or os.name != "posix" or sys.maxsize < 2**32:
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_int64]
        libc.munmap.restype = ctypes.c_int
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):  # pragma: no cover - an unusual libc
        return None
    return libc


_LIBC: Any = False  # not loaded yet


def _pread_into(fd: int, offset: int, out: memoryview, src: SourceBase, what: str) -> None:
    """Fill ``out`` from ``fd`` at ``offset`` with positioned reads, looping over short
    reads; a file shorter than its header promised is reported, never zero-filled.

    A large read is split into pieces read in parallel (:mod:`safecodec._threads`):
    ``preadv`` releases the GIL, and each thread faults in its own part of fresh memory.
    Every piece has finished before this returns or raises."""
    length = len(out)
    src.check_range(offset, length, what)
    out = out.cast("B") if out.format != "B" else out
    parts = _threads.pieces(length, _address(out)) if length >= 2 * _threads.MIN_PIECE else None
    if parts is None or len(parts) == 1:
        done = _pread_range(fd, offset, out)
    else:
        def piece(a: int, b: int) -> int:
            return a + _pread_range(fd, offset + a, out[a:b])

        ends = _threads.run(piece, parts)
        # a short piece: the file ends inside it (pieces before it are complete)
        done = next((e for e, (_, b) in zip(ends, parts, strict=True) if e < b), length)
    if done < length:
        raise RemoteIOError(
            f"unexpected end of {src.name} while reading {what}: wanted {length} bytes "
            f"at offset {offset}, got {done} (was the file truncated?)"
        )
    src.stats.requests += 1
    src.stats.bytes_read += length


def _pread_range(fd: int, offset: int, out: memoryview) -> int:
    """Positioned reads into ``out`` until it is full or the file ends; the bytes read."""
    length = len(out)
    done = 0
    while done < length:
        if _HAS_PREADV:
            n = os.preadv(fd, [out[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv
            chunk = os.pread(fd, min(length - done, READ_CHUNK), offset + done)
            n = len(chunk)
            out[done : done + n] = chunk
        if n == 0:
            break
        done += n
    return done


def _address(view: memoryview) -> int:
    """Where ``view``'s bytes start in memory (pieces are cut on huge-page boundaries)."""
    return int(np.frombuffer(view, np.uint8, 1).ctypes.data) if len(view) else 0


_HAS_PREADV = hasattr(os, "preadv")
