"""Remote sharded checkpoints against real servers on 127.0.0.1 (issue 18, findings 11, 12).

* A remote index is refused by its size before it is downloaded (as a local one is):
  only the metadata request crosses the wire.
* A versioned S3 bucket (moto), read through s3fs with its listings cache on (the
  default): a sharded checkpoint opened by its folder URL, and a single file after its
  folder was listed, load. The identity taken at open and the one re-checked after a read
  must come from the same kind of answer (a fresh HEAD, which has the version id; s3fs's
  listing has none).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
import pytest

import safecodec as sc
from safecodec import _sharded

#: Fixtures (servers on 127.0.0.1) live in tests/helpers/conftest_remote.py.
pytest_plugins = ["conftest_remote"]

MODEL = {"embed": np.arange(64 * 64, dtype=np.float32).reshape(64, 64),
         "w": np.linspace(-2, 2, 4096).astype(np.float32), "n": np.arange(7, dtype=np.int64)}


def _local_checkpoint(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = tmp_path / "ckpt"
    sc.save_file(MODEL, folder, max_shard_size=17_000)
    assert len(list(folder.glob("*.safetensors"))) == 2
    return folder


def _assert_model(got: dict[str, Any]) -> None:
    assert sorted(got) == sorted(MODEL)
    for name, value in MODEL.items():
        np.testing.assert_array_equal(np.asarray(got[name]), value)


# ----------------------------------------------------------------------------- finding 11


LIMIT = 4096


def _big_index(folder: pathlib.Path) -> bytes:
    """A valid index of ~5x :data:`LIMIT` bytes (padded with whitespace)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return (json.dumps(index) + " " * (5 * LIMIT)).encode()


def test_remote_index_over_the_limit_is_refused_before_download_http(http_server, tmp_path,
                                                                      monkeypatch) -> None:
    monkeypatch.setattr(_sharded, "MAX_INDEX_SIZE", LIMIT)
    root = pathlib.Path(http_server.root)
    folder = _local_checkpoint(tmp_path)
    (root / "big.safetensors.index.json").write_bytes(_big_index(folder))
    http_server.counter.reset()
    with pytest.raises(sc.SafecodecError, match=f"over the {LIMIT} limit"):
        sc.safe_open(http_server.url("big.safetensors.index.json"))
    assert http_server.counter.bytes_sent == 0, http_server.counter.log
    # the same checkpoint under the limit opens: the size check is not a false alarm
    monkeypatch.setattr(_sharded, "MAX_INDEX_SIZE", 10 * LIMIT)
    for p in folder.iterdir():
        (root / p.name).write_bytes(p.read_bytes())
    _assert_model(sc.load_file(http_server.url("big.safetensors.index.json")))


def test_remote_index_over_the_limit_is_refused_before_download_s3(s3_server, tmp_path,
                                                                    monkeypatch) -> None:
    monkeypatch.setattr(_sharded, "MAX_INDEX_SIZE", LIMIT)
    bucket = s3_server.new_bucket()
    fs = s3_server.filesystem()
    big = _big_index(_local_checkpoint(tmp_path))
    fs.pipe_file(f"{bucket}/big.safetensors.index.json", big)
    s3_server.counter.reset()
    with pytest.raises(sc.SafecodecError, match=f"over the {LIMIT} limit"):
        sc.safe_open(f"s3://{bucket}/big.safetensors.index.json",
                     storage_options=s3_server.storage_options)
    # a HEAD's answer (headers only), not the object
    assert s3_server.counter.bytes_sent < len(big) // 2, s3_server.counter.bytes_sent


# ----------------------------------------------------------------------------- finding 12


@pytest.fixture()
def versioned_bucket(s3_server) -> tuple[Any, str, dict[str, Any]]:
    """A versioned bucket, and storage options with s3fs's listings cache ON (the
    default; the shared fixture turns it off)."""
    boto3 = pytest.importorskip("boto3")
    bucket = s3_server.new_bucket()
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    options = {k: v for k, v in s3_server.storage_options.items() if k != "use_listings_cache"}
    return s3_server, bucket, options


def test_versioned_s3_sharded_checkpoint_loads_by_its_folder_url(versioned_bucket,
                                                                 tmp_path) -> None:
    server, bucket, options = versioned_bucket
    folder = _local_checkpoint(tmp_path)
    fs = server.filesystem()
    for p in folder.iterdir():
        fs.pipe_file(f"{bucket}/ckpt/{p.name}", p.read_bytes())
        fs.pipe_file(f"{bucket}/ckpt/{p.name}", p.read_bytes())  # a second version
    url = f"s3://{bucket}/ckpt"
    _assert_model(sc.load_file(url, storage_options=options))
    with sc.safe_open(url, storage_options=options) as f:
        _assert_model(f.get_tensors())
        np.testing.assert_array_equal(f.get_slice("embed")[3:9, ::5], MODEL["embed"][3:9, ::5])
    jax = pytest.importorskip("jax")
    with sc.safe_open(url, framework="jax", storage_options=options) as f:
        got = {name: f.get_tensor(name) for name in ("embed", "w")}
    assert all(isinstance(v, jax.Array) for v in got.values())
    for name, value in got.items():
        np.testing.assert_array_equal(np.asarray(value), MODEL[name])


def test_versioned_s3_single_file_loads_after_its_folder_was_listed(versioned_bucket) -> None:
    server, bucket, options = versioned_bucket
    import s3fs

    blob = sc.save(MODEL)
    fs = server.filesystem()
    fs.pipe_file(f"{bucket}/one/m.safetensors", blob)
    fs.pipe_file(f"{bucket}/one/m.safetensors", blob)
    url = f"s3://{bucket}/one/m.safetensors"
    shared = s3fs.S3FileSystem(**options)  # the instance every s3:// URL with these options gets
    shared.ls(f"{bucket}/one")  # the listing is now cached (no version ids in it)
    _assert_model(sc.load_file(url, storage_options=options))
    shared.ls(f"{bucket}/one")
    with sc.safe_open(url, storage_options=options) as f:
        np.testing.assert_array_equal(f.get_tensor("w"), MODEL["w"])
        shared.ls(f"{bucket}/one")
        np.testing.assert_array_equal(f.get_tensor("embed"), MODEL["embed"])


def test_versioned_s3_replacement_after_open_still_reads_the_version_opened(
        versioned_bucket) -> None:
    """The identity now always carries the version id: a replaced object is read at the
    version whose header was read, even when its folder listing was cached at open."""
    server, bucket, options = versioned_bucket
    import s3fs

    blob = sc.save(MODEL)
    other = sc.save({k: v + 1 for k, v in MODEL.items()})
    assert len(other) == len(blob)
    fs = server.filesystem()
    fs.pipe_file(f"{bucket}/two/m.safetensors", blob)
    s3fs.S3FileSystem(**options).ls(f"{bucket}/two")
    with sc.safe_open(f"s3://{bucket}/two/m.safetensors", storage_options=options) as f:
        fs.pipe_file(f"{bucket}/two/m.safetensors", other)
        _assert_model(f.get_tensors())
