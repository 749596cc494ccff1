"""The box read engine (``TensorReader.read_box`` / ``read_boxes``, ``get_slice``): plans
of O(ndim) numbers, values equal to NumPy slicing of the file as the reference wheel
loads it on every source, read requests counted at the reads, ``verify=True`` on every
box route, and progress on local loads.

The JAX side (sharded loads, ``get_slice(sharding=)``, the column-sharded ``(N, 2)``
bounds) runs with 8 CPU devices in ``helpers/jax_sharding_worker.py``.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import safecodec as sc
from safecodec import _reader
from safecodec._errors import ChecksumError, SafecodecError, SliceIndexError
from safecodec._indexing import box_layout, coalesce, span_starts, span_strides

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))
import _oracle

#: Fixtures (servers on 127.0.0.1, memory:// prefixes) live in tests/helpers/conftest_remote.py.
pytest_plugins = ["conftest_remote"]


# ----------------------------------------------------------------------------- pure plans


@st.composite
def boxes(draw: Any) -> tuple[tuple[int, ...], tuple[tuple[int, int, int], ...], int]:
    shape = tuple(draw(st.lists(st.integers(0, 7), max_size=4)))
    box = []
    for n in shape:
        start = draw(st.integers(0, n))
        stop = draw(st.integers(start, n))
        box.append((start, stop, draw(st.integers(1, 3))))
    return shape, tuple(box), draw(st.sampled_from([1, 2, 4, 8]))


@settings(max_examples=400, deadline=None)
@given(boxes(), st.sampled_from([(1.0, 0, None), (1.25, 0, None), (1.25, 512, None),
                                 (1.0, 0, 2), (50.0, 0, None)]))
def test_spans_hold_exactly_the_box(case: Any, policy: Any) -> None:
    """Reading the spans a plan lists back to back and viewing them with its strides
    gives NumPy's slice; the plan stays within its budget; nothing is listed per row."""
    shape, box, item = case
    budget, gap, cap = policy
    flat = np.arange(int(np.prod(shape)) * item, dtype=np.int64).astype(np.uint8)
    want = flat.reshape((*shape, item))[tuple(slice(*b) for b in box)]
    layout = box_layout(shape, box, item)
    assert layout.nbytes == want.size
    assert len(layout.outer) <= len(shape)  # O(ndim), whatever the row count
    plan = coalesce(layout, budget, gap, cap)
    starts = span_starts(plan)
    assert len(starts) == plan.spans
    if cap is not None and layout.nbytes:
        assert plan.spans <= max(cap, 1) or len(plan.outer) == 0
    if not gap and cap is None and layout.nbytes:
        assert plan.spans * plan.run <= max(budget, 1.0) * layout.nbytes
    held = (np.concatenate([flat[s : s + plan.run] for s in starts]) if len(starts)
            else np.empty(0, np.uint8))
    if not layout.nbytes:
        return
    got = np.lib.stride_tricks.as_strided(held, (*layout.shape, item),
                                          (*span_strides(plan), 1))
    np.testing.assert_array_equal(got, want)


def test_column_plan_is_a_few_numbers() -> None:
    """One column of a million rows: the plan is a handful of integers, not a row each."""
    layout = box_layout((1 << 20, 2), ((0, 1 << 20, 1), (1, 2, 1)), 4)
    assert (layout.run, layout.outer) == (4, ((1 << 20, 8),))
    exact = coalesce(layout, 1.25, 0)  # a 4-byte gap per 4 bytes is 2x: not within 1.25
    assert exact.outer == layout.outer
    capped = coalesce(layout, 1.25, 0, 1024)  # a million requests: read the span instead
    assert capped.outer == () and capped.run == ((1 << 20) - 1) * 8 + 4


# ----------------------------------------------------------------------------- sources


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(17)
    return {
        "col": rng.standard_normal((4096, 2)).astype(np.float32),
        "rows": rng.integers(-1000, 1000, (96, 512)).astype(np.float32),
        "cube": rng.standard_normal((6, 10, 14)).astype(np.float64),
        "bytes": rng.integers(0, 255, (33, 7), dtype=np.uint8),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, np.ndarray]]:
    """A file with checksums, and its tensors as the reference wheel loads them."""
    path = str(tmp_path_factory.mktemp("boxes") / "m.safetensors")
    sc.save_file(_tensors(), path, checksums=True)
    return path, _oracle.require_module("numpy").load_file(path)


BOXES: list[tuple[str, tuple[slice, ...]]] = [
    ("col", (slice(0, 4096), slice(1, 2))),  # one column: 4-byte runs
    ("col", (slice(5, 4001, 3), slice(0, 2))),  # strided rows
    ("rows", (slice(0, 96), slice(0, 256))),  # the left half of every row
    ("rows", (slice(10, 90, 2), slice(100, 500, 5))),
    ("rows", (slice(0, 96), slice(0, 512))),  # the whole tensor
    ("cube", (slice(1, 5), slice(0, 10, 2), slice(3, 14, 4))),
    ("cube", (slice(2, 3), slice(0, 10), slice(0, 14))),  # one contiguous run
    ("bytes", (slice(0, 33, 32), slice(6, 7))),
    ("bytes", (slice(4, 4), slice(0, 7))),  # empty
]

SOURCES = ["mmap", "pread", "copy", "bytes", "fileobj", "memory"]


@pytest.fixture(params=SOURCES)
def opened(request: pytest.FixtureRequest, saved: Any, mem_url: str) -> Iterator[Any]:
    path, _ = saved
    kind = request.param
    if kind == "bytes":
        with open(path, "rb") as fh:
            handle = sc.safe_open(fh.read())
    elif kind == "fileobj":  # no fileno(): neither a mapping nor positioned reads
        with open(path, "rb") as fh:
            handle = sc.safe_open(io.BytesIO(fh.read()))
    elif kind == "memory":
        import fsspec

        with open(path, "rb") as fh:
            fsspec.filesystem("memory").pipe(f"{mem_url}/m.safetensors", fh.read())
        handle = sc.safe_open(f"{mem_url}/m.safetensors")
    else:
        handle = sc.safe_open(path, backend="pread" if kind == "pread" else "mmap",
                              copy=kind == "copy")
    with handle:
        yield handle


@pytest.mark.parametrize(("name", "box"), BOXES, ids=[f"{n}{i}" for i, (n, _) in enumerate(BOXES)])
def test_read_box_matches_numpy(opened: Any, saved: Any, name: str, box: Any) -> None:
    _, reference = saved
    info = opened.header.tensors[name]
    got = opened.reader.read_box(info, box)
    want = reference[name][box]
    assert got.flags.c_contiguous and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    got[...] = 0  # a fresh array: writing it changes nothing else
    np.testing.assert_array_equal(opened.reader.read_box(info, box), want)


def test_read_boxes_in_one_plan(opened: Any, saved: Any) -> None:
    _, reference = saved
    tensors = opened.header.tensors
    got = opened.reader.read_boxes([(tensors[n], b) for n, b in BOXES])
    for (name, box), arr in zip(BOXES, got, strict=True):
        np.testing.assert_array_equal(arr, reference[name][box])


@pytest.mark.parametrize("index", [
    (slice(None), 1), (slice(None, None, -3), slice(None)), (None, 5, Ellipsis),
    (slice(4000, 10, -7), 0), (-1,), (slice(3, 3),), (Ellipsis, None),
])
def test_get_slice_through_the_engine(opened: Any, saved: Any, index: Any) -> None:
    _, reference = saved
    np.testing.assert_array_equal(opened.get_slice("col")[index], reference["col"][index])


@pytest.mark.parametrize("bad", [
    (slice(0, 4),),  # one slice for a 2-D tensor
    (slice(0, 4), slice(-1, 2)),  # negative start
    (slice(0, 4), slice(0, 3)),  # stop past the axis
    (slice(0, 4), slice(0, 2, 0)),
    (slice(0, 4), slice(2, 0, -1)),
])
def test_malformed_boxes(saved: Any, bad: Any) -> None:
    path, _ = saved
    with sc.safe_open(path) as f, pytest.raises(SliceIndexError, match="box"):
        f.reader.read_box(f.header.tensors["col"], bad)


# ----------------------------------------------------------------------------- requests


def _requests(f: Any, boxes: list[tuple[str, tuple[slice, ...]]]) -> tuple[int, int]:
    before = dict(f.stats)
    f.reader.read_boxes([(f.header.tensors[n], b) for n, b in boxes])
    return f.stats["requests"] - before["requests"], f.stats["bytes_read"] - before["bytes_read"]


COLUMN = ("col", (slice(0, 4096), slice(1, 2)))
HALF_ROWS = ("rows", (slice(0, 96), slice(0, 256)))


def test_requests_from_the_mapping(saved: Any) -> None:
    """A strided box of a mapped file is one strided copy: one request, its own bytes."""
    path, _ = saved
    with sc.safe_open(path) as f:
        assert _requests(f, [COLUMN]) == (1, 4096 * 4)
        assert _requests(f, [HALF_ROWS]) == (1, 96 * 256 * 4)


def test_requests_with_positioned_reads(saved: Any) -> None:
    """pread: 4-byte runs would be 4,096 reads; the plan reads the span once (bounded,
    whatever the row count). Half rows of 1 KiB, gaps as large: exact bytes, one read per
    row (the budget forbids reading the other half). 7/8 of every row: one read."""
    path, _ = saved
    with sc.safe_open(path, backend="pread") as f:
        assert _requests(f, [COLUMN]) == (1, 4095 * 8 + 4)
        assert _requests(f, [HALF_ROWS]) == (96, 96 * 256 * 4)
        assert _requests(f, [("rows", (slice(0, 96), slice(0, 448)))]) == (1, 95 * 2048 + 1792)


def test_requests_remote_memory(saved: Any, mem_url: str) -> None:
    """memory://: the spans of every box of a call go out together, merged."""
    import fsspec

    path, _ = saved
    with open(path, "rb") as fh:
        fsspec.filesystem("memory").pipe(f"{mem_url}/m.safetensors", fh.read())
    with sc.safe_open(f"{mem_url}/m.safetensors") as f:
        # the column: 4-byte gaps cost less than a request: one span
        assert _requests(f, [COLUMN]) == (1, 4095 * 8 + 4)
        # half rows, 1 KiB gaps: one span each, exact bytes
        assert _requests(f, [HALF_ROWS]) == (96, 96 * 256 * 4)
        # both at once, in one plan: at most those ranges (the source may merge a few
        # more neighbours within its 1/16 slack)
        requests, nbytes = _requests(f, [COLUMN, HALF_ROWS])
        exact = 4095 * 8 + 4 + 96 * 256 * 4
        assert requests <= 97 and exact <= nbytes <= exact * (1 + 1 / 16), (requests, nbytes)


def test_requests_remote_s3(s3_server: Any, saved: Any) -> None:
    """moto S3 on 127.0.0.1, counted at the proxy: the requests the plan says."""
    path, reference = saved
    bucket = s3_server.new_bucket()
    with open(path, "rb") as fh:
        s3_server.filesystem().pipe_file(f"{bucket}/m.safetensors", fh.read())
    url = f"s3://{bucket}/m.safetensors"
    with sc.safe_open(url, storage_options=s3_server.storage_options) as f:
        tensors = f.header.tensors
        s3_server.counter.reset()
        got = f.reader.read_boxes([(tensors[n], b) for n, b in (COLUMN, HALF_ROWS)])
        on_wire = s3_server.counter.requests
        assert f.stats["requests"] <= 1 + 97  # the header, then the plan
    np.testing.assert_array_equal(got[0], reference["col"][COLUMN[1]])
    np.testing.assert_array_equal(got[1], reference["rows"][HALF_ROWS[1]])
    # every range request, plus one HEAD per fetch (the identity re-check of an unversioned
    # bucket), never one per row of the column
    assert f.stats["requests"] - 1 <= on_wire <= f.stats["requests"] - 1 + 2, s3_server.counter.log


def test_remote_requests_stay_bounded(mem_url: str) -> None:
    """Thousands of distant rows: at most the source's cap of requests per call."""
    import fsspec

    t = np.arange(3000 * 1024, dtype=np.float32).reshape(3000, 1024)
    fsspec.filesystem("memory").pipe(f"{mem_url}/big.safetensors", sc.save({"t": t}))
    with sc.safe_open(f"{mem_url}/big.safetensors") as f:
        box = (slice(0, 3000), slice(0, 128))  # 512 bytes of every 4 KiB row
        got = f.reader.read_box(f.header.tensors["t"], box)
        assert f.stats["requests"] - 1 <= _reader.BOX_REQUESTS
    np.testing.assert_array_equal(got, t[box])


# ----------------------------------------------------------------------------- verify


@pytest.fixture
def corrupted(saved: Any, tmp_path: Any) -> str:
    """The file with one byte of ``rows`` flipped, far from any box the tests read."""
    path, _ = saved
    with open(path, "rb") as fh:
        data = bytearray(fh.read())
    with sc.safe_open(path) as f:
        info = f.header.tensors["rows"]
        at = f.header.data_start + info.end - 1  # the last element: outside the left half
    data[at] ^= 0xFF
    out = tmp_path / "bad.safetensors"
    out.write_bytes(bytes(data))
    return str(out)


@pytest.mark.parametrize("route", ["mmap", "pread", "copy", "memory"])
def test_verify_on_every_box_route(corrupted: str, route: str, mem_url: str) -> None:
    if route == "memory":
        import fsspec

        with open(corrupted, "rb") as fh:
            fsspec.filesystem("memory").pipe(f"{mem_url}/bad.safetensors", fh.read())
        source, kw = f"{mem_url}/bad.safetensors", {}
    else:
        source, kw = corrupted, {"backend": "pread" if route == "pread" else "mmap",
                                 "copy": route == "copy"}
    with sc.safe_open(source, verify=True, **kw) as f:
        rows = f.header.tensors["rows"]
        with pytest.raises(ChecksumError, match="'rows'"):
            f.reader.read_box(rows, HALF_ROWS[1])
        with pytest.raises(ChecksumError, match="'rows'"):
            f.reader.read_boxes([(f.header.tensors["col"], COLUMN[1]), (rows, HALF_ROWS[1])])
        # an intact tensor of the same file reads fine, and is checked once
        f.reader.read_box(f.header.tensors["col"], COLUMN[1])
        before = f.stats["requests"]
        f.reader.read_box(f.header.tensors["col"], COLUMN[1])
        assert f.stats["requests"] - before == 1
    with sc.safe_open(source, **kw) as f:  # without verify: the box is read, no check
        f.reader.read_box(f.header.tensors["rows"], HALF_ROWS[1])


def test_verify_whole_tensor_box_checks_the_bytes_read(corrupted: str) -> None:
    """A box that is the whole tensor is checked on its own bytes: no second pass."""
    with sc.safe_open(corrupted, backend="pread", verify=True) as f:
        rows = f.header.tensors["rows"]
        before = f.stats["requests"]
        with pytest.raises(ChecksumError):
            f.reader.read_box(rows, (slice(0, 96), slice(0, 512)))
        assert f.stats["requests"] - before == 1


# ----------------------------------------------------------------------------- progress


@pytest.mark.parametrize("kw", [{}, {"backend": "pread"}])
def test_progress_on_local_loads(saved: Any, capfd: pytest.CaptureFixture[str], kw: Any) -> None:
    pytest.importorskip("tqdm")
    path, reference = saved
    total = sum(v.nbytes for v in reference.values())
    seen: list[int] = []
    real = _reader.ProgressBar.update

    def spy(self: Any, n: int) -> None:
        seen.append(n)
        real(self, n)

    mp = pytest.MonkeyPatch()
    mp.setattr(_reader.ProgressBar, "update", spy)
    try:
        out = sc.load_file(path, progress=True, **kw)
    finally:
        mp.undo()
    err = capfd.readouterr().err
    assert "load m.safetensors" in err
    assert sum(seen) == total
    if kw:  # positioned reads: the bar moves per tensor, by its bytes
        assert sorted(seen) == sorted(v.nbytes for v in reference.values())
    for name, want in reference.items():
        np.testing.assert_array_equal(out[name], want)


def test_no_progress_without_asking(saved: Any, capfd: pytest.CaptureFixture[str]) -> None:
    path, _ = saved
    sc.load_file(path)
    assert "load m.safetensors" not in capfd.readouterr().err


def test_get_slice_sharding_needs_jax(saved: Any) -> None:
    path, _ = saved
    with sc.safe_open(path) as f, pytest.raises(SafecodecError, match="framework='jax'"):
        f.get_slice("col", sharding=object())
