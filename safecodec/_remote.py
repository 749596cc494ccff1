"""The fsspec source: exact byte-range reads of a remote object.

It receives a filesystem from the resolver (:mod:`safecodec._resolve`, the only module
that interprets URLs) and is imported only when a URL or an fsspec filesystem is given.
Remote writes go through :class:`safecodec._sink.RemoteAtomicFile`. What it guarantees:

* **No read-ahead.** Every byte that crosses the wire was asked for: ranges are fetched
  with ``cat_file``/``cat_ranges`` and explicit ``start``/``end`` (asynchronous
  filesystems such as s3fs, gcsfs and HTTP), or through files opened with
  ``cache_type="none"`` (other filesystems). fsspec's buffered, read-ahead file objects
  are never used for reading.
* **Few, merged, concurrent requests.** :meth:`FsspecSource.read_ranges` sorts the ranges,
  merges neighbours closer than :data:`MERGE_GAP` as long as the bytes merged in stay small
  against the data asked for (:data:`MERGE_SLACK`, :data:`MERGE_ALWAYS`: merging never
  pulls in another process's half of a tensor), splits very large spans into
  :data:`MAX_REQUEST` pieces, and fetches them concurrently (one ``cat_ranges`` call on
  asynchronous filesystems, a thread pool otherwise).
* **Never wrong values.** Every response's length is checked against the range asked
  for; a short answer (a truncated object) or an over-long one (a server that ignored the
  Range header) raises :class:`~safecodec.RemoteIOError`. HTTP answers are streamed and
  cut off as soon as they exceed the request (:data:`HTTP_PIECE`), so such a server never
  makes a read download the whole object.
* **One version, on every read.** Every read is pinned to the object seen when it was
  opened (its header was read from it): HTTP(S) requests carry ``If-Match`` with its
  strong ETag (a replaced object answers 412), and an answer is taken as proof of the
  version only when it carries that ETag (another ETag: refused; none, from a server that
  ignores ``If-Match`` and omits ETags on 206: the identity is re-checked); S3 objects in
  a versioned bucket are read by version id; on every other filesystem (S3 without
  versioning, GCS, memory, HTTP without a strong ETag...) the object's identity (size
  plus ETag / version / generation / mtime, whatever ``info`` reports) is re-checked after
  each read, one metadata request (:meth:`FsspecSource.check_unchanged`). A change raises
  RemoteIOError on lazy reads, slices, whole-file, JAX, sharded and tree loads alike: they
  all read through here. What re-checking cannot see: a replacement of the same size on a
  server that reports nothing else (no ETag, no modification time).
* **Closed is closed.** A read through a closed source (a slice kept after its handle
  was closed) raises :class:`~safecodec.ClosedHandleError`, as local sources do.
* **One error type.** Every failure of the filesystem surfaces as RemoteIOError (both an
  ``OSError`` and a :class:`~safecodec.SafecodecError`) with the cause chained; a timeout
  says what timed out and after how long.
* **Accounting.** ``source.stats`` counts bytes received and range requests made
  (``SafeOpen.stats`` reports them), plus metadata requests (``info``) separately.
"""

from __future__ import annotations

import posixpath
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

from ._errors import ClosedHandleError, RemoteIOError
from ._progress import ProgressBar
from ._source import SourceBase, SourceStats

__all__ = [
    "MAX_REQUEST",
    "MERGE_GAP",
    "FsspecSource",
    "RangeTransport",
    "RemoteStats",
    "describe_failure",
    "fresh_info",
    "merge_ranges",
]

#: Two requested ranges closer than this are fetched as one request: a few KiB of unwanted
#: bytes cost less than a round trip to an object store.
MERGE_GAP: Final = 16 * 1024
#: ...but the bytes merged in (gaps) may be at most this fraction of the bytes asked for in
#: the merged span: a gap that is large against its neighbours (the other half of every row
#: of a column-sharded tensor, which another process reads) is never fetched, so merging
#: costs at most 1/16 more bytes than the exact ranges.
MERGE_SLACK: Final = 1 / 16
#: A gap this small is merged whatever its neighbours (within the ``gap`` asked for): it
#: costs fewer bytes than the headers of the response it saves (an S3 answer's headers are
#: about 400-600 bytes).
MERGE_ALWAYS: Final = 512
#: At most this many spans per fetch: beyond, the smallest gaps are merged (see
#: :func:`merge_ranges`). One fetch is at most ``FETCH_BATCH`` bytes (256 MiB) of a load.
MAX_SPANS: Final = 1024
#: Spans longer than this are split, so that one large read becomes several concurrent
#: requests (and a progress bar can move).
MAX_REQUEST: Final = 16 * 1024 * 1024
#: HTTP answers are read in pieces of this size (the most a server that ignores ``Range``
#: can make a read overshoot before it is stopped).
HTTP_PIECE: Final = 256 * 1024
#: Threads used to fetch ranges concurrently on filesystems that are not asynchronous.
MAX_THREADS: Final = 8


# ----------------------------------------------------------------------------- helpers


def _is_http(fs: Any) -> bool:
    """Whether ``fs`` is fsspec's HTTP filesystem (read by :class:`RangeTransport`, streamed)."""
    from fsspec.implementations.http import HTTPFileSystem

    return isinstance(fs, HTTPFileSystem)


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__


def describe_failure(exc: BaseException, elapsed: float | None) -> str:
    """An exception for a message: its type and text. A timeout (or an error caused by
    one) says that it timed out, after how long (``elapsed``, seconds since the request
    began) and what timed out: the texts of its causes, since the outermost one often has
    none (fsspec's FSTimeoutError wraps botocore's "Read timeout on endpoint URL: ...",
    which wraps aiohttp's "Timeout on reading data from socket")."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    text = str(exc)
    if any(_is_timeout(e) for e in chain):
        texts: list[str] = []
        for e in chain:
            t = str(e)
            if t and t not in texts:
                texts.append(t)
        what = "; ".join(texts[:3]) or "no data arrived within the filesystem's timeout"
        after = f" after {elapsed:.1f} s" if elapsed is not None else ""
        text = f"timed out{after}: {what}"
    return f"{type(exc).__name__}: {text}"


def _is_async(fs: Any) -> bool:
    return bool(getattr(fs, "async_impl", False))


def _exact_cat(fs: Any) -> bool:
    """Whether ``fs.cat_file(path, start, end)`` is known to fetch exactly that range."""
    if _is_async(fs):
        return True
    from fsspec.implementations.local import LocalFileSystem
    from fsspec.implementations.memory import MemoryFileSystem

    return isinstance(fs, LocalFileSystem | MemoryFileSystem)


def _within_budget(spans: list[tuple[int, int]], budget: int) -> list[tuple[int, int]]:
    """Merge the ``len(spans) - budget`` smallest gaps between ``spans`` (sorted,
    disjoint), so that ``budget`` spans remain: the fewest extra bytes for that many
    requests."""
    excess = len(spans) - budget
    if budget < 1 or excess <= 0:
        return spans
    by_size = sorted(range(len(spans) - 1), key=lambda i: spans[i + 1][0] - spans[i][1])
    merge = set(by_size[:excess])  # gap i lies between spans i and i + 1
    out = [spans[0]]
    for i, (start, end) in enumerate(spans[1:]):
        if i in merge:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def merge_ranges(
    ranges: Sequence[tuple[int, int]], gap: int | None = None, max_request: int | None = None,
    max_spans: int | None = None,
) -> list[tuple[int, int]]:
    """Sort ``(start, end)`` ranges, merge those that overlap or touch, merge a gap of at
    most ``gap`` bytes when it is small against the data (at most :data:`MERGE_ALWAYS`
    bytes, or the span's merged gaps stay within :data:`MERGE_SLACK` of the bytes asked
    for in it), and split spans longer than ``max_request`` (defaults: :data:`MERGE_GAP`,
    :data:`MAX_REQUEST`). When more than ``max_spans`` spans remain (default
    :data:`MAX_SPANS`), the smallest gaps are merged until that many remain: a layout in
    which a process holds narrow column blocks would otherwise cost one request per row
    (measured: GPT-2-small, half of every row, 115,840 requests per process), and past a
    few hundred concurrent requests an object store answers faster with the bytes between.

    Why not ``fsspec.utils.merge_offset_ranges`` (``max_gap``, ``max_block``): it merges
    every gap up to ``max_gap`` whatever the data around it, and does not split spans.
    Measured (``benchmarks/bench_perprocess.py``, merge rules planned for one of 2
    processes of a GPT-2-small-shaped file, 498 MB, each process holding half of every
    row): ``max_gap=MERGE_GAP, max_block=MAX_REQUEST`` fetches 0.9995 of the file (34
    requests), this rule 0.4995 (its exact share; one request per row, 115,840).

    Examples:
        >>> merge_ranges([(100, 200), (0, 50), (60, 80), (10_000_000, 10_000_010)], gap=16)
        [(0, 80), (100, 200), (10000000, 10000010)]
        >>> merge_ranges([(0, 50), (60, 80)], gap=4)
        [(0, 50), (60, 80)]
        >>> merge_ranges([(0, 6144), (12288, 18432)])  # half rows: the other half stays
        [(0, 6144), (12288, 18432)]
        >>> merge_ranges([(0, 65536), (66560, 131072)])  # a 1 KiB gap in 128 KiB: merged
        [(0, 131072)]
    """
    gap = MERGE_GAP if gap is None else gap
    max_request = MAX_REQUEST if max_request is None else max_request
    always = min(gap, MERGE_ALWAYS)
    spans: list[tuple[int, int]] = []
    # the span being built: its start and end, the bytes asked for in it, the bytes merged in
    lo = hi = asked = slack = -1
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        hole = start - hi
        if lo >= 0:
            if hole <= 0:  # overlapping or touching
                if end > hi:
                    asked += end - hi
                    hi = end
                continue
            if hole <= always or (hole <= gap
                                  and slack + hole <= MERGE_SLACK * (asked + end - start)):
                asked += end - start
                slack += hole
                hi = end
                continue
            spans.append((lo, hi))
        lo, hi, asked, slack = start, end, end - start, 0
    if lo >= 0:
        spans.append((lo, hi))
    spans = _within_budget(spans, max_spans if max_spans is not None else MAX_SPANS)
    out: list[tuple[int, int]] = []
    for start, end in spans:
        while end - start > max_request:
            out.append((start, start + max_request))
            start += max_request
        out.append((start, end))
    return out


class RemoteStats(SourceStats):
    """:class:`~safecodec._source.SourceStats` plus the metadata requests (``info``) made."""

    __slots__ = ("lock", "metadata_requests")

    def __init__(self) -> None:
        super().__init__()
        self.metadata_requests = 0
        self.lock = threading.Lock()

    def add(self, requests: int, nbytes: int) -> None:
        with self.lock:
            self.requests += requests
            self.bytes_read += nbytes

    def as_dict(self) -> dict[str, int]:
        out = super().as_dict()
        out["metadata_requests"] = self.metadata_requests
        return out


def fresh_info(fs: Any, path: str) -> Mapping[str, Any]:
    """``fs.info(path)`` asked of the server, never answered from the filesystem's listing
    cache: s3fs answers ``info`` from a cached folder listing when it has one, and a
    listing carries no version id where a HEAD does. The identity taken at open and the
    one re-checked after a read both come from here, so they are comparable."""
    invalidate = getattr(fs, "invalidate_cache", None)
    if invalidate is not None:
        invalidate(path)
    info: Mapping[str, Any] = fs.info(path)
    return info


def _identity(info: Mapping[str, Any]) -> tuple[Any, ...]:
    """What tells two versions of an object apart: size plus whichever of ETag, version
    id, checksum or modification time the filesystem reports."""
    keys = ("ETag", "etag", "VersionId", "version_id", "md5Hash", "crc32c", "generation",
            "mtime", "LastModified", "last_modified", "Last-Modified", "created")
    return (info.get("size"), *((k, str(info[k])) for k in keys if info.get(k) is not None))


# ----------------------------------------------------------------------------- source


class RangeTransport:
    """How byte ranges of one version of a remote object are asked of its filesystem:
    the request (an exact ``cat_file``/``cat_ranges``, a file opened with
    ``cache_type="none"``, a streamed HTTP GET), its version pin, and the concurrency (one
    ``cat_ranges`` call, ``asyncio.gather``, a thread pool). Answers come back as they
    arrived, one per range, the exception of a failed range in its place: what they mean
    (lengths, identity re-checks, the one error type) is :meth:`FsspecSource._fetch`'s
    concern.

    Every request is pinned to the version whose info was given: by the protocol where
    it can (HTTP: ``If-Match`` with a strong ETag; S3 with versioning: the version id);
    where it cannot, ``recheck`` is True and the source re-checks the identity after each
    read (one metadata request).

    Attributes:
        exact: ``fs.cat_file(path, start, end)`` is known to fetch exactly that range.
        http: ``fs`` is fsspec's HTTP filesystem (streamed, pinned by ETag).
        pin: Keyword arguments that pin each request to the version (may be empty).
        recheck: No pin: the identity must be re-checked after each read.
    """

    def __init__(self, fs: Any, path: str, info: Mapping[str, Any], name: str) -> None:
        self.fs = fs
        self.path = path
        self.name = name
        self.exact = _exact_cat(fs)
        self.http = _is_http(fs)
        self.pin: dict[str, Any] = {}
        etag = info.get("ETag")
        version = info.get("VersionId")
        if self.http and isinstance(etag, str) and etag and not etag.startswith("W/"):
            self.pin = {"headers": {"If-Match": etag}}
        elif version and hasattr(fs, "version_aware"):  # s3fs: pass the version id
            self.pin = {"version_id": version}
        self.recheck = not self.pin

    def fetch(self, spans: Sequence[tuple[int, int]]) -> tuple[list[Any], bool]:
        """Every span of ``spans`` (sorted, checked against the object's size), fetched
        concurrently.

        Returns:
            One answer per span (bytes, or the exception its request raised) and whether
            every answer proved its version (HTTP: carried the pinned ETag; True on other
            filesystems, whose pin or re-check is the source's business).
        """
        if self.http:
            try:
                return self._http(spans)
            except Exception as exc:  # no session, say: surfaced with the first range
                return [exc] * len(spans), True
        if _is_async(self.fs) and len(spans) > 1:
            results: list[Any] = self.fs.cat_ranges(
                [self.path] * len(spans), [s for s, _ in spans], [e for _, e in spans],
                on_error="return", **self.pin,
            )
            return results, True
        if len(spans) == 1:
            try:
                return [self._one(*spans[0])], True
            except Exception as exc:  # surfaced with the range that failed
                return [exc], True

        def guarded(span: tuple[int, int]) -> Any:
            try:
                return self._one(*span)
            except Exception as exc:
                return exc

        with ThreadPoolExecutor(min(MAX_THREADS, len(spans))) as pool:
            return list(pool.map(guarded, spans)), True

    def _one(self, start: int, end: int) -> bytes:
        """One range: an exact ``cat_file``, else a file opened without read-ahead."""
        if self.exact:
            return self.fs.cat_file(self.path, start=start, end=end,  # type: ignore[no-any-return]
                                    **self.pin)
        try:
            f = self.fs.open(self.path, "rb", cache_type="none", block_size=0)
        except TypeError:  # a filesystem whose open() takes no cache options
            return self.fs.cat_file(self.path, start=start, end=end)  # type: ignore[no-any-return]
        with f:
            f.seek(start)
            return f.read(end - start)  # type: ignore[no-any-return]

    def _http(self, spans: Sequence[tuple[int, int]]) -> tuple[list[Any], bool]:
        """HTTP(S) ranges, streamed, concurrently: each answer is read in pieces and the
        transfer stops (RemoteIOError) as soon as it exceeds what was asked, so a server
        that ignores ``Range`` costs at most one piece more than the request, never the
        whole object in memory.

        Requests carry ``If-Match`` with the ETag seen at open time: a replaced object
        answers 412, reported as a change. But a server may ignore ``If-Match``, so an
        answer proves its version only by carrying that same ETag: one with another ETag
        is refused; one with none (a server that sends ETags on HEAD and not on 206, as
        some do) proves nothing, and then the caller re-checks the object's identity
        (:meth:`FsspecSource.check_unchanged`) before using what arrived.

        Returns:
            The answers (bytes, or the exception of each failed range) and whether every
            answer carried the pinned ETag (always False without a pin).
        """
        import asyncio

        from fsspec.asyn import sync

        pinned = self.pin.get("headers", {}).get("If-Match")
        unconfirmed: list[int] = []

        async def one(session: Any, start: int, end: int) -> Any:
            kw = dict(self.fs.kwargs)
            headers = dict(kw.pop("headers", None) or {})
            headers.update(self.pin.get("headers", {}))
            headers["Range"] = f"bytes={start}-{end - 1}"
            want = end - start
            try:
                async with session.get(self.fs.encode_url(self.path), headers=headers,
                                       **kw) as r:
                    if r.status == 412:
                        return RemoteIOError(
                            f"{self.name} changed since it was opened (the server refused "
                            f"If-Match {self.pin['headers']['If-Match']}: 412); the file's "
                            "header no longer describes it, open it again")
                    if r.status == 404:
                        return FileNotFoundError(2, "No such file (it disappeared)", self.name)
                    r.raise_for_status()
                    sent = r.headers.get("ETag")
                    if pinned and sent and sent != pinned:  # a server ignoring If-Match
                        return RemoteIOError(
                            f"{self.name} changed since it was opened (ETag {pinned} then, "
                            f"{sent} now); the file's header no longer describes it, open it "
                            "again")
                    if sent != pinned:
                        unconfirmed.append(start)  # no proof of the version: re-check
                    buf = bytearray()
                    async for piece in r.content.iter_chunked(HTTP_PIECE):
                        buf += piece
                        if len(buf) > want:
                            return RemoteIOError(
                                f"unexpected answer while reading {self.name}: asked for bytes "
                                f"{start}-{end} ({want} bytes), the server sent more (status "
                                f"{r.status}; does it ignore Range requests?); stopped after "
                                f"{len(buf)} bytes")
                    return bytes(buf)
            except Exception as exc:  # reported with its range by FsspecSource._fetch
                return exc

        async def many() -> list[Any]:
            session = await self.fs.set_session()
            return list(await asyncio.gather(*(one(session, a, b) for a, b in spans)))

        results = sync(self.fs.loop, many)
        return results, bool(pinned) and not unconfirmed


class FsspecSource(SourceBase):
    """A file on an fsspec filesystem, read with exact byte-range requests.

    Thread-safe: many threads may call :meth:`read`, :meth:`read_ranges` and
    :meth:`readinto` at once (sharded JAX loads do).

    Attributes:
        fs: The fsspec filesystem.
        path: The path on it.
        size: Object size in bytes, from one ``info`` request at open time.
        name: The URL or path, for messages.
        stats: Bytes received and requests made (``stats.as_dict()``).
        progress: Show a progress bar (tqdm) for large reads.
    """

    remote = True

    def __init__(self, fs: Any, path: str, info: Mapping[str, Any], name: str | None = None,
                 progress: bool = False) -> None:
        super().__init__()
        self.stats: RemoteStats = RemoteStats()
        self.stats.metadata_requests = 1
        self.fs = fs
        self.path = path
        self.name = name or path
        self.progress = progress
        size = info.get("size")
        if info.get("type") == "directory":
            raise RemoteIOError(f"{self.name} is a directory, not a safetensors file")
        if not isinstance(size, int) or size < 0:
            raise RemoteIOError(
                f"cannot determine the size of {self.name} (the server reported {size!r}); "
                "byte-range reads need it"
            )
        self.size = size
        self._identity = _identity(info)
        self._closed = False
        #: How ranges are asked of the filesystem, pinned to the version opened.
        self.transport = RangeTransport(fs, path, info, self.name)

    # -- fetching
    def _fetch(self, spans: Sequence[tuple[int, int]], what: str,
               bar: ProgressBar | None = None) -> list[bytes]:
        """Fetch ``spans`` concurrently (:class:`RangeTransport`); check every answer's
        length, count it, and re-check the object's identity when the answers did not
        prove their version: the one place every remote read goes through."""
        if self._closed:
            raise ClosedHandleError(f"{self.name}: read after the handle was closed")
        if not spans:
            return []
        for start, end in spans:
            self.check_range(start, end - start, what)
        began = time.monotonic()
        results, confirmed = self.transport.fetch(spans)
        received = 0
        failure: BaseException | None = None
        message = ""
        for (start, end), data in zip(spans, results, strict=True):
            if isinstance(data, BaseException):
                if failure is None:
                    failure = data
                    message = (f"reading {what} from {self.name} failed: bytes {start}-{end}: "
                               f"{describe_failure(data, time.monotonic() - began)}")
                continue
            received += len(data)
            if len(data) != end - start and failure is None:
                failure = RemoteIOError("")
                hint = ("was the object truncated or replaced?" if len(data) < end - start
                        else "does the server ignore Range requests?")
                message = (f"unexpected answer while reading {what} from {self.name}: asked "
                           f"for bytes {start}-{end} ({end - start} bytes), got {len(data)} "
                           f"({hint})")
        self.stats.add(len(spans), received)
        if bar is not None:
            bar.update(received)
        if failure is not None:
            if isinstance(failure, RemoteIOError) and str(failure):
                raise failure
            raise RemoteIOError(message) from (
                None if isinstance(failure, RemoteIOError) else failure)
        if self.transport.recheck or not confirmed:
            self.check_unchanged()
        return results

    # -- the source interface
    def read(self, offset: int, length: int, what: str = "data") -> bytes | memoryview:
        """Exactly ``length`` bytes at ``offset`` (large reads are split and fetched
        concurrently)."""
        if length == 0:
            self.check_range(offset, 0, what)
            return b""
        if length <= MAX_REQUEST:
            return self._fetch([(offset, offset + length)], what)[0]
        out = bytearray(length)
        self.readinto(offset, memoryview(out), what)
        return memoryview(out)

    def readinto(self, offset: int, out: memoryview, what: str = "data") -> None:
        """Fill ``out`` with the bytes at ``offset``."""
        out = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        length = len(out)
        self.check_range(offset, length, what)
        spans = merge_ranges([(offset, offset + length)], gap=0)
        with ProgressBar(length, f"read {posixpath.basename(self.path)}",
                         self.progress and length > MAX_REQUEST) as bar:
            for data, (start, end) in zip(self._fetch(spans, what, bar), spans, strict=True):
                out[start - offset : end - offset] = data

    def read_ranges(
        self, ranges: Sequence[tuple[int, int]], what: str = "data"
    ) -> list[bytes | bytearray | memoryview]:
        """Read many ``(start, end)`` ranges: merged, split, fetched concurrently, and
        handed back in the order asked (slices of the fetched blocks)."""
        ranges = [(int(s), int(e)) for s, e in ranges]
        for start, end in ranges:
            if end < start:
                raise RemoteIOError(f"{self.name}: invalid range {start}-{end} for {what}")
            self.check_range(start, end - start, what)
        spans = merge_ranges(ranges)
        total = sum(e - s for s, e in spans)
        with ProgressBar(total, f"read {posixpath.basename(self.path)}",
                         self.progress and total > MAX_REQUEST) as bar:
            blocks = self._fetch(spans, what, bar)
        # Reassemble split spans into contiguous blocks, then slice each request out.
        starts = [s for s, _ in spans]
        views = [memoryview(b) for b in blocks]
        import bisect

        out: list[bytes | bytearray | memoryview] = []
        for start, end in ranges:
            if start == end:
                out.append(b"")
                continue
            i = bisect.bisect_right(starts, start) - 1
            s0, e0 = spans[i]
            if end <= e0:
                out.append(views[i][start - s0 : end - s0])
                continue
            # The range crosses split points: join the pieces.
            buf = bytearray(end - start)
            pos = start
            while pos < end:
                s0, e0 = spans[i]
                take = min(end, e0) - pos
                buf[pos - start : pos - start + take] = views[i][pos - s0 : pos - s0 + take]
                pos += take
                i += 1
            out.append(memoryview(buf))
        return out

    def readinto_ranges(self, out: memoryview, ranges: Sequence[tuple[int, int]],
                        what: str = "data") -> None:
        """Fetch many ``(start, end)`` ranges straight into ``out``, a buffer standing for
        the whole object (``out[start:end]`` receives those bytes): merged, split and
        fetched concurrently, one copy per byte. Used by whole-file loads."""
        out = out.cast("B") if out.format != "B" or out.ndim != 1 else out
        if len(out) < self.size:
            raise RemoteIOError(f"{self.name}: buffer of {len(out)} bytes for an object of {self.size}")
        spans = merge_ranges(ranges)
        total = sum(e - s for s, e in spans)
        with ProgressBar(total, f"read {posixpath.basename(self.path)}",
                         self.progress and total > MAX_REQUEST) as bar:
            for data, (start, end) in zip(self._fetch(spans, what, bar), spans, strict=True):
                out[start:end] = data

    def buffer(self, mode: str = "copy") -> None:
        """Remote objects are not addressable memory."""
        return None

    def check_unchanged(self) -> None:
        """Ask for the object's info again and compare size and ETag (or what the
        filesystem reports) with what was seen at open time.

        Raises:
            RemoteIOError: The object changed or disappeared since it was opened.
        """
        began = time.monotonic()
        try:
            info = fresh_info(self.fs, self.path)
        except FileNotFoundError as exc:
            raise RemoteIOError(f"{self.name} disappeared while it was being read") from exc
        except Exception as exc:
            raise RemoteIOError(
                f"checking that {self.name} did not change failed: "
                f"{describe_failure(exc, time.monotonic() - began)}"
            ) from exc
        with self.stats.lock:
            self.stats.metadata_requests += 1
        now = _identity(info)
        if now != self._identity:
            raise RemoteIOError(
                f"{self.name} changed while it was being read: it was {self._identity}, it is "
                f"now {now}; the data read may mix two versions, read it again"
            )

    def close(self) -> None:
        self._closed = True
