"""Haiku: parameters and state in one safetensors file.

Haiku keeps parameters (and, for stateful modules such as ``BatchNorm``, state) as
two-level dicts keyed by module name: ``{"mlp/~/linear_0": {"w": ..., "b": ...}}``.
Tensor names are those keys joined with ``.`` (``"mlp/~/linear_0.w"``), as safejax wrote
them. :func:`save` stores params and optional state together under ``params.`` and
``state.``; :func:`load` gives them back as ``jax.Array`` dicts ready for
``transformed.apply``.

Examples:
    >>> import haiku as hk, jax, numpy as np, safecodec.haiku as sch
    >>> f = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([3, 1])(x)))
    >>> params = f.init(jax.random.key(0), np.ones((1, 2), np.float32))
    >>> restored = sch.load(sch.save(params))
    >>> sorted(restored)
    ['mlp/~/linear_0', 'mlp/~/linear_1']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._errors import TreeStructureError
from ._safejax import deserialize, serialize
from ._tree import load_tree

__all__ = ["deserialize", "load", "save", "serialize"]


def save(
    params: Mapping[str, Any],
    path: Any = None,
    metadata: Mapping[str, str] | None = None,
    *,
    state: Mapping[str, Any] | None = None,
    fs: Any = None,
) -> Any:
    """Save Haiku params, and state when given (as ``{"params": ..., "state": ...}``).

    Returns:
        The bytes when ``path`` is None, else ``path``.
    """
    tree: Any = params if state is None else {"params": params, "state": state}
    return serialize(tree, metadata, filename=path, fs=fs)


def load(source: Any, *, with_state: bool = False, fs: Any = None) -> Any:
    """Load params (or ``(params, state)`` with ``with_state=True``) as jax.Array dicts.

    Raises:
        TreeStructureError: ``with_state=True`` but the file was saved without state.
    """
    tree = load_tree(source, framework="jax", fs=fs)
    if not with_state:
        return tree
    if not (isinstance(tree, dict) and set(tree) == {"params", "state"}):
        keys = sorted(map(str, tree)) if isinstance(tree, dict) else type(tree).__name__
        raise TreeStructureError(
            f"with_state=True needs a file saved with state= (top-level keys 'params' and "
            f"'state'); this file's top level is {keys}"
        )
    return tree["params"], tree["state"]
