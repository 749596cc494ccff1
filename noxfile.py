"""Developer sessions: ``nox -s tests`` (Python 3.11 and 3.13), lint, typecheck, docs, bench.

Every session forwards ``session.posargs``; dependencies are declared once, in
pyproject.toml's extras.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"

PYTHONS = ["3.11", "3.13"]
TEST_EXTRAS = "test,jax,frameworks,orbax,remote,progress,docs,bench"


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the full test suite (pass pytest arguments after ``--``)."""
    session.install(f".[{TEST_EXTRAS}]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting checks."""
    session.install("ruff")
    session.run("ruff", "check", "safecodec", "tests", "benchmarks", "noxfile.py", *session.posargs)


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package."""
    session.install(".[jax]", "mypy")
    session.run("mypy", *session.posargs)


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """Build the documentation site with ``mkdocs build --strict``."""
    session.install(".[docs,jax,frameworks,orbax]")
    session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Run the side-by-side benchmark suite and write benchmarks/results/."""
    session.install(".[bench,jax,frameworks]")
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session(python="3.11")
def fuzz(session: nox.Session) -> None:
    """Coverage-guided fuzzing with atheris (see tests/fuzz/)."""
    session.install(".[test]", "atheris")
    session.run("python", "tests/fuzz/fuzz_reader.py", *session.posargs)
