"""Sharded checkpoints (the Hugging Face index convention): writing, reading, errors."""

from __future__ import annotations

import json
import os

import fsspec
import numpy as np
import pytest

import safecodec as sc
from safecodec import _resolve, _sharded
from safecodec._sharded import ShardedSafeOpen
from safecodec._shardindex import INDEX_SUFFIX, parse_size, plan_shards


def save_sharded(tensors, path, metadata=None, *, fs=None, storage_options=None, **options):
    """The sharded writer behind save_file(max_shard_size=...), returning the index path."""
    target = _resolve.resolve_target(path, fs, storage_options)
    return _sharded.save_sharded(tensors, target, metadata, **options)

#: Fixtures (servers on 127.0.0.1, memory:// prefixes) live in tests/helpers/conftest_remote.py.
pytest_plugins = ["conftest_remote"]


def _model() -> dict[str, np.ndarray]:
    import ml_dtypes

    rng = np.random.default_rng(0)
    return {
        "layers.0.w": rng.standard_normal((64, 32)).astype(np.float32),   # 8 KiB
        "layers.0.b": rng.standard_normal(32).astype(np.float32),
        "layers.1.w": rng.standard_normal((64, 32)).astype(ml_dtypes.bfloat16),  # 4 KiB
        "layers.1.b": rng.standard_normal(3).astype(np.float16),           # 6 bytes
        "embed": rng.standard_normal((100, 64)).astype(np.float32),       # 25 KiB: oversize
        "step": np.array(12, np.int64),
    }


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _write(tmp_path, **kw) -> str:
    d = str(tmp_path / "ckpt")
    sc.save_file(_model(), d, {"format": "np"}, max_shard_size=kw.pop("size", "10KiB"), **kw)
    return d


# ----------------------------------------------------------------------------- planning


@pytest.mark.parametrize(("text", "expected"), [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("10KiB", 10240),
    ("1.5GB", 1_500_000_000), ("100", 100), ("7 kb", 7000), (4096, 4096),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(("bad", "match"), [
    ("5 parsecs", "is not a size"), ("", "is not a size"), ("-1GB", "is not a size"),
    (0, "must be positive"), (True, "must be an int"), (1.5, "must be an int"),
])
def test_parse_size_rejects(bad, match):
    with pytest.raises(sc.SafecodecError, match=match):
        parse_size(bad)


def test_plan_shards_keeps_order_and_isolates_oversize_tensors():
    sizes = [("a", 40), ("b", 60), ("c", 1), ("big", 500), ("d", 100), ("e", 0)]
    assert plan_shards(sizes, 100) == [["a", "b"], ["c"], ["big"], ["d", "e"]]
    assert plan_shards([], 100) == [[]]
    assert plan_shards([("x", 5)], 5) == [["x"]]


# ----------------------------------------------------------------------------- writing


def test_save_writes_shards_and_index(tmp_path):
    d = _write(tmp_path)
    t = _model()
    files = sorted(os.listdir(d))
    assert files == [
        "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
        "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors",
        "model" + INDEX_SUFFIX,
    ]
    text = _read(os.path.join(d, "model" + INDEX_SUFFIX))
    index = json.loads(text)
    total = sum(a.nbytes for a in t.values())
    assert index["metadata"]["total_size"] == total
    # each shard's identity (size, header digest) is recorded; readers check it
    shards = index["metadata"]["safecodec.shards"]
    assert sorted(shards) == files[:4]
    for name, ident in shards.items():
        assert ident["size"] == os.path.getsize(os.path.join(d, name))
    # 2-space indent, sorted keys, trailing newline.
    assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    assert text.startswith('{\n  "metadata": {\n    "safecodec.shards": ')
    assert index["weight_map"] == {
        "layers.0.w": "model-00001-of-00004.safetensors",
        "layers.0.b": "model-00001-of-00004.safetensors",
        "layers.1.w": "model-00002-of-00004.safetensors",
        "layers.1.b": "model-00002-of-00004.safetensors",
        "embed": "model-00003-of-00004.safetensors",
        "step": "model-00004-of-00004.safetensors",
    }
    for shard in files[:-1]:
        header = sc.read_header(os.path.join(d, shard))
        assert header.metadata == {"format": "np"}
        # The zero-copy layout in every shard.
        assert header.data_start % 64 == 0
        for info in header.tensors.values():
            if info.nbytes % 64 == 0:
                assert (header.data_start + info.begin) % 64 == 0, info.name


def _reference_load(path: str) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """The reference wheel's reading of a file: name -> (dtype code, shape, raw bytes)."""
    import _oracle

    with open(path, "rb") as f:
        verdict = _oracle.deserialize(f.read())
    assert verdict.ok, verdict.error
    return verdict.tensors


def _same(ref: tuple[str, tuple[int, ...], bytes], arr: np.ndarray) -> bool:
    return ref[1] == arr.shape and ref[2] == np.ascontiguousarray(arr).tobytes()


def test_shards_load_in_the_reference_wheel_one_by_one(tmp_path):
    d = _write(tmp_path)
    t = _model()
    index = json.loads(_read(os.path.join(d, "model" + INDEX_SUFFIX)))
    seen = {}
    for shard in sorted(set(index["weight_map"].values())):
        part = _reference_load(os.path.join(d, shard))
        for name, ref in part.items():
            assert index["weight_map"][name] == shard
            seen[name] = ref
    assert sorted(seen) == sorted(t)
    for name, arr in t.items():
        assert _same(seen[name], arr), name


def _hf_style_load(directory: str) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """What Hugging Face loaders do with a sharded checkpoint: read the index, load each
    shard file with the reference wheel, keep the names the index assigns to it."""
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        index = json.load(f)
    out: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    for shard in sorted(set(index["weight_map"].values())):
        state = _reference_load(os.path.join(directory, shard))
        out.update((k, v) for k, v in state.items() if index["weight_map"][k] == shard)
    assert sum(len(v[2]) for v in out.values()) == index["metadata"]["total_size"]
    return out


def test_output_loads_in_a_huggingface_style_loader(tmp_path):
    d = _write(tmp_path, alignment=8)
    t = _model()
    out = _hf_style_load(d)
    assert sorted(out) == sorted(t)
    for name, arr in t.items():
        assert _same(out[name], arr), name
    # alignment=8: each shard is byte for byte what the reference writer would write with
    # the same metadata (which carries the save's id, so that two saves never write the
    # same shard header).
    index = json.loads(_read(os.path.join(d, "model" + INDEX_SUFFIX)))
    shard = index["weight_map"]["layers.0.b"]
    part = {k: t[k] for k, s in index["weight_map"].items() if s == shard}
    raw = sc.read_header(os.path.join(d, shard)).raw_metadata
    assert sorted(raw) == ["format", "safecodec.checkpoint"] and raw["format"] == "np"
    with open(os.path.join(d, shard), "rb") as f:
        assert f.read() == sc.save(part, raw, alignment=8)


def test_save_targets_name_the_prefix(tmp_path):
    t = {"a": np.ones(100, np.uint8), "b": np.ones(100, np.uint8)}
    sc.save_file(t, tmp_path / "x" / "weights.safetensors", max_shard_size=150)
    assert sorted(os.listdir(tmp_path / "x")) == [
        "weights-00001-of-00002.safetensors", "weights-00002-of-00002.safetensors",
        "weights.safetensors.index.json"]
    idx = save_sharded(t, str(tmp_path / "y" / "enc.safetensors.index.json"), max_shard_size=10**6)
    assert idx == str(tmp_path / "y" / "enc.safetensors.index.json")
    assert sorted(os.listdir(tmp_path / "y")) == ["enc-00001-of-00001.safetensors",
                                                  "enc.safetensors.index.json"]
    np.testing.assert_array_equal(sc.load_file(idx)["b"], t["b"])


def test_bad_input_writes_nothing(tmp_path):
    with pytest.raises(sc.SafecodecError, match="is not a size"):
        sc.save_file({"a": np.ones(3)}, tmp_path / "c", max_shard_size="lots")
    with pytest.raises(sc.DtypeError):
        sc.save_file({"a": np.ones(3), "z": np.ones(2, np.complex128)}, tmp_path / "c",
                     max_shard_size=10)
    with pytest.raises(sc.HeaderError, match="NUL"):
        sc.save_file({"a\x00": np.ones(3)}, tmp_path / "c", max_shard_size=10)
    assert not (tmp_path / "c").exists()


def test_empty_checkpoint(tmp_path):
    sc.save_file({}, tmp_path / "e", max_shard_size="1GB")
    with sc.safe_open(tmp_path / "e") as f:
        assert f.keys() == []
        assert f.get_tensors() == {}
        assert f.metadata() is None


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("via", ["directory", "index"])
def test_safe_open_over_shards(tmp_path, via):
    d = _write(tmp_path)
    t = _model()
    target = d if via == "directory" else os.path.join(d, "model" + INDEX_SUFFIX)
    with sc.safe_open(target) as f:
        assert isinstance(f, ShardedSafeOpen)
        assert f.shards.opened == {}  # nothing but the index read so far
        assert f.keys() == sorted(t)
        assert len(f) == len(t) and "embed" in f and "nope" not in f
        assert list(f) == sorted(t)
        np.testing.assert_array_equal(f.get_tensor("layers.1.b"), t["layers.1.b"])
        assert list(f.shards.opened) == ["model-00002-of-00004.safetensors"]  # lazily, one shard
        np.testing.assert_array_equal(f.get_slice("embed")[5:9, ::3], t["embed"][5:9, ::3])
        assert f.get_slice("embed").get_shape() == [100, 64]
        assert f.metadata() == {"format": "np"}
        assert f.index_metadata()["total_size"] == sum(a.nbytes for a in t.values())
        everything = f.get_tensors()
        assert sorted(f.offset_keys()) == sorted(t)
        assert set(f.header.tensors) == set(t)
        assert f.stats["bytes_read"] > 0
    assert f.closed
    for name, arr in t.items():
        np.testing.assert_array_equal(everything[name], arr)
        assert everything[name].dtype == arr.dtype
    with pytest.raises(sc.ClosedHandleError):
        f.get_tensor("embed")


def test_load_file_over_shards(tmp_path):
    d = _write(tmp_path)
    out = sc.load_file(d)
    for name, arr in _model().items():
        np.testing.assert_array_equal(out[name], arr)
    assert sc.load_file(os.path.join(d, "model" + INDEX_SUFFIX)).keys() == out.keys()


def test_directory_with_one_unsharded_file(tmp_path):
    sc.save_file({"a": np.arange(3)}, tmp_path / "model.safetensors")
    with sc.safe_open(tmp_path) as f:
        assert f.keys() == ["a"]
    np.testing.assert_array_equal(sc.load_file(tmp_path)["a"], np.arange(3))


def test_directory_without_checkpoint(tmp_path):
    with pytest.raises(sc.SafecodecError, match=r"no '\*\.safetensors\.index\.json' index and 0"):
        sc.safe_open(tmp_path)


def test_missing_name_lists_close_matches(tmp_path):
    with sc.safe_open(_write(tmp_path)) as f, pytest.raises(sc.TensorNotFoundError,
                                                            match=r"did you mean 'layers\.0\.w'"):
        f.get_tensor("layers.0.W")


def test_tensors_a_shard_holds_but_the_index_does_not_name_are_ignored(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    sc.save_file({"a": np.ones(2), "stale": np.zeros(2)}, d / "s1.safetensors")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 16}, "weight_map": {"a": "s1.safetensors"}}))
    assert list(sc.load_file(d)) == ["a"]


# ----------------------------------------------------------------------------- errors


def _index(d, weight_map, raw=None):
    (d / "model.safetensors.index.json").write_text(
        raw if raw is not None else json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_missing_shard_is_an_error(tmp_path):
    d = _write(tmp_path)
    os.remove(os.path.join(d, "model-00003-of-00004.safetensors"))
    with sc.safe_open(d) as f:
        np.testing.assert_array_equal(f.get_tensor("step"), _model()["step"])  # others work
        with pytest.raises(sc.SafecodecError,
                           match=r"shard 'model-00003-of-00004.safetensors' listed in index .* "
                                 r"for 1 tensor \(e.g. 'embed'\) does not exist"):
            f.get_tensor("embed")
    with pytest.raises(sc.SafecodecError, match="does not exist"):
        sc.load_file(d)


def test_name_in_two_shards_is_an_error(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    sc.save_file({"a": np.ones(2)}, d / "s1.safetensors")
    sc.save_file({"a": np.ones(2)}, d / "s2.safetensors")
    _index(d, None, raw='{"weight_map": {"a": "s1.safetensors", "a": "s2.safetensors"}}')
    with pytest.raises(sc.SafecodecError,
                       match=r"tensor 'a' is mapped to two shards \('s1\.safetensors', 's2\.safetensors'\)"):
        sc.safe_open(d)


def test_index_pointing_at_a_tensor_missing_from_its_shard(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    sc.save_file({"a": np.ones(2)}, d / "s1.safetensors")
    sc.save_file({"b": np.ones(2)}, d / "s2.safetensors")
    _index(d, {"a": "s1.safetensors", "b": "s1.safetensors"})
    with sc.safe_open(d) as f, pytest.raises(
            sc.SafecodecError,
            match=r"maps 1 tensor to shard 's1.safetensors' that it does not hold: 'b' "
                  r"\(the shard holds 1 tensor\)"):
        f.get_tensor("a")


@pytest.mark.parametrize(("raw", "match"), [
    ("{not json", "is not valid JSON"),
    ("[]", "must be a JSON object with a 'weight_map'"),
    ('{"weight_map": []}', "must be a JSON object with a 'weight_map'"),
    ('{"weight_map": {"a": 3}}', "maps to 3, expected a shard file name"),
    ('{"weight_map": {"a": "../../etc/passwd"}}', "not a file inside the checkpoint"),
    ('{"weight_map": {"a": "/abs.safetensors"}}', "not a file inside the checkpoint"),
    ('{"weight_map": {"a": "s3://elsewhere/x.safetensors"}}', "not a file inside"),
    ('{"weight_map": {}, "metadata": 5}', "'metadata' must be an object"),
    ('{"weight_map": {}, "weight_map": {}}', "key 'weight_map' appears twice"),
])
def test_bad_index_files(tmp_path, raw, match):
    _index(tmp_path, None, raw=raw)
    with pytest.raises(sc.SafecodecError, match=match):
        sc.safe_open(tmp_path)


def test_bad_shard_is_a_format_error(tmp_path):
    d = _write(tmp_path)
    with open(os.path.join(d, "model-00004-of-00004.safetensors"), "r+b") as f:
        f.write(b"\xff" * 8)
    with sc.safe_open(d) as f, pytest.raises(sc.HeaderError, match="header too large"):
        f.get_tensor("step")


# ----------------------------------------------------------------------------- remote, JAX


def test_sharded_round_trip_in_memory(mem_url):
    t = _model()
    index = save_sharded(t, f"{mem_url}/ck", {"format": "np"}, max_shard_size="10KiB")
    assert index == f"{mem_url}/ck/model.safetensors.index.json"
    fs = fsspec.filesystem("memory")
    assert len(fs.ls(f"{mem_url}/ck")) == 5
    with sc.safe_open(f"{mem_url}/ck") as f:
        np.testing.assert_array_equal(f.get_tensor("layers.0.w"), t["layers.0.w"])
        assert len(f.shards.opened) == 1
        out = f.get_tensors()
    for name, arr in t.items():
        np.testing.assert_array_equal(out[name], arr)
    np.testing.assert_array_equal(sc.load_file(index)["embed"], t["embed"])


def test_sharded_with_fs_argument(mem_url):
    fs = fsspec.filesystem("memory")
    root = mem_url.removeprefix("memory://")
    t = _model()
    index = save_sharded(t, f"{root}/ck", max_shard_size="10KiB", fs=fs)
    assert index == f"{root}/ck/model.safetensors.index.json"
    out = sc.load_file(f"{root}/ck", fs=fs)
    np.testing.assert_array_equal(out["step"], t["step"])


def test_sharded_jax_handle(tmp_path):
    jax = pytest.importorskip("jax", reason="JAX output needs jax")
    d = _write(tmp_path)
    t = _model()
    with sc.safe_open(d, framework="jax") as f:
        w = f.get_tensor("layers.0.w")
        assert isinstance(w, jax.Array)
        np.testing.assert_array_equal(np.asarray(w), t["layers.0.w"])
        rows = f.get_slice("embed")[2:4]
        np.testing.assert_array_equal(np.asarray(rows), t["embed"][2:4])
        if jax.config.jax_enable_x64:
            out = f.get_tensors()
        else:  # the int64 'step' is narrowed, and the JAX loader says so
            with pytest.warns(Warning, match="x64 mode is off"):
                out = f.get_tensors()
    assert sorted(out) == sorted(t)
    np.testing.assert_array_equal(np.asarray(out["embed"]), t["embed"])


def test_sharded_jax_sharding_mapping_and_tree_loading(tmp_path):
    jax = pytest.importorskip("jax", reason="JAX output needs jax")
    t = {k: v for k, v in _model().items() if k != "step"}
    d = str(tmp_path / "ck")
    sc.save_file(t, d, max_shard_size="10KiB")
    dev = jax.devices()[0]
    one = jax.sharding.make_single_device_sharding(dev)
    # A mapping naming tensors of different shards: each shard gets its part of it.
    with sc.safe_open(d, framework="jax", sharding={"embed": one, "layers.0.b": one}) as f:
        out = f.get_tensors()
        assert out["embed"].sharding == one
        np.testing.assert_array_equal(np.asarray(out["layers.0.b"]), t["layers.0.b"])
        assert f.get_tensor("embed").sharding == one
    with pytest.raises(sc.TensorNotFoundError, match="sharding= names 1 tensor"), \
            sc.safe_open(d, framework="jax", sharding={"nope": one}) as f:
        f.get_tensors()
    # The tree loader works over a sharded checkpoint (names unflatten at the dots).
    tree = sc.load_tree(d)
    np.testing.assert_array_equal(np.asarray(tree["layers"]["1"]["w"]), t["layers.1.w"])


def test_read_header_of_a_sharded_checkpoint(tmp_path, mem_url):
    d = _write(tmp_path)
    header = sc.read_header(d)
    assert set(header.tensors) == set(_model())
    assert header.metadata == {"format": "np"}
    assert header.tensors["embed"].shape == (100, 64)
    save_sharded(_model(), f"{mem_url}/ck", max_shard_size="10KiB")
    assert set(sc.read_header(f"{mem_url}/ck").tensors) == set(_model())


def test_sharded_handle_is_thread_safe(mem_url):
    from concurrent.futures import ThreadPoolExecutor

    t = _model()
    save_sharded(t, f"{mem_url}/ck", max_shard_size="10KiB")
    names = sorted(t) * 8
    with sc.safe_open(f"{mem_url}/ck") as f, ThreadPoolExecutor(8) as pool:
        got = list(pool.map(f.get_tensor, names))
        assert len(f.shards.opened) == 4  # each shard opened once despite the races
    for name, arr in zip(names, got, strict=True):
        np.testing.assert_array_equal(arr, t[name])


# ----------------------------------------------------------------------------- re-saving


def _listing(d) -> set[str]:
    return {os.path.relpath(os.path.join(root, f), d)
            for root, _, files in os.walk(d) for f in files}


def _unrelated_files(d) -> dict[str, bytes]:
    """Files a re-save must leave alone: notes, a shard-like file no index names, another
    checkpoint's index and shard, a file in a subfolder."""
    files = {
        "notes.txt": b"keep me",
        "model-00009-of-00009.safetensors": sc.save({"x": np.ones(2)}),
        "sub/model-00001-of-00004.safetensors": b"not a shard of this checkpoint",
    }
    os.makedirs(os.path.join(d, "sub"), exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    other = save_sharded({"o": np.zeros(3)}, os.path.join(d, "other.safetensors"),
                         max_shard_size="1GB")
    for name in ("other.safetensors.index.json", "other-00001-of-00001.safetensors"):
        with open(os.path.join(d, name), "rb") as f:
            files[name] = f.read()
    assert other.endswith("other.safetensors.index.json")
    return files


def test_resave_with_fewer_shards_removes_exactly_the_old_shards(tmp_path):
    d = _write(tmp_path)  # 4 shards
    keep = _unrelated_files(d)
    t = _model()
    sc.save_file(t, d, {"format": "np"}, max_shard_size="1GB")  # now 1 shard
    assert _listing(d) == {"model" + INDEX_SUFFIX, "model-00001-of-00001.safetensors", *keep}
    for name, data in keep.items():
        with open(os.path.join(d, name), "rb") as f:
            assert f.read() == data, name
    out = sc.load_file(d)
    for name, arr in t.items():
        np.testing.assert_array_equal(out[name], arr)
    # The other checkpoint in the folder is intact.
    np.testing.assert_array_equal(sc.load_file(os.path.join(d, "other.safetensors.index.json"))["o"],
                                  np.zeros(3))


def test_resave_keeps_shards_that_the_new_index_names_again(tmp_path):
    d = _write(tmp_path)
    t = _model()
    t["step"] = np.array(13, np.int64)
    sc.save_file(t, d, {"format": "np"}, max_shard_size="10KiB")  # the same four names
    assert len(_listing(d)) == 5
    assert sc.load_file(d)["step"] == 13


def test_stale_shards_are_removed_only_after_the_new_index_is_published(tmp_path, monkeypatch):
    d = _write(tmp_path)
    index = os.path.join(d, "model" + INDEX_SUFFIX)
    removed: list[str] = []
    original = _sharded._remove

    def checking_remove(target):
        # At each removal the new checkpoint is complete and published: the index on disk
        # names only the new shards, and they exist.
        now = json.loads(_read(index))["weight_map"]
        assert set(now.values()) == {"model-00001-of-00002.safetensors",
                                     "model-00002-of-00002.safetensors"}
        assert all(os.path.exists(os.path.join(d, s)) for s in now.values())
        removed.append(os.path.basename(target.path))
        original(target)

    monkeypatch.setattr(_sharded, "_remove", checking_remove)
    sc.save_file(_model(), d, {"format": "np"}, max_shard_size="30KiB")
    assert sorted(removed) == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert _listing(d) == {"model" + INDEX_SUFFIX, "model-00001-of-00002.safetensors",
                           "model-00002-of-00002.safetensors"}


def _contents(d) -> dict[str, bytes]:
    out = {}
    for name in os.listdir(d):
        with open(os.path.join(d, name), "rb") as f:
            out[name] = f.read()
    return out


def test_failed_resave_removes_nothing(tmp_path):
    d = _write(tmp_path)
    before = _contents(d)
    written = []

    def failing_writer(part, sink, metadata):
        if written:
            raise OSError(28, "No space left on device")
        written.append(sink)
        return _sharded.stream_file(part, sink, metadata)

    with pytest.raises(OSError, match="No space left"):
        save_sharded(_model(), d, {"format": "np"}, max_shard_size="30KiB",
                     write_shard=failing_writer)
    assert _contents(d) == before


def test_resave_over_an_unreadable_index_removes_nothing_else(tmp_path):
    d = _write(tmp_path)
    index = os.path.join(d, "model" + INDEX_SUFFIX)
    with open(index, "w") as f:
        f.write("{not json")
    sc.save_file({"a": np.ones(2)}, d, max_shard_size="1GB")
    assert _listing(d) == {"model" + INDEX_SUFFIX, "model-00001-of-00001.safetensors",
                           *(f"model-0000{i}-of-00004.safetensors" for i in range(1, 5))}


def test_resave_removes_stale_shards_on_a_remote_filesystem(mem_url):
    fs = fsspec.filesystem("memory")
    save_sharded(_model(), f"{mem_url}/ck", max_shard_size="10KiB")
    fs.pipe(f"{mem_url}/ck/notes.txt", b"keep")
    save_sharded(_model(), f"{mem_url}/ck", max_shard_size="1GB")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{mem_url}/ck", detail=False))
    assert names == ["model-00001-of-00001.safetensors", "model" + INDEX_SUFFIX, "notes.txt"]
    np.testing.assert_array_equal(sc.load_file(f"{mem_url}/ck")["embed"], _model()["embed"])
