"""safecodec as a drop-in for the reference wheel (``safetensors.numpy``,
``safetensors.flax``, ``safetensors.safe_open``): the call shapes its users write (same
keyword names, same positional order), and differential checks against the wheel where
both run. The deliberate differences are listed in docs/guides/migrating.md."""

from __future__ import annotations

import inspect

import ml_dtypes
import numpy as np
import pytest

import _oracle
import safecodec as sc
import safecodec.numpy as scn

# Shapes and dtypes for the differential slice checks.
TENSORS = {
    "f32": np.arange(60, dtype=np.float32).reshape(3, 4, 5),
    "u8": np.arange(7, dtype=np.uint8),
    "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
    "f16": np.arange(4, dtype=np.float16).reshape(4, 1),
    "bf16": np.arange(12).astype(ml_dtypes.bfloat16).reshape(2, 2, 3),
    "bool": np.array([True, False, True]),
}


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "m.safetensors"
    sc.save_file(TENSORS, p, metadata={"format": "np"}, alignment=8)
    return str(p)


def public(obj):
    return {n for n in dir(obj) if not n.startswith("_")}


# ------------------------------------------------------------------ x[[]] (empty list)


@pytest.mark.parametrize("backend", ["mmap", "pread"])
@pytest.mark.parametrize("name", sorted(TENSORS))
def test_empty_list_index_matches_the_wheel(path, name, backend):
    st = _oracle.require()
    with st.safe_open(path, framework="np", backend=backend) as w:
        want = w.get_slice(name)[[]]
    with sc.safe_open(path, "np", "cpu", backend=backend) as f:
        got = f.get_slice(name)[[]]
    assert got.shape == want.shape == (0, *TENSORS[name].shape[1:])
    assert got.dtype == want.dtype
    assert got.shape == TENSORS[name][[]].shape  # NumPy's rule too


def test_empty_list_index_on_jax_handles(path):
    st = _oracle.require()
    jax = pytest.importorskip("jax")
    for name in ("f32", "u8", "bf16"):
        with st.safe_open(path, framework="flax") as w:
            want = w.get_slice(name)[[]]
        with sc.safe_open(path, framework="jax") as f:
            got = f.get_slice(name)[[]]
        assert isinstance(got, jax.Array)
        assert got.shape == want.shape and got.dtype == want.dtype


def test_empty_list_index_edges():
    data = sc.save({"s": np.float32(1.0), "e": np.zeros((0, 3), np.int16)})
    with sc.safe_open(data) as f:
        with pytest.raises(sc.SliceIndexError, match="too many indices"):
            f.get_slice("s")[[]]  # a scalar has no first axis (NumPy and the wheel refuse)
        assert f.get_slice("e")[[]].shape == (0, 3)  # as NumPy (the wheel refuses 0-size)
        for bad in ([0], [0, 1], ([],), (0, [])):  # advanced indexing stays refused
            with pytest.raises(sc.SliceIndexError, match="basic indexing"):
                f.get_slice("e")[bad]


# ------------------------------------------------------------------ safe_open's call shapes


def test_safe_open_positional_device_and_filename_keyword(path):
    with sc.safe_open(path, "np", "cpu") as f:
        assert f.keys() == sorted(TENSORS)
    with sc.safe_open(filename=path, framework="numpy", device="cpu") as f:
        assert f.offset_keys() == list(sc.read_header(path).tensors)
    with pytest.raises(TypeError, match="one source"):
        sc.safe_open(path, filename=path)
    with pytest.raises(TypeError, match="one source"):
        sc.safe_open(framework="np")


@pytest.mark.parametrize("device", ["cuda", "cuda:0", 0, "mps"])
def test_numpy_handles_refuse_other_devices(path, device):
    with pytest.raises(sc.SafecodecError, match="may only be 'cpu'"):
        sc.safe_open(path, "np", device)


def test_backends(path):
    with sc.safe_open(path, "np", backend="mmap") as f, \
            sc.safe_open(path, "np", backend="pread") as g:
        for name in TENSORS:
            a, b = f.get_tensor(name), g.get_tensor(name)
            assert a.tobytes() == b.tobytes() == TENSORS[name].tobytes()
            assert not np.shares_memory(a, b)
    with pytest.raises(sc.SafecodecError, match=r"'mmap', 'pread'.*'nope'"):
        sc.safe_open(path, "np", backend="nope")
    assert scn.load_file(path, backend="pread")["f32"].tolist() == TENSORS["f32"].tolist()


def test_flax_load_file_backend(path):
    scf = pytest.importorskip("safecodec.flax")
    sc.save_file({"w": TENSORS["f32"]}, path)
    for backend in ("mmap", "pread"):
        out = scf.load_file(path, backend=backend)
        np.testing.assert_array_equal(np.asarray(out["w"]), TENSORS["f32"])
    with pytest.raises(sc.SafecodecError, match="backend"):
        scf.load_file(path, backend="nope")


def test_slices_outlive_a_mapped_handle_like_the_wheel(path):
    st = _oracle.require()
    with st.safe_open(path, framework="np") as w:
        ws = w.get_slice("f32")
    with sc.safe_open(path, "np") as f:
        s = f.get_slice("f32")
    np.testing.assert_array_equal(s[1:, 0], ws[1:, 0])
    assert s.get_shape() == ws.get_shape() and s.get_dtype() == ws.get_dtype()
    with sc.safe_open(path, "np", backend="pread") as f:  # no mapping to keep: refused
        s = f.get_slice("f32")
    with pytest.raises(sc.ClosedHandleError):
        s[0]


def test_closed_handle(path):
    with sc.safe_open(path, "np") as f:
        pass
    for call in (f.keys, f.offset_keys, f.metadata, f.get_tensors, lambda: f.get_tensor("u8")):
        with pytest.raises(sc.SafecodecError):  # the wheel: SafetensorError("File is closed")
            call()


# ------------------------------------------------------------------ every public name


def test_handle_and_slice_have_every_public_name_of_the_wheel(path):
    st = _oracle.require()
    with st.safe_open(path, framework="np") as w, sc.safe_open(path, "np") as f:
        assert public(w) <= public(f)
        assert public(w.get_slice("f32")) <= public(f.get_slice("f32"))
        assert callable(f.__enter__) and callable(f.__exit__)


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD]


@pytest.mark.parametrize("module", ["numpy", "flax"])
def test_front_ends_take_the_wheels_arguments(module):
    theirs = _oracle.require_module(module)
    ours = pytest.importorskip(f"safecodec.{module}")
    for verb in ("save", "save_file", "load", "load_file"):
        want, got = _params(getattr(theirs, verb)), _params(getattr(ours, verb))
        # the wheel's parameters, in its order, with its kinds and defaults, come first
        positional = [p for p in want if p[1] is not inspect.Parameter.KEYWORD_ONLY]
        assert got[: len(positional)] == positional, verb
        keyword = {p[0]: p[2] for p in want if p[1] is inspect.Parameter.KEYWORD_ONLY}
        ours_kw = dict((p[0], p[2]) for p in got)
        for name, default in keyword.items():
            assert name in ours_kw and ours_kw[name] == default, (verb, name)
    assert ours.safe_open is sc.safe_open  # re-exported, as the wheel does


def test_safe_open_takes_the_wheels_arguments():
    st = _oracle.require()
    sig = inspect.signature(sc.safe_open)
    assert list(sig.parameters)[:3] == ["source", "framework", "device"]
    assert sig.parameters["backend"].default == "mmap"
    assert "filename" in sig.parameters
    assert "backend" in (st.safe_open.__text_signature__ or "")


# ------------------------------------------------------------------ differential reads


BASIC = [(), slice(None), 0, -1, (0, 1), (slice(None), 0), (..., 0), (slice(None, 2),),
         (slice(None), slice(1, 3)), (slice(None, None, 2),), (1, ...)]


def test_handle_reads_match_the_wheel(path):
    st = _oracle.require()
    with st.safe_open(path, framework="np") as w, sc.safe_open(path, "np", "cpu") as f:
        assert f.keys() == w.keys() and f.offset_keys() == w.offset_keys()
        assert f.metadata() == w.metadata()
        ours, theirs = f.get_tensors(), w.get_tensors()
        assert list(ours) == list(theirs)
        for name in TENSORS:
            for got, want in ((f.get_tensor(name), w.get_tensor(name)), (ours[name], theirs[name])):
                assert got.dtype == want.dtype and got.shape == want.shape
                assert got.tobytes() == want.tobytes()
                assert got.flags.writeable == want.flags.writeable
            s, ws = f.get_slice(name), w.get_slice(name)
            assert s.get_shape() == ws.get_shape() and s.get_dtype() == ws.get_dtype()
            for index in BASIC:
                try:
                    want = ws[index]
                except Exception:  # the wheel refuses: NumPy's answer is ours
                    try:
                        want = TENSORS[name][index]
                    except IndexError:
                        with pytest.raises(sc.SliceIndexError):
                            s[index]
                        continue
                got = s[index]
                assert got.shape == want.shape and got.tobytes() == want.tobytes(), (name, index)


def test_numpy_front_end_round_trips_with_the_wheel(tmp_path):
    stn = _oracle.require_module("numpy")
    tensors = {"a": np.zeros((2, 2)), "b": np.ones((2, 3), dtype=np.uint8)}
    scn.save_file(tensors, tmp_path / "ours.safetensors", {"k": "v"})
    stn.save_file(tensors, str(tmp_path / "theirs.safetensors"), {"k": "v"})
    for name in ("ours", "theirs"):
        p = str(tmp_path / f"{name}.safetensors")
        a, b = scn.load_file(p), stn.load_file(p)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].tobytes() == b[k].tobytes() and a[k].dtype == b[k].dtype
    assert scn.save(tensors, alignment=8) == stn.save(tensors)
    assert scn.load(stn.save(tensors)).keys() == tensors.keys()
