"""Lossless pytrees in safetensors files: :func:`save_tree` and :func:`load_tree`.

A tree is flattened into one tensor per array leaf. Tensor names are the keys on the path
joined with ``.`` (``{"params": {"Dense_0": {"kernel": w}}}`` gives
``"params.Dense_0.kernel"``), which is exactly what
``safetensors.flax.save_file(flax.traverse_util.flatten_dict(params, sep="."))`` writes,
so files go both ways between the two.

Names alone lose information (lists, tuples, ``None``, empty containers, integer keys,
keys that contain ``.``, scalars), so the structure is also recorded, as JSON, in the
file's metadata under the key :data:`TREE_KEY`. Every metadata key that starts with
:data:`RESERVED_PREFIX` belongs to safecodec: user metadata may not use it, and readers
here hide it, so metadata comes back exactly as the user wrote it.

The recorded structure is data, never code: it names container kinds (dict, list, tuple,
custom node) and keys, plus the *name* of each custom node's class for information only.
Loading without a template gives dicts for custom nodes (namedtuples, dataclasses,
Equinox modules, NNX states...); nothing in a file ever makes safecodec import or
instantiate a class. To get the original types back, pass ``like=`` a template of the
same structure (the model itself, its state, or a tree of ``jax.ShapeDtypeStruct``).

Leaves that are not arrays or scalars (an Equinox module's activation function, strings,
arbitrary objects) are not stored; their paths are recorded. ``like=`` supplies them on
load; without it they come back as ``None`` with one :class:`SkippedLeavesWarning`.

Recorded structure, version 1 (``{"version": 1, "metadata": bool, "tree": NODE}``)::

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
    KEY  := JSON string, integer, boolean, null or finite number
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from ._dtypes import caller_stacklevel, code_for_numpy
from ._errors import DtypeError, SafecodecError, TreeStructureError

__all__ = [
    "RESERVED_PREFIX",
    "TREE_KEY",
    "SkippedLeavesWarning",
    "load_tree",
    "save_tree",
    "split_metadata",
]

#: Metadata keys starting with this belong to safecodec (hidden from user metadata on read).
RESERVED_PREFIX: Final = "safecodec."
#: The metadata key holding the recorded tree structure (JSON).
TREE_KEY: Final = "safecodec.tree"
#: Version of the recorded structure; readers refuse versions they do not know.
TREE_VERSION: Final = 1
#: Suffix separator safejax appended to Objax variable names (``name::TrainVar``).
OBJAX_TYPE_SEPARATOR: Final = "::"

_JAX_FRAMEWORKS: Final = frozenset({"jax", "flax"})
_NUMPY_FRAMEWORKS: Final = frozenset({"numpy", "np"})
# How many problems a TreeStructureError lists before summarising the rest.
_MAX_LISTED: Final = 200
#: Deepest tree recorded. Each level is about three JSON levels in the record, and the
#: record is read back recursively, so this keeps reading far from Python's recursion
#: limit: no file can make load_tree raise RecursionError.
MAX_TREE_DEPTH: Final = 200


class SkippedLeavesWarning(UserWarning):
    """Some leaves of a saved tree were not arrays, so they were not stored and come back
    as ``None`` (pass ``like=`` to supply them)."""


# ----------------------------------------------------------------------------- paths

# A path element: (kind, key). kind "k" mapping key, "i" sequence index, "a" attribute.
PathElem = tuple[str, Any]
Path = tuple[PathElem, ...]


def render_path(path: Path) -> str:
    """A path as Python-like text: ``['params']['Dense_0'].kernel[0]``; ``<root>`` if empty."""
    if not path:
        return "<root>"
    out = []
    for kind, key in path:
        out.append(f".{key}" if kind == "a" else f"[{key!r}]")
    return "".join(out)


def _join(path: Path) -> str:
    """The tensor name of a path: keys joined with ``.`` (flax ``flatten_dict`` style)."""
    return ".".join(str(key) for _, key in path)


def _match_key(path: Path) -> tuple[Any, ...]:
    """Keys only (kinds ignored), so a template's attribute ``weight`` matches a saved dict
    key ``'weight'``. bool keys are kept apart from int keys 0/1."""
    return tuple((type(k) is bool, k) for _, k in path)


# ----------------------------------------------------------------------------- leaf kinds


def _jax() -> Any:
    """The jax module if it has been imported (a jax object cannot exist otherwise)."""
    return sys.modules.get("jax")


def _is_jax_array(x: Any) -> bool:
    jax = _jax()
    return jax is not None and isinstance(x, jax.Array)


def _is_shape_dtype_struct(x: Any) -> bool:
    jax = _jax()
    return jax is not None and isinstance(x, jax.ShapeDtypeStruct)


def _is_prng_key(x: Any) -> bool:
    jax = _jax()
    if jax is None or not hasattr(x, "dtype"):
        return False
    try:
        return bool(jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key))
    except TypeError:
        return False


def _scalar_kind(x: Any) -> str | None:
    """The leaf kind of a stored scalar/array, or None when ``x`` is not storable."""
    if isinstance(x, np.ndarray):
        return "array"
    if isinstance(x, np.generic):
        return "numpy"
    if isinstance(x, bool):
        return "bool"
    if isinstance(x, int):
        return "int"
    if isinstance(x, float):
        return "float"
    if isinstance(x, complex):
        return "complex"
    if _is_jax_array(x):
        return "array"
    return None


# ----------------------------------------------------------------------------- framework hooks


def _objax_var_types() -> tuple[type, ...]:
    mod = sys.modules.get("objax.variable")
    if mod is None:
        return ()
    return (mod.BaseVar,)


def _nnx_variable_type() -> type | None:
    mod = sys.modules.get("flax.nnx")
    if mod is None:
        return None
    return getattr(mod, "Variable", None)


def _is_nnx_variable(x: Any) -> bool:
    var = _nnx_variable_type()
    return var is not None and isinstance(x, var)


def _is_objax_var(x: Any) -> bool:
    types = _objax_var_types()
    return bool(types) and isinstance(x, types)


def _custom_children(x: Any) -> tuple[list[tuple[PathElem, Any]], Any] | None:
    """One level of a registered JAX pytree node: ``([(elem, child)], treedef)``, or None
    when ``x`` is a leaf for JAX (or jax was never imported)."""
    jax = _jax()
    if jax is None:
        return None
    tu = jax.tree_util
    pairs, treedef = tu.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:
        return None  # x itself is a leaf
    out: list[tuple[PathElem, Any]] = []
    for keypath, child in pairs:
        if len(keypath) != 1:  # pragma: no cover - one level only
            raise TreeStructureError(f"unexpected key path {keypath!r} flattening {type(x).__name__}")
        out.append((_elem_of(keypath[0]), child))
    return out, treedef


def _elem_of(entry: Any) -> PathElem:
    """A JAX key entry as a path element."""
    tu = _jax().tree_util
    if isinstance(entry, tu.GetAttrKey):
        return ("a", entry.name)
    if isinstance(entry, tu.DictKey):
        return ("k", entry.key)
    if isinstance(entry, tu.SequenceKey):
        return ("i", entry.idx)
    if isinstance(entry, tu.FlattenedIndexKey):
        return ("i", entry.key)
    return ("k", str(entry))


def _type_name(x: Any) -> str:
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}"


def _check_key(key: Any, path: Path) -> Any:
    """Dict keys must survive JSON exactly: str, int, bool, None or a finite float."""
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


# ----------------------------------------------------------------------------- flatten (save)


@dataclass
class _Flat:
    """A tree split into tensors and its recorded structure."""

    leaves: list[tuple[Path, Any, str]] = field(default_factory=list)  # path, value, kind
    names: list[str] = field(default_factory=list)  # filled by _assign_names
    type_suffix: bool = False  # append ::TypeName to objax variable names (safejax style)
    var_types: dict[int, str] = field(default_factory=dict)  # leaf index -> objax type


def _encode(x: Any, path: Path, flat: _Flat, var_type: str | None = None) -> Any:
    """Record ``x`` (recursively) and collect its storable leaves; returns the JSON node."""
    if x is None:
        return None
    if len(path) > MAX_TREE_DEPTH:
        raise TreeStructureError(
            f"the tree is nested deeper than {MAX_TREE_DEPTH} levels at "
            f"{render_path(path[:8])}...; flatten it first"
        )
    kind = _scalar_kind(x)
    if kind is not None or _is_prng_key(x):
        value = x
        if _is_prng_key(x):
            jax = _jax()
            kind = f"key:{jax.random.key_impl(x)}"
            value = jax.random.key_data(x)
        elif kind in ("int", "float", "bool", "complex"):
            value = np.asarray(x) if not isinstance(x, int) or -(2**63) <= x < 2**64 else None
            if value is None:
                raise DtypeError(
                    f"leaf {render_path(path)} is the int {x}, too large for int64 or uint64; "
                    "store it as a string in metadata instead"
                )
        dtype = np.dtype(value.dtype)
        code_for_numpy(dtype, render_path(path))  # refuses with the path and the cast to use
        index = len(flat.leaves)
        flat.leaves.append((path, value, str(kind)))
        if var_type is not None:
            flat.var_types[index] = var_type
        return {"leaf": index, "kind": kind}
    t = type(x)
    if t is dict:
        return {"dict": [[_check_key(k, path), _encode(v, (*path, ("k", k)), flat)]
                         for k, v in x.items()]}
    if t is list:
        return {"list": [_encode(v, (*path, ("i", i)), flat) for i, v in enumerate(x)]}
    if t is tuple:
        return {"tuple": [_encode(v, (*path, ("i", i)), flat) for i, v in enumerate(x)]}
    if _is_objax_var(x):
        return {"var": t.__name__, "value": _encode(x.value, path, flat, t.__name__)}
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple, registered or not
        return {"node": _type_name(x), "fields": [
            ["a", f, _encode(getattr(x, f), (*path, ("a", f)), flat)] for f in x._fields]}
    custom = _custom_children(x)
    if custom is not None:
        children, _ = custom
        if _is_nnx_variable(x) and len(children) == 1:
            # The wrapped array takes the variable's own path: "layers.0.kernel".
            return {"var": t.__name__, "value": _encode(children[0][1], path, flat)}
        return {"node": _type_name(x), "fields": [
            [k, _check_key(key, path), _encode(child, (*path, (k, key)), flat)]
            for (k, key), child in children]}
    if isinstance(x, Mapping):  # mappings jax does not know about (jax not imported)
        return {"node": _type_name(x), "fields": [
            ["k", _check_key(k, path), _encode(v, (*path, ("k", k)), flat)] for k, v in x.items()]}
    if _is_shape_dtype_struct(x) or hasattr(x, "__array__"):
        dtype = getattr(x, "dtype", None)
        if dtype is not None and not _is_shape_dtype_struct(x):
            try:
                arr = np.asarray(x)
            except Exception as exc:
                raise DtypeError(
                    f"leaf {render_path(path)}: cannot convert {t.__name__} to an array ({exc})"
                ) from exc
            code_for_numpy(arr.dtype, render_path(path))
            index = len(flat.leaves)
            flat.leaves.append((path, arr, "array"))
            return {"leaf": index, "kind": "array"}
    return {"skip": _type_name(x)}


def _valid_name(name: str) -> bool:
    if name == "__metadata__" or "\x00" in name:
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _assign_names(flat: _Flat) -> None:
    """Give each leaf a unique, valid tensor name: the ``.``-joined path when that is free;
    otherwise (keys containing ``.`` colliding with nesting, NUL, ``__metadata__``) the
    joined path plus ``~N``. The recorded structure maps paths to names either way."""
    wanted = []
    for i, (path, _, _) in enumerate(flat.leaves):
        name = _join(path)
        if flat.type_suffix and i in flat.var_types:
            name = f"{name}{OBJAX_TYPE_SEPARATOR}{flat.var_types[i]}"
        wanted.append(name)
    counts: dict[str, int] = {}
    for name in wanted:
        counts[name] = counts.get(name, 0) + 1
    owner = {n: i for i, n in enumerate(wanted) if counts[n] == 1 and _valid_name(n)}
    # On a collision, the first path whose keys hold no "." (true nesting, what
    # flatten_dict would write) keeps the plain name; the others get a suffix.
    for i, name in enumerate(wanted):
        if counts[name] > 1 and name not in owner and _valid_name(name) and not any(
            "." in str(key) for _, key in flat.leaves[i][0]
        ):
            owner[name] = i
    taken = set(owner)
    used: set[str] = set()
    names = []
    for i, name in enumerate(wanted):
        if owner.get(name) == i:
            names.append(name)
            used.add(name)
            continue
        base = name.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\0")
        n = 1
        while f"{base}~{n}" in taken or f"{base}~{n}" in used:
            n += 1
        names.append(f"{base}~{n}")
        used.add(f"{base}~{n}")
    flat.names = names


def _name_nodes(node: Any, names: list[str]) -> Any:
    """Replace leaf indices by tensor names in a recorded node (in place, returns node)."""
    if isinstance(node, dict):
        if "leaf" in node:
            node["leaf"] = names[node["leaf"]]
        elif "dict" in node:
            for pair in node["dict"]:
                _name_nodes(pair[1], names)
        elif "list" in node or "tuple" in node:
            for child in node["list"] if "list" in node else node["tuple"]:
                _name_nodes(child, names)
        elif "fields" in node:
            for triple in node["fields"]:
                _name_nodes(triple[2], names)
        elif "value" in node:
            _name_nodes(node["value"], names)
    return node


def flatten_tree(
    tree: Any, metadata: Mapping[str, str] | None = None, *, objax_type_suffix: bool = False
) -> tuple[dict[str, Any], dict[str, str]]:
    """Split a tree into ``(tensors, metadata)`` ready for the writer: tensor name ->
    array, and the user's metadata plus the recorded structure under :data:`TREE_KEY`.

    Raises:
        SafecodecError: user metadata uses the reserved prefix, or is not str -> str.
        TreeStructureError: a dict key cannot be recorded.
        DtypeError: an array leaf has no safetensors dtype (message names its path).
    """
    user = _check_user_metadata(metadata)
    flat = _Flat(type_suffix=objax_type_suffix)
    node = _encode(tree, (), flat)
    _assign_names(flat)
    record = {"version": TREE_VERSION, "metadata": metadata is not None,
              "tree": _name_nodes(node, flat.names)}
    tensors = {name: value for name, (_, value, _) in zip(flat.names, flat.leaves, strict=True)}
    md = dict(user or {})
    md[TREE_KEY] = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return tensors, md


def _check_user_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise SafecodecError(f"metadata must be a mapping of str to str, got {type(metadata).__name__}")
    bad = [k for k in metadata if isinstance(k, str) and k.startswith(RESERVED_PREFIX)]
    if bad:
        raise SafecodecError(
            f"metadata keys starting with {RESERVED_PREFIX!r} are reserved for safecodec: "
            f"{', '.join(map(repr, bad))}; rename them"
        )
    return dict(metadata)


def save_tree(
    tree: Any,
    path: Any = None,
    metadata: Mapping[str, str] | None = None,
    *,
    alignment: int = 64,
    fs: Any = None,
    storage_options: dict[str, Any] | None = None,
    max_shard_size: int | str | None = None,
) -> bytes | None:
    """Save any pytree losslessly to safetensors bytes or a file.

    Nested dicts (insertion order kept), lists, tuples, ``None``, empty containers,
    integer/bool/None keys, keys containing ``.`` or ``/``, NumPy and Python scalars
    (stored as 0-d tensors), every safetensors dtype (bfloat16, float8...; float64 stays
    float64), JAX arrays, and registered JAX pytree nodes (Flax ``FrozenDict``, NNX
    ``State``, Equinox modules, namedtuples, dataclasses) all come back as they went in
    (custom nodes as dicts unless ``like=`` is given to :func:`load_tree`). The caller's
    tree is never modified.

    Tensor names are the path keys joined with ``.``: the same names
    ``safetensors.flax.save_file(flatten_dict(params, sep="."))`` writes. NNX variables
    and Objax variables add no name part (``layers.0.kernel``, not
    ``layers.0.kernel.value``).

    Args:
        tree: The pytree.
        path: A local path, fsspec URL, or path on ``fs``. None: return bytes.
        metadata: User metadata (str -> str). Keys may not start with ``safecodec.``.
        alignment: 64 (zero-copy layout, default) or 8 (the reference writer's layout).
        fs: An fsspec filesystem on which ``path`` lies.
        storage_options: Options for the fsspec filesystem a URL names.
        max_shard_size: Write a sharded checkpoint (shards plus an index) at ``path``;
            :func:`load_tree` reads it back from the directory or the index.

    Returns:
        The file's bytes when ``path`` is None, else None.

    Raises:
        DtypeError: An array leaf's dtype has no safetensors code (names its path and the
            cast to use), or a Python int does not fit 64 bits.
        TreeStructureError: A dict key that JSON cannot record exactly (e.g. a tuple).
        SafecodecError: Metadata uses the reserved prefix or is not str -> str.

    Example:
        >>> import numpy as np, safecodec as sc
        >>> data = sc.save_tree({"w": [np.ones(2, np.float32), None], "step": 3})
        >>> sc.load_tree(data)
        {'w': [array([1., 1.], dtype=float32), None], 'step': 3}
    """
    from ._api import save, save_file

    tensors, md = flatten_tree(tree, metadata)
    if path is None:
        return save(tensors, md, alignment=alignment)
    save_file(tensors, path, md, alignment=alignment, fs=fs, storage_options=storage_options,
              max_shard_size=max_shard_size)
    return None


# ----------------------------------------------------------------------------- reading


def split_metadata(metadata: Mapping[str, str] | None) -> tuple[dict[str, str] | None, dict[str, str]]:
    """Split a file's metadata into ``(user metadata, safecodec's own keys)``.

    User metadata is None when the file has none, or when the recorded structure says the
    user gave none (safecodec always writes ``__metadata__`` to hold the structure).
    """
    from ._header import visible_metadata

    if metadata is None:
        return None, {}
    own = {k: v for k, v in metadata.items() if k.startswith(RESERVED_PREFIX)}
    return visible_metadata(dict(metadata)), own


def _parse_record(text: str) -> Any:
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
    if version != TREE_VERSION:
        raise TreeStructureError(
            f"the recorded tree structure has version {version!r}; this safecodec reads "
            f"version {TREE_VERSION}; upgrade safecodec"
        )
    return record["tree"]


@dataclass
class _Entry:
    """What a file holds at one path."""

    kind: str  # "leaf", "skip", "none", "empty"
    name: str = ""
    leaf_kind: str = "array"
    type_name: str = ""


def _bad_node(node: Any, path: Path) -> TreeStructureError:
    return TreeStructureError(
        f"the recorded tree structure is inconsistent at {render_path(path)}: {json.dumps(node)[:120]}"
    )


def _walk_record(node: Any, path: Path, out: dict[tuple[Any, ...], _Entry], depth: int = 0) -> None:
    """Collect path -> entry for every leaf, skipped leaf and None of a recorded tree."""
    if depth > MAX_TREE_DEPTH + 16:  # + a few variable wrappers, which add no level
        raise TreeStructureError(
            f"the recorded tree structure is nested deeper than {MAX_TREE_DEPTH} levels")
    if node is None:
        out[_match_key(path)] = _Entry("none")
        return
    if not isinstance(node, dict):
        raise _bad_node(node, path)
    if "leaf" in node:
        if not isinstance(node["leaf"], str):
            raise _bad_node(node, path)
        out[_match_key(path)] = _Entry("leaf", node["leaf"], str(node.get("kind", "array")))
    elif "skip" in node:
        out[_match_key(path)] = _Entry("skip", type_name=str(node["skip"]))
    elif "var" in node:
        _walk_record(node.get("value"), path, out, depth + 1)
    else:
        for elem, child in _children_of(node, path):
            _walk_record(child, (*path, elem), out, depth + 1)
        if not _children_of(node, path):
            out[_match_key(path)] = _Entry("empty")


def _children_of(node: dict[str, Any], path: Path) -> list[tuple[PathElem, Any]]:
    try:
        if "dict" in node:
            return [(("k", k), c) for k, c in node["dict"]]
        if "list" in node:
            return [(("i", i), c) for i, c in enumerate(node["list"])]
        if "tuple" in node:
            return [(("i", i), c) for i, c in enumerate(node["tuple"])]
        if "fields" in node:
            return [((str(k), key), c) for k, key, c in node["fields"]]
    except (TypeError, ValueError):
        pass
    raise _bad_node(node, path)


class _Loader:
    """Fetches tensors from one open handle and converts them to the requested outputs.

    JAX outputs go through the JAX output layer (:mod:`safecodec._jax`) in one batch at
    the end, so zero-copy aliasing, batched transfers, shardings and its 64-bit policy
    (a :class:`~safecodec._jax.PrecisionWarning` when x64 is off) apply unchanged.
    """

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.used: set[str] = set()
        self.jax_requests: list[tuple[Callable[[Any], None], str, Any]] = []

    def numpy(self, name: str) -> np.ndarray:
        if name not in self.handle:
            raise TreeStructureError(
                f"the recorded tree structure refers to tensor {name!r}, which is not in the file"
            )
        self.used.add(name)
        # A JAX handle maps the file read-only: NumPy leaves next to JAX ones are copies.
        return self.handle.get_numpy(name)  # type: ignore[no-any-return]

    def to_jax(self, name: str, sharding: Any, setter: Callable[[Any], None]) -> None:
        """Queue a tensor for conversion to a jax.Array (done in one batch by finish)."""
        if name not in self.handle:
            raise TreeStructureError(
                f"the recorded tree structure refers to tensor {name!r}, which is not in the file"
            )
        if self.handle.framework != "jax":  # pragma: no cover - load_tree opens JAX handles
            raise SafecodecError("internal error: JAX output from a NumPy handle")
        self.used.add(name)
        self.jax_requests.append((setter, name, sharding))

    def finish(self) -> None:
        if not self.jax_requests:
            return
        shardings = {name: sh for _, name, sh in self.jax_requests if sh is not None}
        arrays = self.handle.load_tensors([name for _, name, _ in self.jax_requests],
                                          sharding=shardings or None)
        for setter, name, _ in self.jax_requests:
            setter(arrays[name])


def _open(source: Any, *, fs: Any, copy: bool, jax: bool,
          storage_options: dict[str, Any] | None = None) -> Any:
    """A handle on ``source``: framework "jax" when any output leaf is a jax.Array."""
    from ._api import safe_open

    return safe_open(source, "jax" if jax else "numpy", fs=fs, copy=copy,
                     storage_options=storage_options)


def _template_has_jax(like: Any) -> bool:
    """Whether a template holds jax arrays, ShapeDtypeStructs or PRNG keys (walked the
    way :class:`_TemplateFill` walks it, Objax variables and plain Mappings included)."""
    if _jax() is None:
        return False
    stack = [like]
    while stack:
        x = stack.pop()
        if _is_jax_array(x) or _is_shape_dtype_struct(x) or _is_prng_key(x):
            return True
        if x is None or isinstance(x, np.ndarray | np.generic | str | bytes | int | float | complex):
            continue
        if type(x) in (dict, list, tuple):
            stack.extend(x.values() if type(x) is dict else x)
        elif _is_objax_var(x):
            stack.append(x.value)
        else:
            custom = _custom_children(x)
            if custom is not None:
                stack.extend(child for _, child in custom[0])
            elif isinstance(x, Mapping):
                stack.extend(x.values())
    return False


def _want_jax(framework: str | None) -> bool | None:
    """True for jax outputs, False for numpy, None for 'follow the template'."""
    if framework is None:
        return None
    fw = str(framework).lower()
    if fw in _JAX_FRAMEWORKS:
        return True
    if fw in _NUMPY_FRAMEWORKS:
        return False
    raise SafecodecError(f"unsupported framework {framework!r}; use 'numpy' or 'jax'")


def _restore_leaf(arr: np.ndarray, kind: str) -> Any:
    """A stored leaf in its original Python/NumPy form (numpy outputs)."""
    if kind == "array":
        return arr
    if kind == "numpy":
        return arr[()]
    if kind == "int":
        return int(arr)
    if kind == "float":
        return float(arr)
    if kind == "bool":
        return bool(arr)
    if kind == "complex":
        return complex(arr)
    return arr


class _Slot:
    """A mutable cell a jax conversion writes into, resolved when building containers."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: Any = None

    def set(self, value: Any) -> None:
        self.value = value


def _resolve(x: Any) -> Any:
    """Replace :class:`_Slot` cells by their values and build :class:`_Deferred` containers,
    in a freshly built tree (plain, or filled from a template)."""
    if isinstance(x, _Deferred):
        return x.build()
    if isinstance(x, _Slot):
        return x.value
    t = type(x)
    if t is dict:
        return {k: _resolve(v) for k, v in x.items()}
    if t is list:
        return [_resolve(v) for v in x]
    if t is tuple:
        return tuple(_resolve(v) for v in x)
    return x


def _build_plain(node: Any, path: Path, loader: _Loader, jax_out: bool, skipped: list[Path],
                 depth: int = 0) -> Any:
    """Rebuild a recorded tree with builtin containers (custom nodes become dicts)."""
    if depth > MAX_TREE_DEPTH + 16:  # + a few variable wrappers, which add no level
        raise TreeStructureError(
            f"the recorded tree structure is nested deeper than {MAX_TREE_DEPTH} levels")
    if node is None:
        return None
    if not isinstance(node, dict):
        raise _bad_node(node, path)
    if "leaf" in node:
        name = node["leaf"]
        kind = str(node.get("kind", "array"))
        if not isinstance(name, str):
            raise _bad_node(node, path)
        if jax_out and (kind.startswith("key:") or kind == "array"):
            slot = _Slot()
            impl = kind[4:] if kind.startswith("key:") else None

            def setter(value: Any, slot: _Slot = slot, impl: str | None = impl) -> None:
                slot.value = _jax().random.wrap_key_data(value, impl=impl) if impl else value

            loader.to_jax(name, None, setter)
            return slot
        return _restore_leaf(loader.numpy(name), kind)
    if "skip" in node:
        skipped.append(path)
        return None
    if "var" in node:
        return _build_plain(node.get("value"), path, loader, jax_out, skipped, depth + 1)
    children = _children_of(node, path)
    built = [(elem, _build_plain(c, (*path, elem), loader, jax_out, skipped, depth + 1))
             for elem, c in children]
    if "list" in node:
        return [v for _, v in built]
    if "tuple" in node:
        return tuple(v for _, v in built)
    return {key: v for (_, key), v in built}


def unflatten_names(names: list[str], get: Callable[[str], Any]) -> dict[str, Any]:
    """Nest ``.``-joined names into dicts (files written by other tools).

    Raises:
        TreeStructureError: A name is both a tensor and a prefix of another
            (``"a"`` and ``"a.b"``).
    """
    root: dict[str, Any] = {}
    conflicts: list[str] = []
    tensor_at: set[tuple[str, ...]] = set()
    for name in names:
        parts = name.split(".")
        node = root
        ok = True
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif tuple(parts[: i + 1]) in tensor_at:
                conflicts.append(f"{'.'.join(parts[: i + 1])!r} is a tensor and a prefix of {name!r}")
                ok = False
                break
            node = nxt
        if not ok:
            continue
        if parts[-1] in node:
            conflicts.append(f"{name!r} is a tensor and a prefix of other tensor names")
            continue
        node[parts[-1]] = get(name)
        tensor_at.add(tuple(parts))
    if conflicts:
        raise TreeStructureError(
            "cannot nest the tensor names of this file by '.': " + "; ".join(conflicts)
            + "; load it flat (safecodec.load_file) instead"
        )
    return root


# ----------------------------------------------------------------------------- templates


@dataclass
class _Problems:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def raise_if_any(self) -> None:
        total = len(self.missing) + len(self.unexpected) + len(self.mismatched)
        if not total:
            return
        lines = [f"the file does not match the template: {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.mismatched)} mismatched"]
        listed = 0
        for title, items in (("missing from the file", self.missing),
                             ("in the file but not in the template", self.unexpected),
                             ("mismatched (template vs file)", self.mismatched)):
            for item in items:
                if listed == _MAX_LISTED:
                    lines.append(f"  ... and {total - listed} more")
                    raise TreeStructureError("\n".join(lines))
                lines.append(f"  {title}: {item}")
                listed += 1
        raise TreeStructureError("\n".join(lines))


def _describe(shape: tuple[int, ...], dtype: Any) -> str:
    return f"{np.dtype(dtype).name}{list(shape)}"


def _template_spec(x: Any) -> tuple[tuple[int, ...], np.dtype] | None:
    """Expected (shape, dtype) of a template leaf, or None when it is not an array slot."""
    if _is_prng_key(x):
        jax = _jax()
        data = jax.eval_shape(jax.random.key_data, x)
        return tuple(data.shape), np.dtype(data.dtype)
    if isinstance(x, np.ndarray | np.generic) or _is_jax_array(x) or _is_shape_dtype_struct(x):
        return tuple(x.shape), np.dtype(x.dtype)
    if isinstance(x, bool | int | float):
        return (), np.asarray(x).dtype
    return None


def _scalar_dtype_ok(template: Any, file_dtype: np.dtype) -> bool:
    """Python scalars in a template accept any file dtype of the same kind."""
    if isinstance(template, bool):
        return file_dtype.kind == "b"
    if isinstance(template, int):
        return file_dtype.kind in "iu"
    return file_dtype.kind == "f"


class _TemplateFill:
    """Rebuilds a template tree with leaves from a file, checking as it goes."""

    def __init__(self, loader: _Loader, entries: dict[tuple[Any, ...], _Entry] | None,
                 names_by_join: set[str], want_jax: bool | None) -> None:
        self.loader = loader
        self.entries = entries  # None: the file has no recorded structure
        self.names_by_join = names_by_join
        self.want_jax = want_jax
        self.problems = _Problems()
        self.seen: set[tuple[Any, ...]] = set()

    def entry(self, path: Path) -> _Entry | None:
        if self.entries is not None:
            key = _match_key(path)
            self.seen.add(key)
            return self.entries.get(key)
        name = _join(path)
        return _Entry("leaf", name) if name in self.names_by_join else None

    def fill(self, x: Any, path: Path) -> Any:
        if x is None:
            e = self.entry(path)
            if e is not None and e.kind == "leaf":
                self._unexpected_at(path, e)
            return None
        spec = _template_spec(x)
        if spec is not None:
            return self._leaf(x, spec, path)
        t = type(x)
        if t is dict:
            self._empty(x, path)
            return {k: self.fill(v, (*path, ("k", k))) for k, v in x.items()}
        if t is list:
            self._empty(x, path)
            return [self.fill(v, (*path, ("i", i))) for i, v in enumerate(x)]
        if t is tuple:
            self._empty(x, path)
            return tuple(self.fill(v, (*path, ("i", i))) for i, v in enumerate(x))
        if _is_objax_var(x):
            from .objax import rebuild_variable

            value = self.fill(x.value, path)
            return _Deferred(lambda: rebuild_variable(x, _resolve(value), render_path(path)))
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            fields = [self.fill(getattr(x, f), (*path, ("a", f))) for f in x._fields]
            return _Deferred(lambda: t(*[_resolve(v) for v in fields]))
        custom = _custom_children(x)
        if custom is not None:
            children, treedef = custom
            if _is_nnx_variable(x) and len(children) == 1:
                vals = [self.fill(children[0][1], path)]
            else:
                vals = [self.fill(child, (*path, elem)) for elem, child in children]
            return _Deferred(lambda: treedef.unflatten([_resolve(v) for v in vals]))
        if isinstance(x, Mapping):
            vals2 = {k: self.fill(v, (*path, ("k", k))) for k, v in x.items()}
            return _Deferred(lambda: _rebuild_mapping(x, {k: _resolve(v) for k, v in vals2.items()}))
        # A non-array leaf: the template supplies it.
        e = self.entry(path)
        if e is not None and e.kind == "leaf":
            info = self.loader.handle.header.tensors.get(e.name)
            self.problems.mismatched.append(
                f"{render_path(path)}: template holds {type(x).__name__}, file has tensor "
                f"{e.name!r} {_describe(info.shape, info.dtype.numpy) if info else ''}".rstrip())
            self.loader.used.add(e.name)
        return x

    def _empty(self, x: Any, path: Path) -> None:
        if not x:  # an empty container has no leaves; note that its path was consumed
            self.entry(path)

    def _unexpected_at(self, path: Path, e: _Entry) -> None:
        self.loader.used.add(e.name or "")
        info = self.loader.handle.header.tensors.get(e.name)
        desc = _describe(info.shape, info.dtype.numpy) if info else "?"
        self.problems.mismatched.append(
            f"{render_path(path)}: template holds None, file has tensor {e.name!r} {desc}")

    def _leaf(self, x: Any, spec: tuple[tuple[int, ...], np.dtype], path: Path) -> Any:
        e = self.entry(path)
        shape, dtype = spec
        if e is None or e.kind != "leaf":
            what = "nothing" if e is None else ("a leaf that was not stored" if e.kind == "skip" else e.kind)
            self.problems.missing.append(
                f"{render_path(path)}: template expects {_describe(shape, dtype)}, file has {what}")
            return x
        info = self.loader.handle.header.tensors.get(e.name)
        if info is None:
            raise TreeStructureError(
                f"the recorded tree structure refers to tensor {e.name!r}, which is not in the file")
        self.loader.used.add(e.name)
        file_dtype = info.dtype.numpy
        is_py = isinstance(x, bool | int | float) and not isinstance(x, np.generic)
        dtype_ok = _scalar_dtype_ok(x, file_dtype) if is_py else file_dtype == dtype
        if tuple(info.shape) != shape or not dtype_ok:
            self.problems.mismatched.append(
                f"{render_path(path)}: template {_describe(shape, dtype)}, file {e.name!r} "
                f"{_describe(info.shape, file_dtype)}")
            return x
        jax_leaf = _is_jax_array(x) or _is_shape_dtype_struct(x) or _is_prng_key(x)
        to_jax = self.want_jax if self.want_jax is not None else jax_leaf
        if _is_prng_key(x) and self.loader.handle.framework == "jax":
            # A key array knows its implementation; a ShapeDtypeStruct only through its dtype.
            impl = (_jax().random.key_impl(x) if _is_jax_array(x)
                    else getattr(x.dtype, "_impl", None))
            slot = _Slot()

            def set_key(v: Any) -> None:
                slot.value = _jax().random.wrap_key_data(v, impl=impl)

            self.loader.to_jax(e.name, getattr(x, "sharding", None), set_key)
            return slot
        if to_jax and not is_py:
            slot = _Slot()
            sharding = getattr(x, "sharding", None) if jax_leaf else None

            def set_value(v: Any) -> None:
                slot.value = v

            self.loader.to_jax(e.name, sharding, set_value)
            return slot
        arr = self.loader.numpy(e.name)
        if is_py:
            return type(x)(arr[()])
        if isinstance(x, np.generic):
            return arr[()]
        return arr

    def report_unused(self) -> None:
        header = self.loader.handle.header
        for name, info in header.tensors.items():
            if name not in self.loader.used:
                self.problems.unexpected.append(f"{name!r} {_describe(info.shape, info.dtype.numpy)}")


class _Deferred:
    """A container to build once every leaf (jax conversions included) is ready."""

    __slots__ = ("build",)

    def __init__(self, build: Callable[[], Any]) -> None:
        self.build = build


def _rebuild_mapping(template: Mapping[Any, Any], values: dict[Any, Any]) -> Any:
    """A Mapping of the template's type with new values (VarCollection, OrderedDict...)."""
    try:
        return type(template)(values)  # type: ignore[call-arg]
    except Exception:
        return values


# ----------------------------------------------------------------------------- load_tree


def load_tree(
    source: Any,
    like: Any = None,
    framework: str | None = None,
    *,
    fs: Any = None,
    copy: bool = False,
    with_metadata: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Load a tree saved by :func:`save_tree` (or any safetensors file).

    Without ``like``, the recorded structure is rebuilt with builtin containers: dicts
    (custom nodes such as namedtuples, dataclasses, Equinox modules and NNX states become
    dicts of their fields), lists, tuples, ``None``, and scalars as the Python or NumPy
    scalars they were. Leaves that were not stored come back as ``None`` with one
    :class:`SkippedLeavesWarning` naming their paths. Files without a recorded structure
    (written by other tools) are nested by splitting names on ``.``.

    With ``like``, the result has the template's structure and types (its containers are
    rebuilt through JAX's pytree registry, never by importing a class named in the file),
    filled from the file. Every array slot is checked for shape and dtype; all problems
    (missing, unexpected and mismatched entries, with both values) are reported in one
    :class:`~safecodec.TreeStructureError`. Non-array leaves of the template (functions,
    strings, objects) are taken from the template. NNX ``Variable`` and Objax variable
    types come back as they are in the template.

    Output leaves: NumPy arrays (copy-on-write views of the file) unless ``framework="jax"``,
    or the template's leaf is a ``jax.Array`` / ``jax.ShapeDtypeStruct``: then a
    ``jax.Array`` loaded by :mod:`safecodec.jax` (zero-copy on CPU for aligned tensors),
    placed with the template leaf's sharding when it has one (a ``ShapeDtypeStruct``
    without sharding: JAX's default device). JAX PRNG key arrays come back as keys of
    the same implementation. ``framework="numpy"`` forces NumPy (keys as their raw
    ``uint32`` data). NumPy leaves of a template that also holds JAX leaves are copies.

    Args:
        source: A path, fsspec URL, bytes-like object or binary file object.
        like: An optional template tree.
        framework: None (follow the template; NumPy without one), ``"numpy"`` or ``"jax"``.
        fs: An fsspec filesystem on which ``source`` is a path.
        copy: Independent NumPy arrays instead of views of the file.
        with_metadata: Return ``(tree, user_metadata)`` instead of the tree alone.
        storage_options: Options for the fsspec filesystem a URL names.

    Returns:
        The tree, or ``(tree, metadata)`` with ``with_metadata=True``. Metadata is what the
        user saved (safecodec's own ``safecodec.*`` keys hidden), or None.

    Raises:
        TreeStructureError: The file does not match ``like``, or its recorded structure is
            inconsistent, or its names cannot be nested.
        DtypeError: A tensor JAX cannot hold (F6) was requested as a JAX array. (64-bit
            tensors with ``jax_enable_x64`` off are narrowed with one ``PrecisionWarning``,
            as :mod:`safecodec.jax` does.)
        SafecodecError: The file is not a valid safetensors file.
    """
    want_jax = _want_jax(framework)
    jax_handle = bool(want_jax) if like is None or want_jax is not None else _template_has_jax(like)
    with _open(source, fs=fs, copy=copy, jax=jax_handle,
               storage_options=storage_options) as handle:
        header = handle.header
        user_md, own = split_metadata(header.raw_metadata)
        has_record = TREE_KEY in own
        record = _parse_record(own[TREE_KEY]) if has_record else None
        loader = _Loader(handle)
        if like is None:
            tree = _load_plain(handle, record, has_record, loader, bool(want_jax))
        else:
            entries: dict[tuple[Any, ...], _Entry] | None = None
            if has_record:
                entries = {}
                _walk_record(record, (), entries)
            filler = _TemplateFill(loader, entries, set(header.tensors), want_jax)
            built = filler.fill(like, ())
            filler.report_unused()
            filler.problems.raise_if_any()
            loader.finish()
            tree = _resolve(built)
    return (tree, user_md) if with_metadata else tree


def _load_plain(handle: Any, record: Any, has_record: bool, loader: _Loader, jax_out: bool) -> Any:
    skipped: list[Path] = []
    if not has_record:
        names = list(handle.header.tensors)
        if jax_out:
            slots: dict[str, _Slot] = {}

            def get(name: str) -> _Slot:
                slot = slots[name] = _Slot()
                loader.to_jax(name, None, slot.set)
                return slot

            tree = unflatten_names(names, get)
        else:
            tree = unflatten_names(names, loader.numpy)
    else:
        tree = _build_plain(record, (), loader, jax_out, skipped)
        extra = [n for n in handle.header.tensors if n not in loader.used]
        if extra:
            raise TreeStructureError(
                f"the file holds {len(extra)} tensor(s) its recorded tree structure does not "
                f"mention ({', '.join(map(repr, extra[:10]))}); it was changed after saving; "
                "load it flat (safecodec.load_file) or with like="
            )
    loader.finish()
    tree = _resolve(tree)
    if skipped:
        shown = ", ".join(render_path(p) for p in skipped[:20])
        more = f" and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        warnings.warn(
            f"{len(skipped)} leaf/leaves of the saved tree were not arrays and were not stored; "
            f"they come back as None: {shown}{more}. Pass like= to supply them.",
            SkippedLeavesWarning,
            stacklevel=caller_stacklevel(),
        )
    return tree


def iter_names(tree: Any) -> Iterator[str]:
    """The tensor names :func:`save_tree` would give ``tree``'s leaves, in order."""
    flat = _Flat()
    _encode(tree, (), flat)
    _assign_names(flat)
    yield from flat.names

