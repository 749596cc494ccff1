"""Smoke tests of the main job (``python -m safecodec._bench``) and of the benchmark
suite (``benchmarks/run.py``) in their tiny modes, run as subprocesses.

They check the shape of what comes out (table, JSON, Markdown, plots), never timings.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], cwd=str(ROOT), env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _check_stats(stats: dict[str, float], repeat: int) -> None:
    assert stats["n"] == repeat
    assert 0 < stats["min"] <= stats["median"] <= stats["max"]


def _check_ratios(row: dict, repeat: int) -> None:
    """The per-run ratios: one per timed run (the warm-up is not one), bounded by min/max."""
    runs = row["ratio_runs"]
    assert len(runs) == repeat
    assert row["ratio_min"] == min(runs) and row["ratio_max"] == max(runs)
    assert all(r > 0 for r in runs)


def test_main_job_tiny_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    files = tmp_path / "files"
    proc = _run(["-m", "safecodec._bench", "--size", "tiny", "--repeat", "2",
                 "--dir", str(files), "--json", str(out)])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("operation"))
    assert header.split() == ["operation", "safecodec", "safetensors", "safecodec", "vs",
                              "safetensors", "(spread)"]
    for op in ("save", "load", "load + read all", "lazy 1 tensor"):
        row = next(line for line in lines if line.startswith(op + "  "))
        # every ratio comes with the spread of the per-run ratios
        assert re.search(r"(faster|slower|noise).*\(runs: [0-9.]+x.* to [0-9.]+x", row), row
    assert "1 untimed warm-up run, then medians of 2 timed run(s)" in proc.stdout
    assert "every tensor read back equals the original" in proc.stdout
    # The warm-up runs first, for each operation and library, and is reported as such.
    progress = proc.stderr.splitlines()
    warm = [i for i, line in enumerate(progress) if "warm-up: " in line]
    timed = [i for i, line in enumerate(progress) if "run 1/2: " in line]
    assert len(warm) == len(timed) >= 4 and max(warm) < min(timed)

    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["size"] == "tiny"
    assert result["verified"] is True and result["problems"] == []
    assert result["tensors"] == 2 + 2 * 12 + 2
    ops = [row["operation"] for row in result["rows"]]
    assert ops[:4] == ["save", "load", "load + read all", "lazy 1 tensor"]
    assert result["warmup"] == 1 and result["repeat"] == 2
    for row in result["rows"]:
        _check_stats(row["safecodec"], 2)
        if row["safetensors"] is not None:
            _check_stats(row["safetensors"], 2)
            assert row["ratio"] == pytest.approx(
                row["safetensors"]["median"] / row["safecodec"]["median"])
            _check_ratios(row, 2)
    assert {"cpu", "cores", "python", "versions", "date"} <= set(result["machine"])
    # --dir keeps the files: the safecodec checkpoint is there and loads.
    assert (files / "model-safecodec.safetensors").is_file()


def test_main_job_without_the_reference_wheel(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    code = ("import sys; sys.modules['safetensors'] = None; "
            "from safecodec._bench import main; "
            f"raise SystemExit(main(['--size', 'tiny', '--repeat', '1', '--json', {str(out)!r}]))")
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stderr
    assert "safetensors is not installed" in proc.stdout
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["reference_available"] is False
    assert result["verified"] is True
    for row in result["rows"]:
        assert row["safetensors"] is None and row["ratio"] is None
        assert row["ratio_runs"] == [] and row["ratio_min"] is None
        _check_stats(row["safecodec"], 1)


def test_main_job_rejects_bad_arguments() -> None:
    proc = _run(["-m", "safecodec._bench", "--repeat", "0"])
    assert proc.returncode == 2
    assert "--repeat must be at least 1, got 0" in proc.stderr
    proc = _run(["-m", "safecodec._bench", "--size", "huge"])
    assert proc.returncode == 2
    assert "invalid choice: 'huge'" in proc.stderr


def test_benchmark_suite_quick(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = _run(["benchmarks/run.py", "--quick", "--out", str(out), "--import-samples", "2",
                 "--dir", str(tmp_path / "files")])
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert result["quick"] is True
    assert result["sizes"] == ["tiny"]
    assert {"cpu", "cores", "python", "versions", "date"} <= set(result["machine"])
    assert result["machine"]["versions"]["numpy"]

    sizes = {row["size"] for row in result["rows"]}
    assert sizes == {"tiny", result["small_label"]}
    for size in sizes:
        ops = {(row["operation"], row["contender"]) for row in result["rows"]
               if row["size"] == size}
        for op in ("save", "load", "load + read all", "lazy 1 tensor"):
            assert (op, "safecodec") in ops, (size, op)
        for op in ("load", "load + read all"):
            assert (op, "numpy memcpy") in ops, (size, op)
    for row in result["rows"]:
        assert len(row["samples"]) == result["repeat"] == 2
        _check_stats(row, 2)

    contenders = {row["contender"] for row in result["rows"]}
    assert "safetensors.numpy" in contenders  # the test extras install the wheel
    memory = {m["contender"]: m for m in result["memory"]}
    assert memory["safecodec"]["largest_tensor_bytes"] == 512 * 64 * 4
    for m in memory.values():
        assert m["tracemalloc_peak_bytes"] >= 0 and m["rss_peak_extra_bytes"] >= 0

    imp = result["import"]["safecodec"]
    assert imp["n"] == 2 and imp["median"] > 0
    assert imp["heavy_modules"] == []  # import safecodec pulls in neither jax nor fsspec
    wheel = result["import"]["safetensors.numpy"]  # timed alternately beside it
    assert wheel["module"] == "safetensors, safetensors.numpy" and wheel["n"] == 2

    targets = {t["target"]: t for t in result["targets"]}
    assert any(name.startswith("import safecodec <= 1.5 ms") for name in targets)
    assert any(name.startswith("import safecodec no slower than") for name in targets)
    assert all(t["met"] in (True, False, None) for t in targets.values())

    md = (out / "results.md").read_text(encoding="utf-8")
    assert md.startswith("# safecodec benchmarks")
    assert "**Quick mode**" in md
    assert "| operation | contender | median | min - max | x safecodec |" in md
    assert "| target | measured | met |" in md
    for png in result["plots"]:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert {"save.png", "load.png", "small_tensors.png"} <= set(result["plots"])
    else:  # plots are optional: the tables and JSON are written without matplotlib
        assert result["plots"] == []

    # --render-only rebuilds the Markdown from results.json without measuring anything.
    (out / "results.md").unlink()
    proc = _run(["benchmarks/run.py", "--render-only", "--no-plots", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    again = (out / "results.md").read_text(encoding="utf-8")
    assert again.split("## Plots")[0].rstrip() == md.split("## Plots")[0].rstrip()
    assert "## Plots" not in again


@pytest.mark.skipif(importlib.util.find_spec("jax") is None
                    or importlib.util.find_spec("safetensors") is None,
                    reason="needs jax and the reference wheel")
def test_jax_and_thread_benchmarks_quick(tmp_path: Path) -> None:
    out = tmp_path / "threads.json"
    proc = _run(["benchmarks/bench_threads.py", "--quick", "--repeats", "1", "--threads", "1",
                 "2", "--dir", str(tmp_path), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["thread_counts"] == [1, 2]
    for name in ("safecodec.jax t=1", "safecodec.jax t=2", "floor t=2",
                 "safecodec copy=True t=2"):
        assert result["cases"][name]["ratio_median"] > 0, name
    assert len(result["orders"]["jax"]) == 1
    out = tmp_path / "jax.json"
    proc = _run(["benchmarks/bench_jax.py", "--quick", "--repeats", "1", "--dir", str(tmp_path),
                 "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    cases = json.loads(out.read_text(encoding="utf-8"))["cases"]
    assert [c["case"] for c in cases][:2] == ["gpt2-safecodec", "gpt2-reference"]


def test_gpu_benchmark_says_when_there_is_no_gpu() -> None:
    pytest.importorskip("jax")
    proc = _run(["-c", "import jax, runpy, sys; "
                 "sys.exit(0) if any(d.platform == 'gpu' for d in jax.devices()) else None; "
                 "sys.argv = ['bench_gpu.py']; runpy.run_path('benchmarks/bench_gpu.py', "
                 "run_name='__main__')"])
    assert proc.returncode == 0, proc.stderr
    assert "no GPU" in proc.stdout or proc.stdout == ""


def test_ratio_cells_show_the_spread() -> None:
    from safecodec import _bench

    def row(ours: list[float], ref: list[float]) -> dict:
        runs = _bench.paired_ratios(ours, ref)
        return {"ratio": statistics.median(ref) / statistics.median(ours), "ratio_runs": runs,
                "ratio_min": min(runs), "ratio_max": max(runs)}

    assert _bench.paired_ratios([1.0, 2.0], [2.0, 3.0]) == [2.0, 1.5]
    assert _bench._fmt_ratio(row([1.0, 1.0, 1.0], [2.0, 1.8, 2.2])) == "2x faster (runs: 1.8x to 2.2x)"
    assert _bench._fmt_ratio(row([2.0, 2.0], [1.0, 0.5])) == "2.67x slower (runs: 2x to 4x)"
    assert _bench._fmt_ratio(row([1.0, 1.0, 1.0], [0.9, 1.0, 1.2])) == (
        "equal within noise: 1x faster (runs: 1.11x slower to 1.2x faster)")
    assert _bench._fmt_ratio(row([1.0], [3.0])) == "3x faster (1 run)"
    assert _bench._fmt_ratio({"ratio": None}) == "-"
