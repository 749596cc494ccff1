"""The route matrix (issue 18): every public read entry point, from every kind of source,
with every read option, under every condition, gives the same values, or raises the same
exception class, as the reference of its condition.

The matrix is GENERATED. A cell is one value from each axis (:data:`ENTRIES`,
:data:`SOURCES`, each of :data:`OPTIONS`, :data:`CONDITIONS`) that no rule of
:func:`excluded` rules out; a new entry point, source, option value or condition joins
by being added to its table (with the one function that performs it). What a cell must
give is decided by :func:`expected` from the cell's axes, by the rules written there,
never per cell:

* **intact**: the saved values.
* **corrupted** (one byte of tensor ``embed`` flipped in the stored file, checksums
  written by the save): ``ChecksumError`` with ``verify=True``; else the corrupted
  values, exactly.
* **truncated** (the stored file, or the shard holding ``embed``, loses its last bytes):
  the exception class the reference cell raises (``load_file`` of a local path).
* **replaced**: named sources: the object is replaced by another one of the same size
  and header (every data byte inverted) right after its header was read, before any of
  its data; a file object's owner also closes it and opens the replacement, which takes
  the same descriptor number. Sources that can still read the version opened (a local
  file: the open descriptor and mapping; S3 with versioning: the version id) give the
  saved values; every other one raises ``RemoteIOError``. In-memory sources: their owner
  writes the replacement into the memory after the call returned; the values returned
  must not change.
* **closed**: the ``safe_open`` handle is closed before the read: ``ClosedHandleError``;
  except a slice taken before the close and indexed after it, from memory (a mapping or
  a buffer, no ``copy``/``pread``): it outlives the handle and gives the values
  (documented on ``TensorSlice``).

The full product is a few thousand cells; :func:`sample` picks a subset with a fixed
seed, covering every (entry, source, condition) triple, and every combination of read
options with every (source, condition) and every (entry, condition) pair.

Cells run in one worker process (``route_matrix_worker.py``) that has 4 virtual CPU
devices (``sharding=`` must cut blocks) and its own servers on 127.0.0.1: three HTTP
servers (ETags everywhere and ``If-Match`` honoured; ETags on HEAD only and ``If-Match``
ignored; no ETags at all) and a moto S3 server.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------- axes


@dataclass(frozen=True)
class EntryKind:
    """A public read entry point: the values it allows for each option (an option it
    does not take allows its default only), the sources it documents, whether it returns
    a handle (then it can be closed)."""

    allowed: dict[str, tuple[Any, ...]]
    memory_sources: bool  # takes bytes-like sources
    named_sources: bool  # takes paths, file objects, URLs, directories
    handle: bool = False


@dataclass(frozen=True)
class SourceKind:
    """Where the bytes live: ``"local"`` (a file), ``"memory"`` (a caller's buffer) or
    ``"remote"``; whether it is a sharded checkpoint; whether a reader can still read the
    version it opened after the object is replaced (see the module docstring)."""

    where: str
    sharded: bool = False
    keeps_version: bool = False


_ALL = ("mmap", "pread"), (False, True), (False, True), ("numpy", "jax"), (None, "mesh")
OPTIONS: dict[str, tuple[Any, ...]] = dict(zip(
    ("backend", "copy", "verify", "framework", "sharding"), _ALL, strict=True))
DEFAULTS = {"backend": "mmap", "copy": False, "verify": False, "framework": "numpy",
            "sharding": None}
_EVERY = dict(OPTIONS)
_NO_BACKEND = {**OPTIONS, "backend": ("mmap",)}

ENTRIES: dict[str, EntryKind] = {
    "load_file": EntryKind(_EVERY, memory_sources=False, named_sources=True),
    "load": EntryKind(_NO_BACKEND, memory_sources=True, named_sources=False),
    "get_tensor": EntryKind(_EVERY, True, True, handle=True),
    "get_slice": EntryKind(_EVERY, True, True, handle=True),
    "get_tensors": EntryKind(_EVERY, True, True, handle=True),
    "load_tree": EntryKind({**OPTIONS, "backend": ("mmap",), "verify": (False,),
                            "sharding": (None,)}, True, True),
    "jax.load_file": EntryKind({**OPTIONS, "verify": (False,), "framework": ("jax",)},
                               memory_sources=False, named_sources=True),
}

SOURCES: dict[str, SourceKind] = {
    "path": SourceKind("local", keeps_version=True),
    "fileobj": SourceKind("local", keeps_version=True),
    "sharded": SourceKind("local", sharded=True, keeps_version=True),
    "bytes": SourceKind("memory"),
    "bytearray": SourceKind("memory"),
    "ro-view": SourceKind("memory"),  # a read-only memoryview of writable memory
    "memory-url": SourceKind("remote"),
    "http": SourceKind("remote"),
    "http-etag-on-head-only": SourceKind("remote"),
    "http-no-etag": SourceKind("remote"),
    "s3": SourceKind("remote"),
    "s3-versioned": SourceKind("remote", keeps_version=True),
    "s3-versioned-sharded": SourceKind("remote", sharded=True, keeps_version=True),
}

CONDITIONS = ("intact", "corrupted", "truncated", "replaced", "closed")

#: The cell whose outcome the cells of its condition must match where :func:`expected`
#: says "as the reference".
REFERENCE = {"entry": "load_file", "source": "path", **DEFAULTS}


@dataclass(frozen=True)
class Cell:
    entry: str
    source: str
    backend: str
    copy: bool
    verify: bool
    framework: str
    sharding: str | None
    condition: str

    @property
    def id(self) -> str:
        opts = [self.backend, "copy" if self.copy else "nocopy",
                "verify" if self.verify else "noverify", self.framework,
                self.sharding or "unsharded"]
        return "|".join([self.entry, self.source, *opts, self.condition])

    @property
    def memory_route(self) -> bool:
        """Tensors are views of memory (a mapping or the caller's buffer), not reads."""
        return (not self.copy and self.backend == "mmap"
                and SOURCES[self.source].where in ("local", "memory"))


# ----------------------------------------------------------------------------- rules

#: Every rule that removes combinations from the product, by name. Each is a documented
#: fact about the API, not a route that is hard to get right.
RULES: dict[str, str] = {
    "signature": "an entry point takes only the options in its signature; the others keep "
                 "their default (load: no backend=; load_tree: no backend=, verify=, "
                 "sharding=; safecodec.jax.load_file: no verify=, framework is jax)",
    "sources": "load() takes bytes-like data only; load_file() and "
               "safecodec.jax.load_file() take paths, file objects, URLs and directories",
    "pread-needs-a-file": "backend='pread' is a way to read a local file (positioned "
                          "reads instead of a mapping); memory and remote sources have none",
    "sharding-needs-jax": "sharding= places jax.Arrays: framework='jax' only",
    "closed-needs-a-handle": "only safe_open returns a handle that can be closed before a read",
    "bytes-cannot-change": "nothing can replace or write the contents of a bytes object",
    "views-share-caller-memory": "NumPy outputs of a caller's writable memory without copy "
                                 "are views of it by contract (sc.load's documentation): "
                                 "they show what the owner writes",
    "http-without-etag-sees-size-only": "an HTTP server that sends no ETag (and no "
                                        "Last-Modified) offers nothing but the size to tell "
                                        "two versions apart: a replacement of the same size "
                                        "cannot be seen (SECURITY.md); tested with a size "
                                        "change in test_route_guarantees.py",
}


def excluded(cell: Cell) -> str | None:
    """The name of the first rule of :data:`RULES` that rules ``cell`` out, or None."""
    entry, source = ENTRIES[cell.entry], SOURCES[cell.source]
    for option, allowed in entry.allowed.items():
        if getattr(cell, option) not in allowed:
            return "signature"
    if not (entry.memory_sources if source.where == "memory" else entry.named_sources):
        return "sources"
    if cell.backend == "pread" and source.where != "local":
        return "pread-needs-a-file"
    if cell.sharding is not None and cell.framework != "jax":
        return "sharding-needs-jax"
    if cell.condition == "closed" and not entry.handle:
        return "closed-needs-a-handle"
    if cell.condition == "replaced":
        if cell.source == "bytes":
            return "bytes-cannot-change"
        if source.where == "memory" and cell.framework == "numpy" and not cell.copy:
            return "views-share-caller-memory"
        if cell.source == "http-no-etag":
            return "http-without-etag-sees-size-only"
    return None


def product() -> Iterator[Cell]:
    """Every combination of the axes, meaningful or not."""
    for entry, source, *opts, condition in itertools.product(
            ENTRIES, SOURCES, *OPTIONS.values(), CONDITIONS):
        yield Cell(entry, source, *opts, condition)


def cells() -> list[Cell]:
    """Every meaningful cell (the product less :func:`excluded`), sorted."""
    return sorted((c for c in product() if excluded(c) is None), key=_by_id)


def _route(cell: Cell) -> str:
    return "pread" if cell.backend == "pread" else ("copy" if cell.copy else "view")


def coverage_keys(cell: Cell) -> list[tuple[Any, ...]]:
    """What one cell covers for :func:`sample`."""
    options = (_route(cell), cell.verify, cell.framework, cell.sharding)
    return [("entry-source-condition", cell.entry, cell.source, cell.condition),
            ("source-condition-options", cell.source, cell.condition, *options),
            ("entry-condition-options", cell.entry, cell.condition, *options)]


#: The seed of the sample: fixed, so a run is reproducible and a failing cell stays.
SEED = 18


def sample(every: list[Cell], seed: int = SEED) -> list[Cell]:
    """A subset of ``every`` that covers each :func:`coverage_keys` key of it, picked in
    a random order fixed by ``seed``, plus the reference cells; sorted."""
    rng = random.Random(seed)
    order = list(every)
    rng.shuffle(order)
    covered: set[tuple[Any, ...]] = set()
    out = {c for c in every if is_reference(c)}
    for cell in order:
        keys = coverage_keys(cell)
        if cell in out or any(k not in covered for k in keys):
            out.add(cell)
            covered.update(keys)
    return sorted(out, key=_by_id)


def _by_id(cell: Cell) -> str:
    return cell.id


def is_reference(cell: Cell) -> bool:
    return all(getattr(cell, k) == v for k, v in REFERENCE.items())


# ----------------------------------------------------------------------------- data


def model() -> dict[str, np.ndarray]:
    """The tensors every cell saves: aligned and unaligned, 0-d and zero-size, a tensor
    larger than the reader's first read (64 KiB, its own shard), bf16."""
    import ml_dtypes

    rng = np.random.default_rng(18)
    return {
        "embed": rng.standard_normal((256, 64)).astype(np.float32),
        "w": rng.standard_normal((16, 8)).astype(ml_dtypes.bfloat16),
        "empty": np.zeros((0, 4), np.float32),
        "b": np.arange(6, dtype=np.int32) - 3,  # 24 bytes: what follows is unaligned
        "odd": rng.integers(0, 255, (4, 6), dtype=np.uint8),
        "s": np.array(2.5, np.float32),
    }


#: The tensor whose byte is flipped in "corrupted", and whose shard is truncated.
VICTIM = "embed"
#: Bytes removed from the end of a truncated file.
TRUNCATE = 7


def selection(arr: np.ndarray) -> tuple[Any, ...]:
    """What ``get_slice`` cells read of each tensor: every other row from the second."""
    return (slice(1, None, 2),) if arr.ndim else ()


def _data_start(blob: bytes) -> int:
    return 8 + int.from_bytes(blob[:8], "little")


def _victim_offset(blob: bytes) -> tuple[int, int] | None:
    """(offset in the file, offset in the tensor) of the byte flipped in ``VICTIM``."""
    header = json.loads(blob[8:_data_start(blob)])
    if VICTIM not in header:
        return None
    begin, end = header[VICTIM]["data_offsets"]
    k = (end - begin) // 2 + 3
    return _data_start(blob) + begin + k, k


def corrupted(blob: bytes) -> bytes:
    spot = _victim_offset(blob)
    if spot is None:
        return blob
    out = bytearray(blob)
    out[spot[0]] ^= 0x5A
    return bytes(out)


def corrupted_values(tensors: dict[str, np.ndarray], blob: bytes) -> dict[str, np.ndarray]:
    spot = _victim_offset(blob)
    assert spot is not None
    out = dict(tensors)
    raw = bytearray(np.ascontiguousarray(tensors[VICTIM]).tobytes())
    raw[spot[1]] ^= 0x5A
    out[VICTIM] = np.frombuffer(bytes(raw), tensors[VICTIM].dtype).reshape(tensors[VICTIM].shape)
    return out


def truncated(blob: bytes) -> bytes:
    return blob[:-TRUNCATE] if _victim_offset(blob) is not None else blob


def aligned_writable(blob: bytes) -> np.ndarray:
    """``blob`` in writable memory that starts 64-byte aligned (as a mapping does), so
    that every aligned tensor in it could be aliased: the "ro-view" source is a read-only
    memoryview of it, and whether it is aliased must not depend on where malloc put it."""
    arena = np.empty(len(blob) + 64, np.uint8)
    shift = -arena.ctypes.data % 64
    out = arena[shift : shift + len(blob)]
    out[:] = np.frombuffer(blob, np.uint8)
    return out


def inverted(blob: bytes) -> bytes:
    """The same size and header, every data byte inverted: another version of the file
    that nothing but its identity (ETag, version, mtime) tells apart."""
    start = _data_start(blob)
    return blob[:start] + bytes(255 - b for b in blob[start:])


# ----------------------------------------------------------------------------- expected


@dataclass(frozen=True)
class Outcome:
    """What a cell gave: the values (name -> array, as NumPy) or an exception class."""

    values: dict[str, np.ndarray] | None = None
    error: str | None = None
    detail: str = ""

    def describe(self) -> str:
        if self.error is not None:
            return f"{self.error}: {self.detail}"
        assert self.values is not None
        return "values " + ", ".join(f"{k}: {v.dtype}{list(v.shape)}"
                                     for k, v in self.values.items())


def expected(cell: Cell, saved: dict[str, np.ndarray], damaged: dict[str, np.ndarray],
             reference_error: Callable[[str], str]) -> Outcome:
    """What ``cell`` must give (the rules of the module docstring). ``saved``: the
    tensors saved; ``damaged``: those values with the corrupted byte;
    ``reference_error(condition)``: the exception class the reference cell raised."""
    if cell.condition == "intact":
        return Outcome(saved)
    if cell.condition == "corrupted":
        return Outcome(error="ChecksumError") if cell.verify else Outcome(damaged)
    if cell.condition == "truncated":
        return Outcome(error=reference_error("truncated"))
    if cell.condition == "replaced":
        source = SOURCES[cell.source]
        if source.keeps_version or source.where == "memory":
            return Outcome(saved)
        return Outcome(error="RemoteIOError")
    assert cell.condition == "closed"
    if cell.entry == "get_slice" and cell.memory_route:
        return Outcome(saved)
    return Outcome(error="ClosedHandleError")


def agree(got: Outcome, want: Outcome, cell: Cell) -> str | None:
    """Why ``got`` differs from ``want`` (None: it does not)."""
    if want.error is not None:
        if got.error != want.error:
            return f"wanted {want.error}, got {got.describe()}"
        return None
    if got.error is not None:
        return f"wanted the values, got {got.describe()}"
    assert got.values is not None and want.values is not None
    if sorted(got.values) != sorted(want.values):
        return f"wanted tensors {sorted(want.values)}, got {sorted(got.values)}"
    for name, arr in want.values.items():
        wanted = arr[selection(arr)] if cell.entry == "get_slice" else arr
        have = got.values[name]
        if have.dtype != wanted.dtype or have.shape != wanted.shape:
            return (f"tensor {name!r}: wanted {wanted.dtype}{list(wanted.shape)}, got "
                    f"{have.dtype}{list(have.shape)}")
        if np.ascontiguousarray(have).tobytes() != np.ascontiguousarray(wanted).tobytes():
            return f"tensor {name!r}: other values than wanted"
    return None


# ----------------------------------------------------------------------------- stores


class Store:
    """Where one source kind keeps objects: ``put`` (atomically replacing), and the
    location a reader is given (a path or URL)."""

    def __init__(self, base: str, put: Callable[[str, bytes], None],
                 storage_options: dict[str, Any] | None = None) -> None:
        self.base = base
        self._put = put
        self.storage_options = storage_options

    def put(self, key: str, data: bytes) -> None:
        self._put(key, data)

    def location(self, key: str) -> str:
        return f"{self.base}/{key}"


def _local_put(root: str) -> Callable[[str, bytes], None]:
    def put(key: str, data: bytes) -> None:
        path = os.path.join(root, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:6]}.part"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)  # a new inode (and mtime: a new ETag on HTTP)

    return put


@contextlib.contextmanager
def stores(workdir: str) -> Iterator[dict[str, Store]]:
    """A :class:`Store` per remote and local source kind, servers started on 127.0.0.1."""
    import fsspec

    from conftest_remote import serve_http, serve_s3

    local = os.path.join(workdir, "local")
    roots = {mode: os.path.join(workdir, f"http-{mode}") for mode in ("all", "head", "none")}
    with contextlib.ExitStack() as stack:
        out: dict[str, Store] = {"local": Store(local, _local_put(local))}
        for source, mode in (("http", "all"), ("http-etag-on-head-only", "head"),
                             ("http-no-etag", "none")):
            os.makedirs(roots[mode])
            server = stack.enter_context(serve_http(roots[mode], etags=mode))
            out[source] = Store(server.url("").rstrip("/"), _local_put(roots[mode]))
        mem = fsspec.filesystem("memory")
        mroot = f"/route-matrix-{uuid.uuid4().hex[:8]}"
        out["memory-url"] = Store(f"memory://{mroot}",
                                  lambda k, d: mem.pipe_file(f"{mroot}/{k}", d))
        s3 = stack.enter_context(serve_s3())
        for source, versioned in (("s3", False), ("s3-versioned", True),
                                  ("s3-versioned-sharded", True)):
            out[source] = _s3_store(s3, versioned)
        try:
            yield out
        finally:
            if mem.exists(mroot):
                mem.rm(mroot, recursive=True)


def _s3_store(s3: Any, versioned: bool) -> Store:
    bucket = s3.new_bucket()
    if versioned:
        import boto3

        client = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        client.put_bucket_versioning(Bucket=bucket,
                                     VersioningConfiguration={"Status": "Enabled"})
    fs = s3.filesystem()

    def put(key: str, data: bytes) -> None:
        fs.pipe_file(f"{bucket}/{key}", data)
        fs.invalidate_cache()

    # Readers get s3fs's defaults (its listings cache on), as users do.
    options = {k: v for k, v in s3.storage_options.items() if k != "use_listings_cache"}
    return Store(f"s3://{bucket}", put, options)


# ----------------------------------------------------------------------------- running


class Matrix:
    """Runs cells (in the worker process): builds each source's objects once per
    condition (``replaced``: once per cell), calls the entry point, and compares."""

    def __init__(self, workdir: str, stores: dict[str, Store], sharding: Any) -> None:
        import safecodec as sc

        self.sc = sc
        self.workdir = workdir
        self.stores = stores
        self.sharding = sharding
        self.tensors = model()
        self.blob = sc.save(self.tensors, checksums=True)
        self.damaged = corrupted_values(self.tensors, self.blob)
        self.shards = self._shard_files()
        self._objects: dict[tuple[str, str], str] = {}
        self._serial = itertools.count()
        self._reference: dict[str, str] = {}

    def _shard_files(self) -> dict[str, bytes]:
        """The sharded checkpoint's files (index and shards), saved once."""
        where = os.path.join(self.workdir, "sharded-original")
        self.sc.save_file(self.tensors, where, max_shard_size="32KiB", checksums=True)
        files = {}
        for name in sorted(os.listdir(where)):
            with open(os.path.join(where, name), "rb") as fh:
                files[name] = fh.read()
        shards = [n for n in files if n.endswith(".safetensors")]
        assert len(shards) >= 2, files.keys()
        return files

    # -- objects
    def _variant(self, blob: bytes, condition: str) -> bytes:
        if condition == "corrupted":
            return corrupted(blob)
        if condition == "truncated":
            return truncated(blob)
        return blob

    def _store_for(self, source: str) -> Store:
        where = SOURCES[source].where
        return self.stores["local" if where == "local" else source]

    def _object(self, source: str, condition: str, fresh: bool) -> str:
        """The key of the object (file or checkpoint directory) for a source kind under
        ``condition``, stored once (or, ``fresh``, for this cell alone)."""
        cache = (source, condition)
        if not fresh and cache in self._objects:
            return self._objects[cache]
        prefix = f"{source}-{condition}-{next(self._serial)}"
        store = self._store_for(source)
        if SOURCES[source].sharded:
            for name, data in self.shards.items():
                shard = name.endswith(".safetensors")
                store.put(f"{prefix}/{name}", self._variant(data, condition) if shard else data)
            key = prefix
        else:
            key = f"{prefix}/model.safetensors"
            store.put(key, self._variant(self.blob, condition))
        if not fresh:
            self._objects[cache] = key
        return key

    # -- one cell
    def run(self, cell: Cell) -> tuple[Outcome, Outcome]:
        """(what ``cell`` gave, what it must give)."""
        got = self._outcome(cell)
        want = expected(cell, self.tensors, self.damaged, self._reference_error)
        return got, want

    def _reference_error(self, condition: str) -> str:
        if condition not in self._reference:
            cell = Cell(**{**REFERENCE, "condition": condition})  # type: ignore[arg-type]
            got = self._outcome(cell)
            self._reference[condition] = got.error or "(the reference gave values)"
        return self._reference[condition]

    def _outcome(self, cell: Cell) -> Outcome:
        cleanup: list[Callable[[], None]] = []
        replaced: list[str] = []  # what the "replaced" hook replaced
        try:
            try:
                result = self._call(cell, cleanup, replaced)
                got = Outcome({k: np.asarray(v) for k, v in result.items()})
            except Exception as exc:
                return Outcome(error=type(exc).__name__, detail=str(exc)[:300])
        finally:
            for undo in reversed(cleanup):
                with contextlib.suppress(OSError):  # a descriptor closed already
                    undo()
        named = SOURCES[cell.source].where != "memory"
        if cell.condition == "replaced" and named and not replaced:
            raise AssertionError(f"{cell.id}: values came back, but nothing was replaced")
        return got

    def _call(self, cell: Cell, cleanup: list[Callable[[], None]],
              replaced: list[str]) -> dict[str, Any]:
        source = SOURCES[cell.source]
        replacing = cell.condition == "replaced"
        if source.where == "memory":
            blob = self._variant(self.blob, cell.condition)
            owner: Any = aligned_writable(blob) if cell.source == "ro-view" else bytearray(blob)
            arg: Any = {"bytes": bytes(blob), "bytearray": owner,
                        "ro-view": memoryview(owner).toreadonly()}[cell.source]
            result = self._entry(cell, arg, None)
            if replacing:  # the owner writes its memory once the call returned
                memoryview(owner)[:] = inverted(blob)
            return result
        store = self._store_for(cell.source)
        key = self._object(cell.source, cell.condition, fresh=replacing)
        location = store.location(key)
        arg = location
        if cell.source == "fileobj":
            fh = open(location, "rb")  # noqa: SIM115 - closed by cleanup (or the hook)
            cleanup.append(fh.close)
            arg = fh
        if replacing:
            cleanup.append(self._replace_after_header(cell, store, key, arg, cleanup, replaced))
        return self._entry(cell, arg, store.storage_options)

    def _replace_after_header(self, cell: Cell, store: Store, key: str, arg: Any,
                              cleanup: list[Callable[[], None]],
                              done: list[str]) -> Callable[[], None]:
        """Make the first header read of this cell replace the object it read (the
        file, or the shard) by its inverted version, and record its name in ``done``;
        returns the undo."""
        from safecodec import _reader

        original = _reader.read_header_bytes
        lock = threading.Lock()
        sharded = SOURCES[cell.source].sharded

        def hooked(src: Any) -> Any:
            out = original(src)
            with lock:
                if done:
                    return out
                name = os.path.basename(str(src.name))
                done.append(name)
            obj = f"{key}/{name}" if sharded else key
            data = self.shards[name] if sharded else self.blob
            store.put(obj, inverted(data))
            if cell.source == "fileobj":  # its owner closes it; the replacement takes its number
                number = arg.fileno()
                arg.close()
                fd = os.open(store.location(obj), os.O_RDONLY)
                if fd != number:
                    os.dup2(fd, number)
                    os.close(fd)
                cleanup.append(lambda: os.close(number))
            return out

        _reader.read_header_bytes = hooked

        def undo() -> None:
            _reader.read_header_bytes = original

        return undo

    def _entry(self, cell: Cell, arg: Any, storage_options: dict[str, Any] | None) -> dict[str, Any]:
        sc = self.sc
        kw: dict[str, Any] = {}
        for option in ENTRIES[cell.entry].allowed:
            if len(ENTRIES[cell.entry].allowed[option]) > 1 or option == "framework":
                kw[option] = getattr(cell, option)
        if kw.get("sharding") == "mesh":
            kw["sharding"] = self.sharding
        if cell.entry == "jax.load_file":
            import safecodec.jax as scj

            kw.pop("framework")
            return scj.load_file(arg, storage_options=storage_options, **kw)
        if cell.entry == "load":
            return sc.load(arg, **kw)  # type: ignore[no-any-return]
        if cell.entry == "load_file":
            return sc.load_file(arg, storage_options=storage_options, **kw)  # type: ignore[no-any-return]
        if cell.entry == "load_tree":
            return sc.load_tree(arg, storage_options=storage_options, **kw)  # type: ignore[no-any-return]
        framework = kw.pop("framework")
        # get_slice(name, sharding=) lays a Sharding over each slice (the handle's own
        # sharding= is for whole tensors): the "mesh" rule, asked for the slice's shape
        per_slice = kw.pop("sharding", None) if cell.entry == "get_slice" else None
        with sc.safe_open(arg, framework, storage_options=storage_options, **kw) as f:
            names = f.offset_keys()
            slices = ({n: f.get_slice(n, **self._slice_sharding(n, per_slice))
                       for n in names} if cell.entry == "get_slice" else None)
            if cell.condition == "closed":
                f.close()
            if slices is not None:
                return {n: s[selection(self.tensors[n])] for n, s in slices.items()}
            if cell.entry == "get_tensor":
                return {n: f.get_tensor(n) for n in names}
            return f.get_tensors()  # type: ignore[no-any-return]

    def _slice_sharding(self, name: str, rule: Any) -> dict[str, Any]:
        """``get_slice``'s ``sharding=`` for tensor ``name`` under a "mesh" cell."""
        if rule is None:
            return {}
        arr = self.tensors[name]
        shape = arr[selection(arr)].shape
        return {"sharding": rule(name, shape, arr.dtype)}


def run_all(chosen: list[Cell], workdir: str, sharding: Any) -> dict[str, dict[str, str]]:
    """Run ``chosen`` cells; ``{cell id: {"ok": "1"/"", "why": ...}}``."""
    results: dict[str, dict[str, str]] = {}
    with stores(workdir) as st:
        matrix = Matrix(workdir, st, sharding)
        for cell in chosen:
            try:
                got, want = matrix.run(cell)
                why = agree(got, want, cell)
            except Exception:
                why = "the matrix itself failed: " + traceback.format_exc()[-1500:]
            results[cell.id] = {"ok": "" if why else "1", "why": why or ""}
    return results
