"""JAX placement: host arrays onto devices, cheaply, and host memory JAX may alias.

JAX's CPU client aliases (does not copy) host memory whose address is a multiple of
:data:`ALIGNMENT`; :func:`aligned_empty` makes such memory. The public ``jax.device_put``
costs tens of microseconds per array, which dominates a zero-copy load; :data:`PUT` is
chosen once, on first use: ``xla_client.batched_device_put`` (the primitive
``jax.device_put`` ends in, measured 5-15x cheaper on jax 0.10 and 0.12) when it is present
and passes a self-check, else the public API (:class:`PublicPut`). :func:`placement_name`
says which is in use (the test suite asserts the fast one on the supported JAX versions).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, cast

import jax
import numpy as np

from . import _threads
from ._header import ZERO_COPY_ALIGNMENT as ALIGNMENT  # JAX's CPU client aliases at this

__all__ = [
    "ALIGNMENT",
    "InternalPut",
    "PublicPut",
    "aligned_copy",
    "aligned_empty",
    "cast_aligned",
    "is_aligned",
    "placement",
    "placement_name",
]



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


def is_aligned(arr: np.ndarray) -> bool:
    """Whether JAX's CPU client would alias ``arr`` (C-contiguous, address % 64 == 0)."""
    return arr.ctypes.data % ALIGNMENT == 0 and arr.flags.c_contiguous


# ----------------------------------------------------------------------------- putting



def single_device_sharding(device: Any) -> Any:
    """The sharding that puts a whole array on ``device``: ``make_single_device_sharding``
    where JAX has it (JAX 0.12 deprecates naming the ``SingleDeviceSharding`` class)."""
    make = getattr(jax.sharding, "make_single_device_sharding", None)
    if make is not None:
        return make(device)
    return jax.sharding.SingleDeviceSharding(device)  # older JAX

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
            sharding = self._single[device] = single_device_sharding(device)
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


def placement_name() -> str:
    """The name of the placement strategy in use (``xla_client.batched_device_put`` or
    ``jax.device_put``), selecting it on first call."""
    return placement().name


def placement() -> PublicPut:
    """The placement strategy, selecting it on first call."""
    global PUT
    if PUT is None:
        PUT = _select_put()
    return PUT


def aligned_copy(arr: np.ndarray) -> np.ndarray:
    """``arr`` copied into fresh aligned memory."""
    out = aligned_empty(arr.shape, arr.dtype)
    _threads.copy(out, arr)  # large copies in parallel pieces
    return out


def cast_aligned(arr: np.ndarray, target: np.dtype) -> np.ndarray:
    """JAX's narrowing rule (``astype``) into aligned memory: the one copy."""
    out = aligned_empty(arr.shape, target)
    _threads.copy(out, arr, casting="unsafe")  # large casts in parallel pieces
    return out
