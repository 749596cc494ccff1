"""A Hugging Face Llama checkpoint into a sharded, scanned JAX model: safecodec.remap
against the loaders JAX projects write by hand.

The script writes a Llama-shaped bf16 checkpoint in Hugging Face layout with the
reference wheel (``model-0000N-of-00003.safetensors`` + ``model.safetensors.index.json``,
``(out, in)`` Linear weights, one tensor per layer), then loads it into a scanned model
(layers stacked on a leading axis; Linear kernels ``(in, out)``; q/k/v split into
``(hidden, heads, head_dim)``; norms cast to f32) on a 2x4 mesh of CPU devices, three ways:

- ``safecodec``: ``sc.load_tree(ckpt, like=abstract_state, remap=rules)``;
- ``tunix-style``: each shard mapped whole (``mmap`` + NumPy views), NumPy transforms
  (transpose, reshape, ``np.stack``, ``astype``), ``jax.device_put(x, sharding)``
  (the pattern of Google's tunix ``models/safetensors_loader.py``);
- ``safetensors.flax``: ``safetensors.flax.load_file`` per shard, the same transforms
  with ``jax.numpy``, ``jax.device_put(x, sharding)``.

Each load runs in a fresh subprocess (imports and template building not timed): wall time
of the load, and peak anonymous memory (``RssAnon``, sampled every millisecond) above the
RSS the process had when the load began. Rounds alternate the order; the table gives
medians and min-max spreads. Every method's values are hashed and must agree.

Run::

    python benchmarks/bench_remap.py                # small model (~60 MB), < 2 min on 2 cores
    python benchmarks/bench_remap.py --full         # the issue's 603 MB checkpoint
    python benchmarks/bench_remap.py --rounds 5 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("safecodec", "tunix-style", "safetensors.flax")
#: Not a loader: the parameters' bytes in fresh memory, written once. Every loader that
#: builds new arrays pays at least this (page faults and zeroing of new pages), so it
#: bounds from below what any of them can reach on the machine at hand.
FLOOR = "memory floor"
RUNS = (*METHODS, FLOOR)
#: (hidden, heads, kv heads, head dim, mlp, layers, vocab)
SMALL = (512, 8, 4, 64, 1408, 6, 8000)
FULL = (1024, 16, 8, 64, 2816, 20, 32000)  # 603 MB in bf16, as in the issue
INDEX = "model.safetensors.index.json"


# ----------------------------------------------------------------------------- the checkpoint


def write_checkpoint(directory: str, cfg: tuple[int, ...], seed: int = 0) -> int:
    """Write the checkpoint with the reference wheel in 3 shards plus the index; returns
    the data bytes."""
    import ml_dtypes
    from safetensors.numpy import save_file

    h, nh, kv, hd, im, n_layers, vocab = cfg
    rng = np.random.default_rng(seed)
    bf = ml_dtypes.bfloat16

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(bf)

    shards: list[dict[str, np.ndarray]] = [{}, {}, {}]
    shards[0]["model.embed_tokens.weight"] = w(vocab, h)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        part = shards[min(2, i * 3 // n_layers)]
        part[p + "self_attn.q_proj.weight"] = w(nh * hd, h)
        part[p + "self_attn.k_proj.weight"] = w(kv * hd, h)
        part[p + "self_attn.v_proj.weight"] = w(kv * hd, h)
        part[p + "self_attn.o_proj.weight"] = w(h, nh * hd)
        part[p + "mlp.gate_proj.weight"] = w(im, h)
        part[p + "mlp.up_proj.weight"] = w(im, h)
        part[p + "mlp.down_proj.weight"] = w(h, im)
        part[p + "input_layernorm.weight"] = w(h)
        part[p + "post_attention_layernorm.weight"] = w(h)
    shards[2]["model.norm.weight"] = w(h)
    shards[2]["lm_head.weight"] = w(vocab, h)
    weight_map = {}
    total = 0
    os.makedirs(directory, exist_ok=True)
    for k, part in enumerate(shards):
        name = f"model-{k + 1:05d}-of-00003.safetensors"
        save_file(part, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update((n, name) for n in part)
        total += sum(a.nbytes for a in part.values())
    with open(os.path.join(directory, INDEX), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    return total


# ----------------------------------------------------------------------------- the model


def specs(cfg: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], str, tuple[Any, ...]]]:
    """Leaf name -> (shape, dtype, PartitionSpec entries) of the scanned model."""
    h, nh, kv, hd, im, n, vocab = cfg
    return {
        "embed.embedding": ((vocab, h), "bfloat16", ("model", "data")),
        "layers.attn.q": ((n, h, nh, hd), "bfloat16", (None, "data", "model")),
        "layers.attn.k": ((n, h, kv, hd), "bfloat16", (None, "data", "model")),
        "layers.attn.v": ((n, h, kv, hd), "bfloat16", (None, "data", "model")),
        "layers.attn.o": ((n, nh, hd, h), "bfloat16", (None, "model", None, "data")),
        "layers.mlp.gate": ((n, h, im), "bfloat16", (None, "data", "model")),
        "layers.mlp.up": ((n, h, im), "bfloat16", (None, "data", "model")),
        "layers.mlp.down": ((n, im, h), "bfloat16", (None, "model", "data")),
        "layers.attn_norm": ((n, h), "float32", ()),
        "layers.mlp_norm": ((n, h), "float32", ()),
        "final_norm.scale": ((h,), "float32", ()),
        "lm_head.kernel": ((h, vocab), "bfloat16", ("data", "model")),
    }


def rules(cfg: tuple[int, ...]) -> Any:
    """The remap table: 12 lines."""
    from safecodec import remap as R

    nh, kv, hd = cfg[1], cfg[2], cfg[3]
    return R.Rules(
        R.map("model.embed_tokens.weight", "embed.embedding"),
        R.map("model.layers.{i}.self_attn.q_proj.weight", "layers.attn.q",
              R.transpose(1, 0), R.split_axis(1, (nh, hd)), stack="i"),
        R.map("model.layers.{i}.self_attn.{p}_proj.weight", "layers.attn.{p}",
              R.transpose(1, 0), R.split_axis(1, (kv, hd)), stack="i"),
        R.map("model.layers.{i}.self_attn.o_proj.weight", "layers.attn.o",
              R.transpose(1, 0), R.split_axis(0, (nh, hd)), stack="i"),
        R.map("model.layers.{i}.mlp.{p}_proj.weight", "layers.mlp.{p}", R.transpose(1, 0), stack="i"),
        R.map("model.layers.{i}.input_layernorm.weight", "layers.attn_norm", stack="i"),
        R.map("model.layers.{i}.post_attention_layernorm.weight", "layers.mlp_norm", stack="i"),
        R.map("model.norm.weight", "final_norm.scale"),
        R.map("lm_head.weight", "lm_head.kernel", R.transpose(1, 0)),
    )


def hand_transforms(get: Any, cfg: tuple[int, ...], xp: Any) -> dict[str, Any]:
    """The hand-written conversion every loader repeats (``xp``: numpy or jax.numpy)."""
    h, nh, kv, hd, _, n, _ = cfg

    def stack(fmt: str, f: Any) -> Any:
        return xp.stack([f(get(fmt.format(i))) for i in range(n)])

    lay = "model.layers.{}."
    return {
        "embed.embedding": get("model.embed_tokens.weight"),
        "layers.attn.q": stack(lay + "self_attn.q_proj.weight", lambda a: a.T.reshape(h, nh, hd)),
        "layers.attn.k": stack(lay + "self_attn.k_proj.weight", lambda a: a.T.reshape(h, kv, hd)),
        "layers.attn.v": stack(lay + "self_attn.v_proj.weight", lambda a: a.T.reshape(h, kv, hd)),
        "layers.attn.o": stack(lay + "self_attn.o_proj.weight", lambda a: a.T.reshape(nh, hd, h)),
        "layers.mlp.gate": stack(lay + "mlp.gate_proj.weight", lambda a: a.T),
        "layers.mlp.up": stack(lay + "mlp.up_proj.weight", lambda a: a.T),
        "layers.mlp.down": stack(lay + "mlp.down_proj.weight", lambda a: a.T),
        "layers.attn_norm": stack(lay + "input_layernorm.weight", lambda a: a.astype(xp.float32)),
        "layers.mlp_norm": stack(lay + "post_attention_layernorm.weight",
                                 lambda a: a.astype(xp.float32)),
        "final_norm.scale": get("model.norm.weight").astype(xp.float32),
        "lm_head.kernel": get("lm_head.weight").T,
    }


# ----------------------------------------------------------------------------- one load


def rss_anon() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler(threading.Thread):
    """Samples RssAnon every millisecond until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = rss_anon()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.001)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, rss_anon())
        return self.peak


def mmap_views(path: str) -> dict[str, np.ndarray]:
    """A safetensors file mapped whole; NumPy views of every tensor (tunix-style)."""
    import ml_dtypes

    dtypes = {"BF16": ml_dtypes.bfloat16, "F32": np.float32, "F16": np.float16}
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    n = int.from_bytes(mm[:8], "little")
    header = json.loads(mm[8:8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    return {k: np.frombuffer(mm, dtypes[v["dtype"]], count=int(np.prod(v["shape"])),
                             offset=base + v["data_offsets"][0]).reshape(v["shape"])
            for k, v in header.items()}


def worker(method: str, ckpt: str, cfg: tuple[int, ...], out: str) -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    sys.path.insert(0, ROOT)
    import safecodec as sc
    from safecodec import remap  # imports are not timed (load_tree is imported lazily)

    assert sc.load_tree is not None and remap.Rules is not None

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    shardings = {k: NamedSharding(mesh, P(*spec)) for k, (_, _, spec) in specs(cfg).items()}
    like: dict[str, Any] = {}
    for k, (shape, dtype, _) in specs(cfg).items():
        node = like
        *head, last = k.split(".")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=shardings[k])
    table = rules(cfg)
    files = sorted(os.path.join(ckpt, f) for f in os.listdir(ckpt) if f.endswith(".safetensors"))
    start = rss_anon()
    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    if method == FLOOR:
        flat = {}
        blocks = []
        for shape, dtype, _ in specs(cfg).values():
            block = np.empty(int(np.prod(shape)) * np.dtype(jnp.dtype(dtype)).itemsize, np.uint8)
            block.fill(1)  # every new page faulted in and written once
            blocks.append(block)
    elif method == "safecodec":
        tree = sc.load_tree(ckpt, like=like, remap=table)
        flat = {k: _get(tree, k) for k in shardings}
    elif method == "tunix-style":
        views: dict[str, np.ndarray] = {}
        for f in files:
            views.update(mmap_views(f))
        host = hand_transforms(views.__getitem__, cfg, np)
        flat = {k: jax.device_put(v, shardings[k]) for k, v in host.items()}
        del host
    else:
        from safetensors.flax import load_file

        arrays: dict[str, Any] = {}
        for f in files:
            arrays.update(load_file(f))
        moved = hand_transforms(arrays.__getitem__, cfg, jnp)
        flat = {k: jax.device_put(v, shardings[k]) for k, v in moved.items()}
        del arrays, moved
    jax.block_until_ready(flat)
    wall = time.perf_counter() - t0
    peak = sampler.stop()
    params = sum(int(np.prod(s)) * np.dtype(jnp.dtype(d)).itemsize for s, d, _ in specs(cfg).values())
    digest = hashlib.sha256()
    for k in sorted(flat):  # (the floor has no values: its digest is of nothing)
        assert flat[k].sharding == shardings[k], (method, k)
        digest.update(np.asarray(flat[k]).tobytes())
    with open(out, "w") as fh:
        json.dump({"method": method, "wall_s": wall, "peak_anon_bytes": peak - start,
                   "params_bytes": params, "digest": digest.hexdigest()}, fh)


def _get(tree: Any, name: str) -> Any:
    for part in name.split("."):
        tree = tree[part]
    return tree


# ----------------------------------------------------------------------------- driver


def run_one(method: str, ckpt: str, cfg: tuple[int, ...], tmp: str) -> dict[str, Any]:
    out = os.path.join(tmp, f"{method}.json")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
    subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", method, "--ckpt", ckpt,
                    "--cfg", ",".join(map(str, cfg)), "--result", out], env=env, check=True)
    with open(out) as fh:
        result: dict[str, Any] = json.load(fh)
    return result


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m, rs in runs.items():
        walls = [r["wall_s"] for r in rs]
        peaks = [r["peak_anon_bytes"] for r in rs]
        out[m] = {"wall_s": {"median": statistics.median(walls), "min": min(walls), "max": max(walls)},
                  "peak_anon_bytes": {"median": statistics.median(peaks), "min": min(peaks),
                                      "max": max(peaks)},
                  "params_bytes": rs[0]["params_bytes"], "digest": rs[0]["digest"]}
    base = out["tunix-style"]["wall_s"]["median"]
    for m in out:
        out[m]["wall_vs_tunix"] = out[m]["wall_s"]["median"] / base
        out[m]["peak_vs_params"] = out[m]["peak_anon_bytes"]["median"] / out[m]["params_bytes"]
        # the same ratio within each round (both ran back to back): less exposed to drift
        per_round = [r["wall_s"] / t["wall_s"] for r, t in zip(runs[m], runs["tunix-style"], strict=True)]
        out[m]["wall_vs_tunix_per_round"] = {"median": statistics.median(per_round),
                                             "min": min(per_round), "max": max(per_round)}
    return out


def plot(summary: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(summary)
    for ax, key, scale, label in ((axes[0], "wall_s", 1.0, "wall time (s)"),
                                  (axes[1], "peak_anon_bytes", 1 / 2**20, "peak anonymous memory (MiB)")):
        med = [summary[n][key]["median"] * scale for n in names]
        lo = [(summary[n][key]["median"] - summary[n][key]["min"]) * scale for n in names]
        hi = [(summary[n][key]["max"] - summary[n][key]["median"]) * scale for n in names]
        ax.barh(names, med, xerr=[lo, hi], color=["#2b7bba", "#999999", "#cc7a29", "#dddddd"][:len(names)])
        ax.set_xlabel(label)
        if key == "wall_s":
            ax.set_xscale("log")  # safetensors.flax is tens of times slower
        ax.invert_yaxis()
    axes[1].axvline(summary[names[0]]["params_bytes"] / 2**20, color="k", ls="--", lw=1)
    axes[1].text(summary[names[0]]["params_bytes"] / 2**20, -0.45, " params", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="the 603 MB checkpoint of the issue")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--worker", choices=RUNS, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--cfg", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.ckpt, tuple(int(x) for x in args.cfg.split(",")), args.result)
        return 0
    cfg = FULL if args.full else SMALL
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        data = write_checkpoint(ckpt, cfg)
        print(f"checkpoint: {data / 1e6:.0f} MB bf16, {cfg[5]} layers, GQA {cfg[1]}/{cfg[2]}, "
              "3 shards (reference wheel)", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in RUNS}
        for r in range(args.rounds):
            order = RUNS[r % len(RUNS):] + RUNS[:r % len(RUNS)]  # alternate who goes first
            for m in order:
                runs[m].append(run_one(m, ckpt, cfg, tmp))
                print(f"round {r}: {m:17s} {runs[m][-1]['wall_s']:.3f} s  "
                      f"{runs[m][-1]['peak_anon_bytes'] / 2**20:.0f} MiB", flush=True)
    summary = summarise(runs)
    digests = {summary[m]["digest"] for m in METHODS}
    if len(digests) != 1:
        raise SystemExit(f"the methods disagree on the values: {digests}")
    import jax

    meta = {"checkpoint_bytes": data, "config": dict(zip(
        ("hidden", "heads", "kv_heads", "head_dim", "mlp", "layers", "vocab"), cfg, strict=True)),
        "rounds": args.rounds, "python": sys.version.split()[0], "jax": jax.__version__,
        "cpus": os.cpu_count(), "devices": "8 CPU devices, mesh 2x4 (data, model)"}
    os.makedirs(args.out, exist_ok=True)
    stem = "remap-full" if args.full else "remap"
    with open(os.path.join(args.out, f"{stem}.json"), "w") as fh:
        json.dump({"meta": meta, "summary": summary, "runs": runs}, fh, indent=2)
    title = (f"HF Llama checkpoint ({data / 1e6:.0f} MB bf16) into a scanned model on 8 CPU "
             f"devices; medians of {args.rounds}, bars min-max")
    plot(summary, os.path.join(args.out, f"{stem}.png"), title)
    print(f"\n{'method':18s} {'wall (s)':>18s} {'vs tunix':>9s} {'per round':>14s} "
          f"{'peak anon (MiB)':>20s} {'vs params':>10s}")
    for m, s in summary.items():
        w, p, pr = s["wall_s"], s["peak_anon_bytes"], s["wall_vs_tunix_per_round"]
        print(f"{m:18s} {w['median']:7.3f} [{w['min']:.3f}-{w['max']:.3f}] {s['wall_vs_tunix']:8.2f}x "
              f"[{pr['min']:.2f}-{pr['max']:.2f}]x "
              f"{p['median'] / 2**20:8.0f} [{p['min'] / 2**20:.0f}-{p['max'] / 2**20:.0f}] "
              f"{s['peak_vs_params']:9.2f}x")
    print(f"params: {summary['safecodec']['params_bytes'] / 2**20:.0f} MiB; values identical "
          f"for every loader; {FLOOR!r}: the parameters' bytes in fresh memory, written once "
          "(no loader that builds new arrays can be faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
