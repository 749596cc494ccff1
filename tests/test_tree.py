"""save_tree / load_tree: lossless round trips, names, metadata, templates, errors."""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict, namedtuple

import ml_dtypes
import numpy as np
import pytest

import safecodec as sc
from safecodec._tree import RESERVED_PREFIX, TREE_KEY, SkippedLeavesWarning, iter_names

Point = namedtuple("Point", "x y")


def same(a, b):
    """Exact equality of trees: types, keys and their order, dtypes, values (NaN-safe)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)
        assert all(type(k1) is type(k2) for k1, k2 in zip(a, b, strict=True))
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            same(x, y)
    elif isinstance(a, np.ndarray | np.generic):
        assert a.dtype == b.dtype and np.shape(a) == np.shape(b)
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    else:
        assert a == b


def full_tree():
    return {
        "layer": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float64)},
        "blocks": [np.ones(2, np.int8), (np.array(1.5, np.float16), None), []],
        "empty": {},
        "none": None,
        "t": (),
        3: np.arange(2, dtype=np.uint64),
        True: np.array([True, False]),
        None: np.zeros((0, 4), np.float32),
        2.5: np.ones(1, np.int16),
        "a.b": np.array([1], np.int32),
        "a": {"b": np.array([2], np.int32)},
        "x/y": np.ones(1, np.uint16),
        "py": {"i": 7, "f": 0.1, "b": False, "big": -(2**62)},
        "np": {"f32": np.float32(1.25), "i8": np.int8(-3), "bool": np.bool_(True)},
        "bf16": np.array([1.5, -2.0], ml_dtypes.bfloat16),
        "f8": np.array([0.5, 448.0], ml_dtypes.float8_e4m3fn),
        "f8e5": np.array([[1.0]], ml_dtypes.float8_e5m2),
        "scalar0d": np.array(3.0, np.float64),
        "nan": np.array([np.nan, -0.0, np.inf], np.float32),
        "c64": np.array([1 + 2j], np.complex64),
    }


def test_round_trip_is_exact():
    tree = full_tree()
    out = sc.load_tree(sc.save_tree(tree))
    same(tree, out)


def test_round_trip_through_a_file(tmp_path):
    tree = full_tree()
    path = tmp_path / "t.safetensors"
    assert sc.save_tree(tree, path) is None
    same(tree, sc.load_tree(path))
    same(tree, sc.load_tree(str(path), copy=True))


def test_numpy_leaves_are_copy_on_write_views(tmp_path):
    path = tmp_path / "t.safetensors"
    sc.save_tree({"w": np.zeros(16, np.float32)}, path)
    out = sc.load_tree(path)
    assert not out["w"].flags.owndata and out["w"].flags.writeable
    out["w"][0] = 7.0
    assert sc.load_tree(path)["w"][0] == 0.0


@pytest.mark.parametrize(
    "tree",
    [{}, [], (), None, [[]], {"a": {}}, {"a": [None, {}]}, np.ones(3, np.float32), 5, [1, 2.0, True]],
    ids=repr,
)
def test_degenerate_trees(tree):
    same(tree, sc.load_tree(sc.save_tree(tree)))


def test_names_are_dot_joined_paths():
    tree = {"params": {"Dense_0": {"kernel": np.ones(2), "bias": np.ones(1)}},
            "mlp/~/linear_0": {"w": np.ones(1)}, "seq": [np.ones(1), {"k": np.ones(1)}]}
    assert list(iter_names(tree)) == ["params.Dense_0.kernel", "params.Dense_0.bias",
                                      "mlp/~/linear_0.w", "seq.0", "seq.1.k"]
    header = sc.read_header(sc.save_tree(tree))
    assert set(header.tensors) == {"params.Dense_0.kernel", "params.Dense_0.bias",
                                   "mlp/~/linear_0.w", "seq.0", "seq.1.k"}


def test_colliding_names_are_disambiguated_and_nesting_keeps_the_plain_name():
    tree = {"a.b": np.array([1]), "a": {"b": np.array([2])}, 1: np.array([3]), "1": np.array([4])}
    data = sc.save_tree(tree)
    tensors = sc.load(data)
    assert tensors["a.b"].tolist() == [2]  # the nested one, as flatten_dict would name it
    assert tensors["a.b~1"].tolist() == [1]
    assert tensors["1"].tolist() == [3] and tensors["1~1"].tolist() == [4]
    same(tree, sc.load_tree(data))


def test_reserved_and_nul_keys_get_valid_names():
    tree = {"__metadata__": np.ones(1), "nul\x00key": np.zeros(1)}
    data = sc.save_tree(tree)
    assert "__metadata__" not in sc.read_header(data).tensors
    assert all("\x00" not in n for n in sc.read_header(data).tensors)
    same(tree, sc.load_tree(data))


def test_caller_tree_is_not_mutated():
    inner = {"w": np.ones(2, np.float32)}
    tree = {"a": inner, "l": [inner["w"]], "s": 1}
    snapshot = {"a": dict(inner), "l": list(tree["l"]), "s": 1}
    sc.save_tree(tree, metadata={"k": "v"})
    assert tree.keys() == snapshot.keys() and tree["a"] is inner and list(inner) == ["w"]
    assert tree["l"][0] is inner["w"] and tree["s"] == 1


# ----------------------------------------------------------------------------- metadata


def test_user_metadata_round_trips_and_internal_keys_are_hidden():
    data = sc.save_tree({"w": np.ones(1)}, metadata={"epoch": "3", "note": "é"})
    _, md = sc.load_tree(data, with_metadata=True)
    assert md == {"epoch": "3", "note": "é"}
    assert sc.read_header(data).metadata == md  # internal keys hidden everywhere
    with sc.safe_open(data) as f:
        assert f.metadata() == md
    raw = sc.read_header(data).raw_metadata
    assert TREE_KEY in raw and raw["epoch"] == "3"
    assert all(k.startswith(RESERVED_PREFIX) for k in raw if k not in md)
    assert sc.read_header(sc.save_tree({"w": np.ones(1)})).metadata is None


@pytest.mark.parametrize(("given", "expected"), [(None, None), ({}, {})])
def test_absent_and_empty_metadata_are_told_apart(given, expected):
    _, md = sc.load_tree(sc.save_tree({"w": np.ones(1)}, metadata=given), with_metadata=True)
    assert md == expected and type(md) is type(expected)


def test_reserved_metadata_prefix_is_refused():
    with pytest.raises(sc.SafecodecError, match=r"reserved for safecodec: 'safecodec\.x'"):
        sc.save_tree({"w": np.ones(1)}, metadata={"safecodec.x": "1"})


def test_recorded_structure_is_plain_json_without_code():
    data = sc.save_tree({"p": Point(np.ones(1), "label")})
    record = json.loads(sc.read_header(data).raw_metadata[TREE_KEY])
    assert record["version"] == 1
    node = record["tree"]["dict"][0][1]
    assert node["node"].endswith("Point")  # informational only
    assert node["fields"][1] == ["a", "y", {"skip": "builtins.str"}]


# ----------------------------------------------------------------------------- non-array leaves


def test_non_array_leaves_come_back_as_none_with_one_warning():
    tree = {"act": np.tanh, "name": "mlp", "p": Point(np.ones(1), object()), "w": np.ones(2)}
    data = sc.save_tree(tree)
    assert set(sc.read_header(data).tensors) == {"p.x", "w"}
    with pytest.warns(SkippedLeavesWarning, match=r"3 leaf/leaves .*\['act'\], \['name'\], \['p'\]\.y") as rec:
        out = sc.load_tree(data)
    assert len(rec) == 1
    assert out["act"] is None and out["name"] is None and out["p"] == {"x": out["p"]["x"], "y": None}


def test_like_supplies_non_array_leaves():
    sentinel = object()
    tree = {"act": np.tanh, "p": Point(np.ones(1), sentinel)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sc.load_tree(sc.save_tree(tree), like=tree)
    assert out["act"] is np.tanh and type(out["p"]) is Point and out["p"].y is sentinel


def test_namedtuple_without_like_is_a_dict_of_fields():
    out = sc.load_tree(sc.save_tree(Point(np.ones(1), np.zeros(2))))
    assert type(out) is dict and list(out) == ["x", "y"]


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    ("leaf", "hint"),
    [
        (np.array([1 + 1j]), r"complex128.*cast it to complex64"),
        (1 + 2j, r"complex128.*cast it to complex64"),
        (np.array(["a"]), r"convert it to a numeric array"),
        (np.array([1.0], np.longdouble), r"cast it to float64"),
    ],
    ids=["complex128", "py-complex", "str-array", "longdouble"],
)
def test_unsupported_dtype_is_refused_with_path_and_cast(leaf, hint):
    if np.dtype(np.longdouble) == np.dtype(np.float64) and getattr(leaf, "dtype", None) == np.longdouble:
        pytest.skip("longdouble is float64 on this platform")
    with pytest.raises(sc.DtypeError, match=r"\['outer'\]\[0\].*" + hint):
        sc.save_tree({"outer": [leaf]})


def test_too_large_python_int_is_refused():
    with pytest.raises(sc.DtypeError, match=r"\['n'\] is the int 1180591620717411303424, too large"):
        sc.save_tree({"n": 2**70})


def test_unrecordable_key_is_refused():
    with pytest.raises(sc.TreeStructureError, match=r"dict key \(1, 2\) \(tuple\) at <root>"):
        sc.save_tree({(1, 2): np.ones(1)})


# ----------------------------------------------------------------------------- like= templates


def test_like_checks_everything_and_reports_all_problems_at_once():
    saved = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32), "extra": np.ones(1, np.int8)}
    like = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, ml_dtypes.bfloat16),
            "gone": np.zeros(4, np.float32)}
    with pytest.raises(sc.TreeStructureError) as info:
        sc.load_tree(sc.save_tree(saved), like=like)
    msg = str(info.value)
    assert "1 missing, 1 unexpected, 2 mismatched" in msg
    assert "['gone']: template expects float32[4], file has nothing" in msg
    assert "'extra' int8[1]" in msg
    assert "['w']: template float32[3, 2], file 'w' float32[2, 3]" in msg
    assert "['b']: template bfloat16[3], file 'b' float32[3]" in msg


def test_like_with_none_where_file_has_a_tensor():
    with pytest.raises(sc.TreeStructureError, match=r"\['w'\]: template holds None, file has tensor 'w' float32\[1\]"):
        sc.load_tree(sc.save_tree({"w": np.ones(1, np.float32)}), like={"w": None})


def test_like_restores_types_and_containers():
    saved = {"p": Point(np.ones(1), np.zeros(1)), "o": OrderedDict(z=np.ones(1), a=np.ones(2)),
             "s": 3, "f": np.float32(2.0)}
    out = sc.load_tree(sc.save_tree(saved), like=saved)
    assert type(out["p"]) is Point and type(out["o"]) is OrderedDict and list(out["o"]) == ["z", "a"]
    assert out["s"] == 3 and type(out["s"]) is int
    assert type(out["f"]) is np.float32


def test_like_on_a_foreign_file_matches_dot_joined_names():
    data = sc.save({"params.Dense_0.kernel": np.ones((2, 2), np.float32)})
    like = {"params": {"Dense_0": {"kernel": np.zeros((2, 2), np.float32)}}}
    out = sc.load_tree(data, like=like)
    assert out["params"]["Dense_0"]["kernel"].tolist() == [[1, 1], [1, 1]]


def test_python_scalar_template_accepts_same_kind():
    out = sc.load_tree(sc.save({"lr": np.array(0.5, np.float32)}), like={"lr": 1.0})
    assert out == {"lr": 0.5} and type(out["lr"]) is float
    with pytest.raises(sc.TreeStructureError, match=r"\['lr'\]: template int64\[\], file 'lr' float32\[\]"):
        sc.load_tree(sc.save({"lr": np.array(0.5, np.float32)}), like={"lr": 1})


# ----------------------------------------------------------------------------- foreign files


def test_foreign_file_unflattens_by_dots():
    data = sc.save({"a.b.c": np.ones(1), "a.d": np.zeros(1), "e": np.ones(2)})
    out = sc.load_tree(data)
    assert set(out) == {"a", "e"} and set(out["a"]) == {"b", "d"} and "c" in out["a"]["b"]


def test_foreign_file_with_conflicting_names_is_refused():
    data = sc.save({"a": np.ones(1), "a.b": np.zeros(1)})
    with pytest.raises(sc.TreeStructureError, match=r"'a' is a tensor and a prefix of"):
        sc.load_tree(data)


def test_reference_wheel_reads_the_tensors_and_writes_loadable_files(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    tree = {"params": {"dense": {"kernel": np.ones((2, 2), np.float32)}}, "step": np.array(3)}
    path = tmp_path / "x.safetensors"
    sc.save_tree(tree, path)
    flat = st.load_file(str(path))
    assert set(flat) == {"params.dense.kernel", "step"}
    other = tmp_path / "ref.safetensors"
    st.save_file({"params.dense.kernel": np.ones((2, 2), np.float32)}, str(other))
    assert sc.load_tree(other)["params"]["dense"]["kernel"].shape == (2, 2)


def test_tampered_structure_is_reported():
    data = sc.save_tree({"w": np.ones(1)})
    md = dict(sc.read_header(data).raw_metadata)
    # structure names a tensor the file lacks
    bad = sc.save({"v": np.ones(1)}, md)
    with pytest.raises(sc.TreeStructureError, match=r"refers to tensor 'w', which is not in the file"):
        sc.load_tree(bad)
    extra = sc.save({"w": np.ones(1), "z": np.ones(1)}, md)
    with pytest.raises(sc.TreeStructureError, match=r"1 tensor\(s\) its recorded tree structure does not mention \('z'\)"):
        sc.load_tree(extra)
    md[TREE_KEY] = "{not json"
    with pytest.raises(sc.TreeStructureError, match=r"is not valid JSON"):
        sc.load_tree(sc.save({"w": np.ones(1)}, md))
    md[TREE_KEY] = json.dumps({"version": 99, "tree": None})
    with pytest.raises(sc.TreeStructureError, match=r"version 99; this safecodec reads version 1"):
        sc.load_tree(sc.save({"w": np.ones(1)}, md))
    md[TREE_KEY] = json.dumps({"version": 1, "tree": {"dict": [["w", 5]]}})
    with pytest.raises(sc.TreeStructureError, match=r"inconsistent at \['w'\]"):
        sc.load_tree(sc.save({"w": np.ones(1)}, md))


def test_unknown_framework_is_refused():
    with pytest.raises(sc.SafecodecError, match=r"unsupported framework 'torch'"):
        sc.load_tree(sc.save_tree({"w": np.ones(1)}), framework="torch")


# ----------------------------------------------------------------------------- property


def _trees():
    from hypothesis import strategies as st

    dtypes = st.sampled_from([np.float32, np.float64, np.int8, np.uint32, ml_dtypes.bfloat16, np.bool_])
    arrays = st.builds(
        lambda dt, shape, seed: np.random.default_rng(seed).integers(0, 3, size=shape).astype(dt),
        dtypes, st.lists(st.integers(0, 3), max_size=3).map(tuple), st.integers(0, 2**32 - 1))
    leaves = st.one_of(arrays, st.none(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False),
                       st.booleans())
    keys = st.one_of(st.text(max_size=4), st.integers(-3, 3))
    return st.recursive(
        leaves,
        lambda kids: st.one_of(st.lists(kids, max_size=3), st.lists(kids, max_size=3).map(tuple),
                               st.dictionaries(keys, kids, max_size=3)),
        max_leaves=12,
    )


def test_hypothesis_round_trips():
    from hypothesis import given, settings

    @settings(max_examples=60)
    @given(_trees())
    def check(tree):
        same(tree, sc.load_tree(sc.save_tree(tree)))

    check()


def test_too_deep_trees_are_refused_on_save_and_load():
    from safecodec._tree import MAX_TREE_DEPTH

    deep: object = np.ones(1)
    for _ in range(MAX_TREE_DEPTH + 5):
        deep = [deep]
    with pytest.raises(sc.TreeStructureError, match=rf"nested deeper than {MAX_TREE_DEPTH} levels"):
        sc.save_tree(deep)
    ok: object = np.ones(1)
    for _ in range(MAX_TREE_DEPTH - 1):
        ok = {"k": ok}
    same(ok, sc.load_tree(sc.save_tree(ok)))
    # Hostile records: JSON nested past the recursion limit, and a deep but valid one.
    deep_record = '{"version":1,"tree":' + '{"list":[' * 300 + "null" + "]}" * 300 + "}"
    for text in ("[" * 100_000 + "]" * 100_000, deep_record):
        md = {TREE_KEY: text}
        with pytest.raises(sc.TreeStructureError, match=r"nested deeper than|has no 'tree' entry"):
            sc.load_tree(sc.save({}, md))
        with pytest.raises(sc.TreeStructureError, match=r"nested deeper than|has no 'tree' entry"):
            sc.load_tree(sc.save({}, md), like={})


# ----------------------------------------------------------------------------- hostile records

def _hostile_file(tree_json, **record):
    """A file with tensors w float32[3], s int64[], k uint32[2] and a crafted record."""
    tensors = {"w": np.arange(3, dtype=np.float32), "s": np.array(7), "k": np.zeros(2, np.uint32)}
    text = json.dumps({"version": 1, "metadata": False, "tree": tree_json, **record})
    return sc.save(tensors, {TREE_KEY: text})


def _all_three(**leaves):
    """A dict node holding w, s, k, with the given node replacing each named one."""
    nodes = {"w": {"leaf": "w", "kind": "array"}, "s": {"leaf": "s", "kind": "int"},
             "k": {"leaf": "k", "kind": "array"}}
    nodes.update(leaves)
    return {"dict": [[key, node] for key, node in nodes.items()]}


W, S, K = ({"leaf": n, "kind": "array"} for n in "wsk")

# (id, record tree, message fragment, modes that must refuse it). Modes: "np" plain NumPy
# load, "jax" plain JAX load, "flat" deserialize(requires_unflattening=False), "like" a
# load with a template of the right structure.
HOSTILE_RECORDS = [
    ("list-dict-key", {"dict": [[["a"], W], ["s", S], ["k", K]]}, r"\['a'\] cannot be a key", "np jax flat like"),
    ("object-dict-key", {"dict": [[{"a": 1}, W], ["s", S], ["k", K]]}, r"cannot be a key", "np jax flat like"),
    ("list-field-key", {"node": "T", "fields": [["k", ["a"], W], ["k", "s", S], ["k", "k", K]]},
     r"cannot be a key", "np jax flat like"),
    ("int-attribute", {"node": "T", "fields": [["a", 3, W], ["k", "s", S], ["k", "k", K]]},
     r"3 cannot be an attribute name", "np jax flat like"),
    ("bool-index", {"node": "T", "fields": [["i", True, W], ["k", "s", S], ["k", "k", K]]},
     r"True cannot be an index", "np jax flat like"),
    ("bad-field-kind", {"node": "T", "fields": [["z", "w", W], ["k", "s", S], ["k", "k", K]]},
     r"'fields' must be an array of", "np jax flat like"),
    ("short-field", {"node": "T", "fields": [["k", W]]}, r"'fields' must be an array of", "np jax flat like"),
    ("short-pair", {"dict": [["w"]]}, r"'dict' must be an array of \[key, node\] pairs", "np jax flat like"),
    ("int-over-vector", _all_three(w={"leaf": "w", "kind": "int"}),
     r"at \['w'\]: a 'int' leaf needs a 0-d tensor", "np jax like"),
    ("bool-over-vector", _all_three(w={"leaf": "w", "kind": "bool"}),
     r"at \['w'\]: a 'bool' leaf needs a 0-d tensor", "np jax like"),
    ("numpy-over-vector", _all_three(w={"leaf": "w", "kind": "numpy"}),
     r"at \['w'\]: a 'numpy' leaf needs a 0-d tensor", "np jax like"),
    ("float-over-int", _all_three(s={"leaf": "s", "kind": "float"}),
     r"at \['s'\]: a 'float' leaf needs a 0-d tensor of kind 'f'", "np jax like"),
    ("bool-over-int", _all_three(s={"leaf": "s", "kind": "bool"}), r"of kind 'b'", "np jax like"),
    ("unknown-key-impl", _all_three(k={"leaf": "k", "kind": "key:no_such_impl"}),
     r"at \['k'\]: tensor 'k' cannot be a 'key:no_such_impl' key", "jax"),
    ("key-impl-not-a-name", _all_three(k={"leaf": "k", "kind": "key:os.system"}),
     r"unknown leaf kind 'key:os.system'", "np jax flat like"),
    ("unknown-kind", _all_three(w={"leaf": "w", "kind": "pickle"}), r"unknown leaf kind 'pickle'", "np jax flat like"),
    ("kind-not-text", _all_three(w={"leaf": "w", "kind": 5}), r"unknown leaf kind 5", "np jax flat like"),
    ("name-not-text", _all_three(w={"leaf": 0, "kind": "array"}), r"'leaf' must be a string", "np jax flat like"),
    ("missing-tensor", _all_three(w={"leaf": "nope", "kind": "array"}),
     r"refers to tensor 'nope', which is not in the file", "np jax flat like"),
    ("tensor-twice", {"list": [W, W, S, K]}, r"at \[1\]: tensor 'w' is recorded at two places", "np jax flat like"),
    ("duplicate-key", {"dict": [["a", W], ["a", S], ["k", K]]}, r"key 'a' appears twice", "np jax flat like"),
    ("int-float-same-key", {"dict": [[1, W], [1.0, S], ["k", K]]}, r"key 1.0 appears twice", "np jax flat like"),
    ("infinite-key", {"dict": [[1e400, W], ["s", S], ["k", K]]}, r"inf cannot be a key", "np jax flat like"),
    ("list-not-array", {"list": "abc"}, r"'list' must be an array of nodes", "np jax flat like"),
    ("node-is-number", {"dict": [["w", 5]]}, r"at \['w'\]: a node must be null or an object", "np jax flat like"),
    ("unknown-tag", {"pickle": "os.system"}, r"at <root>: unknown node kind", "np jax flat like"),
    ("extra-keys", _all_three(w={"leaf": "w", "kind": "array", "exec": "x"}), r"has the keys", "np jax flat like"),
    ("var-type-not-text", {"var": 1, "value": None}, r"'var' must be a string", "np jax flat like"),
    ("skip-not-text", {"skip": ["x"]}, r"'skip' must be a string", "np jax flat like"),
]


@pytest.mark.parametrize(("tree_json", "fragment", "modes"),
                         [pytest.param(t, f, m, id=i) for i, t, f, m in HOSTILE_RECORDS])
def test_hostile_records_raise_tree_structure_error_naming_the_path(tree_json, fragment, modes):
    data = _hostile_file(tree_json)
    loads = {"np": lambda: sc.load_tree(data), "jax": lambda: sc.load_tree(data, framework="jax"),
             "flat": lambda: sc.deserialize(data, requires_unflattening=False),
             "like": lambda: sc.load_tree(data, like={"w": np.zeros(3, np.float32), "s": 0,
                                                      "k": np.zeros(2, np.uint32)})}
    for mode in modes.split():
        if mode in ("jax", "flat"):
            pytest.importorskip("jax")
        with pytest.raises(sc.TreeStructureError, match=fragment):
            loads[mode]()


@pytest.mark.parametrize(("record", "fragment"), [
    pytest.param({"version": True}, r"version True", id="bool-version"),
    pytest.param({"version": "1"}, r"version '1'", id="text-version"),
    pytest.param({"metadata": "yes"}, r"'metadata' entry must be true or false", id="metadata-not-bool"),
])
def test_hostile_record_envelopes(record, fragment):
    with pytest.raises(sc.TreeStructureError, match=fragment):
        sc.load_tree(_hostile_file(_all_three(), **record))


def _mutations():
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True),
                        st.sampled_from(["w", "s", "k", "a", "array", "int", "bool", "key:rbg",
                                         "dict", "list", "tuple", "node", "leaf", "var", "skip", "k", "i"]))
    # Small containers come first: in a key's place they are what breaks naive readers.
    small = st.sampled_from([[], {}, ["a"], [None], {"leaf": "w"}, {"dict": []}])
    values = st.recursive(st.one_of(small, scalars), lambda kids: st.one_of(
        st.lists(kids, max_size=3), st.dictionaries(st.sampled_from(
            ["leaf", "kind", "dict", "list", "tuple", "node", "fields", "var", "value", "skip"]), kids, max_size=2)),
        max_leaves=6)
    # (which place, what to do, a new value)
    return st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(["replace", "delete", "insert"]), values),
                    min_size=1, max_size=4)


def _places(obj, out, parent=None, key=None):
    out.append((parent, key))
    if isinstance(obj, dict):
        for k, v in obj.items():
            _places(v, out, obj, k)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _places(v, out, obj, i)
    return out


def _mutate(record, edits):
    for where, what, drawn in edits:
        value = json.loads(json.dumps(drawn))  # a fresh copy: no value shared between edits
        places = _places(record["tree"], [])
        parent, key = places[where % len(places)]
        if parent is None:
            record["tree"] = value
        elif what == "replace":
            parent[key] = value
        elif what == "delete":
            del parent[key]
        elif isinstance(parent, list):
            parent.insert(key, value)
        else:
            parent[f"{key}x"] = value
    return record


def test_hypothesis_mutated_records_raise_only_tree_structure_error():
    from hypothesis import given, settings

    tree = {"w": np.arange(3, dtype=np.float32), "n": [1, 2.5, True, None], "t": (np.uint8(3), {}),
            "e": [], "p": Point(np.ones(2, np.int32), None)}
    data = sc.save_tree(tree)
    header = sc.read_header(data)
    record = json.loads(header.raw_metadata[TREE_KEY])
    tensors = sc.load(data)
    loaders = [lambda d: sc.load_tree(d), lambda d: sc.load_tree(d, like=tree)]
    try:
        import jax  # noqa: F401
    except ImportError:  # pragma: no cover - jax is installed for the test suite
        pass
    else:
        loaders.append(lambda d: sc.load_tree(d, framework="jax"))

    @settings(max_examples=150)
    @given(_mutations())
    def check(edits):
        mutated = _mutate(json.loads(json.dumps(record)), edits)
        try:
            text = json.dumps(mutated)
        except ValueError:  # pragma: no cover - only JSON values are drawn
            return
        crafted = sc.save(tensors, {TREE_KEY: text})
        for load in loaders:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    load(crafted)
                except sc.TreeStructureError:
                    pass

    check()
