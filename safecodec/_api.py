"""The routers: ``safe_open``, ``read_header``, ``load``, ``load_file``, ``save``,
``save_file``, ``verify_file``.

This is the only module that chooses between single file and sharded checkpoint, local
and remote, NumPy and JAX outputs, the NumPy and the JAX writer. It asks the resolver what
a source or target is (:mod:`safecodec._resolve`), then hands the work to exactly one of
the layers below; none of them routes. The JAX modules are deferred
(:mod:`safecodec._lazy`): imported when a JAX output or JAX arrays are first involved, so
that the NumPy routes never import jax.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import _integrity, _writer
from ._errors import ChecksumError, SafecodecError
from ._header import CHECKSUM_KEY, Header
from ._lazy import deferred
from ._reader import BACKENDS, ReadOptions, SafeOpen, read_header_from
from ._resolve import Location, locate, open_source, resolve_target
from ._sharded import ShardedSafeOpen, save_sharded

if TYPE_CHECKING:
    from . import _jax_load, _jax_save
else:  # jax is expensive to import: only JAX outputs and JAX arrays pay for it
    _jax_load = deferred("safecodec._jax_load")
    _jax_save = deferred("safecodec._jax_save")

__all__ = [
    "BACKENDS",
    "load",
    "load_file",
    "read_header",
    "safe_open",
    "save",
    "save_file",
    "verify_file",
    "verify_handle",
]

def _jax_output(options: ReadOptions) -> Any:
    return _jax_load.JaxOutput.for_options(options)


def safe_open(
    source: Any = None,
    framework: str = "numpy",
    device: Any = None,
    *,
    filename: Any = None,
    fs: Any = None,
    copy: bool = False,
    unpack: bool = True,
    sharding: Any = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
    verify: bool = False,
    backend: str = "mmap",
    strict_x64: bool = False,
) -> Any:
    """Open a safetensors file, buffer, file object, URL or sharded checkpoint lazily.

    Only the header is read; tensors are read when asked for. Use as a context manager.

    Args:
        source: A str/PathLike path, an fsspec URL, a bytes-like object, or a binary file
            object (memory-mapped when it has a usable ``fileno()``); a directory or a
            ``*.safetensors.index.json`` (local or remote) opens a sharded checkpoint.
        framework: ``"numpy"`` (default, also ``"np"``), or ``"jax"`` / ``"flax"`` for
            jax.Array outputs.
        device: With framework='jax', the device to place arrays on. With NumPy outputs,
            only ``"cpu"`` (the reference wheel's spelling) is accepted. Third positional
            argument, as in the wheel: ``safe_open(path, "np", "cpu")``.
        filename: The reference wheel's name for ``source`` (``safe_open(filename=...,
            framework="np")``); give one or the other.
        fs: An fsspec filesystem on which ``source`` is a path.
        copy: Return independent arrays instead of views of the source.
        unpack: Unpack F4/F6 tensors to one element per byte (ml_dtypes). With False, they
            come back as 1-D ``uint8`` arrays of the packed bytes.
        sharding: With framework='jax', a Sharding, mapping or callable (see
            :func:`safecodec.jax.load_file`).
        storage_options: Options for the fsspec filesystem a URL names (credentials,
            endpoint...).
        progress: Show a progress bar (tqdm, when installed): bytes, tensor by tensor, on
            loads of local files; the transfer on long remote reads.
        verify: Check each tensor against the SHA-256 stored by ``save_file(...,
            checksums=True)`` before returning it; a mismatch raises
            :class:`~safecodec.ChecksumError` naming the tensor. A file without
            checksums raises too.
        backend: As in the reference wheel: ``"mmap"`` (default) or ``"pread"``
            (positioned reads into private arrays, the same as ``copy=True``).
        strict_x64: With framework='jax': raise instead of narrowing 64-bit tensors when
            JAX's x64 mode is off.

    Returns:
        A :class:`~safecodec.SafeOpen` handle; for a directory or an index, a
        :class:`~safecodec.ShardedSafeOpen` with the same API over every shard.

    Raises:
        SafecodecError: The header breaks a rule of the format (subclass says which), a
            sharded checkpoint's index and shards disagree, or an argument is invalid.

    Examples:
        >>> import numpy as np, safecodec as sc
        >>> data = sc.save({"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
        >>> with sc.safe_open(data) as f:
        ...     f.get_slice("w")[:, 1].tolist()
        [1.0, 4.0]
    """
    if (source is None) == (filename is None):
        raise TypeError("safe_open() takes one source: a positional argument or filename=")
    if source is None:
        source = filename
    location = locate(source, fs, storage_options)
    return _open(source, location, ReadOptions(
        framework=framework, copy=copy, unpack=unpack, verify=verify, progress=progress,
        backend=backend, device=device, sharding=sharding, strict_x64=strict_x64, fs=fs,
        storage_options=storage_options))


def _open(source: Any, location: Location | None, options: ReadOptions) -> Any:
    """:func:`safe_open` once the resolver has said where ``source`` is: the one place
    that builds a handle, from the options built once by the caller."""
    output = _jax_output(options) if options.framework == "jax" else None
    if location is not None and location.index is not None:
        return ShardedSafeOpen(location, output=output, options=options)
    if location is not None:  # a directory holding one unsharded file
        source, options = location.single, options.located(location.fs)
    return SafeOpen(source, output=output, options=options)


def read_header(source: Any, *, fs: Any = None,
                storage_options: dict[str, Any] | None = None) -> Header:
    """Read and validate only the header of ``source``.

    Args:
        source: A path, fsspec URL, bytes-like object or binary file object.
        fs: An fsspec filesystem on which ``source`` is a path.
        storage_options: Options for the fsspec filesystem a URL names.

    Returns:
        The :class:`~safecodec.Header`: ``tensors`` (name -> dtype, shape, offsets),
        ``metadata``, ``header_size``, ``file_size``. For a sharded checkpoint (a directory
        or an index), the combined header of its shards (offsets relative to each shard).

    Examples:
        >>> import numpy as np, safecodec as sc
        >>> sc.read_header(sc.save({"w": np.zeros((2, 3), np.float32)})).tensors["w"].shape
        (2, 3)
    """
    location = locate(source, fs, storage_options)
    if location is not None:  # a checkpoint directory or index: located once
        with _open(source, location,
                   ReadOptions(fs=fs, storage_options=storage_options)) as handle:
            return handle.header  # type: ignore[no-any-return]
    src = open_source(source, fs=fs, storage_options=storage_options)
    try:
        return read_header_from(src)
    finally:
        src.close()


def load(data: Any, *, copy: bool = False, unpack: bool = True, verify: bool = False,
         framework: str = "numpy", device: Any = None, sharding: Any = None,
         strict_x64: bool = False) -> dict[str, Any]:
    """Load every tensor of an in-memory safetensors file.

    Args:
        data: bytes, bytearray, memoryview or any C-contiguous buffer.
        copy: Return independent arrays instead of views into ``data`` (views of
            ``bytes`` are read-only; views of a ``bytearray`` share its memory).
        unpack: See :func:`safe_open`.
        verify: Check stored checksums (see :func:`safe_open`).
        framework, device, sharding, strict_x64: See :func:`safe_open` (``"jax"``:
            what :func:`safecodec.jax.load` returns).

    Returns:
        name -> array, in file order.

    Raises:
        SafecodecError: ``data`` is not a valid safetensors file.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        try:
            memoryview(data)
        except TypeError:
            raise SafecodecError(
                f"load() takes bytes-like data, got {type(data).__name__}; use load_file() "
                "for paths and file objects"
            ) from None
    options = ReadOptions(framework=framework, copy=copy, unpack=unpack, verify=verify,
                          device=device, sharding=sharding, strict_x64=strict_x64)
    with _open(data, locate(data, None, None), options) as f:
        return f.get_tensors()  # type: ignore[no-any-return]


def load_file(
    path_or_url: Any,
    *,
    fs: Any = None,
    copy: bool = False,
    unpack: bool = True,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
    verify: bool = False,
    backend: str = "mmap",
    framework: str = "numpy",
    device: Any = None,
    sharding: Any = None,
    strict_x64: bool = False,
) -> dict[str, Any]:
    """Load every tensor of a safetensors file (or of a sharded checkpoint).

    Local files are memory-mapped: the arrays are copy-on-write views of a private
    mapping, writable, with nothing copied until written and nothing written reaching the
    file. They stay valid after the file is closed, deleted or replaced.

    Args:
        path_or_url: A str/PathLike path, an fsspec URL, or a binary file object; a
            directory or ``*.safetensors.index.json`` loads every shard.
        fs: An fsspec filesystem on which ``path_or_url`` is a path.
        copy: Read into independent arrays (one copy from the page cache) instead.
        unpack: See :func:`safe_open`.
        storage_options: Options for the fsspec filesystem a URL names. Remote files are
            streamed into memory once (concurrent range requests), the object's identity
            checked, and validated like local ones.
        progress: Show a progress bar (tqdm, when installed): bytes, tensor by tensor, on
            loads of local files; the transfer on long remote reads.
        verify: Check stored checksums (see :func:`safe_open`).
        backend: ``"mmap"`` (default) or ``"pread"`` (= ``copy=True``).
        framework, device, sharding, strict_x64: See :func:`safe_open` (``"jax"``:
            what :func:`safecodec.jax.load_file` returns).

    Returns:
        name -> array, in file order.

    Raises:
        SafecodecError: The file is not a valid safetensors file.
        RemoteIOError: A remote object came back short or changed while being read.
        FileNotFoundError: ``path_or_url`` does not exist.
    """
    location = locate(path_or_url, fs, storage_options)
    options = ReadOptions(framework=framework, copy=copy, unpack=unpack, verify=verify,
                          progress=progress, backend=backend, device=device,
                          sharding=sharding, strict_x64=strict_x64, fs=fs,
                          storage_options=storage_options)
    with _open(path_or_url, location, options) as f:
        return f.get_tensors()  # type: ignore[no-any-return]


def save(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None, *,
         alignment: int = 64, checksums: bool = False) -> bytes:
    """Serialize tensors to safetensors bytes.

    Args:
        tensors: name -> anything ``numpy.asarray`` accepts (arrays, scalars, jax arrays).
        metadata: Optional str -> str mapping stored as ``__metadata__``.
        alignment: 64 (default) writes the zero-copy layout: data starts at a multiple of 64
            and every tensor whose size is a multiple of 64 bytes starts 64-byte aligned.
            8 writes exactly the bytes the reference writer writes.
        checksums: Store a SHA-256 digest of every tensor in the metadata (key
            ``safecodec.checksums``), checked on load with ``verify=True``.

    Returns:
        The file's bytes.

    Raises:
        SafecodecError: A bad name (NUL, ``__metadata__``), metadata that is not str -> str,
            a dtype with no safetensors code, or a header over the size limit.

    Examples:
        >>> import numpy as np, safecodec as sc
        >>> data = sc.save({"a": np.ones(3, np.float32)}, alignment=8)
        >>> data[8:40]
        b'{"a":{"dtype":"F32","shape":[3],'
    """
    return _writer.save(tensors, metadata, alignment=alignment, checksums=checksums)


def _holds_jax_arrays(tensors: Any) -> bool:
    """True when some value is a jax.Array (checked without importing jax)."""
    if "jax" not in sys.modules or not isinstance(tensors, Mapping):
        return False
    return _jax_save.holds_jax_arrays(tensors)


def save_file(
    tensors: Mapping[str, Any],
    path_or_url: Any,
    metadata: Mapping[str, str] | None = None,
    *,
    alignment: int = 64,
    fs: Any = None,
    storage_options: dict[str, Any] | None = None,
    max_shard_size: int | str | None = None,
    progress: bool = False,
    checksums: bool = False,
    timeout_s: float = 600.0,
) -> None:
    """Write tensors to a safetensors file, atomically and streaming.

    NumPy values (and anything ``numpy.asarray`` takes) go through the streaming writer;
    ``jax.Array`` values to a local path are written shard by shard at their offsets
    (collectively when they span processes; see :func:`safecodec.jax.save_file`).

    Args:
        tensors: name -> anything ``numpy.asarray`` accepts.
        path_or_url: A str/PathLike local path, or an fsspec URL / a path on ``fs``. A
            symlink is written through: its destination is replaced, atomically.
        metadata: Optional str -> str mapping.
        alignment: 64 (zero-copy layout, default) or 8 (the reference writer's bytes).
        fs: An fsspec filesystem on which ``path_or_url`` is a path.
        storage_options: Options for the fsspec filesystem a URL names. Remote writes go
            to a temporary key that is moved to ``path_or_url`` once complete.
        max_shard_size: Write a sharded checkpoint instead (an int or ``"5GB"``):
            ``path_or_url`` is then a directory, an index path or a ``name.safetensors``
            whose stem prefixes the shards; every shard is written before any is
            published, and the index last.
        progress: Show a progress bar (tqdm, when installed).
        checksums: Store a SHA-256 digest of every tensor (every shard, local or remote;
            see :func:`save`).
        timeout_s: How long a multi-host save waits for the slowest process.

    Raises:
        SafecodecError: See :func:`save`. Nothing is left at ``path_or_url`` on failure,
            and an existing file there is untouched.
        OSError: The write failed (the error names the file).
    """
    target = resolve_target(path_or_url, fs, storage_options)
    jax_values = _holds_jax_arrays(tensors)
    if max_shard_size is not None:
        write_shard = None
        if jax_values and target.fs is None and not checksums:
            def write_shard(part: Mapping[str, Any], sink: Any,
                            shard_metadata: Mapping[str, str]) -> tuple[bytes, int]:
                return _jax_save.write_shard(part, sink, shard_metadata, alignment)

        save_sharded(tensors, target, metadata, max_shard_size=max_shard_size,
                     alignment=alignment, progress=progress, checksums=checksums,
                     write_shard=write_shard)
        return
    if jax_values and target.fs is None and not checksums:
        # Shard by shard, at their offsets: never a whole gathered copy of an array.
        _jax_save.save_file(tensors, target.path, metadata, alignment=alignment,
                            timeout_s=timeout_s)
        return
    _writer.write_file(tensors, lambda: _writer.open_sink(target), metadata, alignment=alignment,
                       checksums=checksums, progress=progress)


def verify_file(source: Any, **open_kwargs: Any) -> list[str]:
    """Check every tensor of ``source`` (a file, or every shard of a sharded checkpoint)
    against its stored checksum.

    Args:
        source: What :func:`safe_open` takes.
        **open_kwargs: Passed to :func:`safe_open` (``fs=``, ``copy=``...).

    Returns:
        A list of problems (empty when every tensor matches).

    Raises:
        ChecksumError: A file has no checksums.
        SafecodecError: The file is not a valid safetensors file.
    """
    problems: list[str] = []
    with safe_open(source, **open_kwargs) as handle:
        if isinstance(handle, ShardedSafeOpen):
            for shard in handle.shard_files():
                problems.extend(f"{shard}: {p}" for p in verify_handle(handle.open_shard(shard)))
        else:
            problems.extend(verify_handle(handle))
    return problems


def verify_handle(handle: SafeOpen) -> list[str]:
    """The checksum problems of one open file (see :func:`verify_file`).

    Raises:
        ChecksumError: The file has no checksums.
    """
    digests = _integrity.decode(handle.header.raw_metadata)
    if digests is None:
        raise ChecksumError(f"{handle.name} has no checksums ({CHECKSUM_KEY})")
    problems = [f"checksum stored for missing tensor {n!r}"
                for n in sorted(set(digests) - set(handle.header.tensors))]
    reader = handle.reader
    for info in handle.header.tensors.values():
        try:
            _integrity.check(info.name, reader.raw_bytes(info), digests)
        except ChecksumError as exc:
            problems.append(str(exc))
    return problems
