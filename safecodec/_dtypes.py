"""The dtype table of the safetensors format: one row per code, looked up both ways.

Every code maps to its width in bits, its kind (bool, unsigned, signed, float, complex),
the NumPy / ml_dtypes type that holds one logical element, and its rank in the reference
writer's ordering (widest first). Every list of codes in the package is derived from this
table (:data:`FLOAT_CODES`, :data:`F6_CODES`, the header scan's lookup table); the header
parser, the reader, the writer, the JAX output and the CLI all ask it.

Packed sub-byte codes (``F4``, ``F6_E2M3``, ``F6_E3M2``) store several logical elements per
byte; see :mod:`safecodec._packed` for the bit order.
"""

from __future__ import annotations

import sys
from typing import Any, Final

import numpy as np

from ._errors import DtypeError

__all__ = ["CODES", "DTYPES", "DTYPE_ALIASES", "F6_CODES", "FLOAT_CODES", "DType",
           "code_for_numpy", "dtype_for_code", "dtype_from_text"]

#: True on little-endian hosts. The reader and writer take the byte-swapping path when it
#: is False; tests flip it to exercise that path on little-endian machines.
HOST_IS_LITTLE_ENDIAN: bool = sys.byteorder == "little"


class DType:
    """One row of the dtype table.

    Attributes:
        code: The safetensors code, e.g. ``"BF16"``.
        bits: Width of one logical element in bits (4, 6, 8, 16, 32 or 64).
        kind: ``"b"`` bool, ``"u"`` unsigned, ``"i"`` signed, ``"f"`` floating point
            (ml_dtypes' floats included), ``"c"`` complex: NumPy's letters, which NumPy
            itself does not give ml_dtypes types.
        numpy: The NumPy / ml_dtypes dtype of one unpacked element, little-endian where
            byte order applies (ml_dtypes is imported on first use, keeping
            ``import safecodec`` light).
        rank: Position in the reference writer's order (0 is written first).
        storage: The unsigned integer dtype of the same width (used to byte-swap types
            that have no non-native byte order, such as bfloat16). ``uint8`` for packed.
    """

    __slots__ = ("_numpy", "_spec", "bits", "code", "kind", "rank", "storage")

    def __init__(self, code: str, bits: int, kind: str, spec: str, rank: int,
                 storage: np.dtype) -> None:
        self.code = code
        self.bits = bits
        self.kind = kind
        self._spec = spec
        self._numpy: np.dtype | None = None
        self.rank = rank
        self.storage = storage

    @property
    def numpy(self) -> np.dtype:
        dt = self._numpy
        if dt is None:
            if self._spec.startswith("ml_dtypes."):
                import ml_dtypes

                dt = np.dtype(getattr(ml_dtypes, self._spec.partition(".")[2]))
            else:
                dt = np.dtype(self._spec)
            self._numpy = dt
        return dt

    @property
    def packed(self) -> bool:
        """True for sub-byte codes whose elements share bytes (F4, F6_*)."""
        return self.bits % 8 != 0

    @property
    def itemsize(self) -> int:
        """Bytes per element for byte-sized codes (raises for packed codes)."""
        if self.packed:
            raise DtypeError(f"dtype {self.code} is packed ({self.bits} bits per element)")
        return self.bits // 8

    def __repr__(self) -> str:
        return f"DType({self.code!r}, bits={self.bits})"

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (dtype_for_code, (self.code,))


# The reference writer's order, widest first; ties are broken by name.
_WRITE_ORDER: Final = (
    "U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
    "F8_E5M2FNUZ", "F8_E4M3FNUZ", "F8_E8M0", "F8_E4M3", "F8_E5M2", "I8", "U8",
    "F6_E3M2", "F6_E2M3", "F4", "BOOL",
)  # fmt: skip

_ROWS: Final = {
    # code: (bits, kind, element dtype: a NumPy spec or "ml_dtypes.<name>")
    "BOOL": (8, "b", "bool"),
    "U8": (8, "u", "u1"),
    "I8": (8, "i", "i1"),
    "F8_E5M2": (8, "f", "ml_dtypes.float8_e5m2"),
    "F8_E4M3": (8, "f", "ml_dtypes.float8_e4m3fn"),
    "F8_E8M0": (8, "f", "ml_dtypes.float8_e8m0fnu"),
    "F8_E4M3FNUZ": (8, "f", "ml_dtypes.float8_e4m3fnuz"),
    "F8_E5M2FNUZ": (8, "f", "ml_dtypes.float8_e5m2fnuz"),
    "I16": (16, "i", "<i2"),
    "U16": (16, "u", "<u2"),
    "F16": (16, "f", "<f2"),
    "BF16": (16, "f", "ml_dtypes.bfloat16"),
    "I32": (32, "i", "<i4"),
    "U32": (32, "u", "<u4"),
    "F32": (32, "f", "<f4"),
    "I64": (64, "i", "<i8"),
    "U64": (64, "u", "<u8"),
    "F64": (64, "f", "<f8"),
    "C64": (64, "c", "<c8"),
    "F4": (4, "f", "ml_dtypes.float4_e2m1fn"),
    "F6_E2M3": (6, "f", "ml_dtypes.float6_e2m3fn"),
    "F6_E3M2": (6, "f", "ml_dtypes.float6_e3m2fn"),
}

_STORAGE: Final[dict[int, np.dtype[Any]]] = {8: np.dtype("<u1"), 16: np.dtype("<u2"), 32: np.dtype("<u4"), 64: np.dtype("<u8")}

#: code -> DType, for every one of the 22 codes.
DTYPES: Final[dict[str, DType]] = {
    code: DType(code, bits, kind, spec, _WRITE_ORDER.index(code),
                _STORAGE.get(bits, np.dtype("<u1")))
    for code, (bits, kind, spec) in _ROWS.items()
}
#: The set of valid codes (case-sensitive).
CODES: Final[frozenset[str]] = frozenset(DTYPES)
#: The real floating-point codes (F64 down to F4): what the CLI's ``convert`` casts.
FLOAT_CODES: Final[frozenset[str]] = frozenset(c for c, row in DTYPES.items() if row.kind == "f")
#: The 6-bit codes: ml_dtypes has types for them, JAX does not.
F6_CODES: Final[frozenset[str]] = frozenset(c for c, row in DTYPES.items() if row.bits == 6)

# numpy dtype -> code, built on first use (it needs ml_dtypes).
_BY_NUMPY: dict[np.dtype, str] = {}


def _by_numpy() -> dict[np.dtype, str]:
    if not _BY_NUMPY:
        table = {}
        for code, row in DTYPES.items():
            dt = row.numpy
            table[dt] = code
            table[dt.newbyteorder("=")] = code
            if dt.byteorder != "|" and dt.kind in "biufc":
                # Big-endian input is accepted (and stored little-endian by the writer).
                table[dt.newbyteorder(">")] = code
                table[dt.newbyteorder("<")] = code
        _BY_NUMPY.update(table)
    return _BY_NUMPY


# Dtypes that have no code, with the cast we suggest in the error message.
_SUGGESTED_CASTS: Final[dict[str, str]] = {
    "complex128": "complex64 (C64), or store real and imaginary parts as two F64 tensors",
    "float128": "float64 (F64)",
    "longdouble": "float64 (F64)",
    "clongdouble": "complex64 (C64)",
    "int4": "int8 (I8)",
    "uint4": "uint8 (U8)",
    "int2": "int8 (I8)",
    "uint2": "uint8 (U8)",
    "float8_e3m4": "bfloat16 (BF16) or float8_e4m3fn (F8_E4M3)",
    "float8_e4m3": "float8_e4m3fn (F8_E4M3) or bfloat16 (BF16)",
    "float8_e4m3b11fnuz": "float8_e4m3fn (F8_E4M3) or bfloat16 (BF16)",
}


def dtype_for_code(code: str) -> DType:
    """Return the table row of ``code``; raise :class:`DtypeError` for an unknown code."""
    try:
        return DTYPES[code]
    except (KeyError, TypeError):
        raise DtypeError(
            f"unknown dtype code {code!r}; valid codes are {', '.join(sorted(CODES))}"
        ) from None


#: Spellings of dtypes in text (command-line options...), lowercase, besides the codes
#: themselves and the NumPy / ml_dtypes names: the usual short forms of ML code. Where a
#: spelling means different things to different libraries it is left out (``float`` is
#: float32 in PyTorch and float64 in NumPy; ``fp8`` has two common formats).
DTYPE_ALIASES: Final[dict[str, str]] = {
    "bf16": "BF16", "bfloat16": "BF16",
    "fp16": "F16", "f16": "F16", "half": "F16", "float16": "F16",
    "fp32": "F32", "f32": "F32", "single": "F32", "float32": "F32",
    "fp64": "F64", "f64": "F64", "double": "F64", "float64": "F64",
    "fp8_e4m3": "F8_E4M3", "f8_e4m3": "F8_E4M3", "e4m3": "F8_E4M3",
    "fp8_e5m2": "F8_E5M2", "f8_e5m2": "F8_E5M2", "e5m2": "F8_E5M2",
    "fp4": "F4",
    "bool": "BOOL",
    "int8": "I8", "i8": "I8", "uint8": "U8", "u8": "U8",
    "int16": "I16", "i16": "I16", "uint16": "U16", "u16": "U16",
    "int32": "I32", "i32": "I32", "uint32": "U32", "u32": "U32",
    "int64": "I64", "i64": "I64", "uint64": "U64", "u64": "U64",
    "complex64": "C64", "c64": "C64",
}  # fmt: skip


def dtype_from_text(text: str) -> DType:
    """The table row that ``text`` names, case-insensitively: a code (``BF16``, ``bf16``),
    a usual alias (``fp16``, ``f32``, ``half``...; :data:`DTYPE_ALIASES`) or a NumPy /
    ml_dtypes name (``float8_e4m3fn``). Every place that reads a dtype from a string asks
    this function.

    Raises:
        DtypeError: ``text`` names no dtype, or one that has no safetensors code.

    Examples:
        >>> dtype_from_text("fp16").code, dtype_from_text("Bfloat16").code
        ('F16', 'BF16')
    """
    if not isinstance(text, str):
        raise DtypeError(f"a dtype name must be a string, got {type(text).__name__}")
    key = text.strip()
    code = key.upper() if key.upper() in DTYPES else DTYPE_ALIASES.get(key.lower())
    if code is not None:
        return DTYPES[code]
    try:
        dt = np.dtype(key.lower())
    except (TypeError, ValueError):
        import ml_dtypes

        attr = getattr(ml_dtypes, key.lower(), None)
        if attr is None:
            raise DtypeError(
                f"unknown dtype {text!r}; use a code such as BF16, an alias such as bf16, "
                "fp16 or fp32, or a name such as bfloat16"
            ) from None
        dt = np.dtype(attr)
    code = _by_numpy().get(dt)
    if code is None:
        raise DtypeError(f"dtype {text!r} has no safetensors code (NumPy: {dt.name})")
    return DTYPES[code]


def code_for_numpy(dtype: np.dtype, name: str = "") -> str:
    """Return the safetensors code for a NumPy dtype, or raise a :class:`DtypeError`
    that names the tensor, its dtype and the cast to use."""
    code = _by_numpy().get(dtype)
    if code is not None:
        return code
    label = getattr(dtype, "name", str(dtype))
    if label in _SUGGESTED_CASTS:
        hint = f"cast it to {_SUGGESTED_CASTS[label]}"
    elif dtype.kind in "OSUVMm" or dtype.fields is not None:
        hint = "convert it to a numeric array first"
    else:
        hint = "cast it to a supported numeric dtype"
    raise DtypeError(
        f"tensor {name!r} has dtype {label}, which has no safetensors code; {hint}"
    )


def as_memoryview(arr: np.ndarray) -> memoryview:
    """``memoryview(arr)``, typed: NumPy's stubs declare ``ndarray.__buffer__`` only for
    Python >= 3.12, so type checkers targeting 3.11 reject the plain call. Every
    ``memoryview`` of an array in the package goes through here."""
    return memoryview(arr)  # type: ignore[arg-type]  # ndarray is a buffer; stubs say so only on 3.12+


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first frame outside the
    safecodec package (the user's call), however deep inside safecodec it is raised."""
    import sys

    package = __name__.rpartition(".")[0] + "."
    frame = sys._getframe(1)  # the function that will call warnings.warn
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(package):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level
