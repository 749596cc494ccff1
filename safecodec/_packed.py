"""Packing and unpacking of the sub-byte codes F4 (4 bits) and F6_* (6 bits).

ml_dtypes holds one float4/float6 value per byte (in the low bits). The file packs them:

* ``F4``: two elements per byte. Element ``2i`` sits in the **low** nibble of byte ``i``,
  element ``2i + 1`` in the high nibble.
* ``F6_E2M3`` / ``F6_E3M2``: four elements per three bytes. The three bytes form a 24-bit
  little-endian group ``g = b0 | b1 << 8 | b2 << 16``; element ``4i + k`` is
  ``(g >> 6k) & 0x3F``, i.e. the first element in the lowest bits.

"First element in the low bits" is the common convention (it is how the OCP microscaling
formats are laid out by most producers). A tensor must hold a whole number of bytes: an
even count for F4, a multiple of four for F6.
"""

from __future__ import annotations

import numpy as np

from ._dtypes import DType
from ._errors import DtypeError

__all__ = ["pack", "unpack"]


def unpack(raw: np.ndarray | memoryview | bytes, dtype: DType, count: int) -> np.ndarray:
    """Unpack ``count`` elements of a packed code from ``raw`` bytes (1-D result, a copy)."""
    data = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw
    data = data.reshape(-1).view(np.uint8)
    if dtype.bits == 4:
        out = np.empty(data.size * 2, dtype=np.uint8)
        out[0::2] = data & 0x0F
        out[1::2] = data >> 4
    elif dtype.bits == 6:
        groups = data[: data.size - data.size % 3].reshape(-1, 3).astype(np.uint32)
        g = groups[:, 0] | (groups[:, 1] << 8) | (groups[:, 2] << 16)
        out = np.empty((g.size, 4), dtype=np.uint8)
        for k in range(4):
            out[:, k] = (g >> (6 * k)) & 0x3F
        out = out.reshape(-1)
    else:
        raise DtypeError(f"dtype {dtype.code} is not packed")
    return out[:count].view(dtype.numpy)


def pack(values: np.ndarray, dtype: DType, name: str = "") -> np.ndarray:
    """Pack an array of float4/float6 values into the file's byte layout (1-D uint8)."""
    bits = values.reshape(-1).view(np.uint8)
    count = bits.size
    if dtype.bits == 4:
        if count % 2:
            raise DtypeError(
                f"tensor {name!r}: F4 packs two elements per byte; {count} elements is odd"
            )
        low = bits[0::2] & 0x0F
        return (low | ((bits[1::2] & 0x0F) << 4)).astype(np.uint8)
    if dtype.bits == 6:
        if count % 4:
            raise DtypeError(
                f"tensor {name!r}: {dtype.code} packs four elements per three bytes; "
                f"{count} elements is not a multiple of 4"
            )
        v = (bits.reshape(-1, 4) & 0x3F).astype(np.uint32)
        g = v[:, 0] | (v[:, 1] << 6) | (v[:, 2] << 12) | (v[:, 3] << 18)
        out = np.empty((g.size, 3), dtype=np.uint8)
        out[:, 0] = g & 0xFF
        out[:, 1] = (g >> 8) & 0xFF
        out[:, 2] = (g >> 16) & 0xFF
        return out.reshape(-1)
    raise DtypeError(f"dtype {dtype.code} is not packed")
