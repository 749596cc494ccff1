"""The safejax contract: serialize / deserialize names, arguments, defaults, return rules,
Objax VarCollections, and interchange with safetensors.flax and safejax-written files."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

import safecodec as sc  # noqa: E402


def params():
    return {"Dense_0": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
                        "bias": np.zeros(3, np.float32)},
            "Dense_1": {"kernel": np.ones((3, 1), np.float32)}}


def test_signatures_match_safejax():
    s = inspect.signature(sc.serialize)
    assert [(p.name, p.default) for p in s.parameters.values()] == [
        ("params", inspect.Parameter.empty), ("metadata", None),
        ("include_objax_variables", False), ("filename", None), ("fs", None)]
    d = inspect.signature(sc.deserialize)
    assert [(p.name, p.default) for p in d.parameters.values()] == [
        ("path_or_buf", inspect.Parameter.empty), ("fs", None), ("freeze_dict", False),
        ("requires_unflattening", True), ("to_var_collection", False)]


def test_bytes_round_trip_returns_params_alone_even_with_metadata():
    data = sc.serialize(params(), metadata={"epoch": "1"})
    assert isinstance(data, bytes)
    out = sc.deserialize(data)
    assert isinstance(out, dict) and isinstance(out["Dense_0"]["kernel"], jax.Array)
    np.testing.assert_array_equal(np.asarray(out["Dense_0"]["kernel"]), params()["Dense_0"]["kernel"])
    assert sc.read_header(data).metadata["epoch"] == "1"


def test_path_returns_params_and_metadata_when_there_is_user_metadata(tmp_path):
    path = tmp_path / "p.safetensors"
    assert sc.serialize(params(), metadata={"epoch": "1"}, filename=path) == path
    out, md = sc.deserialize(path)
    assert md == {"epoch": "1"} and set(out) == {"Dense_0", "Dense_1"}
    flat, md3 = sc.deserialize(path, requires_unflattening=False)
    assert set(flat) == {"Dense_0.kernel", "Dense_0.bias", "Dense_1.kernel"} and md3 == md


def test_path_without_user_metadata_returns_params_alone(tmp_path):
    path = tmp_path / "p.safetensors"
    sc.serialize(params(), filename=str(path))
    out = sc.deserialize(path)
    assert isinstance(out, dict) and set(out) == {"Dense_0", "Dense_1"}


def test_fsspec_filesystem_and_url():
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    sc.serialize(params(), metadata={"k": "v"}, filename="/sj/p.safetensors", fs=fs)
    out, md = sc.deserialize("/sj/p.safetensors", fs=fs)
    assert md == {"k": "v"} and out["Dense_1"]["kernel"].shape == (3, 1)
    out, md = sc.deserialize("memory://sj/p.safetensors")
    assert md == {"k": "v"}


def test_freeze_dict(tmp_path):
    FrozenDict = pytest.importorskip("flax.core").FrozenDict
    path = tmp_path / "p.safetensors"
    sc.serialize(params(), metadata={"epoch": "1"}, filename=path)
    frozen, md = sc.deserialize(str(path), freeze_dict=True)
    assert isinstance(frozen, FrozenDict) and md == {"epoch": "1"}

    out = sc.deserialize(sc.serialize(params()), freeze_dict=True)
    assert isinstance(out, FrozenDict) and isinstance(out["Dense_0"], FrozenDict)
    with pytest.raises(sc.SafecodecError, match=r"freeze_dict=True needs a dict at the top of the tree, the file holds a list"):
        sc.deserialize(sc.serialize([np.ones(1, np.float32)]), freeze_dict=True)
    with pytest.raises(sc.SafecodecError, match=r"choose one of freeze_dict=True and to_var_collection=True"):
        sc.deserialize(sc.serialize(params()), freeze_dict=True, to_var_collection=True)


def test_serialize_does_not_mutate_and_is_lossless():
    tree = {"a": [np.ones(1, np.float32), None], "b": {}, "c": (np.int32(3),), "d": 2.5}
    before = repr(tree)
    out = sc.deserialize(sc.serialize(tree))
    assert repr(tree) == before
    assert out["a"][1] is None and out["b"] == {} and type(out["c"]) is tuple and out["d"] == 2.5


def test_interchange_with_safetensors_flax(tmp_path):
    stf = pytest.importorskip("safetensors.flax")
    flatten_dict = pytest.importorskip("flax.traverse_util").flatten_dict

    p = params()
    ref = tmp_path / "ref.safetensors"
    stf.save_file(flatten_dict(jax.tree_util.tree_map(jnp.asarray, p), sep="."), str(ref))
    out = sc.deserialize(ref)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(p)
    np.testing.assert_array_equal(np.asarray(out["Dense_0"]["kernel"]), p["Dense_0"]["kernel"])
    ours = tmp_path / "ours.safetensors"
    sc.serialize(p, filename=ours)
    loaded = stf.load_file(str(ours))
    assert set(loaded) == set(flatten_dict(p, sep="."))
    np.testing.assert_array_equal(np.asarray(loaded["Dense_0.kernel"]), p["Dense_0"]["kernel"])


def test_hostile_records_raise_tree_structure_errors():
    from safecodec._tree import TREE_KEY

    deep = '{"version":1,"tree":' + '{"list":[' * 300 + "null" + "]}" * 300 + "}"
    for text, pattern in [(deep, r"nested deeper than"), ("[" * 50_000, r"not valid JSON|nested deeper"),
                          ('{"version":1,"tree":{"dict":5}}', r"inconsistent at <root>")]:
        data = sc.save({}, {TREE_KEY: text})
        for kwargs in ({}, {"requires_unflattening": False}, {"to_var_collection": True}):
            if kwargs.get("to_var_collection"):
                need_objax()
            with pytest.raises(sc.TreeStructureError, match=pattern):
                sc.deserialize(data, **kwargs)


# ----------------------------------------------------------------------------- objax


def need_objax():
    return pytest.importorskip("objax")


def objax_model():
    objax = need_objax()
    return objax.nn.Sequential([objax.nn.Linear(3, 4), objax.functional.relu, objax.nn.BatchNorm0D(4)])


@pytest.mark.parametrize("include", [False, True])
def test_var_collection_types_and_order_restored(include):
    objax = need_objax()
    vc = objax_model().vars()
    data = sc.serialize(vc, include_objax_variables=include)
    names = list(sc.read_header(data).tensors)
    assert all(n.endswith(("::TrainVar", "::StateVar")) for n in names) is include
    out = sc.deserialize(data, to_var_collection=True)
    assert type(out) is objax.VarCollection
    assert list(out.keys()) == list(vc.keys())
    assert [type(v) for v in out.values()] == [type(v) for v in vc.values()]
    for k in vc.keys():  # noqa: SIM118 (a VarCollection iterates over its variables)
        np.testing.assert_array_equal(np.asarray(out[k].value), np.asarray(vc[k].value))


def test_objax_module_is_serialized_through_its_vars():
    need_objax()
    model = objax_model()
    out = sc.deserialize(sc.serialize(model), requires_unflattening=False)
    assert list(out) == list(model.vars().keys())


def test_safejax_style_file_with_type_suffixes(tmp_path):
    need_objax()
    """A file as safejax wrote it (no recorded structure, ``name::Type`` names)."""
    path = tmp_path / "sj.safetensors"
    sc.save_file({"(Linear).w::TrainVar": np.ones((2, 2), np.float32),
                  "(BN).mean::StateVar": np.zeros(2, np.float32),
                  "(Rng).key::RandomState": np.array([0, 7], np.uint32)}, path)
    vc = sc.deserialize(path, to_var_collection=True)
    kinds = {k: type(v).__name__ for k, v in vc.items()}
    assert kinds == {"(Linear).w": "TrainVar", "(BN).mean": "StateVar", "(Rng).key": "RandomState"}
    assert vc["(Rng).key"].value.tolist() == [0, 7]


def test_plain_file_to_var_collection_defaults_to_trainvar():
    need_objax()
    vc = sc.deserialize(sc.save({"w": np.ones(2, np.float32)}), to_var_collection=True)
    assert type(vc["w"]).__name__ == "TrainVar"


def test_train_ref_cannot_be_rebuilt():
    objax = need_objax()
    model = objax_model()
    opt = objax.optimizer.Momentum(model.vars())
    data = sc.serialize(opt.vars())
    with pytest.raises(sc.TreeStructureError, match=r"'\(Momentum\)\.train_vars\(ModuleList\)\[0\]' is a TrainRef"):
        sc.deserialize(data, to_var_collection=True)


def test_objax_load_into_assigns_and_checks():
    objax = need_objax()
    import safecodec.objax as sco

    src, dst = objax_model(), objax_model()
    x = np.ones((2, 3), np.float32)
    sco.load_into(dst, sco.save(src))
    np.testing.assert_array_equal(np.asarray(dst(x, training=False)), np.asarray(src(x, training=False)))
    small = objax.nn.Sequential([objax.nn.Linear(3, 5)])
    with pytest.raises(sc.TreeStructureError, match=r"(?s)0 missing, 4 unexpected, 2 mismatched.*"
                       r"'\(Sequential\)\[0\]\(Linear\)\.w': model float32\[3, 5\], file float32\[3, 4\]"):
        sco.load_into(small, sco.save(src))
    restored = sco.load(sco.save(src))
    assert list(restored.keys()) == list(src.vars().keys())
