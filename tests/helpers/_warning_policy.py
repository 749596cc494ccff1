"""The suite's warning policy, written once (pytest reads it through ``tests/conftest.py``;
subprocess workers and the docs runner call :func:`strict`).

Every warning is an error, except deprecation notices that a third-party package raises from
its own code (``FutureWarning``, ``DeprecationWarning``, ``PendingDeprecationWarning`` whose
warning location is a module that is not ours): orbax-checkpoint 0.12.8 naming the
``SingleDeviceSharding`` class that JAX 0.12 deprecates, must not fail our suite, while
the same name used by safecodec, a test or a benchmark still does. Python attributes a
deprecation to the caller of the deprecated API (``stacklevel=2``), so "the module that
warns" is the module whose code needs changing.

Which modules are ours is computed from the tree (the package, every test module, helper and
benchmark script), not listed by hand.
"""

from __future__ import annotations

import pathlib
import re
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[2]

#: the categories a third-party package may raise about its own or another package's API
DEPRECATIONS: tuple[type[Warning], ...] = (DeprecationWarning, PendingDeprecationWarning,
                                           FutureWarning)


def our_modules() -> list[str]:
    """Top-level module names that are this project's: ``safecodec``, the scripts' ``__main__``,
    the docs runner's ``__docs__``, and every module under tests/ and benchmarks/."""
    names = {"safecodec", "__main__", "__docs__"}
    for folder in ("tests", "tests/helpers", "tests/fuzz", "benchmarks"):
        names.update(p.stem for p in (ROOT / folder).glob("*.py"))
    return sorted(names)


def third_party_pattern() -> str:
    """A ``warnings`` module regex matching every module that is not ours."""
    ours = "|".join(re.escape(name) for name in our_modules())
    return rf"(?!({ours})(\.|$))"  # no colons: pytest splits its lines on them


def ini_lines() -> list[str]:
    """pytest ``filterwarnings`` lines, applied after (so taking precedence over) ``error``."""
    return [f"ignore::{category.__name__}:{third_party_pattern()}" for category in DEPRECATIONS]


def strict() -> None:
    """The same policy in a process that pytest does not run: errors, minus third-party
    deprecations."""
    warnings.simplefilter("error")
    for category in DEPRECATIONS:
        warnings.filterwarnings("ignore", category=category, module=third_party_pattern())
