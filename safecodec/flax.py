"""Flax front end: a drop-in for ``safetensors.flax`` (same four verbs, same arguments),
returning and accepting ``jax.Array`` values. The caller's dict is never modified.

Identical to :mod:`safecodec.jax`; see it for ``device=``, ``sharding=``, ``copy=``.

>>> import jax.numpy as jnp
>>> from safecodec.flax import load, save
>>> load(save({"b": jnp.ones(2)}))["b"].tolist()
[1.0, 1.0]
"""

from __future__ import annotations

from .jax import load, load_file, save, save_file

__all__ = ["load", "load_file", "save", "save_file"]
