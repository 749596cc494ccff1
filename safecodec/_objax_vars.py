"""Objax variables rebuilt from stored values, from a fixed table of types.

A saved tree records each Objax variable's type *name* (``TrainVar``, ``StateVar``...).
Loading turns a name back into a class through :data:`REBUILDABLE` only, never by
importing a name read from a file. Both the tree loader (templates holding Objax
variables) and :mod:`safecodec.objax` use this module; it imports objax and jax only
when a variable is actually built.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from ._errors import TreeStructureError

__all__ = ["REBUILDABLE", "rebuild_variable", "to_var_collection", "variable_class"]

#: Variable types that can be rebuilt from a value alone.
REBUILDABLE: Final = ("TrainVar", "StateVar", "RandomState")


def variable_class(type_name: str, where: str) -> Any:
    """The Objax class for a saved type name, from :data:`REBUILDABLE` only.

    Raises:
        TreeStructureError: ``type_name`` is a TrainRef or not rebuildable (names ``where``).
    """
    if type_name == "TrainRef":
        raise TreeStructureError(
            f"variable {where!r} is a TrainRef, a reference to a model's TrainVar, which "
            "cannot be rebuilt on its own; load the model's variables and build the "
            "optimizer from them"
        )
    if type_name not in REBUILDABLE:
        raise TreeStructureError(
            f"variable {where!r} has type {type_name!r}, which cannot be rebuilt; "
            f"rebuildable types: {', '.join(REBUILDABLE)}"
        )
    from objax import variable

    return getattr(variable, type_name)


def _make(cls: Any, value: Any, reduce: Any, type_name: str) -> Any:
    import jax.numpy as jnp

    value = value if hasattr(value, "block_until_ready") else jnp.asarray(value)
    if type_name == "RandomState":
        var = cls(0)  # a RandomState is built from a seed; then its key is replaced
        var.value = value
        return var
    return cls(value) if reduce is None else cls(value, reduce)


def rebuild_variable(template: Any, value: Any, where: str = "") -> Any:
    """A new variable of ``template``'s type (and reduce function) holding ``value``.

    Raises:
        TreeStructureError: ``template`` is a TrainRef or a type that cannot be rebuilt.
    """
    type_name = type(template).__name__
    cls = variable_class(type_name, where)
    return _make(cls, value, getattr(template, "_reduce", None), type_name)


def to_var_collection(items: Iterable[tuple[str, Any, str]]) -> Any:
    """Build a ``VarCollection`` from ``(key, value, type name)`` triples, in order.

    Raises:
        TreeStructureError: A type that cannot be rebuilt (names the variable).
    """
    from objax import VarCollection

    out = VarCollection()
    for key, value, type_name in items:
        out[key] = _make(variable_class(type_name, key), value, None, type_name)
    return out
