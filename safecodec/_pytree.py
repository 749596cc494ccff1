"""Live pytrees, one level at a time: the one place that decides what an object is.

:func:`split` looks at one object and says what the tree modules should do with it: a
stored leaf (array or scalar, and which kind), a container with its children and a way
to rebuild it, a variable wrapper, or an opaque leaf. The order of the checks is the
definition; it is written once, here:

1. ``None``.
2. JAX PRNG key arrays (and ``ShapeDtypeStruct`` s of key dtype), NumPy arrays and
   scalars, Python ``bool``/``int``/``float``/``complex``, ``jax.Array``.
3. ``dict``, ``list``, ``tuple`` (exact types: builtin containers).
4. Objax variables (a wrapper that adds no name part).
5. namedtuples (registered with JAX or not): fields by attribute.
6. Registered JAX pytree nodes (Flax ``FrozenDict``, NNX ``State``, Equinox modules,
   dataclasses...); an NNX ``Variable`` with one child is a wrapper like 4.
7. Other ``Mapping`` s (an Objax ``VarCollection``, an ``OrderedDict`` with jax absent).
8. ``jax.ShapeDtypeStruct`` (a template's array slot) and objects with ``__array__``
   and a ``dtype``.
9. Anything else: opaque (a function, a string, an object).

Framework types are recognised through ``sys.modules`` only: an Objax variable or a JAX
array cannot exist unless its framework was imported, so nothing here imports one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from ._errors import TreeStructureError
from ._objax_vars import rebuild_variable
from ._tree_record import ARRAY, NUMPY_SCALAR, PY_SCALARS
from ._treepath import PathElem

__all__ = [
    "ARRAY_LIKE",
    "CONTAINERS",
    "DICT",
    "KEY",
    "LEAF",
    "LIST",
    "NODE",
    "NONE",
    "OPAQUE",
    "SPEC",
    "TUPLE",
    "VAR",
    "Level",
    "is_jax_array",
    "is_prng_key",
    "jax_module",
    "leaf_spec",
    "split",
    "type_name",
]

# What split() says an object is (Level.kind).
NONE: Final = "none"
LEAF: Final = "leaf"  #: a stored leaf; Level.leaf says which kind
DICT: Final = "dict"
LIST: Final = "list"
TUPLE: Final = "tuple"
NODE: Final = "node"  #: any other container (namedtuple, registered node, Mapping)
VAR: Final = "var"  #: a variable wrapper: one child, at the variable's own path
OPAQUE: Final = "opaque"  #: not stored; a template supplies it
CONTAINERS: Final = frozenset({DICT, LIST, TUPLE, NODE})

# Leaf kinds (Level.leaf): the record's leaf kinds (_tree_record: ARRAY, NUMPY_SCALAR, the
# PY_SCALARS), plus three that are saved and matched differently:
KEY: Final = "key"  #: a JAX PRNG key array, or a ShapeDtypeStruct of key dtype
SPEC: Final = "spec"  #: a jax.ShapeDtypeStruct: an array slot in a template, nothing to save
ARRAY_LIKE: Final = "array_like"  #: has __array__ and a dtype: saved through np.asarray


@dataclass(frozen=True)
class Level:
    """One level of a live tree, as :func:`split` sees it."""

    kind: str
    leaf: str = ""  # LEAF: ARRAY, NUMPY_SCALAR, a PY_SCALARS kind, KEY, SPEC or ARRAY_LIKE
    children: list[tuple[PathElem, Any]] = field(default_factory=list)
    type_name: str = ""  # NODE: module.qualname; VAR: class name
    objax: bool = False  # VAR: an Objax variable (its type can be appended to names)
    # Containers and VAR: a new object of the same type from new children, in order;
    # the second argument is the rendered path, for error messages.
    rebuild: Callable[[list[Any], str], Any] | None = None


def jax_module() -> Any:
    """The jax module if it has been imported (a jax object cannot exist otherwise)."""
    return sys.modules.get("jax")


def is_jax_array(x: Any) -> bool:
    """Whether ``x`` is a ``jax.Array`` (PRNG key arrays included)."""
    jax = jax_module()
    return jax is not None and isinstance(x, jax.Array)


def _is_shape_dtype_struct(x: Any) -> bool:
    jax = jax_module()
    return jax is not None and isinstance(x, jax.ShapeDtypeStruct)


def is_prng_key(x: Any) -> bool:
    """Whether ``x`` is a typed JAX PRNG key array (or a ShapeDtypeStruct of one)."""
    jax = jax_module()
    if jax is None or not hasattr(x, "dtype"):
        return False
    try:
        return bool(jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key))
    except TypeError:
        return False


def type_name(x: Any) -> str:
    """``module.qualname`` of ``x``'s type (recorded for information only)."""
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}"


def _leaf_kind(x: Any) -> str | None:
    """Cascade step 2: the kind of a stored leaf, or None."""
    if is_prng_key(x):
        return KEY
    if isinstance(x, np.ndarray):
        return ARRAY
    if isinstance(x, np.generic):
        return NUMPY_SCALAR
    for kind, scalar_type in PY_SCALARS.items():  # bool first: a bool is an int
        if isinstance(x, scalar_type):
            return kind
    if is_jax_array(x):
        return ARRAY
    return None


def _elem_of(entry: Any) -> PathElem:
    """A JAX key entry as a path element."""
    tu = jax_module().tree_util
    if isinstance(entry, tu.GetAttrKey):
        return ("a", entry.name)
    if isinstance(entry, tu.DictKey):
        return ("k", entry.key)
    if isinstance(entry, tu.SequenceKey):
        return ("i", entry.idx)
    if isinstance(entry, tu.FlattenedIndexKey):
        return ("i", entry.key)
    return ("k", str(entry))


def _registered(x: Any) -> tuple[list[tuple[PathElem, Any]], Any] | None:
    """One level of a registered JAX pytree node: ``([(elem, child)], treedef)``, or None
    when ``x`` is a leaf for JAX (or jax was never imported)."""
    jax = jax_module()
    if jax is None:
        return None
    pairs, treedef = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:
        return None  # x itself is a leaf
    out: list[tuple[PathElem, Any]] = []
    for keypath, child in pairs:
        if len(keypath) != 1:  # pragma: no cover - one level only
            raise TreeStructureError(f"unexpected key path {keypath!r} flattening {type(x).__name__}")
        out.append((_elem_of(keypath[0]), child))
    return out, treedef


def _rebuild_mapping(template: Mapping[Any, Any], values: dict[Any, Any]) -> Any:
    """A Mapping of the template's type with new values (VarCollection, OrderedDict...)."""
    try:
        return type(template)(values)  # type: ignore[call-arg]
    except Exception:
        return values


def _is_objax_var(x: Any) -> bool:
    mod = sys.modules.get("objax.variable")
    return mod is not None and isinstance(x, mod.BaseVar)


def _is_nnx_variable(x: Any) -> bool:
    mod = sys.modules.get("flax.nnx")
    var = getattr(mod, "Variable", None) if mod is not None else None
    return var is not None and isinstance(x, var)


def split(x: Any) -> Level:
    """What ``x`` is, one level deep (see the module docstring for the order of checks).

    Raises:
        TreeStructureError: JAX flattened a node into a multi-level path (never seen).
    """
    if x is None:
        return Level(NONE)
    kind = _leaf_kind(x)
    if kind is not None:
        return Level(LEAF, leaf=kind)
    t = type(x)
    if t is dict:
        keys = list(x)
        return Level(DICT, children=[(("k", k), x[k]) for k in keys],
                     rebuild=lambda vals, _: dict(zip(keys, vals, strict=True)))
    if t is list or t is tuple:
        return Level(LIST if t is list else TUPLE, children=[(("i", i), v) for i, v in enumerate(x)],
                     rebuild=lambda vals, _: t(vals))
    if _is_objax_var(x):
        return Level(VAR, children=[(("a", "value"), x.value)], type_name=t.__name__, objax=True,
                     rebuild=lambda vals, where: rebuild_variable(x, vals[0], where))
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple, registered or not
        return Level(NODE, children=[(("a", f), getattr(x, f)) for f in x._fields],
                     type_name=type_name(x), rebuild=lambda vals, _: t(*vals))
    registered = _registered(x)
    if registered is not None:
        children, treedef = registered
        rebuild = lambda vals, _: treedef.unflatten(vals)  # noqa: E731
        if _is_nnx_variable(x) and len(children) == 1:
            # The wrapped array takes the variable's own path: "layers.0.kernel".
            return Level(VAR, children=children, type_name=t.__name__, rebuild=rebuild)
        return Level(NODE, children=children, type_name=type_name(x), rebuild=rebuild)
    if isinstance(x, Mapping):  # mappings jax does not know about (jax not imported)
        keys2 = list(x.keys())
        return Level(NODE, children=[(("k", k), x[k]) for k in keys2], type_name=type_name(x),
                     rebuild=lambda vals, _: _rebuild_mapping(x, dict(zip(keys2, vals, strict=True))))
    if _is_shape_dtype_struct(x):
        return Level(LEAF, leaf=SPEC)
    if hasattr(x, "__array__") and getattr(x, "dtype", None) is not None:
        return Level(LEAF, leaf=ARRAY_LIKE)
    return Level(OPAQUE, type_name=type_name(x))


def leaf_spec(x: Any, level: Level) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """The (shape, dtype) a leaf occupies in a file: for a PRNG key, its raw key data."""
    if level.leaf == KEY:
        jax = jax_module()
        data = jax.eval_shape(jax.random.key_data, x)
        return tuple(data.shape), np.dtype(data.dtype)
    if level.leaf in (ARRAY, NUMPY_SCALAR, SPEC, ARRAY_LIKE):
        return tuple(np.shape(x) if level.leaf == ARRAY_LIKE else x.shape), np.dtype(x.dtype)
    return (), np.asarray(x).dtype  # Python scalars
