"""safecodec: a pure-Python safetensors codec with zero-copy JAX loading.

Reads and writes safetensors files without the Rust wheel: a strict header parser, a
memory-mapped reader that hands out views, a streaming atomic writer, and outputs for
NumPy, JAX and the JAX frameworks.

``import safecodec`` defines the public names and loads only the exception classes: every
other name is imported from its module on first use (PEP 562 ``__getattr__``), so a
program pays for the route it takes (the NumPy reader, the writer, the tree loader...)
when it first takes it. ml_dtypes, JAX and fsspec are imported only when first needed.
"""

# No ``from __future__ import annotations`` here: it is a module import of its own, and
# this file is the whole cost of ``import safecodec``.
from importlib import import_module
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:  # type checkers and the API reference see every name as if eager
    from . import remap
    from ._api import load, load_file, read_header, safe_open, save, save_file, verify_file
    from ._header import Header, TensorInfo
    from ._reader import SafeOpen, TensorSlice
    from ._safejax import deserialize, serialize
    from ._sharded import ShardedSafeOpen
    from ._threads import get_threads, set_threads
    from ._tree import load_tree, save_tree
    from ._version import __version__

#: Every public name that is imported on first use -> the module (relative to this
#: package) that defines it. A public submodule is listed under its own name
#: (``"remap": "remap"``, with ``from . import remap`` in the ``TYPE_CHECKING`` block) and
#: resolves to the module itself. Adding a name here, to ``__all__`` and to the
#: ``TYPE_CHECKING`` block is all a new public name needs (tests/test_packaging.py checks
#: that the three agree).
_LAZY: dict[str, str] = {
    "load": "_api",
    "load_file": "_api",
    "read_header": "_api",
    "safe_open": "_api",
    "save": "_api",
    "save_file": "_api",
    "verify_file": "_api",
    "Header": "_header",
    "TensorInfo": "_header",
    "SafeOpen": "_reader",
    "TensorSlice": "_reader",
    "ShardedSafeOpen": "_sharded",
    "get_threads": "_threads",
    "set_threads": "_threads",
    "save_tree": "_tree",
    "load_tree": "_tree",
    "serialize": "_safejax",
    "deserialize": "_safejax",
    "__version__": "_version",
    "remap": "remap",  # a public submodule: `from safecodec import remap as R`
}

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


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access and keep the name here (PEP 562)."""
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = import_module("." + module_name, __name__)
    value = module if module_name == name else getattr(module, name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
