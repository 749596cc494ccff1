"""mkdocs hook: embed ``benchmarks/results/`` in the benchmarks page when it exists.

``python benchmarks/run.py`` writes ``results.md`` and ``*.png`` plots there. The page
``benchmarks.md`` holds the marker :data:`MARKER`; this hook replaces it with the results
(headings moved one level down, plot links pointed at copies under ``bench-results/``) or,
when no results exist yet, with a note saying how to produce them. The site therefore
builds, strictly, with or without results.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
MARKER = "<!-- benchmark-results -->"
PREFIX = "bench-results"

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^(#{1,5}) ", re.MULTILINE)

_ABSENT = """\
!!! note "No results in this build"
    The figures are produced on the machine that builds the site: run
    `python benchmarks/run.py` (or `nox -s bench`), which writes
    `benchmarks/results/results.md` and the plots, then rebuild the documentation.
    `python benchmarks/run.py --quick` takes seconds and exercises everything.
"""


def on_files(files: Any, config: Any) -> Any:
    """Publish the benchmark plots under ``bench-results/``."""
    from mkdocs.structure.files import File

    if RESULTS.is_dir():
        for png in sorted(RESULTS.glob("*.png")):
            files.append(File.generated(config, f"{PREFIX}/{png.name}", abs_src_path=str(png)))
    return files


def _image(match: re.Match[str]) -> str:
    alt, target = match.group(1), match.group(2)
    if "/" not in target and (RESULTS / target).is_file():
        return f"![{alt}]({PREFIX}/{target})"
    return alt  # a plot that was not produced: keep its name, drop the broken link


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace the marker with the results, or with how to produce them."""
    if MARKER not in markdown:
        return markdown
    results = RESULTS / "results.md"
    if results.is_file():
        text = results.read_text(encoding="utf-8")
        text = _HEADING.sub(lambda m: "#" + m.group(1) + " ", text)
        text = _IMAGE.sub(_image, text)
    else:
        text = _ABSENT
    return markdown.replace(MARKER, text)
