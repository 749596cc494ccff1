"""Copies split across threads (safecodec._threads): split reads and copies return exactly
the file's bytes, keep every error of the one-piece path (truncation, closed handles), and
honour the thread-count setting. Pieces are made tiny here so small files split; nothing is
timed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest

import safecodec as sc
from safecodec import _source, _threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    """Pieces of 4 KiB on 4 KiB boundaries, and the default thread count restored after."""
    monkeypatch.setattr(_threads, "MIN_PIECE", 4096)
    monkeypatch.setattr(_threads, "PIECE_ALIGN", 4096)
    monkeypatch.delenv(_threads.ENV, raising=False)
    yield
    sc.set_threads(None)


@pytest.fixture
def threads_seen(monkeypatch):
    """The threads that ran positioned-read pieces, with their byte counts."""
    seen: list[tuple[int, int]] = []
    real = _source._pread_range

    def spy(fd, offset, out):
        seen.append((threading.get_ident(), len(out)))
        return real(fd, offset, out)

    monkeypatch.setattr(_source, "_pread_range", spy)
    return seen


def _file(tmp_path, nbytes: int = 1 << 18):
    data = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    path = tmp_path / "blob.bin"
    path.write_bytes(data.tobytes())
    return path, data.tobytes()


# ----------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("length", [0, 1, 4095, 8192, 8193, 100_000, 1 << 20])
@pytest.mark.parametrize("address", [0, 8, 4000])
def test_pieces_tile_the_range(threads, length, address):
    parts = _threads.pieces(length, address, threads)
    assert parts[0][0] == 0 and parts[-1][1] == length
    assert all(a < b or length == 0 for a, b in parts)
    assert all(parts[k][1] == parts[k + 1][0] for k in range(len(parts) - 1))
    assert len(parts) <= max(1, min(threads, length // 4096))
    for _, b in parts[:-1]:  # inner boundaries on page boundaries of the destination
        assert (address + b) % 4096 == 0


def test_small_copies_are_one_piece(monkeypatch):
    monkeypatch.setattr(_threads, "MIN_PIECE", 4 << 20)
    assert _threads.pieces((8 << 20) - 1, 0, 16) == [(0, (8 << 20) - 1)]
    assert len(_threads.pieces(8 << 20, 0, 16)) == 2


# ----------------------------------------------------------------------------- thread count


def test_thread_count_default_env_and_setting(monkeypatch):
    assert sc.get_threads() == max(1, min(len(os.sched_getaffinity(0)), _threads.DEFAULT_MAX))
    monkeypatch.setenv("SAFECODEC_THREADS", "3")
    assert sc.get_threads() == 3
    sc.set_threads(5)  # the setting wins over the environment
    assert sc.get_threads() == 5
    sc.set_threads(None)
    assert sc.get_threads() == 3


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5"])
def test_a_bad_thread_count_in_the_environment_is_an_error(monkeypatch, bad):
    monkeypatch.setenv("SAFECODEC_THREADS", bad)
    with pytest.raises(sc.SafecodecError, match="SAFECODEC_THREADS"):
        sc.get_threads()


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "4"])
def test_a_bad_thread_count_setting_is_an_error(bad):
    with pytest.raises(sc.SafecodecError, match="set_threads"):
        sc.set_threads(bad)


@pytest.mark.parametrize("how", ["setting", "environment"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_reads_use_the_thread_count_asked_for(tmp_path, monkeypatch, threads_seen, how, n):
    path, want = _file(tmp_path)
    if how == "setting":
        sc.set_threads(n)
    else:
        monkeypatch.setenv("SAFECODEC_THREADS", str(n))
    src = _source.FileSource(path)
    out = bytearray(len(want))
    src.readinto(0, memoryview(out))
    src.close()
    assert bytes(out) == want
    assert len(threads_seen) == n  # one positioned read per piece
    assert sum(size for _, size in threads_seen) == len(want)
    assert len({ident for ident, _ in threads_seen}) <= n  # a pool thread may take two
    assert threading.get_ident() in {ident for ident, _ in threads_seen}  # caller works too


# ----------------------------------------------------------------------------- split reads


@pytest.mark.parametrize("kind", ["file", "mapped"])
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_a_file_read_in_parallel_pieces_equals_the_file(tmp_path, kind, threads):
    path, want = _file(tmp_path)
    sc.set_threads(threads)
    src = _source.FileSource(path) if kind == "file" else _source.MappedSource(path)
    rng = np.random.default_rng(threads)
    try:
        for offset, length in [(0, len(want)), (1, len(want) - 1), (4095, 70_001),
                               *((int(a), int(b)) for a, b in rng.integers(0, 1 << 17, (8, 2)))]:
            out = np.empty(length + 3, np.uint8)[3:]  # an unaligned destination too
            src.readinto(offset, memoryview(out))
            assert out.tobytes() == want[offset : offset + length]
        assert src.stats.bytes_read > 0
    finally:
        src.close()


@pytest.mark.parametrize("threads", [1, 4])
def test_copy_loads_of_an_8_aligned_file_equal_the_tensors(tmp_path, threads):
    """The reference writer's layout (alignment=8) through copy=True / backend="pread"."""
    rng = np.random.default_rng(1)
    tensors = {"a": rng.standard_normal((37, 1001)).astype(np.float32),
               "b": rng.standard_normal(5).astype(np.float64),
               "c": rng.integers(-9, 9, (3, 20_000), dtype=np.int16)}
    path = tmp_path / "ref8.safetensors"
    sc.save_file(tensors, path, alignment=8)
    sc.set_threads(threads)
    for got in (sc.load_file(path, copy=True), sc.load_file(path, backend="pread")):
        assert got.keys() == tensors.keys()
        for k, v in tensors.items():
            np.testing.assert_array_equal(got[k], v)
            assert got[k].dtype == v.dtype


@pytest.mark.parametrize("threads", [1, 4])
def test_jax_loads_of_an_8_aligned_file_equal_the_tensors(tmp_path, threads):
    pytest.importorskip("jax")
    import safecodec.jax as scj

    rng = np.random.default_rng(2)
    tensors = {f"w{i}": rng.standard_normal((64, 300 + i)).astype(np.float32) for i in range(5)}
    tensors["odd"] = rng.standard_normal(7).astype(np.float32)
    tensors["wide"] = rng.standard_normal((50, 333))  # float64: narrowed unless x64
    path = tmp_path / "ref8.safetensors"
    sc.save_file(tensors, path, alignment=8)
    sc.set_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scj.PrecisionWarning)  # float64 narrowed without x64
        got = scj.load_file(path)
    for k, v in tensors.items():
        np.testing.assert_array_equal(np.asarray(got[k]), v.astype(got[k].dtype))


@pytest.mark.parametrize("dtypes", [(np.float32, np.float32), (np.float64, np.float32),
                                    (np.int64, np.int32), (np.uint8, np.uint8)])
def test_parallel_copies_equal_numpy_copies(dtypes):
    src_t, dst_t = dtypes
    sc.set_threads(3)
    src = (np.arange(3 * 7919, dtype=np.float64) * 1.37).astype(src_t).reshape(3, 7919)
    dst = np.empty_like(src, dtype=dst_t)
    _threads.copy(dst, src, casting="unsafe")
    np.testing.assert_array_equal(dst, src.astype(dst_t))
    strided = np.empty((3, 7919 * 2), dst_t)[:, ::2]  # not contiguous: one np.copyto
    _threads.copy(strided, src, casting="unsafe")
    np.testing.assert_array_equal(strided, src.astype(dst_t))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("keep", [100, 40_000, 200_000])
def test_a_file_truncated_under_a_split_read_raises_the_same_error(tmp_path, threads, keep):
    path, _ = _file(tmp_path)
    sc.set_threads(threads)
    src = _source.FileSource(path)  # size taken now; the file shrinks afterwards
    os.truncate(path, keep)
    out = bytearray(len(_) - 10)
    expected = (f"unexpected end of {path} while reading tensor 'x': wanted {len(out)} bytes "
                f"at offset 10, got {keep - 10} (was the file truncated?)")
    with pytest.raises(sc.RemoteIOError) as info:
        src.readinto(10, memoryview(out), "tensor 'x'")
    src.close()
    assert str(info.value) == expected


@pytest.mark.parametrize("threads", [1, 4])
def test_copy_loads_report_truncation(tmp_path, threads):
    sc.set_threads(threads)
    path = tmp_path / "t.safetensors"
    sc.save_file({"a": np.ones(1 << 15), "b": np.ones(1 << 15)}, path, alignment=8)
    with sc.safe_open(path, copy=True) as f:
        os.truncate(path, f.header.data_start + 100_000)
        with pytest.raises(sc.RemoteIOError, match=r"unexpected end .* \(was the file truncated\?\)"):
            f.get_tensors()


def test_an_error_in_one_piece_waits_for_the_others_then_raises():
    sc.set_threads(4)
    done: list[int] = []

    def piece(a: int, b: int) -> int:
        if a == 0:
            raise OSError("first piece fails")
        time.sleep(0.05)
        done.append(a)
        return a

    parts = _threads.pieces(1 << 16, 0)
    assert len(parts) == 4
    with pytest.raises(OSError, match="first piece fails"):
        _threads.run(piece, parts)
    assert len(done) == 3  # every other piece had finished


def test_closing_while_pieces_are_in_flight_defers_the_close(tmp_path, monkeypatch):
    """close() during a split read: the read completes with the file's bytes (the
    descriptor stays open until every piece is done), later reads raise
    ClosedHandleError."""
    path, want = _file(tmp_path)
    sc.set_threads(4)
    real = _source._pread_range
    started = threading.Event()

    def slow(fd, offset, out):
        started.set()
        time.sleep(0.05)
        return real(fd, offset, out)

    monkeypatch.setattr(_source, "_pread_range", slow)
    src = _source.FileSource(path)
    out = bytearray(len(want))
    errors: list[BaseException] = []

    def read() -> None:
        try:
            src.readinto(0, memoryview(out))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=read)
    t.start()
    started.wait()
    src.close()
    decoy = open(tmp_path / "blob.bin", "rb")  # noqa: SIM115 - would reuse a freed number
    t.join()
    decoy.close()
    assert not errors and bytes(out) == want
    with pytest.raises(sc.ClosedHandleError):
        src.readinto(0, memoryview(out))


def test_a_forked_child_gets_a_working_pool(tmp_path):
    """The pool's threads do not survive fork: the child must start its own, not wait on
    threads that do not exist."""
    path, _ = _file(tmp_path)
    code = f"""
import os, sys
sys.path.insert(0, {ROOT!r})
from safecodec import _source, _threads
_threads.MIN_PIECE = _threads.PIECE_ALIGN = 4096
_threads.set_threads(4)
want = open({str(path)!r}, "rb").read()
def read():
    src = _source.FileSource({str(path)!r}); out = bytearray(len(want))
    src.readinto(0, memoryview(out)); src.close(); return bytes(out) == want
assert read()
pid = os.fork()
if pid == 0:
    os._exit(0 if read() else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    proc = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_copy_loads_share_many_tensors_among_threads(tmp_path, threads_seen, threads):
    """Tensors too small to split are shared out whole among the threads; every kind of
    tensor (zero-size, packed, bool, big enough to split itself) still comes back right."""
    import ml_dtypes

    rng = np.random.default_rng(3)
    tensors: dict[str, np.ndarray] = {}
    for i in range(40):
        tensors[f"f{i:02d}"] = rng.standard_normal(int(rng.integers(1, 900))).astype(np.float32)
    tensors["i8"] = rng.integers(-100, 100, (33, 17), dtype=np.int8)
    tensors["b"] = rng.random(1001) > 0.5
    tensors["h"] = rng.standard_normal((7, 9)).astype(np.float16)
    tensors["empty"] = np.zeros((0, 4), np.float32)
    tensors["f4"] = rng.standard_normal(64).astype(ml_dtypes.float4_e2m1fn)
    tensors["big"] = rng.standard_normal(5000)  # >= 2 pieces of 4 KiB: split itself
    path = tmp_path / "many.safetensors"
    sc.save_file(tensors, path, alignment=8, checksums=True)
    sc.set_threads(threads)
    for verify in (False, True):
        threads_seen.clear()
        got = sc.load_file(path, copy=True, verify=verify)
        assert list(got) == list(sc.read_header(path).tensors)  # file order
        for k, v in tensors.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
            assert got[k].tobytes() == v.tobytes(), k
            assert got[k].flags.owndata or got[k].base is not None
        if threads > 1:
            assert len({ident for ident, _ in threads_seen}) > 1


def test_shared_out_reads_check_checksums(tmp_path, monkeypatch):
    from safecodec import _source as source_module

    sc.set_threads(4)
    tensors = {f"t{i:02d}": np.full(700, i, np.float32) for i in range(20)}
    path = tmp_path / "c.safetensors"
    sc.save_file(tensors, path, alignment=8, checksums=True)
    real = source_module._pread_range

    def flip(fd, offset, out):
        n = real(fd, offset, out)
        if len(out) == 2800 and offset == sc.read_header(path).data_start + 13 * 2800:
            out[5] ^= 1  # t13 arrives corrupted
        return n

    monkeypatch.setattr(source_module, "_pread_range", flip)
    with pytest.raises(sc.ChecksumError, match="'t13'"):
        sc.load_file(path, copy=True, verify=True)


def test_a_piece_that_splits_again_runs_in_its_own_thread():
    """A pool thread never waits on the pool (that could deadlock it): nested runs are
    sequential there."""
    sc.set_threads(2)
    seen: list[tuple[int, int]] = []

    def inner(a: int, b: int) -> int:
        seen.append((threading.get_ident(), a))
        return a

    def outer(a: int, b: int) -> list[int]:
        me = threading.get_ident()
        got = _threads.run(inner, _threads.pieces(1 << 16, 0))
        if a:  # on the pool: every inner piece ran right here
            assert sum(1 for ident, _ in seen if ident == me) == 2
        return got

    results = _threads.run(outer, _threads.pieces(1 << 16, 0))
    assert results == [[0, 32768], [0, 32768]]
