"""Remote sources through fsspec, on ``memory://`` and wrapped filesystems (fast unit tests).

The real-server tests (HTTP range server, moto S3) are in test_remote_servers.py.
"""

from __future__ import annotations

import threading

import fsspec
import numpy as np
import pytest
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

import safecodec as sc
from safecodec import _remote, _resolve, _sink
from safecodec._reader import FIRST_READ
from safecodec._remote import merge_ranges

#: Fixtures (servers on 127.0.0.1, memory:// prefixes) live in tests/helpers/conftest_remote.py.
pytest_plugins = ["conftest_remote"]


def _tensors() -> dict[str, np.ndarray]:
    import ml_dtypes

    rng = np.random.default_rng(0)
    return {
        "big": rng.standard_normal((256, 128)).astype(np.float32),  # 128 KiB
        "small": np.arange(10, dtype=np.int16),
        "scalar": np.array(3.5, np.float64),
        "empty": np.zeros((0, 4), np.float32),
        "bf": rng.standard_normal(64).astype(ml_dtypes.bfloat16),
    }


# ----------------------------------------------------------------------------- ranges


def test_merge_ranges_merges_neighbours_and_sorts():
    assert merge_ranges([(100, 200), (0, 50), (60, 80)], gap=16) == [(0, 80), (100, 200)]
    assert merge_ranges([(0, 10), (5, 20), (5, 7)], gap=0) == [(0, 20)]
    assert merge_ranges([(0, 10), (11, 20)], gap=0) == [(0, 10), (11, 20)]
    assert merge_ranges([(3, 3), (0, 0)]) == []


def test_merge_ranges_never_doubles_the_bytes():
    # half rows of a column-sharded tensor (6 KiB asked, 6 KiB gap, under MERGE_GAP): the
    # other halves belong to another process and are never merged in
    row, half = 12288, 6144
    runs = [(r * row, r * row + half) for r in range(64)]
    assert merge_ranges(runs) == runs
    # however gaps and runs compare, the bytes merged in stay within MERGE_SLACK of the
    # bytes asked for, plus gaps too small to be worth a request of their own
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(1, 40_000, 50)
        gaps = rng.integers(1, 40_000, 50) // rng.choice([1, 100], 50)
        starts = np.cumsum(sizes + gaps) - sizes
        asked = [(int(a), int(a + n)) for a, n in zip(starts, sizes, strict=True)]
        spans = merge_ranges(asked)
        assert all(any(a <= s0 and e0 <= b for a, b in spans) for s0, e0 in asked)
        small = sum(int(g) for g in gaps[:-1] if g <= _remote.MERGE_ALWAYS)
        assert sum(b - a for a, b in spans) <= (
            int(sizes.sum()) * (1 + _remote.MERGE_SLACK) + small)


def test_merge_ranges_splits_large_spans():
    assert merge_ranges([(0, 25)], gap=0, max_request=10) == [(0, 10), (10, 20), (20, 25)]


# ----------------------------------------------------------------------------- source


def test_source_reads_exact_ranges_and_counts(mem_url):
    fs = fsspec.filesystem("memory")
    data = bytes(range(256)) * 300
    fs.pipe(f"{mem_url}/blob", data)
    src = _resolve.open_remote(f"{mem_url}/blob")
    assert src.size == len(data)
    assert src.buffer() is None
    assert bytes(src.read(10, 5)) == data[10:15]
    # memory:// offers no version pinning: each read re-checks the identity (one info)
    assert src.stats.as_dict() == {"bytes_read": 5, "requests": 1, "metadata_requests": 2}
    out = src.read_ranges([(400, 410), (0, 4), (2, 6), (50_000, 60_000)])
    assert [bytes(o) for o in out] == [data[400:410], data[0:4], data[2:6], data[50_000:60_000]]
    # (0,4), (2,6) and (400,410) merge into one request (a gap smaller than a response's
    # headers); 50_000 is far away: another.
    assert src.stats.requests == 1 + 2
    assert src.stats.bytes_read == 5 + 410 + 10_000
    buf = bytearray(7)
    src.readinto(20, memoryview(buf))
    assert bytes(buf) == data[20:27]


def test_source_read_ranges_across_split_points(mem_url, monkeypatch):
    monkeypatch.setattr(_remote, "MAX_REQUEST", 100)
    fs = fsspec.filesystem("memory")
    data = bytes(range(256)) * 4
    fs.pipe(f"{mem_url}/blob", data)
    src = _resolve.open_remote(f"{mem_url}/blob")
    (whole,) = src.read_ranges([(10, 1000)])
    assert bytes(whole) == data[10:1000]
    assert src.stats.requests == 10  # 990 bytes in pieces of at most 100
    assert bytes(src.read(0, 1024)) == data


def test_source_rejects_ranges_outside_the_object(mem_url):
    fsspec.filesystem("memory").pipe(f"{mem_url}/blob", b"x" * 100)
    src = _resolve.open_remote(f"{mem_url}/blob")
    with pytest.raises(sc.RemoteIOError, match="wanted 10 bytes at offset 95, the source has 100"):
        src.read(95, 10)
    with pytest.raises(sc.RemoteIOError, match="invalid range 50-40"):
        src.read_ranges([(50, 40)])


def test_source_is_thread_safe(mem_url):
    fs = fsspec.filesystem("memory")
    data = np.random.default_rng(1).integers(0, 256, 1 << 18, dtype=np.uint8).tobytes()
    fs.pipe(f"{mem_url}/blob", data)
    src = _resolve.open_remote(f"{mem_url}/blob")
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(30):
            starts = rng.integers(0, len(data) - 5000, 4)
            ranges = [(int(s), int(s) + int(rng.integers(1, 5000))) for s in starts]
            for (a, b), got in zip(ranges, src.read_ranges(ranges), strict=True):
                if bytes(got) != data[a:b]:
                    errors.append(f"{a}-{b}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert src.stats.bytes_read >= 8 * 30  # every thread's requests were counted


class _BlobFile(AbstractBufferedFile):
    def _fetch_range(self, start, end):
        self.fs.fetched += end - start
        return self.fs.blobs[self.path][start:end]


class _BlobFS(AbstractFileSystem):
    """A synchronous filesystem whose files are fsspec's buffered files (read-ahead by
    default): it counts every byte its files fetch."""

    protocol = "blobtest"

    def __init__(self, blobs, **kwargs):
        super().__init__(**kwargs)
        self.blobs = blobs
        self.fetched = 0

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        if path not in self.blobs:
            raise FileNotFoundError(path)
        return {"name": path, "size": len(self.blobs[path]), "type": "file"}

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None,
              **kwargs):
        return _BlobFile(self, path, mode, block_size="default" if block_size is None else block_size,
                         cache_options=cache_options, **kwargs)


def test_generic_filesystem_is_read_without_read_ahead():
    """Filesystems not known to fetch exact ranges are read through files opened with
    cache_type='none': exactly the bytes asked for are fetched (fsspec's default read-ahead
    would fetch megabytes)."""
    t = _tensors()
    fs = _BlobFS({"/m.safetensors": sc.save(t)}, skip_instance_cache=True)
    with sc.safe_open("/m.safetensors", fs=fs) as f:
        assert f.reader.source.transport.exact is False
        assert fs.fetched == f.stats["bytes_read"] == FIRST_READ
        np.testing.assert_array_equal(f.get_slice("big")[3:5], t["big"][3:5])
        np.testing.assert_array_equal(f.get_tensor("small"), t["small"])
        assert fs.fetched == f.stats["bytes_read"] == FIRST_READ + 2 * 128 * 4 + 20
    out = sc.load_file("/m.safetensors", fs=fs)
    np.testing.assert_array_equal(out["big"], t["big"])


def test_fs_and_storage_options_together_are_refused(mem_url):
    with pytest.raises(sc.SafecodecError, match="either fs= or storage_options="):
        _resolve.open_remote(f"{mem_url}/x", fs=fsspec.filesystem("memory"),
                          storage_options={"a": 1})


def test_missing_object_is_file_not_found(mem_url):
    with pytest.raises(FileNotFoundError):
        sc.safe_open(f"{mem_url}/nope.safetensors")


# ----------------------------------------------------------------------------- reader


def test_round_trip_through_memory_url(mem_url):
    t = _tensors()
    url = f"{mem_url}/m.safetensors"
    sc.save_file(t, url, {"k": "v"})
    out = sc.load_file(url)
    assert list(out) == list(sc.load(sc.save(t, {"k": "v"})))
    for name, arr in t.items():
        np.testing.assert_array_equal(out[name], arr)
        assert out[name].dtype == arr.dtype
    assert out["big"].flags.writeable
    # Same bytes as a local save: the remote writer is the same streaming writer.
    assert fsspec.filesystem("memory").cat(url) == sc.save(t, {"k": "v"})
    assert sc.read_header(url).metadata == {"k": "v"}


def test_path_plus_fs_equals_url(mem_url):
    t = _tensors()
    fs = fsspec.filesystem("memory")
    path = mem_url.removeprefix("memory://") + "/m.safetensors"
    sc.save_file(t, path, fs=fs)
    np.testing.assert_array_equal(sc.load_file(path, fs=fs)["big"], t["big"])
    with sc.safe_open(path, fs=fs) as f:
        assert f.keys() == sorted(t)


def test_lazy_open_reads_header_in_one_request_then_only_what_is_asked(mem_url):
    t = _tensors()
    url = f"{mem_url}/m.safetensors"
    sc.save_file(t, url)
    size = fsspec.filesystem("memory").size(url)
    assert size > FIRST_READ
    with sc.safe_open(url) as f:
        # open (info), header block, identity re-check (memory:// has no version pinning)
        assert f.stats == {"bytes_read": FIRST_READ, "requests": 1, "metadata_requests": 2}
        assert f.metadata() is None
        info = f.header.tensors["big"]
        assert f.stats["requests"] == 1
        np.testing.assert_array_equal(f.get_tensor("big"), t["big"])
        assert f.stats["bytes_read"] == FIRST_READ + info.nbytes
        assert f.stats["requests"] == 2
        rows = f.get_slice("big")[10:12]
        np.testing.assert_array_equal(rows, t["big"][10:12])
        assert f.stats["bytes_read"] == FIRST_READ + info.nbytes + 2 * 128 * 4
        assert f.stats["requests"] == 3


def test_long_header_takes_exactly_two_requests(mem_url):
    t = {f"tensor_with_a_rather_long_name_{i:05d}": np.zeros(1, np.uint8) for i in range(1500)}
    url = f"{mem_url}/m.safetensors"
    sc.save_file(t, url)
    header = sc.read_header(url)
    assert header.data_start > FIRST_READ
    with sc.safe_open(url) as f:
        assert f.stats["requests"] == 2
        assert f.stats["bytes_read"] == header.data_start
        assert len(f.keys()) == 1500


def test_whole_load_streams_once(mem_url, monkeypatch):
    monkeypatch.setattr(_remote, "MAX_REQUEST", 64 * 1024)
    t = _tensors()
    url = f"{mem_url}/m.safetensors"
    sc.save_file(t, url)
    size = fsspec.filesystem("memory").size(url)
    with sc.safe_open(url) as f:
        data_start = f.header.data_start
        out = f.get_tensors()
        # Header block, then the data section once (in 64 KiB concurrent pieces).
        assert f.stats["bytes_read"] == FIRST_READ + (size - data_start)
        assert f.stats["requests"] == 1 + -(-(size - data_start) // (64 * 1024))
        # open; the unchanged check after the header and after the whole transfer
        assert f.stats["metadata_requests"] == 3
    for name, arr in t.items():
        np.testing.assert_array_equal(out[name], arr)


def test_packed_and_sliced_reads_remote(mem_url):
    import ml_dtypes

    vals = np.array([0.5, -1.0, 2.0, 0.0, 6.0, -0.5, 1.5, 3.0], ml_dtypes.float4_e2m1fn)
    url = f"{mem_url}/p.safetensors"
    sc.save_file({"f4": vals, "x": np.arange(24, dtype=np.int32).reshape(2, 3, 4)}, url)
    with sc.safe_open(url) as f:
        np.testing.assert_array_equal(f.get_slice("f4")[1:6], vals[1:6])
        np.testing.assert_array_equal(f.get_slice("x")[:, ::-1, 1], np.arange(24).reshape(2, 3, 4)[:, ::-1, 1])
        np.testing.assert_array_equal(f.get_tensor("f4"), vals)
    np.testing.assert_array_equal(sc.load_file(url)["f4"], vals)


def test_truncated_object_is_an_error_not_wrong_values(mem_url):
    fs = fsspec.filesystem("memory")
    t = _tensors()
    url = f"{mem_url}/m.safetensors"
    sc.save_file(t, url)
    data = fs.cat(url)
    with sc.safe_open(url) as f:
        fs.pipe(url, data[: len(data) // 2])
        with pytest.raises(sc.RemoteIOError, match=r"got \d+ \(was the object truncated or replaced\?\)"):
            f.get_tensors()
        with pytest.raises(sc.RemoteIOError, match="truncated"):
            f.get_slice("big")[-1]


def test_object_replaced_during_load_is_reported(mem_url):
    t = _tensors()
    url = f"{mem_url}/m.safetensors"
    sc.save_file(t, url)
    with sc.safe_open(url) as f:
        # Same size, other values: only the identity check can tell.
        t2 = {k: (v + 1 if v.dtype.kind == "f" else v) for k, v in t.items()}
        sc.save_file(t2, url)
        with pytest.raises(sc.RemoteIOError, match="changed while it was being read"):
            f.get_tensors()


def test_file_too_short_for_its_header_is_a_format_error(mem_url):
    url = f"{mem_url}/bad.safetensors"
    fsspec.filesystem("memory").pipe(url, sc.save(_tensors())[:-3])
    with pytest.raises(sc.SafecodecError, match=r"truncated file: .*need \d+ bytes, the file has \d+ \(3 missing"):
        sc.load_file(url)


def test_get_tensors_on_closed_remote_handle(mem_url):
    url = f"{mem_url}/m.safetensors"
    sc.save_file(_tensors(), url)
    f = sc.safe_open(url)
    f.close()
    with pytest.raises(sc.ClosedHandleError):
        f.get_tensor("big")


# ----------------------------------------------------------------------------- writer


class _ShapeShifter:
    """Says shape (4,) when planned, then turns out to be (5,) when written."""

    shape = (4,)
    dtype = np.dtype(np.float32)

    def __array__(self, dtype=None, copy=None):
        return np.zeros(5, np.float32)


def test_failed_remote_write_leaves_nothing_and_keeps_old_file(mem_url):
    fs = fsspec.filesystem("memory")
    url = f"{mem_url}/m.safetensors"
    sc.save_file({"old": np.ones(3, np.float32)}, url)
    before = fs.cat(url)
    with pytest.raises(sc.SafecodecError, match="changed shape while being written"):
        sc.save_file({"a": np.ones(1000, np.float32), "z": _ShapeShifter()}, url)
    assert fs.cat(url) == before
    assert fs.ls(mem_url, detail=False) == [url.removeprefix("memory://")]
    url2 = f"{mem_url}/new.safetensors"
    with pytest.raises(sc.SafecodecError):
        sc.save_file({"a": np.ones(1000, np.float32), "z": _ShapeShifter()}, url2)
    assert not fs.exists(url2)
    assert len(fs.ls(mem_url)) == 1


def test_remote_write_goes_through_a_temporary_name(mem_url, monkeypatch):
    fs = fsspec.filesystem("memory")
    url = f"{mem_url}/m.safetensors"
    moves: list[tuple[str, str]] = []
    original = type(fs).mv

    def spy(self, src, dst, *a, **k):
        assert not self.exists(dst), "the final name exists before the move"
        assert self.size(src) > 0
        moves.append((src, dst))
        return original(self, src, dst, *a, **k)

    monkeypatch.setattr(type(fs), "mv", spy)
    sc.save_file(_tensors(), url)
    (src, dst), = moves
    assert dst == url.removeprefix("memory://")
    assert src.endswith(_sink.TMP_SUFFIX) and "/.m.safetensors." in src


def test_progress_bar_on_long_transfers(mem_url, monkeypatch, capsys):
    pytest.importorskip("tqdm", reason="progress bars need tqdm")
    monkeypatch.setattr(_remote, "MAX_REQUEST", 16 * 1024)
    url = f"{mem_url}/m.safetensors"
    sc.save_file(_tensors(), url, progress=True)
    assert "write m.safetensors" in capsys.readouterr().err
    out = sc.load_file(url, progress=True)
    assert "read m.safetensors" in capsys.readouterr().err
    np.testing.assert_array_equal(out["big"], _tensors()["big"])
    sc.load_file(url)  # off by default
    assert capsys.readouterr().err == ""


def test_merging_caps_the_number_of_requests_merging_the_smallest_gaps_first():
    # half of every 1.5 KiB row: one request per row would be 5,000 requests
    rows = [(i * 3072, i * 3072 + 1536) for i in range(5000)]
    spans = merge_ranges(rows, max_spans=1000)
    assert len(spans) == 1000
    covered = sum(b - a for a, b in spans)
    assert covered == 5000 * 1536 + 4000 * 1536  # exactly the 4,000 gaps merged
    # the smallest gaps go first: the far-away range keeps its own request
    far = [(0, 10), (20, 30), (40, 50), (10**9, 10**9 + 10)]
    assert merge_ranges(far, gap=0, max_spans=2) == [(0, 50), (10**9, 10**9 + 10)]
    assert merge_ranges(far, gap=0, max_spans=0) == merge_ranges(far, gap=0)  # no cap
