"""The main job: save and load a GPT-2-small-shaped checkpoint, side by side with the
reference ``safetensors`` wheel when it is installed, and print a table.

Run it as ``python -m safecodec bench`` (or ``python -m safecodec._bench``)::

    python -m safecodec bench                 # GPT-2 small shape, ~500 MB of float32
    python -m safecodec bench --size tiny     # 0.5 MB, for a quick look
    python -m safecodec bench --repeat 5 --json results.json

Every operation runs once for each library before anything is timed (the warm-up: the
first run pays for imports, first-touch page faults and allocator growth, and is left
out), then ``--repeat`` timed runs alternate who goes first. The table shows the median
time of each library and, next to every ratio, the spread of the per-run ratios (lowest
to highest); a spread that crosses 1 is reported as equal within noise.

What is measured (page cache warm, the same file for both readers):

* ``save``: ``save_file`` of the whole model into a new file, fsync included for both
  writers (safecodec fsyncs as part of its atomic replace; the reference file is fsynced
  after its call). The previous output is deleted and the filesystem synced before each
  save, outside the timer (see :func:`fresh_target`).
* ``load``: ``load_file``. safecodec returns copy-on-write views of a memory mapping and
  reads nothing yet; the reference copies every tensor into new memory.
* ``load + read all``: ``load_file`` then a sum over every tensor, so that every byte is
  really touched (page faults for the mapping, the copy for the reference): the fair
  comparison when all the data is going to be used.
* ``lazy 1 tensor``: ``safe_open`` and ``get_tensor`` of one MLP weight.
* ``jax load``: ``safecodec.jax.load_file`` vs ``safetensors.flax.load_file`` (when jax,
  the reference wheel and ``safecodec.jax`` are all there), waiting for every array.

Every loaded tensor is compared with the original values; a mismatch exits with status 1.
The model builder and the timing helpers are shared with ``benchmarks/run.py``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

import safecodec

from ._progress import ProgressBar
from ._version import __version__

__all__ = ["MODEL_SIZES", "build_model", "main", "model_shapes", "time_call"]


@dataclass(frozen=True)
class ModelShape:
    """A GPT-2-style transformer: vocabulary, context, width and depth."""

    vocab: int
    context: int
    width: int
    layers: int


#: Built-in models. ``gpt2`` is GPT-2 small (124M parameters, ~500 MB in float32); sizes
#: in bytes: :func:`model_nbytes`.
MODEL_SIZES: Final[dict[str, ModelShape]] = {
    "tiny": ModelShape(vocab=512, context=64, width=64, layers=2),
    "small": ModelShape(vocab=8192, context=512, width=256, layers=2),
    "medium": ModelShape(vocab=16384, context=1024, width=512, layers=7),
    "gpt2": ModelShape(vocab=50257, context=1024, width=768, layers=12),
}

#: Untimed runs of every operation before the timed ones (the first save of a process
#: pays for imports, page faults and allocator growth: 1.09 s against ~0.23 s later).
WARMUP_RUNS: Final = 1
#: The tensor the lazy-read benchmark fetches (exists in every built-in size).
LAZY_TENSOR: Final = "h.1.mlp.c_fc.weight"


def model_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a GPT-2-style checkpoint (Hugging Face naming)."""
    d = shape.width
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (shape.vocab, d),
        "wpe.weight": (shape.context, d),
    }
    for i in range(shape.layers):
        p = f"h.{i}."
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (d, 4 * d), p + "mlp.c_fc.bias": (4 * d,),
            p + "mlp.c_proj.weight": (4 * d, d), p + "mlp.c_proj.bias": (d,),
        })
    shapes["ln_f.weight"] = (d,)
    shapes["ln_f.bias"] = (d,)
    return shapes


def model_nbytes(size: str | ModelShape) -> int:
    """Data bytes of a model (float32), computed from its shapes without building it."""
    shape = MODEL_SIZES[size] if isinstance(size, str) else size
    return 4 * sum(math.prod(dims) for dims in model_shapes(shape).values())


def _fmt_mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def build_model(size: str | ModelShape = "gpt2", seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights of a built-in model size (``MODEL_SIZES``).

    Uniform values in [-0.02, 0.02), generated straight into float32 (no float64
    temporary), so the 500 MB GPT-2 model takes about a second.
    """
    shape = MODEL_SIZES[size] if isinstance(size, str) else size
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, dims in model_shapes(shape).items():
        arr = rng.random(dims, dtype=np.float32)
        arr -= np.float32(0.5)
        arr *= np.float32(0.04)
        out[name] = arr
    return out


def nbytes(tensors: dict[str, Any]) -> int:
    """Total data bytes of a dict of arrays."""
    return sum(int(v.nbytes) for v in tensors.values())


def fsync_path(path: str) -> None:
    """Flush a file written by someone else to the disk (for a fair save comparison)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fresh_target(path: str) -> None:
    """Delete a previous output and sync the filesystem (outside the timer), so that a
    save is timed writing a new file. Freeing a replaced file's blocks is filesystem work
    that some filesystems (ext4 mounted with ``discard``) bill to whichever fsync comes
    next: without this, one writer would pay for the file another one replaced."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    if hasattr(os, "sync"):
        os.sync()


def touch_all(tensors: dict[str, Any]) -> float:
    """Read every byte of every tensor (a float64 sum), forcing mapped pages in."""
    total = 0.0
    for v in tensors.values():
        total += float(np.add.reduce(np.asarray(v).reshape(-1), dtype=np.float64))
    return total


def time_call(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``fn`` once with the garbage collector paused; return (seconds, result)."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
    return elapsed, result


def summarize(samples: list[float]) -> dict[str, float]:
    """Median, min, max and the sample count of a list of seconds."""
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
    }


def machine_info() -> dict[str, Any]:
    """CPU, cores, Python and library versions, date: stored next to every figure."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for mod in ("numpy", "safetensors", "jax", "flax", "equinox", "ml_dtypes"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod)
        except Exception:  # not installed
            versions[mod] = None
    versions["safecodec"] = __version__
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def optional(module: str) -> Any:
    """Import ``module`` or return None when it (or a dependency) is missing/blocked."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


# ----------------------------------------------------------------------------- main job


@dataclass
class _Op:
    name: str
    ours: Callable[[], Any]
    ref: Callable[[], Any] | None
    before: Callable[[str], None] | None = None  # runs outside the timer, per contender


class _Lines:
    """Progress as plain lines on stderr: one per contender and operation, written as it
    starts and completed with its time (no terminal, or tqdm not installed)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0

    def start(self, text: str) -> None:
        print(f"  [{self.done + 1}/{self.total}] {text} ...", end="", file=sys.stderr, flush=True)

    def finish(self, seconds: float) -> None:
        self.done += 1
        print(f" {_fmt_seconds(seconds)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class _Bar:
    """The same progress as the library's progress bar (on a terminal, with tqdm)."""

    def __init__(self, bar: ProgressBar) -> None:
        self.bar = bar

    def start(self, text: str) -> None:
        self.bar.describe(text)

    def finish(self, seconds: float) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _progress(total: int) -> _Lines | _Bar:
    """A bar on a terminal when tqdm is installed, else a line per step on stderr."""
    if sys.stderr.isatty():
        bar = ProgressBar(total, "bench", True, unit="step", file=sys.stderr)
        if bar.shown:
            return _Bar(bar)
    return _Lines(total)


def _block(tree: dict[str, Any]) -> dict[str, Any]:
    for v in tree.values():
        v.block_until_ready()
    return tree


def _operations(model: dict[str, np.ndarray], ours_path: str, ref_path: str) -> list[_Op]:
    st_np = optional("safetensors.numpy")

    def ref_save() -> None:
        st_np.save_file(model, ref_path)
        fsync_path(ref_path)  # the wheel does not fsync; safecodec's atomic save does

    ops = [
        _Op("save", lambda: safecodec.save_file(model, ours_path), ref_save if st_np else None,
            before=fresh_target),
        _Op("load", lambda: safecodec.load_file(ours_path),
            (lambda: st_np.load_file(ours_path)) if st_np else None),
        _Op("load + read all", lambda: touch_all(safecodec.load_file(ours_path)),
            (lambda: touch_all(st_np.load_file(ours_path))) if st_np else None),
    ]
    st = optional("safetensors")

    def ours_lazy() -> Any:
        with safecodec.safe_open(ours_path) as f:
            return f.get_tensor(LAZY_TENSOR)

    def ref_lazy() -> Any:
        with st.safe_open(ours_path, framework="numpy") as f:
            return f.get_tensor(LAZY_TENSOR)

    ops.append(_Op("lazy 1 tensor", ours_lazy, ref_lazy if st_np else None))
    # JAX only when safecodec.jax exists, jax imports, and the reference flax module too.
    if importlib.util.find_spec("safecodec.jax") is not None and optional("jax") is not None:
        sc_jax = optional("safecodec.jax")
        st_flax = optional("safetensors.flax")
        if sc_jax is not None:
            ops.append(_Op("jax load", lambda: _block(sc_jax.load_file(ours_path)),
                           (lambda: _block(st_flax.load_file(ours_path))) if st_flax else None))
    return ops


def _verify(model: dict[str, np.ndarray], ours_path: str, ref_path: str | None) -> list[str]:
    """Compare what every reader returns with the original values; return problems."""
    problems: list[str] = []

    def check(label: str, loaded: dict[str, Any]) -> None:
        if list(sorted(loaded)) != sorted(model):
            problems.append(f"{label}: tensor names differ")
            return
        for name, want in model.items():
            got = np.asarray(loaded[name])
            if got.dtype != want.dtype or got.shape != want.shape or not np.array_equal(got, want):
                problems.append(f"{label}: tensor {name!r} differs")
                return

    check("safecodec reads safecodec's file", safecodec.load_file(ours_path))
    st_np = optional("safetensors.numpy")
    if st_np is not None:
        check("safetensors reads safecodec's file", st_np.load_file(ours_path))
        if ref_path is not None and os.path.exists(ref_path):
            check("safecodec reads safetensors' file", safecodec.load_file(ref_path))
    if importlib.util.find_spec("safecodec.jax") is not None and optional("jax") is not None:
        sc_jax = optional("safecodec.jax")
        if sc_jax is not None:
            check("safecodec.jax reads safecodec's file", sc_jax.load_file(ours_path))
    return problems


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def _speed(ratio: float) -> str:
    """A ratio of times (safetensors / safecodec) in words."""
    return f"{ratio:.3g}x faster" if ratio >= 1 else f"{1 / ratio:.3g}x slower"


def _fmt_ratio(row: dict[str, Any]) -> str:
    """The ratio cell: the ratio of the medians, then the spread of the per-run ratios."""
    if row["ratio"] is None:
        return "-"
    ratio, low, high = row["ratio"], row["ratio_min"], row["ratio_max"]
    runs = len(row["ratio_runs"])
    if runs == 1:
        return f"{_speed(ratio)} (1 run)"
    if low < 1 < high:
        return f"equal within noise: {_speed(ratio)} (runs: {_speed(low)} to {_speed(high)})"
    if ratio >= 1:
        return f"{_speed(ratio)} (runs: {low:.3g}x to {high:.3g}x)"
    return f"{_speed(ratio)} (runs: {1 / high:.3g}x to {1 / low:.3g}x)"


def paired_ratios(ours: list[float], ref: list[float]) -> list[float]:
    """Per-run ratios ``ref / ours`` of two equally long lists of seconds (run ``i`` of
    one library against run ``i`` of the other; they ran back to back)."""
    return [(r / o) if o > 0 else float("inf") for o, r in zip(ours, ref, strict=True)]


def run(size: str, directory: str, repeat: int) -> dict[str, Any]:
    """Build the model, run every operation once untimed (the warm-up), then ``repeat``
    timed times alternating the two libraries, verify values. Returns the raw results
    (seconds)."""
    print(f"  building the model ({_fmt_mb(model_nbytes(size))} of random float32) ...",
          file=sys.stderr, flush=True)
    gen_seconds, model = time_call(lambda: build_model(size))
    ours_path = os.path.join(directory, "model-safecodec.safetensors")
    ref_path = os.path.join(directory, "model-safetensors.safetensors")
    ops = _operations(model, ours_path, ref_path)
    samples: dict[str, dict[str, list[float]]] = {op.name: {"safecodec": [], "safetensors": []}
                                                  for op in ops}
    # Long-lived objects (jax's, if imported) out of the collector's way: keeps the
    # collections between samples cheap.
    gc.collect()
    gc.freeze()
    steps = (WARMUP_RUNS + repeat) * sum(1 + (op.ref is not None) for op in ops)
    bar = _progress(steps)
    try:
        for r in range(-WARMUP_RUNS, repeat):
            for op in ops:
                contenders: list[tuple[str, Callable[[], Any] | None]] = [
                    ("safecodec", op.ours), ("safetensors", op.ref)]
                if r % 2:  # alternate who goes first
                    contenders.reverse()
                for who, fn in contenders:
                    if fn is None:
                        continue
                    label = "warm-up" if r < 0 else f"run {r + 1}/{repeat}"
                    bar.start(f"{label}: {op.name} ({who})")
                    if op.before is not None:
                        op.before(ours_path if who == "safecodec" else ref_path)
                    seconds, result = time_call(fn)
                    if r >= 0:  # the warm-up is not a sample
                        samples[op.name][who].append(seconds)
                    del result  # unmapping/freeing stays outside the timer
                    gc.collect()
                    bar.finish(seconds)
    finally:
        bar.close()
    print("  checking that every reader returns the original values ...", file=sys.stderr,
          flush=True)
    problems = _verify(model, ours_path, ref_path)
    rows = []
    for op in ops:
        ours = summarize(samples[op.name]["safecodec"])
        ref = summarize(samples[op.name]["safetensors"]) if samples[op.name]["safetensors"] else None
        runs = (paired_ratios(samples[op.name]["safecodec"], samples[op.name]["safetensors"])
                if ref else [])
        rows.append({
            "operation": op.name,
            "safecodec": ours,
            "safetensors": ref,
            "ratio": (ref["median"] / ours["median"]) if ref and ours["median"] > 0 else None,
            "ratio_runs": runs,
            "ratio_min": min(runs) if runs else None,
            "ratio_max": max(runs) if runs else None,
        })
    return {
        "size": size,
        "model_bytes": nbytes(model),
        "tensors": len(model),
        "generate_seconds": gen_seconds,
        "repeat": repeat,
        "warmup": WARMUP_RUNS,
        "rows": rows,
        "verified": not problems,
        "problems": problems,
        "reference_available": optional("safetensors.numpy") is not None,
        "machine": machine_info(),
    }


def format_table(result: dict[str, Any]) -> str:
    """The results as an aligned text table."""
    header = ("operation", "safecodec", "safetensors", "safecodec vs safetensors (spread)")
    lines = [header]
    for row in result["rows"]:
        ref = row["safetensors"]
        lines.append((
            row["operation"],
            _fmt_seconds(row["safecodec"]["median"]),
            _fmt_seconds(ref["median"] if ref else None),
            _fmt_ratio(row),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for k, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m safecodec bench``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="safecodec bench",
        description="Save and load a GPT-2-small-shaped checkpoint with safecodec, side by "
        "side with the reference safetensors wheel when installed, and print a table.",
    )
    sizes = ["tiny", "small", "gpt2"]
    parser.add_argument("--size", choices=sizes, default="gpt2",
                        help="model to build: " + ", ".join(
                            f"{name} ({_fmt_mb(model_nbytes(name))})" for name in sizes)
                        + " (default: gpt2)")
    parser.add_argument("--dir", default=None,
                        help="directory for the checkpoint files (default: a temporary "
                        "directory, removed afterwards)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs of each operation, after one untimed warm-up run; the "
                        "table shows medians and the spread of the ratios (default 3)")
    parser.add_argument("--json", dest="json_path", default=None,
                        help="also write the raw results (seconds, machine details) here")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    shape = MODEL_SIZES[args.size]
    print(f"safecodec bench: GPT-2-style model '{args.size}' ({shape.layers} layers, width "
          f"{shape.width}, vocabulary {shape.vocab}), float32, {args.repeat} timed run(s) of each "
          "operation after a warm-up; "
          "progress on stderr",
          flush=True)
    if args.dir is not None:
        os.makedirs(args.dir, exist_ok=True)
        result = run(args.size, args.dir, args.repeat)
    else:
        with _temporary_directory() as directory:
            result = run(args.size, directory, args.repeat)
    print(f"model: {result['tensors']} tensors, {_fmt_mb(result['model_bytes'])}; "
          f"page cache warm; {WARMUP_RUNS} untimed warm-up run, then medians of "
          f"{result['repeat']} timed run(s); spread: lowest to highest per-run ratio")
    print()
    print(format_table(result))
    print()
    print("load: safecodec returns copy-on-write views of a memory mapping (nothing is read "
          "yet), safetensors copies every tensor; 'load + read all' sums every tensor so "
          "both really read all the bytes. save writes a new file, fsync included for both.")
    if not result["reference_available"]:
        print("safetensors is not installed: only safecodec figures (pip install "
              "safetensors to compare).")
    if result["verified"]:
        print("values: every tensor read back equals the original (all readers checked)")
    else:
        for problem in result["problems"]:
            print(f"MISMATCH: {problem}", file=sys.stderr)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"raw results written to {args.json_path}")
    return 0 if result["verified"] else 1


class _temporary_directory:
    """A temporary directory (on the same filesystem as the default temp dir) removed
    on exit, even when the run fails half way."""

    def __enter__(self) -> str:
        self.path = tempfile.mkdtemp(prefix="safecodec-bench-")
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
