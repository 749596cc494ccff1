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

What a live object is comes from :func:`safecodec._pytree.split` (one type cascade);
the record is read and written by :mod:`safecodec._tree_record` (one walker); files are
opened through the routers of :mod:`safecodec._api` only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from . import _tree_record as rec
from ._api import safe_open, save, save_file
from ._dtypes import caller_stacklevel, code_for_numpy
from ._errors import DtypeError, SafecodecError, TreeStructureError
from ._header import RESERVED_PREFIX, TREE_KEY, visible_metadata
from ._pytree import (
    ARRAY_LIKE,
    CONTAINERS,
    KEY,
    LEAF,
    NONE,
    SPEC,
    VAR,
    Level,
    is_jax_array,
    jax_module,
    leaf_spec,
    split,
    type_name,
)
from ._tree_record import MAX_TREE_DEPTH, OBJAX_TYPE_SEPARATOR, check_key
from ._treepath import Path, join_path, match_key, render_path

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
# Leaf kinds that are Python scalars (rebuilt with their own type from a 0-d tensor).
_PY_SCALARS: Final = frozenset({"int", "float", "bool", "complex"})


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
        kind = f"{rec.KEY_KIND_PREFIX}{jax.random.key_impl(x)}"
        value = jax.random.key_data(x)
    elif kind in _PY_SCALARS:
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
        kind = "array"
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
        name = join_path(path)
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
    root = _encode(tree, (), flat)
    _assign_names(flat)
    tensors = {name: value for name, (_, value, _) in zip(flat.names, flat.leaves, strict=True)}
    md = dict(user or {})
    md[TREE_KEY] = rec.encode_record(rec.name_leaves(root, flat.names), metadata is not None)
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
        SafecodecError: Metadata uses the reserved prefix or is not str -> str.

    Examples:
        >>> import numpy as np, safecodec as sc
        >>> data = sc.save_tree({"w": [np.ones(2, np.float32), None], "step": 3})
        >>> sc.load_tree(data)
        {'w': [array([1., 1.], dtype=float32), None], 'step': 3}
    """
    if remap is not None:  # safecodec.remap sits above this module: it is called, not imported
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



class _Loader:
    """Fetches tensors from one open handle and converts them to the requested outputs.

    JAX outputs go through the JAX output layer (:mod:`safecodec._jax_load`) in one batch
    at the end, so zero-copy aliasing, batched transfers, shardings and its 64-bit policy
    (a :class:`~safecodec._jax_load.PrecisionWarning` when x64 is off) apply unchanged.
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

    def tensor_info(self, name: str, path: Path) -> Any:
        """The header entry of a tensor the record names at ``path``.

        Raises:
            TreeStructureError: The file has no such tensor.
        """
        info = self.handle.header.tensors.get(name) if name in self.handle else None
        if info is None:
            raise TreeStructureError(
                f"the recorded tree structure refers to tensor {name!r}, which is not in the file"
                f" (at {render_path(path)})"
            )
        return info


def _open(source: Any, *, fs: Any, copy: bool, jax: bool,
          storage_options: dict[str, Any] | None = None) -> Any:
    """A handle on ``source``: framework "jax" when any output leaf is a jax.Array."""
    return safe_open(source, "jax" if jax else "numpy", fs=fs, copy=copy,
                     storage_options=storage_options)


def _is_jax_slot(x: Any, level: Level) -> bool:
    """A template leaf that asks for a jax.Array (array, ShapeDtypeStruct, PRNG key)."""
    return level.kind == LEAF and (level.leaf in (KEY, SPEC) or is_jax_array(x))


def _template_has_jax(like: Any) -> bool:
    """Whether a template holds jax arrays, ShapeDtypeStructs or PRNG keys."""
    if jax_module() is None:
        return False
    stack = [like]
    while stack:
        x = stack.pop()
        level = split(x)
        if _is_jax_slot(x, level):
            return True
        stack.extend(child for _, child in level.children)
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
    """A stored leaf in its original Python/NumPy form (numpy outputs); the record was
    checked against the tensor (:func:`~safecodec._tree_record.check_leaf_tensor`)."""
    if kind == "numpy":
        return arr[()]
    if kind in _PY_SCALARS:
        return {"int": int, "float": float, "bool": bool, "complex": complex}[kind](arr[()])
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


class _Deferred:
    """A container to build once every leaf (jax conversions included) is ready."""

    __slots__ = ("build",)

    def __init__(self, build: Callable[[], Any]) -> None:
        self.build = build


class _PlainBuilder(rec.RecordVisitor[Any]):
    """Rebuilds a record with builtin containers (custom nodes become dicts)."""

    def __init__(self, loader: _Loader, jax_out: bool) -> None:
        self.loader = loader
        self.jax_out = jax_out
        self.skipped: list[Path] = []

    def none(self, path: Path) -> Any:
        return None

    def skip(self, path: Path, skip: rec.Skip) -> Any:
        self.skipped.append(path)
        return None

    def leaf(self, path: Path, leaf: rec.Leaf, var: rec.Var | None) -> Any:
        info = self.loader.tensor_info(leaf.name, path)
        rec.check_leaf_tensor(leaf, info.shape, info.dtype.numpy, path)
        is_key = leaf.kind.startswith(rec.KEY_KIND_PREFIX)
        if not (self.jax_out and (is_key or leaf.kind == "array")):
            return _restore_leaf(self.loader.numpy(leaf.name), leaf.kind)
        slot = _Slot()
        impl = leaf.kind[len(rec.KEY_KIND_PREFIX):] if is_key else None

        def setter(value: Any) -> None:
            slot.value = value if impl is None else _wrap_key(value, impl, leaf, path)

        self.loader.to_jax(leaf.name, None, setter)
        return slot

    def container(self, path: Path, node: rec.Container, children: list[tuple[Any, Any]]) -> Any:
        if node.kind == "list":
            return [v for _, v in children]
        if node.kind == "tuple":
            return tuple(v for _, v in children)
        return {key: v for (_, key), v in children}


def _wrap_key(data: Any, impl: str, leaf: rec.Leaf, path: Path) -> Any:
    """A PRNG key array from its raw data; a file naming an implementation JAX does not
    have, or data of the wrong shape for it, is a record fault."""
    try:
        return jax_module().random.wrap_key_data(data, impl=impl)
    except Exception as exc:  # whatever JAX raises for an unknown impl or a bad shape
        raise TreeStructureError(
            f"the recorded tree structure is inconsistent at {render_path(path)}: tensor "
            f"{leaf.name!r} cannot be a {leaf.kind!r} key ({type(exc).__name__}: {exc})"[:400]
        ) from None


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




def _scalar_dtype_ok(kind: str, file_dtype: np.dtype[Any]) -> bool:
    """Python scalars in a template accept any file dtype of the same kind."""
    return file_dtype.kind in rec.SCALAR_DTYPE_KINDS[kind]


class _TemplateFill:
    """Rebuilds a template tree with leaves from a file, checking as it goes."""

    def __init__(self, loader: _Loader, entries: dict[tuple[Any, ...], rec.PathEntry] | None,
                 names_by_join: set[str], want_jax: bool | None) -> None:
        self.loader = loader
        self.entries = entries  # None: the file has no recorded structure
        self.names_by_join = names_by_join
        self.want_jax = want_jax
        self.problems = _Problems()

    def entry(self, path: Path) -> rec.PathEntry | None:
        if self.entries is not None:
            return self.entries.get(match_key(path))
        name = join_path(path)
        return rec.PathEntry("leaf", name) if name in self.names_by_join else None

    def fill(self, x: Any, path: Path) -> Any:
        level = split(x)
        if level.kind == NONE:
            e = self.entry(path)
            if e is not None and e.kind == "leaf":
                self._unexpected_at(path, e)
            return None
        if level.kind == LEAF:
            return self._leaf(x, level, path)
        rebuild = level.rebuild
        if level.kind == VAR and rebuild is not None:
            vals = [self.fill(level.children[0][1], path)]
        elif level.kind in CONTAINERS and rebuild is not None:
            vals = [self.fill(child, (*path, elem)) for elem, child in level.children]
        else:
            return self._opaque(x, path)
        where = render_path(path)
        return _Deferred(lambda: rebuild([_resolve(v) for v in vals], where))

    def _opaque(self, x: Any, path: Path) -> Any:
        """A non-array leaf: the template supplies it."""
        e = self.entry(path)
        if e is not None and e.kind == "leaf":
            info = self.loader.handle.header.tensors.get(e.name)
            self.problems.mismatched.append(
                f"{render_path(path)}: template holds {type(x).__name__}, file has tensor "
                f"{e.name!r} {_describe(info.shape, info.dtype.numpy) if info else ''}".rstrip())
            self.loader.used.add(e.name)
        return x

    def _unexpected_at(self, path: Path, e: rec.PathEntry) -> None:
        self.loader.used.add(e.name)
        info = self.loader.handle.header.tensors.get(e.name)
        desc = _describe(info.shape, info.dtype.numpy) if info else "?"
        self.problems.mismatched.append(
            f"{render_path(path)}: template holds None, file has tensor {e.name!r} {desc}")

    def _leaf(self, x: Any, level: Level, path: Path) -> Any:
        e = self.entry(path)
        shape, dtype = leaf_spec(x, level)
        if e is None or e.kind != "leaf":
            what = "nothing" if e is None else ("a leaf that was not stored" if e.kind == "skip" else e.kind)
            self.problems.missing.append(
                f"{render_path(path)}: template expects {_describe(shape, dtype)}, file has {what}")
            return x
        info = self.loader.tensor_info(e.name, path)
        if e.leaf is not None:
            rec.check_leaf_tensor(e.leaf, info.shape, info.dtype.numpy, path)
        self.loader.used.add(e.name)
        file_dtype = info.dtype.numpy
        is_py = level.leaf in _PY_SCALARS
        dtype_ok = _scalar_dtype_ok(level.leaf, file_dtype) if is_py else file_dtype == dtype
        if tuple(info.shape) != shape or not dtype_ok:
            self.problems.mismatched.append(
                f"{render_path(path)}: template {_describe(shape, dtype)}, file {e.name!r} "
                f"{_describe(info.shape, file_dtype)}")
            return x
        jax_leaf = _is_jax_slot(x, level)
        to_jax = self.want_jax if self.want_jax is not None else jax_leaf
        if level.leaf == KEY and self.loader.handle.framework == "jax":
            # A key array knows its implementation; a ShapeDtypeStruct only through its dtype.
            impl = (jax_module().random.key_impl(x) if is_jax_array(x)
                    else getattr(x.dtype, "_impl", None))
            slot = _Slot()

            def set_key(v: Any) -> None:
                slot.value = jax_module().random.wrap_key_data(v, impl=impl)

            self.loader.to_jax(e.name, getattr(x, "sharding", None), set_key)
            return slot
        if to_jax and not is_py:
            slot = _Slot()
            sharding = getattr(x, "sharding", None) if jax_leaf else None
            self.loader.to_jax(e.name, sharding, slot.set)
            return slot
        arr = self.loader.numpy(e.name)
        if is_py:
            return type(x)(arr[()])
        if level.leaf == "numpy":
            return arr[()]
        return arr

    def report_unused(self) -> None:
        header = self.loader.handle.header
        for name, info in header.tensors.items():
            if name not in self.loader.used:
                self.problems.unexpected.append(f"{name!r} {_describe(info.shape, info.dtype.numpy)}")


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
        tree = remap.plan(source, like, fs=fs, storage_options=storage_options, framework=fw,
                          copy=copy).load()
        if with_metadata:
            with _open(source, fs=fs, copy=False, jax=False, storage_options=storage_options) as h:
                return tree, split_metadata(h.header.raw_metadata)[0]
        return tree
    want_jax = _want_jax(framework)
    jax_handle = bool(want_jax) if like is None or want_jax is not None else _template_has_jax(like)
    with _open(source, fs=fs, copy=copy, jax=jax_handle,
               storage_options=storage_options) as handle:
        header = handle.header
        user_md, own = split_metadata(header.raw_metadata)
        root = rec.decode_record(own[TREE_KEY]) if TREE_KEY in own else None
        loader = _Loader(handle)
        if like is None:
            tree = _load_plain(handle, root, TREE_KEY in own, loader, bool(want_jax))
        else:
            entries = rec.path_entries(root) if TREE_KEY in own else None
            filler = _TemplateFill(loader, entries, set(header.tensors), want_jax)
            built = filler.fill(like, ())
            filler.report_unused()
            filler.problems.raise_if_any()
            loader.finish()
            tree = _resolve(built)
    return (tree, user_md) if with_metadata else tree


def _load_plain(handle: Any, root: rec.Node, has_record: bool, loader: _Loader, jax_out: bool) -> Any:
    skipped: list[Path] = []
    if not has_record:
        names = list(handle.header.tensors)
        if jax_out:
            def get(name: str) -> _Slot:
                slot = _Slot()
                loader.to_jax(name, None, slot.set)
                return slot

            tree = unflatten_names(names, get)
        else:
            tree = unflatten_names(names, loader.numpy)
    else:
        builder = _PlainBuilder(loader, jax_out)
        tree = rec.walk(root, builder)
        skipped = builder.skipped
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
        user_md, own = split_metadata(handle.header.raw_metadata)
        triples: list[tuple[str, str, str | None]] = []
        if TREE_KEY in own:
            triples = rec.record_leaves(rec.decode_record(own[TREE_KEY]))
        else:
            for name in handle.header.tensors:
                key, sep, kind = name.rpartition(OBJAX_TYPE_SEPARATOR)
                triples.append((name, key, kind) if sep else (name, name, None))
        loader = _Loader(handle)
        slots = [_Slot() for _ in triples]
        for (name, _, _), slot in zip(triples, slots, strict=True):
            loader.to_jax(name, None, slot.set)
        extra = [n for n in handle.header.tensors if n not in loader.used]
        if extra:
            raise TreeStructureError(
                f"the file holds {len(extra)} tensor(s) its recorded tree structure does not "
                f"mention ({', '.join(map(repr, extra[:10]))})"
            )
        loader.finish()
    return [(key, slot.value, kind) for (_, key, kind), slot in zip(triples, slots, strict=True)], user_md


def iter_names(tree: Any) -> Iterator[str]:
    """The tensor names :func:`save_tree` would give ``tree``'s leaves, in order."""
    flat = _Flat()
    _encode(tree, (), flat)
    _assign_names(flat)
    yield from flat.names
