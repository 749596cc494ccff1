"""Paths into a tree: what the tree modules use to name a place, in messages and in files.

A path is a tuple of elements ``(kind, key)``: kind ``"k"`` a mapping key, ``"i"`` a
sequence index, ``"a"`` an attribute. Pure data: no I/O, no jax.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Path", "PathElem", "join_path", "match_key", "render_path"]

#: One step into a container: ``(kind, key)``, kind ``"k"``, ``"i"`` or ``"a"``.
PathElem = tuple[str, Any]
#: The steps from the root to a node; ``()`` is the root.
Path = tuple[PathElem, ...]


def render_path(path: Path) -> str:
    """A path as Python-like text: ``['params']['Dense_0'].kernel[0]``; ``<root>`` if empty.

    Examples:
        >>> render_path((("k", "params"), ("a", "kernel"), ("i", 0)))
        "['params'].kernel[0]"
    """
    if not path:
        return "<root>"
    return "".join(f".{key}" if kind == "a" else f"[{key!r}]" for kind, key in path)


def join_path(path: Path) -> str:
    """The tensor name of a path: keys joined with ``.`` (flax ``flatten_dict`` style).

    Examples:
        >>> join_path((("k", "params"), ("i", 0), ("a", "w")))
        'params.0.w'
    """
    return ".".join(str(key) for _, key in path)


def match_key(path: Path) -> tuple[Any, ...]:
    """A path's keys only (kinds ignored), so a template's attribute ``weight`` matches a
    saved dict key ``'weight'``. bool keys are kept apart from the int keys 0 and 1."""
    return tuple((type(k) is bool, k) for _, k in path)
