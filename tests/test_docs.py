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


def test_mkdocs_build_strict(tmp_path) -> None:
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("mkdocs / mkdocstrings not installed (the docs extra)")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("safecodec.load_file", "safecodec.safe_open", "safecodec.jax.load_file"):
        assert name in api
    assert (tmp_path / "site" / "guides" / "zero-copy" / "index.html").is_file()
