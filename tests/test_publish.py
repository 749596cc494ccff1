"""The one commit-or-discard of :mod:`safecodec._sink` (issue 18, finding 6): a final
rename that fails leaves no temporary and no open descriptor behind, on every writer
(NumPy, JAX, sharded, remote); a sharded save whose index cannot be published puts back
the shards it had already renamed into place (all shards or none).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

import safecodec as sc
from safecodec import _sink

TENSORS = {"a": np.arange(64, dtype=np.float32), "b": np.ones((4, 8), np.float16)}
OLD = {"a": np.full(64, 7, np.float32), "b": np.zeros((4, 8), np.float16)}


def _open_fds() -> set[str]:
    fd_dir = "/proc/self/fd"
    if not os.path.isdir(fd_dir):
        pytest.skip("needs /proc/self/fd to count open descriptors")
    return set(os.listdir(fd_dir))


def _leftovers(directory: pathlib.Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(_sink.TMP_SUFFIX))


def _jax_tensors() -> dict[str, object]:
    jnp = pytest.importorskip("jax.numpy")
    return {k: jnp.asarray(v) for k, v in TENSORS.items()}


WRITERS = {
    "numpy": lambda path: sc.save_file(TENSORS, path),
    "numpy-checksums": lambda path: sc.save_file(TENSORS, path, checksums=True),
    "jax": lambda path: sc.save_file(_jax_tensors(), path),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_failed_rename_discards_the_temporary_and_closes_it(tmp_path, writer) -> None:
    """The target is an existing directory: the rename is refused; the error names the
    target, the directory is untouched, no temporary stays and no descriptor leaks."""
    target = tmp_path / "m.safetensors"
    target.mkdir()
    (target / "inside").write_text("keep")
    before = _open_fds()
    with pytest.raises(OSError) as info:
        WRITERS[writer](target)
    assert info.value.filename is not None and "m.safetensors" in str(info.value.filename)
    assert _open_fds() <= before
    assert _leftovers(tmp_path) == []
    assert (target / "inside").read_text() == "keep"


def test_failed_rename_of_a_sink_discards_it(tmp_path) -> None:
    """The sink itself: commit raising leaves nothing to discard by hand."""
    target = tmp_path / "x.bin"
    target.mkdir()
    sink = _sink.LocalAtomicFile(target)
    sink.write(b"payload")
    with pytest.raises(IsADirectoryError):
        sink.commit()
    assert _leftovers(tmp_path) == []
    with pytest.raises(OSError):
        os.fstat(sink.fd)


def _sharded(tmp_path: pathlib.Path, tensors: dict[str, np.ndarray]) -> pathlib.Path:
    sc.save_file(tensors, tmp_path, max_shard_size=200)
    return tmp_path / "model.safetensors.index.json"


@pytest.mark.parametrize("links", ["hard links", "no hard links"])
def test_sharded_save_whose_index_rename_fails_keeps_the_old_checkpoint(tmp_path, monkeypatch,
                                                                        links) -> None:
    """Shards are renamed into place before the index; when the index's rename fails,
    the old shards come back and the old checkpoint still opens with its old values (the
    replaced shards are kept by a hard link, or by a copy where links are refused)."""
    if links == "no hard links":
        def refuse(*args: object, **kwargs: object) -> None:
            raise PermissionError(1, "no hard links here")

        monkeypatch.setattr(os, "link", refuse)
    index = _sharded(tmp_path, OLD)
    shards_before = {p.name: p.read_bytes() for p in tmp_path.glob("*.safetensors")}
    assert len(shards_before) == 2
    index.rename(tmp_path / "saved-index.json")
    index.mkdir()  # the index's rename will be refused
    with pytest.raises(IsADirectoryError):
        sc.save_file(TENSORS, tmp_path, max_shard_size=200)
    index.rmdir()
    (tmp_path / "saved-index.json").rename(index)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.safetensors")} == shards_before
    assert _leftovers(tmp_path) == []
    got = sc.load_file(tmp_path)
    for name, value in OLD.items():
        np.testing.assert_array_equal(got[name], value)


def test_sharded_save_into_a_new_folder_whose_index_fails_leaves_nothing(tmp_path) -> None:
    """No previous checkpoint: the shards renamed into place are removed again."""
    (tmp_path / "model.safetensors.index.json").mkdir()
    with pytest.raises(IsADirectoryError):
        sc.save_file(TENSORS, tmp_path, max_shard_size=200)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors.index.json"]


def test_sharded_save_whose_second_shard_rename_fails_puts_the_first_back(tmp_path) -> None:
    """A shard in the middle of the group fails: the one before it is reverted too."""
    _sharded(tmp_path, OLD)
    first, second = sorted(tmp_path.glob("model-*.safetensors"))
    old_first = first.read_bytes()
    saved = tmp_path / "second.bak"
    second.rename(saved)
    second.mkdir()
    with pytest.raises(IsADirectoryError):
        sc.save_file(TENSORS, tmp_path, max_shard_size=200)
    second.rmdir()
    saved.rename(second)
    assert first.read_bytes() == old_first
    assert _leftovers(tmp_path) == []
    np.testing.assert_array_equal(sc.load_file(tmp_path)["a"], OLD["a"])


class _RefusingIndexMove(MemoryFileSystem):
    """A memory filesystem whose moves onto an index fail while ``refuse`` is set (a
    remote rename refused)."""

    refuse = False

    def mv(self, path1: str, path2: str, *args: object, **kwargs: object) -> None:
        if self.refuse and str(path2).endswith(".index.json"):
            raise PermissionError(13, "refused by the test", path2)
        super().mv(path1, path2, *args, **kwargs)


def test_remote_sharded_save_whose_index_move_fails_keeps_the_old_checkpoint() -> None:
    """The same guarantee through the remote sink (fsspec moves): every object is as it
    was, and no temporary or kept copy stays."""
    fs = _RefusingIndexMove()
    folder = f"/publish-{os.urandom(4).hex()}"
    index = f"{folder}/model.safetensors.index.json"
    sc.save_file(OLD, index, fs=fs, max_shard_size=200)
    before = {p: fs.cat_file(p) for p in fs.find(folder)}
    assert len(before) == 3
    fs.refuse = True
    try:
        with pytest.raises(sc.RemoteIOError, match="refused by the test"):
            sc.save_file(TENSORS, index, fs=fs, max_shard_size=200)
    finally:
        fs.refuse = False
    try:
        assert {p: fs.cat_file(p) for p in fs.find(folder)} == before
        got = sc.load_file(index, fs=fs)
        for name, value in OLD.items():
            np.testing.assert_array_equal(got[name], value)
    finally:
        fs.rm(folder, recursive=True)
