"""The recorded tree structure: the JSON stored under the metadata key ``safecodec.tree``.

Names alone lose information (lists, tuples, ``None``, empty containers, integer keys,
keys that contain ``.``, scalars), so a saved tree also records its structure. The
record is data, never code: it names container kinds and keys, plus the *name* of each
custom node's class for information only. Nothing in a record ever makes safecodec
import or instantiate a class.

Version 1 (``{"version": 1, "metadata": bool, "tree": NODE}``)::

    NODE := null                                      None
          | {"leaf": NAME, "kind": KIND}              a stored array or scalar
          | {"skip": TYPE_NAME}                       a leaf that was not stored
          | {"dict": [[KEY, NODE], ...]}              dict, insertion order
          | {"list": [NODE, ...]} | {"tuple": [NODE, ...]}
          | {"node": TYPE_NAME, "fields": [[K, KEY, NODE], ...]}   any other container;
                                                      K: "k" key, "i" index, "a" attribute
          | {"var": TYPE_NAME, "value": NODE}         a variable wrapper (NNX Variable,
                                                      Objax variable): adds no name part
    KIND := "array" | "numpy" | "int" | "float" | "bool" | "complex" | "key:<jax PRNG impl>"
    KEY  := JSON string, integer, boolean, null or finite number ("a": string, "i": integer)

``"metadata"`` says whether the user gave metadata (the writer always needs
``__metadata__`` to hold the record). Every leaf names a distinct tensor; sibling keys
are distinct. Scalar kinds (``numpy``, ``int``, ``float``, ``bool``, ``complex``) are
0-d tensors; ``int``/``float``/``bool``/``complex`` of an integer / floating / bool /
complex dtype.

This module is the codec: :func:`decode_record` turns the JSON into typed nodes
(:class:`Leaf`, :class:`Skip`, :class:`Var`, :class:`Container`, ``None``), checking
everything above and raising :class:`~safecodec.TreeStructureError` naming the path of
the first fault; :func:`encode_record` writes them back. Every other use of a record
goes through the one walker, :func:`walk`, with a :class:`RecordVisitor`. No I/O, no jax.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar, Union

import numpy as np

from ._errors import TreeStructureError
from ._header import TREE_KEY, has_lone_surrogate
from ._treepath import Path, PathElem, join_path, match_key, render_path

__all__ = [
    "ARRAY",
    "KEY_KIND_PREFIX",
    "LEAF_KINDS",
    "MAX_RECORD_DEPTH",
    "MAX_TREE_DEPTH",
    "NUMPY_SCALAR",
    "OBJAX_TYPE_SEPARATOR",
    "PY_SCALARS",
    "SCALAR_DTYPE_KINDS",
    "TREE_VERSION",
    "Container",
    "Leaf",
    "Node",
    "PathEntry",
    "RecordVisitor",
    "Skip",
    "Var",
    "check_key",
    "check_leaf_tensor",
    "decode_record",
    "encode_record",
    "key_impl",
    "key_kind",
    "name_leaves",
    "path_entries",
    "record_leaves",
    "walk",
]

#: Version of the recorded structure; readers refuse versions they do not know.
TREE_VERSION: Final = 1
#: Deepest tree recorded. Each level is about three JSON levels in the record, and the
#: record is read back recursively, so this keeps reading far from Python's recursion
#: limit: no file can make load_tree raise RecursionError.
MAX_TREE_DEPTH: Final = 200
#: Deepest record read: :data:`MAX_TREE_DEPTH` plus a few variable wrappers, which add a
#: record level but no tree level.
MAX_RECORD_DEPTH: Final = MAX_TREE_DEPTH + 16
#: Suffix separator safejax appended to Objax variable names (``name::TrainVar``).
OBJAX_TYPE_SEPARATOR: Final = "::"
# The leaf kinds (KIND in the module docstring): the one definition, used by the tree
# writer and loader (_tree) and by the type cascade that classifies live leaves (_pytree).
#: An array (NumPy or JAX), stored as it is.
ARRAY: Final = "array"
#: A NumPy scalar (``np.float32(1.0)``...): a 0-d tensor, given back as a NumPy scalar.
NUMPY_SCALAR: Final = "numpy"
#: Python scalar kinds -> their type: 0-d tensors, given back as that type. In this order
#: wherever a value is classified: a bool is also an int.
PY_SCALARS: Final[dict[str, type]] = {"bool": bool, "int": int, "float": float, "complex": complex}
#: NumPy dtype kinds each Python scalar kind may be stored as.
SCALAR_DTYPE_KINDS: Final = {"bool": "b", "int": "iu", "float": "f", "complex": "c"}
#: Leaf kinds besides ``key:<impl>``.
LEAF_KINDS: Final = frozenset({ARRAY, NUMPY_SCALAR, *PY_SCALARS})
#: Prefix of a JAX PRNG key leaf's kind; the rest names the key implementation.
KEY_KIND_PREFIX: Final = "key:"
# A PRNG implementation name as JAX spells them (threefry2x32, rbg, unsafe_rbg).
_IMPL_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# How much of a bad node a message shows.
_SHOWN: Final = 120
# "No such key" (None is a valid key).
_NOTHING: Final = object()


def key_kind(impl: object) -> str:
    """The leaf kind of a JAX PRNG key of implementation ``impl``: its name, or what JAX
    gives for it (``jax.random.key_impl``'s spec, whose ``str`` is the name; a key
    dtype's implementation, whose ``name`` is).

    Examples:
        >>> key_kind("threefry2x32")
        'key:threefry2x32'
    """
    return f"{KEY_KIND_PREFIX}{getattr(impl, 'name', impl)}"


def key_impl(kind: str) -> str | None:
    """The PRNG implementation a key leaf kind names; None for the other kinds.

    Examples:
        >>> key_impl("key:rbg"), key_impl("array")
        ('rbg', None)
    """
    return kind[len(KEY_KIND_PREFIX):] if kind.startswith(KEY_KIND_PREFIX) else None


@dataclass(frozen=True)
class Leaf:
    """A stored leaf: tensor ``name``, leaf ``kind`` (see the module docstring)."""

    name: str
    kind: str = ARRAY


@dataclass(frozen=True)
class Skip:
    """A leaf that was not stored (a function, a string...); ``type_name`` for information."""

    type_name: str


@dataclass(frozen=True)
class Var:
    """A variable wrapper around ``value``; adds no path element."""

    type_name: str
    value: Node


@dataclass(frozen=True)
class Container:
    """``kind`` "dict", "list", "tuple" or "node" (then ``type_name``), with its children."""

    kind: str
    children: tuple[tuple[PathElem, Node], ...]
    type_name: str = ""


Node = Union[Leaf, Skip, Var, Container, None]  # noqa: UP007 - a runtime alias
T = TypeVar("T")


# ----------------------------------------------------------------------------- the walker


class RecordVisitor(Generic[T]):
    """What :func:`walk` calls at each node; subclasses override what they need."""

    def none(self, path: Path) -> T:
        raise NotImplementedError

    def leaf(self, path: Path, leaf: Leaf, var: Var | None) -> T:
        """A stored leaf; ``var`` is the variable wrapping it directly, if any."""
        raise NotImplementedError

    def skip(self, path: Path, skip: Skip) -> T:
        raise NotImplementedError

    def var(self, path: Path, var: Var, value: T) -> T:
        return value

    def container(self, path: Path, node: Container, children: list[tuple[PathElem, T]]) -> T:
        raise NotImplementedError


def walk(node: Node, visitor: RecordVisitor[T], path: Path = ()) -> T:
    """Visit a record depth first, children in order; containers after their children."""
    return _walk(node, visitor, path, None)


def _walk(node: Node, visitor: RecordVisitor[T], path: Path, var: Var | None) -> T:
    if node is None:
        return visitor.none(path)
    if isinstance(node, Leaf):
        return visitor.leaf(path, node, var)
    if isinstance(node, Skip):
        return visitor.skip(path, node)
    if isinstance(node, Var):
        return visitor.var(path, node, _walk(node.value, visitor, path, node))
    done = [(elem, _walk(child, visitor, (*path, elem), None)) for elem, child in node.children]
    return visitor.container(path, node, done)


# ----------------------------------------------------------------------------- encode


def check_key(key: Any, path: Path) -> Any:
    """A dict key as it will be recorded: str, int, bool, None or a finite float
    (NumPy integers become int).

    Raises:
        TreeStructureError: JSON cannot record ``key`` exactly (names the path).
    """
    if isinstance(key, str) and not key.isascii() and has_lone_surrogate(key):
        raise TreeStructureError(
            f"dict key {key!r:.60} at {render_path(path)} cannot be recorded: it is not valid "
            "Unicode (lone surrogate)"
        )
    if key is None or isinstance(key, str | bool | int):
        return key
    if isinstance(key, float) and math.isfinite(key):
        return key
    if isinstance(key, np.integer):
        return int(key)
    raise TreeStructureError(
        f"dict key {key!r} ({type(key).__name__}) at {render_path(path)} cannot be recorded; "
        "use str, int, bool, None or finite float keys"
    )


class _Renamer(RecordVisitor[Node]):
    def __init__(self, names: Iterator[str]) -> None:
        self.names = names

    def none(self, path: Path) -> Node:
        return None

    def leaf(self, path: Path, leaf: Leaf, var: Var | None) -> Node:
        return Leaf(next(self.names), leaf.kind)

    def skip(self, path: Path, skip: Skip) -> Node:
        return skip

    def var(self, path: Path, var: Var, value: Node) -> Node:
        return Var(var.type_name, value)

    def container(self, path: Path, node: Container, children: list[tuple[PathElem, Node]]) -> Node:
        return Container(node.kind, tuple(children), node.type_name)


def name_leaves(root: Node, names: Sequence[str]) -> Node:
    """``root`` with its leaves renamed, in walk order, to ``names``."""
    it = iter(names)
    out = walk(root, _Renamer(it))
    if next(it, None) is not None:
        raise TreeStructureError("internal error: more tensor names than leaves")
    return out


class _ToJson(RecordVisitor[Any]):
    def none(self, path: Path) -> Any:
        return None

    def leaf(self, path: Path, leaf: Leaf, var: Var | None) -> Any:
        return {"leaf": leaf.name, "kind": leaf.kind}

    def skip(self, path: Path, skip: Skip) -> Any:
        return {"skip": skip.type_name}

    def var(self, path: Path, var: Var, value: Any) -> Any:
        return {"var": var.type_name, "value": value}

    def container(self, path: Path, node: Container, children: list[tuple[PathElem, Any]]) -> Any:
        if node.kind == "dict":
            return {"dict": [[key, child] for (_, key), child in children]}
        if node.kind in ("list", "tuple"):
            return {node.kind: [child for _, child in children]}
        return {"node": node.type_name, "fields": [[k, key, child] for (k, key), child in children]}


def encode_record(root: Node, has_metadata: bool) -> str:
    """The JSON text stored under ``safecodec.tree`` for a tree whose leaves are named."""
    record = {"version": TREE_VERSION, "metadata": has_metadata, "tree": walk(root, _ToJson())}
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


# ----------------------------------------------------------------------------- decode


def _fault(path: Path, why: str, node: Any) -> TreeStructureError:
    try:
        shown = json.dumps(node)[:_SHOWN]
    except (TypeError, ValueError, RecursionError):  # pragma: no cover - from JSON, dumpable
        shown = "?"
    return TreeStructureError(
        f"the recorded tree structure is inconsistent at {render_path(path)}: {why}: {shown}")


def _recordable(key: Any) -> bool:
    return key is None or isinstance(key, str | bool | int) or (
        isinstance(key, float) and math.isfinite(key))


class _Decoder:
    def __init__(self) -> None:
        self.names: set[str] = set()

    def node(self, obj: Any, path: Path, depth: int) -> Node:
        if depth > MAX_RECORD_DEPTH:
            raise TreeStructureError(
                f"the recorded tree structure is nested deeper than {MAX_TREE_DEPTH} levels")
        if obj is None:
            return None
        if not isinstance(obj, dict):
            raise _fault(path, "a node must be null or an object", obj)
        for tag, decode in self._TAGS:
            if tag in obj:
                return decode(self, obj, path, depth)
        raise _fault(path, "unknown node kind", obj)

    @staticmethod
    def _keys(obj: dict[str, Any], path: Path, required: set[str], optional: frozenset[str] = frozenset()) -> None:
        extra = set(obj) - required - optional
        if extra or not required <= set(obj):
            raise _fault(path, f"a {'/'.join(sorted(required))} node has the keys "
                               f"{sorted(required | optional)}", obj)

    @staticmethod
    def _text(obj: dict[str, Any], key: str, path: Path) -> str:
        value = obj[key]
        if not isinstance(value, str):
            raise _fault(path, f"{key!r} must be a string", obj)
        return value

    def _leaf(self, obj: dict[str, Any], path: Path, depth: int) -> Node:
        self._keys(obj, path, {"leaf"}, frozenset({"kind"}))
        name = self._text(obj, "leaf", path)
        kind = obj.get("kind", ARRAY)
        impl = key_impl(kind) if isinstance(kind, str) else None
        if not isinstance(kind, str) or not (kind in LEAF_KINDS or (
                impl is not None and _IMPL_NAME.fullmatch(impl))):
            raise _fault(path, f"unknown leaf kind {kind!r}", obj)
        if name in self.names:
            raise _fault(path, f"tensor {name!r} is recorded at two places", obj)
        self.names.add(name)
        return Leaf(name, kind)

    def _skip(self, obj: dict[str, Any], path: Path, depth: int) -> Node:
        self._keys(obj, path, {"skip"})
        return Skip(self._text(obj, "skip", path))

    def _var(self, obj: dict[str, Any], path: Path, depth: int) -> Node:
        self._keys(obj, path, {"var", "value"})
        return Var(self._text(obj, "var", path), self.node(obj["value"], path, depth + 1))

    def _sequence(self, obj: dict[str, Any], path: Path, depth: int) -> Node:
        kind = "list" if "list" in obj else "tuple"
        self._keys(obj, path, {kind})
        items = obj[kind]
        if not isinstance(items, list):
            raise _fault(path, f"{kind!r} must be an array of nodes", obj)
        return Container(kind, tuple((("i", i), self.node(c, (*path, ("i", i)), depth + 1))
                                     for i, c in enumerate(items)))

    def _dict(self, obj: dict[str, Any], path: Path, depth: int) -> Node:
        self._keys(obj, path, {"dict"})
        pairs = obj["dict"]
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise _fault(path, "'dict' must be an array of [key, node] pairs", obj)
        return Container("dict", self._children([("k", k, c) for k, c in pairs], obj, path, depth))

    def _node(self, obj: dict[str, Any], path: Path, depth: int) -> Node:
        self._keys(obj, path, {"node", "fields"})
        name = self._text(obj, "node", path)
        fields = obj["fields"]
        if not isinstance(fields, list) or not all(
                isinstance(f, list) and len(f) == 3 and f[0] in ("k", "i", "a") for f in fields):
            raise _fault(path, "'fields' must be an array of [\"k\"|\"i\"|\"a\", key, node]", obj)
        return Container("node", self._children([tuple(f) for f in fields], obj, path, depth), name)

    def _children(self, triples: list[Any], obj: Any, path: Path,
                  depth: int) -> tuple[tuple[PathElem, Node], ...]:
        seen: set[Any] = set()
        out = []
        for k, key, child in triples:
            ok = _recordable(key) and (k != "a" or isinstance(key, str)) and (
                k != "i" or (isinstance(key, int) and not isinstance(key, bool)))
            if not ok:
                what = {"a": "an attribute name", "i": "an index"}.get(k, "a key")
                raise _fault(path, f"{key!r} cannot be {what}", obj)
            # Distinct as the rebuilt tree sees them: Python's dict equality, under which
            # 1 == True == 1.0 and 0 == False == -0.0 (a dict would merge them and drop a
            # leaf); this also covers match_key's, which ignores the kind ("k" "w" and "a"
            # "w" name the same place in a template).
            clash = next((s for s in seen if s == key), _NOTHING) if key in seen else _NOTHING
            if clash is not _NOTHING:
                also = "" if type(clash) is type(key) else (
                    f" (as {clash!r}: equal keys in Python, a dict cannot hold both)")
                raise _fault(path, f"key {key!r} appears twice{also}", obj)
            seen.add(key)
            elem = (str(k), key)
            out.append((elem, self.node(child, (*path, elem), depth + 1)))
        return tuple(out)

    _TAGS: Final = (("leaf", _leaf), ("skip", _skip), ("var", _var), ("dict", _dict),
                    ("list", _sequence), ("tuple", _sequence), ("node", _node))


def decode_record(text: str) -> Node:
    """The typed tree of a record (the JSON text under ``safecodec.tree``), fully checked.

    Raises:
        TreeStructureError: Not JSON, an unknown version, or any node that breaks the
            rules of the module docstring (the message names its path and shows it).
    """
    try:
        record = json.loads(text)
    except ValueError as exc:
        raise TreeStructureError(f"the recorded tree structure ({TREE_KEY!r}) is not valid JSON: {exc}") from None
    except RecursionError:
        raise TreeStructureError(
            f"the recorded tree structure is nested deeper than {MAX_TREE_DEPTH} levels") from None
    if not isinstance(record, dict) or "tree" not in record:
        raise TreeStructureError(f"the recorded tree structure ({TREE_KEY!r}) has no 'tree' entry")
    version = record.get("version")
    if version != TREE_VERSION or type(version) is not int:
        raise TreeStructureError(
            f"the recorded tree structure has version {version!r:.40}; this safecodec reads "
            f"version {TREE_VERSION}; upgrade safecodec"
        )
    if not isinstance(record.get("metadata", False), bool):
        raise TreeStructureError("the recorded tree structure's 'metadata' entry must be true or false")
    return _Decoder().node(record["tree"], (), 0)


def check_leaf_tensor(leaf: Leaf, shape: Sequence[int], dtype: np.dtype[Any], path: Path) -> None:
    """Check that the tensor a leaf names can hold its kind (scalars are 0-d, of a dtype
    of their kind).

    Raises:
        TreeStructureError: Names the path, the kind and the tensor's shape and dtype.
    """
    if leaf.kind == ARRAY or key_impl(leaf.kind) is not None:
        return
    wanted = SCALAR_DTYPE_KINDS.get(leaf.kind)
    if tuple(shape) != () or (wanted is not None and np.dtype(dtype).kind not in wanted):
        raise TreeStructureError(
            f"the recorded tree structure is inconsistent at {render_path(path)}: a {leaf.kind!r} "
            f"leaf needs a 0-d tensor{' of kind ' + repr(wanted) if wanted else ''}; tensor "
            f"{leaf.name!r} is {np.dtype(dtype).name}{list(shape)}"
        )


# ----------------------------------------------------------------------------- views


@dataclass(frozen=True)
class PathEntry:
    """What a record holds at one path: ``kind`` "leaf" (tensor ``name``, its ``leaf``
    node), "skip", "none" or "empty" (an empty container)."""

    kind: str
    name: str = ""
    leaf: Leaf | None = None


class _Entries(RecordVisitor[None]):
    def __init__(self) -> None:
        self.out: dict[tuple[Any, ...], PathEntry] = {}

    def none(self, path: Path) -> None:
        self.out[match_key(path)] = PathEntry("none")

    def leaf(self, path: Path, leaf: Leaf, var: Var | None) -> None:
        self.out[match_key(path)] = PathEntry("leaf", leaf.name, leaf)

    def skip(self, path: Path, skip: Skip) -> None:
        self.out[match_key(path)] = PathEntry("skip")

    def container(self, path: Path, node: Container, children: list[tuple[PathElem, None]]) -> None:
        if not children:
            self.out[match_key(path)] = PathEntry("empty")


def path_entries(root: Node) -> dict[tuple[Any, ...], PathEntry]:
    """:func:`~safecodec._treepath.match_key` of each path -> what the record holds there
    (leaves, skipped leaves, ``None`` and empty containers)."""
    visitor = _Entries()
    walk(root, visitor)
    return visitor.out


class _Leaves(RecordVisitor[None]):
    def __init__(self) -> None:
        self.out: list[tuple[str, str, str | None]] = []

    def none(self, path: Path) -> None:
        return None

    def leaf(self, path: Path, leaf: Leaf, var: Var | None) -> None:
        self.out.append((leaf.name, join_path(path), var.type_name if var else None))

    def skip(self, path: Path, skip: Skip) -> None:
        return None

    def container(self, path: Path, node: Container, children: list[tuple[PathElem, None]]) -> None:
        return None


def record_leaves(root: Node) -> list[tuple[str, str, str | None]]:
    """``(tensor name, .-joined path, wrapping variable type or None)`` per stored leaf,
    in saved order."""
    visitor = _Leaves()
    walk(root, visitor)
    return visitor.out
