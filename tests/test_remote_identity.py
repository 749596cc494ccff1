"""A remote object replaced after its header was read (issue 11, item 1), and connection
faults around the identity checks (issue 11, item 15), against real servers on 127.0.0.1.

Every replacement below keeps the object's SIZE and header and changes only the data bytes,
so nothing but the object's identity (HTTP ETag, S3 ETag or version id, memory:// creation
time) can tell. On HTTP, memory:// and S3 without versioning every path must then raise
RemoteIOError; on a versioned S3 bucket reads are pinned to the version opened, so they
must return the ORIGINAL values (and fail once that version is deleted).

Paths that open and read in one call (``load_file``, ``safecodec.jax.load_file``,
``load_tree``, sharded loads) get the replacement injected between the header read and the
first data read (:func:`replace_before_first_data_read`).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import safecodec as sc
from _net import LOCALHOST, TcpProxy, shut
from safecodec import _remote

#: Fixtures (servers on 127.0.0.1, memory:// prefixes) live in tests/helpers/conftest_remote.py.
pytest_plugins = ["conftest_remote"]


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    """~800 KiB: well past the reader's first (header) read, so data reads hit the wire."""
    rng = np.random.default_rng(seed)
    return {
        "embed": rng.standard_normal((512, 256)).astype(np.float32),
        "w1": rng.standard_normal((256, 256)).astype(np.float32),
        "b1": rng.standard_normal(256).astype(np.float32),
    }


def _mutated(blob: bytes) -> bytes:
    """The same file with every data byte inverted: same size, same header, other values."""
    start = 8 + int.from_bytes(blob[:8], "little")
    return blob[:start] + bytes(255 - b for b in blob[start:])


# ----------------------------------------------------------------------------- stores


class Store:
    """A place on one backend where the test puts objects and replaces them."""

    def __init__(self, kind: str, base: str, put: Callable[[str, bytes], None],
                 storage_options: dict[str, Any] | None = None, extra: Any = None) -> None:
        self.kind = kind
        self.base = base
        self._put = put
        self.so = storage_options
        self.extra = extra

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def put(self, name: str, data: bytes) -> None:
        self._put(name, data)

    def put_dir(self, name: str, local: str) -> None:
        for f in sorted(os.listdir(local)):
            with open(os.path.join(local, f), "rb") as fh:
                self.put(f"{name}/{f}", fh.read())


def _memory_store() -> Store:
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/ident-{uuid.uuid4().hex[:12]}"
    return Store("memory", f"memory://{root}", lambda n, d: fs.pipe_file(f"{root}/{n}", d))


def _http_store(http_server: Any) -> Store:
    prefix = f"ident-{uuid.uuid4().hex[:8]}"

    def put(name: str, data: bytes) -> None:
        path = os.path.join(http_server.root, prefix, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".part"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)  # a new mtime: a new ETag

    return Store("http", http_server.url(prefix).rstrip("/"), put)


def _s3_client(s3: Any) -> Any:
    boto3 = pytest.importorskip("boto3")
    return boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="testing",
                        aws_secret_access_key="testing", region_name="us-east-1")


def _s3_store(s3: Any, versioned: bool) -> Store:
    bucket = s3.new_bucket()
    client = None
    if versioned:
        client = _s3_client(s3)
        client.put_bucket_versioning(Bucket=bucket,
                                     VersioningConfiguration={"Status": "Enabled"})
    fs = s3.filesystem()

    def put(name: str, data: bytes) -> None:
        fs.pipe_file(f"{bucket}/{name}", data)
        fs.invalidate_cache()

    return Store("s3-versioned" if versioned else "s3", f"s3://{bucket}", put,
                 s3.storage_options, extra=(client, bucket))


@pytest.fixture(params=["memory", "s3", "http"])
def store(request: pytest.FixtureRequest) -> Store:
    """Each backend whose reads must detect a replaced object."""
    if request.param == "memory":
        return _memory_store()
    if request.param == "http":
        return _http_store(request.getfixturevalue("http_server"))
    return _s3_store(request.getfixturevalue("s3_server"), versioned=False)


def replace_before_first_data_read(monkeypatch: pytest.MonkeyPatch, store: Store, name: str,
                                   data: bytes) -> list[str]:
    """Replace ``name`` with ``data`` just before the first read of anything but a header
    from it: the header was read from the old object, the data is asked of the new one.
    Returns a list that records the replacement (the test asserts it happened)."""
    done: list[str] = []
    original = _remote.FsspecSource._fetch

    def fetch(self: Any, spans: Any, what: str, *args: Any, **kwargs: Any) -> Any:
        if not done and what != "header" and self.path.endswith("/" + name):
            done.append(what)
            store.put(name, data)
        return original(self, spans, what, *args, **kwargs)

    monkeypatch.setattr(_remote.FsspecSource, "_fetch", fetch)
    return done


CHANGED = r"changed|disappeared"


# ----------------------------------------------------------------------------- item 1


def test_lazy_reads_after_replacement_raise(store: Store) -> None:
    blob = sc.save(_model())
    store.put("m.safetensors", blob)
    with sc.safe_open(store.url("m.safetensors"), storage_options=store.so) as f:
        store.put("m.safetensors", _mutated(blob))
        with pytest.raises(sc.RemoteIOError, match=CHANGED):
            f.get_tensor("embed")
        with pytest.raises(sc.RemoteIOError, match=CHANGED):
            f.get_slice("w1")[3:40, ::2]
        with pytest.raises(sc.RemoteIOError, match=CHANGED):
            f.get_tensors()


def test_load_file_replaced_between_header_and_data_raises(store: Store, monkeypatch) -> None:
    blob = sc.save(_model(1))
    store.put("m.safetensors", blob)
    done = replace_before_first_data_read(monkeypatch, store, "m.safetensors", _mutated(blob))
    with pytest.raises(sc.RemoteIOError, match=CHANGED):
        sc.load_file(store.url("m.safetensors"), storage_options=store.so)
    assert done


def test_jax_load_file_replaced_between_header_and_data_raises(store: Store,
                                                                 monkeypatch) -> None:
    scj = pytest.importorskip("safecodec.jax")
    blob = sc.save(_model(2))
    store.put("m.safetensors", blob)
    done = replace_before_first_data_read(monkeypatch, store, "m.safetensors", _mutated(blob))
    with pytest.raises(sc.RemoteIOError, match=CHANGED):
        scj.load_file(store.url("m.safetensors"), storage_options=store.so)
    assert done


def _tree() -> dict[str, Any]:
    m = _model(3)
    return {"params": {"embed": m["embed"], "dense": [m["w1"], m["b1"]]}, "step": 7}


def test_load_tree_replaced_between_header_and_data_raises(store: Store, monkeypatch) -> None:
    blob = sc.save_tree(_tree())
    assert isinstance(blob, bytes)
    store.put("tree.safetensors", blob)
    done = replace_before_first_data_read(monkeypatch, store, "tree.safetensors", _mutated(blob))
    with pytest.raises(sc.RemoteIOError, match=CHANGED):
        sc.load_tree(store.url("tree.safetensors"), storage_options=store.so)
    assert done


def _sharded(tmp_path: Any, seed: int) -> tuple[str, str, bytes]:
    """A sharded checkpoint saved locally: (directory, the shard holding 'w1', its bytes)."""
    local = tmp_path / "ckpt"
    sc.save_file(_model(seed), str(local), max_shard_size="300KiB")
    shards = sorted(n for n in os.listdir(local) if n.endswith(".safetensors"))
    assert len(shards) == 2, shards
    for name in shards:
        if "w1" in sc.read_header(str(local / name)).tensors:
            return str(local), name, (local / name).read_bytes()
    raise AssertionError(shards)


def test_sharded_shard_replaced_between_index_and_data_raises(store: Store, tmp_path,
                                                               monkeypatch) -> None:
    local, shard, blob = _sharded(tmp_path, 4)
    store.put_dir("ckpt", local)
    url = store.url("ckpt/model.safetensors.index.json")
    done = replace_before_first_data_read(monkeypatch, store, f"ckpt/{shard}", _mutated(blob))
    with (sc.safe_open(url, storage_options=store.so) as f,
          pytest.raises(sc.RemoteIOError, match=CHANGED)):
        f.get_tensor("w1")
    assert done
    monkeypatch.undo()
    store.put(f"ckpt/{shard}", blob)
    done = replace_before_first_data_read(monkeypatch, store, f"ckpt/{shard}", _mutated(blob))
    with pytest.raises(sc.RemoteIOError, match=CHANGED):
        sc.load_file(url, storage_options=store.so)
    assert done


# -- S3 with versioning: reads are pinned to the version opened


@pytest.fixture
def versioned(s3_server: Any) -> Store:
    return _s3_store(s3_server, versioned=True)


def _versions(store: Store, key: str) -> list[str]:
    client, bucket = store.extra
    listing = client.list_object_versions(Bucket=bucket, Prefix=key)
    return [v["VersionId"] for v in listing.get("Versions", []) if v["Key"] == key]


def test_versioned_s3_reads_the_version_opened(versioned: Store, tmp_path,
                                               monkeypatch) -> None:
    store = versioned
    t = _model(5)
    blob = sc.save(t)
    store.put("m.safetensors", blob)
    url = store.url("m.safetensors")
    with sc.safe_open(url, storage_options=store.so) as f:
        store.put("m.safetensors", _mutated(blob))
        assert len(_versions(store, "m.safetensors")) == 2
        np.testing.assert_array_equal(f.get_tensor("embed"), t["embed"])
        np.testing.assert_array_equal(f.get_slice("w1")[3:40, ::2], t["w1"][3:40, ::2])
        stats = f.stats
    assert stats["metadata_requests"] == 1  # pinned: no identity re-check needed
    store.put("m.safetensors", blob)
    done = replace_before_first_data_read(monkeypatch, store, "m.safetensors", _mutated(blob))
    got = sc.load_file(url, storage_options=store.so)
    assert done
    for k, v in t.items():
        np.testing.assert_array_equal(got[k], v)
    # the version that was opened is deleted: the pinned read cannot be served
    store.put("m.safetensors", blob)
    with sc.safe_open(url, storage_options=store.so) as f:
        client, bucket = store.extra
        client.delete_object(Bucket=bucket, Key="m.safetensors",
                             VersionId=_versions(store, "m.safetensors")[0])
        with pytest.raises(sc.RemoteIOError, match="does not exist") as info:
            f.get_tensor("embed")
        assert info.value.__cause__ is not None


def test_versioned_s3_sharded_and_tree_read_the_version_opened(versioned: Store, tmp_path,
                                                               monkeypatch) -> None:
    store = versioned
    local, shard, blob = _sharded(tmp_path, 6)
    store.put_dir("ckpt", local)
    done = replace_before_first_data_read(monkeypatch, store, f"ckpt/{shard}", _mutated(blob))
    got = sc.load_file(store.url("ckpt"), storage_options=store.so)
    assert done
    for k, v in _model(6).items():
        np.testing.assert_array_equal(got[k], v)
    monkeypatch.undo()
    tree_blob = sc.save_tree(_tree())
    assert isinstance(tree_blob, bytes)
    store.put("tree.safetensors", tree_blob)
    done = replace_before_first_data_read(monkeypatch, store, "tree.safetensors",
                                          _mutated(tree_blob))
    tree = sc.load_tree(store.url("tree.safetensors"), storage_options=store.so)
    assert done
    np.testing.assert_array_equal(tree["params"]["dense"][0], _tree()["params"]["dense"][0])


# ----------------------------------------------------------------------------- item 15


class FaultProxy(TcpProxy):
    """A TCP proxy on 127.0.0.1 in front of ``upstream_port`` that injects faults into HTTP
    requests whose request line matches a predicate:

    * ``reset``: the client connection is reset (RST) instead of forwarding the request;
    * ``stall``: the request is forwarded, and the answer is cut after ``stall_after``
      bytes: the connection then stays open and silent.

    ``seen`` lists the request lines, ``faults`` those that were hit."""

    def __init__(self, upstream_port: int) -> None:
        self.reset: Callable[[str], bool] | None = None
        self.stall: Callable[[str], bool] | None = None
        self.stall_after = 1024
        self.seen: list[str] = []
        self.faults: list[str] = []
        super().__init__(upstream_port)

    def connected(self) -> dict[str, Any]:
        return {"stall": False}  # whether the answer now flowing back must stall

    @staticmethod
    def _rst(s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        with contextlib.suppress(OSError):
            s.close()

    def upstream(self, client: socket.socket, upstream: socket.socket,
                 state: dict[str, Any]) -> None:
        try:
            while True:
                data = client.recv(1 << 16)
                if not data:
                    break
                line = data.split(b"\r\n", 1)[0].decode("latin-1")
                if line.split(" ", 1)[0] in ("GET", "HEAD", "PUT", "POST", "DELETE"):
                    with self._lock:
                        self.seen.append(line)
                    if self.reset is not None and self.reset(line):
                        with self._lock:
                            self.faults.append(line)
                        self._rst(client)
                        self._rst(upstream)
                        return
                    if self.stall is not None and self.stall(line):
                        with self._lock:
                            self.faults.append(line)
                        state["stall"] = True
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            shut(upstream, socket.SHUT_WR)

    def downstream(self, upstream: socket.socket, client: socket.socket,
                   state: dict[str, Any]) -> None:
        sent = 0
        try:
            while True:
                data = upstream.recv(1 << 16)
                if not data:
                    break
                if state["stall"]:
                    room = self.stall_after - sent
                    if room > 0:
                        client.sendall(data[:room])
                        sent += min(room, len(data))
                    if sent >= self.stall_after:
                        self.wait_closed()  # silent until the proxy closes
                        return
                    continue
                client.sendall(data)
        except OSError:
            pass
        finally:
            shut(client)


@pytest.fixture
def faulty(s3_server: Any) -> Iterator[tuple[FaultProxy, str, dict[str, Any]]]:
    """A fault proxy in front of the moto server (not the counting proxy: moto's own port),
    a bucket holding ``m.safetensors``, and storage options for s3fs through the proxy with
    retries off (one attempt, so a fault is reported at once)."""
    proxy = FaultProxy(s3_server.proxy.upstream_port)
    bucket = s3_server.new_bucket()
    s3_server.filesystem().pipe_file(f"{bucket}/m.safetensors", sc.save(_model(7)))
    so = {
        "key": "testing", "secret": "testing", "use_listings_cache": False,
        "skip_instance_cache": True,
        "client_kwargs": {"endpoint_url": f"http://{LOCALHOST}:{proxy.port}"},
        "config_kwargs": {"read_timeout": 2, "connect_timeout": 2,
                          "retries": {"max_attempts": 1}},
    }
    try:
        yield proxy, f"s3://{bucket}/m.safetensors", so
    finally:
        proxy.close()


def _no_s3fs_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """s3fs retries some errors itself (5 times, with back-off): once is enough here."""
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)


def _is_head(line: str) -> bool:
    return line.startswith("HEAD ")


def _is_get(line: str) -> bool:
    return line.startswith("GET ")


def test_reset_during_open_info_is_remote_io_error(faulty, monkeypatch) -> None:
    proxy, url, so = faulty
    _no_s3fs_retries(monkeypatch)
    proxy.reset = _is_head
    began = time.monotonic()
    with pytest.raises(sc.RemoteIOError, match=r"m\.safetensors") as info:
        sc.safe_open(url, storage_options=so)
    assert time.monotonic() - began < 20
    assert proxy.faults and _is_head(proxy.faults[0])
    assert info.value.__cause__ is not None
    assert isinstance(info.value, OSError)
    # the plain open of a whole-file load goes through the same info
    with pytest.raises(sc.RemoteIOError) as info:
        sc.load_file(url, storage_options=so)
    assert info.value.__cause__ is not None


def test_reset_during_lazy_read_is_remote_io_error(faulty, monkeypatch) -> None:
    proxy, url, so = faulty
    _no_s3fs_retries(monkeypatch)
    with sc.safe_open(url, storage_options=so) as f:
        proxy.reset = _is_get
        with pytest.raises(sc.RemoteIOError, match=r"reading tensor 'embed' .* failed") as info:
            f.get_tensor("embed")
        assert info.value.__cause__ is not None
        assert proxy.faults and _is_get(proxy.faults[0])


def test_reset_during_identity_recheck_is_remote_io_error(faulty, monkeypatch) -> None:
    """The data arrives; the metadata request that checks the object did not change
    meanwhile (S3 without versioning) is reset."""
    proxy, url, so = faulty
    _no_s3fs_retries(monkeypatch)
    with sc.safe_open(url, storage_options=so) as f:
        proxy.reset = _is_head
        with pytest.raises(sc.RemoteIOError, match="did not change failed") as info:
            f.get_tensor("embed")
        assert info.value.__cause__ is not None
        assert any(_is_get(line) for line in proxy.seen)
    # the whole-file transfer's re-check, the path item 15 names
    proxy.reset = None
    calls = {"n": 0}
    original = _remote.FsspecSource.check_unchanged

    def arm_then_check(self: Any) -> None:
        calls["n"] += 1
        proxy.reset = _is_head
        original(self)

    monkeypatch.setattr(_remote.FsspecSource, "check_unchanged", arm_then_check)
    with pytest.raises(sc.RemoteIOError, match="did not change failed") as info:
        sc.load_file(url, storage_options=so)
    assert calls["n"] >= 1 and info.value.__cause__ is not None


def test_stalled_transfer_is_remote_io_error_saying_what_timed_out(faulty,
                                                                    monkeypatch) -> None:
    proxy, url, so = faulty
    _no_s3fs_retries(monkeypatch)
    with sc.safe_open(url, storage_options=so) as f:
        proxy.stall = _is_get
        proxy.stall_after = 4096  # the response headers and a little of the body
        began = time.monotonic()
        with pytest.raises(sc.RemoteIOError) as info:
            f.get_tensor("embed")
        elapsed = time.monotonic() - began
    assert elapsed < 20
    message = str(info.value)
    assert info.value.__cause__ is not None
    # what was read, that it timed out, after how long, and botocore's text (the outer
    # FSTimeoutError has none)
    assert "reading tensor 'embed'" in message and "bytes " in message, message
    after = re.search(r"timed out after (\d+\.\d) s: .*Read timeout on endpoint URL", message)
    assert after and 1.5 <= float(after.group(1)) < 20, message


def test_stalled_metadata_request_at_open_says_what_timed_out(faulty, monkeypatch) -> None:
    proxy, url, so = faulty
    _no_s3fs_retries(monkeypatch)
    proxy.stall = _is_head
    proxy.stall_after = 0  # not even the status line
    began = time.monotonic()
    with pytest.raises(sc.RemoteIOError) as info:
        sc.safe_open(url, storage_options=so)
    assert time.monotonic() - began < 20
    message = str(info.value)
    assert info.value.__cause__ is not None
    assert message.startswith(f"asking for the size of {url} failed"), message
    assert re.search(r"timed out after \d+\.\d s: \S", message), message
