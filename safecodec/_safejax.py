"""The safejax contract: :func:`serialize` and :func:`deserialize`, same names, same
arguments, same defaults as ``safejax``, on top of :mod:`safecodec._tree`.

Differences from safejax, all on the side of losing nothing: lists, tuples, scalars,
``None`` and empty containers survive (the structure is recorded in the metadata, see
:mod:`safecodec._tree`); user metadata is kept and returned; Objax variable types are
recorded even without ``include_objax_variables``; the caller's tree is never modified.
Names stay ``.``-joined, so files interchange with
``safetensors.flax.save_file(flatten_dict(params, sep="."))`` and with safejax.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from ._api import save, save_file
from ._errors import SafecodecError
from ._objax_vars import to_var_collection
from ._tree import flatten_tree, load_leaves, load_tree

__all__ = ["deserialize", "load_var_collection", "serialize"]


def _is_objax_module(x: Any) -> bool:
    mod = sys.modules.get("objax")  # an objax Module cannot exist unless objax was imported
    return mod is not None and isinstance(x, mod.Module)


def serialize(
    params: Any,
    metadata: Mapping[str, str] | None = None,
    include_objax_variables: bool = False,
    filename: Any = None,
    fs: Any = None,
) -> bytes | Any:
    """Serialize model parameters (any pytree) to safetensors bytes or a file.

    Accepts what safejax accepted (dicts, Flax ``FrozenDict``, Haiku params, Objax
    ``VarCollection`` or ``Module``) and any other pytree. Nested keys are joined with
    ``.``; the full structure is recorded in the metadata so :func:`deserialize` restores
    it exactly.

    Args:
        params: The parameters.
        metadata: User metadata, str -> str (keys may not start with ``safecodec.``).
        include_objax_variables: Append each Objax variable's type to its name
            (``"(Linear).w::TrainVar"``), as safejax did, so safejax can read the types
            back. Types are recorded in the metadata either way.
        filename: Write here (local path, fsspec URL, or a path on ``fs``) instead of
            returning bytes.
        fs: An fsspec filesystem on which ``filename`` lies.

    Returns:
        The bytes, or ``filename`` when given.

    Raises:
        DtypeError: A leaf's dtype has no safetensors code (names its path).
        SafecodecError: Bad metadata.

    Examples:
        >>> import numpy as np, safecodec as sc
        >>> data = sc.serialize({"dense": {"kernel": np.ones((2, 2), np.float32)}})
        >>> sorted(sc.read_header(data).tensors)
        ['dense.kernel']
    """
    if _is_objax_module(params):
        params = params.vars()
    tensors, md = flatten_tree(params, metadata, objax_type_suffix=include_objax_variables)
    if filename is None:
        return save(tensors, md)
    save_file(tensors, filename, md, fs=fs)
    return filename


def _is_path(source: Any) -> bool:
    return isinstance(source, str | os.PathLike)


def deserialize(
    path_or_buf: Any,
    fs: Any = None,
    freeze_dict: bool = False,
    requires_unflattening: bool = True,
    to_var_collection: bool = False,
) -> Any:
    """Deserialize model parameters from bytes or a file, as safejax did, losslessly.

    Leaves are ``jax.Array`` (as with safejax). Files written by :func:`serialize` or
    :func:`~safecodec.save_tree` come back with their exact structure; other files are
    nested by splitting names on ``.``.

    Args:
        path_or_buf: bytes-like data, or a local path, fsspec URL, or path on ``fs``.
        fs: An fsspec filesystem on which ``path_or_buf`` lies.
        freeze_dict: Return a Flax ``FrozenDict``.
        requires_unflattening: Restore the nesting (default). False: a flat dict of
            ``.``-joined path -> array in saved order (the tensor names, without
            safejax's ``::Type`` suffix).
        to_var_collection: Return an Objax ``VarCollection``: keys in saved order (names
            without safejax's ``::Type`` suffix), each variable of its saved type
            (``TrainVar`` when the file does not say).

    Returns:
        The parameters; for a path source whose file has user metadata,
        ``(params, metadata)`` whatever the other flags (as safejax documented). From
        bytes, the parameters alone; use ``safecodec.read_header(data).metadata`` or
        ``load_tree(..., with_metadata=True)`` for their metadata.

    Raises:
        TreeStructureError: Names cannot be nested, recorded structure is inconsistent,
            or an Objax type cannot be rebuilt (TrainRef).
        DtypeError: 64-bit tensors while ``jax_enable_x64`` is off (JAX would silently
            make them 32-bit).
        SafecodecError: Not a valid safetensors file, or both ``freeze_dict`` and
            ``to_var_collection``.
    """
    if freeze_dict and to_var_collection:
        raise SafecodecError("choose one of freeze_dict=True and to_var_collection=True")
    if to_var_collection:
        params, md = load_var_collection(path_or_buf, fs)
    elif not requires_unflattening:
        items, md = load_leaves(path_or_buf, fs=fs)
        params = {name: value for name, value, _ in items}
    else:
        params, md = load_tree(path_or_buf, framework="jax", fs=fs, with_metadata=True)
    if freeze_dict:
        if not isinstance(params, dict):
            raise SafecodecError(
                f"freeze_dict=True needs a dict at the top of the tree, the file holds a "
                f"{type(params).__name__}"
            )
        from flax.core import freeze

        params = freeze(params)
    if _is_path(path_or_buf) and md:
        return params, md
    return params


def load_var_collection(source: Any, fs: Any = None) -> tuple[Any, dict[str, str] | None]:
    """An Objax ``VarCollection`` (keys and order as saved, variable types restored,
    ``TrainVar`` where the file does not say) and the user metadata.

    Raises:
        TreeStructureError: A variable type cannot be rebuilt (TrainRef...), or the
            recorded structure is inconsistent.
    """
    items, md = load_leaves(source, fs=fs)
    return to_var_collection((k, v, t or "TrainVar") for k, v, t in items), md
