"""NumPy front end: a drop-in for ``safetensors.numpy`` (same four verbs, same arguments).

Examples:
    >>> import numpy as np
    >>> from safecodec.numpy import save, load
    >>> load(save({"x": np.arange(3, dtype=np.int32)}))["x"].tolist()
    [0, 1, 2]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from . import _api

__all__ = ["load", "load_file", "safe_open", "save", "save_file"]

#: The router, re-exported as ``safetensors.numpy`` re-exports ``safe_open``.
safe_open = _api.safe_open

# Thin wrappers, so that calls written for safetensors.numpy with its keyword names
# (tensor_dict=, filename=) work unchanged; every other option is safecodec's.


def save(tensor_dict: Mapping[str, Any], metadata: Mapping[str, str] | None = None,
         **options: Any) -> bytes:
    """:func:`safecodec.save` with ``safetensors.numpy.save``'s argument names.

    Args:
        tensor_dict: name -> array.
        metadata: Optional str -> str mapping.
        **options: Keyword options of :func:`safecodec.save` (``alignment=``, ...).
    """
    return _api.save(tensor_dict, metadata, **options)


def save_file(tensor_dict: Mapping[str, Any], filename: Any,
              metadata: Mapping[str, str] | None = None, **options: Any) -> None:
    """:func:`safecodec.save_file` with ``safetensors.numpy.save_file``'s argument names.

    Args:
        tensor_dict: name -> array.
        filename: Path, PathLike or fsspec URL.
        metadata: Optional str -> str mapping.
        **options: Keyword options of :func:`safecodec.save_file`.
    """
    _api.save_file(tensor_dict, filename, metadata, **options)


def load(data: Any, **options: Any) -> dict[str, np.ndarray]:
    """:func:`safecodec.load` (bytes-like ``data``); ``**options`` are its keywords."""
    return _api.load(data, **options)


def load_file(filename: Any, *, backend: str = "mmap", **options: Any) -> dict[str, np.ndarray]:
    """:func:`safecodec.load_file` with ``safetensors.numpy.load_file``'s arguments.

    Args:
        filename: Path, PathLike, fsspec URL or binary file object.
        backend: As in the wheel: ``"mmap"`` (default: copy-on-write views of a mapping)
            or ``"pread"`` (positioned reads into private arrays, the same as
            ``copy=True``; safe against files truncated in place).
        **options: Keyword options of :func:`safecodec.load_file` (``copy=``, ``fs=``...).

    Raises:
        SafecodecError: An unknown ``backend``.
    """
    return _api.load_file(filename, backend=backend, **options)
