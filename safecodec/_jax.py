"""JAX outputs: safetensors tensors become ``jax.Array`` values, zero-copy where the
hardware allows, one copy everywhere else, sharded across devices and processes.

How a tensor reaches JAX
------------------------
* **CPU, 64-byte aligned, byte-sized dtype, same dtype in JAX**: the host array is a
  read-only view of the file's mapping and the CPU client *aliases* it (``jax.device_put``
  shares memory whose address is a multiple of 64). Loading costs a header parse, not a
  memcpy. safecodec's writer (``alignment=64``, the default) puts every tensor whose byte
  size is a multiple of 64 at such an address.
* **CPU, anything else** (a file from the reference writer, which is only 8-byte aligned;
  ``copy=True``; a 64-bit tensor with x64 off; a writable source buffer): exactly one copy,
  into a 64-byte aligned buffer that JAX then aliases.
* **Accelerators**: the host array handed to the transfer is the mapped view itself (no
  host copy by safecodec); the device transfer is the one copy. Transfers are batched per
  device.
* **Packed F4**: unpacked once into ``float4_e2m1fn`` (JAX keeps sub-byte types in its
  own layout). **F6** has no JAX dtype: a :class:`~safecodec.DtypeError` points to the
  NumPy output.

Sharding
--------
With a sharding, each process builds only the shards addressable on it, and reads only
their byte ranges (:func:`safecodec._reader.plan_runs`: rows of a contiguous block are one
range). Replicated shards (same index on several devices) are read once and shared.

Lifetime, and what writing to a mapped file does
------------------------------------------------
Arrays that alias the mapping keep it alive: they stay valid after the handle is closed,
after the loader's objects are garbage-collected, and after the file is deleted or
atomically replaced (the old inode stays mapped). They are *not* protected against
in-place modification of the file (``open(path, "r+b")``, a writer that truncates and
rewrites instead of renaming): the mapping is shared with the page cache, so such writes
show up in the arrays, which JAX assumes immutable, and truncating the file makes reading
the arrays crash the process (SIGBUS). safecodec's own writers always replace files
atomically. Pass ``copy=True`` to get arrays that own their memory.

Per-array overhead
------------------
The public ``jax.device_put`` costs tens of microseconds per array, which dominates a
zero-copy load. :data:`PUT` is chosen once, on first use: ``xla_client.batched_device_put``
(the primitive ``jax.device_put`` ends in, measured 5-15x cheaper on jax 0.10 and 0.12)
when it is present and passes a self-check, else the public API (:class:`PublicPut`).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, cast

import jax
import numpy as np

from . import _dtypes, _writer
from ._errors import DtypeError, SafecodecError, TensorNotFoundError
from ._header import PlannedTensor, TensorInfo
from ._packed import pack
from ._reader import SafeOpen, plan_runs

__all__ = [
    "ALIGNMENT",
    "Converter",
    "InternalPut",
    "PrecisionWarning",
    "PublicPut",
    "load",
    "load_file",
    "save",
    "save_file",
]

#: JAX's CPU client aliases host memory whose address is a multiple of this.
ALIGNMENT: Final = 64

_F6_CODES: Final = frozenset({"F6_E2M3", "F6_E3M2"})


class PrecisionWarning(UserWarning):
    """A tensor changes dtype on its way into JAX (64-bit values with x64 disabled)."""


# ----------------------------------------------------------------------------- host memory


def aligned_empty(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts at a multiple of
    :data:`ALIGNMENT` (so that JAX's CPU client aliases it instead of copying)."""
    dt = np.dtype(dtype)
    count = 1
    for d in shape:
        count *= int(d)
    nbytes = count * dt.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = (-raw.ctypes.data) % ALIGNMENT
    out: np.ndarray = raw[start : start + nbytes].view(dt).reshape(tuple(shape))
    return out


def _aligned(arr: np.ndarray) -> bool:
    return arr.ctypes.data % ALIGNMENT == 0 and arr.flags.c_contiguous


# ----------------------------------------------------------------------------- putting


class PublicPut:
    """Device placement through the public API only (``jax.device_put``,
    ``jax.make_array_from_single_device_arrays``). The fallback of :class:`InternalPut`."""

    name = "jax.device_put"

    def single(self, arr: np.ndarray, device: Any, committed: bool) -> jax.Array:
        """One host array onto one device (committed when a device was asked for)."""
        return cast(jax.Array, jax.device_put(arr, device if committed else None))

    def many(self, arrs: list[np.ndarray], device: Any, committed: bool) -> list[jax.Array]:
        """Many host arrays onto one device, in one batched call."""
        if not arrs:
            return []
        return list(jax.device_put(arrs, device if committed else None))

    def sharded(self, shape: tuple[int, ...], dtype: np.dtype, sharding: Any,
                shards: list[np.ndarray], devices: list[Any]) -> jax.Array:
        """A global array from the host shards of the addressable devices."""
        pieces = [jax.device_put(s, d) for s, d in zip(shards, devices, strict=True)]
        return jax.make_array_from_single_device_arrays(shape, sharding, pieces)


class InternalPut(PublicPut):
    """Device placement through ``xla_client.batched_device_put``: what ``jax.device_put``
    of a NumPy array ends in, without the dispatch layers above it. Same aliasing rules."""

    name = "xla_client.batched_device_put"

    def __init__(self) -> None:
        from jax._src import core
        from jax._src.lib import xla_client  # type: ignore[attr-defined]  # private, not re-exported

        self._put = xla_client.batched_device_put
        self._aval_type = core.ShapedArray
        self._avals: dict[tuple[tuple[int, ...], np.dtype], Any] = {}
        self._single: dict[Any, Any] = {}

    def _aval(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        key = (shape, dtype)
        aval = self._avals.get(key)
        if aval is None:
            aval = self._avals[key] = self._aval_type(shape, dtype)
        return aval

    def _sharding(self, device: Any) -> Any:
        sharding = self._single.get(device)
        if sharding is None:
            sharding = self._single[device] = jax.sharding.SingleDeviceSharding(device)
        return sharding

    def single(self, arr: np.ndarray, device: Any, committed: bool) -> jax.Array:
        out: jax.Array = self._put(self._aval(arr.shape, arr.dtype), self._sharding(device),
                                   [arr], [device], committed)
        return out

    def many(self, arrs: list[np.ndarray], device: Any, committed: bool) -> list[jax.Array]:
        if device.platform != "cpu":
            # Accelerators: one batched transfer per device beats many small calls.
            return PublicPut.many(self, arrs, device, committed)
        # CPU: one call per array (each aliases its own memory); the loop is the hot path of
        # a zero-copy load, so the sharding is looked up once and avals come from the cache.
        put, sharding, aval = self._put, self._sharding(device), self._aval
        return [put(aval(a.shape, a.dtype), sharding, [a], [device], committed) for a in arrs]

    def sharded(self, shape: tuple[int, ...], dtype: np.dtype, sharding: Any,
                shards: list[np.ndarray], devices: list[Any]) -> jax.Array:
        out: jax.Array = self._put(self._aval(shape, dtype), sharding, shards, devices, True)
        return out


def _select_put() -> PublicPut:
    """Use :class:`InternalPut` when it exists and passes a self-check (right type,
    values, and aliasing on CPU); otherwise :class:`PublicPut`."""
    if os.environ.get("SAFECODEC_JAX_PUBLIC_API"):
        return PublicPut()
    try:
        put = InternalPut()
        probe = aligned_empty((4,), np.float32)
        probe[:] = (1.0, 2.0, 3.0, 4.0)
        device = jax.local_devices()[0]
        out = put.single(probe, device, False)
        ok = (isinstance(out, jax.Array) and out.shape == (4,) and out.dtype == np.float32
              and np.asarray(out).tolist() == [1.0, 2.0, 3.0, 4.0])
        if ok and device.platform == "cpu":
            ok = out.unsafe_buffer_pointer() == probe.ctypes.data
        return put if ok else PublicPut()
    except Exception:  # any change in the private API: take the public road
        return PublicPut()


#: The placement strategy in use, chosen on first use (never at import: importing
#: safecodec.jax must not start JAX's backend, e.g. before ``jax.distributed.initialize``).
#: Tests set it to ``PublicPut()`` to exercise the fallback; the environment variable
#: ``SAFECODEC_JAX_PUBLIC_API=1`` makes that the choice.
PUT: PublicPut | None = None


def placement() -> PublicPut:
    """The placement strategy, selecting it on first call."""
    global PUT
    if PUT is None:
        PUT = _select_put()
    return PUT


# ----------------------------------------------------------------------------- converter


def check_sharding_names(spec: Any, infos: Iterable[TensorInfo], where: str) -> None:
    """A ``sharding=`` mapping may only name tensors that exist: a typo would otherwise
    silently load that tensor unsharded."""
    if not isinstance(spec, Mapping):
        return
    known = {i.name for i in infos}
    unknown = [k for k in spec if k not in known]
    if unknown:
        raise TensorNotFoundError(
            f"sharding= names {len(unknown)} tensor(s) not in this {where}: "
            f"{', '.join(map(repr, unknown[:5]))}"
        )


def _default_device() -> Any:
    dev = jax.config.jax_default_device  # type: ignore[attr-defined]  # set at runtime, not in the stubs
    if dev is not None and not isinstance(dev, str):
        return dev
    if isinstance(dev, str):
        return jax.local_devices(backend=dev)[0]
    return jax.local_devices()[0]


def _index_key(index: tuple[Any, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
    """A hashable, normalised form of a shard's index (one (start, stop, step) per dim)."""
    key = []
    for dim, item in itertools.zip_longest(shape, index, fillvalue=slice(None)):
        if isinstance(item, slice):
            key.append(item.indices(cast(int, dim)))  # a sharding indexes at most ndim dims
        else:  # an integer index never comes from a sharding, but be exact anyway
            i = int(item)
            key.append((i, i + 1, 1))
    return tuple(key)


class Converter:
    """Turns the tensors of one :class:`~safecodec.SafeOpen` handle (framework ``"jax"``)
    into ``jax.Array`` values. Built by the handle; see the module docstring.

    Args:
        device: Default device (committed placement), or None for JAX's default device
            (uncommitted, like ``jax.device_put(x)``).
        sharding: A ``jax.sharding.Sharding`` for every tensor, a mapping name -> Sharding
            (tensors not in it get default placement), or a callable called positionally as
            ``fn(name, shape, dtype)`` returning a Sharding or None.
        handle: The owning handle.
        strict_x64: Raise instead of warning when a 64-bit tensor would be narrowed
            because JAX's x64 mode is off.
    """

    def __init__(self, *, device: Any = None, sharding: Any = None, handle: SafeOpen,
                 strict_x64: bool = False) -> None:
        if device is not None and isinstance(device, jax.sharding.Sharding):
            sharding, device = (device if sharding is None else sharding), None
        if device is not None and not isinstance(device, jax.Device):
            raise SafecodecError(
                "device= takes a jax.Device (such as jax.devices('cpu')[0]) or a "
                f"jax.sharding.Sharding; got {type(device).__name__} {device!r}"
            )
        if sharding is not None and not (isinstance(sharding, (jax.sharding.Sharding, Mapping))
                                         or callable(sharding)):
            raise SafecodecError(
                "sharding= takes a jax.sharding.Sharding, a mapping name -> Sharding, or a "
                f"callable fn(name, shape, dtype); got {type(sharding).__name__}"
            )
        self.device = device
        self.sharding = sharding
        self.handle = handle
        self.strict_x64 = strict_x64
        self._warned = False
        self._narrowed: list[str] | None = None  # collecting names during load_all
        #: Bytes of tensor data this converter placed (views and copies), for measurement.
        self.bytes_loaded = 0
        #: Arrays that share the mapped memory (no copy), for measurement.
        self.aliased = 0

    # -- policy
    def _target(self) -> tuple[Any, bool]:
        if self.device is not None:
            return self.device, True
        return _default_device(), False

    def _sharding_for(self, info: TensorInfo) -> Any:
        spec = self.sharding
        if spec is None:
            return None
        out: object
        if isinstance(spec, jax.sharding.Sharding):
            out = spec
        elif isinstance(spec, Mapping):
            out = spec.get(info.name)
        else:
            out = spec(info.name, info.shape, info.dtype.numpy)
        if out is not None and not isinstance(out, jax.sharding.Sharding):
            raise SafecodecError(
                f"tensor {info.name!r}: the sharding for it must be a jax.sharding.Sharding "
                f"or None, got {type(out).__name__}"
            )
        return out

    def _check_dtype(self, info: TensorInfo, cache: dict[str, np.dtype] | None = None) -> np.dtype:
        """The dtype JAX will hold; raises for F6, warns (or raises) for narrowing.

        ``cache`` (code -> dtype, for one batch of tensors) skips the work for a dtype
        already seen that needed neither: narrowing must still be reported per tensor."""
        dt = info.dtype
        if cache is not None:
            hit = cache.get(dt.code)
            if hit is not None:
                return hit
        if dt.code in _F6_CODES:
            raise DtypeError(
                f"tensor {info.name!r} has dtype {dt.code} ({dt.numpy.name}), which JAX cannot "
                "hold; load it as a NumPy array instead: safecodec.load_file(path) or "
                "safecodec.safe_open(path, framework='numpy').get_tensor(name)"
            )
        if dt.packed and not self.handle._unpack:
            got = np.dtype(np.uint8)
        else:
            want = dt.numpy
            got = _canonical(want)
            if got != want:
                self._narrow(info, want, got)
                return got
        if cache is not None:
            cache[dt.code] = got
        return got

    def _narrow(self, info: TensorInfo, want: np.dtype, got: np.dtype) -> None:
        if self.strict_x64:
            raise DtypeError(
                f"tensor {info.name!r} is {info.dtype.code} ({want.name}) but JAX's x64 mode "
                f"is off, so it would become {got.name}; enable x64 "
                "(jax.config.update('jax_enable_x64', True)) or load with strict_x64=False"
            )
        if self._narrowed is not None:
            self._narrowed.append(f"{info.name!r} ({want.name} -> {got.name})")
        elif not self._warned:
            self._warned = True
            warnings.warn(
                f"tensor {info.name!r} is {want.name} but JAX's x64 mode is off: it is "
                f"converted to {got.name} (JAX's rule: values may be rounded or wrapped); "
                "other 64-bit tensors from this file are converted the same way without "
                "another warning. Enable x64 or pass strict_x64=True to refuse.",
                PrecisionWarning,
                stacklevel=_dtypes.caller_stacklevel(),
            )

    def _flush_warning(self) -> None:
        names, self._narrowed = self._narrowed, None
        if names and not self._warned:
            self._warned = True
            shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            warnings.warn(
                f"JAX's x64 mode is off: {len(names)} 64-bit tensor(s) converted to 32 bits "
                f"(JAX's rule: values may be rounded or wrapped): {shown}. Enable x64 or pass "
                "strict_x64=True to refuse.",
                PrecisionWarning,
                stacklevel=_dtypes.caller_stacklevel(),
            )

    # -- host arrays
    def _host_full(self, info: TensorInfo, target: np.dtype, cpu: bool) -> np.ndarray:
        """The whole tensor as a host array JAX may alias (CPU) or transfer from."""
        reader = self.handle._reader_checked()
        self.bytes_loaded += info.nbytes
        dt = info.dtype
        if dt.packed or not _dtypes.HOST_IS_LITTLE_ENDIAN:
            arr = reader.array(info)  # a fresh array: unpacked or byte-swapped
            return arr if arr.dtype == target else arr.astype(target)
        buf = reader._buf
        if buf is None or (cpu and not buf.readonly):
            # Not addressable (copy=True, no mmap, remote) or memory the caller can still
            # write (bytearray): one copy into memory that only the jax.Array will own.
            out = aligned_empty(info.shape, dt.numpy)
            if info.nbytes:
                if buf is None:
                    reader.source.readinto(reader.header.data_start + info.begin,
                                           _dtypes.as_memoryview(out.reshape(-1).view(np.uint8)),
                                           f"tensor {info.name!r}")
                else:
                    start = reader.header.data_start + info.begin
                    out.reshape(-1).view(np.uint8)[:] = np.frombuffer(buf, np.uint8, info.nbytes, start)
            return out if out.dtype == target else _cast(out, target)
        view = reader.array(info)
        if view.dtype != target:
            return _cast(view, target)
        if cpu and info.nbytes and (
            self._base_address(buf) + reader.header.data_start + info.begin) % ALIGNMENT:
            return self._copy_unaligned(view, info)
        if info.nbytes:
            self.aliased += 1 if cpu else 0
        return view

    def _data_address(self) -> int | None:
        """Where tensor offset 0 lies in memory when the reader's buffer is one JAX may
        alias (mapped or immutable, little-endian host); None when every tensor must be
        copied (no buffer: copy=True, no mmap, remote; or a buffer the caller can write)."""
        reader = self.handle._reader_checked()
        buf = reader._buf
        if buf is None or not buf.readonly or not _dtypes.HOST_IS_LITTLE_ENDIAN:
            return None
        return self._base_address(buf) + reader.header.data_start

    def _needs_copy(self, info: TensorInfo, address: int | None) -> bool:
        """True when tensor ``info`` cannot be aliased on CPU (see :meth:`_host_full`);
        ``address`` is :meth:`_data_address`."""
        if info.dtype.packed or not info.nbytes or not _dtypes.HOST_IS_LITTLE_ENDIAN:
            return False
        return address is None or (address + info.begin) % ALIGNMENT != 0

    def _base_address(self, buf: memoryview) -> int:
        base = getattr(self, "_base", None)
        if base is None or base[0] is not buf:
            base = self._base = (buf, np.frombuffer(buf, np.uint8, 0 if not len(buf) else 1).ctypes.data)
        return base[1]

    def _copy_runs(self, infos: list[TensorInfo], address: int | None) -> dict[str, np.ndarray]:
        """The one copy of every tensor that cannot be aliased, done per run of tensors
        that follow each other in the file: one read per run into one buffer placed so
        that most of them land 64-byte aligned (in a file from the reference writer,
        usually all of them: their sizes are multiples of 64, so they share one
        misalignment). Those alias the buffer; the rest get their own aligned copy.
        ``address`` is :meth:`_data_address`."""
        reader = self.handle._reader_checked()
        start = reader.header.data_start
        runs: list[list[TensorInfo]] = []
        for info in infos:
            if not self._needs_copy(info, address):
                continue
            if runs and runs[-1][-1].end == info.begin:
                runs[-1].append(info)
            else:
                runs.append([info])
        out: dict[str, np.ndarray] = {}
        for run in runs:
            if len(run) == 1:
                continue  # the per-tensor path does the same work
            weight: dict[int, int] = {}
            for info in run:
                r = (start + info.begin) % ALIGNMENT
                weight[r] = weight.get(r, 0) + info.nbytes
            residue = max(weight, key=weight.__getitem__)
            lo, hi = start + run[0].begin, start + run[-1].end
            arena = np.empty(hi - lo + 2 * ALIGNMENT, np.uint8)
            # file offset X lands at region + (X - lo): aligned when X % 64 == residue
            shift = (lo - residue - arena.ctypes.data) % ALIGNMENT
            region = arena[shift : shift + hi - lo]
            if reader._buf is None or getattr(reader.source, "_fd", None) is not None:
                # positioned reads from the page cache beat faulting the mapping in
                reader.source.readinto(lo, _dtypes.as_memoryview(region), f"tensors {run[0].name!r}..")
            else:
                region[:] = np.frombuffer(reader._buf, np.uint8, hi - lo, lo)
            for info in run:
                piece = region[start + info.begin - lo : start + info.end - lo]
                arr = piece.view(info.dtype.numpy).reshape(info.shape)
                out[info.name] = arr if _aligned(arr) else _copy(arr)
                self.bytes_loaded += info.nbytes
        return out

    def _copy_unaligned(self, view: np.ndarray, info: TensorInfo) -> np.ndarray:
        """The one copy of a tensor that is not 64-byte aligned in the file."""
        out = aligned_empty(view.shape, view.dtype)
        reader = self.handle._reader_checked()
        fd = getattr(reader.source, "_fd", None)
        if fd is not None and info.nbytes >= _PREAD_MIN:
            # Straight from the page cache: cheaper than faulting the mapping in.
            reader.source.readinto(reader.header.data_start + info.begin,
                                   _dtypes.as_memoryview(out.reshape(-1).view(np.uint8)),
                                   f"tensor {info.name!r}")
        else:
            np.copyto(out, view)
        return out

    def _host_block(self, info: TensorInfo, key: tuple[tuple[int, int, int], ...],
                    target: np.dtype) -> np.ndarray:
        """One shard (a strided block of the tensor) as a host array, reading only its
        byte ranges: a view when it is one aligned range of a mapping, else one copy."""
        reader = self.handle._reader_checked()
        dt = info.dtype
        per_dim = list(key)
        if dt.packed or not _dtypes.HOST_IS_LITTLE_ENDIAN:
            # Sub-byte elements do not map to byte ranges shard by shard; unpack the
            # tensor once and cut the block out of it.
            full = self._host_full(info, target, True)
            return np.ascontiguousarray(full[tuple(slice(*k) for k in key)])
        runs, block_shape = plan_runs(info.shape, per_dim)
        itemsize = dt.itemsize
        base = reader.header.data_start + info.begin
        nbytes = sum(b - a for a, b in runs) * itemsize
        self.bytes_loaded += nbytes
        buf = reader._buf
        if (buf is not None and buf.readonly and len(runs) == 1 and target == dt.numpy):
            view = np.frombuffer(buf, dt.numpy, runs[0][1] - runs[0][0],
                                 base + runs[0][0] * itemsize).reshape(block_shape)
            if _aligned(view):
                self.aliased += 1
                return view
        out = aligned_empty(block_shape, dt.numpy)
        flat = out.reshape(-1).view(np.uint8)
        pos = 0
        local = buf is None and hasattr(reader.source, "_fd")
        if buf is None and not local:
            chunks = reader.ranges([(base + a * itemsize, base + b * itemsize) for a, b in runs],
                                   info.name)
            for chunk in chunks:
                n = len(chunk)
                flat[pos : pos + n] = np.frombuffer(chunk, np.uint8)
                pos += n
        else:
            for a, b in runs:
                n = (b - a) * itemsize
                if local:
                    reader.source.readinto(base + a * itemsize, _dtypes.as_memoryview(flat[pos : pos + n]),
                                           f"tensor {info.name!r}")
                else:
                    assert buf is not None  # not local, so the test above saw a buffer
                    flat[pos : pos + n] = np.frombuffer(buf, np.uint8, n, base + a * itemsize)
                pos += n
        return out if target == dt.numpy else _cast(out, target)

    # -- the hooks SafeOpen calls
    def convert(self, arr: np.ndarray, info: TensorInfo) -> jax.Array:
        """A NumPy array cut from tensor ``info`` (a slice) -> jax.Array on the device."""
        target = self._check_dtype(info)
        device, committed = self._target()
        cpu = device.platform == "cpu"
        if arr.dtype != target:
            arr = _cast(arr, target)
        elif cpu and not _aligned(arr):
            arr = np.ascontiguousarray(arr) if arr.flags.owndata else _copy(arr)
        elif cpu and arr.flags.writeable and not arr.flags.owndata:
            buf = self.handle._reader_checked()._buf
            if buf is not None and not buf.readonly:
                arr = _copy(arr)  # a view of a caller's writable buffer
        return placement().single(arr, device, committed)

    def load_tensor(self, info: TensorInfo) -> jax.Array:
        """The whole tensor ``info`` as a jax.Array (placed or sharded)."""
        sharding = self._sharding_for(info)
        if sharding is not None:
            return self._load_sharded(info, sharding)
        target = self._check_dtype(info)
        device, committed = self._target()
        host = self._host_full(info, target, device.platform == "cpu")
        return placement().single(host, device, committed)

    def load_all(self, infos: Iterable[TensorInfo]) -> dict[str, jax.Array]:
        """Every tensor in ``infos``; unsharded tensors are placed in one batch per
        device. One warning at most names every narrowed 64-bit tensor."""
        infos = list(infos)
        check_sharding_names(self.sharding, infos, "file")
        self._narrowed = [] if not self._warned else None
        try:
            device, committed = self._target()
            cpu = device.platform == "cpu"
            out: dict[str, Any] = {}
            plain: list[tuple[TensorInfo, np.dtype]] = []
            targets: dict[str, np.dtype] = {}
            sharded = self.sharding is not None
            for info in infos:
                sharding = self._sharding_for(info) if sharded else None
                if sharding is not None:
                    out[info.name] = self._load_sharded(info, sharding)
                else:
                    out[info.name] = None  # keeps file order
                    plain.append((info, self._check_dtype(info, targets)))
            hosts = self._hosts(plain, cpu)
            for (info, _), arr in zip(plain, placement().many(hosts, device, committed), strict=True):
                out[info.name] = arr
        finally:
            self._flush_warning()
        return out

    def _hosts(self, plain: list[tuple[TensorInfo, np.dtype]], cpu: bool) -> list[np.ndarray]:
        """Host arrays for tensors placed whole (``plain``: info and the dtype JAX holds).
        On CPU, a tensor aligned in memory JAX may alias becomes one ndarray view: this
        loop is the hot path of a zero-copy load, so it does only that; every other
        tensor takes :meth:`_host_full`, after :meth:`_copy_runs` has read runs of
        unaligned neighbours in one go."""
        address = self._data_address() if cpu else None
        hosts: list[np.ndarray | None] = []
        rest: list[int] = []
        if address is None:
            hosts, rest = [None] * len(plain), list(range(len(plain)))
        else:
            reader = self.handle._reader_checked()
            buf, offset0 = reader._buf, reader.header.data_start
            make = np.ndarray
            viewable: dict[str, bool] = {}
            nbytes = aliased = 0
            for info, target in plain:
                dt, begin = info.dtype, info.begin
                ok = viewable.get(dt.code)
                if ok is None:
                    ok = viewable[dt.code] = not dt.packed and target == dt.numpy
                if (ok and begin != info.end and (address + begin) % ALIGNMENT == 0
                        and len(info.shape) <= 32):
                    hosts.append(make(info.shape, target, buf, offset0 + begin))
                    nbytes += info.end - begin
                    aliased += 1
                else:
                    rest.append(len(hosts))
                    hosts.append(None)
            self.bytes_loaded += nbytes
            self.aliased += aliased
        if rest:
            todo = [plain[k] for k in rest]
            copied = (self._copy_runs([i for i, t in todo if t == i.dtype.numpy], address)
                      if cpu else {})
            for k, (info, target) in zip(rest, todo, strict=True):
                host = copied.get(info.name)
                hosts[k] = host if host is not None else self._host_full(info, target, cpu)
        return hosts  # type: ignore[return-value]  # every None was filled above

    def _load_sharded(self, info: TensorInfo, sharding: Any) -> jax.Array:
        target = self._check_dtype(info)
        shape = info.shape
        try:
            check = getattr(sharding, "check_compatible_aval", None)
            if check is not None:  # rank and divisibility, as jax.device_put checks them
                check(shape)
            sharding.shard_shape(shape)
            indices = sharding.addressable_devices_indices_map(shape)
        except (ValueError, TypeError, AssertionError, IndexError) as exc:
            raise SafecodecError(
                f"tensor {info.name!r} with shape {list(shape)} cannot be laid out with "
                f"{sharding}: {exc}"
            ) from None
        devices = list(getattr(sharding, "_addressable_device_assignment", None) or indices)
        blocks: dict[tuple[tuple[int, int, int], ...], np.ndarray] = {}
        shards = []
        full_key = tuple((0, d, 1) for d in shape)
        for d in devices:
            key = _index_key(indices[d], shape)
            host = blocks.get(key)
            if host is None:  # identical (replicated) shards are read once
                if key == full_key:
                    host = self._host_full(info, target, d.platform == "cpu")
                else:
                    host = self._host_block(info, key, target)
                blocks[key] = host
            shards.append(host)
        return placement().sharded(shape, target, sharding, shards, devices)


_PREAD_MIN: Final = 1 << 16


def _canonical(dtype: np.dtype) -> np.dtype:
    """The dtype JAX stores ``dtype`` as (64-bit types narrow when x64 is off). Cached
    per x64 setting: it is asked once per tensor."""
    x64 = bool(jax.config.jax_enable_x64)  # type: ignore[attr-defined]  # set at runtime, not in the stubs
    key = (dtype, x64)
    got = _CANONICAL.get(key)
    if got is None:
        got = _CANONICAL[key] = np.dtype(jax.dtypes.canonicalize_dtype(dtype))
    return got


_CANONICAL: dict[tuple[np.dtype, bool], np.dtype] = {}


def _copy(arr: np.ndarray) -> np.ndarray:
    out = aligned_empty(arr.shape, arr.dtype)
    np.copyto(out, arr)
    return out


def _cast(arr: np.ndarray, target: np.dtype) -> np.ndarray:
    """JAX's narrowing rule (``astype``) into aligned memory: the one copy."""
    out = aligned_empty(arr.shape, target)
    np.copyto(out, arr, casting="unsafe")
    return out


# ----------------------------------------------------------------------------- loading


def open_jax(source: Any, *, device: Any = None, sharding: Any = None, copy: bool = False,
             strict_x64: bool = False, fs: Any = None,
             storage_options: dict[str, Any] | None = None) -> Any:
    """A ``safe_open`` handle with framework ``"jax"`` and this module's options (a
    sharded handle for a directory or ``*.safetensors.index.json``)."""
    from ._reader import safe_open

    handle = safe_open(source, "jax", fs=fs, copy=copy, device=device, sharding=sharding,
                       storage_options=storage_options)
    handle._jax.strict_x64 = strict_x64
    return handle


def load(data: Any, *, device: Any = None, sharding: Any = None,
         strict_x64: bool = False) -> dict[str, jax.Array]:
    """See :func:`safecodec.jax.load`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SafecodecError(
            f"load() takes bytes-like data, got {type(data).__name__}; use load_file() for "
            "paths and file objects"
        )
    with open_jax(data, device=device, sharding=sharding, strict_x64=strict_x64) as f:
        tensors: dict[str, jax.Array] = f.get_tensors()
        return tensors


def load_file(path: Any, *, device: Any = None, sharding: Any = None, copy: bool = False,
              strict_x64: bool = False, fs: Any = None,
              storage_options: dict[str, Any] | None = None) -> dict[str, jax.Array]:
    """See :func:`safecodec.jax.load_file`."""
    with open_jax(path, device=device, sharding=sharding, copy=copy, strict_x64=strict_x64,
                  fs=fs, storage_options=storage_options) as f:
        return f.get_tensors()  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- saving


def _is_jax_array(value: Any) -> bool:
    return isinstance(value, jax.Array)


class _Sink:
    """Positioned writes into a file descriptor or a bytearray."""

    def __init__(self, fd: int | None = None, buf: bytearray | None = None) -> None:
        self.fd = fd
        self.buf = buf

    def write_at(self, offset: int, data: Any) -> None:
        view = memoryview(data).cast("B")
        if self.buf is not None:
            self.buf[offset : offset + len(view)] = view
            return
        assert self.fd is not None
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)


def _write_numpy(sink: _Sink, start: int, t: PlannedTensor, value: Any) -> None:
    """A host value through the writer's little-endian C-order byte stream."""
    pos = start + t.begin
    for chunk in _writer.iter_tensor_bytes([t], {t.name: value}):
        sink.write_at(pos, chunk)
        pos += chunk.nbytes


def _write_jax(sink: _Sink, start: int, t: PlannedTensor, value: jax.Array) -> None:
    """A jax.Array written shard by shard at its byte ranges: peak host memory is one
    shard (a fresh ``shard.data`` each time, so no host copy stays cached on ``value``)."""
    dt = t.dtype
    if value.shape != t.shape:
        raise SafecodecError(
            f"tensor {t.name!r} changed shape while being written: planned {list(t.shape)}, "
            f"got {list(value.shape)}"
        )
    if t.end == t.begin:
        return
    base = start + t.begin
    for shard in value.addressable_shards:
        if shard.replica_id != 0:
            continue  # another device holds the same piece; exactly one writes it
        key = _index_key(shard.index, t.shape)
        host = np.asarray(shard.data).reshape(-1)
        if not _dtypes.HOST_IS_LITTLE_ENDIAN:  # pragma: no cover - no big-endian JAX hosts
            host = host.view(dt.storage).astype(dt.storage.newbyteorder("<"))
        runs, _ = plan_runs(t.shape, list(key))
        pos = 0
        for a, b in runs:
            piece = host[pos : pos + (b - a)]
            pos += b - a
            if dt.packed:
                per = 8 // dt.bits if dt.bits == 4 else 4
                if a % per or b % per:
                    raise DtypeError(
                        f"tensor {t.name!r}: a shard of this packed {dt.code} tensor starts or "
                        f"ends inside a byte (elements {a}..{b}); shard it so every run holds "
                        f"a multiple of {per} elements, or gather it first"
                    )
                sink.write_at(base + a * dt.bits // 8, pack(np.ascontiguousarray(piece), dt, t.name))
            else:
                sink.write_at(base + a * dt.itemsize,
                              np.ascontiguousarray(piece).view(np.uint8))


def _write_all(sink: _Sink, header: bytes, planned: list[PlannedTensor],
               values: Mapping[str, Any], *, process: int, collective: bool) -> None:
    """Write what this process owns: in a collective save, process 0 writes the header and
    every value that is whole on it; every process writes its replica-0 shards of arrays
    that are not fully addressable. Outside one, everything."""
    start = len(header)
    if not collective or process == 0:
        sink.write_at(0, header)
    for t in planned:
        value = values[t.name]
        if _is_jax_array(value):
            if value.is_fully_addressable:
                if not collective or process == 0:
                    _write_jax(sink, start, t, value)
            else:
                _write_jax(sink, start, t, value)
        elif not collective or process == 0:
            _write_numpy(sink, start, t, value)


def save(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None, *,
         alignment: int = 64) -> bytes:
    """See :func:`safecodec.jax.save`."""
    header, planned, values = _writer.prepare(tensors, metadata, alignment)
    for value in values.values():
        if _is_jax_array(value) and not value.is_fully_addressable:
            raise SafecodecError(
                "save() returns bytes and cannot hold arrays spread over several processes; "
                "use save_file() on a shared filesystem (every process calls it)"
            )
    total = len(header) + (planned[-1].end if planned else 0)
    buf = bytearray(total)
    _write_all(_Sink(buf=buf), header, planned, values, process=0, collective=False)
    return bytes(buf)


_SAVE_COUNTER = itertools.count()


def _barrier(name: str, timeout_s: float) -> None:
    """Wait until every process reaches ``name``."""
    client = _client()
    if client is not None:
        client.wait_at_barrier(name, int(timeout_s * 1000))
        return
    from jax.experimental import multihost_utils  # pragma: no cover - no distributed client

    multihost_utils.sync_global_devices(name)  # pragma: no cover


def save_file(tensors: Mapping[str, Any], path: Any, metadata: Mapping[str, str] | None = None,
              *, alignment: int = 64, fs: Any = None, timeout_s: float = 600.0,
              storage_options: dict[str, Any] | None = None,
              max_shard_size: int | str | None = None) -> None:
    """See :func:`safecodec.jax.save_file`."""
    from ._source import is_remote

    if max_shard_size is not None:
        from ._sharded import save_sharded

        save_sharded(tensors, path, metadata, max_shard_size=max_shard_size,
                     alignment=alignment, fs=fs, storage_options=storage_options)
        return
    if not isinstance(path, (str, os.PathLike)) or is_remote(os.fspath(path), fs):
        _writer.save_file(tensors, path, metadata, alignment=alignment, fs=fs,
                          storage_options=storage_options)
        return
    header, planned, values = _writer.prepare(tensors, metadata, alignment)
    total = len(header) + (planned[-1].end if planned else 0)
    collective = jax.process_count() > 1 and any(
        _is_jax_array(v) and not v.is_fully_addressable for v in values.values()
    )
    if not collective:
        out = _writer.AtomicFile(path)
        try:
            out.file.truncate(total)
            out.file.flush()
            _write_all(_Sink(fd=out.file.fileno()), header, planned, values, process=0,
                       collective=False)
            out.commit()
        except BaseException:
            out.discard()
            raise
        return
    _save_collective(header, planned, values, os.fspath(path), total, timeout_s)


def _save_collective(header: bytes, planned: list[PlannedTensor], values: Mapping[str, Any],
                     path: str, total: int, timeout_s: float) -> None:
    """Every process calls this with the same arguments (the layout is planned from dtypes
    and shapes only, so it is identical everywhere). Process 0 creates the temporary file
    at its final size and writes the header; every process writes its own shards at their
    offsets; after a barrier process 0 renames it over ``path`` and a last barrier makes
    the file visible to every process when the call returns."""
    process = jax.process_index()
    target = os.path.abspath(path)
    directory, base = os.path.split(target)
    digest = hashlib.sha256(header).hexdigest()[:12]
    seq = next(_SAVE_COUNTER)
    tmp = os.path.join(directory, f".{base}.mh-{digest}-{seq}{_writer.TMP_SUFFIX}")
    tag = f"safecodec-save-{digest}-{seq}"
    failed: BaseException | None = None
    if process == 0:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0),
                         0o666)
            try:
                os.ftruncate(fd, total)
            finally:
                os.close(fd)
        except BaseException as exc:  # still reach the barrier so no process hangs
            failed = exc
        _publish(f"{tag}-create", _status(failed))
    _barrier(f"{tag}-created", timeout_s)
    created = _collect_one(f"{tag}-create", timeout_s)
    if created != "ok":
        if failed is not None:
            _unlink(tmp)
            raise failed
        raise SafecodecError(
            f"save_file({path!r}): process 0 could not create the file, nothing was "
            f"written: {created}"
        )
    try:
        fd = os.open(tmp, os.O_WRONLY | getattr(os, "O_BINARY", 0))
        try:
            _write_all(_Sink(fd=fd), header, planned, values, process=process, collective=True)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as exc:  # still reach the barrier so no process hangs
        failed = exc
    _publish(f"{tag}-status-{process}", _status(failed))
    _barrier(f"{tag}-written", timeout_s)
    problems = _collect(tag, jax.process_count(), timeout_s)
    if failed is not None or problems:
        if process == 0:
            _unlink(tmp)
        if failed is not None:
            raise failed
        raise SafecodecError(
            f"save_file({path!r}): another process failed to write its shards, nothing was "
            f"written: {'; '.join(problems)}"
        )
    if process == 0:
        os.replace(tmp, target)
        _writer._fsync_directory(directory)
    _barrier(f"{tag}-renamed", timeout_s)


def _client() -> Any:
    from jax._src import distributed

    return getattr(distributed.global_state, "client", None)


def _publish(key: str, value: str) -> None:
    """Tell every process how this one's part went (through JAX's coordination service)."""
    client = _client()
    if client is not None:
        client.key_value_set(key, value)


def _status(failed: BaseException | None) -> str:
    """What a process publishes about its part: "ok", or its exception's type and text."""
    return "ok" if failed is None else f"{type(failed).__name__}: {failed}"


def _collect_one(key: str, timeout_s: float) -> str:
    """The status one process published under ``key`` ("ok" without a coordination
    service: then each process only knows its own failures)."""
    client = _client()
    if client is None:  # pragma: no cover - multi-process without jax.distributed
        return "ok"
    return str(client.blocking_key_value_get(key, int(timeout_s * 1000)))


def _collect(tag: str, count: int, timeout_s: float) -> list[str]:
    """The failures that other processes published (empty without a coordination service:
    then a failing process raises on its own and the others cannot know)."""
    problems = []
    for p in range(count):
        status = _collect_one(f"{tag}-status-{p}", timeout_s)
        if status != "ok":
            problems.append(f"process {p}: {status}")
    return problems


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
