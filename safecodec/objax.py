"""Objax: ``VarCollection`` in and out of safetensors files, variable types restored.

An Objax ``VarCollection`` (``model.vars()``) maps names such as
``"(Sequential)[0](Linear).w"`` to variables (``TrainVar``, ``StateVar``,
``RandomState``...). :func:`save` stores one tensor per variable, named by its key, and
records each variable's type; :func:`load` rebuilds a ``VarCollection`` with the same
keys, in the same order, each variable of its saved type. :func:`load_into` assigns the
file's values to the variables of an existing model instead (that is the one function
here that changes its argument, on purpose).

Types are rebuilt from a fixed table (:data:`REBUILDABLE`), never by importing a name
read from a file. A ``TrainRef`` (an optimizer's reference to a model's ``TrainVar``)
cannot be rebuilt alone: build the optimizer from the loaded model instead.

Files from safejax (``serialize(..., include_objax_variables=True)``, names ending in
``::TrainVar``) load too.

Examples:
    >>> import objax, safecodec.objax as sco
    >>> model = objax.nn.Linear(2, 3)
    >>> data = sco.save(model.vars())
    >>> restored = sco.load(data)
    >>> [type(v).__name__ for v in restored.values()]
    ['TrainVar', 'TrainVar']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._errors import TreeStructureError
from ._objax_vars import REBUILDABLE, rebuild_variable, to_var_collection
from ._safejax import deserialize as _deserialize
from ._safejax import load_var_collection
from ._safejax import serialize as _serialize
from ._tree import load_leaves

__all__ = [
    "REBUILDABLE",
    "deserialize",
    "deserialize_with_assignment",
    "load",
    "load_into",
    "rebuild_variable",
    "save",
    "serialize",
    "to_var_collection",
]


def _as_vars(obj: Any) -> Mapping[str, Any]:
    """A VarCollection from a VarCollection or an Objax Module."""
    if hasattr(obj, "vars") and callable(obj.vars):
        return obj.vars()  # type: ignore[no-any-return]
    return obj  # type: ignore[no-any-return]


def save(
    variables: Any,
    path: Any = None,
    metadata: Mapping[str, str] | None = None,
    *,
    fs: Any = None,
) -> Any:
    """Save an Objax ``VarCollection`` (or a Module's ``.vars()``); types are recorded.

    Returns:
        The bytes when ``path`` is None, else ``path``.
    """
    return _serialize(_as_vars(variables), metadata, include_objax_variables=False,
                      filename=path, fs=fs)


def load(source: Any, *, fs: Any = None) -> Any:
    """Load a ``VarCollection`` with keys in saved order and variable types restored.

    Raises:
        TreeStructureError: A variable type cannot be rebuilt (TrainRef...).
    """
    return load_var_collection(source, fs)[0]


def load_into(target: Any, source: Any, *, fs: Any = None) -> Any:
    """Assign the file's values to the variables of an existing model / VarCollection.

    Every key of ``target``'s variables must be in the file with the same shape and
    dtype, and the file may hold nothing else; all problems are reported at once.

    Returns:
        ``target``, whose variables now hold the loaded values (jax arrays).

    Raises:
        TreeStructureError: Missing, unexpected or mismatched variables.
    """
    variables = _as_vars(target)
    items, _ = load_leaves(source, fs=fs)
    loaded = {key: value for key, value, _ in items}
    problems: list[str] = []
    # A VarCollection iterates over its variables, not its keys: .keys() is needed.
    missing = [k for k in variables.keys() if k not in loaded]  # noqa: SIM118
    unexpected = [k for k in loaded if k not in variables.keys()]  # noqa: SIM118
    for key, var in variables.items():
        if key in loaded:
            new = loaded[key]
            old = var.value
            if tuple(new.shape) != tuple(old.shape) or new.dtype != old.dtype:
                problems.append(f"{key!r}: model {old.dtype}{list(old.shape)}, "
                                f"file {new.dtype}{list(new.shape)}")
    if missing or unexpected or problems:
        lines = [f"the file does not match the model's variables: {len(missing)} missing, "
                 f"{len(unexpected)} unexpected, {len(problems)} mismatched"]
        lines += [f"  missing from the file: {k!r}" for k in missing]
        lines += [f"  in the file but not in the model: {k!r}" for k in unexpected]
        lines += [f"  mismatched (model vs file): {p}" for p in problems]
        raise TreeStructureError("\n".join(lines))
    for key, var in variables.items():
        if type(var).__name__ == "TrainRef":
            continue  # assigned through the TrainVar it refers to
        # Shapes and dtypes were checked above; objax's own check breaks on new jax.
        var.assign(loaded[key], check=False)
    return target


def serialize(params: Any, metadata: Mapping[str, str] | None = None, filename: Any = None,
              fs: Any = None) -> Any:
    """safejax's ``safejax.objax.serialize``: variable types in names (``::TrainVar``)."""
    return _serialize(_as_vars(params), metadata, include_objax_variables=True,
                      filename=filename, fs=fs)


def deserialize(path_or_buf: Any, fs: Any = None) -> Any:
    """safejax's ``safejax.objax.deserialize``: a ``VarCollection``, types restored
    (``(vars, metadata)`` for a path source whose file has user metadata)."""
    return _deserialize(path_or_buf, fs=fs, requires_unflattening=False, to_var_collection=True)


def deserialize_with_assignment(filename: Any, model_vars: Any) -> None:
    """safejax's ``safejax.objax.deserialize_with_assignment``: assign the variables
    stored in ``filename`` to ``model_vars`` (a ``VarCollection``, e.g. ``model.vars()``,
    or the Module itself) in place, so the model computes with them.

    Stricter than safejax, on purpose: every variable of ``model_vars`` must be in the
    file (safejax left missing ones unchanged), and shapes and dtypes must match; all
    problems are reported in one error before anything is assigned.

    Args:
        filename: A local path, fsspec URL, or bytes (safejax accepted local paths only).
        model_vars: The variables to assign to.

    Returns:
        None, as safejax; ``model_vars`` holds the file's values.

    Raises:
        TreeStructureError: Missing, unexpected or mismatched variables (a ``ValueError``,
            as safejax raised).
    """
    load_into(model_vars, filename)
