"""Every comparison, side by side, in one process: ``python benchmarks/run.py``.

Contenders (each skipped when its library is missing):

* ``safecodec``: ``safecodec.save_file`` / ``load_file`` (mapped copy-on-write views) /
  ``safe_open``;
* ``safetensors.numpy``: the reference Rust wheel (copies every tensor);
* ``safecodec.jax`` and ``safetensors.flax``: the same files as ``jax.Array`` values;
* ``flax msgpack``: ``flax.serialization.to_bytes`` / ``from_bytes`` to and from a file;
* ``equinox``: ``equinox.tree_serialise_leaves`` / ``tree_deserialise_leaves``;
* ``numpy memcpy``: one ``np.copyto`` of the file's bytes, already in memory, into a new
  array: the physical limit for any loader that copies (save: one ``tofile`` + fsync).

Operations, for GPT-2-shaped checkpoints of several sizes and for 10,000 tensors of 1 KiB:
``save`` (fsync included for everyone), ``load`` (whole file; what each library returns),
``load + read all`` (load, then sum every tensor so every byte is really read: mapped
pages are faulted in, so views and copies are compared on equal terms), ``lazy 1 tensor``
(open + one tensor). Each repeat runs every contender once, in a rotating order; figures
are medians with min-max spreads. Page cache warm (files were just written).

Also measured, each in fresh subprocesses: ``import safecodec`` after numpy (median of
many runs, and whether jax or fsspec got imported), and the peak extra memory while
saving the largest model (tracemalloc peak and peak RSS growth).

Outputs (``--out``, default ``benchmarks/results``): ``results.md`` (tables, targets),
``results.json`` (every sample, machine details), ``*.png`` plots (matplotlib, Agg).

    python benchmarks/run.py                # full run: 16 MB, 125 MB, 500 MB + 10k tensors
    python benchmarks/run.py --quick --out /tmp/bench   # seconds, for smoke tests
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmark this checkout, not an installed copy
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import safecodec  # noqa: E402
from safecodec._bench import (  # noqa: E402
    LAZY_TENSOR,
    build_model,
    fresh_target,
    fsync_path,
    machine_info,
    nbytes,
    optional,
    time_call,
    touch_all,
)

#: Size label -> built-in model size of safecodec._bench.
SIZES = {"16MB": "small", "125MB": "medium", "GPT-2 500MB": "gpt2"}
QUICK_SIZES = {"tiny": "tiny"}
SMALL_COUNT = 10_000
SMALL_ELEMS = 256  # float32: 1 KiB each
OPERATIONS = ("save", "load", "load + read all", "lazy 1 tensor")


# ----------------------------------------------------------------------------- contenders


@dataclass
class Contender:
    """One library: how it saves a dict of arrays, loads it back, reads one tensor."""

    name: str
    suffix: str
    save: Callable[[dict[str, np.ndarray], str], Any] | None = None
    load: Callable[[str], Any] | None = None
    lazy: Callable[[str, str], Any] | None = None
    reads_safetensors: bool = False  # loads the shared safecodec-written file
    notes: list[str] = field(default_factory=list)


def _block(tree: dict[str, Any]) -> dict[str, Any]:
    for v in tree.values():
        v.block_until_ready()
    return tree


def contenders(model_template: Callable[[], dict[str, np.ndarray]],
               only: set[str] | None = None) -> list[Contender]:
    """The contenders whose libraries are importable here (``only``: just these names,
    importing nothing else)."""
    out = []

    def want(name: str) -> bool:
        return only is None or name in only

    def sc_lazy(path: str, name: str) -> Any:
        with safecodec.safe_open(path) as f:
            return f.get_tensor(name)

    out.append(Contender("safecodec", ".safetensors", safecodec.save_file, safecodec.load_file,
                         sc_lazy, reads_safetensors=True))
    st: Any = optional("safetensors") if want("safetensors.numpy") or want("safetensors.flax") \
        else None
    st_np = optional("safetensors.numpy") if want("safetensors.numpy") else None
    if st_np is not None:
        def st_save(tensors: dict[str, np.ndarray], path: str) -> None:
            st_np.save_file(tensors, path)
            fsync_path(path)  # the wheel does not fsync; safecodec does: compare equal work

        def st_lazy(path: str, name: str) -> Any:
            with st.safe_open(path, framework="numpy") as f:
                return f.get_tensor(name)

        out.append(Contender("safetensors.numpy", ".st.safetensors", st_save, st_np.load_file,
                             st_lazy, reads_safetensors=True))
    jax_users = {"safecodec.jax", "safetensors.flax", "flax msgpack", "equinox"}
    has_jax = (only is None or bool(only & jax_users)) and optional("jax") is not None
    if has_jax and want("safecodec.jax") and importlib.util.find_spec("safecodec.jax") is not None:
        sc_jax = optional("safecodec.jax")
        if sc_jax is not None:
            def scj_lazy(path: str, name: str) -> Any:
                with safecodec.safe_open(path, framework="jax") as f:
                    return f.get_tensor(name).block_until_ready()

            out.append(Contender("safecodec.jax", "", None,
                                 lambda p: _block(sc_jax.load_file(p)), scj_lazy,
                                 reads_safetensors=True))
    if has_jax and want("safetensors.flax") and st is not None \
            and optional("safetensors.flax") is not None:
        st_flax = optional("safetensors.flax")

        def stf_lazy(path: str, name: str) -> Any:
            with st.safe_open(path, framework="flax") as f:
                return f.get_tensor(name).block_until_ready()

        out.append(Contender("safetensors.flax", "", None, lambda p: _block(st_flax.load_file(p)),
                             stf_lazy, reads_safetensors=True))
    ser = optional("flax.serialization") if has_jax and want("flax msgpack") else None
    if ser is not None:
        def mp_save(tensors: dict[str, np.ndarray], path: str) -> None:
            data = ser.to_bytes(tensors)
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

        def mp_load(path: str) -> Any:
            with open(path, "rb") as f:
                return ser.from_bytes(model_template(), f.read())

        out.append(Contender("flax msgpack", ".msgpack", mp_save, mp_load))
    eqx = optional("equinox") if has_jax and want("equinox") else None
    if eqx is not None:
        def eqx_save(tensors: dict[str, np.ndarray], path: str) -> None:
            eqx.tree_serialise_leaves(path, tensors)
            fsync_path(path)

        out.append(Contender("equinox", ".eqx", eqx_save,
                             lambda p: eqx.tree_deserialise_leaves(p, model_template())))
    return out


class _Memcpy:
    """The physical limit of a copying load: the file's bytes, already in memory, copied
    once into a new array (``load``); one flat ``tofile`` + fsync (``save``)."""

    def __init__(self) -> None:
        self.src: np.ndarray | None = None

    def prepare(self, path: str) -> None:
        self.src = np.fromfile(path, dtype=np.uint8)

    def load(self, path: str) -> np.ndarray:
        assert self.src is not None
        dst = np.empty_like(self.src)
        np.copyto(dst, self.src)
        return dst

    def save(self, tensors: dict[str, np.ndarray], path: str) -> None:
        assert self.src is not None
        with open(path, "wb") as f:
            self.src.tofile(f)
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------- measuring


def _run_one(fn: Callable[[], Any]) -> float:
    if getattr(fn, "target", None):
        fresh_target(fn.target)  # type: ignore[attr-defined]
    seconds, result = time_call(fn)
    del result  # freeing copies / unmapping views stays outside the timer
    gc.collect()
    return seconds


def bench_model(label: str, model: dict[str, np.ndarray], directory: str, repeat: int,
                lazy_name: str, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every operation x contender on one model, ``repeat`` rotating rounds."""
    base = os.path.join(directory, label.replace(" ", "_"))
    shared = base + ".safetensors"  # written by safecodec, read by every safetensors reader
    safecodec.save_file(model, shared)
    cons = contenders(lambda: model)
    memcpy = _Memcpy()
    memcpy.prepare(shared)
    cons.append(Contender("numpy memcpy", ".raw", memcpy.save, memcpy.load))
    for c in cons:  # every contender's own file, so loads read what each one writes
        if c.save is not None and not c.reads_safetensors:
            c.save(model, base + c.suffix)

    def path_for(c: Contender) -> str:
        return shared if c.reads_safetensors else base + c.suffix

    def task(op: str, c: Contender) -> Callable[[], Any] | None:
        if op == "save":
            if c.save is None:
                return None
            target = base + ".save" + (c.suffix or ".x")

            def save() -> None:
                c.save(model, target)  # type: ignore[misc]

            save.target = target  # type: ignore[attr-defined]
            return save
        if op == "load":
            return (lambda: c.load(path_for(c))) if c.load else None  # type: ignore[misc]
        if op == "load + read all":
            if c.load is None:
                return None
            return lambda: touch_all(_as_dict(c.load(path_for(c))))  # type: ignore[misc]
        if c.lazy is None:
            return None
        return lambda: c.lazy(path_for(c), lazy_name)  # type: ignore[misc]

    samples: dict[tuple[str, str], list[float]] = {}
    # jax & co. create ~10^5 long-lived objects: freeze them so that the collections
    # around each sample stay cheap (and do not disturb the timings).
    gc.collect()
    gc.freeze()
    for r in range(repeat):
        for op in OPERATIONS:
            order = cons[r % len(cons):] + cons[: r % len(cons)]
            for c in order:
                fn = task(op, c)
                if fn is not None:
                    samples.setdefault((op, c.name), []).append(_run_one(fn))
        log(f"  {label}: round {r + 1}/{repeat} done")
    memcpy.src = None
    rows = []
    for (op, who), s in samples.items():
        rows.append({"size": label, "bytes": nbytes(model), "tensors": len(model),
                     "operation": op, "contender": who, **_stats(s), "samples": s})
    for c in cons:
        for suffix in (c.suffix, ".save" + (c.suffix or ".x")):
            if suffix and os.path.exists(base + suffix):
                os.unlink(base + suffix)
    if os.path.exists(shared):
        os.unlink(shared)
    return rows


def _as_dict(loaded: Any) -> dict[str, Any]:
    return loaded if isinstance(loaded, dict) else {"all": loaded}


def _stats(s: list[float]) -> dict[str, float]:
    return {"median": statistics.median(s), "min": min(s), "max": max(s), "n": len(s)}


def small_model(count: int) -> dict[str, np.ndarray]:
    """``count`` float32 tensors of 1 KiB each, with distinct values."""
    rng = np.random.default_rng(1)
    block = rng.random((count, SMALL_ELEMS), dtype=np.float32)
    return {f"layers.{i:05d}.weight": block[i].copy() for i in range(count)}


_IMPORT_CHILD = r"""
import sys, time
import numpy
start, cpu = time.perf_counter(), time.process_time()
import {module}
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
import json  # after the timing: safecodec itself may import json
print(json.dumps({{"seconds": seconds, "cpu_seconds": cpu,
                  "heavy": sorted(m for m in ("jax", "jaxlib", "fsspec") if m in sys.modules)}}))
"""


#: The imports timed side by side: safecodec, and the reference wheel's NumPy front end
#: as its users import it.
IMPORTS: dict[str, str] = {"safecodec": "safecodec",
                           "safetensors.numpy": "safetensors, safetensors.numpy"}


def bench_imports(samples: int) -> dict[str, dict[str, Any]]:
    """Time each of :data:`IMPORTS` after numpy in fresh interpreters, alternating between
    them (so both see the same machine load); median of ``samples`` each. An import whose
    package is not installed is left out."""
    present = {label: module for label, module in IMPORTS.items()
               if label == "safecodec" or importlib.util.find_spec(label.split(".")[0])}
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # Measure what an installed package costs: bytecode cached. With
    # PYTHONDONTWRITEBYTECODE set, every sample would recompile each edited module; the
    # first (uncounted) round writes the .pyc files instead.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    times: dict[str, list[float]] = {label: [] for label in present}
    cpu: dict[str, list[float]] = {label: [] for label in present}
    heavy: dict[str, set[str]] = {label: set() for label in present}
    for i in range(samples + 1):
        order = list(present) if i % 2 == 0 else list(reversed(present))
        for label in order:
            proc = subprocess.run(
                [sys.executable, "-c", _IMPORT_CHILD.format(module=present[label])],
                capture_output=True, text=True, env=env, cwd=str(ROOT), check=True)
            data = json.loads(proc.stdout.strip().splitlines()[-1])
            heavy[label].update(data["heavy"])
            if i:  # the first round may compile .pyc files: not counted
                times[label].append(data["seconds"])
                cpu[label].append(data["cpu_seconds"])
    # CPU time is what the import costs this process; wall time also counts the time other
    # processes held the cores (this machine is shared): both are reported.
    return {label: {"module": present[label], **_stats(times[label]), "samples": times[label],
                    "cpu_median": statistics.median(cpu[label]), "cpu_samples": cpu[label],
                    "heavy_modules": sorted(heavy[label])}
            for label in present}


def _rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def memory_child(contender: str, size: str, directory: str) -> dict[str, Any]:
    """Runs in a subprocess: build the model, then save it once with ``contender`` while
    measuring the peak extra memory (tracemalloc peak; RSS peak above the level after
    building, sampled by a thread every millisecond)."""
    import threading
    import time
    import tracemalloc

    model = build_model(size)
    gc.collect()
    cons = {c.name: c for c in contenders(lambda: model, only={contender})}
    c = cons[contender]
    assert c.save is not None
    path = os.path.join(directory, "memory" + (c.suffix or ".x"))
    base_rss = _rss_kib()
    peak = [base_rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_kib())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    tracemalloc.start()
    thread.start()
    c.save(model, path)
    stop.set()
    thread.join()
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    os.unlink(path)
    largest = max(v.nbytes for v in model.values())
    return {
        "contender": contender,
        "model_bytes": nbytes(model),
        "largest_tensor_bytes": largest,
        "tracemalloc_peak_bytes": traced_peak,
        "rss_peak_extra_bytes": max(peak[0] - base_rss, 0) * 1024,
    }


def bench_memory(size: str, directory: str, names: list[str]) -> list[dict[str, Any]]:
    """Peak extra memory while saving, one fresh subprocess per contender."""
    out = []
    for name in names:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--memory-child", name, size,
             directory], capture_output=True, text=True, cwd=str(ROOT), check=True)
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


# ----------------------------------------------------------------------------- reporting


def _fmt(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _lookup(rows: list[dict[str, Any]], size: str, op: str, who: str) -> dict[str, Any] | None:
    for r in rows:
        if r["size"] == size and r["operation"] == op and r["contender"] == who:
            return r
    return None


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The core issue's targets, measured (reported, never asserted)."""
    rows = result["rows"]
    big = result["sizes"][-1]
    small = result["small_label"]
    out: list[dict[str, Any]] = []

    def ratio(size: str, op: str) -> float | None:
        ours = _lookup(rows, size, op, "safecodec")
        ref = _lookup(rows, size, op, "safetensors.numpy")
        if ours is None or ref is None:
            return None
        return float(ours["median"] / ref["median"])

    def fastest(size: str, op: str) -> float:
        """safecodec's best run over the reference's best run (called when both exist)."""
        ours = _lookup(rows, size, op, "safecodec")
        ref = _lookup(rows, size, op, "safetensors.numpy")
        assert ours is not None and ref is not None
        return float(ours["min"] / ref["min"])

    r = ratio(big, "load")
    if r is not None:
        out.append({"target": f"load_file >= 200x faster than safetensors.numpy ({big}, "
                    "views vs copies)", "measured": f"{1 / r:.0f}x faster (fastest runs: "
                    f"{1 / fastest(big, 'load'):.0f}x)", "met": 1 / r >= 200})
    r = ratio(big, "load + read all")
    if r is not None:
        out.append({"target": f"(context) load + read every byte ({big})",
                    "measured": f"{1 / r:.2f}x faster", "met": None})
    r = ratio(small, "load")
    if r is not None:
        out.append({"target": f"{small}: load <= 0.6x safetensors.numpy's time",
                    "measured": f"{r:.2f}x its time (fastest runs: "
                    f"{fastest(small, 'load'):.2f}x)", "met": r <= 0.6})
    r = ratio(big, "save")
    if r is not None:
        out.append({"target": f"save_file no slower than safetensors.numpy ({big}, fsync "
                    "included for both)", "measured": f"{r:.2f}x its time (fastest runs: "
                    f"{fastest(big, 'save'):.2f}x)", "met": r <= 1.0})
    r = ratio(small, "save")
    if r is not None:
        out.append({"target": f"(context) save, {small}", "measured": f"{r:.2f}x its time",
                    "met": None})
    for m in result.get("memory", []):
        if m["contender"] == "safecodec":
            extra = max(m["tracemalloc_peak_bytes"], m["rss_peak_extra_bytes"])
            out.append({"target": "peak extra memory while saving <= largest tensor "
                        f"({m['largest_tensor_bytes'] / 1e6:.0f} MB)",
                        "measured": f"{extra / 1e6:.1f} MB", "met":
                        extra <= m["largest_tensor_bytes"]})
    imp = result.get("import", {}).get("safecodec")
    wheel = result.get("import", {}).get("safetensors.numpy")
    if imp:
        out.append({"target": "import safecodec <= 1.5 ms after numpy",
                    "measured": f"{imp['median'] * 1e3:.2f} ms wall, median of {imp['n']} "
                    f"(CPU time {imp['cpu_median'] * 1e3:.2f} ms, fastest {imp['min'] * 1e3:.2f} ms)",
                    "met": imp["median"] <= 0.0015})
    if imp and wheel:
        out.append({"target": "import safecodec no slower than import safetensors, "
                    "safetensors.numpy (alternating, same machine)",
                    "measured": f"{imp['median'] * 1e3:.2f} ms vs {wheel['median'] * 1e3:.2f} ms "
                    f"wall ({imp['median'] / wheel['median']:.2f}x); CPU time "
                    f"{imp['cpu_median'] * 1e3:.2f} ms vs {wheel['cpu_median'] * 1e3:.2f} ms",
                    "met": imp["median"] <= wheel["median"]})
        out.append({"target": "import safecodec imports neither jax nor fsspec",
                    "measured": ", ".join(imp["heavy_modules"]) or "neither imported",
                    "met": not imp["heavy_modules"]})
    return out


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown: targets, then one table per size."""
    m = result["machine"]
    v = m["versions"]
    lines = [
        "# safecodec benchmarks",
        "",
        f"Run on {m['date']}: {m['cpu']}, {m['cores']} cores, Python {m['python']}, "
        f"numpy {v.get('numpy')}, safetensors {v.get('safetensors')}, jax {v.get('jax')}, "
        f"flax {v.get('flax')}, equinox {v.get('equinox')}, safecodec {v.get('safecodec')}.",
        "",
        f"{result['repeat']} rounds per figure; each round runs every contender once, in a "
        "rotating order; medians with min-max spreads. Page cache warm. "
        + ("**Quick mode** (tiny sizes): not representative. " if result["quick"] else "")
        + "This machine is shared and noisy (2 cores used by several jobs at once): "
        "treat ratios as indicative, not exact.",
        "",
        "What is measured: `load` is whatever each library's load call returns: safecodec "
        "returns copy-on-write views of a memory mapping (nothing read yet), the others "
        "copy. `load + read all` also sums every tensor, so every byte is read from the "
        "page cache (the fair comparison when all data is used). `save` includes fsync for "
        "every contender, into a new file: before each save the previous output is deleted and "
        "the filesystem synced, outside the timer (on this machine's ext4, mounted with "
        "`discard`, freeing a replaced file costs about 1 s/GB and lands on whichever fsync "
        "comes next, i.e. on the next contender). `numpy memcpy` copies the same bytes, already in memory, once: "
        "the floor for copying loads. `x safecodec` = contender median / safecodec median "
        "(above 1: safecodec is faster).",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for t in result["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    for size in result["sizes"] + [result["small_label"]]:
        rows = [r for r in result["rows"] if r["size"] == size]
        if not rows:
            continue
        lines += ["", f"## {size} ({rows[0]['tensors']} tensors, {rows[0]['bytes'] / 1e6:.1f} "
                  "MB)", "", "| operation | contender | median | min - max | x safecodec |",
                  "|---|---|---|---|---|"]
        for op in OPERATIONS:
            ours = _lookup(rows, size, op, "safecodec")
            for r in rows:
                if r["operation"] != op:
                    continue
                rel = f"{r['median'] / ours['median']:.3g}" if ours and ours["median"] else "-"
                lines.append(f"| {op} | {r['contender']} | {_fmt(r['median'])} | "
                             f"{_fmt(r['min'])} - {_fmt(r['max'])} | {rel} |")
    if result.get("memory"):
        lines += ["", f"## Peak extra memory while saving ({result['memory_size']})", "",
                  "| contender | tracemalloc peak | RSS peak growth (sampled every ms) | "
                  "largest tensor |", "|---|---|---|---|"]
        for mm in result["memory"]:
            lines.append(f"| {mm['contender']} | {mm['tracemalloc_peak_bytes'] / 1e6:.1f} MB | "
                         f"{mm['rss_peak_extra_bytes'] / 1e6:.1f} MB | "
                         f"{mm['largest_tensor_bytes'] / 1e6:.1f} MB |")
    if result.get("import"):
        lines += ["", "## Import time after numpy (fresh interpreter per sample, the imports "
                  "alternating)", "",
                  "| module | median (wall) | min - max (wall) | median (CPU time) | samples | "
                  "heavy modules imported |", "|---|---|---|---|---|---|"]
        for imp in result["import"].values():
            lines.append(f"| `import {imp['module']}` | {_fmt(imp['median'])} | "
                         f"{_fmt(imp['min'])} - {_fmt(imp['max'])} | {_fmt(imp['cpu_median'])} | "
                         f"{imp['n']} | "
                         f"{', '.join(imp['heavy_modules']) or 'none'} |")
    jax_files = result.get("jax_results", [])
    if jax_files:
        lines += ["", "JAX-specific figures (aliasing, reference-written files, GPU): "
                  "`benchmarks/bench_jax.py`, raw results in "
                  + ", ".join(f"`benchmarks/results/{f}`" for f in jax_files) + "."]
    if result.get("plots"):
        lines += ["", "## Plots", ""]
        for png in result["plots"]:
            lines += [f"![{png[:-4].replace('_', ' ')}]({png})", ""]
    return "\n".join(lines)


def plots(result: dict[str, Any], out: Path) -> list[str]:
    """Grouped bar charts (log scale, min-max whiskers); returns the file names."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    groups = [(op, result["sizes"]) for op in OPERATIONS]
    groups.append(("small tensors", [result["small_label"]]))
    for op, sizes in groups:
        ops = list(OPERATIONS) if op == "small tensors" else [op]
        xlabels = ops if op == "small tensors" else sizes
        rows = [r for r in result["rows"] if r["size"] in sizes and r["operation"] in ops]
        who = list(dict.fromkeys(r["contender"] for r in rows))
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        width = 0.8 / max(len(who), 1)
        for i, w in enumerate(who):
            xs, ys, lo, hi = [], [], [], []
            for j, x in enumerate(xlabels):
                size, o = (sizes[0], x) if op == "small tensors" else (x, op)
                r = _lookup(rows, size, o, w)
                if r is None:
                    continue
                xs.append(j + (i - (len(who) - 1) / 2) * width)
                ys.append(r["median"])
                lo.append(r["median"] - r["min"])
                hi.append(r["max"] - r["median"])
            ax.bar(xs, ys, width, yerr=[lo, hi], label=w, capsize=2)
        ax.set_xticks(range(len(xlabels)), xlabels)
        ax.set_yscale("log")
        ax.set_ylabel("seconds (median, log scale)")
        title = (f"{result['small_label']}" if op == "small tensors" else op)
        ax.set_title(f"{title} (lower is better)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fname = op.replace(" + ", "_").replace(" ", "_") + ".png"
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
        names.append(fname)
    return names


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and write the results; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, few repeats: seconds, for smoke tests")
    parser.add_argument("--repeat", type=int, default=None,
                        help="rounds per figure (default 5, quick 2)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                        help="directory for results.md, results.json and the plots")
    parser.add_argument("--dir", default=None, help="directory for checkpoint files "
                        "(default: a temporary directory, removed afterwards)")
    parser.add_argument("--sizes", default=None,
                        help=f"comma-separated subset of {', '.join(SIZES)}")
    parser.add_argument("--import-samples", type=int, default=None,
                        help="fresh interpreters per import figure (default 40, quick 3)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite results.md and the plots from an existing results.json "
                        "in --out, measuring nothing")
    parser.add_argument("--memory-child", nargs=3, metavar=("CONTENDER", "SIZE", "DIR"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child)))
        return 0
    if args.render_only:
        out = Path(args.out)
        saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
        write_outputs(saved, out, plot=not args.no_plots)
        return 0
    quick = args.quick
    repeat = args.repeat or (2 if quick else 5)
    sizes = dict(QUICK_SIZES) if quick else dict(SIZES)
    if args.sizes:
        wanted = [s.strip() for s in args.sizes.split(",")]
        unknown = [s for s in wanted if s not in SIZES and s not in QUICK_SIZES]
        if unknown:
            parser.error(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
        sizes = {s: {**SIZES, **QUICK_SIZES}[s] for s in wanted}
    small_count = 500 if quick else SMALL_COUNT
    small_label = f"{small_count:,} x 1 KiB tensors"
    import_samples = args.import_samples or (3 if quick else 40)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    directory = args.dir or tempfile.mkdtemp(prefix="safecodec-benchmarks-")
    os.makedirs(directory, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    rows: list[dict[str, Any]] = []
    try:
        for label, size in sizes.items():
            log(f"{label}: building the model")
            model = build_model(size)
            rows += bench_model(label, model, directory, repeat, LAZY_TENSOR, log)
            del model
            gc.collect()
        log(f"{small_label}")
        model = small_model(small_count)
        rows += bench_model(small_label, model, directory, repeat, "layers.00042.weight", log)
        del model
        gc.collect()
        memory_size = list(sizes.values())[-1]
        log(f"peak memory while saving ({memory_size})")
        mem_names = ["safecodec"] + [c.name for c in contenders(dict)
                                     if c.name != "safecodec" and c.save is not None]
        if quick:  # the others import jax in their subprocess: seconds each
            mem_names = mem_names[:2]
        memory = bench_memory(memory_size, directory, mem_names)
        log("import times")
        imports = bench_imports(import_samples)
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    result: dict[str, Any] = {
        "quick": quick,
        "repeat": repeat,
        "sizes": list(sizes),
        "small_label": small_label,
        "machine": machine_info(),
        "rows": rows,
        "memory_size": memory_size,
        "memory": memory,
        "import": imports,
    }
    write_outputs(result, out, plot=not args.no_plots)
    print(markdown(result))
    return 0


def write_outputs(result: dict[str, Any], out: Path, *, plot: bool) -> None:
    """Targets, plots, results.json and results.md from the raw figures."""
    result["jax_results"] = sorted(p.name for p in out.glob("bench_jax*.json")
                                   if "quick" not in p.name)
    result["targets"] = targets(result)
    result["plots"] = plots(result, out) if plot else []
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown(result), encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
