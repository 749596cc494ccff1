"""Flax front end: a drop-in for ``safetensors.flax`` (same four verbs, same arguments),
returning and accepting ``jax.Array`` values. The caller's dict is never modified.

Identical to :mod:`safecodec.jax`; see it for ``device=``, ``sharding=``, ``copy=``.

Examples:
    >>> import jax.numpy as jnp
    >>> from safecodec.flax import load, save
    >>> load(save({"b": jnp.ones(2)}))["b"].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

from ._flax_tree import deserialize, serialize
from .jax import load, load_file, safe_open, save, save_file

# serialize/deserialize: safejax.flax's verbs for nested variables (FrozenDict by default).
# safe_open: re-exported, as safetensors.flax does.
__all__ = ["deserialize", "load", "load_file", "safe_open", "save", "save_file", "serialize"]
