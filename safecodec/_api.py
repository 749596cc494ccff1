"""The routers: ``safe_open``, ``read_header``, ``load``, ``load_file``, ``save``,
``save_file``, ``verify_file``. (Being moved here from the reader and writer.)"""

from __future__ import annotations

from ._integrity import verify_file
from ._reader import load, load_file, read_header, safe_open
from ._writer import save, save_file

__all__ = ["load", "load_file", "read_header", "safe_open", "save", "save_file", "verify_file"]
