"""The one read-route decision (``_reader.read_route`` -> ``Route``), the one options value
(``_reader.ReadOptions``) and the JAX output's one counters object (issue 19)."""

from __future__ import annotations

from typing import Any

import fsspec
import ml_dtypes
import numpy as np
import pytest

import safecodec as sc
from safecodec import _dtypes
from safecodec._errors import ChecksumError, SafecodecError
from safecodec._reader import (
    MEMORY_ROUTES,
    Check,
    ReadOptions,
    Route,
    read_route,
    verify_point,
)

pytest_plugins = ["conftest_remote"]


def _tensors() -> dict[str, np.ndarray]:
    return {"w": np.arange(24, dtype=np.float32).reshape(4, 6),
            "i": np.arange(8, dtype=np.int64),
            "q": np.zeros(8, ml_dtypes.float4_e2m1fn)}


# ----------------------------------------------------------------------------- options


def test_read_options_settle_backend_and_framework_once() -> None:
    assert ReadOptions(backend="pread").copy is True
    assert ReadOptions().copy is False
    assert ReadOptions(framework="np").framework == "numpy"
    assert ReadOptions(framework="flax").framework == "jax"
    with pytest.raises(SafecodecError, match="backend must be one of"):
        ReadOptions(backend="mmapp")
    with pytest.raises(SafecodecError, match="unsupported framework"):
        ReadOptions(framework="pt")
    opts = ReadOptions(fs=object(), storage_options={"anon": True}, verify=True)
    with pytest.raises(AttributeError, match="frozen"):
        opts.copy = True
    assert opts.replace(verify=False) == ReadOptions(fs=opts.fs, storage_options={"anon": True})
    assert ReadOptions(backend="pread").replace(copy=False).copy  # pread stays a copy
    located = opts.located(None)
    assert located.fs is None and located.storage_options is None and located.verify


def test_handles_carry_the_options_the_router_built(tmp_path: Any) -> None:
    sc.save_file(_tensors(), str(tmp_path / "a.safetensors"), max_shard_size=200)
    with sc.safe_open(str(tmp_path), backend="pread", unpack=False) as f:
        assert isinstance(f.options, ReadOptions)
        assert f.options.copy and not f.options.unpack
        shard = f.open_shard(f.shard_files()[0])
        # every shard reads with the handle's options (local: no progress bar)
        assert shard.options.copy and not shard.options.unpack and shard.options.fs is None
        assert shard.reader.route is Route.READ


# ----------------------------------------------------------------------------- routes


def test_the_source_and_options_pick_the_route(tmp_path: Any) -> None:
    blob = sc.save(_tensors())
    path = str(tmp_path / "m.safetensors")
    sc.save_file(_tensors(), path)
    cases: list[tuple[Any, str, dict[str, Any], Route]] = [
        (blob, "numpy", {}, Route.ALIAS),  # immutable bytes
        (bytearray(blob), "numpy", {}, Route.VIEW),  # memory its owner can write
        (path, "numpy", {}, Route.VIEW),  # a private copy-on-write mapping
        (path, "jax", {}, Route.ALIAS),  # the read-only mapping
        (path, "numpy", {"copy": True}, Route.READ),
        (path, "numpy", {"backend": "pread"}, Route.READ),
    ]
    for source, fw, kw, want in cases:
        with sc.safe_open(source, fw, **kw) as f:
            assert f.reader.route is want, (type(source), fw, kw)
            info = f.header.tensors["w"]
            assert read_route(f.reader, info.dtype) is want
            # packed dtypes and a cast decode, whatever the source
            assert read_route(f.reader, f.header.tensors["q"].dtype) is Route.DECODE
            assert read_route(f.reader, info.dtype, np.dtype(np.float16)) is Route.DECODE


def test_a_remote_source_fetches() -> None:
    fs = fsspec.filesystem("memory")
    with fs.open("/route19/m.safetensors", "wb") as fh:
        fh.write(sc.save(_tensors()))
    try:
        with sc.safe_open("memory://route19/m.safetensors") as f:
            assert f.reader.route is Route.FETCH
            assert read_route(f.reader, f.header.tensors["w"].dtype) is Route.FETCH
            got = f.get_tensors()
        np.testing.assert_array_equal(got["w"], _tensors()["w"])
        # a whole remote load streams into private memory once, then hands out views of
        # it, whatever the backend
        pread = sc.load_file("memory://route19/m.safetensors", backend="pread")
        np.testing.assert_array_equal(pread["w"], _tensors()["w"])
        assert not pread["w"].flags.owndata
    finally:
        fs.rm("/route19", recursive=True)


def test_big_endian_hosts_decode_every_tensor(monkeypatch: Any) -> None:
    blob = sc.save(_tensors())
    with sc.safe_open(blob) as f:
        monkeypatch.setattr(_dtypes, "HOST_IS_LITTLE_ENDIAN", False)
        assert read_route(f.reader, f.header.tensors["w"].dtype) is Route.DECODE
        out = f.get_tensors()
    np.testing.assert_array_equal(out["w"], _tensors()["w"])


def test_memory_routes_hand_out_views_and_read_routes_fresh_arrays(tmp_path: Any) -> None:
    path = str(tmp_path / "m.safetensors")
    sc.save_file(_tensors(), path)
    kws: list[dict[str, Any]] = [{}, {"copy": True}]
    for kw in kws:
        with sc.safe_open(path, **kw) as f:
            route = f.reader.route
            w = f.get_tensors()["w"]
            is_view = not w.flags.owndata
            assert is_view == (route in MEMORY_ROUTES), (kw, route)


def test_verification_happens_on_every_route(tmp_path: Any) -> None:
    path = str(tmp_path / "m.safetensors")
    sc.save_file(_tensors(), path, checksums=True)
    header = sc.read_header(path)
    at = header.data_start + header.tensors["w"].begin
    with open(path, "rb") as fh:
        data = bytearray(fh.read())
    data[at] ^= 0xFF
    with open(path, "wb") as fh:
        fh.write(data)
    kws: list[dict[str, Any]] = [{}, {"copy": True}]
    for kw in kws:
        with sc.safe_open(path, verify=True, **kw) as f:
            with pytest.raises(ChecksumError, match="'w'"):
                f.get_tensors()
            with pytest.raises(ChecksumError, match="'w'"):
                f.get_slice("w")[1:2]
            np.testing.assert_array_equal(f.get_tensor("i"), _tensors()["i"])
    with sc.safe_open(bytes(data), verify=True) as f, pytest.raises(ChecksumError, match="'w'"):
        f.get_tensor("w")


def test_verify_point_is_one_decision(tmp_path: Any) -> None:
    """FIRST for views, decodes and parts (the stored bytes, before anything is handed
    out), RESULT for whole tensors read into fresh memory, NONE without verify=True."""
    path = str(tmp_path / "m.safetensors")
    sc.save_file(_tensors(), path, checksums=True)
    with sc.safe_open(path, verify=True) as f:
        table = {(whole, read): verify_point(f.reader, whole=whole, read=read)
                 for whole in (True, False) for read in (True, False)}
    assert table == {(True, True): Check.RESULT, (True, False): Check.FIRST,
                     (False, True): Check.FIRST, (False, False): Check.FIRST}
    with sc.safe_open(path) as f:
        assert verify_point(f.reader, whole=True, read=True) is Check.NONE


def _corrupt_every_tensor(blob: bytes) -> bytes:
    """One byte of every tensor's data flipped (header and checksums kept)."""
    header = sc.read_header(blob)
    data = bytearray(blob)
    for info in header.tensors.values():
        data[header.data_start + info.begin] ^= 0x40
    return bytes(data)


#: One source per read route, named by the route its reader takes (``q``, an F4 tensor, is
#: DECODE on every one of them).
ROUTE_SOURCES: dict[str, tuple[str, dict[str, Any]]] = {
    "alias-bytes": ("bytes", {}),
    "alias-jax-mapping": ("file", {"framework": "jax"}),
    "view-mapping": ("file", {}),
    "view-bytearray": ("bytearray", {}),
    "read-copy": ("file", {"copy": True}),
    "read-pread-jax": ("file", {"backend": "pread", "framework": "jax"}),
    "fetch-remote": ("url", {}),
    "fetch-remote-jax": ("url", {"framework": "jax"}),
}
EXPECTED_ROUTE = {"alias": Route.ALIAS, "view": Route.VIEW, "read": Route.READ,
                  "fetch": Route.FETCH}


@pytest.mark.parametrize("case", sorted(ROUTE_SOURCES))
def test_a_corrupted_tensor_raises_on_every_route(case: str, tmp_path: Any,
                                                  mem_url: str) -> None:
    """verify=True: every entry (whole tensor, every tensor, slice, box, box of the whole
    tensor) of every route (ALIAS, VIEW, READ, FETCH; DECODE through the packed tensor)
    raises ChecksumError for a corrupted tensor, NumPy and JAX handles alike."""
    kind, kw = ROUTE_SOURCES[case]
    if kw.get("framework") == "jax":
        jax = pytest.importorskip("jax")
        kw = {**kw, "device": jax.devices("cpu")[0]}
    tensors = {**_tensors(), "i": np.arange(8, dtype=np.int32)}  # JAX's default: no x64
    blob = _corrupt_every_tensor(sc.save(tensors, checksums=True))
    path = str(tmp_path / "bad.safetensors")
    with open(path, "wb") as fh:
        fh.write(blob)
    fsspec.filesystem("memory").pipe(f"{mem_url}/bad.safetensors", blob)
    source: Any = {"bytes": blob, "bytearray": bytearray(blob), "file": path,
                   "url": f"{mem_url}/bad.safetensors"}[kind]

    def fresh() -> Any:
        return sc.safe_open(source, verify=True, **kw)

    with fresh() as f:
        assert f.reader.route is EXPECTED_ROUTE[case.split("-")[0]], f.reader.route
        assert read_route(f.reader, f.header.tensors["q"].dtype) is Route.DECODE
    for name in ("w", "i", "q"):
        whole = tuple(slice(0, n) for n in tensors[name].shape)
        part = (slice(0, 1), *whole[1:])
        entries = {
            "get_tensor": lambda f, n=name: f.get_tensor(n),
            "load_tensors": lambda f, n=name: f.load_tensors([n]),
            "get_slice": lambda f, n=name: f.get_slice(n)[:1],
            "box": lambda f, n=name, b=part: f.reader.read_box(f.header.tensors[n], b),
            "whole-box": lambda f, n=name, b=whole: f.reader.read_box(f.header.tensors[n], b),
        }
        for entry, call in entries.items():
            with fresh() as f, pytest.raises(ChecksumError, match=repr(name)):
                call(f)
                pytest.fail(f"{case}: {entry} of {name!r} loaded under verify=True")
    with fresh() as f, pytest.raises(ChecksumError):
        f.get_tensors()


# ----------------------------------------------------------------------------- JAX


def test_jax_host_routes_and_one_counters_object(tmp_path: Any) -> None:
    jax = pytest.importorskip("jax")
    from safecodec._jax_load import LoadCounters, host_route

    tensors = {"a": np.ones(16, np.float32), "b": np.ones(3, np.float32),
               "c": np.ones(16, np.float32)}
    path = str(tmp_path / "m.safetensors")
    sc.save_file(tensors, path)
    cpu = jax.devices("cpu")[0]
    with sc.safe_open(path, "jax", device=cpu) as f:
        from safecodec._jax_load import aliasable_address

        reader = f.reader
        address = aliasable_address(reader)
        assert address is not None and reader.route is Route.ALIAS
        infos = f.header.tensors
        assert host_route(reader, infos["a"], np.dtype(np.float32), True, address) is Route.ALIAS
        # not aliasable: one memcpy (VIEW); on an accelerator the view goes to the transfer
        assert host_route(reader, infos["a"], np.dtype(np.float32), True, None) is Route.VIEW
        assert host_route(reader, infos["a"], np.dtype(np.float32), False, None) is Route.ALIAS
        assert host_route(reader, infos["a"], np.dtype(np.float16), True, address) is Route.DECODE
        f.get_tensors()
        counters = f.output.counters
        assert isinstance(counters, LoadCounters)
        assert (f.output.aliased, f.output.bytes_loaded) == (
            counters.aliased, counters.bytes_loaded)
        assert counters.bytes_loaded == sum(t.nbytes for t in tensors.values())
        assert counters.aliased >= 2  # the two 64-byte tensors share the mapping
    with sc.safe_open(path, "jax", device=cpu, copy=True) as f:
        assert f.reader.route is Route.READ
        assert aliasable_address(f.reader) is None
        out = f.get_tensors()
        assert f.output.aliased == 0
        np.testing.assert_array_equal(np.asarray(out["b"]), tensors["b"])
