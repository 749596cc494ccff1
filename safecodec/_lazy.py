"""Deferred modules: the one way a safecodec module depends on another that it imports
only when first used.

Some dependencies are too expensive for every program to pay for: the JAX modules import
jax (about a second), the fsspec source brings a thread pool and fsspec's machinery. The
modules that reach them declare each such dependency once, at their top level, beside
their other imports::

    if TYPE_CHECKING:  # type checkers see an ordinary import
        from . import _remote
    else:
        _remote = deferred("safecodec._remote")

and use it as a module (``_remote.FsspecSource(...)``): the import happens on the first
attribute read, so only the routes that use it pay. Nowhere else does a safecodec module
import another inside a function. tests/test_packaging.py reads every ``deferred(...)``
declaration from the source and checks that it points down the layer contract of
pyproject.toml and closes no import cycle (import-linter sees the ``TYPE_CHECKING``
import; this test holds the two together).

Not :class:`importlib.util.LazyLoader`: it needs the module object created and put in
``sys.modules`` when it is declared (so "did this route load ``safecodec._remote``?" could
no longer be read from ``sys.modules``), and a spec found by hand for each module. Here the
import is an ordinary :func:`importlib.import_module`, and the proxy only forwards
attribute reads (a module attribute replaced later, as tests do, is seen).

The package root's lazy public names (``_LAZY`` and PEP 562 ``__getattr__`` in
``safecodec/__init__.py``) are another thing: names, not modules, bound in the root so
that ``dir()``, ``from safecodec import *`` and type checkers see them, by a root that
imports nothing but its exception classes (this module included).
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType
from typing import Any

__all__ = ["DeferredModule", "deferred"]


class DeferredModule:
    """A stand-in for a module that is imported on the first read of one of its attributes;
    every read after that is forwarded to the module."""

    __slots__ = ("_module", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attribute: str) -> Any:
        # Called only for names the proxy itself lacks: everything but its two slots.
        module = self._module
        if module is None:
            module = self._module = import_module(self._name)
        return getattr(module, attribute)

    def __repr__(self) -> str:
        state = "imported" if self._module is not None else "not imported yet"
        return f"<deferred module {self._name!r} ({state})>"


def deferred(name: str) -> DeferredModule:
    """A module (absolute name, e.g. ``"safecodec._remote"``) imported on first use; see
    the module docstring for the declaration it belongs in."""
    if name.startswith("."):
        raise ValueError(f"deferred() takes an absolute module name, got {name!r}")
    return DeferredModule(name)
