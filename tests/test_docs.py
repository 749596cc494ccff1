"""The documentation site builds with ``mkdocs build --strict``, and every example in it runs.

Examples: each page's fenced ``python`` blocks run in order, in one fresh namespace per
page, with a fresh temporary directory as the working directory, in a subprocess that has
8 virtual CPU devices (for the sharding examples). Shell lines that start with
``safecodec `` in ``bash``/``console`` blocks run too, as ``python -m safecodec ...`` in the
same directory, and must exit 0 (or the status named by a trailing ``# exit status N``).

A block preceded by the line ``<!-- docs: no-run -->`` is not run (an S3 bucket, several
hosts, a long benchmark); keep those rare.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
from dataclasses import asdict, dataclass

import pytest

import _warning_policy
from _cpu_devices import cpu_device_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
NO_RUN = "<!-- docs: no-run -->"
_FENCE = re.compile(r"^```([\w+-]*)(.*)$")


@dataclass
class Block:
    lang: str
    code: str
    line: int
    run: bool


def extract_blocks(text: str) -> list[Block]:
    """Fenced code blocks at the top level of a Markdown page, in order."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    previous = ""
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"unterminated code fence at line {start + 1}")
        blocks.append(Block(match.group(1).lower(), "\n".join(body) + "\n", start + 1,
                            previous != NO_RUN))
        previous = ""
        i += 1
    return blocks


def pages() -> list[pathlib.Path]:
    return sorted(p for p in DOCS.rglob("*.md"))


_RUNNER = r'''
import builtins, json, os, shlex, subprocess, sys, traceback, warnings
spec = json.load(open(sys.argv[1]))
results = {}
for page in spec["pages"]:
    workdir = os.path.join(spec["tmp"], page["name"].replace("/", "__"))
    os.makedirs(workdir)
    os.chdir(workdir)
    namespace = {"__name__": "__docs__"}
    try:
        for block in page["blocks"]:
            where = f"{page['name']}:{block['line']}"
            if block["lang"] in ("python", "py"):
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # the suite's policy: tests/helpers/_warning_policy.py
                    for category in spec["deprecations"]:
                        warnings.filterwarnings("ignore", category=getattr(builtins, category),
                                                module=spec["third_party"])
                    exec(compile(block["code"], where, "exec"), namespace)
                continue
            for line in block["code"].splitlines():
                line = line.strip()
                if not line.startswith("safecodec "):
                    continue
                command, _, comment = line.partition("#")
                expected = 0
                if comment.strip().startswith("exit status"):
                    expected = int(comment.split()[-1])
                proc = subprocess.run([sys.executable, "-m", "safecodec", *shlex.split(command)[1:]],
                                      capture_output=True, text=True, timeout=300)
                if proc.returncode != expected:
                    raise AssertionError(f"{where}: `{line}` exited {proc.returncode}, expected "
                                         f"{expected}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        results[page["name"]] = "ok"
    except BaseException:
        results[page["name"]] = traceback.format_exc()
json.dump(results, open(spec["out"], "w"))
'''


@pytest.fixture(scope="module")
def example_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("docs-examples")
    spec = {"tmp": str(tmp / "work"), "out": str(tmp / "results.json"), "pages": [],
            "third_party": _warning_policy.third_party_pattern(),
            "deprecations": [category.__name__ for category in _warning_policy.DEPRECATIONS]}
    os.makedirs(spec["tmp"])
    for page in pages():
        blocks = [asdict(b) for b in extract_blocks(page.read_text(encoding="utf-8"))
                  if b.run and (b.lang in ("python", "py") or b.lang in ("bash", "console", "sh"))]
        if blocks:
            spec["pages"].append({"name": page.relative_to(DOCS).as_posix(), "blocks": blocks})
    (tmp / "spec.json").write_text(json.dumps(spec))
    (tmp / "runner.py").write_text(_RUNNER)
    env = cpu_device_env(8, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(tmp / "runner.py"), str(tmp / "spec.json")],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp / "results.json").read_text())


def _example_pages() -> list[str]:
    names = []
    for page in pages():
        if any(b.run and b.lang in ("python", "py") for b in extract_blocks(page.read_text(encoding="utf-8"))):
            names.append(page.relative_to(DOCS).as_posix())
    return names


@pytest.mark.parametrize("page", _example_pages())
def test_page_examples_run(page: str, example_results: dict[str, str]) -> None:
    result = example_results[page]
    assert result == "ok", f"an example in docs/{page} failed:\n{result}"


def test_the_docs_have_examples_and_few_skipped_ones() -> None:
    blocks = [b for p in pages() for b in extract_blocks(p.read_text(encoding="utf-8"))]
    python = [b for b in blocks if b.lang in ("python", "py")]
    assert len(python) >= 25
    assert sum(not b.run for b in python) <= 4
    assert {"index.md", "guides/zero-copy.md", "guides/trees.md", "cli.md"} <= set(_example_pages())


def test_extract_blocks_honours_the_no_run_marker() -> None:
    text = ("intro\n```python\nx = 1\n```\n\n" + NO_RUN + "\n\n```python\nraise SystemExit\n```\n"
            "```bash\nsafecodec inspect a\n```\n")
    blocks = extract_blocks(text)
    assert [(b.lang, b.line, b.run) for b in blocks] == [("python", 2, True), ("python", 8, False),
                                                         ("bash", 11, True)]
    with pytest.raises(ValueError, match="unterminated code fence at line 1"):
        extract_blocks("```python\nx = 1\n")


def _load_hooks() -> object:
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "_hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_results_are_embedded_when_present(tmp_path, monkeypatch) -> None:
    hooks = _load_hooks()
    page = "# Benchmarks\n\n" + hooks.MARKER + "\n"  # type: ignore[attr-defined]
    monkeypatch.setattr(hooks, "RESULTS", tmp_path / "missing")
    absent = hooks.on_page_markdown(page, page=None, config=None, files=None)  # type: ignore[attr-defined]
    assert "python benchmarks/run.py" in absent and hooks.MARKER not in absent  # type: ignore[attr-defined]

    (tmp_path / "results.md").write_text("# Results\n\n| a | b |\n|---|---|\n\nPlots: ![load](load.png), "
                                         "![gone](gone.png)\n")
    (tmp_path / "load.png").write_bytes(b"\x89PNG")
    monkeypatch.setattr(hooks, "RESULTS", tmp_path)
    present = hooks.on_page_markdown(page, page=None, config=None, files=None)  # type: ignore[attr-defined]
    assert "## Results" in present
    assert "![load](bench-results/load.png)" in present
    assert "gone.png" not in present and "gone" in present


#: Modules that make mkdocstrings format signatures when importable; the build must not
#: need them (the docs extra installs neither).
_FORMATTERS = ("black", "ruff")


@dataclass
class Site:
    root: pathlib.Path
    log: str


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """The site, built once with ``mkdocs build --strict`` as ``nox -s docs`` builds it,
    with Black and Ruff made unimportable and off ``PATH`` (as in the docs extra)."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("mkdocs / mkdocstrings not installed (the docs extra)")
    tmp = tmp_path_factory.mktemp("site")
    blocked = tmp / "blocked"
    for name in _FORMATTERS:
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError('{name} is hidden from the docs build')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(blocked)]),
               PATH=os.pathsep.join(["/usr/bin", "/bin"]),
               # Material's end-of-life banner: switched off the way it documents.
               NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return Site(tmp / "site", proc.stdout + proc.stderr)


def test_mkdocs_build_strict(site: Site) -> None:
    api = (site.root / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("safecodec.load_file", "safecodec.safe_open", "safecodec.jax.load_file"):
        assert name in api
    assert (site.root / "guides" / "zero-copy" / "index.html").is_file()


def test_docs_build_prints_nothing_but_progress(site: Site) -> None:
    """No banner, no "Formatting signatures requires either Black or Ruff", no warning:
    only mkdocs' own INFO lines."""
    lines = [line for line in site.log.splitlines() if line.strip()]
    assert lines, "mkdocs printed nothing at all"
    noise = [line for line in lines if not line.startswith("INFO")]
    assert noise == [], "\n".join(noise)
    assert "Formatting signatures" not in site.log and "end of life" not in site.log


_PRE = re.compile(r"<pre\b.*?</pre>", re.DOTALL)
_PROMPT = "&gt;&gt;&gt;"


def test_api_examples_render_as_code_blocks(site: Site) -> None:
    """Every docstring example on the API page is a highlighted code block: its ``>>>``
    prompts sit inside ``<pre><code>``, never in prose or nested blockquotes (what an
    unrecognised example section turns them into)."""
    api = (site.root / "api" / "index.html").read_text(encoding="utf-8")
    blocks = [b for b in _PRE.findall(api) if _PROMPT in b]
    assert len(blocks) >= 11, f"only {len(blocks)} example code blocks on the API page"
    assert all("<code" in b for b in blocks)
    outside = _PRE.sub("", api)
    assert "<blockquote>" not in outside
    assert _PROMPT not in outside and ">>>" not in outside
    # Each "Examples" section is followed by its code block.
    sections = re.findall(r'doc-section-title">Examples:</span></p>\s*(<div class="highlight"><pre>)?',
                          api)
    assert len(sections) >= 11 and all(sections), sections
    for name in ("safecodec.save", "safecodec.read_header", "safecodec.safe_open",
                 "safecodec.numpy", "safecodec.jax"):
        start = api.index(f'<h2 id="{name}"')
        end = api.find("<h2 id=", start + 1)
        own = api[start : end if end > 0 else len(api)]
        assert _PROMPT in "".join(_PRE.findall(own)), f"{name}: no example code block"


#: Modules whose docstrings hold the examples the API reference shows (and a few more).
DOCSTRING_MODULES = [
    "safecodec._api", "safecodec._header", "safecodec._dtypes", "safecodec._shardindex",
    "safecodec._indexing",
    "safecodec._remote", "safecodec._tree", "safecodec._tree_record", "safecodec._safejax",
    "safecodec._treepath",
    "safecodec._sharded", "safecodec.numpy", "safecodec.jax", "safecodec.flax",
    "safecodec.haiku", "safecodec.objax", "safecodec.orbax",
]


@pytest.mark.parametrize("name", DOCSTRING_MODULES)
def test_docstring_examples_run(name: str, tmp_path, monkeypatch) -> None:
    """The ``Examples:`` of the docstrings, which the API reference renders as code, are
    right: each runs as a doctest and prints what it shows."""
    import doctest
    import importlib
    import io

    module = importlib.import_module(name)
    monkeypatch.chdir(tmp_path)
    tests = [t for t in doctest.DocTestFinder().find(module, name) if t.examples]
    assert tests, f"{name} has no docstring examples"
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test, out=out.write)
    assert runner.failures == 0, out.getvalue()
