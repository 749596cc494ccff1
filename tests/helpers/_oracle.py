"""The reference Rust ``safetensors`` wheel (0.8.0) as a test oracle.

This is the only module of the test suite that imports ``safetensors``. Tests that use it
call :func:`require` first, so that they skip (with a reason) when the wheel is missing or
blocked (``-p block_safetensors``), and never break collection.

The oracle's low-level functions are used, not ``safetensors.numpy``: they cover every
dtype code (BF16, F8, F4 included), and they hand back raw bytes, so the comparison does
not depend on how either side maps codes to NumPy types.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

# safetensors code -> the dtype name TensorSpec takes. F4 is written as packed pairs
# ("float4_e2m1fn_x2", whose shape the wheel doubles on its last axis); F6 cannot be
# written through the Python API at all.
SPEC_NAMES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
    "C64": "complex64",
    "F4": "float4_e2m1fn_x2",
}


def _module() -> Any:
    try:
        import safetensors
    except ImportError as exc:  # missing, or blocked by -p block_safetensors
        pytest.skip(f"the reference wheel safetensors is not importable: {exc}")
    return safetensors


def require() -> Any:
    """Return the ``safetensors`` module, or skip the calling test when it is missing."""
    return _module()


def require_module(name: str) -> Any:
    """Return ``safetensors.<name>`` (``"numpy"``, ``"flax"``), or skip the calling test
    when the wheel, or that module's framework, is missing."""
    import importlib

    _module()
    try:
        return importlib.import_module(f"safetensors.{name}")
    except ImportError as exc:
        pytest.skip(f"safetensors.{name} is not importable: {exc}")


@dataclass(frozen=True)
class Verdict:
    """What the oracle made of some bytes: accepted tensors, or the error message."""

    ok: bool
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]]
    error: str = ""


def deserialize(data: bytes) -> Verdict:
    """Run the reference reader on ``data``.

    Returns:
        ``Verdict(True, {name: (code, shape, raw bytes)})`` when it accepts (for a repeated
        name, the last entry it reports wins, as in the wheel), or ``Verdict(False, {},
        message)`` when it raises ``SafetensorError``.
    """
    st = _module()
    try:
        items = st.deserialize(bytes(data))
    except st.SafetensorError as exc:
        return Verdict(False, {}, str(exc))
    out = {name: (d["dtype"], tuple(d["shape"]), bytes(d["data"])) for name, d in items}
    return Verdict(True, out)


def serialize(
    tensors: Mapping[str, tuple[str, tuple[int, ...], bytes]],
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Run the reference writer.

    Args:
        tensors: name -> (code, logical shape, little-endian C-order bytes).
        metadata: Optional str -> str mapping.

    Returns:
        The bytes the wheel writes.
    """
    st = _module()
    keep_alive: list[np.ndarray] = []
    specs = {}
    for name, (code, shape, raw) in tensors.items():
        buf = np.frombuffer(bytearray(raw), np.uint8) if raw else np.zeros(1, np.uint8)
        keep_alive.append(buf)
        spec_shape = list(shape)
        if code == "F4":
            # The wheel takes F4 as packed pairs and doubles the last axis itself.
            if not spec_shape or spec_shape[-1] % 2:
                raise ValueError(f"the wheel cannot write F4 shape {list(shape)}")
            spec_shape[-1] //= 2
        specs[name] = st.TensorSpec(
            dtype=SPEC_NAMES[code],
            shape=spec_shape,
            data_ptr=buf.ctypes.data,
            data_len=len(raw),
        )
    out = bytes(st.serialize(specs, metadata=None if metadata is None else dict(metadata)))
    del keep_alive
    return out


def metadata_of_file(path: str) -> dict[str, str] | None:
    """The ``__metadata__`` the reference reader reports for a file on disk."""
    st = _module()
    with st.safe_open(path, framework="numpy") as f:
        return f.metadata()
