"""Sharded checkpoints: the Hugging Face convention of many safetensors files plus an index.

A sharded checkpoint is a directory holding ``<prefix>-00001-of-0000N.safetensors`` shards
and ``<prefix>.safetensors.index.json``::

    {
      "metadata": {"total_size": <sum of tensor data bytes>},
      "weight_map": {"tensor name": "model-00001-of-00002.safetensors", ...}
    }

written with a 2-space indent, sorted keys and a trailing newline. ``weight_map`` decides
which shard a name comes from; other tensors that a shard may hold are ignored. This is a
convention, not part of the format (see FORMAT.md).

Reading (:class:`ShardedSafeOpen`, reached through :func:`safecodec.safe_open` and
:func:`safecodec.load_file` given a directory or an index path, local or remote): the
index is read once; shard headers are read lazily, when a tensor of that shard is first
asked for, and concurrently when every tensor is. Three inconsistencies each raise one
:class:`~safecodec.SafecodecError`: a shard that does not exist, a name mapped to two
shards, a name the index places in a shard that does not hold it.

Writing (:func:`save_sharded`, also ``save_file(..., max_shard_size=...)``): tensors are
packed into shards in the order given, a new shard starting whenever the next tensor would
push the current one over ``max_shard_size`` (counting tensor bytes, like Hugging Face); a
tensor larger than the limit gets a shard of its own. Every shard is a complete file in
the zero-copy layout, written atomically; the index is written last, atomically, so a
reader never finds an index whose shards are not all complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import threading
from collections.abc import Iterator, Mapping
from typing import Any, Final

from ._errors import ClosedHandleError, RemoteIOError, SafecodecError, TensorNotFoundError
from ._header import Header, TensorInfo

__all__ = [
    "INDEX_SUFFIX",
    "ShardedSafeOpen",
    "find_sharded",
    "parse_size",
    "plan_shards",
    "save_sharded",
]

#: Index files end with this (``model.safetensors.index.json``).
INDEX_SUFFIX: Final = ".safetensors.index.json"
#: Shard names: ``<prefix>-<i>-of-<n>.safetensors`` with five digits, like Hugging Face.
SHARD_PATTERN: Final = "{prefix}-{i:05d}-of-{n:05d}.safetensors"
#: Default prefix when saving into a directory.
DEFAULT_PREFIX: Final = "model"
#: Largest index file read (an index maps names to file names; 100 MB is already absurd).
MAX_INDEX_SIZE: Final = 100_000_000

_UNITS: Final = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: int | str) -> int:
    """A shard size limit in bytes: an int, or a string like ``"5GB"`` (10**9, the Hugging
    Face meaning), ``"500MiB"`` (2**20) or ``"1.5GB"``.

    Raises:
        SafecodecError: Not a positive size.

    Example:
        >>> parse_size("5GB"), parse_size("2MiB"), parse_size(1000)
        (5000000000, 2097152, 1000)
    """
    if isinstance(value, bool):
        raise SafecodecError(f"max_shard_size must be an int or a string like '5GB', got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise SafecodecError(
                f"max_shard_size {value!r} is not a size; use bytes (int) or e.g. '5GB', '500MB', "
                "'2GiB'"
            )
        size = int(float(m.group(1)) * _UNITS[unit])
    else:
        raise SafecodecError(
            f"max_shard_size must be an int or a string like '5GB', got {type(value).__name__}"
        )
    if size <= 0:
        raise SafecodecError(f"max_shard_size must be positive, got {value!r}")
    return size


# ----------------------------------------------------------------------------- locating


class _Location:
    """Where a sharded checkpoint lives: its index, on the local disk or on ``fs``."""

    def __init__(self, index: str | None, fs: Any, single: str | None = None,
                 name: str | None = None) -> None:
        self.index = index      # path of the index (local path, or path on fs)
        self.fs = fs            # None for local
        self.single = single    # a directory with one unsharded file: that file
        self.name = name or index or single or ""

    def join(self, shard: str) -> str:
        assert self.index is not None
        if self.fs is None:
            return os.path.join(os.path.dirname(self.index), shard)
        return posixpath.join(posixpath.dirname(self.index), shard)


def _pick_index(candidates: list[str], files: list[str], directory: str) -> tuple[str | None, str | None]:
    """Choose the index (or the lone safetensors file) among a directory's file names."""
    if len(candidates) == 1:
        return candidates[0], None
    if len(candidates) > 1:
        preferred = [c for c in candidates if c == "model" + INDEX_SUFFIX]
        if preferred:
            return preferred[0], None
        raise SafecodecError(
            f"directory {directory} holds {len(candidates)} index files "
            f"({', '.join(sorted(candidates))}); open one of them directly"
        )
    singles = [f for f in files if f.endswith(".safetensors")]
    if len(singles) == 1:
        return None, singles[0]
    raise SafecodecError(
        f"directory {directory} holds no '*{INDEX_SUFFIX}' index and "
        f"{len(singles)} .safetensors files; open a file or an index instead"
    )


def find_sharded(source: Any, fs: Any = None,
                 storage_options: Mapping[str, Any] | None = None) -> _Location | None:
    """If ``source`` names a sharded checkpoint (a directory, or a ``*.index.json`` file),
    where its index is; None for anything else (a plain file, bytes, a file object).

    Costs no request for names ending in ``.safetensors``; a remote name ending in neither
    ``.safetensors`` nor ``.json`` costs one metadata request (is it a directory?).
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        return None
    from ._source import is_remote

    if not is_remote(source, fs):
        if source.endswith(".json") and os.path.isfile(source):
            return _Location(os.path.abspath(source), None)
        if os.path.isdir(source):
            files = sorted(os.listdir(source))
            index, single = _pick_index([f for f in files if f.endswith(INDEX_SUFFIX)],
                                        files, source)
            if index is not None:
                return _Location(os.path.join(source, index), None)
            assert single is not None
            return _Location(None, None, single=os.path.join(source, single))
        return None
    if source.endswith(".safetensors"):
        return None
    from ._remote import resolve_fs

    filesystem, path = resolve_fs(source, fs, storage_options)
    if source.endswith(".json"):
        return _Location(path, filesystem, name=source)
    # info, not isdir: HTTP's isdir would GET (download) a file to look for links in it.
    try:
        kind = filesystem.info(path).get("type")
    except FileNotFoundError:
        return None  # let the plain open report it
    if kind != "directory":
        return None
    entries = filesystem.ls(path, detail=False)
    files = sorted(posixpath.basename(str(e).rstrip("/")) for e in entries)
    index, single = _pick_index([f for f in files if f.endswith(INDEX_SUFFIX)], files, source)
    if index is not None:
        return _Location(posixpath.join(path, index), filesystem, name=source.rstrip("/") + "/" + index)
    assert single is not None
    return _Location(None, filesystem, single=posixpath.join(path, single))


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    dupes: dict[str, list[Any]] = {}
    for key, value in pairs:
        # The same name mapped twice to the same shard is harmless; anything else is not.
        if key in out and (out[key] != value or not isinstance(value, str)):
            dupes.setdefault(key, [out[key]]).append(value)
        out[key] = value
    if dupes:
        key, values = next(iter(dupes.items()))
        raise _DuplicateKey(key, values, len(dupes))
    return out


class _DuplicateKey(Exception):
    def __init__(self, key: str, values: list[Any], count: int) -> None:
        super().__init__(key)
        self.key, self.values, self.count = key, values, count


def parse_index(data: bytes, name: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Validate an index file's bytes; return ``(weight_map, metadata)``.

    Raises:
        SafecodecError: Not JSON, not the expected shape, a name mapped to two shards, or a
            shard name that leaves the index's directory.
    """
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as dup:
        if isinstance(dup.values[0], str):
            raise SafecodecError(
                f"index {name}: tensor {dup.key!r} is mapped to two shards "
                f"({', '.join(map(repr, dup.values))})"
                + (f", and {dup.count - 1} more names are duplicated" if dup.count > 1 else "")
            ) from None
        raise SafecodecError(f"index {name}: key {dup.key!r} appears twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SafecodecError(f"index {name} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("weight_map"), dict):
        raise SafecodecError(
            f"index {name} must be a JSON object with a 'weight_map' object mapping tensor "
            "names to shard files"
        )
    metadata = obj.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise SafecodecError(f"index {name}: 'metadata' must be an object, got {type(metadata).__name__}")
    weight_map: dict[str, str] = obj["weight_map"]
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise SafecodecError(
                f"index {name}: tensor {tensor!r} maps to {shard!r}, expected a shard file name"
            )
        parts = re.split(r"[/\\]", shard)
        if shard.startswith(("/", "\\")) or "://" in shard or ".." in parts or ":" in parts[0]:
            raise SafecodecError(
                f"index {name}: tensor {tensor!r} maps to {shard!r}, which is not a file "
                "inside the checkpoint's directory"
            )
    return weight_map, metadata


# ----------------------------------------------------------------------------- reading


class ShardedSafeOpen:
    """A lazy handle over a sharded checkpoint, with the API of :class:`~safecodec.SafeOpen`
    (``keys``, ``offset_keys``, ``metadata``, ``get_tensor``, ``get_slice``,
    ``get_tensors``, ``stats``...). Open it with :func:`safecodec.safe_open`.

    Thread-safe for reads. Shards are opened on first use; ``get_tensors`` opens all of
    them concurrently.

    Example:
        >>> import numpy as np, safecodec as sc, tempfile
        >>> d = tempfile.mkdtemp()
        >>> sc.save_file({"a": np.ones(100, np.float32), "b": np.zeros(100, np.float32)},
        ...              d, max_shard_size=500)
        >>> with sc.safe_open(d) as f:
        ...     f.keys(), f.shard_files()
        (['a', 'b'], ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'])
    """

    def __init__(self, location: _Location, framework: str = "numpy", *,
                 copy: bool = False, unpack: bool = True, device: Any = None,
                 sharding: Any = None, progress: bool = False) -> None:
        assert location.index is not None
        self._loc = location
        self._options: dict[str, Any] = dict(framework=framework, copy=copy, unpack=unpack,
                                             device=device, sharding=sharding)
        self._progress = progress
        self._index_bytes = 0
        data = self._read_index()
        self._weight_map, self._index_metadata = parse_index(data, location.name)
        shards: dict[str, list[str]] = {}
        for tensor, shard in self._weight_map.items():
            shards.setdefault(shard, []).append(tensor)
        self._names_by_shard = {s: shards[s] for s in sorted(shards)}
        self._handles: dict[str, Any] = {}
        self._header: Header | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._framework = str(framework).lower()
        if self._framework not in ("numpy", "np", "jax", "flax"):
            raise SafecodecError(
                f"unsupported framework {framework!r}; use 'numpy' (or 'np'), 'jax' or 'flax'"
            )
        #: JAX output: a converter that hands each tensor to its shard's converter.
        self._jax: _ShardedConverter | None = None
        if self._framework in ("jax", "flax"):
            self._jax = _ShardedConverter(self, sharding)
        elif device is not None or sharding is not None:
            raise SafecodecError("device= and sharding= need framework='jax'")

    def _read_index(self) -> bytes:
        loc = self._loc
        assert loc.index is not None
        if loc.fs is None:
            size = os.path.getsize(loc.index)
            if size > MAX_INDEX_SIZE:
                raise SafecodecError(f"index {loc.name} is {size} bytes, over the {MAX_INDEX_SIZE} limit")
            with open(loc.index, "rb") as f:
                data = f.read()
        else:
            try:
                data = bytes(loc.fs.cat_file(loc.index))
            except FileNotFoundError:
                raise
            except OSError as exc:
                raise RemoteIOError(f"reading index {loc.name} failed: {exc}") from exc
            if len(data) > MAX_INDEX_SIZE:
                raise SafecodecError(f"index {loc.name} is {len(data)} bytes, over the {MAX_INDEX_SIZE} limit")
        self._index_bytes = len(data)
        return data

    # -- shards
    def _shard_name(self, shard: str) -> str:
        if self._loc.fs is None:
            return self._loc.join(shard)
        base = self._loc.name.rsplit("/", 1)[0] if "/" in self._loc.name else ""
        return f"{base}/{shard}" if base else shard

    def _open_shard(self, shard: str) -> Any:
        """The handle of ``shard``, opened (and checked against the index) on first use."""
        handle = self._handles.get(shard)
        if handle is not None:
            return handle
        if self._closed:
            raise ClosedHandleError("this safe_open handle is closed")
        from ._reader import SafeOpen

        path = self._loc.join(shard)
        wanted = self._names_by_shard[shard]
        try:
            if self._loc.fs is None:
                handle = SafeOpen(path, **self._options)
            else:
                handle = SafeOpen(path, fs=self._loc.fs, progress=self._progress, **self._options)
        except FileNotFoundError as exc:
            raise SafecodecError(
                f"shard {shard!r} listed in index {self._loc.name} for {len(wanted)} tensors "
                f"(e.g. {wanted[0]!r}) does not exist at {self._shard_name(shard)}"
            ) from exc
        missing = [n for n in wanted if n not in handle]
        if missing:
            handle.close()
            raise SafecodecError(
                f"index {self._loc.name} maps {len(missing)} tensors to shard {shard!r} that "
                f"it does not hold: {', '.join(map(repr, missing[:5]))}"
                + (" ..." if len(missing) > 5 else "")
                + f" (the shard holds {len(handle)} tensors)"
            )
        with self._lock:
            if self._closed:
                handle.close()
                raise ClosedHandleError("this safe_open handle is closed")
            existing = self._handles.get(shard)
            if existing is not None:  # another thread won the race
                handle.close()
                return existing
            self._handles[shard] = handle
        return handle

    def _open_all(self) -> list[Any]:
        from ._remote import run_concurrently

        return run_concurrently(self._open_shard, list(self._names_by_shard))

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedHandleError("this safe_open handle is closed")

    def _shard_of(self, name: str) -> str:
        self._check_open()
        try:
            return self._weight_map[name]
        except (KeyError, TypeError):
            import difflib

            names = list(self._weight_map)
            close = difflib.get_close_matches(str(name), names, n=3) if len(names) < 100_000 else []
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise TensorNotFoundError(
                f"no tensor named {name!r} in sharded checkpoint {self._loc.name} "
                f"({len(names)} tensors){hint}"
            ) from None

    def shard_handle(self, name: str) -> Any:
        """The :class:`~safecodec.SafeOpen` handle of the shard that holds ``name``."""
        return self._open_shard(self._shard_of(name))

    def shard_files(self) -> list[str]:
        """Shard file names, sorted."""
        return list(self._names_by_shard)

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
        for shard, handle in zip(self._names_by_shard, self._open_all(), strict=True):
            wanted = set(self._names_by_shard[shard])
            out.extend(n for n in handle.offset_keys() if n in wanted)
        return out

    def metadata(self) -> dict[str, str] | None:
        """The ``__metadata__`` of the first shard (safecodec writes the same user metadata
        into every shard). The index's own metadata is :meth:`index_metadata`."""
        self._check_open()
        if not self._names_by_shard:
            return None
        return self._open_shard(next(iter(self._names_by_shard))).metadata()  # type: ignore[no-any-return]

    def get_tensor(self, name: str) -> Any:
        """Tensor ``name``, read from its shard only."""
        handle = self.shard_handle(name)
        if self._jax is not None:
            return self._jax.load_tensor(handle.header.tensors[name])
        return handle.get_tensor(name)

    def get_slice(self, name: str) -> Any:
        """A lazy :class:`~safecodec.TensorSlice` of ``name``."""
        return self.shard_handle(name).get_slice(name)

    def get_tensors(self) -> dict[str, Any]:
        """Every tensor of the index: shard headers read concurrently, then each shard's
        tensors (only those the index assigns to it), shard by shard."""
        self._check_open()
        return self._load_infos(list(self.header.tensors.values()))

    @property
    def framework(self) -> str:
        """``"numpy"`` or ``"jax"``: what ``get_tensor`` returns."""
        return "numpy" if self._jax is None else "jax"

    def get_numpy(self, name: str) -> Any:
        """Tensor ``name`` as a NumPy array whatever the framework."""
        return self.shard_handle(name).get_numpy(name)

    def load_tensors(self, names: list[str], *, sharding: Any = None) -> dict[str, Any]:
        """Tensors ``names`` with the handle's framework; ``sharding`` (JAX handles: a
        mapping name -> Sharding) replaces the handle's for this call."""
        tensors = self.header.tensors
        infos = []
        for n in names:
            self._shard_of(n)  # raises TensorNotFoundError
            infos.append(tensors[n])
        if self._jax is None or sharding is None:
            return self._load_infos(infos)
        saved, self._jax.sharding = self._jax.sharding, sharding
        try:
            return self._load_infos(infos)
        finally:
            self._jax.sharding = saved

    def _load_infos(self, infos: list[TensorInfo]) -> dict[str, Any]:
        """Load tensors (infos from :attr:`header`), grouped by shard."""
        if self._jax is not None:
            return self._jax.load_all(infos)
        out: dict[str, Any] = {}
        for shard, group in self._group(infos):
            out.update(self._open_shard(shard)._load_infos(group))
        return out

    def _group(self, infos: list[TensorInfo]) -> list[tuple[str, list[TensorInfo]]]:
        groups: dict[str, list[TensorInfo]] = {}
        for info in infos:
            groups.setdefault(self._shard_of(info.name), []).append(info)
        return list(groups.items())

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
            for shard, handle in zip(self._names_by_shard, self._open_all(), strict=True):
                wanted = set(self._names_by_shard[shard])
                tensors.update((n, i) for n, i in handle.header.tensors.items() if n in wanted)
                size += handle.header.file_size
            first = next(iter(self._names_by_shard), None)
            raw = None if first is None else self._open_shard(first).header.raw_metadata
            header = self._header = Header(tensors, raw, 0, size)
        return header

    # -- what the tree and JAX layers use on a SafeOpen handle
    @property
    def _unpack(self) -> bool:
        return bool(self._options["unpack"])

    def _reader_checked(self) -> _ShardedReader:
        self._check_open()
        return _ShardedReader(self)

    @property
    def stats(self) -> dict[str, int]:
        """Bytes read and requests made so far, over the index and every opened shard."""
        total = {"bytes_read": self._index_bytes, "requests": 1}
        for handle in list(self._handles.values()):
            for key, value in handle.stats.items():
                total[key] = total.get(key, 0) + value
        return total

    @property
    def closed(self) -> bool:
        return self._closed

    def __contains__(self, name: object) -> bool:
        return name in self._weight_map

    def __len__(self) -> int:
        return len(self._weight_map)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def close(self) -> None:
        """Close every opened shard. Arrays already handed out stay valid."""
        with self._lock:
            self._closed = True
            handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            handle.close()

    def __enter__(self) -> ShardedSafeOpen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self)} tensors in {len(self._names_by_shard)} shards"
        return f"<safecodec.safe_open sharded {self._loc.name!r} ({state})>"


class _ShardedReader:
    """``handle._reader_checked()`` of a sharded handle: ``array(info)`` from its shard."""

    def __init__(self, owner: ShardedSafeOpen) -> None:
        self._owner = owner

    def array(self, info: TensorInfo) -> Any:
        return self._owner.shard_handle(info.name)._reader_checked().array(info)


class _ShardedConverter:
    """``handle._jax`` of a sharded handle: the interface of :class:`safecodec._jax.Converter`
    (``convert``, ``load_tensor``, ``load_all``, settable ``sharding`` and ``strict_x64``),
    each call passed to the converter of the tensor's shard."""

    def __init__(self, owner: ShardedSafeOpen, sharding: Any) -> None:
        self._owner = owner
        self.sharding = sharding
        self.strict_x64 = False

    def _converter(self, shard: str, names: set[str] | None = None) -> Any:
        conv = self._owner._open_shard(shard)._jax
        spec = self.sharding
        if isinstance(spec, Mapping) and names is not None:
            spec = {k: v for k, v in spec.items() if k in names}
        conv.sharding = spec
        conv.strict_x64 = self.strict_x64
        return conv

    def convert(self, arr: Any, info: TensorInfo) -> Any:
        return self._converter(self._owner._shard_of(info.name)).convert(arr, info)

    def load_tensor(self, info: TensorInfo) -> Any:
        return self._converter(self._owner._shard_of(info.name)).load_tensor(info)

    def load_all(self, infos: list[TensorInfo]) -> dict[str, Any]:
        infos = list(infos)
        from ._jax import check_sharding_names

        check_sharding_names(self.sharding, infos, "checkpoint")
        out: dict[str, Any] = {}
        for shard, group in self._owner._group(infos):
            conv = self._converter(shard, {i.name for i in group})
            out.update(conv.load_all(group))
        return {i.name: out[i.name] for i in infos}


# ----------------------------------------------------------------------------- writing


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group tensors, in the order given, into shards of at most ``max_bytes`` tensor bytes;
    a tensor larger than the limit gets a shard of its own.

    Example:
        >>> plan_shards([("a", 40), ("b", 40), ("c", 300), ("d", 10)], 100)
        [['a', 'b'], ['c'], ['d']]
    """
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, nbytes in sizes:
        if nbytes > max_bytes:
            if current:
                shards.append(current)
                current, used = [], 0
            shards.append([name])
            continue
        if current and used + nbytes > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _tensor_sizes(tensors: Mapping[str, Any]) -> list[tuple[str, int]]:
    from . import _dtypes
    from ._header import check_name
    from ._writer import _shape_dtype

    out = []
    for name, value in tensors.items():
        check_name(name)
        dtype, shape, _ = _shape_dtype(value, name)
        bits = _dtypes.DTYPES[_dtypes.code_for_numpy(dtype, name)].bits
        count = 1
        for d in shape:
            count *= int(d)
        out.append((name, count * bits // 8))
    return out


def _split_target(target: str) -> tuple[str, str, str]:
    """``(directory, prefix, index file name)`` for a save target: a directory, an index
    path, or a ``.safetensors`` path whose stem becomes the prefix."""
    stripped = target.rstrip("/\\") or target
    base = stripped.replace("\\", "/").rsplit("/", 1)[-1]
    directory = stripped[: len(stripped) - len(base)]
    if not directory.endswith("://"):  # keep the "//" of a bare "memory://name"
        directory = directory[:-1] if directory.endswith(("/", "\\")) else directory
    if base.endswith(INDEX_SUFFIX):
        return directory, base[: -len(INDEX_SUFFIX)], base
    if base.endswith(".safetensors"):
        prefix = base[: -len(".safetensors")]
        return directory, prefix, prefix + INDEX_SUFFIX
    return stripped, DEFAULT_PREFIX, DEFAULT_PREFIX + INDEX_SUFFIX


def index_bytes(weight_map: Mapping[str, str], total_size: int,
                extra_metadata: Mapping[str, Any] | None = None) -> bytes:
    """The index file's bytes: 2-space indent, sorted keys, trailing newline."""
    metadata: dict[str, Any] = dict(extra_metadata or {})
    metadata["total_size"] = total_size
    obj = {"metadata": metadata, "weight_map": dict(weight_map)}
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def save_sharded(
    tensors: Mapping[str, Any],
    directory_or_url: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    *,
    max_shard_size: int | str,
    alignment: int = 64,
    fs: Any = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> str:
    """Write tensors as a sharded checkpoint: ``<prefix>-0000i-of-0000N.safetensors`` shards
    plus ``<prefix>.safetensors.index.json``.

    Args:
        tensors: name -> array (NumPy, JAX, anything ``numpy.asarray`` takes), packed into
            shards in this order.
        directory_or_url: A directory (local, URL, or path on ``fs``; prefix ``model``), an
            index path ``.../name.safetensors.index.json``, or ``.../name.safetensors``
            (prefix ``name``).
        metadata: str -> str, written into every shard's ``__metadata__``.
        max_shard_size: Limit on each shard's tensor bytes: an int or ``"5GB"``-style string.
        alignment: Each shard's layout (64: zero-copy; 8: the reference writer's).
        fs: An fsspec filesystem on which ``directory_or_url`` is a path.
        storage_options: Options for the filesystem a URL names.
        progress: Show a progress bar (tqdm, when installed).

    Returns:
        The path (or URL) of the index file written.

    Raises:
        SafecodecError: Bad names, dtypes, metadata or size limit (nothing is written).
        RemoteIOError: A remote write failed.

    Example:
        >>> import numpy as np, safecodec as sc, tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> idx = save_sharded({"a": np.ones(300, np.uint8), "b": np.ones(300, np.uint8)},
        ...                    d, max_shard_size=500)
        >>> sorted(os.listdir(d))
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']
    """
    from ._header import check_metadata
    from ._remote import ProgressBar
    from ._source import is_remote
    from ._writer import save_file

    limit = parse_size(max_shard_size)
    check_metadata(metadata)
    if not isinstance(tensors, Mapping):
        raise SafecodecError(
            f"tensors must be a mapping of name -> array, got {type(tensors).__name__}"
        )
    sizes = _tensor_sizes(tensors)
    groups = plan_shards(sizes, limit)
    total_size = sum(n for _, n in sizes)
    target = os.fspath(directory_or_url)
    directory, prefix, index_name = _split_target(target)
    remote = is_remote(target, fs)
    filesystem: Any = None
    if remote:
        from ._remote import resolve_fs

        filesystem, fs_dir = resolve_fs(directory, fs, storage_options)
        # Object stores have no directories: refusing to make one is fine.
        with contextlib.suppress(OSError, NotImplementedError):
            filesystem.makedirs(fs_dir, exist_ok=True)
    else:
        fs_dir = directory
        if directory:
            os.makedirs(directory, exist_ok=True)

    def join(name: str) -> str:
        if remote:
            return posixpath.join(fs_dir, name) if fs_dir else name
        return os.path.join(directory, name)

    n = len(groups)
    weight_map: dict[str, str] = {}
    by_name = dict(sizes)
    with ProgressBar(total_size, f"save {n} shards", progress) as bar:
        for i, group in enumerate(groups, start=1):
            shard = SHARD_PATTERN.format(prefix=prefix, i=i, n=n)
            part = {name: tensors[name] for name in group}
            if remote:
                from ._remote import save_remote

                save_remote(part, join(shard), metadata, alignment=alignment, fs=filesystem)
            else:
                save_file(part, join(shard), metadata, alignment=alignment)
            weight_map.update((name, shard) for name in group)
            bar.update(sum(by_name[name] for name in group))
    data = index_bytes(weight_map, total_size)
    index_path = join(index_name)
    if remote:
        from ._remote import write_remote_bytes

        write_remote_bytes(filesystem, index_path, [data], total=len(data))
        if fs is None:  # hand back a URL in the caller's own spelling
            return directory + index_name if directory.endswith("/") else f"{directory}/{index_name}"
        return index_path
    from ._writer import AtomicFile

    out = AtomicFile(index_path)
    try:
        out.file.write(data)
        out.commit()
    except BaseException:
        out.discard()
        raise
    return index_path
