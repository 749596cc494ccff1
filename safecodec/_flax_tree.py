"""Flax linen conveniences: safejax's ``safejax.flax`` verbs, FrozenDict by default.

Kept apart from :mod:`safecodec.flax` (the drop-in for ``safetensors.flax``) until they
are merged there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._safejax import deserialize as _deserialize
from ._safejax import serialize as _serialize

__all__ = ["deserialize", "serialize"]


def serialize(params: Any, metadata: Mapping[str, str] | None = None, filename: Any = None,
              fs: Any = None) -> Any:
    """Serialize Flax variables (``{"params": ..., "batch_stats": ...}``, FrozenDict or
    dict); see :func:`safecodec.serialize`."""
    return _serialize(params, metadata, filename=filename, fs=fs)


def deserialize(path_or_buf: Any, fs: Any = None, freeze_dict: bool = True) -> Any:
    """Deserialize Flax variables, as a ``FrozenDict`` by default (safejax.flax did);
    see :func:`safecodec.deserialize` for the ``(params, metadata)`` rule."""
    return _deserialize(path_or_buf, fs=fs, freeze_dict=freeze_dict)
