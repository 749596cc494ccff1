"""JAX front end: ``save``, ``save_file``, ``load``, ``load_file`` with ``jax.Array`` values.

Loading a file written by safecodec on JAX's CPU backend copies nothing: every tensor whose
address in the file is a multiple of 64 becomes a ``jax.Array`` that shares the file's
read-only mapping. Everything else is copied exactly once (on accelerators: the transfer).
See the zero-copy guide for the rules, and the notes on lifetime below.

Lifetime: mapped arrays stay valid after the file is closed, deleted or atomically
replaced. Modifying the file *in place* (opening it for writing rather than replacing it)
changes arrays that alias it, and truncating it crashes readers of those arrays (SIGBUS);
pass ``copy=True`` when the file may be rewritten in place.

Examples:
    >>> import jax.numpy as jnp, safecodec.jax as scj
    >>> scj.load(scj.save({"w": jnp.arange(3.0)}))["w"].tolist()
    [0.0, 1.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from . import _api, _jax_save
from ._errors import SafecodecError
from ._jax_load import PrecisionWarning

__all__ = ["PrecisionWarning", "load", "load_file", "safe_open", "save", "save_file"]

#: The router, re-exported as ``safetensors.flax`` re-exports ``safe_open``.
safe_open = _api.safe_open


def save(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None, *,
         alignment: int = 64) -> bytes:
    """Serialize ``jax.Array`` (or NumPy) values to safetensors bytes.

    Args:
        tensors: name -> ``jax.Array`` / array-like. The input is never modified.
        metadata: Optional str -> str mapping stored as ``__metadata__``.
        alignment: 64 (default: the zero-copy layout) or 8 (the reference writer's bytes).

    Returns:
        The file's bytes.

    Raises:
        DtypeError: A dtype with no safetensors code (int4, uint4, int2, float8_e3m4,
            float8_e4m3, float8_e4m3b11fnuz, complex128...); the message names the tensor,
            its dtype and the cast to use.
        SafecodecError: A bad name or metadata, or an array spread over several processes
            (use :func:`save_file`).
    """
    return _jax_save.save(tensors, metadata, alignment=alignment)


def save_file(tensors: Mapping[str, Any], filename: Any, metadata: Mapping[str, str] | None = None,
              *, alignment: int = 64, fs: Any = None, timeout_s: float = 600.0,
              storage_options: dict[str, Any] | None = None,
              max_shard_size: int | str | None = None) -> None:
    """Write ``jax.Array`` values to a safetensors file, atomically and streaming.

    Arrays are written shard by shard at their byte offsets: the host memory used at any
    time is one shard (one tensor at most), never the whole model.

    Multi-host: when several processes (``jax.distributed``) hold arrays that no single
    process holds whole, *every* process calls ``save_file`` with the same arguments and a
    path on a shared filesystem. The layout is planned identically everywhere; process 0
    creates the temporary file and writes the header and the values that are whole on it;
    every process writes its own shards (replica 0 only); the file is renamed into place
    by process 0 once all are done, and every call returns after that. If any process
    fails, no file appears and every process raises. Arrays that are fully addressable
    everywhere need no collective call: one process may save them alone.

    Args:
        tensors: name -> ``jax.Array`` / array-like.
        filename: Local path (or fsspec URL / path on ``fs``: then arrays are gathered).
        metadata: Optional str -> str mapping.
        alignment: 64 (default) or 8.
        fs: An fsspec filesystem on which ``filename`` is a path.
        timeout_s: How long a multi-host save waits for the slowest process.
        storage_options: Options for the fsspec filesystem a URL names.
        max_shard_size: Write a sharded checkpoint (``"5GB"`` or bytes) with an index
            instead of one file; see :func:`safecodec.save_file`.

    Raises:
        DtypeError, SafecodecError: See :func:`save`. Nothing appears at ``filename`` on
            failure.
    """
    _api.save_file(tensors, filename, metadata, alignment=alignment, fs=fs, timeout_s=timeout_s,
                   storage_options=storage_options, max_shard_size=max_shard_size)


def load(data: bytes | bytearray | memoryview, *, device: Any = None, sharding: Any = None,
         strict_x64: bool = False) -> dict[str, jax.Array]:
    """Load every tensor of in-memory safetensors bytes as ``jax.Array`` values.

    ``bytes`` (immutable) are aliased on CPU where aligned; a ``bytearray`` or writable
    buffer is copied once, so later writes to it never reach the arrays.

    Args:
        data: The file's bytes.
        device: Device to place every tensor on (committed). Default: JAX's default device,
            uncommitted, like ``jax.device_put(x)``.
        sharding: A ``jax.sharding.Sharding`` for every tensor, a mapping name -> Sharding
            (others get ``device`` placement), or a callable ``fn(name, shape, dtype)``
            returning a Sharding or None. Results are global arrays with exactly that
            sharding; each process builds only its addressable shards.
        strict_x64: With JAX's x64 mode off, 64-bit tensors (I64, U64, F64) are converted to
            32 bits by JAX's rule and one :class:`PrecisionWarning` names them; with True,
            a :class:`~safecodec.DtypeError` is raised instead.

    Returns:
        name -> ``jax.Array``, in file order.

    Raises:
        SafecodecError: Invalid file, unusable sharding (e.g. a dimension that does not
            divide evenly), or an F6 tensor (no JAX dtype: use the NumPy output).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SafecodecError(
            f"load() takes bytes-like data, got {type(data).__name__}; use load_file() for "
            "paths and file objects"
        )
    return _api.load(data, framework="jax", device=device, sharding=sharding,
                     strict_x64=strict_x64)


def load_file(filename: Any, *, backend: str = "mmap", device: Any = None, sharding: Any = None,
              copy: bool = False, strict_x64: bool = False, fs: Any = None,
              storage_options: dict[str, Any] | None = None) -> dict[str, jax.Array]:
    """Load every tensor of a safetensors file as ``jax.Array`` values.

    On CPU, tensors 64-byte aligned in the file share its read-only mapping (zero copy);
    the others are copied once. On accelerators the device transfer reads the mapped
    pages directly. With a sharding, each process reads only the byte ranges of its own
    shards, and replicated shards once.

    Args:
        filename: Path, fsspec URL, or binary file object.
        backend: As in ``safetensors.flax.load_file``: ``"mmap"`` (default) or
            ``"pread"`` (positioned reads into private memory, the same as ``copy=True``).
        device, sharding, strict_x64: See :func:`load`.
        copy: Give every array its own memory (one read from the page cache) instead of
            sharing the mapping; use it when the file may be modified in place.
        fs: An fsspec filesystem on which ``filename`` is a path.
        storage_options: Options for the fsspec filesystem a URL names.

    A directory or ``*.safetensors.index.json`` (local or remote) loads every shard of a
    sharded checkpoint; ``sharding`` then applies across shards.

    Returns:
        name -> ``jax.Array``, in file order.

    Raises:
        SafecodecError: See :func:`load`; an unknown ``backend``.
        FileNotFoundError: ``filename`` does not exist.

    Examples:
        >>> import jax, safecodec.jax as scj
        >>> # params = scj.load_file("model.safetensors", device=jax.devices("cpu")[0])
    """
    return _api.load_file(filename, framework="jax", backend=backend, device=device,
                          sharding=sharding, copy=copy, strict_x64=strict_x64, fs=fs,
                          storage_options=storage_options)
