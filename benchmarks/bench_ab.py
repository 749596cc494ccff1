"""A/B: this tree's safecodec against another checkout of safecodec, side by side.

Used to check that a refactoring costs nothing: each operation runs in a fresh
subprocess per round, alternating between the two trees (``PYTHONPATH`` picks the
checkout), on the same files; the report gives per-operation medians, the spread
(quartiles) and the ratio of medians (this tree / the other).

    git worktree add /tmp/old 861e74c
    python benchmarks/bench_ab.py --other /tmp/old --rounds 15

Operations (files are written once, by this tree's writer, in a temporary directory):

* ``load-numpy``: ``safecodec.load_file`` of a GPT-2-small-shaped file (views of a mapping);
* ``load-numpy-copy``: the same with ``copy=True`` (every byte read);
* ``load-jax``: ``safecodec.jax.load_file`` of that file (zero-copy on CPU);
* ``load-jax-ref``: ``safecodec.jax.load_file`` of the reference writer's file (8-aligned:
  one copy);
* ``save``: ``safecodec.save_file`` of the model (fsync included);
* ``small-10k``: ``safecodec.load_file`` of 10,000 tensors of 1 KiB;
* ``lazy-1-of-10k``: ``safe_open`` + one ``get_tensor`` of that file;
* ``header-148``: ``safecodec.read_header`` of the GPT-2-small file (148 tensors);
* ``header-10k``: ``safecodec.read_header`` of the 10,000-tensor file;
* ``tree-1000``: ``safecodec.load_tree`` of a ``save_tree`` file of 1,000 leaves (arrays,
  NumPy and Python scalars in dicts and lists), without a template;
* ``tree-1000-like``: the same with ``like=`` the tree itself (checked leaf by leaf);
* ``import``: ``import safecodec`` after numpy, once per fresh interpreter (bytecode
  cached), so its figure is the median over rounds rather than a best of several calls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(HERE, "benchmarks", "results")

#: Each operation, as a child's code: set up, then time ``REPEAT`` calls and print the best
#: (9 for the operations of a few milliseconds, 3 for those of a tenth of a second and more).
CHILD = r"""
import gc, json, os, sys, time
import numpy as np
op, d = sys.argv[1], sys.argv[2]
if op == "import":
    t = time.perf_counter()
    import safecodec
    print(json.dumps(time.perf_counter() - t))
    sys.exit()
import safecodec as sc
REPEAT = 3 if op in ("save", "load-numpy-copy", "load-jax-ref") else 9
if op in ("load-jax", "load-jax-ref"):
    import jax, safecodec.jax as scj
    path = os.path.join(d, "gpt2.safetensors" if op == "load-jax" else "gpt2-ref.safetensors")
    scj.load_file(path)  # warm JAX up
    def run():
        out = scj.load_file(path)
        jax.block_until_ready(list(out.values()))
elif op == "load-numpy":
    def run():
        sc.load_file(os.path.join(d, "gpt2.safetensors"))
elif op == "load-numpy-copy":
    def run():
        sc.load_file(os.path.join(d, "gpt2.safetensors"), copy=True)
elif op == "save":
    model = sc.load_file(os.path.join(d, "gpt2.safetensors"), copy=True)
    target = os.path.join(d, f"out-{os.getpid()}.safetensors")
    def run():
        sc.save_file(model, target)
elif op == "small-10k":
    def run():
        sc.load_file(os.path.join(d, "small.safetensors"))
elif op == "lazy-1-of-10k":
    def run():
        with sc.safe_open(os.path.join(d, "small.safetensors")) as f:
            f.get_tensor("t05000")
elif op in ("tree-1000", "tree-1000-like"):
    path = os.path.join(d, "tree.safetensors")
    like = sc.load_tree(path) if op == "tree-1000-like" else None
    def run():
        sc.load_tree(path, like=like)
elif op in ("header-148", "header-10k"):
    path = os.path.join(d, "gpt2.safetensors" if op == "header-148" else "small.safetensors")
    sc.read_header(path)  # the first call pays for importing the reader
    def run():
        sc.read_header(path)
best = float("inf")
for _ in range(REPEAT):
    gc.collect()
    t = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - t)
print(json.dumps(best))
"""

OPS = ["load-numpy", "load-numpy-copy", "load-jax", "load-jax-ref", "save", "small-10k",
       "lazy-1-of-10k", "header-148", "header-10k", "tree-1000", "tree-1000-like", "import"]


def _write_files(d: str) -> None:
    import numpy as np

    sys.path.insert(0, HERE)
    import safecodec as sc
    from safecodec._bench import build_model

    model = build_model("gpt2")
    sc.save_file(model, os.path.join(d, "gpt2.safetensors"))
    try:
        from safetensors.numpy import save_file as ref_save

        ref_save(model, os.path.join(d, "gpt2-ref.safetensors"))
    except ImportError:  # the reference wheel is absent: reuse an alignment=8 file
        sc.save_file(model, os.path.join(d, "gpt2-ref.safetensors"), alignment=8)
    small = {f"t{i:05d}": np.full(256, i, np.float32) for i in range(10_000)}
    sc.save_file(small, os.path.join(d, "small.safetensors"))
    rng = np.random.default_rng(0)
    tree = {f"layer{i:03d}": {"w": rng.standard_normal((16, 16)).astype(np.float32),
                              "b": np.zeros(16, np.float32), "n": [i, float(i)], "s": np.int32(i)}
            for i in range(200)}  # 5 leaves each
    sc.save_tree(tree, os.path.join(d, "tree.safetensors"))


def _time(tree: str, op: str, d: str) -> float:
    env = dict(os.environ, PYTHONPATH=tree, JAX_PLATFORMS="cpu")
    # Bytecode cached, as in an installed package (the first round writes the .pyc files).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    proc = subprocess.run([sys.executable, "-c", CHILD, op, d], capture_output=True,
                          text=True, env=env, cwd=tree, check=True, timeout=600)
    return float(json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--other", required=True, help="the other safecodec checkout")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--ops", nargs="*", default=OPS, choices=OPS)
    parser.add_argument("--out", default=os.path.join(RESULTS, "ab.json"))
    args = parser.parse_args(argv)
    trees = {"this": HERE, "other": os.path.abspath(args.other)}
    samples: dict[str, dict[str, list[float]]] = {op: {"this": [], "other": []} for op in args.ops}
    with tempfile.TemporaryDirectory() as d:
        _write_files(d)
        for tree in trees.values():  # writes each tree's .pyc files: no round compiles
            _time(tree, "import", d)
        for r in range(args.rounds):
            order = ["this", "other"] if r % 2 == 0 else ["other", "this"]
            for op in args.ops:
                for who in order:
                    samples[op][who].append(_time(trees[who], op, d))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    report: dict[str, Any] = {"other": args.other, "rounds": args.rounds, "ops": {}}
    print(f"{'operation':<16}{'this (ms)':>12}{'other (ms)':>12}{'ratio':>8}   quartiles of per-round ratio")
    for op, s in samples.items():
        this, other = statistics.median(s["this"]), statistics.median(s["other"])
        ratios = sorted(a / b for a, b in zip(s["this"], s["other"], strict=True))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        report["ops"][op] = {"this_ms": this * 1e3, "other_ms": other * 1e3,
                             "ratio_of_medians": this / other,
                             "per_round_ratio_quartiles": q, "samples": s}
        print(f"{op:<16}{this * 1e3:>12.2f}{other * 1e3:>12.2f}{this / other:>8.2f}   "
              f"{q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
