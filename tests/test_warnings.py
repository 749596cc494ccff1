"""The suite's warning policy (tests/helpers/_warning_policy.py): third-party deprecations raised
from third-party code are ignored, ours are errors; and our code names no API that the
installed JAX deprecates (JAX warns only at the first access in a process, so an order of
tests could hide one: this check does not depend on order)."""

from __future__ import annotations

import importlib
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from _warning_policy import ROOT, our_modules, third_party_pattern

OURS = ("safecodec", "tests", "benchmarks", "docs")
#: ends a line that reaches a deprecated name only where its replacement is missing
FALLBACK = "# older JAX"


def test_pattern_splits_ours_from_theirs() -> None:
    pattern = re.compile(third_party_pattern())
    for mine in ("safecodec", "safecodec._jax_put", "test_jax", "conftest", "orbax_worker",
                 "__main__", "__docs__", "_warning_policy", "bench_jax"):
        assert not pattern.match(mine), mine
    for theirs in ("orbax.checkpoint._src.multihost.colocated_transport", "jax._src.api",
                   "flax.nnx", "safecodecs", "_pytest.python"):
        assert pattern.match(theirs), theirs
    assert "test_warnings" in our_modules()


def _run(code: str) -> subprocess.CompletedProcess[str]:
    helpers = str(ROOT / "tests" / "helpers")
    script = f"import sys; sys.path.insert(0, {helpers!r})\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)


def test_third_party_deprecation_ignored_ours_raised(tmp_path: pathlib.Path) -> None:
    (tmp_path / "thirdparty_pkg.py").write_text(
        "import warnings\n"
        "def old():\n    warnings.warn('old', DeprecationWarning, stacklevel=1)\n"
        "def calls_old():\n    old()\n")
    ok = _run(f"""
        sys.path.insert(0, {str(tmp_path)!r})
        import _warning_policy, thirdparty_pkg
        _warning_policy.strict()
        thirdparty_pkg.calls_old()            # warns from thirdparty_pkg: ignored
        import warnings
        try:
            warnings.warn('ours', DeprecationWarning)   # warns from __main__: an error
        except DeprecationWarning:
            print('raised')
        """)
    assert ok.returncode == 0 and ok.stdout.strip() == "raised", ok.stderr


def _deprecated_jax_names() -> list[str]:
    jax = pytest.importorskip("jax", reason="the JAX deprecation table needs jax")
    names = []
    for module_name in ("jax", "jax.sharding", "jax.numpy", "jax.lax", "jax.random",
                        "jax.tree_util", "jax.core", "jax.experimental", "jax.interpreters.xla",
                        "jax.dlpack", "jax.dtypes", "jax.errors", "jax.extend"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in getattr(module, "_deprecations", {}):
            names.append(f"{module_name}.{name}")
    assert jax is not None
    return names


def test_our_code_names_no_deprecated_jax_api() -> None:
    names = _deprecated_jax_names()
    found = []
    for folder in OURS:
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in (".py", ".md") or not path.is_file():
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8",
                                                         errors="replace").splitlines(), 1):
                if line.rstrip().endswith(FALLBACK):
                    continue
                found += [f"{path.relative_to(ROOT)}:{number}: {name}" for name in names
                          if re.search(re.escape(name) + r"\b", line)]
    assert not found, "deprecated JAX names used: " + "; ".join(found)
