"""Where the CLI's rewrites write, and what its output shows (issue 18, findings 7, 8, 14).

* ``align`` / ``convert`` refuse an output that would replace a file the input still needs
  (a shard of a sharded input, by path, symbolic or hard link, under another index) before
  writing anything: the input stays intact. OUT = IN (any spelling) is a rewrite in place,
  published atomically like a re-save.
* A sharded rewrite asks the resolver where OUT is: a ``memory://`` or ``s3://`` index
  gets its shards there, written through the same atomic sink, never a local folder.
* Names and metadata from a file cannot forge output lines: every control character is
  escaped in the human output, and DEL / C1 in ``--json``.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import uuid

import numpy as np
import pytest

import safecodec as sc
from safecodec import _cli

#: Fixtures (the moto server on 127.0.0.1) live in tests/helpers/conftest_remote.py.
pytest_plugins = ["conftest_remote"]

MODEL = {"w": np.arange(96, dtype=np.float32).reshape(8, 12),
         "b": np.linspace(-1, 1, 40).astype(np.float32),
         "steps": np.arange(5, dtype=np.int64)}


def _snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture()
def sharded(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = tmp_path / "ckpt"
    sc.save_file(MODEL, folder, max_shard_size=200)
    return folder / "model.safetensors.index.json"


# ----------------------------------------------------------------------------- finding 7


@pytest.mark.parametrize("verb", ["convert", "align"])
def test_sharded_rewrite_next_to_its_input_is_refused(sharded, capsys, verb) -> None:
    """The issue's command: a new index in the input's folder would replace the input's
    shards (same names). Refused, nothing written, the input still opens."""
    folder = sharded.parent
    before = _snapshot(folder)
    out = folder / "model-bf16.safetensors.index.json"
    extra = ["--dtype", "bfloat16"] if verb == "convert" else []
    assert _cli.main([verb, str(sharded), str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert "OUT would overwrite" in err and "model-00001-of-00002.safetensors" in err
    assert "a file of IN" in err
    assert _snapshot(folder) == before
    got = sc.load_file(sharded)
    for name, value in MODEL.items():
        np.testing.assert_array_equal(got[name], value)


def test_sharded_rewrite_in_place_replaces_the_whole_checkpoint(sharded) -> None:
    """OUT is IN's own index (spelled as the index or as its folder): not a clash but a
    re-save, published like one (every shard, then the index), so the result opens."""
    folder = sharded.parent
    for out in (folder, sharded):
        assert _cli.main(["convert", "-q", str(sharded), str(out), "--dtype", "float16"]) == 0
        got = sc.load_file(sharded)
        for name, value in MODEL.items():
            np.testing.assert_array_equal(got[name], value.astype(np.float16)
                                          if value.dtype == np.float32 else value)
    assert sorted(p.name for p in folder.iterdir()) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json"]


def _links(path: pathlib.Path) -> dict[str, pathlib.Path]:
    sym = path.with_name("link.safetensors")
    sym.symlink_to(path.name)
    hard = path.with_name("hard.safetensors")
    os.link(path, hard)
    return {"same path": path, "symlink": sym, "hard link": hard,
            "folder": path.parent, "spelled differently": path.parent / "." / path.name}


@pytest.mark.parametrize("verb", ["convert", "align"])
def test_single_file_rewrite_onto_its_input_is_in_place(tmp_path, verb) -> None:
    """A single file rewritten onto itself (by any spelling, a symlink or a hard link) is
    replaced atomically: the input was mapped whole, nothing else needs it."""
    extra = ["--dtype", "float16"] if verb == "convert" else []
    want = MODEL["w"].astype(np.float16) if verb == "convert" else MODEL["w"]
    for how, out in _links_fresh(tmp_path).items():
        path = tmp_path / how.replace(" ", "_") / "model.safetensors"
        assert _cli.main([verb, "-q", str(path), str(out), *extra]) == 0, how
        written = out / "model.safetensors" if out.is_dir() else out
        np.testing.assert_array_equal(sc.load_file(written)["w"], want, err_msg=how)
        assert sc.read_header(written).data_start % 64 == 0, how


def _links_fresh(tmp_path: pathlib.Path) -> dict[str, pathlib.Path]:
    """One folder per spelling, each with its own input file, so the cases do not mix."""
    outs = {}
    for how in ("same path", "symlink", "hard link", "folder", "spelled differently"):
        path = tmp_path / how.replace(" ", "_") / "model.safetensors"
        path.parent.mkdir()
        sc.save_file(MODEL, path, alignment=8)
        outs[how] = _links(path)[how]
    return outs


def test_rewrite_to_another_file_still_works(tmp_path, sharded) -> None:
    path = tmp_path / "model.safetensors"
    sc.save_file(MODEL, path, alignment=8)
    assert _cli.main(["convert", "-q", str(path), str(tmp_path / "f16.safetensors"),
                      "--dtype", "float16"]) == 0
    assert sc.load_file(tmp_path / "f16.safetensors")["w"].dtype == np.float16
    assert _cli.main(["align", "-q", str(sharded), str(tmp_path / "x.safetensors.index.json")]) == 0
    np.testing.assert_array_equal(sc.load_file(tmp_path / "x.safetensors.index.json")["b"],
                                  MODEL["b"])


# ----------------------------------------------------------------------------- finding 8


def test_sharded_align_to_a_memory_url_writes_there(sharded, tmp_path) -> None:
    """The issue's command: shards and index land on the memory filesystem; nothing in a
    local folder named after the URL's path."""
    fsspec = pytest.importorskip("fsspec")
    root = f"cli-{uuid.uuid4().hex[:10]}"
    url = f"memory://{root}/model.safetensors.index.json"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert _cli.main(["align", "-q", str(sharded), url]) == 0
    finally:
        os.chdir(cwd)
    fs = fsspec.filesystem("memory")
    try:
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"/{root}"))
        assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                         "model.safetensors.index.json"]
        assert not os.path.exists(f"/{root}") and not (tmp_path / root).exists()
        got = sc.load_file(url)
        for name, value in MODEL.items():
            np.testing.assert_array_equal(got[name], value)
        for shard in names[:2]:
            header = sc.read_header(f"memory://{root}/{shard}")
            assert all((header.data_start + t.begin) % 64 == 0 for t in header.tensors.values()
                       if t.nbytes % 64 == 0)
        # in place on the memory filesystem too
        assert _cli.main(["convert", "-q", url, url, "--dtype", "float16"]) == 0
        assert sc.load_file(url)["w"].dtype == np.float16
    finally:
        fs.rm(f"/{root}", recursive=True)


def test_sharded_convert_to_s3_writes_to_the_bucket(sharded, tmp_path, monkeypatch,
                                                    request, s3_server) -> None:
    """An ``s3://`` OUT (moto on 127.0.0.1, made the default endpoint: the CLI takes no
    storage options): shards and index in the bucket, read back through S3, nothing under
    a local ``./bucket``."""
    import s3fs

    server = s3_server

    for key, value in {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ENDPOINT_URL_S3": server.endpoint,
                       "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    request.addfinalizer(s3fs.S3FileSystem.clear_instance_cache)
    bucket = server.new_bucket()
    url = f"s3://{bucket}/bf16/model.safetensors.index.json"
    monkeypatch.chdir(tmp_path)
    assert _cli.main(["convert", "-q", str(sharded), url, "--dtype", "bfloat16"]) == 0
    assert not (tmp_path / bucket).exists()
    fs = server.filesystem()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{bucket}/bf16")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json"]
    got = sc.load_file(url, storage_options=server.storage_options)
    assert got["w"].dtype.name == "bfloat16" and got["steps"].dtype == np.int64
    np.testing.assert_array_equal(got["w"].astype(np.float32), MODEL["w"])


# ----------------------------------------------------------------------------- finding 14


FORGED = "x\nOK   forged.safetensors: 0 tensors"
EVIL = {FORGED: np.ones(2, np.float32), "tab\there\x1b[2J\x7f\x9b\x85": np.zeros(3, np.float32)}
EVIL_METADATA = {"k\nOK   also forged": "v\t\x9b1m\u2028", "plain": "value"}


def _assert_no_controls(text: str) -> None:
    """Lines only as the CLI makes them: no control character but the newline ending
    each line."""
    for line in text.splitlines():
        assert not re.search("[\x00-\x1f\x7f-\x9f]", line), repr(line)
        assert not line.startswith("OK   "), repr(line)
    assert "\r" not in text


def test_inspect_escapes_controls_in_names_and_metadata(tmp_path, capsys) -> None:
    path = tmp_path / "evil.safetensors"
    sc.save_file(EVIL, path, EVIL_METADATA)
    assert _cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    _assert_no_controls(out)
    assert "x\\nOK   forged.safetensors: 0 tensors" in out
    assert "tab\\there\\x1b[2J\\x7f\\x9b\\x85" in out
    assert "k\\nOK   also forged: v\\t\\x9b1m" in out
    # the table stays aligned: every row as wide as the heading's rule
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("----"))
    dtype_column = lines[rule - 1].index("dtype")
    for row in lines[rule + 1 : rule + 3]:
        assert row[dtype_column : dtype_column + 3] == "F32", lines


def test_inspect_json_escapes_del_and_c1(tmp_path, capsys) -> None:
    path = tmp_path / "evil.safetensors"
    sc.save_file(EVIL, path, EVIL_METADATA)
    assert _cli.main(["inspect", "--json", str(path)]) == 0
    raw = capsys.readouterr().out
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", raw), raw
    assert "\\u009b" in raw and "\\u007f" in raw and "\\u0085" in raw
    data = json.loads(raw)  # escaped, not dropped: the names come back exactly
    assert {t["name"] for t in data["tensors"]} == set(EVIL)
    assert data["metadata"] == EVIL_METADATA


def test_diff_escapes_controls(tmp_path, capsys) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    sc.save_file(EVIL, a, EVIL_METADATA)
    sc.save_file({**{k: v + 1 for k, v in EVIL.items()}, "only\nOK   b": np.ones(1)}, b,
                 {"k\nOK   also forged": "w\n", "plain": "value"})
    assert _cli.main(["diff", "-q", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    _assert_no_controls(out)
    assert "+ only\\nOK   b  (only in B)" in out
    assert _cli.main(["diff", "-q", "--json", str(a), str(b)]) == 0
    raw = capsys.readouterr().out
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", raw)
    assert json.loads(raw)["added"] == ["only\nOK   b"]
