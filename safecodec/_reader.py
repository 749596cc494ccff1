"""Reading tensors: a validated :class:`~safecodec._header.Header` plus a source become
NumPy arrays, lazily, one tensor or one slice at a time.

Views, not copies. When the source is memory (bytes, a mapping), tensors are NumPy views
of it. Copies happen in exactly one place, :func:`_materialize`, and only when the caller
asked (``copy=True``), the source is not addressable memory (a file object without mmap,
a remote object), the dtype is packed (F4/F6 are unpacked), or the host is big-endian.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from typing import Any, Final

import numpy as np

from . import _dtypes
from ._dtypes import DType
from ._errors import ClosedHandleError, SafecodecError, SliceIndexError, TensorNotFoundError
from ._header import (
    PREFIX_SIZE,
    Header,
    TensorInfo,
    check_numpy_shape,
    decode_length,
    parse_header,
)
from ._packed import unpack
from ._source import MapMode, open_source

__all__ = ["SafeOpen", "TensorSlice", "load", "load_file", "read_header", "safe_open"]

#: Bytes fetched by the first read of a source: the length prefix and, usually, the whole
#: header, in one request (remote sources) or one syscall.
FIRST_READ: Final = 64 * 1024

_NUMPY_FRAMEWORKS: Final = frozenset({"numpy", "np"})
_JAX_FRAMEWORKS: Final = frozenset({"jax", "flax"})


def _read_header_from(source: Any) -> Header:
    """Read and validate the header of an opened source (at most two reads; a long header's
    remainder is read straight into the one buffer that holds it)."""
    size = source.size
    if size < PREFIX_SIZE:
        decode_length(b"", size)  # raises "header too small"
    first = memoryview(source.read(0, min(size, FIRST_READ), "header"))
    n = decode_length(first, size)
    end = PREFIX_SIZE + n
    if end <= len(first):
        return parse_header(first[PREFIX_SIZE:end], size)
    header_bytes = bytearray(n)
    head = len(first) - PREFIX_SIZE
    header_bytes[:head] = first[PREFIX_SIZE:]
    source.readinto(len(first), memoryview(header_bytes)[head:], "header")
    return parse_header(header_bytes, size)


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

    Example:
        >>> import numpy as np, safecodec as sc
        >>> sc.read_header(sc.save({"w": np.zeros((2, 3), np.float32)})).tensors["w"].shape
        (2, 3)
    """
    from ._sharded import find_sharded

    if find_sharded(source, fs, storage_options) is not None:  # a directory or an index
        with safe_open(source, fs=fs, storage_options=storage_options) as handle:
            return handle.header  # type: ignore[no-any-return]
    src = open_source(source, fs=fs, storage_options=storage_options)
    try:
        header = _read_header_from(src)
    finally:
        src.close()
    return header


def _missing(name: object, header: Header) -> TensorNotFoundError:
    import difflib

    names = list(header.tensors)
    close = difflib.get_close_matches(str(name), names, n=3) if len(names) < 100_000 else []
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    return TensorNotFoundError(f"no tensor named {name!r} in this file ({len(names)} tensors){hint}")


def _native(arr: np.ndarray, dtype: DType) -> np.ndarray:
    """Little-endian data into native byte order (only runs on big-endian hosts, or when
    tests force the path): a byte-swapping copy through the unsigned storage type."""
    if dtype.bits <= 8:
        return arr
    swapped = arr.view(dtype.storage).astype(dtype.storage.newbyteorder("="))
    return swapped.view(dtype.numpy.newbyteorder("=") if dtype.numpy.byteorder != "|" else dtype.numpy)


def _view(buf: memoryview, offset: int, info: TensorInfo) -> np.ndarray:
    if info.end == info.begin:  # zero elements (packed dtypes never reach here)
        return np.empty(info.shape, info.dtype.numpy)
    # One constructor call, shape included: ~2.5x cheaper per tensor than frombuffer +
    # reshape, which is what 10,000 small tensors pay (benchmarks/run.py). Same result: a
    # view whose base keeps ``buf`` alive, writable exactly when ``buf`` is.
    return np.ndarray(info.shape, info.dtype.numpy, buf, offset)


def _views(reader: _Reader, infos: list[TensorInfo]) -> dict[str, np.ndarray]:
    """Every tensor as a view of the reader's buffer: the hot loop of ``load``/``load_file``
    (10,000 small tensors cost one ndarray constructor each). Tensors that need more than
    a plain view (packed, zero-size, more dimensions than NumPy may hold) take
    :meth:`_Reader.array`."""
    buf = reader._buf
    base = reader.header.data_start
    make = np.ndarray
    dtypes: dict[str, np.dtype] = {}
    out: dict[str, np.ndarray] = {}
    for info in infos:
        dt = info.dtype
        shape = info.shape
        if info.end == info.begin or dt.bits & 7 or len(shape) > 32:
            out[info.name] = reader.array(info)
            continue
        np_dtype = dtypes.get(dt.code)
        if np_dtype is None:
            np_dtype = dtypes[dt.code] = dt.numpy
        out[info.name] = make(shape, np_dtype, buf, base + info.begin)
    return out


class _Reader:
    """Turns tensor infos into arrays for one source. Shared by handles and load funcs."""

    def __init__(self, source: Any, header: Header, *, copy: bool, unpack: bool, mode: MapMode):
        self.source = source
        self.header = header
        self.copy = copy
        self.unpack = unpack
        self.mode = mode
        self._buf: memoryview | None = None if copy else source.buffer(mode)

    def array(self, info: TensorInfo) -> np.ndarray:
        """The whole tensor as an array: a view when possible (see module docstring)."""
        if 0 in info.shape or len(info.shape) > 32:  # shapes NumPy may be unable to hold
            check_numpy_shape(info)
        offset = self.header.data_start + info.begin
        dt = info.dtype
        if dt.packed:
            raw = self._raw(offset, info.nbytes, info.name)
            if not self.unpack:
                return raw if not self.copy or raw.flags.owndata else raw.copy()
            return unpack(raw, dt, info.count).reshape(info.shape)
        if self._buf is not None:
            arr = _view(self._buf, offset, info)
        else:
            arr = self._materialize(offset, info)
        if not _dtypes.HOST_IS_LITTLE_ENDIAN:
            arr = _native(arr, dt)
        return arr

    def _raw(self, offset: int, nbytes: int, name: str) -> np.ndarray:
        if self._buf is not None:
            return np.frombuffer(self._buf, np.uint8, nbytes, offset)
        out = np.empty(nbytes, np.uint8)
        if nbytes:
            self.source.readinto(offset, _dtypes.as_memoryview(out), f"tensor {name!r}")
        return out

    def _materialize(self, offset: int, info: TensorInfo) -> np.ndarray:
        """The one place a tensor is copied out of its source into new memory."""
        out = np.empty(info.shape, info.dtype.numpy)
        if info.nbytes:
            self.source.readinto(offset, _dtypes.as_memoryview(out.reshape(-1).view(np.uint8)),
                                 f"tensor {info.name!r}")
        return out

    def ranges(self, runs: Sequence[tuple[int, int]], name: str) -> list[Any]:
        """Fetch byte ranges (absolute offsets) of one tensor; merged by the source."""
        if self._buf is not None:
            return [self._buf[a:b] for a, b in runs]
        return list(self.source.read_ranges(runs, f"tensor {name!r}"))


# ----------------------------------------------------------------------------- slicing


def _normalize_index(index: Any, shape: tuple[int, ...], name: str) -> tuple[list[Any], list[int]]:
    """Expand ``index`` to one entry per dimension (int or (start, stop, step) range), plus
    the positions of ``None`` (new axes) in the result. Raises SliceIndexError."""
    if not isinstance(index, tuple):
        index = (index,)
    for item in index:
        if not (item is Ellipsis or item is None or isinstance(item, slice)
                or (hasattr(item, "__index__") and not isinstance(item, (bool, np.bool_))
                    and np.ndim(item) == 0)):
            raise SliceIndexError(
                f"tensor {name!r}: only basic indexing is supported (ints, slices, Ellipsis, "
                f"None), got {type(item).__name__} {item!r:.60}"
            )
    ellipses = sum(1 for i in index if i is Ellipsis)
    if ellipses > 1:
        raise SliceIndexError(f"tensor {name!r}: an index can only have a single ellipsis")
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    if consumed > len(shape):
        raise SliceIndexError(
            f"tensor {name!r}: too many indices, shape {list(shape)} has {len(shape)} "
            f"dimensions but {consumed} were indexed"
        )
    expanded: list[Any] = []
    for item in index:
        if item is Ellipsis:
            expanded.extend([slice(None)] * (len(shape) - consumed))
        else:
            expanded.append(item)
    if ellipses == 0:
        expanded.extend([slice(None)] * (len(shape) - consumed))
    per_dim: list[Any] = []
    new_axes: list[int] = []
    out_pos = 0
    dim = 0
    for item in expanded:
        if item is None:
            new_axes.append(out_pos)
            out_pos += 1
            continue
        size = shape[dim]
        if isinstance(item, slice):
            try:
                per_dim.append(item.indices(size))
            except (TypeError, ValueError) as exc:
                raise SliceIndexError(f"tensor {name!r}: bad slice {item!r}: {exc}") from None
            out_pos += 1
        else:
            try:
                i = operator.index(item)
            except TypeError as exc:
                raise SliceIndexError(f"tensor {name!r}: bad index {item!r:.40}: {exc}") from None
            if not -size <= i < size:
                raise SliceIndexError(
                    f"index {i} is out of bounds for axis {dim} with size {size} "
                    f"(tensor {name!r}, shape {list(shape)})"
                )
            per_dim.append(i + size if i < 0 else i)
        dim += 1
    return per_dim, new_axes


def _selected(entry: Any) -> range:
    """The indices one dimension selects, ascending."""
    if isinstance(entry, int):
        return range(entry, entry + 1)
    r = range(*entry)
    return r if entry[2] > 0 else r[::-1]


def plan_runs(shape: tuple[int, ...], per_dim: list[Any]) -> tuple[list[tuple[int, int]], list[int]]:
    """Element runs ``(start, stop)`` in C order covering a basic index, ascending, and
    the shape of the ascending block they fill. Trailing dimensions taken whole merge into
    one run; the last partial dimension with unit step extends it."""
    ndim = len(shape)
    inner = 1
    k = ndim
    while k > 0:
        e = per_dim[k - 1]
        if isinstance(e, tuple) and e[2] == 1 and e[0] == 0 and e[1] == shape[k - 1]:
            inner *= shape[k - 1]
            k -= 1
        else:
            break
    sels = [_selected(e) for e in per_dim]
    block_shape = [len(s) for s in sels]
    run_dim: int | None = None
    if k > 0 and (isinstance(per_dim[k - 1], int) or per_dim[k - 1][2] in (1, -1)):
        run_dim = k - 1
    strides = [1] * ndim
    for d in range(ndim - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    if 0 in block_shape:
        return [], block_shape
    outer_dims = list(range(run_dim if run_dim is not None else k))
    if run_dim is not None:
        sel = sels[run_dim]
        run_len = len(sel) * inner
        run_off = sel.start * strides[run_dim]
    else:
        run_len = inner
        run_off = 0
    runs: list[tuple[int, int]] = []
    # Iterate outer indices in C order without itertools.product materialising tuples.
    counters = [0] * len(outer_dims)
    while True:
        base = run_off
        for j, d in enumerate(outer_dims):
            base += sels[d][counters[j]] * strides[d]
        if runs and runs[-1][1] == base:
            runs[-1] = (runs[-1][0], base + run_len)
        else:
            runs.append((base, base + run_len))
        j = len(outer_dims) - 1
        while j >= 0:
            counters[j] += 1
            if counters[j] < len(sels[outer_dims[j]]):
                break
            counters[j] = 0
            j -= 1
        if j < 0:
            break
    return runs, block_shape


def _finish(block: np.ndarray, per_dim: list[Any], new_axes: list[int]) -> np.ndarray:
    """Turn the ascending block into the result of the original index."""
    local: list[Any] = []
    for e in per_dim:
        if isinstance(e, int):
            local.append(0)
        elif e[2] < 0:
            local.append(slice(None, None, -1))
        else:
            local.append(slice(None))
    out: np.ndarray = block[tuple(local)]
    for pos in new_axes:
        out = np.expand_dims(out, pos)
    return out


class TensorSlice:
    """A lazy view of one tensor: ``get_shape()``, ``get_dtype()``, and ``[index]`` with
    NumPy basic-indexing semantics (ints, negative ints, slices with any step, Ellipsis,
    None), reading only the bytes the index needs."""

    def __init__(self, handle: SafeOpen, info: TensorInfo) -> None:
        self._handle = handle
        self._info = info

    def get_shape(self) -> list[int]:
        """The tensor's shape, as a list (like the reference wheel)."""
        return list(self._info.shape)

    def get_dtype(self) -> str:
        """The tensor's dtype code, e.g. ``"F32"`` (like the reference wheel)."""
        return self._info.dtype.code

    @property
    def shape(self) -> tuple[int, ...]:
        return self._info.shape

    @property
    def dtype(self) -> np.dtype:
        return self._info.dtype.numpy

    @property
    def ndim(self) -> int:
        return len(self._info.shape)

    def __len__(self) -> int:
        if not self._info.shape:
            raise TypeError("len() of unsized object")
        return self._info.shape[0]

    def __repr__(self) -> str:
        return f"TensorSlice({self._info.name!r}, dtype={self.get_dtype()}, shape={self.get_shape()})"

    def __getitem__(self, index: Any) -> Any:
        return self._handle._convert(self.numpy(index), self._info)

    def numpy(self, index: Any = ()) -> np.ndarray:
        """The selected part as a NumPy array (whatever the handle's framework)."""
        handle = self._handle
        reader = handle._reader_checked()
        info = self._info
        if 0 in info.shape or len(info.shape) > 32:
            check_numpy_shape(info)
        per_dim, new_axes = _normalize_index(index, info.shape, info.name)
        if reader._buf is not None and not info.dtype.packed:
            full = reader.array(info)
            part: np.ndarray = full[_numpy_index(per_dim, new_axes)]
            return part
        return self._read_runs(reader, per_dim, new_axes)

    def _read_runs(self, reader: _Reader, per_dim: list[Any], new_axes: list[int]) -> np.ndarray:
        info = self._info
        dt = info.dtype
        runs, block_shape = plan_runs(info.shape, per_dim)
        base = reader.header.data_start + info.begin
        if dt.packed:
            group = 8 // math.gcd(8, dt.bits)  # elements per packed group (F4: 2, F6: 4)
            gbytes = group * dt.bits // 8
            spans = [((a // group) * gbytes, -(-b // group) * gbytes) for a, b in runs]
            chunks = reader.ranges([(base + s, base + e) for s, e in spans], info.name)
            parts = []
            for (a, b), (s, _), chunk in zip(runs, spans, chunks, strict=True):
                vals = unpack(np.frombuffer(chunk, np.uint8), dt, len(chunk) * 8 // dt.bits)
                skip = a - (s // gbytes) * group
                parts.append(vals[skip : skip + (b - a)])
            flat = np.concatenate(parts) if parts else np.empty(0, dt.numpy)
            block = flat.reshape(block_shape)
            if not self._handle._unpack:
                raise SafecodecError(
                    f"tensor {info.name!r} is packed {dt.code}; slicing needs unpack=True"
                )
        else:
            itemsize = dt.itemsize
            block = np.empty(block_shape, dt.numpy)
            flat = block.reshape(-1).view(np.uint8)
            chunks = reader.ranges([(base + a * itemsize, base + b * itemsize) for a, b in runs],
                                   info.name)
            pos = 0
            for chunk in chunks:
                n = len(chunk)
                flat[pos : pos + n] = np.frombuffer(chunk, np.uint8)
                pos += n
            if not _dtypes.HOST_IS_LITTLE_ENDIAN:
                block = _native(block, dt)
        return _finish(block, per_dim, new_axes)


def _numpy_index(per_dim: list[Any], new_axes: list[int]) -> tuple[Any, ...]:
    items: list[Any] = []
    for e in per_dim:
        if isinstance(e, int):
            items.append(e)
        else:
            r = range(*e)
            if not r:
                items.append(slice(0, 0))
            elif e[2] > 0:
                items.append(slice(r[0], r[-1] + 1, e[2]))
            else:  # a negative stop would wrap around: stop just past the last element
                last = r[-1] - 1
                items.append(slice(r[0], last if last >= 0 else None, e[2]))
    # Re-insert new axes at their positions in the output.
    out_items: list[Any] = []
    out_pos = 0
    it = iter(items)
    pending = sorted(new_axes)
    for item in it:
        while pending and pending[0] == out_pos:
            out_items.append(None)
            pending.pop(0)
            out_pos += 1
        out_items.append(item)
        if not isinstance(item, int):
            out_pos += 1
    out_items.extend(None for _ in pending)
    return tuple(out_items)


# ----------------------------------------------------------------------------- handle


class SafeOpen:
    """A lazy, read-only handle on one safetensors file or buffer (see :func:`safe_open`).

    Thread-safe for reads: many threads may call ``get_tensor``/``get_slice`` at once.
    """

    def __init__(
        self,
        source: Any,
        framework: str = "numpy",
        *,
        fs: Any = None,
        copy: bool = False,
        unpack: bool = True,
        device: Any = None,
        sharding: Any = None,
        storage_options: dict[str, Any] | None = None,
        progress: bool = False,
        verify: bool = False,
    ) -> None:
        fw = str(framework).lower()
        if fw not in _NUMPY_FRAMEWORKS and fw not in _JAX_FRAMEWORKS:
            raise SafecodecError(
                f"unsupported framework {framework!r}; use 'numpy' (or 'np'), 'jax' or 'flax'"
            )
        self._framework = fw
        self._source = open_source(source, fs=fs, storage_options=storage_options,
                                   progress=progress)
        self._unpack = unpack
        try:
            self._header = _read_header_from(self._source)
        except BaseException:
            self._source.close()
            raise
        self._digests: dict[str, str] | None = None
        self._verified: set[str] = set()
        if verify:
            from ._integrity import CHECKSUM_KEY, ChecksumError, decode

            try:
                self._digests = decode(self._header.raw_metadata)
                if self._digests is None:
                    raise ChecksumError(
                        f"verify=True, but {self._source.name} stores no checksums "
                        f"(metadata key {CHECKSUM_KEY!r}; write them with checksums=True)"
                    )
            except BaseException:
                self._source.close()
                raise
        mode: MapMode = "copy" if fw in _NUMPY_FRAMEWORKS else "read"
        self._reader: _Reader | None = _Reader(
            self._source, self._header, copy=copy, unpack=unpack, mode=mode
        )
        self._jax: Any = None
        if fw in _JAX_FRAMEWORKS:
            from . import _jax

            try:
                self._jax = _jax.Converter(device=device, sharding=sharding, handle=self)
            except BaseException:
                self._source.close()
                raise
        elif device is not None or sharding is not None:
            self._source.close()
            raise SafecodecError("device= and sharding= need framework='jax'")

    # -- plumbing
    def _reader_checked(self) -> _Reader:
        reader = self._reader
        if reader is None:
            raise ClosedHandleError("this safe_open handle is closed")
        return reader

    def _info(self, name: str) -> TensorInfo:
        self._reader_checked()
        try:
            return self._header.tensors[name]
        except (KeyError, TypeError):
            raise _missing(name, self._header) from None

    def _raw_bytes(self, info: TensorInfo) -> Any:
        """The tensor's bytes exactly as stored (a view when the source is memory)."""
        reader = self._reader_checked()
        start = self._header.data_start + info.begin
        if reader._buf is not None:
            return reader._buf[start : start + info.nbytes]
        # copy=True never maps the file (its promise against files truncated in place).
        return self._source.read(start, info.nbytes, f"tensor {info.name!r}")

    def _verify(self, info: TensorInfo) -> None:
        """With verify=True: check the tensor's bytes against its stored checksum once."""
        if self._digests is None or info.name in self._verified:
            return
        from ._integrity import check

        check(info.name, self._raw_bytes(info), self._digests)
        self._verified.add(info.name)

    def _convert(self, arr: np.ndarray, info: TensorInfo) -> Any:
        if self._jax is None:
            return arr
        return self._jax.convert(arr, info)

    # -- the reference API
    def keys(self) -> list[str]:
        """Tensor names, sorted."""
        self._reader_checked()
        return self._header.names()

    def offset_keys(self) -> list[str]:
        """Tensor names in file order (ascending offsets)."""
        self._reader_checked()
        return list(self._header.tensors)

    def metadata(self) -> dict[str, str] | None:
        """The file's ``__metadata__`` (a new dict) as the user wrote it, or None when it
        has none. safecodec's own keys (prefix ``safecodec.``: checksums, tree structure)
        are hidden; ``header.raw_metadata`` has everything."""
        self._reader_checked()
        return self._header.metadata

    def get_tensor(self, name: str) -> Any:
        """The whole tensor ``name``: a NumPy array (or a jax.Array for framework='jax')."""
        info = self._info(name)
        self._verify(info)
        if self._jax is not None:
            return self._jax.load_tensor(info)
        return self._reader_checked().array(info)

    def get_slice(self, name: str) -> TensorSlice:
        """A lazy :class:`TensorSlice` of tensor ``name``. With verify=True the whole
        tensor is read and checked once, before the first slice."""
        info = self._info(name)
        self._verify(info)
        return TensorSlice(self, info)

    def get_tensors(self) -> dict[str, Any]:
        """Every tensor, in file order."""
        return self._load_infos(list(self._header.tensors.values()))

    # -- what the tree layer uses (public, framework-independent)
    @property
    def framework(self) -> str:
        """``"numpy"`` or ``"jax"``: what ``get_tensor`` returns."""
        return "numpy" if self._jax is None else "jax"

    def get_numpy(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a NumPy array whatever the framework (a JAX handle maps the
        file read-only, so there it is a private copy)."""
        info = self._info(name)
        self._verify(info)
        arr = self._reader_checked().array(info)
        return arr if self._jax is None else np.array(arr)

    def load_tensors(self, names: list[str], *, sharding: Any = None) -> dict[str, Any]:
        """Tensors ``names`` with the handle's framework, in the order given; ``sharding``
        (JAX handles: a mapping name -> Sharding) replaces the handle's for this call."""
        infos = [self._info(n) for n in names]
        if self._jax is None or sharding is None:
            return self._load_infos(infos)
        saved, self._jax.sharding = self._jax.sharding, sharding
        try:
            return self._load_infos(infos)
        finally:
            self._jax.sharding = saved

    def _load_infos(self, infos: list[TensorInfo]) -> dict[str, Any]:
        """Load the given tensors (``get_tensors``, and sharded handles for the subset of a
        shard that their index names)."""
        reader = self._reader_checked()
        if self._digests is not None:
            for info in infos:
                self._verify(info)
        if self._jax is not None:
            return self._jax.load_all(infos)  # type: ignore[no-any-return]
        if reader._buf is None and infos and getattr(self._source, "remote", False):
            reader = self._fetched_reader(infos)
        if reader._buf is not None and _dtypes.HOST_IS_LITTLE_ENDIAN:
            return _views(reader, infos)
        array = reader.array
        return {info.name: array(info) for info in infos}

    def _fetched_reader(self, infos: list[TensorInfo]) -> _Reader:
        """Remote whole loads: stream the tensors' bytes into memory in one pass (merged,
        concurrent range requests), check that the object did not change meanwhile, and
        read the tensors as views of that private memory."""
        from ._source import BufferSource

        start = self._header.data_start
        memory = bytearray(self._header.file_size)
        self._source.readinto_ranges(
            memoryview(memory), [(start + i.begin, start + i.end) for i in infos], "tensors"
        )
        self._source.check_unchanged()
        return _Reader(BufferSource(memory, self._source.name), self._header, copy=False,
                       unpack=self._unpack, mode="copy")

    # -- extras
    @property
    def header(self) -> Header:
        """The parsed :class:`~safecodec.Header`."""
        return self._header

    @property
    def stats(self) -> dict[str, int]:
        """Bytes read and read requests made so far (header included)."""
        stats: dict[str, int] = self._source.stats.as_dict()
        return stats

    @property
    def closed(self) -> bool:
        return self._reader is None

    def __contains__(self, name: object) -> bool:
        return name in self._header.tensors

    def __len__(self) -> int:
        return len(self._header.tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def close(self) -> None:
        """Close the handle. Arrays already handed out stay valid."""
        if self._reader is not None:
            self._reader = None
            self._source.close()

    def __enter__(self) -> SafeOpen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self)} tensors"
        return f"<safecodec.safe_open {self._source.name!r} ({state}), framework={self._framework!r}>"


def safe_open(
    source: Any,
    framework: str = "numpy",
    *,
    fs: Any = None,
    copy: bool = False,
    unpack: bool = True,
    device: Any = None,
    sharding: Any = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
    verify: bool = False,
) -> Any:
    """Open a safetensors file, buffer, file object or URL lazily.

    Only the header is read; tensors are read when asked for. Use as a context manager.

    Args:
        source: A str/PathLike path, an fsspec URL, a bytes-like object, or a binary file
            object (memory-mapped when it has a usable ``fileno()``).
        framework: ``"numpy"`` (default, also ``"np"``), or ``"jax"`` / ``"flax"`` for
            jax.Array outputs.
        fs: An fsspec filesystem on which ``source`` is a path.
        copy: Return independent arrays instead of views of the source.
        unpack: Unpack F4/F6 tensors to one element per byte (ml_dtypes). With False, they
            come back as 1-D ``uint8`` arrays of the packed bytes.
        device: With framework='jax', the device to place arrays on.
        sharding: With framework='jax', a Sharding, mapping or callable (see
            :func:`safecodec.jax.load_file`).
        storage_options: Options for the fsspec filesystem a URL names (credentials,
            endpoint...).
        progress: Show a progress bar (tqdm, when installed) on long remote reads.
        verify: Check each tensor against the SHA-256 stored by ``save_file(...,
            checksums=True)`` before returning it; a mismatch raises
            :class:`~safecodec.ChecksumError` naming the tensor. A file without
            checksums raises too.

    Returns:
        A :class:`SafeOpen` handle; for a directory or a ``*.safetensors.index.json``
        (local or remote), a :class:`~safecodec._sharded.ShardedSafeOpen` with the same API
        over every shard.

    Raises:
        SafecodecError: The header breaks a rule of the format (subclass says which), or a
            sharded checkpoint's index and shards disagree.

    Example:
        >>> import numpy as np, safecodec as sc
        >>> data = sc.save({"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
        >>> with sc.safe_open(data) as f:
        ...     f.get_slice("w")[:, 1].tolist()
        [1.0, 4.0]
    """
    from ._sharded import ShardedSafeOpen, find_sharded

    location = find_sharded(source, fs, storage_options)
    if location is not None:
        if location.single is not None:  # a directory holding one unsharded file
            return SafeOpen(location.single, framework, fs=location.fs, copy=copy,
                            unpack=unpack, device=device, sharding=sharding, progress=progress,
                            verify=verify)
        if verify:
            raise SafecodecError("verify=True is supported for single files; verify each shard")
        return ShardedSafeOpen(location, framework, copy=copy, unpack=unpack, device=device,
                               sharding=sharding, progress=progress)
    return SafeOpen(source, framework, fs=fs, copy=copy, unpack=unpack, device=device,
                    sharding=sharding, storage_options=storage_options, progress=progress,
                    verify=verify)


def load(
    data: Any, *, copy: bool = False, unpack: bool = True, verify: bool = False
) -> dict[str, np.ndarray]:
    """Load every tensor of an in-memory safetensors file.

    Args:
        data: bytes, bytearray, memoryview or any C-contiguous buffer.
        copy: Return independent arrays instead of views into ``data`` (views of
            ``bytes`` are read-only; views of a ``bytearray`` share its memory).
        unpack: See :func:`safe_open`.
        verify: Check stored checksums (see :func:`safe_open`).

    Returns:
        name -> NumPy array, in file order.

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
    with SafeOpen(data, copy=copy, unpack=unpack, verify=verify) as f:
        return f.get_tensors()


def load_file(
    path_or_url: Any,
    *,
    fs: Any = None,
    copy: bool = False,
    unpack: bool = True,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
    verify: bool = False,
) -> dict[str, np.ndarray]:
    """Load every tensor of a safetensors file.

    Local files are memory-mapped: the arrays are copy-on-write views of a private
    mapping, writable, with nothing copied until written and nothing written reaching the
    file. They stay valid after the file is closed, deleted or replaced.

    Args:
        path_or_url: A str/PathLike path, an fsspec URL, or a binary file object.
        fs: An fsspec filesystem on which ``path_or_url`` is a path.
        copy: Read into independent arrays (one copy from the page cache) instead.
        unpack: See :func:`safe_open`.
        storage_options: Options for the fsspec filesystem a URL names. Remote files are
            streamed into memory once (concurrent range requests) and validated like local
            ones. A directory or ``*.safetensors.index.json`` loads every shard.
        progress: Show a progress bar (tqdm, when installed) on long remote reads.
        verify: Check stored checksums (see :func:`safe_open`).

    Returns:
        name -> NumPy array, in file order.

    Raises:
        SafecodecError: The file is not a valid safetensors file.
        RemoteIOError: A remote object came back short or changed while being read.
        FileNotFoundError: ``path_or_url`` does not exist.
    """
    with safe_open(path_or_url, fs=fs, copy=copy, unpack=unpack, storage_options=storage_options,
                   progress=progress, verify=verify) as f:
        return f.get_tensors()  # type: ignore[no-any-return]
