"""NumPy front end: a drop-in for ``safetensors.numpy`` (same four verbs, same arguments).

>>> import numpy as np
>>> from safecodec.numpy import save, load
>>> load(save({"x": np.arange(3, dtype=np.int32)}))["x"].tolist()
[0, 1, 2]
"""

from __future__ import annotations

from ._reader import load, load_file
from ._writer import save, save_file

__all__ = ["load", "load_file", "save", "save_file"]
