"""The resolver: the one place that interprets what a caller passed as a source or a target.

* path / PathLike / URL / path on ``fs`` / bytes-like / binary file object -> an opened
  :class:`~safecodec._source.Source` (:func:`open_source`);
* a directory or ``*.safetensors.index.json`` (local or remote) -> a :class:`Location` of a
  sharded checkpoint (:func:`locate`); a directory holding one unsharded file -> that file;
* a path or URL to write -> a :class:`Target` (local path, or filesystem and path).

fsspec is imported only here and in :mod:`safecodec._remote` (a deferred module,
:mod:`safecodec._lazy`), and only when a URL or a filesystem is given. Nothing else in safecodec looks at the spelling of a path.
"""

from __future__ import annotations

import os
import posixpath
import stat
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import _source
from ._errors import RemoteIOError, SafecodecError
from ._lazy import deferred
from ._shardindex import INDEX_SUFFIX, pick_index
from ._source import BufferSource, FileSource, MappedSource

if TYPE_CHECKING:
    from . import _remote
else:  # the fsspec source (a thread pool, fsspec's machinery): only URLs pay for it
    _remote = deferred("safecodec._remote")

__all__ = [
    "Location",
    "Target",
    "is_remote",
    "locate",
    "open_source",
    "resolve_fs",
    "resolve_target",
]


def _is_url(path: str) -> bool:
    head, sep, _ = path.partition("://")
    return bool(sep) and head.replace("+", "").replace("-", "").isalnum() and len(head) > 1


def is_remote(source: Any, fs: Any = None) -> bool:
    """True when ``source`` goes through fsspec (a URL, or any path with ``fs=``)."""
    if fs is not None:
        return True
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    return isinstance(source, str) and _is_url(source)


def resolve_fs(
    path: str, fs: Any = None, storage_options: Mapping[str, Any] | None = None
) -> tuple[Any, str]:
    """Turn an fsspec URL (or a path on ``fs``) into ``(filesystem, path on it)``.

    Raises:
        SafecodecError: Both ``fs`` and ``storage_options`` were given; an unknown
            protocol; a protocol whose fsspec implementation is not installed.
    """
    if fs is not None:
        if storage_options:
            raise SafecodecError("pass either fs= or storage_options=, not both")
        return fs, str(fs._strip_protocol(path))
    from fsspec.core import url_to_fs

    try:
        filesystem, fpath = url_to_fs(path, **dict(storage_options or {}))
    except ImportError as exc:
        raise SafecodecError(
            f"{path}: the filesystem for this URL needs a package that is not installed "
            f"({exc})"
        ) from exc
    except ValueError as exc:
        if "Protocol not known" in str(exc) or "not known" in str(exc):
            raise SafecodecError(f"{path}: unknown protocol ({exc})") from exc
        raise
    return filesystem, str(fpath)


def _remote_info(fs: Any, path: str, name: str) -> Mapping[str, Any]:
    """``fs.info(path)`` from the server (:func:`safecodec._remote.fresh_info`), with every
    failure but a missing object as RemoteIOError."""
    began = time.monotonic()
    try:
        info: Mapping[str, Any] = _remote.fresh_info(fs, path)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise RemoteIOError(
            f"asking for the size of {name} failed: "
            f"{_remote.describe_failure(exc, time.monotonic() - began)}"
        ) from exc
    return info


def open_remote(path: str, fs: Any = None, storage_options: Mapping[str, Any] | None = None,
                *, progress: bool = False, name: str | None = None) -> Any:
    """An :class:`~safecodec._remote.FsspecSource` on ``path`` (one ``info`` request);
    ``name`` is what messages call it (default: ``path``).

    Raises:
        FileNotFoundError: The object does not exist.
        RemoteIOError: Its size cannot be determined, it is a directory, or the request
            failed.
    """
    filesystem, fpath = resolve_fs(path, fs, storage_options)
    shown = name or path
    return _remote.FsspecSource(filesystem, fpath, _remote_info(filesystem, fpath, shown),
                                name=shown, progress=progress)


def _check_regular(path: str) -> None:
    """Refuse directories, FIFOs, sockets and devices before opening them (an open or a
    read of a FIFO would block forever), each with a SafecodecError (a shard name in an
    index can name any of them)."""
    try:
        st = os.stat(path)
    except OSError:
        return  # open() reports a missing file with its own error
    if stat.S_ISDIR(st.st_mode):
        raise SafecodecError(f"{path} is a directory, not a safetensors file (open the "
                             "directory with safe_open or load_file to read a sharded "
                             "checkpoint)")
    if not stat.S_ISREG(st.st_mode):
        raise SafecodecError(f"{path} is not a regular file (a FIFO, socket or device); "
                             "safetensors files must be regular files")


def open_source(source: Any, *, fs: Any = None,
                storage_options: Mapping[str, Any] | None = None,
                progress: bool = False) -> Any:
    """Resolve ``source`` into an opened :class:`~safecodec._source.Source`.

    Args:
        source: A str or PathLike path, an fsspec URL, a bytes-like object, or a binary
            file object.
        fs: An fsspec filesystem; ``source`` is then a path on it.
        storage_options: Passed to fsspec when ``source`` is a URL.
        progress: For remote sources, show a progress bar on large reads.

    Raises:
        SafecodecError: ``source`` is of an unsupported type, or not a regular file.
        FileNotFoundError / OSError: a local path cannot be opened (not a format error).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return BufferSource(source)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        if is_remote(source, fs):
            return open_remote(source, fs, storage_options, progress=progress)
        _check_regular(source)
        if _source.MMAP_AVAILABLE:
            try:
                return MappedSource(source)
            except (ValueError, OSError) as exc:
                if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError)):
                    raise
                # Empty files: fall back to plain reads.
        return FileSource(source)
    if hasattr(source, "read"):
        _check_regular_file_object(source)
        if _source.MMAP_AVAILABLE:
            try:
                fd = source.fileno()
                if os.fstat(fd).st_size > 0 and getattr(source, "seekable", lambda: True)():
                    return MappedSource(file=source)
            except Exception:  # BytesIO's fileno raises UnsupportedOperation
                pass
        return FileSource(source)
    try:
        memoryview(source)
    except TypeError:
        raise SafecodecError(
            "expected a path, an fsspec URL, a bytes-like object or a binary file object, "
            f"got {type(source).__name__}"
        ) from None
    return BufferSource(source)


def _check_regular_file_object(file: Any) -> None:
    try:
        mode = os.fstat(file.fileno()).st_mode
    except Exception:  # no descriptor: an in-memory file object
        return
    if not stat.S_ISREG(mode):
        raise SafecodecError(
            f"{getattr(file, 'name', 'file object')} is not a regular file (a pipe, socket or "
            "device); pass its bytes instead"
        )


# ----------------------------------------------------------------------------- checkpoints


class Location:
    """Where a sharded checkpoint lives.

    Attributes:
        index: Path of the index (local, or on ``fs``); None when a directory holds one
            unsharded file, which is then ``single``.
        fs: The fsspec filesystem, None for local paths.
        single: A directory's only ``.safetensors`` file (no index), else None.
        name: What messages call the checkpoint (the caller's URL spelling for remote ones).
    """

    __slots__ = ("fs", "index", "name", "single")

    def __init__(self, index: str | None, fs: Any = None, single: str | None = None,
                 name: str = "") -> None:
        self.index = index
        self.fs = fs
        self.single = single
        self.name = name or index or single or ""

    def __repr__(self) -> str:
        return f"Location(index={self.index!r}, single={self.single!r}, name={self.name!r})"

    def join(self, shard: str) -> str:
        """The path of ``shard`` (an index-relative name) on the checkpoint's filesystem."""
        assert self.index is not None
        if self.fs is None:
            return os.path.join(os.path.dirname(self.index), shard)
        return posixpath.join(posixpath.dirname(self.index), shard)

    def display(self, shard: str) -> str:
        """How messages name ``shard``: a local path, or a URL in the caller's spelling."""
        if self.fs is None:
            return self.join(shard)
        base = self.name.rsplit("/", 1)[0] if "/" in self.name else ""
        return f"{base}/{shard}" if base else shard


def locate(source: Any, fs: Any = None,
           storage_options: Mapping[str, Any] | None = None) -> Location | None:
    """If ``source`` names a sharded checkpoint (a directory, or a ``*.json`` index), where
    its index is; None for anything else (a plain file, bytes, a file object).

    Costs no request for names ending in ``.safetensors``; a remote name ending in neither
    ``.safetensors`` nor ``.json`` costs one metadata request (is it a directory?).

    Raises:
        SafecodecError: A directory with several indexes, or with no index and not exactly
            one ``.safetensors`` file.
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        return None
    if not is_remote(source, fs):
        if source.endswith(".json") and os.path.isfile(source):
            return Location(os.path.abspath(source))
        if os.path.isdir(source):
            files = sorted(os.listdir(source))
            index, single = pick_index([f for f in files if f.endswith(INDEX_SUFFIX)],
                                       files, source)
            if index is not None:
                return Location(os.path.join(source, index))
            assert single is not None
            return Location(None, single=os.path.join(source, single))
        return None
    if source.endswith(".safetensors"):
        return None
    filesystem, path = resolve_fs(source, fs, storage_options)
    if source.endswith(".json"):
        return Location(path, filesystem, name=source)
    # info, not isdir: HTTP's isdir would GET (download) a file to look for links in it.
    try:
        kind = _remote_info(filesystem, path, source).get("type")
    except FileNotFoundError:
        return None  # let the plain open report it
    if kind != "directory":
        return None
    try:
        entries = filesystem.ls(path, detail=False)
    except Exception as exc:
        raise RemoteIOError(f"listing {source} failed: {type(exc).__name__}: {exc}") from exc
    files = sorted(posixpath.basename(str(e).rstrip("/")) for e in entries)
    index, single = pick_index([f for f in files if f.endswith(INDEX_SUFFIX)], files, source)
    if index is not None:
        return Location(posixpath.join(path, index), filesystem,
                        name=source.rstrip("/") + "/" + index)
    assert single is not None
    return Location(None, filesystem, single=posixpath.join(path, single))


# ----------------------------------------------------------------------------- targets


class Target:
    """A place to write.

    Attributes:
        path: A local path (``fs`` None) or a path on ``fs``.
        fs: The fsspec filesystem, None for local paths.
        name: The caller's spelling (a URL for remote targets), for messages.
    """

    __slots__ = ("fs", "name", "path")

    def __init__(self, path: str, fs: Any = None, name: str = "") -> None:
        self.path = path
        self.fs = fs
        self.name = name or path

    def __repr__(self) -> str:
        return f"Target(path={self.path!r}, name={self.name!r})"

    @property
    def remote(self) -> bool:
        return self.fs is not None

    def join(self, name: str) -> Target:
        """``name`` inside this target taken as a directory."""
        if self.fs is None:
            return Target(os.path.join(self.path, name))
        path = posixpath.join(self.path, name) if self.path else name
        shown = self.name + name if self.name.endswith("/") else f"{self.name}/{name}"
        return Target(path, self.fs, shown)

    def split(self) -> tuple[Target, str]:
        """The folder holding this target (on the same filesystem) and its base name."""
        if self.fs is None:
            path = os.path.abspath(self.path)
            return Target(os.path.dirname(path)), os.path.basename(path)
        folder, _, base = self.path.rstrip("/").rpartition("/")
        shown = self.name.rstrip("/").rpartition("/")[0]
        return Target(folder, self.fs, shown), base

    def is_dir(self) -> bool:
        """Whether this target names an existing directory (a folder, or a prefix that
        holds objects)."""
        if self.fs is None:
            return os.path.isdir(self.path)
        try:
            return bool(self.fs.isdir(self.path))
        except Exception as exc:
            raise RemoteIOError(f"asking whether {self.name} is a folder failed: "
                                f"{type(exc).__name__}: {exc}") from exc

    def same_file(self, other: Target) -> bool:
        """Whether writing this target replaces the file ``other`` names: the same path,
        a symbolic or hard link to it (local), or the same object on an equal filesystem."""
        mine, theirs = self._local(), other._local()
        if mine is not None and theirs is not None:
            try:
                return os.path.samefile(mine, theirs)
            except OSError:  # one of them does not exist (yet)
                return os.path.realpath(mine) == os.path.realpath(theirs)
        if mine is not None or theirs is not None:
            return False
        strip = self.fs._strip_protocol
        return bool(self.fs == other.fs
                    and strip(self.path).rstrip("/") == strip(other.path).rstrip("/"))

    def _local(self) -> str | None:
        """The local path this target writes (``file://`` URLs included), else None."""
        if self.fs is None:
            return self.path
        if getattr(self.fs, "local_file", False):
            return str(self.fs._strip_protocol(self.path))
        return None


def resolve_target(path_or_url: Any, fs: Any = None,
                   storage_options: Mapping[str, Any] | None = None,
                   *, what: str = "save_file()") -> Target:
    """A :class:`Target` for a str/PathLike path or URL (``fs``: a path on it).

    Raises:
        SafecodecError: Not a path or URL.
    """
    if not isinstance(path_or_url, str | os.PathLike):
        raise SafecodecError(f"{what} takes a path or URL, got {type(path_or_url).__name__}")
    text = os.fspath(path_or_url)
    if not is_remote(text, fs):
        return Target(text)
    filesystem, fpath = resolve_fs(text, fs, storage_options)
    return Target(fpath, filesystem, text)
