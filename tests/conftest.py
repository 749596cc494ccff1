"""Shared fixtures. Heavy optional dependencies are imported inside the tests that use them."""

from __future__ import annotations

import os
import sys

import pytest

# Make the tests folder importable (helpers such as _oracle.py, block_safetensors.py).
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def restore_flags():
    """Undo changes tests make to module-level switches (mmap availability, host byte order)."""
    from safecodec import _dtypes, _source

    saved = (_source.MMAP_AVAILABLE, _dtypes.HOST_IS_LITTLE_ENDIAN)
    yield
    _source.MMAP_AVAILABLE, _dtypes.HOST_IS_LITTLE_ENDIAN = saved
