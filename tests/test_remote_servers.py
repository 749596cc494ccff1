"""Remote reads and writes against real servers on 127.0.0.1: a Range-honouring HTTP server
(fsspec's HTTP filesystem) and a moto S3 server (s3fs). Every lazy read asserts the values
and the bytes the server sent: header block + requested bytes + a small per-request
overhead, never the whole file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import safecodec as sc
from _cpu_devices import cpu_device_env
from safecodec import _resolve, _sharded
from safecodec._reader import FIRST_READ

#: Fixtures (servers on 127.0.0.1, memory:// prefixes) live in tests/helpers/conftest_remote.py.
pytest_plugins = ["conftest_remote"]

#: Bytes of HTTP response headers (status line, Content-Length, ETag...) allowed per
#: request on top of the body, when counting at the socket.
HTTP_OVERHEAD = 1024


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "embed": rng.standard_normal((512, 256)).astype(np.float32),  # 512 KiB
        "w1": rng.standard_normal((256, 256)).astype(np.float32),     # 256 KiB
        "b1": rng.standard_normal(256).astype(np.float32),
        "steps": np.array(7, np.int64),
    }


# ----------------------------------------------------------------------------- HTTP


@pytest.fixture
def served(http_server, tmp_path_factory):
    """A model file in the HTTP server's root; yields (url, tensors, local path)."""
    t = _model()
    name = f"m-{os.urandom(4).hex()}.safetensors"
    path = os.path.join(http_server.root, name)
    sc.save_file(t, path)
    http_server.counter.reset()
    http_server.ignore_range = False
    yield http_server.url(name), t, path
    http_server.ignore_range = False


def test_http_lazy_open_one_tensor_and_slice(http_server, served):
    url, t, path = served
    size = os.path.getsize(path)
    c = http_server.counter
    with sc.safe_open(url) as f:
        # One HEAD for the size, one GET for the header block.
        assert (c.requests, c.bytes_sent) == (2, FIRST_READ)
        assert f.stats == {"bytes_read": FIRST_READ, "requests": 1, "metadata_requests": 1}
        assert f.keys() == sorted(t)
        w1 = f.get_tensor("w1")
        np.testing.assert_array_equal(w1, t["w1"])
        assert c.bytes_sent == FIRST_READ + t["w1"].nbytes
        rows = f.get_slice("embed")[100:104]
        np.testing.assert_array_equal(rows, t["embed"][100:104])
        assert c.bytes_sent == FIRST_READ + t["w1"].nbytes + 4 * 256 * 4
        assert c.requests == 4
        assert f.stats["bytes_read"] == c.bytes_sent
    assert c.bytes_sent < size / 2


def test_http_whole_load_streams_once(http_server, served):
    url, t, path = served
    size = os.path.getsize(path)
    out = sc.load_file(url)
    for name, arr in t.items():
        np.testing.assert_array_equal(out[name], arr)
    data_start = sc.read_header(path).data_start
    assert http_server.counter.bytes_sent == FIRST_READ + size - data_start


def test_http_server_ignoring_ranges_is_detected(http_server, served):
    url, _, _ = served
    http_server.ignore_range = True
    with pytest.raises(sc.RemoteIOError, match=r"ignore Range requests.*stopped after"):
        sc.safe_open(url)


def test_http_changed_object_is_reported(http_server, served):
    url, t, path = served
    with sc.safe_open(url) as f:
        sc.save_file({k: v + 1 for k, v in t.items()}, path)  # same size, new ETag
        with pytest.raises(sc.RemoteIOError, match=r"changed since it was opened.*412"):
            f.get_tensors()


def test_http_truncated_object_is_reported(http_server, served):
    url, _, path = served
    with sc.safe_open(url) as f:
        os.truncate(path, FIRST_READ + 1000)
        with pytest.raises(sc.RemoteIOError, match="changed since it was opened"):
            f.get_tensor("embed")


def test_http_name_without_suffix_is_not_downloaded(http_server, served):
    """Deciding whether a URL is a sharded directory costs one HEAD, never a GET of it."""
    _, t, path = served
    other = path[: -len(".safetensors")] + ".bin"
    os.replace(path, other)
    c = http_server.counter
    with sc.safe_open(http_server.url(os.path.basename(other))) as f:
        np.testing.assert_array_equal(f.get_tensor("b1"), t["b1"])
    assert c.bytes_sent == FIRST_READ + t["b1"].nbytes
    assert [line.split()[0] for line in c.log] == ["HEAD", "HEAD", "GET", "GET"]


def test_http_cannot_be_written(http_server):
    with pytest.raises(sc.RemoteIOError, match=r"writing .* failed"):
        sc.save_file({"a": np.ones(3)}, http_server.url("new.safetensors"))


def test_http_sharded_reads_only_the_needed_shard(http_server, tmp_path):
    t = _model(1)
    d = os.path.join(http_server.root, f"sharded-{os.urandom(4).hex()}")
    sc.save_file(t, d, max_shard_size=300 * 1024)
    http_server.counter.reset()
    base = http_server.url(os.path.basename(d))
    with sc.safe_open(base + "/model.safetensors.index.json") as f:
        assert f.keys() == sorted(t)
        shard = f.weight_map["b1"]
        np.testing.assert_array_equal(f.get_tensor("b1"), t["b1"])
    log = http_server.counter.log
    touched = {line.split()[1].rsplit("/", 1)[-1] for line in log}
    assert touched == {"model.safetensors.index.json", shard}
    out = sc.load_file(base + "/model.safetensors.index.json")
    for name, arr in t.items():
        np.testing.assert_array_equal(out[name], arr)


# ----------------------------------------------------------------------------- S3


def _overhead(stats: dict[str, int]) -> int:
    return HTTP_OVERHEAD * (stats["requests"] + stats.get("metadata_requests", 0))


def test_s3_save_lazy_open_slice_metadata_and_bytes(s3_server):
    bucket = s3_server.new_bucket()
    so = s3_server.storage_options
    url = f"s3://{bucket}/ckpt/model.safetensors"
    t = _model(2)
    sc.save_file(t, url, {"step": "7"}, storage_options=so)
    fs = s3_server.filesystem()
    assert fs.ls(f"{bucket}/ckpt", detail=False) == [f"{bucket}/ckpt/model.safetensors"]
    size = fs.size(url)
    assert fs.cat(url) == sc.save(t, {"step": "7"})

    c = s3_server.counter
    # Metadata only: the header block and nothing else.
    c.reset()
    with sc.safe_open(url, storage_options=so) as f:
        assert f.metadata() == {"step": "7"}
        stats = f.stats
    assert stats["requests"] == 1
    assert FIRST_READ <= c.bytes_sent <= FIRST_READ + _overhead(stats)

    # One tensor.
    c.reset()
    with sc.safe_open(url, storage_options=so) as f:
        np.testing.assert_array_equal(f.get_tensor("b1"), t["b1"])
        stats = f.stats
    assert stats["bytes_read"] == FIRST_READ + t["b1"].nbytes
    assert stats["bytes_read"] <= c.bytes_sent <= stats["bytes_read"] + _overhead(stats)

    # A row slice of the largest tensor: its rows only.
    c.reset()
    with sc.safe_open(url, storage_options=so) as f:
        np.testing.assert_array_equal(f.get_slice("embed")[-3:], t["embed"][-3:])
        stats = f.stats
    assert stats["bytes_read"] == FIRST_READ + 3 * 256 * 4
    assert stats["bytes_read"] <= c.bytes_sent <= stats["bytes_read"] + _overhead(stats)
    assert c.bytes_sent < size / 4

    # The whole file: streamed once, right values.
    c.reset()
    out = sc.load_file(url, storage_options=so)
    for name, arr in t.items():
        np.testing.assert_array_equal(out[name], arr)
    assert size - 1024 <= c.bytes_sent - FIRST_READ <= size + 64 * HTTP_OVERHEAD


def test_s3_output_loads_in_reference_wheel(s3_server):
    import _oracle

    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/m.safetensors"
    t = _model(3)
    sc.save_file(t, url, storage_options=s3_server.storage_options)
    verdict = _oracle.deserialize(s3_server.filesystem().cat(url))
    assert verdict.ok, verdict.error
    for name, arr in t.items():
        _code, shape, raw = verdict.tensors[name]
        assert (shape, raw) == (arr.shape, arr.tobytes()), name


def test_s3_failed_write_leaves_no_object(s3_server):
    class Liar:
        shape = (4,)
        dtype = np.dtype(np.float32)

        def __array__(self, dtype=None, copy=None):
            return np.zeros(5, np.float32)

    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/m.safetensors"
    with pytest.raises(sc.SafecodecError, match="changed shape"):
        sc.save_file({"a": np.ones(10, np.float32), "z": Liar()}, url,
                     storage_options=s3_server.storage_options)
    assert s3_server.filesystem().ls(bucket, detail=False) == []


def test_s3_sharded_save_and_lazy_read(s3_server):
    bucket = s3_server.new_bucket()
    so = s3_server.storage_options
    t = _model(4)
    target = _resolve.resolve_target(f"s3://{bucket}/run", storage_options=so)
    index = _sharded.save_sharded(t, target, max_shard_size="300KiB")
    assert index == f"s3://{bucket}/run/model.safetensors.index.json"
    fs = s3_server.filesystem()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/run", detail=False))
    # embed (512 KiB) is over the limit: a shard of its own; the rest fits in one.
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json"]
    c = s3_server.counter
    c.reset()
    with sc.safe_open(f"s3://{bucket}/run", storage_options=so) as f:
        np.testing.assert_array_equal(f.get_tensor("w1"), t["w1"])
        stats = f.stats
    # The index, one shard's header block, one tensor; no other shard touched.
    assert stats["bytes_read"] == fs.size(index) + FIRST_READ + t["w1"].nbytes
    assert stats["bytes_read"] <= c.bytes_sent <= stats["bytes_read"] + _overhead(stats) + 4 * HTTP_OVERHEAD


_JAX_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import safecodec as sc

    url, so, seed = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("x",))
    rows = NamedSharding(mesh, P("x"))
    rep = NamedSharding(mesh, P())
    sharding = lambda name, shape, dtype: rows if shape and shape[0] % 8 == 0 else rep
    rng = np.random.default_rng(seed)
    want = {"embed": rng.standard_normal((512, 256)).astype(np.float32),
            "w1": rng.standard_normal((256, 256)).astype(np.float32),
            "b1": rng.standard_normal(256).astype(np.float32)}
    with sc.safe_open(url, framework="jax", sharding=sharding, storage_options=so) as f:
        out = f.get_tensors()
        stats = f.stats
    for name, arr in want.items():
        got = out[name]
        assert got.sharding == (rows if arr.shape[0] % 8 == 0 else rep), (name, got.sharding)
        np.testing.assert_array_equal(np.asarray(got), arr)
        for shard in got.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), arr[shard.index])
    print(json.dumps(stats))
    """
)


def test_s3_sharded_jax_load(s3_server, tmp_path):
    pytest.importorskip("jax", reason="the sharded JAX load needs jax")
    bucket = s3_server.new_bucket()
    so = s3_server.storage_options
    t = _model(5)
    del t["steps"]
    sc.save_file(t, f"s3://{bucket}/run", max_shard_size="600KiB", storage_options=so)
    script = tmp_path / "child.py"
    script.write_text(_JAX_CHILD)
    env = cpu_device_env(8, PYTHONPATH=os.getcwd())
    s3_server.counter.reset()
    proc = subprocess.run(
        [sys.executable, str(script), f"s3://{bucket}/run/model.safetensors.index.json",
         json.dumps(so), "5"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    data = sum(a.nbytes for a in t.values())
    # Every byte of every tensor once (row blocks are disjoint; replicated ones read once),
    # plus the index and one header block per shard.
    assert data <= stats["bytes_read"] <= data + 2 * FIRST_READ + 4096
    sent = s3_server.counter.bytes_sent
    assert stats["bytes_read"] <= sent <= stats["bytes_read"] + _overhead(stats) + 4 * HTTP_OVERHEAD
