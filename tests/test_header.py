"""The lazy ``Header.tensors`` of the compact scan behaves like the dict it stands for."""

from __future__ import annotations

import pickle
import struct
import threading

import numpy as np
import pytest

import safecodec as sc
from safecodec import _header, _header_fast


@pytest.fixture(autouse=True)
def _scan_every_header(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the NumPy scan: take it for small headers too (in production
    it checks headers of at least ``SCAN_MIN_BYTES``)."""
    monkeypatch.setattr(_header_fast, "SCAN_MIN_BYTES", 0)


def _header_of(data: bytes) -> _header.Header:
    (n,) = struct.unpack("<Q", data[:8])
    return _header_fast.parse_header(data[8 : 8 + n], len(data))


def _expected(data: bytes) -> dict[str, _header.TensorInfo]:
    """The same header through the reference parser (a plain dict)."""
    (n,) = struct.unpack("<Q", data[:8])
    return dict(_header.parse_header(data[8 : 8 + n], len(data)).tensors)


# Names that read like the text around them: the search for a name must only ever match
# at a name's opening quote.
TRICKY = ["", ":[0,4]},", "a", "dtype", "shape", "x{y}", "w,w", '}', "__metadata__x", "0"]


@pytest.fixture(params=[8, 64], ids=["reference-layout", "zero-copy-layout"])
def data(request: pytest.FixtureRequest) -> bytes:
    tensors = {name: np.arange(i + 1, dtype=np.float32) for i, name in enumerate(TRICKY)}
    tensors["scalar"] = np.float64(2.0)
    tensors["empty"] = np.zeros((3, 0, 2), np.uint8)
    return sc.save(tensors, metadata={"k": "v"}, alignment=request.param)


def test_scan_path_is_taken(data: bytes) -> None:
    assert type(_header_of(data).tensors) is _header_fast._LazyTensors


def test_lookups_before_the_dict_is_built(data: bytes) -> None:
    expected = _expected(data)
    tensors = _header_of(data).tensors
    for name, info in expected.items():
        assert tensors[name] == info and type(tensors[name]) is _header.TensorInfo
        assert name in tensors and tensors.get(name) == info
        assert tensors[name] is tensors[name]
    for missing in ["zz", '"', "a\x00", ":[0,4]}", "é", "a" * 300]:
        assert missing not in tensors and tensors.get(missing, 7) == 7
        with pytest.raises(KeyError):
            tensors[missing]
    assert 1 not in tensors and None not in tensors
    with pytest.raises(TypeError):
        [] in tensors  # noqa: B015  # unhashable, as with a dict
    assert len(tensors) == len(expected)


def test_behaves_as_the_dict(data: bytes) -> None:
    expected = _expected(data)
    tensors = _header_of(data).tensors
    assert tensors == expected and expected == tensors
    assert (tensors != expected) is False
    assert list(tensors) == list(expected)  # file order
    assert list(tensors.items()) == list(expected.items())
    assert list(tensors.values()) == list(expected.values())
    assert list(tensors.keys()) == list(expected.keys())
    assert dict(tensors) == expected and repr(tensors) == repr(expected)
    assert _header_of(data) == _header_of(data)
    assert pickle.loads(pickle.dumps(tensors)) == expected


def test_many_lookups_build_the_dict_once(data: bytes) -> None:
    tensors = _header_of(data).tensors
    names = list(_expected(data)) * 10
    assert all(n in tensors for n in names)
    assert tensors._dict is not None


def test_threads_see_the_same_mapping() -> None:
    data = sc.save({f"t{i}": np.zeros(i % 5, np.float32) for i in range(2000)})
    expected = _expected(data)
    tensors = _header_of(data).tensors
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(k: int) -> None:
        try:
            barrier.wait()
            for i in range(k, 2000, 97):
                assert tensors[f"t{i}"] == expected[f"t{i}"]
            assert dict(tensors.items()) == expected
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
