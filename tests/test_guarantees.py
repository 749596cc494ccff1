"""The promises README, SECURITY.md and the integrity guide make, under change, faults and
hostile input: no mixed data, only SafecodecError subclasses, nothing left behind.

Each test names the item of the hardening issue it pins; each failed on the code before
the layered redesign (861e74c).
"""

from __future__ import annotations

import gc
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import safecodec as sc
from safecodec import _sharded

#: Fixtures (servers on 127.0.0.1, memory:// prefixes) live in tests/helpers/conftest_remote.py.
pytest_plugins = ["conftest_remote"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(n: int = 4, rows: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {f"t{i}": rng.standard_normal((rows, 16)).astype(np.float32) for i in range(n)}


def _child(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, check=False)


# ----------------------------------------------------------------------------- 2. sharded re-save


def _save_sharded(t: dict[str, np.ndarray], directory: str, **kw: object) -> None:
    sc.save_file(t, directory, max_shard_size=t["t0"].nbytes, **kw)  # one tensor per shard


def test_failed_sharded_resave_leaves_the_complete_old_checkpoint(tmp_path, monkeypatch):
    d = str(tmp_path / "ck")
    old = _model()
    _save_sharded(old, d)
    before = sorted(os.listdir(d))
    new = {k: v + 1 for k, v in old.items()}

    class Boom(Exception):
        pass

    calls = {"n": 0}
    real = _sharded.stream_file

    def failing(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:  # the third shard fails: two were already written
            raise Boom("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(_sharded, "stream_file", failing)
    with pytest.raises(Boom):
        _save_sharded(new, d)
    monkeypatch.undo()
    assert sorted(os.listdir(d)) == before  # nothing of the failed save is left
    got = sc.load_file(d)
    for k, v in old.items():
        np.testing.assert_array_equal(got[k], v)  # the complete old checkpoint


def test_mixed_shards_are_an_error_never_half_of_each(tmp_path):
    """What a reader sees if a re-save is interrupted between its renames (or a shard is
    replaced by hand): an error naming the shard, not the new shard's values under the old
    index."""
    d, other = str(tmp_path / "ck"), str(tmp_path / "other")
    old = _model()
    _save_sharded(old, d)
    _save_sharded({k: v + 1 for k, v in old.items()}, other)
    shard = "model-00002-of-00004.safetensors"
    os.replace(os.path.join(other, shard), os.path.join(d, shard))
    with pytest.raises(sc.SafecodecError, match=f"shard '{shard}' .* is not the file index"):
        sc.load_file(d)
    with sc.safe_open(d) as f:  # shards the index still matches are readable
        np.testing.assert_array_equal(f.get_tensor("t0"), old["t0"])
        with pytest.raises(sc.SafecodecError, match="is not the file index"):
            f.get_tensor("t1")


def test_sharded_save_killed_before_publishing_leaves_the_old_checkpoint(tmp_path):
    d = str(tmp_path / "ck")
    old = _model()
    _save_sharded(old, d)
    code = (
        "import os, sys, numpy as np, safecodec as sc\n"
        "def stop(*args):\n"  # the first rename: every shard is written and fsynced
        "    os.kill(os.getpid(), 9)\n"
        "os.replace = stop\n"
        "t = {f't{i}': np.full((64, 16), 5, np.float32) for i in range(4)}\n"
        "sc.save_file(t, sys.argv[1], max_shard_size=t['t0'].nbytes)\n"
    )
    proc = _child(code, d)
    assert proc.returncode == -9, proc.stderr
    got = sc.load_file(d)  # every shard was written, none published: the old checkpoint
    for k, v in old.items():
        np.testing.assert_array_equal(got[k], v)
    _save_sharded(old, d)  # the next save removes the dead writer's temporaries
    assert not [n for n in os.listdir(d) if n.endswith(".safecodec-tmp")]


# ----------------------------------------------------------------------------- 3. close vs reads


@pytest.mark.parametrize(("threads", "words"), [(1, 1 << 16), (4, 3 << 20)],
                         ids=["one-piece-reads", "split-reads"])
def test_closing_a_copy_handle_while_threads_read_never_returns_another_files_bytes(
        tmp_path, threads, words):
    """Reads in flight finish or raise ClosedHandleError, never read a reused descriptor:
    with plain positioned reads, and with reads split over threads (12 MiB tensor)."""
    sc.set_threads(threads)
    try:
        _close_while_reading(tmp_path, np.arange(words, dtype=np.uint32))
    finally:
        sc.set_threads(None)


def _close_while_reading(tmp_path, want: np.ndarray) -> None:
    path = tmp_path / "a.safetensors"
    sc.save_file({"x": want}, path, alignment=8)
    decoys = []
    for i in range(8):
        p = tmp_path / f"decoy{i}.bin"
        p.write_bytes(b"\xee" * (want.nbytes + 4096))
        decoys.append(p)
    problems: list[object] = []
    for _ in range(12):
        f = sc.safe_open(path, copy=True)
        stop = threading.Event()

        def reader(f=f, stop=stop) -> None:
            while not stop.is_set():
                try:
                    got = f.get_tensor("x")
                except sc.ClosedHandleError:
                    return
                except BaseException as exc:  # a bare OSError is a failure too
                    problems.append(exc)
                    return
                if not np.array_equal(got, want):
                    problems.append("wrong bytes")
                    return

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.002)
        f.close()
        # Descriptors freed by the close are reused at once by these opens.
        handles = [open(p, "rb") for p in decoys]  # noqa: SIM115
        time.sleep(0.002)
        stop.set()
        for t in threads:
            t.join()
        for h in handles:
            h.close()
    assert not problems, problems[:3]


# ----------------------------------------------------------------------------- 4. verify reads once


def test_verify_with_copy_reads_each_tensor_once(tmp_path):
    t = _model()
    path = tmp_path / "c.safetensors"
    sc.save_file(t, path, checksums=True)
    with sc.safe_open(path, copy=True, verify=True) as f:
        after_header = f.stats["bytes_read"]
        got = f.get_tensor("t1")
        assert f.stats["bytes_read"] - after_header == t["t1"].nbytes
    np.testing.assert_array_equal(got, t["t1"])


def test_verify_with_copy_checks_the_bytes_it_returns(tmp_path, monkeypatch):
    """The hash is computed over the buffer handed back, so bytes that change between
    two reads cannot pass: corrupt the read itself and the error must come."""
    from safecodec import _source

    t = _model()
    path = tmp_path / "c.safetensors"
    sc.save_file(t, path, checksums=True)
    real = _source._pread_into

    def flip(fd, offset, out, src, what):  # the bytes arriving differ from the file's
        real(fd, offset, out, src, what)
        if "t2" in what:
            out[0] ^= 1

    monkeypatch.setattr(_source, "_pread_into", flip)
    with sc.safe_open(path, copy=True, verify=True) as f, \
            pytest.raises(sc.ChecksumError, match="'t2'"):
        f.get_tensor("t2")


# ----------------------------------------------------------------------------- 5. checksums everywhere


def test_sharded_saves_store_checksums_and_verify_checks_every_shard(tmp_path):
    d = str(tmp_path / "ck")
    _save_sharded(_model(), d, checksums=True)
    assert sc.verify_file(d) == []
    shard = os.path.join(d, "model-00003-of-00004.safetensors")
    with open(shard, "r+b") as fh:  # corrupt in place, keeping size (and header)
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 0xFF]))
    problems = sc.verify_file(d)
    assert len(problems) == 1 and "model-00003-of-00004" in problems[0] and "'t2'" in problems[0]
    proc = _child("import sys, safecodec.__main__ as m; sys.exit(m.main(['verify', sys.argv[1]]))", d)
    assert proc.returncode == 1 and "checksum mismatch" in proc.stdout


def test_remote_saves_store_checksums(mem_url):
    url = f"{mem_url}/c.safetensors"
    t = _model()
    sc.save_file(t, url, checksums=True)
    assert sc.verify_file(url) == []
    got = sc.load_file(url, verify=True)
    np.testing.assert_array_equal(got["t3"], t["t3"])


# ----------------------------------------------------------------------------- 7. mode and symlinks


def test_resave_keeps_the_file_mode(tmp_path):
    path = tmp_path / "m.safetensors"
    sc.save_file({"a": np.ones(3)}, path)
    os.chmod(path, 0o600)
    sc.save_file({"a": np.zeros(3)}, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    os.chmod(path, 0o640)
    sc.save_file({"a": np.ones(4)}, path, max_shard_size=None)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_resave_through_a_symlink_writes_its_destination(tmp_path):
    real_dir = tmp_path / "store"
    real_dir.mkdir()
    dest = real_dir / "weights.safetensors"
    sc.save_file({"a": np.ones(3)}, dest)
    link = tmp_path / "current.safetensors"
    link.symlink_to(dest)
    sc.save_file({"a": np.full(3, 7.0)}, link)
    assert link.is_symlink()  # still a link ...
    np.testing.assert_array_equal(sc.load_file(dest)["a"], np.full(3, 7.0))  # ... to new bytes
    assert sorted(os.listdir(real_dir)) == ["weights.safetensors"]  # temporary was there


# ----------------------------------------------------------------------------- 9. non-regular files


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(sc.SafecodecError, match="not a regular file"):
        sc.safe_open(fifo)
    d = tmp_path / "ck"
    d.mkdir()
    os.mkfifo(d / "s.safetensors")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s.safetensors"}}))
    with pytest.raises(sc.SafecodecError, match="not a regular file"):
        sc.load_file(d)


# ----------------------------------------------------------------------------- 11. shard names


@pytest.mark.parametrize("shard", ["a\x00b.safetensors", ".", "./", "./x.safetensors",
                                   "sub/", "x" * 300, "a//b.safetensors", "../x.safetensors"])
def test_hostile_shard_names_are_safecodec_errors(tmp_path, shard):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": shard}}))
    (tmp_path / "sub").mkdir()
    with pytest.raises(sc.SafecodecError, match="not a file inside the checkpoint's directory"):
        sc.load_file(index)


def test_a_shard_that_is_a_directory_is_a_safecodec_error(tmp_path):
    """Issue 18, finding 13: never a bare IsADirectoryError, on every read route, local
    and remote."""
    (tmp_path / "sub.safetensors").mkdir()
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "sub.safetensors"}}))
    routes = {
        "load_file": lambda: sc.load_file(index),
        "get_tensor": lambda: sc.safe_open(index).get_tensor("a"),
        "read_header": lambda: sc.safe_open(index).header,
        "verify_file": lambda: sc.verify_file(index),
    }
    for route, call in routes.items():
        with pytest.raises(sc.SafecodecError, match="is a directory") as info:
            call()
        assert not isinstance(info.value, IsADirectoryError), route
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    root = f"/dir-shard-{os.getpid()}"
    fs.pipe_file(f"{root}/model.safetensors.index.json", index.read_bytes())
    fs.pipe_file(f"{root}/sub.safetensors/inner.bin", b"x")
    try:
        with pytest.raises(sc.SafecodecError, match="is a directory"):
            sc.load_file(f"memory://{root}/model.safetensors.index.json")
    finally:
        fs.rm(root, recursive=True)


# ----------------------------------------------------------------------------- 12. JAX scalar slice


def test_jax_slice_of_one_element_is_a_0d_array(tmp_path):
    jax = pytest.importorskip("jax")
    path = tmp_path / "m.safetensors"
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    sc.save_file({"w": w}, path)
    with sc.safe_open(path, framework="jax") as f:
        out = f.get_slice("w")[1, 2]
    assert isinstance(out, jax.Array) and out.shape == () and float(out) == 6.0


# ----------------------------------------------------------------------------- 13. CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return _child("import sys, safecodec.__main__ as m; sys.exit(m.main(sys.argv[1:]))", *args)


def test_cli_escapes_control_characters_in_names_and_metadata(tmp_path):
    path = tmp_path / "evil.safetensors"
    sc.save_file({"a\x1b[2Jb": np.ones(2)}, path, {"k\x1b]0;pwned\x07": "v\x1b[31m"})
    proc = _cli("inspect", str(path))
    assert proc.returncode == 0
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout
    assert "a\\x1b[2Jb" in proc.stdout and "k\\x1b]0;pwned\\x07" in proc.stdout
    assert "\x1b" in json.loads(_cli("inspect", "--json", str(path)).stdout)["tensors"][0]["name"]


@pytest.mark.parametrize(("source", "message"), [
    ("zzz://bucket/x.safetensors", "unknown protocol"),
    ("gs://bucket/x.safetensors", "needs a package that is not installed"),
    ("INDEX-WITH-NUL", "a NUL or control character"),
])
def test_cli_user_errors_are_one_line(source, message, tmp_path):
    if source == "INDEX-WITH-NUL":  # argv cannot hold a NUL; an index can
        index = tmp_path / "model.safetensors.index.json"
        index.write_text(json.dumps({"weight_map": {"a": "x\u0000.safetensors"}}))
        source = str(index)
    if source.startswith("gs://"):
        try:
            import gcsfs  # noqa: F401
        except ImportError:
            pass
        else:
            pytest.skip("gcsfs is installed here: gs:// resolves")
    proc = _cli("inspect", source)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("safecodec inspect: error: ")
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_broken_pipe_is_quiet(tmp_path):
    path = tmp_path / "m.safetensors"
    sc.save_file({f"t{i}": np.ones(4) for i in range(2000)}, path)
    proc = subprocess.run(
        f"{sys.executable} -m safecodec inspect --json {path} | head -c 10",
        shell=True, capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert len(proc.stdout) == 10
    assert "BrokenPipe" not in proc.stderr and "Traceback" not in proc.stderr


def test_not_a_safetensors_file_says_so():
    proc = _cli("inspect", os.path.join(ROOT, "README.md"))
    assert proc.returncode == 1
    assert "not a safetensors file?" in proc.stderr


# ----------------------------------------------------------------------------- 16. no cycles


def test_jax_load_file_leaves_no_descriptor_behind_without_the_collector(tmp_path):
    pytest.importorskip("jax")
    import safecodec.jax as scj

    path = tmp_path / "m.safetensors"
    sc.save_file(_model(2), path)
    fd_dir = "/proc/self/fd"
    if not os.path.isdir(fd_dir):
        pytest.skip("no /proc/self/fd to count descriptors")
    scj.load_file(path)  # warm up JAX
    gc.collect()
    gc.disable()
    try:
        before = len(os.listdir(fd_dir))
        for _ in range(50):
            out = scj.load_file(path)  # mapped: each mapping holds a descriptor of its own
            del out
        after = len(os.listdir(fd_dir))
    finally:
        gc.enable()
    assert after <= before, (before, after)


# ----------------------------------------------------------------------------- 17. ENOSPC names the file


def test_sharded_save_that_runs_out_of_space_names_the_shard_and_cleans_up(tmp_path):
    d = tmp_path / "ck"
    code = (
        "import resource, signal, sys, numpy as np, safecodec as sc\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))\n"
        "t = {f't{i}': np.ones(50_000, np.float32) for i in range(4)}\n"
        "try:\n"
        "    sc.save_file(t, sys.argv[1], max_shard_size=200_000)\n"
        "except OSError as exc:\n"
        "    print('ERR', exc)\n"
        "    sys.exit(3)\n"
    )
    # each shard (200 kB) fits under the limit; the file-size limit is per file, so make
    # one shard too large instead: two tensors per shard
    code = code.replace("max_shard_size=200_000", "max_shard_size=400_000")
    proc = _child(code, str(d))
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "model-00001-of-00002.safetensors" in proc.stdout
    assert sorted(os.listdir(d)) == []  # nothing of the failed save is left


def test_index_identity_entries_are_checked(tmp_path):
    d = tmp_path / "ck"
    _save_sharded(_model(), str(d))
    index = d / "model.safetensors.index.json"
    obj = json.loads(index.read_text())
    obj["metadata"]["safecodec.shards"].pop("model-00002-of-00004.safetensors")
    index.write_text(json.dumps(obj))
    with pytest.raises(sc.SafecodecError, match=re.escape(
            "records no identity for shard 'model-00002-of-00004.safetensors'")):
        sc.load_file(d)
    obj["metadata"]["safecodec.shards"] = {"model-00001-of-00004.safetensors": {"size": "x"}}
    index.write_text(json.dumps(obj))
    with pytest.raises(sc.SafecodecError, match=re.escape("'safecodec.shards' is malformed")):
        sc.safe_open(d)


def test_a_jax_handle_needs_the_output_safe_open_builds(tmp_path):
    path = tmp_path / "m.safetensors"
    sc.save_file({"a": np.ones(2)}, path)
    with pytest.raises(sc.SafecodecError, match=r"opened with safecodec.safe_open\(\.\.\., "
                                                "framework='jax'\\)"):
        sc.SafeOpen(path, "jax")
