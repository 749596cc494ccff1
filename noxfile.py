"""Developer sessions: ``nox -s tests`` (Python 3.11 and 3.13, pinned by ``constraints/``),
``tests-latest`` (the newest releases), ``constraints`` (rewrite the pins), lint, typecheck,
docs, bench.

Every session forwards ``session.posargs``; dependencies are declared once, in
pyproject.toml's extras.

Interpreters: each of ``PYTHONS`` is looked up on ``PATH`` first, then in pyenv's
``versions/`` folders (``$PYENV_ROOT``, ``~/.pyenv``, ``/root/.pyenv``), which are added to
``PATH`` so that nox finds them too, pyenv shell or not. What was found is printed when the
noxfile loads, and after a ``tests`` run which interpreters it ran on and which it skipped.
A missing interpreter skips its session, except when ``CI`` is set: then it is an error.
"""

from __future__ import annotations

import atexit
import glob
import logging
import os
import shutil
import subprocess
import sys

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"
# The suite runs on the interpreters of this machine; never download one behind the user's back.
nox.options.download_python = "never"
# nox's own default since 2024 (an error when CI is in the environment), spelled out.
ON_CI = "CI" in os.environ
if ON_CI:
    nox.options.error_on_missing_interpreters = True

PYTHONS = ["3.11", "3.13"]
TEST_EXTRAS = "test,jax,frameworks,orbax,remote,progress,docs,bench"
# The versions the suite was last verified with, one file per interpreter (``nox -s tests``
# installs them; ``nox -s tests-latest`` ignores them; ``nox -s constraints`` rewrites them).
CONSTRAINTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "constraints")


class _QuietUvProbe(logging.Filter):
    """nox logs "uv binary not found." whenever it probes for uv; this project uses venv."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "uv binary not found."


logging.getLogger("nox").addFilter(_QuietUvProbe())


def _works(executable: str, version: str) -> bool:
    """Whether ``executable`` runs and is Python ``version`` (a pyenv shim for a version
    that is installed but not selected exists on PATH yet fails)."""
    try:
        out = subprocess.run([executable, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip() == version


def _pyenv_dirs(version: str) -> list[str]:
    """``versions/<version>*/bin`` folders of every pyenv root, newest patch release first."""
    roots = [os.environ.get("PYENV_ROOT", ""), os.path.expanduser("~/.pyenv"), "/root/.pyenv"]
    found: list[str] = []
    for root in dict.fromkeys(r for r in roots if r):
        found += sorted(glob.glob(os.path.join(root, "versions", f"{version}*", "bin")),
                        key=lambda d: [int(p) if p.isdigit() else -1
                                       for p in os.path.basename(os.path.dirname(d)).split(".")],
                        reverse=True)
    return found


def _find_interpreters() -> dict[str, str | None]:
    """``{version: executable or None}``; pyenv folders that supply one are appended to PATH."""
    found: dict[str, str | None] = {}
    for version in PYTHONS:
        found[version] = None
        on_path = shutil.which(f"python{version}")
        if on_path is not None and _works(on_path, version):
            found[version] = on_path
            continue
        for directory in _pyenv_dirs(version):
            candidate = os.path.join(directory, f"python{version}")
            if os.path.isfile(candidate) and _works(candidate, version):
                os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + directory
                found[version] = candidate
                break
    return found


INTERPRETERS = _find_interpreters()
_MISSING = [v for v, exe in INTERPRETERS.items() if exe is None]
# session name ("tests", "tests-latest") -> {python version: passed}
_RESULTS: dict[str, dict[str, bool]] = {}


def _say(line: str) -> None:
    print(f"nox > {line}", file=sys.stderr, flush=True)


_say("interpreters: " + "; ".join(
    f"Python {v}: {exe}" if exe else f"Python {v}: NOT FOUND (PATH, pyenv versions/{v}*)"
    for v, exe in INTERPRETERS.items()))


def _report_tests() -> None:
    """After a run that included ``tests`` or ``tests-latest``: on which interpreters each
    passed, failed or was skipped (nox's own last line only says that sessions ran)."""
    for name, results in _RESULTS.items():
        parts = []
        passed = [v for v, ok in results.items() if ok]
        failed = [v for v, ok in results.items() if not ok]
        if passed:
            parts.append("passed on Python " + " and ".join(passed))
        if failed:
            parts.append("FAILED on Python " + " and ".join(failed))
        if _MISSING:
            what = "FAILED (CI is set: a missing interpreter is an error)" if ON_CI else "SKIPPED"
            parts.append(f"{what} on Python {' and '.join(_MISSING)}: not found (install it, "
                         f"e.g. `pyenv install {_MISSING[0]}`)")
        _say(f"{name}: " + "; ".join(parts))


atexit.register(_report_tests)


def _install(session: nox.Session, *args: str, what: str) -> None:
    """``session.install`` with a line first: pip says nothing while it works."""
    session.log(f"pip install {' '.join(args)}: {what}; quiet for a few minutes on a first "
                "run, quick when the environment is reused")
    session.install(*args)


def _constraints_file(session: nox.Session) -> str:
    return os.path.join(CONSTRAINTS, f"py{session.python}.txt")


def _run_suite(session: nox.Session, name: str, *install: str) -> None:
    """Install ``install``, then import-linter and pytest; the outcome is recorded for the
    closing line (a failing command raises out of here before ``True`` is stored)."""
    results = _RESULTS.setdefault(name, {})
    results[str(session.python)] = False
    _install(session, *install,
             what="safecodec with jax, flax, haiku, objax, equinox, orbax, s3fs, moto, mkdocs, "
             "the reference safetensors wheel, import-linter and pytest")
    session.run("lint-imports")
    session.run("python", "-m", "pytest", *session.posargs)
    results[str(session.python)] = True


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Check the import layers (import-linter, configured in pyproject.toml), then run the
    full test suite (pass pytest arguments after ``--``) against the dependency versions the
    suite was last verified with (``constraints/py<version>.txt``)."""
    _run_suite(session, "tests", "-c", _constraints_file(session), f".[{TEST_EXTRAS}]")


@nox.session(python=PYTHONS, name="tests-latest")
def tests_latest(session: nox.Session) -> None:
    """The same suite against the newest release of every dependency (no constraints): an
    upstream change that breaks us shows up here, by name, before it reaches ``tests``."""
    _run_suite(session, "tests-latest", "--upgrade", "--upgrade-strategy", "eager",
               f".[{TEST_EXTRAS}]")


@nox.session(python=PYTHONS)
def constraints(session: nox.Session) -> None:
    """Rewrite ``constraints/py<version>.txt`` from the newest releases (a deliberate update:
    run ``nox -s tests`` afterwards and commit the files only if it passes)."""
    _install(session, "--upgrade", "--upgrade-strategy", "eager", f".[{TEST_EXTRAS}]",
             what="the newest releases of every dependency")
    frozen = session.run("python", "-m", "pip", "freeze", "--exclude", "safecodec",
                         silent=True, log=False)
    assert isinstance(frozen, str)
    os.makedirs(CONSTRAINTS, exist_ok=True)
    with open(_constraints_file(session), "w", encoding="utf-8") as out:
        out.write(f"# The versions `nox -s tests` installs on Python {session.python}: the ones "
                  "the suite was last verified with.\n# Rewritten deliberately by `nox -s "
                  "constraints` (then `nox -s tests`, then commit): README, Development.\n")
        out.write("".join(line + "\n" for line in frozen.splitlines()
                          if line and not line.startswith(("-e ", "#"))))
    session.log(f"wrote {_constraints_file(session)}")


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting checks."""
    _install(session, "ruff", what="ruff")
    session.run("ruff", "check", "safecodec", "tests", "benchmarks", "noxfile.py", *session.posargs)


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package."""
    _install(session, ".[jax]", "mypy", what="safecodec with jax, and mypy")
    session.run("mypy", *session.posargs)


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """Build the documentation site into ``site/`` with ``mkdocs build --strict``."""
    _install(session, ".[docs,jax,frameworks,orbax]",
             what="safecodec with mkdocs-material, mkdocstrings, jax, the frameworks and orbax")
    # Material's end-of-life banner for mkdocs 2 is printed unless this is set
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})
    session.log("site written to site/: view it with `.nox/docs/bin/mkdocs serve` "
                "(http://127.0.0.1:8000, rebuilds on save)")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Run the side-by-side benchmark suite and write benchmarks/results/."""
    _install(session, ".[bench,jax,frameworks]",
             what="safecodec with the reference safetensors wheel, matplotlib, jax and the "
             "frameworks")
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session(python="3.11")
def fuzz(session: nox.Session) -> None:
    """Coverage-guided fuzzing with atheris (see tests/fuzz/)."""
    _install(session, ".[test]", "atheris", what="safecodec with pytest, hypothesis, atheris")
    session.run("python", "tests/fuzz/fuzz_reader.py", *session.posargs)
