"""Lossless pytrees in safetensors files: :func:`save_tree` and :func:`load_tree`.

A tree is flattened into one tensor per array leaf. Tensor names are the keys on the path
joined with ``.`` (``{"params": {"Dense_0": {"kernel": w}}}`` gives
``"params.Dense_0.kernel"``), which is exactly what
``safetensors.flax.save_file(flax.traverse_util.flatten_dict(params, sep="."))`` writes,
so files go both ways between the two.

Names alone lose information, so the structure is also recorded, as JSON, in the file's
metadata under the key :data:`TREE_KEY` (the format: :mod:`safecodec._tree_record`).
Every metadata key that starts with :data:`RESERVED_PREFIX` belongs to safecodec: user
metadata may not use it, and readers here hide it, so metadata comes back exactly as the
user wrote it.

Loading without a template gives dicts for custom nodes (namedtuples, dataclasses,
Equinox modules, NNX states...); nothing in a file ever makes safecodec import or
instantiate a class. To get the original types back, pass ``like=`` a template of the
same structure (the model itself, its state, or a tree of ``jax.ShapeDtypeStruct``).

Leaves that are not arrays or scalars (an Equinox module's activation function, strings,
arbitrary objects) are not stored; their paths are recorded. ``like=`` supplies them on
load; without it they come back as ``None`` with one :class:`SkippedLeavesWarning`.

A load runs in three steps. Plan: the record (without ``like=``) or the template is
walked once and every leaf checked against the header; every problem (with a template:
all missing, unexpected and mismatched entries together) is raised before any tensor is
read. Load: every planned tensor is read in one batch (JAX leaves through one
``load_tensors`` call of the handle, so zero-copy, shardings and the 64-bit policy are the
JAX output layer's). Build: one builder makes the output, of builtin containers or of the
template's own types.

What a live object is comes from :func:`safecodec._pytree.split` (one type cascade);
the leaf kinds and the record are defined, read and written by
:mod:`safecodec._tree_record` (one walker); tensor names and metadata are checked by the
writer's rules (:func:`safecodec._header.name_fault`,
:func:`~safecodec._header.check_metadata`); files are opened through the routers of
:mod:`safecodec._api` only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, NamedTuple

import numpy as np

from . import _tree_record as rec
from ._api import safe_open, save, save_file
from ._dtypes import caller_stacklevel, code_for_numpy
from ._errors import DtypeError, SafecodecError, TreeStructureError
from ._header import (
    RESERVED_PREFIX,
    TREE_KEY,
    check_metadata,
    gc_paused,
    name_fault,
    visible_metadata,
)
from ._pytree import (
    ARRAY_LIKE,
    CONTAINERS,
    KEY,
    LEAF,
    LIST,
    NONE,
    SPEC,
    TUPLE,
    VAR,
    Level,
    is_jax_array,
    jax_module,
    leaf_spec,
    split,
    type_name,
)
from ._tree_record import MAX_TREE_DEPTH, OBJAX_TYPE_SEPARATOR, check_key
from ._treepath import Path, PathElem, join_path, match_key, render_path

__all__ = [
    "MAX_TREE_DEPTH",
    "RESERVED_PREFIX",
    "TREE_KEY",
    "SkippedLeavesWarning",
    "flatten_tree",
    "iter_names",
    "load_leaves",
    "load_tree",
    "save_tree",
    "split_metadata",
    "unflatten_names",
]

_JAX_FRAMEWORKS: Final = frozenset({"jax", "flax"})
_NUMPY_FRAMEWORKS: Final = frozenset({"numpy", "np"})
# How many problems a TreeStructureError lists before summarising the rest.
_MAX_LISTED: Final = 200


class SkippedLeavesWarning(UserWarning):
    """Some leaves of a saved tree were not arrays, so they were not stored and come back
    as ``None`` (pass ``like=`` to supply them)."""


# ----------------------------------------------------------------------------- flatten (save)


@dataclass
class _Flat:
    """A tree split into tensors; the record itself is returned by :func:`_encode`."""

    leaves: list[tuple[Path, Any, str]] = field(default_factory=list)  # path, value, kind
    names: list[str] = field(default_factory=list)  # filled by _assign_names
    type_suffix: bool = False  # append ::TypeName to objax variable names (safejax style)
    var_types: dict[int, str] = field(default_factory=dict)  # leaf index -> objax type


def _store_leaf(x: Any, level: Level, path: Path, flat: _Flat, var_type: str | None) -> rec.Node:
    """Collect one leaf's tensor; its record node (unnamed until _assign_names)."""
    kind, value = level.leaf, x
    if kind == SPEC:
        return rec.Skip(type_name(x))  # a template's slot holds no data
    if kind == KEY:
        jax = jax_module()
        kind = rec.key_kind(jax.random.key_impl(x))
        value = jax.random.key_data(x)
    elif kind in rec.PY_SCALARS:
        if isinstance(x, int) and not -(2**63) <= x < 2**64:
            raise DtypeError(
                f"leaf {render_path(path)} is the int {x}, too large for int64 or uint64; "
                "store it as a string in metadata instead"
            )
        value = np.asarray(x)
    elif kind == ARRAY_LIKE:
        try:
            value = np.asarray(x)
        except Exception as exc:
            raise DtypeError(
                f"leaf {render_path(path)}: cannot convert {type(x).__name__} to an array ({exc})"
            ) from exc
        kind = rec.ARRAY
    code_for_numpy(np.dtype(value.dtype), render_path(path))  # refuses with the path and the cast
    if var_type is not None:
        flat.var_types[len(flat.leaves)] = var_type
    flat.leaves.append((path, value, kind))
    return rec.Leaf("", kind)


def _encode(x: Any, path: Path, flat: _Flat, var_type: str | None = None) -> rec.Node:
    """Record ``x`` (recursively) and collect its storable leaves, in walk order."""
    if len(path) > MAX_TREE_DEPTH:
        raise TreeStructureError(
            f"the tree is nested deeper than {MAX_TREE_DEPTH} levels at "
            f"{render_path(path[:8])}...; flatten it first"
        )
    level = split(x)
    if level.kind == NONE:
        return None
    if level.kind == LEAF:
        return _store_leaf(x, level, path, flat, var_type)
    if level.kind == VAR:
        inner = level.type_name if level.objax else None
        return rec.Var(level.type_name, _encode(level.children[0][1], path, flat, inner))
    if level.kind in CONTAINERS:
        children = []
        for (k, key), child in level.children:
            elem = (k, check_key(key, path))
            children.append((elem, _encode(child, (*path, elem), flat)))
        return rec.Container(level.kind, tuple(children), level.type_name)
    return rec.Skip(level.type_name)


def _assign_names(flat: _Flat) -> None:
    """Give each leaf a unique, valid tensor name: the ``.``-joined path when that is free;
    otherwise (keys containing ``.`` colliding with nesting, NUL, ``__metadata__``) the
    joined path plus ``~N``. The recorded structure maps paths to names either way."""
    wanted = []
    for i, (path, _, _) in enumerate(flat.leaves):
        name = join_path(path)
        if flat.type_suffix and i in flat.var_types:
            name = f"{name}{OBJAX_TYPE_SEPARATOR}{flat.var_types[i]}"
        wanted.append(name)
    counts: dict[str, int] = {}
    for name in wanted:
        counts[name] = counts.get(name, 0) + 1
    owner = {n: i for i, n in enumerate(wanted) if counts[n] == 1 and name_fault(n) is None}
    # On a collision, the first path whose keys hold no "." (true nesting, what
    # flatten_dict would write) keeps the plain name; the others get a suffix.
    for i, name in enumerate(wanted):
        if counts[name] > 1 and name not in owner and name_fault(name) is None and not any(
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

def flatten_tree(
    tree: Any, metadata: Mapping[str, str] | None = None, *, objax_type_suffix: bool = False
) -> tuple[dict[str, Any], dict[str, str]]:
    """Split a tree into ``(tensors, metadata)`` ready for the writer: tensor name ->
    array, and the user's metadata plus the recorded structure under :data:`TREE_KEY`.

    Raises:
        HeaderError: user metadata is not str -> str, holds a NUL, or uses the reserved
            prefix (:func:`~safecodec._header.check_metadata`, the writer's check, with
            safecodec's own keys refused too: the structure is written here).
        TreeStructureError: a dict key cannot be recorded.
        DtypeError: an array leaf has no safetensors dtype (message names its path).
    """
    user = check_metadata(metadata, allow_internal=False)
    flat = _Flat(type_suffix=objax_type_suffix)
    root = _encode(tree, (), flat)
    _assign_names(flat)
    tensors = {name: value for name, (_, value, _) in zip(flat.names, flat.leaves, strict=True)}
    md = dict(user or {})
    md[TREE_KEY] = rec.encode_record(rec.name_leaves(root, flat.names), metadata is not None)
    return tensors, md


def save_tree(
    tree: Any,
    path: Any = None,
    metadata: Mapping[str, str] | None = None,
    *,
    alignment: int = 64,
    fs: Any = None,
    storage_options: dict[str, Any] | None = None,
    max_shard_size: int | str | None = None,
    remap: Any = None,
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
        remap: :class:`safecodec.remap.Rules` (usually ``rules.inverse()``): write the
            tensors the rules make from the tree's leaves, flat, under the rules' names
            (a Hugging Face checkpoint), without a recorded tree structure.

    Returns:
        The file's bytes when ``path`` is None, else None.

    Raises:
        DtypeError: An array leaf's dtype has no safetensors code (names its path and the
            cast to use), or a Python int does not fit 64 bits.
        TreeStructureError: A dict key that JSON cannot record exactly (e.g. a tuple).
        HeaderError: Metadata is not str -> str, holds a NUL, or uses the reserved
            prefix (as the writer refuses them; here safecodec's own keys too).

    Examples:
        >>> import numpy as np, safecodec as sc
        >>> data = sc.save_tree({"w": [np.ones(2, np.float32), None], "step": 3})
        >>> sc.load_tree(data)
        {'w': [array([1., 1.], dtype=float32), None], 'step': 3}
    """
    if remap is not None:  # safecodec.remap sits above this module: it is called, not imported
        check_metadata(metadata, allow_internal=False)  # no record: a user's would read as one
        tensors, md = remap.export(tree, metadata)
    else:
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
    if metadata is None:
        return None, {}
    own = {k: v for k, v in metadata.items() if k.startswith(RESERVED_PREFIX)}
    return visible_metadata(dict(metadata)), own


def _open(source: Any, *, fs: Any, copy: bool, jax: bool,
          storage_options: dict[str, Any] | None = None) -> Any:
    """A handle on ``source``: framework "jax" when any output leaf is a jax.Array."""
    return safe_open(source, "jax" if jax else "numpy", fs=fs, copy=copy,
                     storage_options=storage_options)


def _is_jax_slot(x: Any, level: Level) -> bool:
    """A template leaf that asks for a jax.Array (array, ShapeDtypeStruct, PRNG key)."""
    return level.kind == LEAF and (level.leaf in (KEY, SPEC) or is_jax_array(x))


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


def _tensor_info(header: Any, name: str, path: Path | None) -> Any:
    """The header entry of a tensor that the record (or a name) puts at ``path``.

    Raises:
        TreeStructureError: The file has no such tensor.
    """
    info = header.tensors.get(name)
    if info is None:
        where = "" if path is None else f" (at {render_path(path)})"
        raise TreeStructureError(
            f"the recorded tree structure refers to tensor {name!r}, which is not in the file{where}"
        )
    return info


def _refuse_unmentioned(header: Any, used: set[str], advice: str = "") -> None:
    """Refuse a file with tensors its recorded structure does not place."""
    extra = [n for n in header.tensors if n not in used]
    if extra:
        raise TreeStructureError(
            f"the file holds {len(extra)} tensor(s) its recorded tree structure does not "
            f"mention ({', '.join(map(repr, extra[:10]))}){advice}"
        )


# ----------------------------------------------------------------------------- the plan
#
# A load is decided before anything is read: the record (or the template) is walked
# once, every leaf checked against the header, every problem raised; the result is a
# _Plan: the tensors to load (_Planned) and the output's shape (_Shape), whose leaves
# are slot numbers. _load then reads every planned tensor in one batch and gives each
# slot its value; _build, the one builder, makes the containers.


class _Shape(NamedTuple):  # NamedTuples: a plan makes one per node, and they are cheap
    """A container of the output: ``rebuild(values of children, where)`` makes it; each
    child is a :class:`_Shape` or a slot number."""

    children: tuple[_Shape | int, ...]
    rebuild: Callable[[list[Any], str], Any]
    where: str = ""  # the container's path as rebuild's messages show it


class _Planned(NamedTuple):
    """A tensor to load into a slot, and the leaf it becomes."""

    slot: int
    name: str
    path: Path
    kind: str  # a leaf kind (_tree_record): ARRAY, NUMPY_SCALAR, a PY_SCALARS kind, a key kind
    jax: bool = False  # loaded as a jax.Array
    sharding: Any = None  # jax: where the array goes (None: JAX's default device)
    impl: Any = None  # jax: the PRNG implementation the loaded data is wrapped with
    scalar_type: type | None = None  # a Python scalar kind: the type given back


@dataclass
class _Plan:
    """What a load reads and builds, decided from the header (and the template) alone."""

    fixed: list[Any] = field(default_factory=list)  # every slot's value when nothing is loaded
    leaves: list[_Planned] = field(default_factory=list)
    used: set[str] = field(default_factory=set)  # tensors the record or the template places
    skipped: list[Path] = field(default_factory=list)  # saved leaves that were not stored

    def slot(self, value: Any = None) -> int:
        """A new slot holding ``value`` unless a tensor is planned into it."""
        self.fixed.append(value)
        return len(self.fixed) - 1

    def add(self, leaf: _Planned, info: Any) -> None:
        """Plan ``leaf``; a key to wrap is checked now, abstractly (nothing is read)."""
        if leaf.impl is not None:
            _wrap_key(leaf, info, shape_only=True)
        self.leaves.append(leaf)
        self.used.add(leaf.name)


def _wrap_key(leaf: _Planned, data: Any, *, shape_only: bool = False) -> Any:
    """A PRNG key array of ``leaf.impl`` from its raw ``data``: the one place keys are
    made, when planning (``shape_only``: ``data`` is the tensor's header entry, which JAX
    checks abstractly) and when building (the loaded array).

    Raises:
        TreeStructureError: JAX has no such implementation, or the data has the wrong
            shape or dtype for it.
    """
    jax = jax_module()
    try:
        if shape_only:
            spec = jax.ShapeDtypeStruct(tuple(data.shape), data.dtype.numpy)
            return jax.eval_shape(partial(jax.random.wrap_key_data, impl=leaf.impl), spec)
        return jax.random.wrap_key_data(data, impl=leaf.impl)
    except Exception as exc:  # whatever JAX raises for an unknown impl or a bad shape
        raise TreeStructureError(
            f"the recorded tree structure is inconsistent at {render_path(leaf.path)}: tensor "
            f"{leaf.name!r} cannot be a {rec.key_kind(leaf.impl)!r} key "
            f"({type(exc).__name__}: {exc})"[:400]
        ) from None


def _list(values: list[Any], where: str) -> Any:
    return values


def _tuple(values: list[Any], where: str) -> Any:
    return tuple(values)


def _dict(keys: list[Any], values: list[Any], where: str) -> Any:
    return dict(zip(keys, values, strict=True))


class _RecordPlan(rec.RecordVisitor["_Shape | int"]):
    """Plans a load without a template: the record with builtin containers (custom
    nodes become dicts), each leaf checked against its tensor."""

    def __init__(self, header: Any, jax_out: bool) -> None:
        self.header = header
        self.jax_out = jax_out
        self.plan = _Plan()

    def none(self, path: Path) -> _Shape | int:
        return self.plan.slot()

    def skip(self, path: Path, skip: rec.Skip) -> _Shape | int:
        self.plan.skipped.append(path)
        return self.plan.slot()

    def leaf(self, path: Path, leaf: rec.Leaf, var: rec.Var | None) -> _Shape | int:
        info = _tensor_info(self.header, leaf.name, path)
        kind, slot = leaf.kind, self.plan.slot()
        if kind == rec.ARRAY:  # most leaves: nothing to check, nothing to convert
            self.plan.add(_Planned(slot, leaf.name, path, kind, self.jax_out), info)
            return slot
        rec.check_leaf_tensor(leaf, info.shape, info.dtype.numpy, path)
        impl = rec.key_impl(kind)
        to_jax = self.jax_out and impl is not None
        self.plan.add(_Planned(slot, leaf.name, path, kind, to_jax, impl=impl if to_jax else None,
                               scalar_type=rec.PY_SCALARS.get(kind)), info)
        return slot

    def container(self, path: Path, node: rec.Container,
                  children: list[tuple[PathElem, _Shape | int]]) -> _Shape | int:
        if node.kind == LIST:
            rebuild: Callable[[list[Any], str], Any] = _list
        elif node.kind == TUPLE:
            rebuild = _tuple
        else:
            rebuild = partial(_dict, [key for (_, key), _ in children])
        return _Shape(tuple(child for _, child in children), rebuild)


def _names_record(names: list[str]) -> rec.Node:
    """The record of a file written without one: its names nested by ``.`` into dicts.

    Raises:
        TreeStructureError: A name nests deeper than :data:`MAX_TREE_DEPTH`, or is both
            a tensor and a prefix of another (:func:`unflatten_names`).
    """
    deep = next((n for n in names if n.count(".") >= MAX_TREE_DEPTH), None)
    if deep is not None:
        raise TreeStructureError(
            f"tensor name {deep[:80]!r}{'...' if len(deep) > 80 else ''} nests deeper than "
            f"{MAX_TREE_DEPTH} levels when split "
            "on '.'; load it flat (safecodec.load_file) instead"
        )
    return _dict_record(unflatten_names(names, rec.Leaf))


def _dict_record(nested: dict[str, Any]) -> rec.Container:
    return rec.Container("dict", tuple(
        (("k", key), value if isinstance(value, rec.Leaf) else _dict_record(value))
        for key, value in nested.items()))


def _plan_plain(header: Any, root: rec.Node, has_record: bool, jax_out: bool) -> tuple[_Plan, _Shape | int]:
    """The plan of a load without a template (see :func:`load_tree`)."""
    planner = _RecordPlan(header, jax_out)
    shape = rec.walk(root if has_record else _names_record(list(header.tensors)), planner)
    _refuse_unmentioned(header, planner.plan.used, "; it was changed after saving; load it "
                        "flat (safecodec.load_file) or with like=")
    return planner.plan, shape


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



# ----------------------------------------------------------------------------- templates


def _describe(shape: tuple[int, ...], dtype: Any) -> str:
    return f"{np.dtype(dtype).name}{list(shape)}"


def _flatten_template(like: Any) -> tuple[_Shape | int, list[tuple[Path, Any, Level]]]:
    """The template walked once: its containers as a :class:`_Shape` and its other nodes
    (stored leaves, opaque leaves, ``None``) in order, each in the slot of its number."""
    leaves: list[tuple[Path, Any, Level]] = []

    def walk(x: Any, path: Path) -> _Shape | int:
        level = split(x)
        if level.rebuild is not None and (level.kind == VAR or level.kind in CONTAINERS):
            var = level.kind == VAR  # a variable adds no path element
            children = tuple(walk(child, path if var else (*path, elem))
                             for elem, child in level.children[:1 if var else None])
            return _Shape(children, level.rebuild, render_path(path))
        leaves.append((path, x, level))
        return len(leaves) - 1

    return walk(like, ()), leaves


class _TemplatePlan:
    """Plans a load into a template: every node of the template matched against the file
    (through the record, or by ``.``-joined names without one); every problem (missing,
    unexpected, mismatched) collected and raised together."""

    def __init__(self, header: Any, entries: dict[tuple[Any, ...], rec.PathEntry] | None,
                 want_jax: bool | None) -> None:
        self.header = header
        self.entries = entries  # None: the file has no recorded structure
        self.want_jax = want_jax
        self.problems = _Problems()
        self.plan = _Plan()

    def run(self, nodes: list[tuple[Path, Any, Level]]) -> _Plan:
        """The plan for the template's ``nodes`` (:func:`_flatten_template`).

        Raises:
            TreeStructureError: The file does not match the template (every problem), or
                its record is inconsistent (the first fault).
        """
        for path, x, level in nodes:
            slot = self.plan.slot(x)  # what the template holds, unless a tensor replaces it
            if level.kind == NONE:
                self._none(path)
            elif level.kind == LEAF:
                self._leaf(slot, x, level, path)
            else:
                self._opaque(x, path)
        for name, info in self.header.tensors.items():
            if name not in self.plan.used:
                self.problems.unexpected.append(f"{name!r} {_describe(info.shape, info.dtype.numpy)}")
        self.problems.raise_if_any()
        return self.plan

    def _entry(self, path: Path) -> rec.PathEntry | None:
        if self.entries is not None:
            return self.entries.get(match_key(path))
        name = join_path(path)
        return rec.PathEntry("leaf", name) if name in self.header.tensors else None

    def _claimed(self, path: Path, what: str) -> None:
        """A template node that holds no array, where the file has a tensor."""
        e = self._entry(path)
        if e is not None and e.kind == "leaf":
            info = self.header.tensors.get(e.name)
            desc = _describe(info.shape, info.dtype.numpy) if info else "?"
            self.problems.mismatched.append(
                f"{render_path(path)}: template holds {what}, file has tensor {e.name!r} {desc}")
            self.plan.used.add(e.name)

    def _none(self, path: Path) -> None:
        self._claimed(path, "None")

    def _opaque(self, x: Any, path: Path) -> None:
        """A non-array leaf: the template supplies it."""
        self._claimed(path, type(x).__name__)

    def _leaf(self, slot: int, x: Any, level: Level, path: Path) -> None:
        e = self._entry(path)
        shape, dtype = leaf_spec(x, level)
        if e is None or e.kind != "leaf":
            what = "nothing" if e is None else ("a leaf that was not stored" if e.kind == "skip" else e.kind)
            self.problems.missing.append(
                f"{render_path(path)}: template expects {_describe(shape, dtype)}, file has {what}")
            return
        info = _tensor_info(self.header, e.name, path)
        if e.leaf is not None:
            rec.check_leaf_tensor(e.leaf, info.shape, info.dtype.numpy, path)
        self.plan.used.add(e.name)
        file_dtype = info.dtype.numpy
        scalar_type = type(x) if level.leaf in rec.PY_SCALARS else None
        dtype_ok = (file_dtype.kind in rec.SCALAR_DTYPE_KINDS[level.leaf] if scalar_type
                    else file_dtype == dtype)  # Python scalars take any dtype of their kind
        if tuple(info.shape) != shape or not dtype_ok:
            self.problems.mismatched.append(
                f"{render_path(path)}: template {_describe(shape, dtype)}, file {e.name!r} "
                f"{_describe(info.shape, file_dtype)}")
            return
        jax_slot = _is_jax_slot(x, level)
        to_jax = (jax_slot if self.want_jax is None else self.want_jax) and scalar_type is None
        sharding = getattr(x, "sharding", None) if to_jax and jax_slot else None
        kind, impl = (level.leaf if level.leaf in rec.LEAF_KINDS else rec.ARRAY), None
        if level.leaf == KEY and to_jax:
            impl = self._key_impl(x, e, info, path)
            if impl is None:
                return  # a mismatch, recorded
            kind = rec.key_kind(impl)
        self.plan.add(_Planned(slot, e.name, path, kind, jax=to_jax, sharding=sharding, impl=impl,
                               scalar_type=scalar_type), info)

    def _key_impl(self, x: Any, e: rec.PathEntry, info: Any, path: Path) -> Any:
        """The implementation a template's key slot is loaded with, the template's; None
        when the file's record names another (a mismatch, recorded). A recorded key kind
        must name an implementation JAX has: the error a load without the template gives."""
        jax = jax_module()
        # A key array knows its implementation; a ShapeDtypeStruct only through its dtype.
        impl = (jax.random.key_impl(x) if is_jax_array(x)
                else getattr(x.dtype, "_impl", None) or jax.config.jax_default_prng_impl)
        recorded = rec.key_impl(e.leaf.kind) if e.leaf is not None else None
        if recorded is None or rec.key_kind(impl) == rec.key_kind(recorded):
            return impl
        _wrap_key(_Planned(0, e.name, path, rec.key_kind(recorded), impl=recorded), info,
                  shape_only=True)  # raises for an implementation JAX does not have
        self.problems.mismatched.append(
            f"{render_path(path)}: template {rec.key_kind(impl)!r} key, file {e.name!r} "
            f"holds a {rec.key_kind(recorded)!r} key")
        return None


# ----------------------------------------------------------------------------- load and build


def _load(handle: Any, plan: _Plan) -> list[Any]:
    """Every slot's value: the planned tensors read in one batch (JAX leaves in one
    ``load_tensors`` call, with their shardings, under the JAX output layer's zero-copy
    and 64-bit policy), each made into the leaf it was planned as."""
    jax_names = [p.name for p in plan.leaves if p.jax]
    numpy_names = [p.name for p in plan.leaves if not p.jax]
    jax_arrays: dict[str, Any] = {}
    loaded: dict[str, Any] = {}
    if jax_names:
        shardings = {p.name: p.sharding for p in plan.leaves if p.jax and p.sharding is not None}
        jax_arrays = handle.load_tensors(jax_names, sharding=shardings or None)
    if numpy_names and handle.framework == "jax":
        # A JAX handle maps the file read-only: NumPy leaves next to JAX ones are copies.
        loaded = {name: handle.get_numpy(name) for name in numpy_names}
    elif numpy_names:
        loaded = handle.load_tensors(numpy_names)
    values = list(plan.fixed)
    for leaf in plan.leaves:
        values[leaf.slot] = _leaf_value(leaf, jax_arrays[leaf.name] if leaf.jax else loaded[leaf.name])
    return values


def _leaf_value(leaf: _Planned, value: Any) -> Any:
    """A loaded tensor as the leaf it was planned as (the record was checked against the
    tensor: :func:`~safecodec._tree_record.check_leaf_tensor`)."""
    if leaf.impl is not None:
        return _wrap_key(leaf, value)
    if leaf.jax:
        return value
    if leaf.kind == rec.NUMPY_SCALAR:
        return value[()]
    if leaf.scalar_type is not None:
        return leaf.scalar_type(value[()])
    return value  # an array (a key's raw data when the output is NumPy)


def _build(shape: _Shape | int, values: list[Any]) -> Any:
    """The output tree: the one builder, for builtin containers and a template's types
    (``Level.rebuild``) alike."""
    if isinstance(shape, int):
        return values[shape]
    return shape.rebuild([_build(child, values) for child in shape.children], shape.where)


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
    remap: Any = None,
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
        remap: :class:`safecodec.remap.Rules` mapping the checkpoint's tensors onto
            ``like`` (required with it): the same as ``safecodec.remap.plan(source,
            remap, like=like, framework=framework, copy=copy).load()`` (``framework``
            and ``copy`` as :func:`safecodec.remap.plan` takes them).

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
    if remap is not None:  # safecodec.remap sits above this module: it is called, not imported
        if like is None:
            raise SafecodecError("load_tree(remap=...) needs like=, the template to fill")
        fw = {True: "jax", False: "numpy", None: None}[_want_jax(framework)]
        planned = remap.plan(source, like, fs=fs, storage_options=storage_options,
                             framework=fw, copy=copy)
        user = split_metadata(planned.header.raw_metadata)[0]  # from the header it read
        tree = planned.load()
        return (tree, user) if with_metadata else tree
    want_jax = _want_jax(framework)
    template = _flatten_template(like) if like is not None else None
    if template is not None and want_jax is None:
        jax_handle = any(_is_jax_slot(x, level) for _, x, level in template[1])
    else:
        jax_handle = bool(want_jax)
    with _open(source, fs=fs, copy=copy, jax=jax_handle,
               storage_options=storage_options) as handle:
        header = handle.header
        user_md, own = split_metadata(header.raw_metadata)
        # The record, the plan and the built containers are a few acyclic objects per
        # leaf: the cyclic collector would only re-scan the heap (as for the header).
        with gc_paused():
            root = rec.decode_record(own[TREE_KEY]) if TREE_KEY in own else None
            if template is None:
                plan, shape = _plan_plain(header, root, TREE_KEY in own, bool(want_jax))
            else:
                shape, nodes = template
                entries = rec.path_entries(root) if TREE_KEY in own else None
                plan = _TemplatePlan(header, entries, want_jax).run(nodes)
        values = _load(handle, plan)
        with gc_paused():
            tree = _build(shape, values)
    if plan.skipped:
        skipped = plan.skipped
        shown = ", ".join(render_path(p) for p in skipped[:20])
        more = f" and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        warnings.warn(
            f"{len(skipped)} leaf/leaves of the saved tree were not arrays and were not stored; "
            f"they come back as None: {shown}{more}. Pass like= to supply them.",
            SkippedLeavesWarning,
            stacklevel=caller_stacklevel(),
        )
    return (tree, user_md) if with_metadata else tree


def load_leaves(source: Any, *, fs: Any = None) -> tuple[list[tuple[str, Any, str | None]], dict[str, str] | None]:
    """Every stored leaf of a file as ``(key, jax.Array, Objax type or None)``, in saved
    order, and the user metadata.

    Keys are the ``.``-joined paths (the tensor names unless names had to be
    disambiguated), without safejax's ``::Type`` suffix; the type comes from the recorded
    structure, or from that suffix in files written by safejax.

    Raises:
        TreeStructureError: The recorded structure is inconsistent or misses tensors.
        SafecodecError: Not a valid safetensors file.
    """
    with _open(source, fs=fs, copy=False, jax=True) as handle:
        header = handle.header
        user_md, own = split_metadata(header.raw_metadata)
        triples: list[tuple[str, str, str | None]] = []
        if TREE_KEY in own:
            triples = rec.record_leaves(rec.decode_record(own[TREE_KEY]))
        else:
            for name in header.tensors:
                key, sep, kind = name.rpartition(OBJAX_TYPE_SEPARATOR)
                triples.append((name, key, kind) if sep else (name, name, None))
        plan = _Plan()
        for name, _, _ in triples:
            info = _tensor_info(header, name, None)
            plan.add(_Planned(plan.slot(), name, (), rec.ARRAY, jax=True), info)
        _refuse_unmentioned(header, plan.used)
        arrays = _build(_Shape(tuple(range(len(triples))), _list), _load(handle, plan))
    return [(key, arr, kind) for (_, key, kind), arr in zip(triples, arrays, strict=True)], user_md


def iter_names(tree: Any) -> Iterator[str]:
    """The tensor names :func:`save_tree` would give ``tree``'s leaves, in order."""
    flat = _Flat()
    _encode(tree, (), flat)
    _assign_names(flat)
    yield from flat.names
