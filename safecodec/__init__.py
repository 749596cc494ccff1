"""safecodec: a pure-Python safetensors codec with zero-copy JAX loading.

Reads and writes safetensors files without the Rust wheel: a strict header parser, a
memory-mapped reader that hands out views, a streaming atomic writer, and outputs for
NumPy, JAX and the JAX frameworks. ``import safecodec`` imports NumPy and the standard
library only; ml_dtypes, JAX and fsspec are imported when first needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._api import load, load_file, read_header, safe_open, save, save_file, verify_file
from ._errors import (
    ChecksumError,
    ClosedHandleError,
    DtypeError,
    HeaderError,
    OffsetError,
    RemoteIOError,
    SafecodecError,
    SliceIndexError,
    TensorNotFoundError,
    TreeStructureError,
)
from ._header import Header, TensorInfo
from ._reader import SafeOpen, TensorSlice
from ._sharded import ShardedSafeOpen
from ._threads import get_threads, set_threads
from ._version import __version__

if TYPE_CHECKING:  # imported on first use (see __getattr__); named here for tools
    from . import remap
    from ._safejax import deserialize, serialize
    from ._tree import load_tree, save_tree

__all__ = [
    "ChecksumError",
    "ClosedHandleError",
    "DtypeError",
    "Header",
    "HeaderError",
    "OffsetError",
    "RemoteIOError",
    "SafeOpen",
    "SafecodecError",
    "ShardedSafeOpen",
    "SliceIndexError",
    "TensorInfo",
    "TensorNotFoundError",
    "TensorSlice",
    "TreeStructureError",
    "__version__",
    "deserialize",
    "get_threads",
    "load",
    "load_file",
    "load_tree",
    "read_header",
    "remap",
    "safe_open",
    "save",
    "save_file",
    "save_tree",
    "serialize",
    "set_threads",
    "verify_file",
]

# Heavier entry points live in modules that import jax (or flax, objax...) lazily.
_LAZY = {
    "save_tree": "._tree",
    "load_tree": "._tree",
    "serialize": "._safejax",
    "deserialize": "._safejax",
    "remap": ".remap",  # a submodule: `from safecodec import remap as R`
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'safecodec' has no attribute {name!r}")
    import importlib

    mod = importlib.import_module(module, __name__)
    value = mod if module == f".{name}" else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
