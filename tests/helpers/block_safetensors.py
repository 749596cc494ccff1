"""pytest plugin (``-p block_safetensors``): makes ``import safetensors`` fail.

Used to run the codec's own tests with the reference wheel unavailable, proving that
safecodec has no hidden dependency on it.
"""

from __future__ import annotations

import importlib.abc
import sys


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):  # type: ignore[no-untyped-def]
        if fullname == "safetensors" or fullname.startswith("safetensors."):
            raise ImportError(f"import of {fullname!r} is blocked for this test run")
        return None


def pytest_configure(config) -> None:  # type: ignore[no-untyped-def]
    for name in list(sys.modules):
        if name == "safetensors" or name.startswith("safetensors."):
            raise RuntimeError("safetensors was imported before the blocker was installed")
    sys.meta_path.insert(0, _Blocker())
