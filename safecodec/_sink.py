"""Where written bytes go: the ONE atomic publish that every writer uses.

A sink is a temporary file (or object key) next to the target that becomes the target
only on :meth:`commit`, and disappears on :meth:`discard`. Every writer of safecodec goes
through this module: ``save_file`` (local and fsspec), sharded saves (each shard and the
index), multi-host collective saves, and the CLI's rewrites. So these rules hold on every
path:

* **Never torn.** The target is replaced by a rename (``os.replace`` locally, ``fs.mv``
  for fsspec) of a complete, flushed and fsynced temporary file, followed by an fsync of
  the directory; a crash or a kill leaves either the old file or the new one.
* **Symlinks are written through.** A target that is a symbolic link keeps being one: the
  temporary file is created in the directory of the link's destination and renamed over
  the destination, so every name that led to the old content leads to the new.
* **Permission bits are kept.** Replacing an existing file keeps its mode (a 0600 file
  stays 0600, as with the reference writer, which rewrites in place); a new file gets
  ``0666 & ~umask`` like any ``open()``.
* **Temporaries of dead writers are removed, those of live writers never.** Temporary
  files are named ``.<target>.<tag>.safecodec-tmp``. A writer holds an advisory lock
  (``flock``) on its temporary file for as long as it writes; a later save of the same
  target removes only temporaries that nobody holds locked. Locks are kept by the kernel
  per open file, so this works across PID namespaces (a writer in a container and one on
  the host sharing a directory) where a process id would not. A temporary that is still
  empty is left alone for :data:`STALE_EMPTY_AGE` seconds (its writer may be between
  creating and locking it). Where ``fcntl`` is missing (Windows), only temporaries older
  than :data:`STALE_UNLOCKED_AGE` are removed.
* **Commit or discard, nothing in between.** :meth:`commit` that fails (the rename is
  refused: the target is a directory, the disk is full...) discards the temporary and
  closes its descriptor before raising; :func:`publishing` commits inside its discard
  handling, so every writer that uses it leaves the old target and no temporary behind.
* **A group is published all or none.** :func:`commit_all` (sharded checkpoints: every
  shard, then the index) keeps each replaced file until the last sink is published; if
  one fails, the files already renamed into place are put back (or removed, where there
  was none) and the rest discarded, so a failed index rename leaves the old checkpoint
  intact.
* **Errors name the file.** An ``OSError`` raised while writing (``ENOSPC``, ``EDQUOT``...)
  carries the target's path in its ``filename``; so does the error of creating the
  temporary (a folder that does not exist, no permission), worded for the target, never
  naming the hidden temporary.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
import time
from collections.abc import Iterator, Sequence
from typing import Any, Final, Protocol

from ._errors import RemoteIOError, SafecodecError

try:
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows
    _fcntl = None  # type: ignore[assignment]

__all__ = [
    "TMP_SUFFIX",
    "LocalAtomicFile",
    "RemoteAtomicFile",
    "Sink",
    "clean_stale_temporaries",
    "commit_all",
    "fsync_directory",
    "publishing",
    "temporary_name",
]

#: Temporary files are named ``.<target>.<tag>.safecodec-tmp`` next to their target.
TMP_SUFFIX: Final = ".safecodec-tmp"
#: An unlocked temporary that is still empty may belong to a writer that has created it
#: but not locked it yet: it is removed only once older than this (seconds).
STALE_EMPTY_AGE: Final = 60.0
#: Without advisory locks (no ``fcntl``), a temporary is taken for dead after this long.
STALE_UNLOCKED_AGE: Final = 24 * 3600.0
#: Size of the pieces a remote write sends (s3fs uploads each as one multipart part; S3
#: needs parts of at least 5 MiB).
WRITE_BLOCK: Final = 16 * 1024 * 1024
#: Local writes smaller than this are gathered in memory ...
SMALL_WRITE: Final = 64 * 1024
#: ... and written once this much has gathered.
PENDING_LIMIT: Final = 1024 * 1024


class Sink(Protocol):
    """What writers need from a destination."""

    #: The target's name, for messages.
    name: str
    #: Whether :meth:`write_at` is available (local files).
    seekable: bool

    def write(self, data: Any) -> None: ...

    def write_at(self, offset: int, data: Any) -> None: ...

    def flush(self) -> None: ...

    def commit(self, *, keep_previous: bool = False) -> Any: ...

    def revert(self, previous: Any) -> None: ...

    def forget(self, previous: Any) -> None: ...

    def discard(self) -> None: ...


def temporary_name(target: str, tag: str | None = None, *, sep: str = os.sep) -> str:
    """The temporary file's path for ``target``: ``.<base>.<tag>.safecodec-tmp`` in the
    same directory; ``tag`` defaults to the pid plus random hex (unique per writer)."""
    module = posixpath if sep == "/" else os.path
    directory, base = module.split(target)
    if tag is None:
        tag = f"{os.getpid()}.{os.urandom(4).hex()}"
    name = f".{base}.{tag}{TMP_SUFFIX}"
    return module.join(directory, name) if directory else name


def fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (best effort where the OS refuses)."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse
        pass
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    """Take the advisory lock on ``fd`` without waiting; False when another holds it."""
    if _fcntl is None:  # pragma: no cover - Windows
        return True
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
    except OSError as exc:
        # held by a writer; any other error: a filesystem without locks (the age rule
        # in _stale still applies to empty files)
        return exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    return True


def _hold_lock(fd: int) -> None:
    """Take the advisory lock for a writer: waits while a cleaner briefly holds it to look
    at the (fresh, empty, hence kept) file; a filesystem without locks is no error."""
    if _fcntl is not None:
        with contextlib.suppress(OSError):
            _fcntl.flock(fd, _fcntl.LOCK_EX)


def _stale(path: str) -> bool:
    """Remove ``path`` when no writer holds it; True when removed."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        age = time.time() - st.st_mtime
        if _fcntl is None:  # pragma: no cover - Windows
            dead = age > STALE_UNLOCKED_AGE
        else:
            dead = _try_lock(fd) and (st.st_size > 0 or age > STALE_EMPTY_AGE)
        if dead:
            os.unlink(path)
        return dead
    except OSError:
        return False
    finally:
        os.close(fd)


def clean_stale_temporaries(target: str) -> list[str]:
    """Remove the temporaries that dead writers left next to ``target`` (see the module
    docstring for how "dead" is decided). Returns the removed paths."""
    directory, base = os.path.split(os.path.abspath(target))
    prefix = f".{base}."
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return [p for p in (os.path.join(directory, n) for n in names
                        if n.startswith(prefix) and n.endswith(TMP_SUFFIX)) if _stale(p)]


def _with_filename(exc: OSError, name: str) -> OSError:
    if exc.filename is None:
        exc.filename = name
    return exc


def _target_error(exc: OSError, target: str, destination: str) -> OSError:
    """The error of creating the temporary file, worded for the target (the hidden
    temporary's name means nothing to the caller): same class and errno, the target as
    ``filename``."""
    directory = os.path.dirname(destination) or "."
    if exc.errno == errno.ENOENT:
        reason = f"cannot create a file in {directory}, which does not exist"
    elif exc.errno == errno.ENOTDIR:
        reason = f"cannot create a file in {directory}, which is not a directory"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        reason = f"no permission to create a file in {directory}"
    else:
        reason = f"cannot create a file in {directory}: {exc.strerror or exc}"
    return type(exc)(exc.errno, reason, target)


class LocalAtomicFile:
    """A locked temporary file next to ``target`` (next to its destination when ``target``
    is a symlink) that replaces the destination on :meth:`commit`.

    Args:
        target: The path to write.
        tag: A fixed tag for the temporary's name (multi-host saves: every process must
            find the same file); default: pid and random hex.
        size: Preallocate the file to this size (writers that write at offsets).
        clean: Remove dead writers' temporaries of this target first.
    """

    seekable: Final = True

    def __init__(self, target: str | os.PathLike[str], *, tag: str | None = None,
                 size: int | None = None, clean: bool = True) -> None:
        self.target = os.fspath(target)
        self.name = self.target
        #: Where the bytes land: the target, or the file a symlink target points to.
        self.destination = os.path.realpath(self.target)
        if clean:
            clean_stale_temporaries(self.destination)
        self.tmp = temporary_name(self.destination, tag)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(self.tmp, flags | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise _target_error(exc, self.target, self.destination) from None
        try:
            _hold_lock(fd)
            with contextlib.suppress(FileNotFoundError):
                mode = stat.S_IMODE(os.stat(self.destination).st_mode)
                os.fchmod(fd, mode)
            if size:
                os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            raise
        self.fd = fd
        self._closed = False
        self._pending = bytearray()

    def write(self, data: Any) -> None:
        """Append ``data`` at the current position (small pieces are gathered first:
        10,000 small tensors are not 10,000 system calls)."""
        view = memoryview(data).cast("B")
        if len(view) < SMALL_WRITE:
            self._pending += view
            if len(self._pending) >= PENDING_LIMIT:
                self._flush()
            return
        self._flush()
        self._write_all(view)

    def set_size(self, size: int) -> None:
        """Make the file ``size`` bytes long (writers that write at offsets)."""
        self._flush()
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise _with_filename(exc, self.target) from None

    def flush(self) -> None:
        """Write what small writes gathered (the file is complete on disk, not published)."""
        self._flush()

    def _flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, bytearray()
            self._write_all(memoryview(pending))

    def _write_all(self, view: memoryview) -> None:
        try:
            done = 0
            while done < len(view):
                done += os.write(self.fd, view[done:])
        except OSError as exc:
            raise _with_filename(exc, self.target) from None

    def write_at(self, offset: int, data: Any) -> None:
        """Write ``data`` at ``offset`` (the position for :meth:`write` does not move)."""
        self._flush()
        view = memoryview(data).cast("B")
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as exc:
            raise _with_filename(exc, self.target) from None

    def commit(self, *, keep_previous: bool = False) -> tuple[str, int] | None:
        """fsync, rename over the destination (still holding the lock), fsync the
        directory, close. On any failure the temporary is discarded (removed, its
        descriptor closed) before the error propagates; the destination is untouched.

        Args:
            keep_previous: Keep the file being replaced under a locked temporary name
                (a hard link, or a copy where links are refused) so that :meth:`revert`
                can put it back (:func:`commit_all`).

        Returns:
            With ``keep_previous``: what :meth:`revert` / :meth:`forget` take (None when
            there was no previous file); else None.
        """
        previous: tuple[str, int] | None = None
        try:
            self._flush()
            os.fsync(self.fd)
            if keep_previous:
                previous = self._keep_previous()
            os.replace(self.tmp, self.destination)
        except BaseException as exc:
            self.forget(previous)
            self.discard()
            if isinstance(exc, OSError):
                raise _with_filename(exc, self.target) from None
            raise
        fsync_directory(os.path.dirname(self.destination))
        self._close()
        return previous

    def _keep_previous(self) -> tuple[str, int] | None:
        """A locked second name for the destination's current file (None: no file)."""
        if not os.path.isfile(self.destination):
            return None
        keep = temporary_name(self.destination, f"{os.getpid()}.{os.urandom(4).hex()}.previous")
        try:
            try:
                os.link(self.destination, keep)
            except OSError:  # a filesystem without hard links: a copy
                import shutil

                shutil.copyfile(self.destination, keep)
            fd = os.open(keep, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(keep)
            raise
        _hold_lock(fd)  # so that no concurrent save takes it for a dead writer's temporary
        return keep, fd

    def revert(self, previous: tuple[str, int] | None) -> None:
        """Undo a :meth:`commit` made with ``keep_previous``: the previous file is renamed
        back over the destination, or the new file removed where there was none."""
        if previous is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.destination)
        else:
            keep, fd = previous
            try:
                os.replace(keep, self.destination)
            finally:
                os.close(fd)
        fsync_directory(os.path.dirname(self.destination))

    def forget(self, previous: tuple[str, int] | None) -> None:
        """Drop what ``commit(keep_previous=True)`` kept (the publish stands)."""
        if previous is not None:
            keep, fd = previous
            with contextlib.suppress(FileNotFoundError):
                os.unlink(keep)
            os.close(fd)

    def discard(self) -> None:
        """Close and remove the temporary file (idempotent)."""
        self._close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)


class RemoteAtomicFile:
    """A temporary key next to ``path`` on fsspec filesystem ``fs``, streamed to and moved
    to ``path`` on :meth:`commit`; removed on :meth:`discard`. Failures of the filesystem
    raise :class:`~safecodec.RemoteIOError` naming the target."""

    seekable: Final = False

    def __init__(self, fs: Any, path: str, *, name: str | None = None) -> None:
        self.fs = fs
        self.path = path
        self.name = name or path
        self.tmp = temporary_name(path, sep="/")
        self.written = 0
        try:
            try:
                self._file = fs.open(self.tmp, "wb", block_size=WRITE_BLOCK)
            except TypeError:  # a filesystem whose open() takes no block size
                self._file = fs.open(self.tmp, "wb")
        except Exception as exc:
            raise self._error(exc) from exc

    def _error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, SafecodecError):
            return exc
        return RemoteIOError(f"writing {self.name} failed: {type(exc).__name__}: {exc}")

    def write(self, data: Any) -> None:
        """Append ``data``."""
        try:
            n = self._file.write(data)
        except Exception as exc:
            raise self._error(exc) from exc
        self.written += len(memoryview(data).cast("B")) if n is None else n

    def write_at(self, offset: int, data: Any) -> None:
        raise SafecodecError(f"{self.name}: remote sinks are written in order only")

    def flush(self) -> None:
        """Nothing to do: the upload completes on :meth:`commit`."""

    def commit(self, *, keep_previous: bool = False) -> str | None:
        """Finish the upload and move the temporary key to the target; on any failure the
        temporary key is removed before the error propagates.

        Args:
            keep_previous: Copy the object being replaced to a temporary key first, so
                that :meth:`revert` can put it back (:func:`commit_all`).

        Returns:
            With ``keep_previous``: the copy's key, or None when there was no object.
        """
        previous: str | None = None
        try:
            self._file.close()
            if keep_previous and self.fs.isfile(self.path):
                previous = temporary_name(self.path, f"{os.urandom(4).hex()}.previous", sep="/")
                self.fs.copy(self.path, previous)
            self.fs.mv(self.tmp, self.path)
        except BaseException as exc:
            self.forget(previous)
            self.discard()
            if isinstance(exc, Exception):
                raise self._error(exc) from exc
            raise
        return previous

    def revert(self, previous: str | None) -> None:
        """Undo a :meth:`commit` made with ``keep_previous`` (the previous object moved
        back, or the new one removed where there was none)."""
        try:
            if previous is None:
                self.fs.rm(self.path)
            else:
                self.fs.mv(previous, self.path)
        except Exception as exc:
            raise self._error(exc) from exc

    def forget(self, previous: str | None) -> None:
        """Remove the copy ``commit(keep_previous=True)`` made (best effort)."""
        if previous is not None:
            with contextlib.suppress(Exception):
                self.fs.rm(previous)

    def discard(self) -> None:
        """Abandon the upload and remove the temporary key (best effort)."""
        with contextlib.suppress(Exception):
            self._file.close()
        with contextlib.suppress(Exception):
            if self.fs.exists(self.tmp):
                self.fs.rm(self.tmp)


def commit_all(sinks: Sequence[Any]) -> None:
    """Publish ``sinks`` in order, all or none: every sink but the last keeps the file it
    replaces until the last one is published. If a commit fails, the sinks already
    published are reverted (newest first: the previous files are back, new names are
    gone) and the others discarded, then the error propagates.

    Raises:
        OSError / RemoteIOError: A commit failed (nothing of the group stays published;
            a revert that fails too is noted on the error).
    """
    done: list[tuple[Any, Any]] = []
    try:
        for i, sink in enumerate(sinks):
            done.append((sink, sink.commit(keep_previous=i < len(sinks) - 1)))
    except BaseException as exc:
        for sink in sinks[len(done):]:
            sink.discard()
        for sink, previous in reversed(done):
            try:
                sink.revert(previous)
            except Exception as undo:  # pragma: no cover - the filesystem failed twice
                exc.add_note(f"putting back the previous {sink.name} failed too: {undo}")
        raise
    for sink, previous in done:
        sink.forget(previous)


@contextlib.contextmanager
def publishing(*sinks: Any) -> Iterator[list[Any]]:
    """``with publishing(sink) as group:`` runs the block, then commits the sinks of
    ``group`` (those given, and any the block appends) all or none (:func:`commit_all`);
    when the block or a commit raises (anything, KeyboardInterrupt included), every sink
    of the group is discarded. The one commit-or-discard of every writer.

    Examples:
        >>> import os, tempfile
        >>> d = tempfile.mkdtemp()
        >>> with publishing() as group:
        ...     for name in ("a.bin", "b.bin"):
        ...         group.append(LocalAtomicFile(os.path.join(d, name)))
        ...         group[-1].write(name.encode())
        >>> sorted(os.listdir(d))
        ['a.bin', 'b.bin']
    """
    group = list(sinks)
    try:
        yield group
        commit_all(group)
    except BaseException:
        for sink in group:
            sink.discard()
        raise
