"""The routers (safecodec._api) as users call them: public argument names, keyword shapes
of the drop-in front ends, and clear errors on bad arguments."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import safecodec as sc
import safecodec.numpy as scn


def test_top_level_parameter_names_match_the_design():
    # The documented API (docs/api.md): save_file(tensors, path_or_url, metadata=None, ...),
    # load_file(path_or_url, ...)
    assert list(inspect.signature(sc.save_file).parameters)[:3] == [
        "tensors", "path_or_url", "metadata"]
    assert next(iter(inspect.signature(sc.load_file).parameters)) == "path_or_url"


def test_top_level_keywords_round_trip(tmp_path):
    path = tmp_path / "a.safetensors"
    sc.save_file(tensors={"a": np.arange(3.0)}, path_or_url=path, metadata={"k": "v"})
    out = sc.load_file(path_or_url=path, copy=True)
    np.testing.assert_array_equal(out["a"], np.arange(3.0))


def test_numpy_front_end_takes_safetensors_keyword_names(tmp_path):
    # Calls written for safetensors.numpy use tensor_dict= and filename=.
    path = tmp_path / "a.safetensors"
    scn.save_file(tensor_dict={"a": np.arange(4, dtype=np.int16)}, filename=str(path),
                  metadata={"k": "v"})
    np.testing.assert_array_equal(scn.load_file(filename=path)["a"], np.arange(4))
    data = scn.save(tensor_dict={"b": np.ones(2, np.float32)}, metadata=None)
    np.testing.assert_array_equal(scn.load(data=data)["b"], np.ones(2))
    # Positional use as in safetensors.numpy, and safecodec's own options still pass through.
    scn.save_file({"c": np.zeros(2)}, path, {"m": "n"}, alignment=8)
    assert sc.read_header(path).metadata == {"m": "n"}
    assert scn.load_file(path, copy=True)["c"].flags.owndata


@pytest.mark.parametrize("alignment", ["64", 64.0, None, True])
def test_alignment_of_wrong_type_is_a_clear_error(alignment):
    with pytest.raises(sc.HeaderError, match="alignment must be a power of two >= 8, got"):
        sc.save({"a": np.ones(1)}, alignment=alignment)


@pytest.mark.parametrize("device", ["cpu", 0])
def test_jax_device_of_wrong_type_is_a_clear_error(device):
    pytest.importorskip("jax", reason="jax is an optional dependency")
    import safecodec.jax as scj

    data = sc.save({"a": np.ones(2, np.float32)})
    with pytest.raises(sc.SafecodecError, match=r"device= takes a jax\.Device .* got "):
        scj.load(data, device=device)
    with pytest.raises(sc.SafecodecError, match=r"device= takes a jax\.Device"):
        sc.safe_open(data, framework="jax", device=device)


def test_user_metadata_cannot_use_the_reserved_prefix():
    with pytest.raises(sc.HeaderError, match="reserved"):
        sc.save({"a": np.ones(1)}, {"safecodec.note": "mine"})
    # safecodec's own keys still pass through (rewriting a file keeps its tree record)
    data = sc.save_tree({"w": np.ones(2)})
    raw = sc.read_header(data).raw_metadata
    again = sc.save({"w": np.ones(2)}, raw)
    assert sc.read_header(again).raw_metadata == raw


def test_numpy_load_file_backend_like_the_wheel(tmp_path):
    import safecodec.numpy as scn

    path = tmp_path / "b.safetensors"
    scn.save_file({"x": np.arange(4.0)}, path)
    assert scn.load_file(path, backend="mmap")["x"].tolist() == [0, 1, 2, 3]
    # that pread arrays are private is tested by behaviour in test_hardening.py
    assert scn.load_file(path, backend="pread")["x"].tolist() == [0, 1, 2, 3]
    with pytest.raises(sc.SafecodecError, match="backend"):
        scn.load_file(path, backend="tape")


def test_nested_dicts_point_to_save_tree():
    with pytest.raises(sc.SafecodecError, match="save_tree"):
        sc.save({"a": {"b": np.ones(1)}})


def test_warnings_point_at_the_callers_line(tmp_path):
    import warnings

    data = sc.save_tree({"f": print, "w": np.ones(1)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sc.load_tree(data)
    assert caught and caught[0].filename == __file__
    jax = pytest.importorskip("jax", reason="jax is optional")
    import safecodec.jax as scj

    if jax.config.jax_enable_x64:
        pytest.skip("x64 mode is on: nothing is narrowed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scj.load(sc.save({"i": np.arange(3, dtype=np.int64)}))
    assert caught and caught[0].filename == __file__


def test_every_alignment_default_is_the_zero_copy_constant():
    """The zero-copy alignment is one number (``_header.ZERO_COPY_ALIGNMENT``): every
    writer's default, the CLI's choice, and the address JAX's CPU client aliases at."""
    import importlib
    import inspect

    from safecodec import _cli, _header, _jax_put

    functions = [sc.save, sc.save_file, sc.save_tree, _header.plan_layout]
    for module in ("safecodec._writer", "safecodec._sharded", "safecodec.numpy",
                   "safecodec.jax", "safecodec._jax_save"):
        mod = importlib.import_module(module)
        functions += [f for _, f in inspect.getmembers(mod, inspect.isfunction)
                      if f.__module__ == module and "alignment" in inspect.signature(f).parameters]
    checked = 0
    for f in functions:
        param = inspect.signature(f).parameters["alignment"]
        if param.default is not inspect.Parameter.empty:
            assert param.default == _header.ZERO_COPY_ALIGNMENT, f
            checked += 1
    assert checked >= 8
    assert _jax_put.ALIGNMENT is _header.ZERO_COPY_ALIGNMENT
    option = next(a for a in _cli.build_parser()._subparsers._group_actions[0].choices[
        "convert"]._actions if a.dest == "alignment")
    assert option.default == _header.ZERO_COPY_ALIGNMENT
    assert set(option.choices) == {8, _header.ZERO_COPY_ALIGNMENT}


def test_dtype_lists_are_derived_from_the_table():
    """Lists of codes elsewhere come from the one dtype table (``_dtypes``)."""
    from safecodec import _dtypes

    floats = {c for c, row in _dtypes.DTYPES.items() if row.kind == "f"}
    assert floats == _dtypes.FLOAT_CODES
    assert {"F64", "F32", "F16", "BF16", "F4", "F6_E2M3", "F8_E8M0"} <= floats
    assert not floats & {"C64", "BOOL", "U8", "I64"}
    assert {"F6_E2M3", "F6_E3M2"} == _dtypes.F6_CODES
    for code, row in _dtypes.DTYPES.items():
        if not row.packed and row.kind != "f":  # NumPy's own kind letter, where it has one
            assert row.numpy.kind == row.kind, code
