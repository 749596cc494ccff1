"""Issue 18, items 2-5 and 15, each on its own (the route matrix, test_route_matrix.py,
finds them as a class): a pinned HTTP read that an answer without ETag cannot fool; JAX
outputs that never alias memory its owner can write; a caller's file object whose
descriptor number is reused; tree records whose keys a dict would merge; closed remote
handles.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import safecodec as sc
from safecodec import _source

pytest_plugins = ["conftest_remote"]


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(18)
    return {"embed": rng.standard_normal((512, 64)).astype(np.float32),
            "b": np.arange(16, dtype=np.int32)}


def _inverted(blob: bytes) -> bytes:
    """Same size, same header, every data byte inverted."""
    start = 8 + int.from_bytes(blob[:8], "little")
    return blob[:start] + bytes(255 - b for b in blob[start:])


# ----------------------------------------------------------------------------- item 2


@pytest.fixture
def etag_server(http_server: Any) -> Iterator[Any]:
    """The module's HTTP server, for one test in a given ETag mode (restored after)."""
    saved = http_server.etags
    yield http_server
    http_server.etags = saved


def _put(server: Any, name: str, data: bytes) -> str:
    path = os.path.join(server.root, name)
    tmp = path + ".part"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)  # a new mtime: a new ETag
    return str(server.url(name))


def test_an_answer_without_the_pinned_etag_is_rechecked(etag_server: Any) -> None:
    """A server that sends its ETag on HEAD but not on 206, and ignores If-Match: a
    replaced object is detected by the identity re-check, never mixed in."""
    etag_server.etags = "head"
    blob = sc.save(_model())
    url = _put(etag_server, "head-only.safetensors", blob)
    with sc.safe_open(url) as f:
        _put(etag_server, "head-only.safetensors", _inverted(blob))
        with pytest.raises(sc.RemoteIOError, match="changed"):
            f.get_tensor("embed")
        with pytest.raises(sc.RemoteIOError, match="changed"):
            f.get_slice("b")[2:5]
    with sc.safe_open(_put(etag_server, "head-only.safetensors", blob)) as f:
        np.testing.assert_array_equal(f.get_tensor("embed"), _model()["embed"])
        assert f.stats["metadata_requests"] >= 2  # the read was re-checked


def test_an_answer_with_the_pinned_etag_needs_no_recheck(etag_server: Any) -> None:
    etag_server.etags = "all"
    url = _put(etag_server, "pinned.safetensors", sc.save(_model()))
    with sc.safe_open(url) as f:
        f.get_tensor("embed")
        f.get_slice("b")[2:5]
        assert f.stats["metadata_requests"] == 1  # If-Match and a matching ETag: proof enough


def test_a_server_without_etags_sees_a_change_of_size(etag_server: Any) -> None:
    """What SECURITY.md promises for a server without ETags: the size is re-checked after
    every read, so a replacement of another size is an error."""
    etag_server.etags = "none"
    blob = sc.save(_model())
    url = _put(etag_server, "no-etag.safetensors", blob)
    with sc.safe_open(url) as f:
        _put(etag_server, "no-etag.safetensors", blob + b" " * 64)
        with pytest.raises(sc.RemoteIOError, match="changed"):
            f.get_tensor("b")


# ----------------------------------------------------------------------------- item 3


def _aligned(blob: bytes) -> np.ndarray:
    arena = np.empty(len(blob) + 64, np.uint8)
    shift = -arena.ctypes.data % 64
    out = arena[shift : shift + len(blob)]
    out[:] = np.frombuffer(blob, np.uint8)
    return out


@pytest.mark.parametrize("owner_kind", ["bytearray", "aligned ndarray"])
def test_jax_never_aliases_memory_its_owner_can_write(owner_kind: str) -> None:
    pytest.importorskip("jax")
    t = _model()
    blob = sc.save(t)
    owner: Any = bytearray(blob) if owner_kind == "bytearray" else _aligned(blob)
    view = memoryview(owner).toreadonly()
    whole = sc.load(view, framework="jax")
    with sc.safe_open(view, "jax") as f:
        one = f.get_tensor("embed")
        part = f.get_slice("embed")[:8]
        assert f.output.aliased == 0
    memoryview(owner)[:] = _inverted(blob)
    np.testing.assert_array_equal(np.asarray(whole["embed"]), t["embed"])
    np.testing.assert_array_equal(np.asarray(whole["b"]), t["b"])
    np.testing.assert_array_equal(np.asarray(one), t["embed"])
    np.testing.assert_array_equal(np.asarray(part), t["embed"][:8])


def test_jax_still_aliases_immutable_bytes_and_read_only_mappings(tmp_path: Any) -> None:
    pytest.importorskip("jax")
    from safecodec._jax_load import aliasable_address

    blob = sc.save(_model())
    with sc.safe_open(blob, "jax") as f:  # where malloc puts bytes decides the alignment
        assert aliasable_address(f.reader) is not None
    with sc.safe_open(memoryview(_aligned(blob)).toreadonly(), "jax") as f:
        assert aliasable_address(f.reader) is None
    path = str(tmp_path / "m.safetensors")
    sc.save_file(_model(), path)
    with sc.safe_open(path, "jax") as f:
        f.get_tensors()
        assert f.output.aliased == 2
    with open(path, "r+b") as fh, sc.safe_open(fh, "jax") as f:
        f.get_tensors()  # the caller holds the file open for writing: copies
        assert f.output.aliased == 0


@pytest.mark.parametrize(("make", "stable"), [
    (lambda b: b, True),
    (lambda b: memoryview(b)[8:], True),
    (lambda b: np.frombuffer(b, np.uint8), True),
    (lambda b: memoryview(np.frombuffer(b, np.uint8)[4:]).toreadonly(), True),
    (lambda b: bytearray(b), False),
    (lambda b: memoryview(bytearray(b)).toreadonly(), False),
    (lambda b: np.frombuffer(bytearray(b), np.uint8), False),
    (lambda b: np.array(bytearray(b)), False),
], ids=["bytes", "view-of-bytes", "ndarray-of-bytes", "ro-view-of-ndarray-of-bytes",
        "bytearray", "ro-view-of-bytearray", "ndarray-of-bytearray", "ndarray"])
def test_immutable_memory_follows_views_to_their_owner(make: Any, stable: bool) -> None:
    assert _source.immutable_memory(make(b"0123456789abcdef")) is stable


# ----------------------------------------------------------------------------- item 4


def _reuse_number(fh: Any, path: str) -> int:
    """Close ``fh`` and open ``path`` under the very descriptor number ``fh`` had (what the
    process does anyway with the lowest free number)."""
    number = fh.fileno()
    fh.close()
    fd = os.open(path, os.O_RDONLY)
    if fd != number:
        os.dup2(fd, number)
        os.close(fd)
    return number


@pytest.mark.parametrize("framework", ["numpy", "jax"])
@pytest.mark.parametrize("backend", ["pread", "mmap"])
def test_a_callers_file_object_closed_and_its_number_reused(tmp_path: Any, backend: str,
                                                            framework: str) -> None:
    if framework == "jax":
        pytest.importorskip("jax")
    t = _model()
    mine, other = str(tmp_path / "mine.safetensors"), str(tmp_path / "other.safetensors")
    sc.save_file(t, mine)
    sc.save_file({k: -v for k, v in t.items()}, other)
    fh = open(mine, "rb")  # noqa: SIM115 - the caller closes it below
    handle = sc.safe_open(fh, framework, backend=backend)
    number = _reuse_number(fh, other)
    try:
        with handle:
            np.testing.assert_array_equal(np.asarray(handle.get_tensor("embed")), t["embed"])
            np.testing.assert_array_equal(np.asarray(handle.get_slice("b")[3:9]), t["b"][3:9])
            got = handle.get_tensors()
        np.testing.assert_array_equal(np.asarray(got["b"]), t["b"])
    finally:
        os.close(number)


def test_a_file_object_without_descriptor_closed_by_its_owner(tmp_path: Any) -> None:
    import io

    fh = io.BytesIO(sc.save(_model()))
    with sc.safe_open(fh, backend="pread") as f:
        fh.close()
        with pytest.raises(sc.RemoteIOError, match="closed the file object"):
            f.get_tensor("b")


def test_the_duplicated_descriptor_is_closed_with_the_handle(tmp_path: Any) -> None:
    path = str(tmp_path / "m.safetensors")
    sc.save_file(_model(), path)
    fds = set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    if fds is None:
        pytest.skip("needs /proc/self/fd to count descriptors")
    with open(path, "rb") as fh:
        for backend in ("pread", "mmap"):
            with sc.safe_open(fh, backend=backend) as f:
                f.get_tensor("b")
        assert not fh.closed  # the caller's file object is the caller's
    assert set(os.listdir("/proc/self/fd")) == fds


# ----------------------------------------------------------------------------- item 5


def _with_record(blob: bytes, edit: Any) -> bytes:
    """``blob`` (a save_tree file) with its tree record passed through ``edit``."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    record = json.loads(header["__metadata__"]["safecodec.tree"])
    header["__metadata__"]["safecodec.tree"] = json.dumps(edit(record))
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + blob[8 + n :]


@pytest.mark.parametrize(("first", "second"), [
    (1, True), (0, False), (1, 1.0), (True, 1.0), (0, -0.0), (2, 2),
])
def test_tree_keys_a_dict_would_merge_are_refused(first: Any, second: Any) -> None:
    blob = sc.save_tree({"params": {10: np.ones(2, np.float32), 11: np.zeros(3, np.int32)}})
    assert isinstance(blob, bytes)

    def edit(record: dict[str, Any]) -> dict[str, Any]:
        pairs = record["tree"]["dict"][0][1]["dict"]
        pairs[0][0], pairs[1][0] = first, second
        return record

    with pytest.raises(sc.TreeStructureError, match=r"\['params'\]") as info:
        sc.load_tree(_with_record(blob, edit))
    assert repr(second) in str(info.value)


def test_tree_keys_python_tells_apart_still_load() -> None:
    tree = {"params": {1: np.ones(2, np.float32), "1": np.zeros(3, np.int32),
                       None: np.arange(2), 2.5: np.arange(3)}}
    back = sc.load_tree(sc.save_tree(tree))
    assert set(back["params"]) == {1, "1", None, 2.5}
    np.testing.assert_array_equal(back["params"]["1"], np.zeros(3, np.int32))


# ----------------------------------------------------------------------------- item 15


def test_slicing_through_a_closed_remote_handle_is_closed_handle_error(mem_url: str,
                                                                       http_server: Any) -> None:
    blob = sc.save(_model())
    sc.save_file(_model(), f"{mem_url}/m.safetensors")
    for url in (f"{mem_url}/m.safetensors", _put(http_server, "closed.safetensors", blob)):
        with sc.safe_open(url) as f:
            part = f.get_slice("embed")
        with pytest.raises(sc.ClosedHandleError):
            part[3:5]


def test_copies_from_a_closed_buffer_handle_are_closed_handle_error() -> None:
    """copy=True reads are reads, whatever the source (the TensorSlice contract); views
    of the buffer outlive the handle."""
    blob = sc.save(_model())
    with sc.safe_open(blob, copy=True) as f:
        part = f.get_slice("embed")
    with pytest.raises(sc.ClosedHandleError):
        part[3:5]
    with sc.safe_open(blob) as f:
        view = f.get_slice("embed")
    np.testing.assert_array_equal(view[3:5], _model()["embed"][3:5])
