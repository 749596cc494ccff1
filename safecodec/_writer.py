"""The single-file writer: tensors -> layout plan -> bytes streamed into a sink.

The whole file is never built in memory. The header is planned from each tensor's dtype
and shape alone; then tensors are written one at a time, C-contiguous little-endian arrays
straight from their buffers (no ``tobytes()``), others through one temporary copy of that
tensor only (Fortran order, strided views, big-endian, packed F4/F6).

Where the bytes go is a sink of :mod:`safecodec._sink` (the one atomic publish: a
temporary file renamed over the target, or a temporary key moved); which sink, and
whether a save is sharded or goes through the JAX writer, the routers decide
(:mod:`safecodec._api`). Checksums are computed while streaming and written into the
header in place when the sink is seekable, or computed in a first pass when it is not
(remote objects), so ``checksums=True`` holds on every path.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

import numpy as np

from . import _dtypes
from ._dtypes import DType, code_for_numpy
from ._errors import SafecodecError
from ._header import (
    CHECKSUM_KEY,
    ZERO_COPY_ALIGNMENT,
    PlannedTensor,
    check_metadata,
    check_name,
    encode_header,
    plan_layout,
)
from ._integrity import encode, new_hasher, placeholder
from ._packed import pack
from ._progress import ProgressBar
from ._resolve import Target
from ._sink import LocalAtomicFile, RemoteAtomicFile, publishing

__all__ = [
    "describe_value",
    "final_header",
    "iter_tensor_bytes",
    "open_sink",
    "prepare",
    "save",
    "stream_file",
    "tensor_nbytes",
    "write_file",
]
#: Above this size, one tensor is written in pieces (bounded temporary memory for copies).
WRITE_CHUNK: Final = 64 << 20


def describe_value(value: Any, name: str) -> tuple[np.dtype, tuple[int, ...], Any]:
    """dtype and shape of a tensor without converting it when it already says (numpy and
    jax arrays, ShapeDtypeStruct-likes); anything else goes through ``np.asarray``."""
    if isinstance(value, np.ndarray):
        return value.dtype, value.shape, value
    if isinstance(value, Mapping):
        raise SafecodecError(
            f"tensor {name!r} is a nested mapping: save() and save_file() take a flat "
            "name -> array dict; use safecodec.save_tree() or safecodec.serialize() for "
            "nested trees"
        )
    dtype = getattr(value, "dtype", None)
    shape = getattr(value, "shape", None)
    if dtype is not None and shape is not None and hasattr(value, "__array__"):
        try:
            return np.dtype(dtype), tuple(int(d) for d in shape), value
        except TypeError:
            pass
    try:
        arr = np.asarray(value)
    except Exception as exc:
        raise SafecodecError(
            f"tensor {name!r}: cannot convert {type(value).__name__} to an array ({exc})"
        ) from exc
    return arr.dtype, arr.shape, arr


def prepare(
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None,
    alignment: int,
    *,
    checksums: bool = False,
) -> tuple[bytes, list[PlannedTensor], dict[str, Any]]:
    """Validate names, dtypes and metadata and plan the file.

    With ``checksums=True`` the header carries placeholder digests of the final length
    (see :mod:`safecodec._integrity`); :func:`final_header` gives the real one.

    Returns:
        ``(header, planned, values)``: the length prefix plus padded header bytes, the
        tensors in file order with offsets, and name -> original value.
    """
    if not isinstance(tensors, Mapping):
        raise SafecodecError(
            f"tensors must be a mapping of name -> array, got {type(tensors).__name__}"
        )
    md = check_metadata(metadata)
    entries: list[tuple[str, DType, tuple[int, ...]]] = []
    values: dict[str, Any] = {}
    for name, value in tensors.items():
        check_name(name)
        dtype, shape, value = describe_value(value, name)
        code = code_for_numpy(dtype, name)
        entries.append((name, _dtypes.DTYPES[code], shape))
        values[name] = value
    if checksums:
        md = dict(md or {})
        md[CHECKSUM_KEY] = placeholder(list(values))
    header, planned = plan_layout(entries, md, alignment)
    return header, planned, values


def final_header(
    planned: list[PlannedTensor],
    metadata: Mapping[str, str] | None,
    alignment: int,
    digests: Mapping[str, str],
    placeholder_header: bytes,
) -> bytes:
    """The header with the real digests; same length as the placeholder one."""
    md = dict(check_metadata(metadata) or {})
    md[CHECKSUM_KEY] = encode({t.name: digests[t.name] for t in planned})
    header = encode_header(planned, md, alignment)
    if len(header) != len(placeholder_header):  # pragma: no cover - an internal invariant
        raise SafecodecError("internal error: checksum header changed length")
    return header


def _le_bytes(value: Any, t: PlannedTensor) -> Iterator[memoryview]:
    """The tensor's bytes in file layout, as memoryviews, without copying when the array
    already is C-contiguous little-endian."""
    arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    if arr.shape != t.shape:
        raise SafecodecError(
            f"tensor {t.name!r} changed shape while being written: planned {list(t.shape)}, "
            f"got {list(arr.shape)}"
        )
    dt = t.dtype
    if dt.packed:
        yield _dtypes.as_memoryview(pack(np.ascontiguousarray(arr), dt, t.name))
        return
    if dt.bits > 8:
        order = arr.dtype.byteorder
        big = order == ">" or (order == "=" and not _dtypes.HOST_IS_LITTLE_ENDIAN)
        if big:
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        elif order in ("=", "|") and not _dtypes.HOST_IS_LITTLE_ENDIAN:
            # ml_dtypes types are always native: swap through the storage type.
            arr = arr.view(dt.storage.newbyteorder("=")).astype(dt.storage)
    if arr.size == 0:
        return
    if arr.flags.c_contiguous:
        yield _dtypes.as_memoryview(arr.reshape(-1).view(np.uint8))
        return
    # Non-contiguous: copy a bounded number of rows at a time, in C order.
    row_bytes = arr.itemsize * (arr.size // arr.shape[0])
    rows = max(1, WRITE_CHUNK // max(row_bytes, 1))
    for start in range(0, arr.shape[0], rows):
        piece = np.ascontiguousarray(arr[start : start + rows])
        yield _dtypes.as_memoryview(piece.reshape(-1).view(np.uint8))


def iter_tensor_bytes(
    planned: list[PlannedTensor],
    values: Mapping[str, Any],
    digests: dict[str, str] | None = None,
) -> Iterator[memoryview]:
    """Yield the data section piece by piece, in file order. When ``digests`` is a dict,
    each tensor's checksum is computed on the way and stored in it."""
    for t in planned:
        value = values[t.name]
        if (digests is None and type(value) is np.ndarray and value.flags.c_contiguous
                and value.shape == t.shape and not t.dtype.packed and value.size
                and _dtypes.HOST_IS_LITTLE_ENDIAN and value.dtype.byteorder in "=<|"):
            # The common case, without a generator per tensor (10,000 small tensors).
            yield _dtypes.as_memoryview(value.reshape(-1).view(np.uint8))
            continue
        written = 0
        hasher = None
        if digests is not None:
            hasher = new_hasher()
        for chunk in _le_bytes(values[t.name], t):
            written += chunk.nbytes
            if hasher is not None:
                hasher.update(chunk)
            yield chunk
        if hasher is not None:
            assert digests is not None
            digests[t.name] = hasher.hexdigest()
        if written != t.end - t.begin:
            raise SafecodecError(
                f"tensor {t.name!r}: wrote {written} bytes, the header promised {t.end - t.begin}"
            )


def save(
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
    *,
    alignment: int = ZERO_COPY_ALIGNMENT,
    checksums: bool = False,
) -> bytes:
    """Serialize tensors to safetensors bytes, in memory (the public documentation is
    :func:`safecodec.save`'s)."""
    header, planned, values = prepare(tensors, metadata, alignment, checksums=checksums)
    digests: dict[str, str] | None = {} if checksums else None
    buf = io.BytesIO()
    buf.write(header)
    for chunk in iter_tensor_bytes(planned, values, digests):
        buf.write(chunk)
    if digests is not None:
        buf.getbuffer()[: len(header)] = final_header(planned, metadata, alignment, digests, header)
    return buf.getvalue()


def tensor_nbytes(value: Any, name: str) -> int:
    """Bytes tensor ``value`` takes in a file (validates its name and dtype)."""
    check_name(name)
    dtype, shape, _ = describe_value(value, name)
    bits = _dtypes.DTYPES[code_for_numpy(dtype, name)].bits
    count = 1
    for d in shape:
        count *= int(d)
    return count * bits // 8


def _digests_of(planned: list[PlannedTensor], values: Mapping[str, Any]) -> dict[str, str]:
    """Every tensor's checksum, in a pass of its own (for sinks that cannot rewrite the
    header after the data)."""
    digests: dict[str, str] = {}
    for _ in iter_tensor_bytes(planned, values, digests):
        pass
    return digests


def stream_file(
    tensors: Mapping[str, Any],
    sink: Any,
    metadata: Mapping[str, str] | None = None,
    *,
    alignment: int = ZERO_COPY_ALIGNMENT,
    checksums: bool = False,
    progress: bool = False,
    plan: tuple[bytes, list[PlannedTensor], dict[str, Any]] | None = None,
) -> tuple[bytes, int]:
    """Stream a safetensors file into ``sink`` (a :mod:`safecodec._sink` sink) without
    committing it.

    Args:
        tensors: name -> anything ``numpy.asarray`` accepts.
        sink: Where the bytes go.
        metadata: Optional str -> str mapping.
        alignment: 64 (zero-copy layout) or 8 (the reference writer's bytes).
        checksums: Store a SHA-256 digest of every tensor (see :func:`save`): computed
            while streaming and written into the header in place when the sink is
            seekable, computed in a first pass when it is not.
        progress: Show a progress bar (tqdm, when installed).
        plan: The result of :func:`prepare` for these arguments, when already made.

    Returns:
        ``(header, size)``: the final header bytes (length prefix included) and the file
        size.
    """
    if plan is None:
        plan = prepare(tensors, metadata, alignment, checksums=checksums)
    header, planned, values = plan
    digests: dict[str, str] | None = None
    if checksums and sink.seekable:
        digests = {}
    elif checksums:
        header = final_header(planned, metadata, alignment, _digests_of(planned, values),
                              header)
    total = len(header) + (planned[-1].end if planned else 0)
    label = str(sink.name).rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]
    with ProgressBar(total, f"write {label}", progress) as bar:
        sink.write(header)
        bar.update(len(header))
        for chunk in iter_tensor_bytes(planned, values, digests):
            sink.write(chunk)
            bar.update(chunk.nbytes)
    if digests is not None:
        header = final_header(planned, metadata, alignment, digests, header)
        sink.write_at(0, header)
    sink.flush()
    return header, total


def write_file(
    tensors: Mapping[str, Any],
    open_sink: Callable[[], Any],
    metadata: Mapping[str, str] | None = None,
    *,
    alignment: int = ZERO_COPY_ALIGNMENT,
    checksums: bool = False,
    progress: bool = False,
) -> None:
    """Plan a safetensors file, open a sink only once the plan is valid, stream the file
    into it (:func:`stream_file`) and commit it; on any failure the sink is discarded.

    Args:
        tensors, metadata, alignment, checksums, progress: See :func:`stream_file`.
        open_sink: Called once, after validation, to get the sink.

    Raises:
        SafecodecError: Invalid tensors or metadata (nothing was written).
        OSError / RemoteIOError: The sink failed (its name is in the error; nothing is
            left behind).
    """
    plan = prepare(tensors, metadata, alignment, checksums=checksums)
    with publishing(open_sink()) as (sink,):
        stream_file(tensors, sink, metadata, alignment=alignment, checksums=checksums,
                    progress=progress, plan=plan)


def open_sink(target: Target) -> Any:
    """The atomic sink (:mod:`safecodec._sink`) for a resolved target."""
    if target.fs is None:
        return LocalAtomicFile(target.path)
    return RemoteAtomicFile(target.fs, target.path, name=target.name)
