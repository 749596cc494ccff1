"""Sharded checkpoints: reading them through one handle, and saving them.

The index format, shard names and shard planning are pure and live in
:mod:`safecodec._shardindex`; finding a checkpoint (a directory or an index, local or
remote) is the resolver's job (:mod:`safecodec._resolve`).

Reading (:class:`ShardedSafeOpen`, returned by :func:`safecodec.safe_open` for a directory
or a ``*.safetensors.index.json``): the index is read once; shard headers are read lazily,
when a tensor of that shard is first asked for, and concurrently when every tensor is.
These inconsistencies each raise one :class:`~safecodec.SafecodecError`: a shard that does
not exist, a name mapped to two shards, a name the index places in a shard that does not
hold it, and a shard that is not the one the index was written with (safecodec's indexes
record each shard's size and the SHA-256 of its header under ``safecodec.shards``).

Writing (:func:`save_sharded`): tensors are packed into shards in the order given, a new
shard starting whenever the next tensor would push the current one over
``max_shard_size`` (counting tensor bytes, like Hugging Face); a tensor larger than the
limit gets a shard of its own. Every shard is first written completely to a temporary
file; only when all are written are they renamed into place, then the index. So a save
that fails or is killed while writing leaves the previous checkpoint untouched; a rename
that fails (the index's included) puts back the shards already renamed
(:func:`safecodec._sink.commit_all`: all or none); and the
only window in which a reader can meet old and new shards side by side (the renames,
milliseconds) is caught by the identity check: a reader gets the old checkpoint, the new
one, or an error naming the shard, never a mix. Re-saving over a checkpoint that had
more shards (or other shard names) removes, once the new index is published, exactly the
files the replaced index named and the new one does not: nothing else in the directory is
touched, and nothing is removed before the new checkpoint is complete.
"""

from __future__ import annotations

import _thread
import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

from ._errors import ClosedHandleError, RemoteIOError, SafecodecError, counted
from ._header import (
    CHECKPOINT_KEY,
    ZERO_COPY_ALIGNMENT,
    Header,
    TensorInfo,
    check_metadata,
)
from ._integrity import sha256_hex
from ._progress import ProgressBar
from ._reader import Output, ReadOptions, SafeOpen, handle_options, missing_tensor
from ._resolve import Location, Target, open_remote
from ._shardindex import (
    MAX_INDEX_SIZE,
    SHARD_PATTERN,
    index_bytes,
    parse_index,
    parse_size,
    plan_shards,
    split_target,
)
from ._sink import publishing
from ._threads import run_concurrently
from ._writer import open_sink, stream_file, tensor_nbytes

__all__ = [
    "SHARDS_KEY",
    "ShardHandles",
    "ShardedSafeOpen",
    "read_index",
    "save_sharded",
    "shard_identity",
    "write_checkpoint",
]

#: The index metadata entry where safecodec records each shard's identity:
#: ``{"<shard file>": {"size": <bytes>, "header_sha256": "<hex>"}}``.
SHARDS_KEY: Final = "safecodec.shards"


def shard_identity(size: int, header: bytes | bytearray | memoryview) -> dict[str, Any]:
    """What the index records of a shard: its size and the SHA-256 of its header bytes
    (length prefix included). Two saves of the same names never share both."""
    return {"size": size, "header_sha256": sha256_hex(header)}


def _identities(metadata: Mapping[str, Any], index: str) -> dict[str, dict[str, Any]] | None:
    value = metadata.get(SHARDS_KEY)
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("size"), int)
        and isinstance(v.get("header_sha256"), str) for v in value.values()
    ):
        raise SafecodecError(f"index {index}: metadata entry {SHARDS_KEY!r} is malformed")
    return value


# ----------------------------------------------------------------------------- reading


def read_index(loc: Location) -> bytes:
    """The bytes of the index of checkpoint ``loc`` (local or remote), at most
    :data:`~safecodec._shardindex.MAX_INDEX_SIZE` of them.

    Raises:
        SafecodecError: The index is larger than that.
        RemoteIOError: A remote read failed.
    """
    assert loc.index is not None
    if loc.fs is None:
        size = os.path.getsize(loc.index)
        if size > MAX_INDEX_SIZE:
            raise SafecodecError(f"index {loc.name} is {size} bytes, over the {MAX_INDEX_SIZE} limit")
        with open(loc.index, "rb") as f:
            data = f.read(MAX_INDEX_SIZE + 1)
    else:
        # sized by one metadata request before any byte is read, then read exactly
        # (length-checked, pinned to the version sized) like every remote file
        source = open_remote(loc.index, loc.fs, name=loc.name)
        try:
            if source.size > MAX_INDEX_SIZE:
                raise SafecodecError(f"index {loc.name} is {source.size} bytes, over the "
                                     f"{MAX_INDEX_SIZE} limit")
            data = bytes(source.read(0, source.size, "index"))
        finally:
            source.close()
    if len(data) > MAX_INDEX_SIZE:
        raise SafecodecError(f"index {loc.name} is {len(data)} bytes, over the {MAX_INDEX_SIZE} limit")
    return data


class ShardHandles:
    """The shard handles of one sharded checkpoint: each shard opened on first use,
    checked against the index (the identity it records, the tensors it maps to the
    shard), kept for later calls (thread-safe: one handle per shard even when threads
    race to open it), and closed together.

    Args:
        location: The checkpoint.
        names_by_shard: shard file -> the tensors the index maps to it.
        identity: shard file -> its recorded identity (``safecodec.shards``), or None
            when the index records none.
        options: The options every shard is read with.
        output: The output converter shared by every shard (None for NumPy outputs).
    """

    def __init__(self, location: Location, names_by_shard: dict[str, list[str]],
                 identity: dict[str, dict[str, Any]] | None, options: ReadOptions,
                 output: Output | None) -> None:
        self._loc = location
        self._names_by_shard = names_by_shard
        self._identity = identity
        self._options = options
        self._output = output
        #: shard file -> its open handle (the shards opened so far).
        self.opened: dict[str, SafeOpen] = {}
        self._lock = _thread.allocate_lock()
        self.closed = False

    def get(self, shard: str) -> SafeOpen:
        """The handle of ``shard``, opened (and checked against the index) on first use.

        Raises:
            ClosedHandleError: The handles were closed.
            SafecodecError: The shard does not exist, is not the file the index was
                written with, or lacks tensors the index maps to it.
        """
        handle = self.opened.get(shard)
        if handle is not None:
            return handle
        if self.closed:
            raise ClosedHandleError("this safe_open handle is closed")
        path = self._loc.join(shard)
        wanted = self._names_by_shard[shard]
        try:
            options = self._options.located(self._loc.fs)
            if self._loc.fs is None:
                options = options.replace(progress=False)
            handle = SafeOpen(path, output=self._output, options=options)
        except FileNotFoundError as exc:
            raise SafecodecError(
                f"shard {shard!r} listed in index {self._loc.name} for {counted(len(wanted), 'tensor')} "
                f"(e.g. {wanted[0]!r}) does not exist at {self._loc.display(shard)}"
            ) from exc
        try:
            self._check(shard, handle, wanted)
        except BaseException:
            handle.close()
            raise
        with self._lock:
            if self.closed:
                handle.close()
                raise ClosedHandleError("this safe_open handle is closed")
            existing = self.opened.get(shard)
            if existing is not None:  # another thread won the race
                handle.close()
                return existing
            self.opened[shard] = handle
        return handle

    def all(self) -> list[SafeOpen]:
        """Every shard's handle, in shard order (those not open yet opened concurrently)."""
        return run_concurrently(self.get, list(self._names_by_shard))

    def _check(self, shard: str, handle: SafeOpen, wanted: list[str]) -> None:
        if self._identity is not None:
            expected = self._identity.get(shard)
            if expected is None:
                raise SafecodecError(
                    f"index {self._loc.name} records no identity for shard {shard!r}")
            actual = shard_identity(handle.header.file_size, handle.raw_header())
            if actual != expected:
                raise SafecodecError(
                    f"shard {shard!r} at {self._loc.display(shard)} is not the file index "
                    f"{self._loc.name} was written with (index: {expected['size']} bytes, "
                    f"header {expected['header_sha256'][:12]}; file: {actual['size']} bytes, "
                    f"header {actual['header_sha256'][:12]}): the checkpoint is being "
                    "rewritten, or a save into it failed part-way; open it again"
                )
        missing = [n for n in wanted if n not in handle]
        if missing:
            raise SafecodecError(
                f"index {self._loc.name} maps {counted(len(missing), 'tensor')} to shard {shard!r} that "
                f"it does not hold: {', '.join(map(repr, missing[:5]))}"
                + (" ..." if len(missing) > 5 else "")
                + f" (the shard holds {counted(len(handle), 'tensor')})"
            )

    def close(self) -> None:
        """Close every opened shard; later :meth:`get` calls raise ClosedHandleError."""
        with self._lock:
            self.closed = True
            handles, self.opened = list(self.opened.values()), {}
        for handle in handles:
            handle.close()


class ShardedSafeOpen:
    """A lazy handle over a sharded checkpoint, with the API of :class:`~safecodec.SafeOpen`
    (``keys``, ``offset_keys``, ``metadata``, ``get_tensor``, ``get_slice``,
    ``get_tensors``, ``stats``...). Open it with :func:`safecodec.safe_open`.

    Thread-safe for reads. Shards are opened on first use (:class:`ShardHandles`: opened,
    checked against the index, kept); ``get_tensors`` opens all of them concurrently.

    Examples:
        >>> import numpy as np, safecodec as sc, tempfile
        >>> d = tempfile.mkdtemp()
        >>> sc.save_file({"a": np.ones(100, np.float32), "b": np.zeros(100, np.float32)},
        ...              d, max_shard_size=500)
        >>> with sc.safe_open(d) as f:
        ...     f.keys(), f.shard_files()
        (['a', 'b'], ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'])
    """

    def __init__(self, location: Location, framework: str = "numpy", *,
                 copy: bool = False, unpack: bool = True, device: Any = None,
                 sharding: Any = None, progress: bool = False, verify: bool = False,
                 output: Output | None = None, options: ReadOptions | None = None) -> None:
        assert location.index is not None
        options, fw, output = handle_options(
            options, output, framework=framework, copy=copy, unpack=unpack, device=device,
            sharding=sharding, progress=progress, verify=verify)
        self.framework: str = fw
        #: The output converter shared by every shard (None for NumPy outputs).
        self.output: Output | None = output
        #: The options every shard is read with (a remote shard shows the transfer's
        #: progress bar; a local one none).
        self.options: ReadOptions = options
        self._loc = location
        data = read_index(location)
        self._index_bytes = len(data)
        self._weight_map, self._index_metadata = parse_index(data, location.name)
        shards: dict[str, list[str]] = {}
        for tensor, shard in self._weight_map.items():
            shards.setdefault(shard, []).append(tensor)
        self._names_by_shard = {s: shards[s] for s in sorted(shards)}
        #: The shards' handles, opened on first use.
        self.shards = ShardHandles(location, self._names_by_shard,
                                   _identities(self._index_metadata, location.name),
                                   options, output)
        self._header: Header | None = None


    # -- shards
    def _check_open(self) -> None:
        if self.shards.closed:
            raise ClosedHandleError("this safe_open handle is closed")

    def _shard_of(self, name: str) -> str:
        self._check_open()
        try:
            return self._weight_map[name]
        except (KeyError, TypeError):
            raise missing_tensor(name, list(self._weight_map),
                                 f"sharded checkpoint {self._loc.name}") from None

    def shard_handle(self, name: str) -> SafeOpen:
        """The :class:`~safecodec.SafeOpen` handle of the shard that holds ``name``."""
        return self.shards.get(self._shard_of(name))

    def shard_files(self) -> list[str]:
        """Shard file names, sorted."""
        return list(self._names_by_shard)

    def shard_tensors(self, shard: str) -> list[str]:
        """The tensors the index assigns to ``shard``, in index order."""
        return list(self._names_by_shard[shard])

    def shard_path(self, shard: str) -> str:
        """Where shard file ``shard`` lives (a local path, or a URL in the caller's
        spelling)."""
        return self._loc.display(shard)

    def open_shard(self, shard: str) -> SafeOpen:
        """The handle of shard file ``shard`` (opened and checked on first use)."""
        if shard not in self._names_by_shard:
            raise SafecodecError(f"{shard!r} is not a shard of {self._loc.name}")
        return self.shards.get(shard)

    @property
    def name(self) -> str:
        """The index's path or URL, for messages."""
        return self._loc.name

    @property
    def weight_map(self) -> dict[str, str]:
        """name -> shard file name, as in the index (a copy)."""
        return dict(self._weight_map)

    def index_metadata(self) -> dict[str, Any]:
        """The index's ``metadata`` object (``total_size``...), a copy."""
        return dict(self._index_metadata)

    # -- the SafeOpen API
    def keys(self) -> list[str]:
        """Tensor names, sorted."""
        self._check_open()
        return sorted(self._weight_map)

    def offset_keys(self) -> list[str]:
        """Tensor names shard by shard, each shard in file order (reads every shard header)."""
        self._check_open()
        out: list[str] = []
        for shard, handle in zip(self._names_by_shard, self.shards.all(), strict=True):
            wanted = set(self._names_by_shard[shard])
            out.extend(n for n in handle.offset_keys() if n in wanted)
        return out

    def metadata(self) -> dict[str, str] | None:
        """The ``__metadata__`` of the first shard (safecodec writes the same user metadata
        into every shard). The index's own metadata is :meth:`index_metadata`."""
        self._check_open()
        if not self._names_by_shard:
            return None
        return self.shards.get(next(iter(self._names_by_shard))).metadata()

    def get_tensor(self, name: str) -> Any:
        """Tensor ``name``, read from its shard only."""
        return self.shard_handle(name).get_tensor(name)

    def get_slice(self, name: str, sharding: Any = None) -> Any:
        """A lazy :class:`~safecodec.TensorSlice` of ``name``, read from its shard only
        (``sharding``: see :meth:`safecodec.SafeOpen.get_slice`)."""
        return self.shard_handle(name).get_slice(name, sharding=sharding)

    def get_tensors(self) -> dict[str, Any]:
        """Every tensor of the index: shard headers read concurrently, then each shard's
        tensors (only those the index assigns to it), shard by shard."""
        self._check_open()
        return self.load_tensors(list(self.header.tensors))

    def get_numpy(self, name: str) -> Any:
        """Tensor ``name`` as a NumPy array whatever the framework."""
        return self.shard_handle(name).get_numpy(name)

    def load_tensors(self, names: Sequence[str], *, sharding: Any = None,
                     check_names: bool = True) -> dict[str, Any]:
        """Tensors ``names`` with the handle's framework, in the order given, grouped by
        shard; ``sharding`` (JAX outputs) replaces the handle's for this call."""
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(self._shard_of(n), []).append(n)
        if self.output is not None and check_names:
            tensors = self.header.tensors
            self.output.check_names([tensors[n] for n in names], sharding, "checkpoint")
        out: dict[str, Any] = {}
        for shard, group in groups.items():
            out.update(self.shards.get(shard).load_tensors(group, sharding=sharding,
                                                            check_names=False))
        return {n: out[n] for n in names}

    @property
    def header(self) -> Header:
        """A combined :class:`~safecodec.Header` (reads every shard header once): every
        tensor of the index, shard by shard. Offsets in it are relative to each tensor's
        own shard; ``file_size`` is the sum of the shard sizes; ``metadata`` is
        :meth:`metadata`."""
        self._check_open()
        header = self._header
        if header is None:
            tensors: dict[str, TensorInfo] = {}
            size = 0
            for shard, handle in zip(self._names_by_shard, self.shards.all(), strict=True):
                wanted = set(self._names_by_shard[shard])
                tensors.update((n, i) for n, i in handle.header.tensors.items() if n in wanted)
                size += handle.header.file_size
            first = next(iter(self._names_by_shard), None)
            raw = None if first is None else self.shards.get(first).header.raw_metadata
            header = self._header = Header(tensors, raw, 0, size)
        return header

    @property
    def stats(self) -> dict[str, int]:
        """Bytes read and requests made so far, over the index and every opened shard."""
        total = {"bytes_read": self._index_bytes, "requests": 1}
        for handle in list(self.shards.opened.values()):
            for key, value in handle.stats.items():
                total[key] = total.get(key, 0) + value
        return total

    @property
    def closed(self) -> bool:
        return self.shards.closed

    def __contains__(self, name: object) -> bool:
        return name in self._weight_map

    def __len__(self) -> int:
        return len(self._weight_map)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def close(self) -> None:
        """Close every opened shard. Arrays already handed out stay valid."""
        self.shards.close()

    def __enter__(self) -> ShardedSafeOpen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else (f"{counted(len(self), 'tensor')} in "
                                                f"{counted(len(self._names_by_shard), 'shard')}")
        return f"<safecodec.safe_open sharded {self._loc.name!r} ({state})>"


# ----------------------------------------------------------------------------- writing


def write_checkpoint(
    shards: Sequence[tuple[str, Mapping[str, Any], Mapping[str, str] | None]],
    folder: Target,
    index_name: str,
    *,
    alignment: int = ZERO_COPY_ALIGNMENT,
    progress: bool = False,
    checksums: bool = False,
    write_shard: Callable[[Mapping[str, Any], Any, Mapping[str, str]], tuple[bytes, int]]
    | None = None,
    index_metadata: Mapping[str, Any] | None = None,
) -> str:
    """Write shard files and their index into ``folder``, published as the module
    docstring says: every shard written to a temporary file first, then all renamed into
    place, then the index (the commit point).

    Args:
        shards: ``(shard file name, tensors, metadata)`` per shard, in order.
        folder: The checkpoint's directory (resolved).
        index_name: The index's file name.
        alignment, progress, checksums: As for :func:`safecodec.save_file`.
        write_shard: ``fn(tensors, sink, metadata) -> (header bytes, size)`` writing one
            shard into an open sink without committing it (the routers pass the JAX writer
            for JAX arrays); default: :func:`safecodec._writer.stream_file`.
        index_metadata: Extra entries for the index's ``metadata`` (``total_size`` and
            :data:`SHARDS_KEY` are always written by this function).

    When ``folder`` already holds an index named ``index_name``, the shard files it names
    that this save does not write are removed after the new index is published (see
    :func:`_previous_shards`); no other file is.

    Returns:
        The index's path (the caller's URL spelling for remote targets).

    Raises:
        OSError / RemoteIOError: A write failed (naming the file); nothing this call wrote
            is left, and the previous checkpoint is untouched.
    """
    if folder.fs is None:
        if folder.path:
            os.makedirs(folder.path, exist_ok=True)
    else:  # object stores have no directories: refusing to make one is fine
        with contextlib.suppress(Exception):
            folder.fs.makedirs(folder.path, exist_ok=True)
    weight_map: dict[str, str] = {}
    identities: dict[str, dict[str, Any]] = {}
    total_size = 0
    save_id = os.urandom(8).hex()  # makes every shard header of this save unique
    # Everything is written first; then the shards are published, then the index (the
    # commit point), all or none (a failed index rename puts the old shards back).
    with publishing() as pending:
        with ProgressBar(None, f"save {len(shards)} shards", progress, unit="shard") as bar:
            for shard, part, user_metadata in shards:
                metadata = {**(user_metadata or {}), CHECKPOINT_KEY: save_id}
                sink = open_sink(folder.join(shard))
                pending.append(sink)
                if write_shard is not None:
                    header, size = write_shard(part, sink, metadata)
                else:
                    header, size = stream_file(part, sink, metadata, alignment=alignment,
                                               checksums=checksums)
                identities[shard] = shard_identity(size, header)
                weight_map.update((name, shard) for name in part)
                total_size += sum(tensor_nbytes(v, k) for k, v in part.items())
                bar.update(1)
        extra = {k: v for k, v in (index_metadata or {}).items()
                 if k not in ("total_size", SHARDS_KEY)}
        extra[SHARDS_KEY] = identities
        index_target = folder.join(index_name)
        index_sink = open_sink(index_target)
        pending.append(index_sink)
        index_sink.write(index_bytes(weight_map, total_size, extra))
        index_sink.flush()
        # The shards that only the index being replaced names (read before it is).
        stale = _previous_shards(index_target) - set(identities) - {index_name}
    # Published: now remove them, and nothing else.
    for shard in sorted(stale):
        _remove(folder.join(shard))
    return index_target.name


def _previous_shards(index: Target) -> set[str]:
    """The shard files that the index now at ``index`` names; empty when there is none,
    or when it cannot be read or is not a valid index (then nothing is taken for stale)."""
    try:
        if index.fs is None:
            with open(index.path, "rb") as f:
                data = f.read(MAX_INDEX_SIZE + 1)
        else:
            data = bytes(index.fs.cat_file(index.path))
    except Exception:  # absent, unreadable, not a file: no previous checkpoint to tidy
        return set()
    if len(data) > MAX_INDEX_SIZE:
        return set()
    try:
        weight_map, _ = parse_index(data, index.name)
    except SafecodecError:
        return set()
    return set(weight_map.values())


def _remove(target: Target) -> None:
    """Delete a stale shard file (already gone is fine)."""
    if target.fs is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target.path)
        return
    try:
        if target.fs.exists(target.path):
            target.fs.rm(target.path)
    except FileNotFoundError:
        pass
    except Exception as exc:
        raise RemoteIOError(f"removing stale shard {target.name} failed: {exc}") from exc


def save_sharded(
    tensors: Mapping[str, Any],
    target: Target,
    metadata: Mapping[str, str] | None = None,
    *,
    max_shard_size: int | str,
    alignment: int = ZERO_COPY_ALIGNMENT,
    progress: bool = False,
    checksums: bool = False,
    write_shard: Callable[[Mapping[str, Any], Any, Mapping[str, str]], tuple[bytes, int]]
    | None = None,
) -> str:
    """Write tensors as a sharded checkpoint: ``<prefix>-0000i-of-0000N.safetensors`` shards
    plus ``<prefix>.safetensors.index.json`` (:func:`write_checkpoint`). Called by
    :func:`safecodec.save_file` with ``max_shard_size``.

    Args:
        tensors: name -> array, packed into shards in this order.
        target: A directory (prefix ``model``), an index path
            ``.../name.safetensors.index.json``, or ``.../name.safetensors`` (prefix
            ``name``), resolved (local, or a path on a filesystem).
        metadata: str -> str, written into every shard's ``__metadata__``.
        max_shard_size: Limit on each shard's tensor bytes: an int or ``"5GB"``-style string.
        alignment, progress, checksums, write_shard: See :func:`write_checkpoint`.

    Returns:
        The path (or URL) of the index file written.

    Raises:
        SafecodecError: Bad names, dtypes, metadata or size limit (nothing is written).
        OSError / RemoteIOError: A write failed (naming the shard; the previous checkpoint
            is untouched and nothing this save wrote is left).
    """
    limit = parse_size(max_shard_size)
    check_metadata(metadata)
    if not isinstance(tensors, Mapping):
        raise SafecodecError(
            f"tensors must be a mapping of name -> array, got {type(tensors).__name__}"
        )
    sizes = [(name, tensor_nbytes(value, name)) for name, value in tensors.items()]
    groups = plan_shards(sizes, limit)
    directory, prefix, index_name = split_target(target.path)
    folder = Target(directory, target.fs, split_target(target.name)[0])
    n = len(groups)
    shards = [(SHARD_PATTERN.format(prefix=prefix, i=i, n=n),
               {name: tensors[name] for name in group}, metadata)
              for i, group in enumerate(groups, start=1)]
    return write_checkpoint(shards, folder, index_name, alignment=alignment,
                            progress=progress, checksums=checksums, write_shard=write_shard)
