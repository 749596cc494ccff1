"""safecodec.remap under real shardings: 8 CPU devices in one process; run by
``test_remap.py``.

Usage: ``python tests/helpers/remap_sharding_worker.py CKPT_DIR OUT_DIR``. Loads the
Llama-shaped checkpoint in CKPT_DIR into sharded templates (a scanned NNX state with
shardings, and plain ShapeDtypeStructs), then every operation under many shardings of a
2x4 mesh; checks each device's shard against NumPy; writes ``OUT_DIR/result.json``.
"""

from __future__ import annotations

# ruff: noqa: E402  (the device count must be set before anything imports jax)
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cpu_devices import force_cpu_devices

force_cpu_devices(8)

import itertools
import json
import tracemalloc

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

import _llama_ckpt as ck

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from safecodec import remap as R

MESH = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))


def specs(shape: tuple[int, ...]) -> list[P]:
    """Every PartitionSpec of up to two mesh axes that divides ``shape``."""
    out = [P()]
    axes = {"data": 2, "model": 4}
    for d in range(len(shape)):
        for a, n in axes.items():
            if shape[d] % n == 0:
                out.append(P(*([None] * d), a))
    for d1, d2 in itertools.permutations(range(len(shape)), 2):
        if shape[d1] % 2 == 0 and shape[d2] % 4 == 0:
            spec = [None] * len(shape)
            spec[d1], spec[d2] = "data", "model"
            out.append(P(*spec))
    return out


def check(arr: jax.Array, want: np.ndarray, where: str) -> None:
    assert arr.shape == want.shape and arr.dtype == want.dtype, (where, arr.shape, arr.dtype)
    assert len(arr.addressable_shards) == 8, where
    for shard in arr.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index], err_msg=where)


OPS = [
    ("transpose", (R.transpose(2, 0, 1),), lambda a: a.transpose(2, 0, 1)),
    ("split", (R.split_axis(1, (2, 4)),), lambda a: a.reshape(4, 2, 4, 12)),
    ("split_inner", (R.split_axis(2, (3, 4)),), lambda a: a.reshape(4, 8, 3, 4)),
    ("merge", (R.merge_axes(1, 2),), lambda a: a.reshape(4, 96)),
    ("transpose_split", (R.transpose(2, 1, 0), R.split_axis(0, (4, 3))),
     lambda a: a.transpose(2, 1, 0).reshape(4, 3, 8, 4)),
    ("transpose_merge", (R.transpose(1, 0, 2), R.merge_axes(1, 2)),
     lambda a: a.transpose(1, 0, 2).reshape(8, 48)),
    ("index", (R.index(slice(None, None, -1), slice(0, 8, 2), slice(4, None)),),
     lambda a: a[::-1, 0:8:2, 4:]),
    ("index_int", (R.index(Ellipsis, 5),), lambda a: a[..., 5]),
    ("astype", (R.astype("float32"), R.transpose(1, 0, 2)),
     lambda a: a.astype(np.float32).transpose(1, 0, 2)),
]


def main() -> None:
    ckpt, out_dir = sys.argv[1], sys.argv[2]
    checked = 0
    t = ck.tensors()
    want = ck.reference(t)
    # 1. the Llama checkpoint into sharded ShapeDtypeStructs, every leaf on several specs
    for round_ in range(3):
        like: dict[str, object] = {}
        for name, arr in want.items():
            options = specs(arr.shape)
            like[name] = jax.ShapeDtypeStruct(arr.shape, arr.dtype,
                                              sharding=NamedSharding(MESH, options[(round_ * 3 + len(name)) % len(options)]))
        nested = ck.nest(like)
        plan = R.plan(ckpt, ck.rules(), like=nested)
        summary = plan.summary()
        loaded = plan.load()
        for name, arr in want.items():
            node = loaded
            for part in name.split("."):
                node = node[part]
            check(node, arr, f"llama round {round_} {name}")
            checked += 1
        # one read per distinct block (replicated blocks once): a fully replicated leaf
        # reads its part of the sources once, not once per device
        for row in summary["targets"]:
            sharding = like[row.target].sharding  # type: ignore[attr-defined]
            distinct = {str(i) for i in sharding.devices_indices_map(row.shape).values()}
            assert row.blocks == len(distinct), (row, distinct)
            if len(distinct) == 1:
                part = int(np.prod(row.shape)) * t[row.sources[0]].dtype.itemsize
                assert row.bytes == part, row
    # 2. every operation under every sharding that divides the target
    src = (np.arange(4 * 8 * 12, dtype=np.float32).reshape(4, 8, 12) - 100).astype(ck.BF16)
    path = os.path.join(out_dir, "ops.safetensors")
    save_file({"w": src}, path)
    for name, ops, forward in OPS:
        target = forward(src)
        for spec in specs(target.shape):
            like = {"x": jax.ShapeDtypeStruct(target.shape, target.dtype,
                                              sharding=NamedSharding(MESH, spec))}
            with R.plan(path, R.Rules(R.map("w", "x", *ops)), like=like) as plan:
                s = plan.summary()
                got = plan.load()["x"]
            check(got, target, f"{name} {spec}")
            # a block never reads more than the source; splitting the target reads less
            distinct = len({str(i) for i in like["x"].sharding.devices_indices_map(target.shape).values()})
            per_block = int(np.prod(target.shape)) * src.itemsize // distinct
            if name in ("transpose", "merge", "transpose_split", "transpose_merge", "astype"):
                # every block's box is exactly its elements (astype: read in bf16)
                assert s["total"]["bytes"] == per_block * distinct, (name, spec, s["total"])
            else:  # a split's inner axis sharded: bounding boxes, never more than the source
                assert s["total"]["bytes"] <= src.nbytes * distinct, (name, spec, s["total"])
            checked += 1
    # 3. a column-sharded (N, 2) tensor: the plan is one box per block, memory ~ bytes
    n = 1 << 20
    col = np.arange(2 * n, dtype=np.float32).reshape(n, 2)
    cpath = os.path.join(out_dir, "col.safetensors")
    save_file({"c": col}, cpath)
    mesh2 = Mesh(np.array(jax.devices()[:2]), ("c",))
    like = {"c": jax.ShapeDtypeStruct((n, 2), np.float32, sharding=NamedSharding(mesh2, P(None, "c")))}
    tracemalloc.start()
    with R.plan(cpath, R.Rules(R.map("c", "c")), like=like) as plan:
        blocks = plan.summary()["targets"][0].blocks
        got = plan.load()["c"]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    for shard in got.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), col[shard.index])
    # 4. a block held by several devices is one host copy that every CPU device aliases
    x = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    apath = os.path.join(out_dir, "alias.safetensors")
    save_file({"x": x}, apath)
    rows = NamedSharding(MESH, P("data"))  # 2 distinct blocks, each on 4 devices
    for sharding, blocks_ in ((NamedSharding(MESH, P()), 1), (rows, 2)):
        like = {"t": jax.ShapeDtypeStruct((32, 64), np.float32, sharding=sharding)}
        got = R.plan(apath, R.Rules(R.map("x", "t", R.transpose(1, 0))), like=like).load()["t"]
        check(got, x.T, f"aliased {sharding.spec}")
        ptrs = {s.data.unsafe_buffer_pointer() for s in got.addressable_shards}
        assert len(ptrs) == blocks_, (sharding.spec, ptrs)
        checked += 1
    with open(os.path.join(out_dir, "result.json"), "w") as fh:
        json.dump({"checked": checked, "column_blocks": blocks,
                   "column_peak_ratio": peak / col.nbytes}, fh)


if __name__ == "__main__":
    main()
