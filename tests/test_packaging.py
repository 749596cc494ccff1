"""Packaging promises: the wheel works on its own, imports stay light, no hidden dependency
on the reference wheel."""

from __future__ import annotations

import ast
import importlib
import json
import os
import pathlib
import subprocess
import sys
import venv

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_import_does_not_pull_jax_or_fsspec():
    code = (
        "import sys, json, safecodec, safecodec.numpy; "
        "print(json.dumps(sorted(m for m in ('jax', 'jaxlib', 'fsspec', 'safetensors', "
        "'flax', 'objax', 'haiku', 'equinox') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout) == []


def _run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return out.stdout


def test_import_loads_only_the_package_root_and_its_exceptions():
    """``import safecodec`` is as light as the wheel's import: after NumPy it loads the
    package and its exception classes, nothing else (the rest on first use)."""
    code = (
        "import sys, numpy; before = set(sys.modules); import safecodec; "
        "print(sorted(set(sys.modules) - before))"
    )
    assert _run_python(code).strip() == "['safecodec', 'safecodec._errors']"


def test_first_use_pays_for_its_route_only():
    """Reading a header loads the router, the parsers and the reader, not the tree loader,
    the remote source or JAX."""
    code = (
        "import sys, safecodec as sc; "
        "header = sc.read_header(b'\\x02\\x00\\x00\\x00\\x00\\x00\\x00\\x00{}'); "
        "print(sorted(m for m in sys.modules if m.startswith(('safecodec.', 'jax', 'fsspec'))))"
    )
    loaded = set(eval(_run_python(code)))
    assert {"safecodec._api", "safecodec._header", "safecodec._header_fast",
            "safecodec._reader"} <= loaded
    assert not loaded & {"safecodec._tree", "safecodec._safejax", "safecodec._remote",
                         "safecodec._jax_load", "jax", "fsspec"}, loaded


def test_every_public_name_resolves_and_is_listed():
    import safecodec

    for name in safecodec.__all__:
        assert getattr(safecodec, name) is not None, name
    assert set(safecodec.__all__) <= set(dir(safecodec))
    assert sorted(safecodec.__all__) == safecodec.__all__
    assert safecodec.load_tree.__module__ == "safecodec._tree"
    assert safecodec.Header.__module__ == "safecodec._header"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        safecodec.nope  # noqa: B018
    assert not hasattr(safecodec, "_private_nothing")


def test_star_import_defines_every_public_name():
    code = (
        "ns = {}; exec('from safecodec import *', ns); "
        "import safecodec; "
        "print(sorted(set(safecodec.__all__) - set(ns)), "
        "all(ns[n] is getattr(safecodec, n) for n in safecodec.__all__))"
    )
    assert _run_python(code).strip() == "[] True"


def test_lazy_table_matches_all_and_the_type_checking_block():
    """One table names the module of every lazily imported name; ``__all__`` and the
    ``TYPE_CHECKING`` imports (for type checkers and the API reference) list the same
    names, so a name added to one and forgotten in another fails here."""
    import ast

    import safecodec
    from safecodec import _errors

    tree = ast.parse((ROOT / "safecodec" / "__init__.py").read_text(encoding="utf-8"))
    checked: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.level == 1
                for alias in imp.names:  # "from . import sub" names a public submodule
                    checked[alias.name] = imp.module or alias.name
    lazy = safecodec._LAZY
    assert checked == lazy
    exceptions = {n for n in _errors.__all__
                  if isinstance(getattr(_errors, n), type)
                  and issubclass(getattr(_errors, n), Exception)}
    assert set(safecodec.__all__) == set(lazy) | exceptions
    for name, module in lazy.items():
        target = importlib.import_module(f"safecodec.{module}")
        assert name == module or hasattr(target, name), (name, module)


def test_codec_tests_pass_with_safetensors_blocked():
    """Re-run the codec's own tests in a subprocess where ``import safetensors`` fails."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests" / "helpers"))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "block_safetensors", "-p", "no:cacheprovider",
         "tests/test_reader.py", "tests/test_writer.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout


def test_blocker_really_blocks():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests" / "helpers"))
    code = (
        "import block_safetensors, sys\n"
        "block_safetensors.pytest_configure(None)\n"
        "try:\n    import safetensors\nexcept ImportError as e:\n    print('blocked', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.startswith("blocked"), out.stderr


_SMOKE = (
    "import numpy as np, safecodec, pathlib, subprocess, sys\n"
    "assert 'site-packages' in safecodec.__file__, safecodec.__file__\n"
    "p = pathlib.Path('w.safetensors')\n"
    "safecodec.save_file({'w': np.arange(6.0).reshape(2, 3)}, p, {'a': 'b'})\n"
    "t = safecodec.load_file(p)\n"
    "assert t['w'].tolist() == [[0, 1, 2], [3, 4, 5]]\n"
    "assert safecodec.read_header(p).metadata == {'a': 'b'}\n"
    "import importlib.resources as r\n"
    "assert r.files('safecodec').joinpath('py.typed').is_file()\n"
    "cli = subprocess.run([pathlib.Path(sys.executable).parent / 'safecodec', 'verify', str(p)],\n"
    "                     capture_output=True, text=True)\n"
    "assert cli.returncode == 0 and cli.stdout.startswith('OK   w.safetensors: 1 tensor'), cli\n"
    "print('ok', safecodec.__version__)\n"
)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """``python -m build``, as README's Install says: a source archive, then a wheel built
    from it."""
    pytest.importorskip("build", reason="the 'build' package (test extra) is needed")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_built_package_installs_into_a_clean_environment(dist, tmp_path, kind):
    """Install the wheel, or the source archive (pip builds it again), not editable, into a
    fresh venv; round-trip a file and run the command it installs."""
    pattern = "safecodec-*.whl" if kind == "wheel" else "safecodec-*.tar.gz"
    found = list(dist.glob(pattern))
    assert len(found) == 1, sorted(p.name for p in dist.iterdir())
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=True, clear=True)
    python = env_dir / ("Scripts" if os.name == "nt" else "bin") / "python"
    # The clean environment sees only what it installed (not a PYTHONPATH pointing at the tree).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(found[0])], check=True,
                   timeout=900, env=env)
    out = subprocess.run([str(python), "-c", _SMOKE], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok 0.")


#: Function-local imports of one of our modules by another: none. A module that must not
#: pay for a dependency until it is used declares it deferred, at its top level
#: (:mod:`safecodec._lazy`); :func:`_deferred_edges` reads those declarations.
FUNCTION_LOCAL_IMPORTS: set[tuple[str, str]] = set()


def _module_sources() -> dict[str, str]:
    """Module name -> source text for every module of the package."""
    return {("safecodec" if p.stem == "__init__" else f"safecodec.{p.stem}"):
            p.read_text(encoding="utf-8") for p in (ROOT / "safecodec").glob("*.py")}


def _layers() -> dict[str, int]:
    """Module -> its layer in pyproject.toml's import-linter contract (0: the top)."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (contract,) = [c for c in config["tool"]["importlinter"]["contracts"]
                   if c["type"] == "layers"]
    out: dict[str, int] = {}
    for depth, layer in enumerate(contract["layers"]):
        for module in layer.replace("|", ":").split(":"):
            out[module.strip()] = depth
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return getattr(test, "id", None) == "TYPE_CHECKING"


def _deferred_edges(sources: dict[str, str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Every deferred dependency declared in ``sources`` (module name -> text), as
    (importer, deferred module) edges, and what is wrong with any declaration: each must
    be ``NAME = deferred("safecodec.NAME")`` at the module's top level, in the ``else`` of
    an ``if TYPE_CHECKING:`` whose body imports the same module under the same name (what
    type checkers and import-linter see)."""
    edges: list[tuple[str, str]] = []
    problems: list[str] = []
    for name, text in sorted(sources.items()):
        tree = ast.parse(text)
        declared: set[int] = set()
        for block in tree.body:
            if not (isinstance(block, ast.If) and _is_type_checking(block.test)):
                continue
            typed = {alias.asname or alias.name for imp in block.body
                     if isinstance(imp, ast.ImportFrom) and imp.level == 1 and not imp.module
                     for alias in imp.names}
            for stmt in block.orelse:
                call = getattr(stmt, "value", None)
                if not (isinstance(stmt, ast.Assign) and isinstance(call, ast.Call)
                        and getattr(call.func, "id", None) == "deferred"):
                    continue
                declared.add(id(call))
                (target,) = stmt.targets
                arg = call.args[0] if call.args else None
                module = arg.value if isinstance(arg, ast.Constant) else None
                bound = getattr(target, "id", None)
                if (not isinstance(module, str) or module not in sources
                        or module.rpartition(".")[2] != bound):
                    problems.append(f"{name}: {ast.unparse(stmt)} must bind a safecodec "
                                    "module under its own name")
                elif bound not in typed:
                    problems.append(f"{name}: {bound} = deferred(...) lacks its "
                                    f"TYPE_CHECKING import (from . import {bound})")
                else:
                    edges.append((name, module))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "deferred"
                    and id(node) not in declared):
                problems.append(f"{name}: deferred(...) on line {node.lineno} is not a "
                                "top-level declaration beside its TYPE_CHECKING import")
    return edges, problems


def _upward(edges: list[tuple[str, str]], layers: dict[str, int]) -> list[str]:
    """The edges that do not point strictly down the layer contract."""
    return [f"{a} -> {b}" for a, b in edges
            if a not in layers or b not in layers or layers[a] >= layers[b]]


def test_deferred_modules_point_down_the_layers():
    """import-linter and the import-graph tool see imports; a deferred module is a
    dependency too: every declaration is well formed, points down the layer contract
    of pyproject.toml, and the JAX modules and the fsspec source are reached only so."""
    edges, problems = _deferred_edges(_module_sources())
    assert not problems
    assert not _upward(edges, _layers())
    assert {("safecodec._api", "safecodec._jax_load"), ("safecodec._api", "safecodec._jax_save"),
            ("safecodec._resolve", "safecodec._remote")} <= set(edges)


def test_deferred_declaration_checks_can_fail():
    """The checks above reject an upward declaration, a misnamed one, one without its
    TYPE_CHECKING import and one inside a function."""
    sources = {
        "safecodec._errors": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from . import _api\n"
            "else:\n    _api = deferred('safecodec._api')\n"),
        "safecodec._api": (
            "if TYPE_CHECKING:\n    from . import _reader\n"
            "else:\n    _jax = deferred('safecodec._errors')\n"
            "    _reader = deferred('safecodec._reader')\n"
            "    _errors = deferred('safecodec._errors')\n"
            "def f():\n    return deferred('safecodec._errors')\n"),
        "safecodec._reader": "",
    }
    edges, problems = _deferred_edges(sources)
    assert len(problems) == 3, problems
    assert "_jax = deferred('safecodec._errors') must bind" in problems[0]
    assert "_errors = deferred(...) lacks its TYPE_CHECKING import" in problems[1]
    assert "is not a top-level declaration" in problems[2]
    assert ("safecodec._api", "safecodec._reader") in edges
    assert _upward(edges, _layers()) == ["safecodec._errors -> safecodec._api"]


def test_deferred_module_imports_on_first_use():
    """A deferred module is not imported by its declaration, is by the first attribute
    read, and forwards later reads to the module (a replaced attribute is seen)."""
    code = (
        "import sys, safecodec._api as api, safecodec._resolve as res\n"
        "names = ('safecodec._jax_load', 'safecodec._jax_save', 'safecodec._remote', "
        "'jax', 'fsspec')\n"
        "before = [n for n in names if n in sys.modules]\n"
        "r = repr(res._remote)\n"
        "cls = res._remote.FsspecSource\n"
        "import safecodec._remote as remote\n"
        "remote.FsspecSource = 'replaced'\n"
        "print(before, r, 'safecodec._remote' in sys.modules, res._remote.FsspecSource, "
        "'safecodec._jax_load' in sys.modules)\n"
    )
    assert _run_python(code).split() == [
        "[]", "<deferred", "module", "'safecodec._remote'", "(not", "imported", "yet)>",
        "True", "replaced", "False"]


def test_deferred_refuses_a_relative_name():
    """A deferred module is named absolutely (the proxy has no package to resolve against)."""
    from safecodec._lazy import deferred

    with pytest.raises(ValueError, match=r"absolute module name, got '\._remote'"):
        deferred("._remote")


def _import_edges() -> list[tuple[str, str, bool, list[str]]]:
    """(importer, imported module, inside a function, private names taken) for every import
    of one of our modules by another, read from the source (nothing is run)."""
    import ast

    package = ROOT / "safecodec"
    names = {("safecodec" if p.stem == "__init__" else f"safecodec.{p.stem}"): p
             for p in package.glob("*.py")}
    edges = []
    for name, path in names.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        local = {id(node) for fn in ast.walk(tree)
                 if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
                 for node in ast.walk(fn)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in names:
                        edges.append((name, alias.name, id(node) in local, []))
            elif isinstance(node, ast.ImportFrom):
                base = "safecodec" if node.level else ""
                module = ".".join(filter(None, [base, node.module or ""]))
                for alias in node.names:
                    if f"{module}.{alias.name}" in names:  # from . import _x
                        edges.append((name, f"{module}.{alias.name}", id(node) in local, []))
                    elif module in names:
                        private = [alias.name] if (alias.name.startswith("_")
                                                   and not alias.name.startswith("__")) else []
                        edges.append((name, module, id(node) in local, private))
    return edges


def test_import_structure():
    """No import cycle (function-local imports and deferred modules included), no private
    name taken from another module, and no function-local import of our own modules
    (import-linter checks the layers themselves: `lint-imports`)."""
    edges = _import_edges()
    assert len(edges) > 100  # the scan does see the imports
    private = [(a, b, p) for a, b, _, p in edges if p]
    assert not private
    local = {(a, b) for a, b, is_local, _ in edges if is_local}
    assert local == FUNCTION_LOCAL_IMPORTS == set()
    graph: dict[str, set[str]] = {}
    deferred, _ = _deferred_edges(_module_sources())
    for a, b in [(a, b) for a, b, _, _ in edges] + deferred:
        if a != b:
            graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


@pytest.mark.slow
def test_source_archive_holds_what_a_package_needs(dist):
    import tarfile

    (archive,) = dist.glob("safecodec-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("pyproject.toml", "README.md", "LICENSE", "safecodec/__init__.py",
                   "safecodec/py.typed"):
        assert needed in names, needed
