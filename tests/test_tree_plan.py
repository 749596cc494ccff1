"""load_tree / load_leaves plan before they read: every problem of a file (against its
record or a template) is raised before any tensor is read; PRNG keys are made in one
place with one error on both routes; save_tree checks names and metadata by the
writer's rules (one exception per fault)."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest

import safecodec as sc
from safecodec import HeaderError
from safecodec._header import name_fault
from safecodec._tree import MAX_TREE_DEPTH, TREE_KEY, load_leaves


class CountingFile(io.RawIOBase):
    """A seekable binary file over ``data`` that notes the byte range of every read."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self._buf = io.BytesIO(data)
        self.ranges: list[tuple[int, int]] = []

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._buf.seek(pos, whence)

    def tell(self) -> int:
        return self._buf.tell()

    def readinto(self, b) -> int:
        start = self._buf.tell()
        n = self._buf.readinto(b)
        self.ranges.append((start, start + n))
        return n


def tensor_reads(data: bytes, load) -> tuple[list[tuple[int, int]], BaseException | None]:
    """The reads ``load(file)`` makes at or past the data section, and what it raised.
    (The first read may take a whole small file with the header: it starts at 0.)"""
    start = sc.read_header(data).data_start
    f = CountingFile(data)
    try:
        load(f)
    except sc.SafecodecError as exc:
        raised: BaseException | None = exc
    else:
        raised = None
    return [r for r in f.ranges if r[0] >= start], raised


TREE = {"a": np.arange(6, dtype=np.float32), "b": [np.int8(3), 2.5], "c": np.ones(3, np.int32)}


def _with_record(data: bytes, edit) -> bytes:
    """``data`` (a save_tree file) with its recorded structure passed through ``edit``."""
    record = json.loads(sc.read_header(data).raw_metadata[TREE_KEY])
    edit(record["tree"])
    return sc.save(sc.load(data), {TREE_KEY: json.dumps(record)})


def _set_kind(name: str, kind: str):
    def edit(node):
        for key, child in node["dict"]:
            if key == name:
                child["kind"] = kind
    return edit


def test_a_good_load_reads_every_tensor():  # the counting above can see reads
    data = sc.save_tree(TREE)
    reads, raised = tensor_reads(data, sc.load_tree)
    assert raised is None and len(reads) >= 1
    reads, raised = tensor_reads(data, lambda f: sc.load_tree(f, like=TREE))
    assert raised is None and len(reads) >= 1


# (id, file, load, message fragment): each fault is found after the first leaf, whose
# tensor the old loader had already read when it raised.
FAULTS = [
    ("template-mismatch", sc.save_tree(TREE),
     lambda f: sc.load_tree(f, like={**TREE, "c": np.ones(4, np.int32)}),
     r"1 mismatched.*\['c'\]: template int32\[4\], file 'c' int32\[3\]"),
    ("template-missing-and-unexpected", sc.save_tree(TREE),
     lambda f: sc.load_tree(f, like={"a": TREE["a"], "b": TREE["b"], "z": np.ones(1)}),
     r"1 missing, 1 unexpected, 0 mismatched"),
    ("template-holds-none", sc.save_tree(TREE),
     lambda f: sc.load_tree(f, like={**TREE, "c": None}), r"\['c'\]: template holds None"),
    ("record-scalar-over-vector", _with_record(sc.save_tree(TREE), _set_kind("c", "int")),
     sc.load_tree, r"at \['c'\]: a 'int' leaf needs a 0-d tensor"),
    ("record-scalar-over-vector-like", _with_record(sc.save_tree(TREE), _set_kind("c", "int")),
     lambda f: sc.load_tree(f, like=TREE), r"at \['c'\]: a 'int' leaf needs a 0-d tensor"),
    ("record-misses-a-tensor", sc.save({**sc.load(sc.save_tree(TREE)), "z": np.ones(1)},
                                        sc.read_header(sc.save_tree(TREE)).raw_metadata),
     sc.load_tree, r"1 tensor\(s\) its recorded tree structure does not mention \('z'\)"),
    ("names-do-not-nest", sc.save({"a": np.ones(2), "b": np.ones(2), "b.c": np.ones(2)}),
     sc.load_tree, r"'b' is a tensor and a prefix of"),
]


@pytest.mark.parametrize(("data", "load", "fragment"),
                         [pytest.param(d, l_, m, id=i) for i, d, l_, m in FAULTS])
def test_problems_are_raised_before_any_tensor_is_read(data, load, fragment):
    reads, raised = tensor_reads(data, load)
    assert isinstance(raised, sc.TreeStructureError), raised
    assert re.search(fragment, str(raised), re.S), str(raised)
    assert reads == []


def test_load_leaves_refuses_an_unmentioned_tensor_before_reading():
    pytest.importorskip("jax")  # load_leaves gives jax arrays
    saved = sc.save_tree({"a": TREE["a"], "c": TREE["c"]})  # no 64-bit leaf for JAX to narrow
    data = sc.save({**sc.load(saved), "z": np.ones(1, np.float32)}, sc.read_header(saved).raw_metadata)
    reads, raised = tensor_reads(data, load_leaves)
    assert isinstance(raised, sc.TreeStructureError)
    assert "does not mention ('z')" in str(raised) and reads == []
    reads, raised = tensor_reads(saved, load_leaves)
    assert raised is None and reads


def test_too_deeply_nested_names_are_refused_before_reading():
    name = ".".join(["a"] * (MAX_TREE_DEPTH + 1))
    data = sc.save({"w": np.ones(2), name: np.ones(2)})
    reads, raised = tensor_reads(data, sc.load_tree)
    assert isinstance(raised, sc.TreeStructureError)
    assert f"nests deeper than {MAX_TREE_DEPTH} levels" in str(raised) and reads == []
    ok = ".".join(["a"] * MAX_TREE_DEPTH)
    tree = sc.load_tree(sc.save({ok: np.ones(2)}))
    for _ in range(MAX_TREE_DEPTH):
        tree = tree["a"]
    assert tree.tolist() == [1.0, 1.0]


# ----------------------------------------------------------------------------- PRNG keys


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_keys_come_back_on_both_routes(impl):
    jax = pytest.importorskip("jax")
    key = jax.random.key(7, impl=impl)
    data = sc.save_tree({"k": key, "w": np.ones(2, np.float32)})
    plain = sc.load_tree(data, framework="jax")["k"]
    spec = sc.load_tree(data, like={"k": jax.ShapeDtypeStruct(key.shape, key.dtype),
                                    "w": np.zeros(2, np.float32)})["k"]
    array = sc.load_tree(data, like={"k": jax.random.key(0, impl=impl),
                                     "w": np.zeros(2, np.float32)})["k"]
    for out in (plain, spec, array):
        assert str(jax.random.key_impl(out)) == impl
        np.testing.assert_array_equal(jax.random.key_data(out), jax.random.key_data(key))
    raw = sc.load_tree(data, framework="numpy")["k"]
    raw_like = sc.load_tree(data, framework="numpy", like={"k": key, "w": np.zeros(2, np.float32)})["k"]
    for out in (raw, raw_like):
        assert isinstance(out, np.ndarray)
        np.testing.assert_array_equal(out, np.asarray(jax.random.key_data(key)))


@pytest.mark.parametrize(("kind", "fragment"), [
    ("key:no_such_impl", r"at \['k'\]: tensor 'k' cannot be a 'key:no_such_impl' key \(ValueError"),
    ("key:rbg", r"at \['k'\]: tensor 'k' cannot be a 'key:rbg' key \(TypeError"),  # data of 2 words
])
def test_a_bad_key_kind_gives_one_error_on_both_routes_before_reading(kind, fragment):
    jax = pytest.importorskip("jax")
    data = _with_record(sc.save_tree({"k": jax.random.key(1), "w": np.ones(2, np.float32)}),
                        _set_kind("k", kind))
    loads = [lambda f: sc.load_tree(f, framework="jax"),
             lambda f: sc.load_tree(f, like={"k": jax.random.key(0), "w": np.zeros(2, np.float32)}),
             lambda f: sc.load_tree(f, like={"k": jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
                                             "w": np.zeros(2, np.float32)})]
    messages = set()
    for load in loads:
        reads, raised = tensor_reads(data, load)
        assert isinstance(raised, sc.TreeStructureError), raised
        assert re.search(fragment, str(raised)), str(raised)
        assert reads == []
        messages.add(str(raised))
    assert len(messages) == 1
    # NumPy outputs take the raw key data: no implementation is needed.
    assert sc.load_tree(data, framework="numpy")["k"].shape == (2,)


def test_a_key_of_another_implementation_is_a_template_mismatch():
    jax = pytest.importorskip("jax")
    data = sc.save_tree({"k": jax.random.key(1, impl="rbg")})  # the same data shape as unsafe_rbg
    with pytest.raises(sc.TreeStructureError,
                       match=r"\['k'\]: template 'key:unsafe_rbg' key, file 'k' holds a 'key:rbg' key"):
        sc.load_tree(data, like={"k": jax.random.key(0, impl="unsafe_rbg")})


# ----------------------------------------------------------------------------- validation

W = {"w": np.ones(1, np.float32)}

# (id, metadata, message fragment): each refused by the writer and by save_tree alike.
METADATA_FAULTS = [
    ("not-a-mapping", [("k", "v")], "metadata must be a mapping of str to str, got list"),
    ("int-value", {"k": 1}, "metadata must map str to str, got str 'k' -> int 1"),
    ("int-key", {2: "v"}, "metadata must map str to str, got int 2"),
    ("nul-key", {"k\x00": "v"}, "contains a NUL character"),
    ("nul-value", {"k": "v\x00"}, "contains a NUL character"),
    ("lone-surrogate", {"k": "\ud800"}, "lone surrogate"),
    ("reserved-keys", {"safecodec.x": "1", "ok": "v", "safecodec.y": "2"},
     "reserved for safecodec: 'safecodec.x', 'safecodec.y'"),
]


@pytest.mark.parametrize(("metadata", "fragment"),
                         [pytest.param(m, f, id=i) for i, m, f in METADATA_FAULTS])
def test_metadata_faults_raise_the_same_error_from_the_writer_and_save_tree(metadata, fragment):
    raised = []
    for write in (lambda: sc.save(W, metadata), lambda: sc.save_tree(W, metadata=metadata)):
        with pytest.raises(HeaderError) as info:
            write()
        assert fragment in str(info.value)
        raised.append((type(info.value), str(info.value)))
    assert raised[0] == raised[1]


def test_save_tree_also_refuses_the_keys_safecodec_writes_itself():
    md = {TREE_KEY: '{"version":1,"tree":null}'}
    assert sc.read_header(sc.save(W, md)).raw_metadata == md  # the writer carries them over
    with pytest.raises(HeaderError, match=r"reserved for safecodec: 'safecodec\.tree'"):
        sc.save_tree(W, metadata=md)
    with pytest.raises(HeaderError, match=r"reserved for safecodec: 'safecodec\.tree'"):
        sc.save_tree(W, metadata=md, remap=object())  # refused before the rules are asked


@pytest.mark.parametrize("key", ["__metadata__", "nul\x00key", "plain", "é", "a.b"])
def test_save_tree_names_follow_the_writers_name_rule(key):
    """A key the writer would refuse as a tensor name gets a valid name; others keep theirs."""
    fault = name_fault(key)
    if fault is not None:
        with pytest.raises(HeaderError) as info:
            sc.save({key: np.ones(1)})
        assert str(info.value) == fault
    data = sc.save_tree({key: np.ones(1)})
    (name,) = sc.read_header(data).tensors
    assert name_fault(name) is None
    assert (name == key) == (fault is None)
    assert list(sc.load_tree(data)) == [key]


def test_a_key_that_is_not_valid_unicode_is_refused_naming_its_path():
    # Neither a tensor name nor the recorded structure (JSON in the header) can hold it.
    with pytest.raises(HeaderError, match="lone surrogate"):
        sc.save({"half\ud800": np.ones(1)})
    with pytest.raises(sc.TreeStructureError,
                       match=r"dict key 'half\\ud800' at \['p'\] cannot be recorded: .*lone surrogate"):
        sc.save_tree({"p": {"half\ud800": np.ones(1)}})
