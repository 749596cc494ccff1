"""Integrity checksums, crash safety of the writer, concurrent readers, files changed
underneath a reader."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import ml_dtypes
import numpy as np
import pytest

import safecodec as sc
from safecodec import _api, _integrity, _sink, _source


@pytest.fixture
def tensors():
    rng = np.random.default_rng(0)
    return {
        "emb": rng.standard_normal((64, 32)).astype(np.float32),
        "bias": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
        "step": np.int64(12),
        "empty": np.zeros((0, 3), np.int8),
    }


# ----------------------------------------------------------------------------- checksums

def test_checksums_round_trip_and_stay_valid_for_the_reference(tensors, tmp_path):
    path = tmp_path / "c.safetensors"
    sc.save_file(tensors, path, {"user": "kept"}, checksums=True)
    assert sc.read_header(path).metadata == {"user": "kept"}  # own keys hidden
    md = sc.read_header(path).raw_metadata
    assert md["user"] == "kept" and _integrity.CHECKSUM_KEY in md
    back = sc.load_file(path, verify=True)
    for name, value in tensors.items():
        assert np.array_equal(back[name], value)
    assert _api.verify_file(path) == []
    assert sc.save(tensors, {"user": "kept"}, checksums=True) == path.read_bytes()
    safetensors = pytest.importorskip("safetensors", reason="reference wheel not installed")
    assert {n for n, _ in safetensors.deserialize(path.read_bytes())} == set(tensors)


def test_a_flipped_bit_is_reported_with_the_tensor_name(tensors, tmp_path):
    path = tmp_path / "c.safetensors"
    sc.save_file(tensors, path, checksums=True)
    header = sc.read_header(path)
    info = header.tensors["emb"]
    with open(path, "r+b") as f:
        f.seek(header.data_start + info.begin + 100)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))
    with pytest.raises(sc.ChecksumError, match=r"checksum mismatch for tensor 'emb'"):
        sc.load_file(path, verify=True)
    with sc.safe_open(path, verify=True) as f:
        assert np.array_equal(f.get_tensor("bias"), tensors["bias"])  # others still verify
        with pytest.raises(sc.ChecksumError, match="'emb'"):
            f.get_slice("emb")
    problems = _api.verify_file(path)
    assert len(problems) == 1 and "'emb'" in problems[0]
    sc.load_file(path)  # without verify=True the file still loads


def test_verify_needs_checksums(tensors):
    data = sc.save(tensors)
    with pytest.raises(sc.ChecksumError, match="stores no checksums"):
        sc.load(data, verify=True)
    bad = sc.save(tensors, {_integrity.CHECKSUM_KEY: "not json"})
    with pytest.raises(sc.ChecksumError, match="not valid JSON"):
        sc.load(bad, verify=True)


def test_verify_with_plain_reads(tensors, tmp_path, restore_flags):
    path = tmp_path / "c.safetensors"
    sc.save_file(tensors, path, checksums=True)
    _source.MMAP_AVAILABLE = False
    assert set(sc.load_file(path, verify=True)) == set(tensors)


# ----------------------------------------------------------------------------- crash safety

# The child stops at a known point instead of racing a timer: os.replace / os.rename (the
# publication of a finished temporary) announce themselves and hang, so the child can never
# finish before the parent kills it, whatever the machine's load.
WRITER = textwrap.dedent(
    """
    import os, sys, time, numpy as np, safecodec as sc

    def publish(*args, **kwargs):
        print("publishing", flush=True)
        time.sleep(3600)

    os.replace = os.rename = publish
    big = np.ones((16, 1 << 20), np.float32)  # 64 MiB
    print("ready", flush=True)
    sc.save_file({"big": big}, sys.argv[1])
    print("done", flush=True)
    """
)


def _temporaries(directory, pid: int) -> list[str]:
    pattern = re.compile(rf"\.m\.safetensors\.{pid}\.[0-9a-f]{{8}}{re.escape(_sink.TMP_SUFFIX)}")
    return [n for n in os.listdir(directory) if pattern.fullmatch(n)]


def _wait_for_data_in_temporary(directory, path, before_stat, proc) -> None:
    """Return once a temporary of ``proc`` holds data, or the target changed, or the child
    exited (the caller's assertions then fail)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        for name in _temporaries(directory, proc.pid):
            try:
                if os.stat(os.path.join(directory, name)).st_size > 0:
                    return
            except FileNotFoundError:
                pass
        st = os.stat(path)
        if (st.st_ino, st.st_size, st.st_mtime_ns) != before_stat:
            return  # written in place: the caller's check of the target fails
        time.sleep(0.001)
    assert proc.poll() is None, "the writer exited before its temporary held data"
    raise AssertionError("no temporary file with data appeared within 60 s")


@pytest.mark.parametrize("point", ["temporary-holds-data", "before-rename"])
def test_writer_killed_mid_write_leaves_the_previous_file(tmp_path, point):
    path = tmp_path / "m.safetensors"
    sc.save_file({"old": np.arange(10)}, path)
    before = path.read_bytes()
    st = os.stat(path)
    before_stat = (st.st_ino, st.st_size, st.st_mtime_ns)
    with subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                          cwd=os.path.dirname(os.path.dirname(__file__))) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == b"ready"
            if point == "before-rename":
                # Everything written; only the rename is left. A writer that never renames
                # (writes the target directly) says "done" here instead.
                assert proc.stdout.readline().strip() == b"publishing"
            else:
                _wait_for_data_in_temporary(tmp_path, path, before_stat, proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    assert path.read_bytes() == before  # never torn, never replaced
    left = _temporaries(tmp_path, proc.pid)
    assert len(left) == 1, os.listdir(tmp_path)  # the data went to a temporary
    assert os.path.getsize(tmp_path / left[0]) > 0
    if point == "before-rename":
        assert os.path.getsize(tmp_path / left[0]) > 64 << 20  # all of it
    sc.save_file({"new": np.arange(3)}, path)  # a later save cleans what the dead one left
    assert os.listdir(tmp_path) == ["m.safetensors"]
    assert list(sc.load_file(path)) == ["new"]


def _pid_not_running_here() -> int:
    pid = 4_000_000
    while os.path.exists(f"/proc/{pid}"):
        pid += 1
    return pid


def test_temporaries_of_live_writers_are_not_removed(tmp_path):
    """A writer in another PID namespace (a container sharing the directory) has a pid that
    means nothing here; what tells it is alive is the lock it holds on its temporary."""
    import fcntl

    path = tmp_path / "m.safetensors"
    live = tmp_path / f".m.safetensors.{_pid_not_running_here()}.abcd{_sink.TMP_SUFFIX}"
    live.write_bytes(b"in progress")
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        sc.save_file({"x": np.ones(1)}, path)
        assert live.exists()  # its writer holds the lock: alive, wherever its pid lives
    sc.save_file({"x": np.ones(1)}, path)  # lock released: the writer is gone
    assert not live.exists()


def test_fresh_empty_temporaries_are_left_alone(tmp_path):
    """A writer may be between creating its temporary and locking it: an empty, recent,
    unlocked temporary is kept; an old one is removed."""
    path = tmp_path / "m.safetensors"
    fresh = tmp_path / f".m.safetensors.{_pid_not_running_here()}.abcd{_sink.TMP_SUFFIX}"
    fresh.write_bytes(b"")
    sc.save_file({"x": np.ones(1)}, path)
    assert fresh.exists()
    old = time.time() - _sink.STALE_EMPTY_AGE - 5
    os.utime(fresh, (old, old))
    sc.save_file({"x": np.ones(1)}, path)
    assert not fresh.exists()


# ----------------------------------------------------------------------------- concurrency

@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "plain-read"])
def test_many_threads_reading_one_handle(tmp_path, restore_flags, mapped):
    rng = np.random.default_rng(1)
    tensors = {f"t{i}": rng.standard_normal((50, 40)).astype(np.float32) for i in range(16)}
    path = tmp_path / "c.safetensors"
    sc.save_file(tensors, path)
    _source.MMAP_AVAILABLE = mapped
    errors: list[BaseException] = []
    with sc.safe_open(path) as f:

        def work(seed: int) -> None:
            r = np.random.default_rng(seed)
            try:
                for _ in range(60):
                    name = f"t{r.integers(16)}"
                    a, b = sorted(r.integers(0, 50, 2))
                    if r.integers(2):
                        assert np.array_equal(f.get_tensor(name), tensors[name])
                    else:
                        assert np.array_equal(f.get_slice(name)[a:b, ::3], tensors[name][a:b, ::3])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]


# ----------------------------------------------------------------------------- changed files

# Load, then truncate the file or rewrite its data in place (same inode, same pages), in a
# child process: an array that is still a view of the file then changes its values or
# dies of SIGBUS, without taking pytest along.
CHANGED_FILE = textwrap.dedent(
    """
    import os, sys, numpy as np, safecodec as sc, safecodec.numpy as scn
    path, loader, change = sys.argv[1:]

    def safe_open_copy():
        with sc.safe_open(path, copy=True) as f:
            return f.get_tensors()

    LOADERS = {
        "numpy-backend-pread": lambda: scn.load_file(path, backend="pread"),
        "numpy-copy": lambda: scn.load_file(path, copy=True),
        "load_file-copy": lambda: sc.load_file(path, copy=True),
        "safe_open-copy": safe_open_copy,
        "numpy-backend-mmap": lambda: scn.load_file(path, backend="mmap"),
    }
    values = np.arange(4096, dtype=np.float64)  # 32 KiB: several pages
    sc.save_file({"t": values}, path)
    arrays = LOADERS[loader]()
    if change == "truncate":
        os.truncate(path, 16)
    else:
        with open(path, "r+b") as fh:
            fh.seek(sc.read_header(path).data_start)
            fh.write((-values).tobytes())
        assert np.array_equal(sc.load_file(path, copy=True)["t"], -values)  # it did change
    print("kept" if np.array_equal(arrays["t"], values) else "changed", flush=True)
    """
)
PRIVATE_LOADERS = ["numpy-backend-pread", "numpy-copy", "load_file-copy", "safe_open-copy"]


def _after_change(tmp_path, loader: str, change: str) -> tuple[int, str]:
    out = subprocess.run(
        [sys.executable, "-c", CHANGED_FILE, str(tmp_path / "t.safetensors"), loader, change],
        capture_output=True, text=True, timeout=120,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert out.returncode in (0, -signal.SIGBUS), out.stderr[-3000:]
    return out.returncode, out.stdout.strip()


@pytest.mark.parametrize("change", ["rewrite-in-place", "truncate"])
@pytest.mark.parametrize("loader", PRIVATE_LOADERS)
def test_private_arrays_keep_their_bytes_when_the_file_changes_in_place(tmp_path, loader, change):
    """backend="pread" and copy=True promise arrays that own their bytes (positioned reads,
    never a mapping): whatever later happens to the file, they keep their values."""
    assert _after_change(tmp_path, loader, change) == (0, "kept")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux page-cache semantics")
@pytest.mark.parametrize(("change", "expected"), [("rewrite-in-place", (0, "changed")),
                                                  ("truncate", (-signal.SIGBUS, ""))])
def test_mapped_arrays_do_see_the_change(tmp_path, change, expected):
    """The contrast that keeps the test above honest: the same changes do reach the default
    mmap views (unwritten pages of a private mapping share the page cache)."""
    assert _after_change(tmp_path, "numpy-backend-mmap", change) == expected


def test_copy_mode_reports_a_file_truncated_before_the_load(tmp_path):
    path = tmp_path / "t.safetensors"
    sc.save_file({"t": np.arange(4096, dtype=np.float64)}, path)
    os.truncate(path, 16)
    with pytest.raises(sc.HeaderError, match="invalid header length"):
        sc.load_file(path, copy=True)


def test_copy_mode_reports_truncation_during_reads(tmp_path):
    path = tmp_path / "t.safetensors"
    sc.save_file({"a": np.ones(4096), "b": np.ones(4096)}, path)
    with sc.safe_open(path, copy=True) as f:
        os.truncate(path, f.header.data_start + 10)
        with pytest.raises(sc.RemoteIOError, match="truncated"):
            f.get_tensors()


def test_verify_with_copy_never_maps_the_file(tensors, tmp_path):
    path = tmp_path / "c.safetensors"
    sc.save_file(tensors, path, checksums=True)
    with sc.safe_open(path, copy=True, verify=True) as f:
        got = f.get_tensors()
        assert not f.reader.source._maps  # read with pread only
    for name, value in tensors.items():
        assert np.array_equal(got[name], value)


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        ('{"algorithm":"md5","tensors":{}}', "unsupported algorithm 'md5'"),
        ('{"algorithm":"sha256","tensors":{"emb":"abc"}}', "malformed digests"),
        ('["sha256"]', "unsupported algorithm"),
    ],
)
def test_malformed_checksum_entries_are_reported(tensors, stored, message):
    data = sc.save(tensors, {_integrity.CHECKSUM_KEY: stored})
    with pytest.raises(sc.ChecksumError, match=message):
        sc.load(data, verify=True)


def test_tensor_without_a_stored_checksum(tensors):
    digests = {"emb": "0" * 64}
    data = sc.save(tensors, {_integrity.CHECKSUM_KEY: _integrity.encode(digests)})
    with sc.safe_open(data, verify=True) as f, pytest.raises(
        sc.ChecksumError, match="tensor 'bias' has no stored checksum"
    ):
        f.get_tensor("bias")


def test_verify_file_reports_missing_tensors_and_absent_checksums(tensors, tmp_path):
    path = tmp_path / "v.safetensors"
    real = sc.read_header(sc.save(tensors, checksums=True)).raw_metadata[_integrity.CHECKSUM_KEY]
    digests = {**_integrity.decode({_integrity.CHECKSUM_KEY: real}), "ghost": "0" * 64}
    sc.save_file(tensors, path, {_integrity.CHECKSUM_KEY: _integrity.encode(digests)})
    assert _api.verify_file(path) == ["checksum stored for missing tensor 'ghost'"]
    sc.save_file(tensors, path)
    with pytest.raises(sc.ChecksumError, match="has no checksums"):
        _api.verify_file(path)
