"""JAX loading: the output that turns a handle's tensors into ``jax.Array`` values,
zero-copy where the hardware allows, one copy everywhere else, sharded across devices
and processes.

How a tensor reaches JAX (:func:`host_route`, from THE read route)
------------------------------------------------------------------
The route of a tensor is decided once, by :func:`safecodec._reader.read_route` (from the
source, the options and the tensor); :func:`host_route` only adds what JAX does with a
view of memory. Its value is a :class:`~safecodec._reader.Route`:

* **ALIAS**: CPU, 64-byte aligned, byte-sized dtype, same dtype in JAX, memory nobody can
  change (safecodec's read-only mapping, or immutable ``bytes``; never a caller's
  writable memory, even through a read-only view: :func:`aliasable_address` decides,
  for every route below): the host array is a view of the file's
  mapping and the CPU client *aliases* it. Loading costs a header parse, not a memcpy.
  safecodec's writer (``alignment=64``, the default) puts every tensor whose byte size is
  a multiple of 64 at such an address. On accelerators the view itself is handed to the
  transfer, which is the one copy.
* **READ**: one positioned read from the page cache into fresh aligned memory
  (``copy=True``, no mmap, a tensor not aligned in a local file: cheaper than faulting the
  mapping in; a remote FETCH of a whole tensor reads the same way).
* **VIEW**: one memcpy from the buffer into fresh aligned memory (memory its owner can
  write, read-only view or not, or a small unaligned tensor).
* **DECODE**: packed F4 is unpacked once into ``float4_e2m1fn``; big-endian hosts swap;
  64-bit values with x64 off are narrowed into fresh aligned memory (JAX's rule).
  **F6** has no JAX dtype: a :class:`~safecodec.DtypeError` points to the NumPy output.

Checksums (``verify=True``) are checked by the reader, where
:func:`safecodec._reader.verify_point` says (the handle checks memory before it calls this
output; reads check the bytes they return), never here.

The output is four parts, one concern each: :class:`Policy` (device, sharding spec,
dtype and narrowing warnings), :class:`HostRoutes` (host arrays by route),
:class:`ReadPlan` (sharded reads) and :class:`LoadCounters` (what was placed, counted in
one method); :class:`JaxOutput` joins them behind the reader's ``Output`` interface.

Sharding: one read plan per process
-----------------------------------
With a sharding, each process builds only the shards addressable on it, and reads only
their bytes. Each block is a *box* of the tensor, read by the reader's box engine
(:meth:`safecodec._reader.TensorReader.read_boxes`; its plan is O(ndim) numbers per
block, never one per row: a column-sharded ``(N, 2)`` tensor costs what its bytes cost).
The plan is per process, not per device (:meth:`ReadPlan.load_many`, for every
sharded tensor of a ``load_all`` at once): the distinct blocks of the process's devices (a
replicated block, same index on several devices, is read once and shared), then

* **remote**: the blocks of all tensors together go to ONE ``read_boxes`` call per batch
  of :data:`FETCH_BATCH` bytes: spans within the read-amplification budget
  (:data:`safecodec._reader.READ_BUDGET`, so another process's half is never fetched),
  fetched concurrently, and every block cut out of what arrived. Fetched memory is freed
  batch by batch: peak host memory stays near the largest block plus one batch.
* **local**: a view of the mapping when a block is one aligned run (zero copy), else one
  strided copy from the mapping (or, with ``copy=True``, positioned reads of its spans).

``get_slice(name, sharding=s)[index]`` lays ``s`` over the slice's shape and reads each
device's block as one box of the tensor (:meth:`ReadPlan.load_slice`).

Lifetime
--------
Arrays that alias the mapping keep it alive: they stay valid after the handle is closed
and after the file is deleted or atomically replaced. They are *not* protected against
in-place modification of the file: pass ``copy=True`` for arrays that own their memory.
The output keeps no reference to a handle (each call receives the handle's reader), so a
load leaves nothing behind for the garbage collector: descriptors and mappings are
released when the last array that uses them is.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Final

import jax
import numpy as np

from . import _dtypes, _threads
from ._errors import DtypeError, SafecodecError, TensorNotFoundError
from ._header import VIEW_MAX_NDIM, TensorInfo
from ._indexing import box_layout, index_key, slice_box
from ._jax_put import (
    ALIGNMENT,
    aligned_copy,
    aligned_empty,
    cast_aligned,
    is_aligned,
    placement,
)
from ._reader import MEMORY_ROUTES, ReadOptions, Route, TensorReader, read_route

__all__ = [
    "HostRoutes",
    "JaxOutput",
    "LoadCounters",
    "Policy",
    "PrecisionWarning",
    "ReadPlan",
    "aliasable_address",
    "check_sharding_names",
    "host_route",
]

_F6_CODES: Final = _dtypes.F6_CODES
#: Unaligned tensors at least this large are copied with a positioned read instead of
#: from the mapping (faulting pages in costs more than a read from the page cache).
PREAD_MIN: Final = 1 << 16
#: Remote sharded loads fetch the blocks of a process in batches of about this many bytes
#: (one concurrent ``read_ranges`` call each; a larger block is a batch of its own): host
#: memory holds one batch of fetched bytes at a time, never the whole file.
FETCH_BATCH: Final = 256 << 20

Key = tuple[tuple[int, int, int], ...]


class PrecisionWarning(UserWarning):
    """A tensor changes dtype on its way into JAX (64-bit values with x64 disabled)."""


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


def aliasable_address(reader: TensorReader) -> int | None:
    """THE predicate "may JAX alias this reader's memory?", used by every route below:
    where tensor offset 0 lies in memory when it may, None when every tensor must be
    copied. It may when the read route of the reader's source is
    :attr:`~safecodec._reader.Route.ALIAS` (:func:`safecodec._reader.read_route`: memory
    that can never change while an array uses it, see
    :meth:`safecodec._source.SourceBase.stable`: safecodec's own read-only mapping of a
    file, or immutable ``bytes``), on a little-endian host. Not: no buffer (copy=True, no
    mmap, remote), and not any memory its owner can write, whatever a view of it says:
    a read-only memoryview of a ``bytearray`` changes when the ``bytearray`` does."""
    buf = reader.buffer
    if buf is None or reader.route is not Route.ALIAS or not _dtypes.HOST_IS_LITTLE_ENDIAN:
        return None
    base = np.frombuffer(buf, np.uint8, 0 if not len(buf) else 1).ctypes.data
    return int(base) + reader.header.data_start


def host_route(reader: TensorReader, info: TensorInfo, target: np.dtype, cpu: bool,
               address: int | None) -> Route:
    """The route of one whole tensor on its way to JAX (see the module docstring):
    :func:`safecodec._reader.read_route` (DECODE: unpack, byte swap or cast; READ/FETCH:
    no buffer, a read into fresh aligned memory), then, for a view of memory, what JAX
    does with it: ALIAS (hand the view over: aliased on CPU, transferred elsewhere) or
    VIEW (one memcpy into fresh aligned memory), READ for a large unaligned tensor of a
    local file (a positioned read beats faulting the mapping in).

    Args:
        reader: The handle's reader.
        info: The tensor.
        target: The dtype JAX will hold.
        cpu: Whether the device is a CPU (aliasing is possible only there).
        address: :func:`aliasable_address` of ``reader`` (None: nothing may be aliased).
    """
    route = read_route(reader, info.dtype, target)
    if route not in MEMORY_ROUTES:
        return Route.READ if route is Route.FETCH else route
    if not cpu:
        return Route.ALIAS  # the transfer is the copy
    if not info.nbytes:
        return Route.VIEW
    if address is not None and (address + info.begin) % ALIGNMENT == 0:
        return Route.ALIAS
    return Route.READ if reader.source.positioned and info.nbytes >= PREAD_MIN else Route.VIEW


class LoadCounters:
    """What an output placed, for measurement: updated in one place, :meth:`add`.

    Attributes:
        bytes_loaded: Bytes of tensor data placed (views and copies).
        aliased: Arrays that share the mapped memory (no copy).
    """

    __slots__ = ("aliased", "bytes_loaded")

    def __init__(self) -> None:
        self.bytes_loaded = 0
        self.aliased = 0

    def add(self, nbytes: int, aliased: int = 0) -> None:
        """Count ``nbytes`` placed, ``aliased`` of the arrays without a copy."""
        self.bytes_loaded += nbytes
        self.aliased += aliased


class Policy:
    """Where and as what tensors land: the device, the sharding spec and the dtype JAX
    holds (narrowing of 64-bit values warned about once, or refused with ``strict_x64``).
    Mutable only in its warning state.

    Args: see :class:`JaxOutput`.
    """

    def __init__(self, device: Any, sharding: Any, strict_x64: bool) -> None:
        if device is not None and isinstance(device, jax.sharding.Sharding):
            sharding, device = (device if sharding is None else sharding), None
        if device is not None and not isinstance(device, jax.Device):
            raise SafecodecError(
                "device= takes a jax.Device (such as jax.devices('cpu')[0]) or a "
                f"jax.sharding.Sharding; got {type(device).__name__} {device!r}"
            )
        self.check_spec(sharding)
        self.device = device
        self.sharding = sharding
        self.strict_x64 = strict_x64
        self._warned = False
        self._narrowed: list[str] | None = None  # collecting names during load_all

    @staticmethod
    def check_spec(sharding: Any) -> None:
        if sharding is not None and not (isinstance(sharding, (jax.sharding.Sharding, Mapping))
                                         or callable(sharding)):
            raise SafecodecError(
                "sharding= takes a jax.sharding.Sharding, a mapping name -> Sharding, or a "
                f"callable fn(name, shape, dtype); got {type(sharding).__name__}"
            )

    def target(self) -> tuple[Any, bool]:
        """The device of unsharded tensors, and whether placement is committed."""
        if self.device is not None:
            return self.device, True
        return _default_device(), False

    @staticmethod
    def sharding_for(spec: Any, info: TensorInfo) -> Any:
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

    def check_dtype(self, reader: TensorReader, info: TensorInfo,
                    cache: dict[str, np.dtype] | None = None) -> np.dtype:
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
        if dt.packed and not reader.unpack:
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

    def collect_warnings(self) -> None:
        """Narrowed tensors are collected from now on, for one :meth:`flush_warning`."""
        self._narrowed = [] if not self._warned else None

    def flush_warning(self) -> None:
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


class HostRoutes:
    """Host arrays for JAX, by route (:func:`host_route`): whole tensors one by one
    (:meth:`full`) or in a batch (:meth:`many`, the zero-copy hot loop), runs of
    unaligned neighbours in one read (:meth:`_copy_runs`), and blocks of a tensor
    (:meth:`block`). Every byte placed is counted in ``counters``."""

    def __init__(self, counters: LoadCounters) -> None:
        self.counters = counters

    def full(self, reader: TensorReader, info: TensorInfo, target: np.dtype, cpu: bool,
             address: int | None) -> np.ndarray:
        """The whole tensor as a host array JAX may alias (CPU) or transfer from, by the
        route :func:`host_route` chooses."""
        route = host_route(reader, info, target, cpu, address)
        if route is Route.DECODE:
            self.counters.add(info.nbytes)
            arr = reader.array(info)  # a fresh array: unpacked, byte-swapped or read
            return arr if arr.dtype == target else cast_aligned(arr, target)
        if route is Route.ALIAS:
            self.counters.add(info.nbytes, 1 if cpu and info.nbytes else 0)
            return reader.array(info)
        self.counters.add(info.nbytes)
        out = aligned_empty(info.shape, info.dtype.numpy)
        if info.nbytes:
            flat = _dtypes.as_memoryview(out.reshape(-1).view(np.uint8))
            if route is Route.READ:
                reader.read_span([info], flat)
            else:  # VIEW: one memcpy out of memory JAX may not alias
                start = reader.header.data_start + info.begin
                assert reader.buffer is not None  # VIEW is chosen only with a buffer
                _threads.copy(np.frombuffer(flat, np.uint8),
                              np.frombuffer(reader.buffer, np.uint8, info.nbytes, start))
        return out

    def many(self, reader: TensorReader, plain: list[tuple[TensorInfo, np.dtype]],
             cpu: bool) -> list[np.ndarray]:
        """Host arrays for tensors placed whole (``plain``: info and the dtype JAX holds).
        On CPU, the ALIAS route of :func:`host_route` is taken inline for every tensor
        it applies to (this loop is the hot path of a zero-copy load: one ndarray view per
        tensor, nothing else; the route is asked once per dtype); every other tensor
        takes :meth:`full`, after :meth:`_copy_runs` has read runs of unaligned
        neighbours in one go."""
        address = aliasable_address(reader) if cpu else None
        hosts: list[np.ndarray | None] = []
        rest: list[int] = []
        if address is None:
            hosts, rest = [None] * len(plain), list(range(len(plain)))
        else:
            buf, offset0 = reader.buffer, reader.header.data_start
            make = np.ndarray
            viewable: dict[str, bool] = {}
            nbytes = aliased = 0
            for info, target in plain:
                dt, begin = info.dtype, info.begin
                ok = viewable.get(dt.code)
                if ok is None:
                    ok = viewable[dt.code] = read_route(reader, dt, target) is Route.ALIAS
                if (ok and begin != info.end and (address + begin) % ALIGNMENT == 0
                        and len(info.shape) <= VIEW_MAX_NDIM):
                    hosts.append(make(info.shape, target, buf, offset0 + begin))
                    nbytes += info.end - begin
                    aliased += 1
                else:
                    rest.append(len(hosts))
                    hosts.append(None)
            self.counters.add(nbytes, aliased)
        if rest:
            todo = [plain[k] for k in rest]
            copied = (self._copy_runs(reader, [i for i, t in todo if t == i.dtype.numpy], cpu,
                                      address) if cpu else {})
            for k, (info, target) in zip(rest, todo, strict=True):
                host = copied.get(info.name)
                hosts[k] = (host if host is not None
                            else self.full(reader, info, target, cpu, address))
        return hosts  # type: ignore[return-value]  # every None was filled above

    def _copy_runs(self, reader: TensorReader, infos: list[TensorInfo], cpu: bool,
                   address: int | None) -> dict[str, np.ndarray]:
        """Tensors that :func:`host_route` sends to READ or VIEW (a copy) and that follow
        each other in the file are copied per run: one read per run into one buffer placed
        so that most of them land 64-byte aligned (in a file from the reference writer,
        usually all of them: their sizes are multiples of 64, so they share one
        misalignment). Those alias the buffer; the rest get their own aligned copy."""
        start = reader.header.data_start
        runs: list[list[TensorInfo]] = []
        for info in infos:
            if not info.nbytes or host_route(reader, info, info.dtype.numpy, cpu,
                                             address) not in (Route.READ, Route.VIEW):
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
            reader.read_span(run, _dtypes.as_memoryview(region))
            for info in run:
                piece = region[start + info.begin - lo : start + info.end - lo]
                arr = piece.view(info.dtype.numpy).reshape(info.shape)
                out[info.name] = arr if is_aligned(arr) else aligned_copy(arr)
            self.counters.add(hi - lo)
        return out

    def block(self, reader: TensorReader, info: TensorInfo, key: Key,
              target: np.dtype) -> np.ndarray:
        """One shard (a strided block of the tensor) of a local file or buffer as a host
        array, reading only its bytes: a view when it is one aligned range of memory JAX
        may alias (:func:`aliasable_address`), else one box read
        (:meth:`TensorReader.read_box`: a strided copy from the mapping, or positioned
        reads of its spans). Remote blocks are read together by :class:`ReadPlan`."""
        dt = info.dtype
        if dt.packed or not _dtypes.HOST_IS_LITTLE_ENDIAN:
            # Sub-byte elements do not map to byte ranges shard by shard; unpack the
            # tensor once and cut the block out of it.
            full = self.full(reader, info, target, True, None)
            return np.ascontiguousarray(full[tuple(slice(*k) for k in key)])
        layout = box_layout(info.shape, key, dt.itemsize)
        buf = reader.buffer
        if (buf is not None and not layout.outer and target == dt.numpy
                and aliasable_address(reader) is not None):
            start = reader.header.data_start + info.begin + layout.offset
            view = np.frombuffer(buf, dt.numpy, layout.nbytes // dt.itemsize,
                                 start).reshape(layout.shape)
            if is_aligned(view):
                self.counters.add(layout.nbytes, 1)
                return view
        out = reader.read_box(info, tuple(slice(*k) for k in key), empty=aligned_empty)
        self.counters.add(out.nbytes)
        return out if target == dt.numpy else cast_aligned(out, target)


class ReadPlan:
    """Sharded reads: ONE plan per process for every sharded tensor of a call (module
    docstring): the distinct blocks of its devices, remote ones fetched in batches of
    :data:`FETCH_BATCH` bytes (:meth:`TensorReader.read_boxes`), local ones by
    :meth:`HostRoutes.block`; and slices laid out with a sharding (:meth:`load_slice`)."""

    def __init__(self, policy: Policy, hosts: HostRoutes) -> None:
        self.policy = policy
        self.hosts = hosts
        self.counters = hosts.counters

    def _shard_job(self, reader: TensorReader, info: TensorInfo, sharding: Any) -> _ShardJob:
        """What one process must build for tensor ``info`` laid out with ``sharding``: its
        addressable devices and the block (index key) each one holds."""
        target = self.policy.check_dtype(reader, info)
        devices, keys = _device_keys(f"tensor {info.name!r}", info.shape, sharding)
        return _ShardJob(info, target, sharding, devices, keys)

    def load_many(self, reader: TensorReader,
                  items: list[tuple[TensorInfo, Any]]) -> dict[str, jax.Array]:
        """Sharded tensors (info, sharding), read by ONE plan for this process (see the
        module docstring): distinct blocks only; remotely, all of them read in batches of
        :data:`FETCH_BATCH` bytes, one box plan per batch; locally, a view of the mapping
        or one box read per block. Each tensor is placed as soon as its blocks are
        there."""
        jobs = [self._shard_job(reader, info, sharding) for info, sharding in items]
        by_ranges = reader.route is Route.FETCH  # remote, mostly
        address = aliasable_address(reader)
        out: dict[str, jax.Array] = {}
        fetch: list[tuple[_ShardJob, Key]] = []
        for job in jobs:
            info = job.info
            full_key = tuple((0, d, 1) for d in info.shape)
            fetched = by_ranges and read_route(reader, info.dtype) is Route.FETCH
            for d, key in zip(job.devices, job.keys, strict=True):
                if key in job.blocks or key in job.pending:
                    continue  # identical (replicated) blocks are read once
                if fetched:
                    job.pending.add(key)
                    fetch.append((job, key))
                elif key == full_key:
                    cpu = d.platform == "cpu"
                    job.blocks[key] = self.hosts.full(reader, info, job.target, cpu,
                                                      address if cpu else None)
                else:
                    job.blocks[key] = self.hosts.block(reader, info, key, job.target)
            if not job.pending:
                out[info.name] = job.place()
        batch: list[tuple[_ShardJob, Key]] = []
        size = 0
        for n, (job, key) in enumerate(fetch):
            batch.append((job, key))
            size += math.prod(len(range(*k)) for k in key) * job.info.dtype.itemsize
            if size >= FETCH_BATCH or n == len(fetch) - 1:
                for done in self._read_blocks(reader, batch):
                    out[done.info.name] = done.place()
                batch, size = [], 0
        return out

    def _read_blocks(self, reader: TensorReader, batch: list[tuple[_ShardJob, Key]],
                     ) -> list[_ShardJob]:
        """One batch of remote blocks, read by one plan
        (:meth:`TensorReader.read_boxes`: every span of every block in one merged,
        concurrent ``read_ranges`` call) into fresh aligned memory. Returns the tensors
        this batch completed."""
        hosts = reader.read_boxes(
            [(job.info, tuple(slice(*k) for k in key)) for job, key in batch],
            empty=aligned_empty)
        done: list[_ShardJob] = []
        for (job, key), host in zip(batch, hosts, strict=True):
            self.counters.add(host.nbytes)
            dt = job.info.dtype
            job.blocks[key] = host if job.target == dt.numpy else cast_aligned(host, job.target)
            job.pending.discard(key)
            if not job.pending:
                done.append(job)
        return done

    def load_slice(self, reader: TensorReader, info: TensorInfo, per_dim: list[Any],
                   new_axes: list[int], sharding: Any) -> jax.Array:
        """``tensor[index]`` (normalised by :func:`safecodec._indexing.normalize_index`)
        as a jax.Array laid out with ``sharding``: each distinct block of this process's
        devices is one box of the tensor, and the boxes are read by one plan
        (:meth:`TensorReader.read_boxes`)."""
        target = self.policy.check_dtype(reader, info)
        shape = [len(range(*e)) for e in per_dim if not isinstance(e, int)]
        for pos in sorted(new_axes):
            shape.insert(pos, 1)
        devices, keys = _device_keys(f"a slice of tensor {info.name!r}", tuple(shape),
                                     sharding)
        distinct = list(dict.fromkeys(keys))
        plans = [slice_box(per_dim, new_axes, tuple(slice(*k) for k in key))
                 for key in distinct]
        reads = reader.read_boxes([(info, tuple(slice(*b) for b in box))
                                   for box, _, _ in plans], empty=aligned_empty)
        blocks: dict[Key, np.ndarray] = {}
        for key, (_, flips, _), block in zip(distinct, plans, reads, strict=True):
            axes = tuple(d for d, f in enumerate(flips) if f)
            arr = np.flip(block, axes) if axes else block
            arr = arr.reshape([len(range(*k)) for k in key])
            if arr.dtype != target:
                arr = cast_aligned(arr, target)
            elif not is_aligned(arr):
                arr = aligned_copy(arr)
            self.counters.add(arr.nbytes)
            blocks[key] = arr
        return placement().sharded(tuple(shape), target, sharding, [blocks[k] for k in keys],
                                   devices)


class JaxOutput:
    """The JAX output of a handle (framework ``"jax"``): see the module docstring. Built
    by :func:`safecodec.safe_open`; every method receives the handle's reader. It joins
    four parts, one concern each: :class:`Policy` (device, sharding spec, dtype and
    narrowing), :class:`HostRoutes` (host arrays by route), :class:`ReadPlan` (sharded
    reads) and :class:`LoadCounters` (what was placed).

    Args:
        device: Default device (committed placement), or None for JAX's default device
            (uncommitted, like ``jax.device_put(x)``).
        sharding: A ``jax.sharding.Sharding`` for every tensor, a mapping name -> Sharding
            (tensors not in it get default placement), or a callable called positionally as
            ``fn(name, shape, dtype)`` returning a Sharding or None.
        strict_x64: Raise instead of warning when a 64-bit tensor would be narrowed
            because JAX's x64 mode is off.
    """

    def __init__(self, *, device: Any = None, sharding: Any = None,
                 strict_x64: bool = False) -> None:
        self.policy = Policy(device, sharding, strict_x64)
        self.counters = LoadCounters()
        self.hosts = HostRoutes(self.counters)
        self.plan = ReadPlan(self.policy, self.hosts)

    @classmethod
    def for_options(cls, options: ReadOptions) -> JaxOutput:
        """The output of a handle read with ``options`` (its device, sharding, strict_x64)."""
        return cls(device=options.device, sharding=options.sharding,
                   strict_x64=options.strict_x64)

    @property
    def device(self) -> Any:
        return self.policy.device

    @property
    def sharding(self) -> Any:
        return self.policy.sharding

    @property
    def strict_x64(self) -> bool:
        return self.policy.strict_x64

    @property
    def bytes_loaded(self) -> int:
        """Bytes of tensor data this output placed (views and copies), for measurement."""
        return self.counters.bytes_loaded

    @property
    def aliased(self) -> int:
        """Arrays that share the mapped memory (no copy), for measurement."""
        return self.counters.aliased

    # -- the Output interface
    def check_names(self, infos: list[TensorInfo], sharding: Any, where: str) -> None:
        """A ``sharding=`` mapping (this call's, else the output's) may only name
        tensors of ``infos``."""
        check_sharding_names(self.sharding if sharding is None else sharding, infos, where)

    def convert(self, reader: TensorReader, arr: Any, info: TensorInfo) -> jax.Array:
        """A NumPy array cut from tensor ``info`` (a slice; a NumPy scalar for one
        element) -> jax.Array on the device."""
        arr = np.asarray(arr)
        target = self.policy.check_dtype(reader, info)
        device, committed = self.policy.target()
        cpu = device.platform == "cpu"
        if arr.dtype != target:
            arr = cast_aligned(arr, target)
        elif cpu and not is_aligned(arr):
            arr = aligned_copy(arr)
        elif (cpu and not arr.flags.owndata and reader.buffer is not None
              and aliasable_address(reader) is None):
            arr = aligned_copy(arr)  # a view of memory that can change under JAX
        return placement().single(arr, device, committed)

    def load_tensor(self, reader: TensorReader, info: TensorInfo) -> jax.Array:
        """The whole tensor ``info`` as a jax.Array (placed or sharded)."""
        sharding = self.policy.sharding_for(self.sharding, info)
        if sharding is not None:
            return self.plan.load_many(reader, [(info, sharding)])[info.name]
        target = self.policy.check_dtype(reader, info)
        device, committed = self.policy.target()
        cpu = device.platform == "cpu"
        host = self.hosts.full(reader, info, target, cpu,
                               aliasable_address(reader) if cpu else None)
        return placement().single(host, device, committed)

    def load_all(self, reader: TensorReader, infos: list[TensorInfo], *,
                 sharding: Any = None, check_names: bool = True) -> dict[str, jax.Array]:
        """Every tensor in ``infos``; unsharded tensors are placed in one batch per
        device, sharded ones read by one plan for this process (module docstring). One
        warning at most names every narrowed 64-bit tensor. ``sharding`` replaces the
        output's own for this call."""
        policy = self.policy
        spec = self.sharding if sharding is None else sharding
        policy.check_spec(spec)
        if check_names:
            check_sharding_names(spec, infos, "file")
        policy.collect_warnings()
        try:
            device, committed = policy.target()
            cpu = device.platform == "cpu"
            out: dict[str, Any] = {}
            plain: list[tuple[TensorInfo, np.dtype]] = []
            sharded: list[tuple[TensorInfo, Any]] = []
            targets: dict[str, np.dtype] = {}
            for info in infos:
                shard_spec = policy.sharding_for(spec, info) if spec is not None else None
                out[info.name] = None  # keeps file order
                if shard_spec is not None:
                    sharded.append((info, shard_spec))
                else:
                    plain.append((info, policy.check_dtype(reader, info, targets)))
            if sharded:  # one read plan for this process, every sharded tensor at once
                out.update(self.plan.load_many(reader, sharded))
            hosts = self.hosts.many(reader, plain, cpu)
            for (info, _), arr in zip(plain, placement().many(hosts, device, committed),
                                      strict=True):
                out[info.name] = arr
        finally:
            policy.flush_warning()
        return out

    def load_slice(self, reader: TensorReader, info: TensorInfo, per_dim: list[Any],
                   new_axes: list[int], sharding: Any) -> jax.Array:
        """``tensor[index]`` laid out with ``sharding`` (:meth:`ReadPlan.load_slice`)."""
        return self.plan.load_slice(reader, info, per_dim, new_axes, sharding)


def _device_keys(what: str, shape: tuple[int, ...], sharding: Any) -> tuple[list[Any], list[Key]]:
    """This process's devices of ``sharding`` laid over ``shape``, and the block (index
    key) each one holds.

    Raises:
        SafecodecError: ``shape`` cannot be laid out with ``sharding``.
    """
    try:
        check = getattr(sharding, "check_compatible_aval", None)
        if check is not None:  # rank and divisibility, as jax.device_put checks them
            check(shape)
        sharding.shard_shape(shape)
        indices = sharding.addressable_devices_indices_map(shape)
    except (ValueError, TypeError, AssertionError, IndexError) as exc:
        raise SafecodecError(
            f"{what} with shape {list(shape)} cannot be laid out with {sharding}: {exc}"
        ) from None
    devices = list(getattr(sharding, "_addressable_device_assignment", None) or indices)
    return devices, [index_key(indices[d], shape) for d in devices]


class _ShardJob:
    """One sharded tensor of a process's read plan: its addressable devices, the block
    each holds, the host arrays built so far and the blocks still being fetched."""

    __slots__ = ("blocks", "devices", "info", "keys", "pending", "sharding", "target")

    def __init__(self, info: TensorInfo, target: np.dtype, sharding: Any, devices: list[Any],
                 keys: list[Key]) -> None:
        self.info = info
        self.target = target
        self.sharding = sharding
        self.devices = devices
        self.keys = keys
        self.blocks: dict[Key, np.ndarray] = {}
        self.pending: set[Key] = set()

    def place(self) -> jax.Array:
        """The global array, from the host block of each addressable device."""
        shards = [self.blocks[k] for k in self.keys]
        self.blocks = {}
        return placement().sharded(self.info.shape, self.target, self.sharding, shards,
                                   self.devices)
