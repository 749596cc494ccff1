"""Checkpoints in another layout (Hugging Face, PyTorch) into JAX trees, and back.

A :class:`Rules` table says, declaratively, how the tensors of a checkpoint become the
leaves of a template tree::

    from safecodec import remap as R

    rules = R.Rules(
        R.map("model.embed_tokens.weight", "embed.embedding"),
        R.map("model.layers.{i}.self_attn.q_proj.weight", "layers.attn.q",
              R.transpose(1, 0), R.split_axis(1, (4, 8)), stack="i"),
        R.map("model.layers.{i}.mlp.gate_up_proj.weight", ["layers.mlp.gate", "layers.mlp.up"],
              R.chunk(0, 2), R.transpose(1, 0), stack="i"),
        ignore=[r".*rotary_emb\\.inv_freq"],
    )
    state = sc.load_tree("ckpt/", like=abstract_state, remap=rules)

Names. A source pattern is a tensor name in which ``{name}`` placeholders match one or
more characters inside one ``.``-separated component (never a dot); a placeholder may be
part of a component (``mlp.{p}_proj.weight``). Target names are the template's leaf names
as :func:`~safecodec.save_tree` writes them (keys joined by ``.``; NNX variables add no
part). Every placeholder of a target or of ``stack=`` appears in the source pattern.
``stack="i"`` puts the tensors for ``i = 0..n-1`` (all required, numeric order) on a new
leading axis. When several rules match one tensor name, the pattern with the most literal
characters wins; two equally specific rules are an error.

Operations apply in order, in source coordinates: :func:`transpose`, :func:`split_axis`,
:func:`merge_axes`, :func:`chunk` (one source, several targets; the operations after it
apply to each piece), :func:`index` (a basic NumPy index), :func:`astype`, and the escape
hatch :func:`fn` (the whole source tensor is read; the plan says so).

Dtypes. The template decides: an exact cast (bf16/f16 to f32, widening integers) is done
without asking; a cast that loses range or precision must be written as :func:`astype`
(the plan lists it as lossy).

The plan (:func:`plan`) is built from headers alone, and reports every problem at once in
one :class:`~safecodec.TreeStructureError`: tensors no rule maps, template leaves no rule
fills, rules that match nothing, shapes the operations do not produce and casts that are
refused, each with the source and the target name. Loading reads, for each distinct block
of the template's shardings that this process holds (replicated blocks once), one box per
source tensor: the operations are inverted to find the box (its bounding box where a
split or merge makes the exact set non-rectangular), the box is read (from a mapped file:
a view, no copy), and the operations run forward on views. The block's one copy is the
placement's: XLA copies (and transposes) the view of an unstacked target straight from
the mapping into device memory; a stacked target's layer boxes are first gathered into a
small staging array reused per thread; a cast goes through NumPy; a block held by several
devices is copied once into aligned memory that every CPU device aliases. The blocks of
all leaves are built on the thread pool (:func:`~safecodec.set_threads`), and each leaf
is assembled with ``jax.make_array_from_single_device_arrays``. Nothing is compiled, and
no whole tensor is copied to the host unless :func:`fn` asks for it. ``framework=``
(``"numpy"``/``"jax"``) overrides the template's leaf kinds and ``copy=True`` reads with
positioned reads instead of a mapping (:func:`plan`).

:meth:`Rules.inverse` gives the rules back the other way, for
``save_tree(tree, path, remap=rules.inverse(like=original))``: the checkpoint comes out
with the original names, layout and (given the original checkpoint) dtypes.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from ._api import read_header, safe_open
from ._errors import SafecodecError, TreeStructureError
from ._header import Header, visible_metadata
from ._jax_load import aliasable_address
from ._jax_put import aligned_empty, is_aligned, placement
from ._progress import ProgressBar
from ._pytree import (
    CONTAINERS,
    KEY,
    LEAF,
    NONE,
    SPEC,
    VAR,
    is_jax_array,
    jax_module,
    leaf_spec,
    split,
)
from ._reader import MEMORY_ROUTES, read_route
from ._threads import MIN_PIECE, get_threads, run_concurrently
from ._tree_record import ARRAY, NUMPY_SCALAR, PY_SCALARS
from ._treepath import Path, join_path, render_path

__all__ = [
    "Op",
    "Plan",
    "Rule",
    "Rules",
    "astype",
    "chunk",
    "fn",
    "index",
    "map",
    "merge_axes",
    "plan",
    "split_axis",
    "torch_to_flax",
    "transpose",
]

#: How many problems one TreeStructureError lists before summarising the rest.
MAX_LISTED: Final = 200
_PLACEHOLDER: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

Region = tuple[range, ...]
_Step = tuple[Callable[[np.ndarray], np.ndarray], Region, Region]  # forward, cover, wanted


class _OpError(Exception):
    """An operation does not apply to a shape (turned into a plan problem)."""


def _full(shape: Sequence[int]) -> Region:
    return tuple(range(n) for n in shape)


def _positive(r: range) -> range:
    """The same set of indices with a positive step (length 1 and 0 normalised)."""
    if len(r) == 0:
        return range(0)
    if len(r) == 1:
        return range(r[0], r[0] + 1)
    return r if r.step > 0 else r[::-1]


def _axis(axis: int, ndim: int, what: str) -> int:
    if not -ndim <= axis < ndim:
        raise _OpError(f"{what}: axis {axis} out of range for {ndim} dimensions")
    return axis % ndim


# ----------------------------------------------------------------------------- operations


class Op:
    """One operation of a rule, in source coordinates. Built by the functions of this
    module (:func:`transpose`, :func:`split_axis`...), not directly."""

    #: Whether the operation needs the whole source tensor (:func:`fn`).
    whole: bool = False

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape after the operation (raises _OpError when it does not apply)."""
        raise NotImplementedError

    def out_dtype(self, dtype: np.dtype[Any]) -> np.dtype[Any]:
        """The dtype after the operation."""
        return dtype

    def forward(self, arr: np.ndarray) -> np.ndarray:
        """The operation on a whole array."""
        raise NotImplementedError

    def pull(self, want: Region, in_shape: tuple[int, ...],
             out_shape: tuple[int, ...]) -> tuple[Region, Region, Callable[[np.ndarray], np.ndarray]]:
        """Invert the operation on a block: ``want`` (positive-step ranges of the output)
        gives ``(needed input region, output region covered, forward on the block)``; the
        cover contains ``want`` and is cut down to it after the forward step."""
        raise NotImplementedError

    def inverse(self, in_shape: tuple[int, ...] | None, in_dtype: np.dtype[Any] | None) -> Op:
        """The operation that undoes this one (``in_shape``/``in_dtype``: the source's,
        when known)."""
        raise SafecodecError(f"{self!r} cannot be inverted")


@dataclass(frozen=True)
class _Transpose(Op):
    axes: tuple[int, ...]

    def __repr__(self) -> str:
        return f"transpose{self.axes}"

    def _axes(self, ndim: int) -> tuple[int, ...]:
        if sorted(a % ndim if -ndim <= a < ndim else -1 for a in self.axes) != list(range(ndim)):
            raise _OpError(f"{self!r} is not a permutation of {ndim} axes")
        return tuple(a % ndim for a in self.axes)

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[a] for a in self._axes(len(shape)))

    def forward(self, arr: np.ndarray) -> np.ndarray:
        return arr.transpose(self._axes(arr.ndim))

    def pull(self, want: Region, in_shape: tuple[int, ...],
             out_shape: tuple[int, ...]) -> tuple[Region, Region, Callable[[np.ndarray], np.ndarray]]:
        axes = self._axes(len(in_shape))
        need = [range(0)] * len(axes)
        for k, a in enumerate(axes):
            need[a] = want[k]
        return tuple(need), want, lambda b: b.transpose(axes)

    def inverse(self, in_shape: tuple[int, ...] | None, in_dtype: np.dtype[Any] | None) -> Op:
        return _Transpose(tuple(int(a) for a in np.argsort([a % len(self.axes) for a in self.axes])))


def _resolve_sizes(sizes: tuple[int, ...], total: int, what: str) -> tuple[int, ...]:
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    known = math.prod(s for s in sizes if s != -1)
    if len(unknown) > 1 or any(s < -1 for s in sizes):
        raise _OpError(f"{what}: sizes may hold one -1 and no other negative number")
    if unknown:
        if known == 0 or total % known:
            raise _OpError(f"{what}: an axis of {total} cannot be split into {list(sizes)}")
        sizes = tuple(total // known if s == -1 else s for s in sizes)
    if math.prod(sizes) != total:
        raise _OpError(f"{what}: an axis of {total} cannot be split into {list(sizes)}")
    return sizes


@dataclass(frozen=True)
class _SplitAxis(Op):
    axis: int
    sizes: tuple[int, ...]

    def __repr__(self) -> str:
        return f"split_axis({self.axis}, {self.sizes})"

    def _parts(self, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        a = _axis(self.axis, len(shape), repr(self))
        return a, _resolve_sizes(self.sizes, shape[a], repr(self))

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        a, sizes = self._parts(shape)
        return shape[:a] + sizes + shape[a + 1:]

    def forward(self, arr: np.ndarray) -> np.ndarray:
        return arr.reshape(self.out_shape(arr.shape))

    def pull(self, want: Region, in_shape: tuple[int, ...],
             out_shape: tuple[int, ...]) -> tuple[Region, Region, Callable[[np.ndarray], np.ndarray]]:
        a, sizes = self._parts(in_shape)
        m = len(sizes)
        outs = want[a:a + m]
        strides = [math.prod(sizes[j + 1:]) for j in range(m)]
        k = next((j for j in range(m) if len(outs[j]) > 1), m - 1)
        covers = [*outs[:k], range(outs[k][0], outs[k][-1] + 1), *(range(s) for s in sizes[k + 1:])]
        base = sum(outs[j][0] * strides[j] for j in range(k))
        start = base + covers[k].start * strides[k]
        stop = base + (covers[k].stop - 1) * strides[k] + strides[k]
        lens = tuple(len(c) for c in covers)
        need = (*want[:a], range(start, stop), *want[a + m:])
        cover = (*want[:a], *covers, *want[a + m:])
        return need, cover, lambda b: b.reshape(b.shape[:a] + lens + b.shape[a + 1:])

    def inverse(self, in_shape: tuple[int, ...] | None, in_dtype: np.dtype[Any] | None) -> Op:
        return _MergeAxes(self.axis, len(self.sizes))


@dataclass(frozen=True)
class _MergeAxes(Op):
    axis: int
    count: int

    def __repr__(self) -> str:
        return f"merge_axes({self.axis}, {self.count})"

    def _axis0(self, ndim: int) -> int:
        a = _axis(self.axis, ndim, repr(self))
        if self.count < 1 or a + self.count > ndim:
            raise _OpError(f"{self!r}: {ndim} dimensions have no {self.count} axes from {a}")
        return a

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        a = self._axis0(len(shape))
        return (*shape[:a], math.prod(shape[a:a + self.count]), *shape[a + self.count:])

    def forward(self, arr: np.ndarray) -> np.ndarray:
        return arr.reshape(self.out_shape(arr.shape))

    def pull(self, want: Region, in_shape: tuple[int, ...],
             out_shape: tuple[int, ...]) -> tuple[Region, Region, Callable[[np.ndarray], np.ndarray]]:
        a = self._axis0(len(in_shape))
        sizes = in_shape[a:a + self.count]
        r = want[a]
        ia = np.unravel_index(r[0], sizes)
        ib = np.unravel_index(r[-1], sizes)
        k = next((j for j in range(self.count) if ia[j] != ib[j]), self.count - 1)
        ranges = [range(int(ia[j]), int(ia[j]) + 1) for j in range(k)]
        ranges.append(range(int(ia[k]), int(ib[k]) + 1))
        ranges.extend(range(s) for s in sizes[k + 1:])
        first = int(np.ravel_multi_index(tuple(rg[0] for rg in ranges), sizes))
        last = int(np.ravel_multi_index(tuple(rg[-1] for rg in ranges), sizes))
        need = (*want[:a], *ranges, *want[a + 1:])
        cover = (*want[:a], range(first, last + 1), *want[a + 1:])
        count = self.count
        return need, cover, lambda b: b.reshape((*b.shape[:a], -1, *b.shape[a + count:]))

    def inverse(self, in_shape: tuple[int, ...] | None, in_dtype: np.dtype[Any] | None) -> Op:
        if in_shape is None:
            raise SafecodecError(f"{self!r} cannot be inverted without the original shapes; "
                                 "pass like=<the original checkpoint> to Rules.inverse")
        a = self._axis0(len(in_shape))
        return _SplitAxis(self.axis, tuple(in_shape[a:a + self.count]))


def _basic_index(idx: Any, shape: tuple[int, ...], what: str) -> list[Any]:
    """A basic NumPy index as one entry per output-or-input axis: ``None`` (new axis),
    ``int`` (input axis removed) or ``range`` (input axis kept, those indices)."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    for it in items:
        if not (it is None or it is Ellipsis or isinstance(it, slice)
                or (isinstance(it, (int, np.integer)) and not isinstance(it, bool))):
            raise _OpError(f"{what}: only basic indices (ints, slices, None, ...) are allowed, "
                           f"got {type(it).__name__}")
    used = sum(1 for it in items if it is not None and it is not Ellipsis)
    if sum(1 for it in items if it is Ellipsis) > 1 or used > len(shape):
        raise _OpError(f"{what}: too many indices for {len(shape)} dimensions")
    if Ellipsis in items:
        e = items.index(Ellipsis)
        items[e:e + 1] = [slice(None)] * (len(shape) - used)
    else:
        items.extend([slice(None)] * (len(shape) - used))
    out: list[Any] = []
    dim = 0
    for it in items:
        if it is None:
            out.append(None)
            continue
        n = shape[dim]
        if isinstance(it, slice):
            out.append(range(*it.indices(n)))
        else:
            i = int(it)
            if not -n <= i < n:
                raise _OpError(f"{what}: index {i} out of range for an axis of {n}")
            out.append(i % n)
        dim += 1
    return out


@dataclass(frozen=True)
class _Index(Op):
    idx: Any

    def __repr__(self) -> str:
        return f"index({self.idx!r})"

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(1 if e is None else len(e) for e in _basic_index(self.idx, shape, repr(self))
                     if not isinstance(e, int))

    def forward(self, arr: np.ndarray) -> np.ndarray:
        out: np.ndarray = arr[self.idx]
        return out

    def pull(self, want: Region, in_shape: tuple[int, ...],
             out_shape: tuple[int, ...]) -> tuple[Region, Region, Callable[[np.ndarray], np.ndarray]]:
        need: list[range] = []
        local: list[Any] = []
        o = 0
        for e in _basic_index(self.idx, in_shape, repr(self)):
            if e is None:
                local.append(None)
                o += 1
            elif isinstance(e, int):
                need.append(range(e, e + 1))
                local.append(0)
            else:
                r = want[o]
                sel = e[r.start:r.stop:r.step]
                o += 1
                if sel.step < 0 and len(sel) > 1:
                    need.append(_positive(sel))
                    local.append(slice(None, None, -1))
                else:
                    need.append(_positive(sel))
                    local.append(slice(None))
        key = tuple(local)
        return tuple(need), want, lambda b: b[key]


@dataclass(frozen=True)
class _ChunkPiece(Op):
    """Piece ``j`` of :func:`chunk`: a slice of one axis (sizes from the shape)."""

    axis: int
    split: int | tuple[int, ...]
    j: int

    def __repr__(self) -> str:
        split_ = list(self.split) if isinstance(self.split, tuple) else self.split
        return f"chunk({self.axis}, {split_})" + (f"[{self.j}]" if self.j >= 0 else "")

    def sizes(self, n: int) -> tuple[int, ...]:
        if isinstance(self.split, int):
            if self.split < 1 or n % self.split:
                raise _OpError(f"chunk({self.axis}, {self.split}): an axis of {n} does not "
                               f"split into {self.split} equal pieces")
            return (n // self.split,) * self.split
        if sum(self.split) != n or any(s < 0 for s in self.split):
            raise _OpError(f"chunk({self.axis}, {list(self.split)}): sizes sum to "
                           f"{sum(self.split)}, the axis has {n}")
        return self.split

    def _as_index(self, shape: tuple[int, ...]) -> _Index:
        a = _axis(self.axis, len(shape), repr(self))
        sizes = self.sizes(shape[a])
        start = sum(sizes[:self.j])
        return _Index((slice(None),) * a + (slice(start, start + sizes[self.j]),))

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return self._as_index(shape).out_shape(shape)

    def forward(self, arr: np.ndarray) -> np.ndarray:
        return self._as_index(arr.shape).forward(arr)

    def pull(self, want: Region, in_shape: tuple[int, ...],
             out_shape: tuple[int, ...]) -> tuple[Region, Region, Callable[[np.ndarray], np.ndarray]]:
        return self._as_index(in_shape).pull(want, in_shape, out_shape)


@dataclass(frozen=True)
class _Astype(Op):
    dtype: np.dtype[Any]

    def __repr__(self) -> str:
        return f"astype({self.dtype.name!r})"

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def out_dtype(self, dtype: np.dtype[Any]) -> np.dtype[Any]:
        return self.dtype

    def forward(self, arr: np.ndarray) -> np.ndarray:
        return arr.astype(self.dtype)

    def pull(self, want: Region, in_shape: tuple[int, ...],
             out_shape: tuple[int, ...]) -> tuple[Region, Region, Callable[[np.ndarray], np.ndarray]]:
        dt = self.dtype
        return want, want, lambda b: b.astype(dt)

    def inverse(self, in_shape: tuple[int, ...] | None, in_dtype: np.dtype[Any] | None) -> Op:
        # Without the original dtype the tensor keeps the dtype it has in the tree.
        return _Astype(in_dtype) if in_dtype is not None else _Identity()


@dataclass(frozen=True)
class _Identity(Op):
    def __repr__(self) -> str:
        return "identity"

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def forward(self, arr: np.ndarray) -> np.ndarray:
        return arr

    def pull(self, want: Region, in_shape: tuple[int, ...],
             out_shape: tuple[int, ...]) -> tuple[Region, Region, Callable[[np.ndarray], np.ndarray]]:
        return want, want, lambda b: b

    def inverse(self, in_shape: tuple[int, ...] | None, in_dtype: np.dtype[Any] | None) -> Op:
        return self


@dataclass(frozen=True)
class _Fn(Op):
    func: Callable[[np.ndarray], Any]
    inv: Callable[[np.ndarray], Any] | None = None
    whole: bool = True

    def __repr__(self) -> str:
        return f"fn({getattr(self.func, '__name__', 'callable')})"

    def forward(self, arr: np.ndarray) -> np.ndarray:
        return np.asarray(self.func(arr))

    def inverse(self, in_shape: tuple[int, ...] | None, in_dtype: np.dtype[Any] | None) -> Op:
        if self.inv is None:
            raise SafecodecError(f"{self!r} has no inverse; give fn(func, inverse=...)")
        return _Fn(self.inv, self.func)


def transpose(*axes: int) -> Op:
    """Permute the axes (``np.transpose(x, axes)``); ``transpose(1, 0)`` turns a PyTorch
    ``(out, in)`` Linear weight into a Flax ``(in, out)`` kernel."""
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    return _Transpose(tuple(int(a) for a in axes))


def split_axis(axis: int, sizes: Sequence[int]) -> Op:
    """Split one axis into several (a reshape): ``split_axis(1, (16, 64))`` turns
    ``(hidden, 1024)`` into ``(hidden, 16, 64)``; one size may be ``-1``."""
    return _SplitAxis(int(axis), tuple(int(s) for s in sizes))


def merge_axes(axis: int, count: int) -> Op:
    """Merge ``count`` axes starting at ``axis`` into one (a reshape):
    ``merge_axes(1, 2)`` turns ``(hidden, 16, 64)`` into ``(hidden, 1024)``."""
    return _MergeAxes(int(axis), int(count))


def chunk(axis: int, pieces: int | Sequence[int]) -> Op:
    """Cut one source into pieces along ``axis``, one per target of the rule: ``n`` equal
    pieces, or the given sizes. The operations after it apply to each piece."""
    split_ = int(pieces) if isinstance(pieces, (int, np.integer)) else tuple(int(s) for s in pieces)
    return _ChunkPiece(int(axis), split_, -1)


def index(*idx: Any) -> Op:
    """A basic NumPy index (ints, slices, ``None``, ``...``): ``index(0)``,
    ``index(slice(None), slice(0, 128))``. Only the indexed part is read."""
    return _Index(idx[0] if len(idx) == 1 else tuple(idx))


def astype(dtype: Any) -> Op:
    """Cast to ``dtype``. Casts that lose range or precision are allowed only this way,
    and the plan lists them as lossy."""
    return _Astype(np.dtype(_dtype(dtype)))


def fn(func: Callable[[np.ndarray], Any], *, inverse: Callable[[np.ndarray], Any] | None = None) -> Op:
    """Any NumPy function of the whole source tensor (the escape hatch): the whole tensor
    is read, and the plan says so. ``inverse=`` makes the rule invertible."""
    return _Fn(func, inverse)


def _dtype(d: Any) -> Any:
    """A dtype from a name NumPy may not know (``"bfloat16"``, ``"float8_e4m3fn"``)."""
    if isinstance(d, str):
        try:
            return np.dtype(d)
        except TypeError:
            import ml_dtypes

            found = getattr(ml_dtypes, d, None)
            if found is None:
                raise SafecodecError(f"astype({d!r}): no such dtype") from None
            return found
    return d


# ----------------------------------------------------------------------------- rules


def _pattern_regex(pattern: str) -> tuple[re.Pattern[str], list[str]]:
    names: list[str] = []
    parts: list[str] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(pattern):
        parts.append(re.escape(pattern[pos:m.start()]))
        name = m.group(1)
        if name in names:
            parts.append(f"(?P={name})")
        else:
            names.append(name)
            parts.append(f"(?P<{name}>[^.]+)")
        pos = m.end()
    parts.append(re.escape(pattern[pos:]))
    return re.compile("".join(parts)), names


def _literal_length(pattern: str) -> int:
    return len(_PLACEHOLDER.sub("", pattern))


@dataclass(frozen=True)
class Rule:
    """One line of a table: source pattern, target name(s), operations, stacking.
    Built by :func:`map`."""

    source: str
    targets: tuple[str, ...]
    ops: tuple[Op, ...]
    stack: str | None = None
    optional: bool = False

    def __post_init__(self) -> None:
        _, names = _pattern_regex(self.source)
        for t in self.targets:
            extra = set(_PLACEHOLDER.findall(t)) - set(names)
            if extra:
                raise SafecodecError(f"rule {self.source!r} -> {t!r}: placeholder(s) "
                                     f"{sorted(extra)} of the target are not in the source")
            if self.stack is not None and self.stack in _PLACEHOLDER.findall(t):
                raise SafecodecError(f"rule {self.source!r} -> {t!r}: the stacked placeholder "
                                     f"{{{self.stack}}} cannot appear in the target")
        if self.stack is not None and self.stack not in names:
            raise SafecodecError(f"rule {self.source!r}: stack={self.stack!r} is not a "
                                 "placeholder of the source")
        chunks = [i for i, op in enumerate(self.ops) if isinstance(op, _ChunkPiece)]
        if len(chunks) > 1:
            raise SafecodecError(f"rule {self.source!r}: at most one chunk()")
        if len(self.targets) > 1 and not chunks:
            raise SafecodecError(f"rule {self.source!r}: {len(self.targets)} targets need a chunk()")
        if chunks:
            c = self.ops[chunks[0]]
            assert isinstance(c, _ChunkPiece)
            n = c.split if isinstance(c.split, int) else len(c.split)
            if n != len(self.targets):
                raise SafecodecError(f"rule {self.source!r}: {c!r} makes {n} pieces for "
                                     f"{len(self.targets)} targets")
        if not self.targets:
            raise SafecodecError(f"rule {self.source!r}: no target")

    def __repr__(self) -> str:
        tgt = self.targets[0] if len(self.targets) == 1 else list(self.targets)
        ops = "".join(f", {op!r}" for op in self.ops)
        stack = f", stack={self.stack!r}" if self.stack else ""
        return f"map({self.source!r}, {tgt!r}{ops}{stack})"

    def chain(self, j: int) -> tuple[Op, ...]:
        """The operations for target ``j`` (the chunk becomes piece ``j``)."""
        return tuple(_ChunkPiece(op.axis, op.split, j) if isinstance(op, _ChunkPiece) else op
                     for op in self.ops)


def map(source: str, target: str | Sequence[str], *ops: Op, stack: str | None = None,
        optional: bool = False) -> Rule:
    """A rule: tensors named like ``source`` become the leaf (or leaves) ``target``.

    Args:
        source: A tensor name with ``{placeholders}``.
        target: A template leaf name (may use the source's placeholders), or a list of
            them when the operations hold a :func:`chunk`.
        *ops: Operations, applied in order in source coordinates.
        stack: A placeholder whose values ``0..n-1`` are stacked on a new leading axis.
        optional: The rule may match nothing (model variants); otherwise that is an error.
    """
    targets = (target,) if isinstance(target, str) else tuple(target)
    for op in ops:
        if not isinstance(op, Op):
            raise SafecodecError(f"rule {source!r}: {op!r} is not an operation of safecodec.remap")
    return Rule(source, targets, tuple(ops), stack, optional)


@dataclass(frozen=True)
class _TorchToFlax:
    """The generic PyTorch -> Flax conventions (see :func:`torch_to_flax`)."""

    def __repr__(self) -> str:
        return "torch_to_flax()"


def torch_to_flax() -> Any:
    """The generic PyTorch -> Flax naming and layout conventions, decided by the names the
    template has (never by shapes): ``weight`` becomes ``kernel`` (2-D: transposed; Conv
    3-D ``(2, 1, 0)``, 4-D ``(2, 3, 1, 0)``), ``scale`` or ``embedding`` where the template
    has that name; batch norm ``running_mean``/``running_var`` become ``mean``/``var``
    (``num_batches_tracked`` is dropped); ``layers.3`` matches ``layers_3`` where the
    template spells it so; a leading Flax collection (``params.``, ``batch_stats.``) is
    matched. Explicit rules in the same table win."""
    return _TorchToFlax()


class Rules:
    """A table of rules (:func:`map`, :func:`torch_to_flax`) and regular expressions of
    source names to ignore.

    Examples:
        >>> from safecodec import remap as R
        >>> rules = R.Rules(R.map("w.{i}", "w", R.transpose(1, 0), stack="i"), ignore=[r"step"])
        >>> rules.inverse().inverse() == rules
        True
    """

    def __init__(self, *maps: Rule | Any, ignore: Iterable[str] = (),
                 _inverted: bool = False, _like: Header | None = None) -> None:
        for m in maps:
            if not isinstance(m, (Rule, _TorchToFlax)):
                raise SafecodecError(f"Rules takes map(...) and torch_to_flax(), got {m!r}")
        self.maps: tuple[Any, ...] = tuple(maps)
        self.ignore: tuple[str, ...] = tuple(ignore)
        self._ignore = [re.compile(p) for p in self.ignore]
        self.inverted = _inverted
        self._like = _like

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Rules) and self.maps == other.maps
                and self.ignore == other.ignore and self.inverted == other.inverted)

    def __hash__(self) -> int:
        return hash((self.maps, self.ignore, self.inverted))

    def __repr__(self) -> str:
        body = ", ".join(map_repr for map_repr in (repr(m) for m in self.maps))
        inv = ".inverse()" if self.inverted else ""
        return f"Rules({body}){inv}"

    def ignored(self, name: str) -> bool:
        """Whether source name ``name`` is ignored."""
        return any(p.fullmatch(name) for p in self._ignore)

    def inverse(self, like: Any = None) -> Rules:
        """The rules the other way: for ``save_tree(tree, path, remap=rules.inverse())``.

        Args:
            like: The original checkpoint (path, handle or :class:`~safecodec.Header`).
                With it, casts go back to the original dtypes, merged axes are split to
                their original sizes, ``torch_to_flax()`` picks the original spelling of
                numbered modules, and the original metadata is written. Without it,
                tensors keep the dtype they have in the tree and metadata is
                ``{"format": "pt"}`` (what ``save_pretrained`` writes).
        """
        header = _header_of(like) if like is not None else None
        return Rules(*self.maps, ignore=self.ignore, _inverted=not self.inverted, _like=header)

    # The protocol safecodec.load_tree / save_tree use (they cannot import this module).
    def plan(self, source: Any, like: Any, *, fs: Any = None,
             storage_options: dict[str, Any] | None = None, framework: str | None = None,
             copy: bool = False) -> Plan:
        """:func:`plan` with these rules."""
        return plan(source, self, like=like, fs=fs, storage_options=storage_options,
                    framework=framework, copy=copy)

    def export(self, tree: Any, metadata: Mapping[str, str] | None) -> tuple[dict[str, Any], dict[str, str]]:
        """The tensors (and metadata) ``save_tree(tree, remap=self)`` writes."""
        return _export(self, tree, metadata)


def _header_of(source: Any) -> Header:
    if isinstance(source, Header):
        return source
    header = getattr(source, "header", None)
    if isinstance(header, Header):
        return header
    return read_header(source)


# ----------------------------------------------------------------------------- the template


@dataclass
class _Leaf:
    path: Path
    name: str
    value: Any
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    kind: str  # "jax", "numpy", "numpy_scalar" or a Python scalar type name
    sharding: Any


def _template_leaves(like: Any, framework: str | None = None) -> list[_Leaf]:
    """The array and scalar leaves of ``like``; ``framework`` ``"numpy"`` or ``"jax"``
    turns every array leaf into that kind (None: as the template says)."""
    out: list[_Leaf] = []

    def walk(x: Any, path: Path) -> None:
        level = split(x)
        if level.kind == NONE:
            return
        if level.kind == LEAF:
            if level.leaf == KEY:
                raise TreeStructureError(f"{render_path(path)}: PRNG keys cannot be remapped")
            shape, dtype = leaf_spec(x, level)
            if level.leaf == SPEC or is_jax_array(x):
                kind, sharding = "jax", getattr(x, "sharding", None)
            elif level.leaf == ARRAY:
                kind, sharding = "numpy", None
            elif level.leaf == NUMPY_SCALAR:
                kind, sharding = "numpy_scalar", None
            else:
                kind, sharding = level.leaf, None
            if framework == "numpy" and kind == "jax":
                kind, sharding = "numpy", None
            elif framework == "jax" and kind == "numpy":
                kind = "jax"  # JAX's default device
            out.append(_Leaf(path, join_path(path), x, shape, np.dtype(dtype), kind, sharding))
            return
        if level.kind == VAR or level.kind in CONTAINERS:
            step = level.kind != VAR
            for elem, child in level.children:
                walk(child, (*path, elem) if step else path)

    walk(like, ())
    return out


def _rebuild(like: Any, values: Mapping[str, Any]) -> Any:
    def build(x: Any, path: Path) -> Any:
        level = split(x)
        if level.kind == LEAF:
            return values.get(join_path(path), x)
        if level.rebuild is None or not (level.kind == VAR or level.kind in CONTAINERS):
            return x
        step = level.kind != VAR
        vals = [build(child, (*path, elem) if step else path) for elem, child in level.children]
        return level.rebuild(vals, render_path(path))

    return build(like, ())


# ----------------------------------------------------------------------------- casts


def _float_info(dt: np.dtype[Any]) -> Any:
    try:
        return np.finfo(dt)
    except (TypeError, ValueError):
        import ml_dtypes

        return ml_dtypes.finfo(dt)  # type: ignore[no-untyped-call]


def cast_kind(src: np.dtype[Any], dst: np.dtype[Any]) -> str:
    """``"none"``, ``"exact"`` (every value of ``src`` is a value of ``dst``) or
    ``"lossy"``."""
    if src == dst:
        return "none"
    try:
        if np.can_cast(src, dst, "safe"):
            return "exact"
    except TypeError:
        pass
    sk, dk = src.kind, dst.kind
    if sk == "b":
        return "exact"
    if dk == "f" or dst.name in ("bfloat16",) or dk == "V":
        try:
            fd = _float_info(dst)
        except (TypeError, ValueError):
            return "lossy"
        if sk in "iu":
            return "exact" if fd.nmant + 1 >= src.itemsize * 8 - (sk == "i") else "lossy"
        try:
            fs = _float_info(src)
        except (TypeError, ValueError):
            return "lossy"
        ok = fd.nmant >= fs.nmant and fd.maxexp >= fs.maxexp and fd.minexp <= fs.minexp
        return "exact" if ok else "lossy"
    return "lossy"


# ----------------------------------------------------------------------------- planning


@dataclass
class _Target:
    """One template leaf and how it is made."""

    leaf: _Leaf
    rule: Rule | str  # the rule, or a description (torch_to_flax)
    sources: tuple[str, ...]  # one per stack index, or one
    stacked: bool
    ops: tuple[Op, ...]
    shapes: list[tuple[int, ...] | None]  # shapes[0]: the source's; shapes[k+1]: after op k
    src_dtype: np.dtype[Any]
    chain_dtype: np.dtype[Any]
    cast: str  # "none", "exact", "lossy" (asked for by astype)
    whole: bool
    blocks: list[tuple[Region, list[Any]]] = field(default_factory=list)  # region, devices

    @property
    def out_shape(self) -> tuple[int, ...] | None:
        last = self.shapes[-1]
        if last is None:
            return None
        return (len(self.sources), *last) if self.stacked else last


def _chain_shapes(ops: Sequence[Op], shape: tuple[int, ...],
                  dtype: np.dtype[Any]) -> tuple[list[tuple[int, ...] | None], np.dtype[Any], bool]:
    shapes: list[tuple[int, ...] | None] = [shape]
    whole = False
    cur: tuple[int, ...] | None = shape
    for op in ops:
        if op.whole:
            whole, cur = True, None
        elif cur is not None:
            cur = op.out_shape(cur)
        dtype = op.out_dtype(dtype)
        shapes.append(cur)
    return shapes, dtype, whole


class _Planner:
    """Matches rules against the header and the template; collects every problem."""

    def __init__(self, header: Header, rules: Rules, leaves: list[_Leaf]) -> None:
        self.header = header
        self.rules = rules
        self.leaves = {leaf.name: leaf for leaf in leaves}
        self.order = [leaf.name for leaf in leaves]
        self.targets: dict[str, _Target] = {}
        self.used: set[str] = set()
        self.problems: list[str] = []
        self.failed: set[str] = set()  # targets with a problem of their own
        self.matched: set[int] = set()  # rules whose pattern matches some name

    def run(self) -> dict[str, _Target]:
        names = list(self.header.tensors)
        explicit = [m for m in self.rules.maps if isinstance(m, Rule)]
        claims = self._claims(explicit, names)
        for rule in explicit:
            self._apply_rule(rule, claims.get(id(rule), []))
        if any(isinstance(m, _TorchToFlax) for m in self.rules.maps):
            self._torch_to_flax(names)
        for name in names:
            if name not in self.used and not self.rules.ignored(name):
                info = self.header.tensors[name]
                self.problems.append(f"unmapped source: {name!r} {_describe(info.shape, info.dtype.numpy)} "
                                     "(no rule maps it and no ignore= pattern matches)")
        for name in self.order:
            if name not in self.targets and name not in self.failed:
                leaf = self.leaves[name]
                self.problems.append(f"unfilled target: {name!r} {_describe(leaf.shape, leaf.dtype)} "
                                     "(no rule fills this template leaf)")
        if self.problems:
            _raise(self.problems)
        return {n: self.targets[n] for n in self.order}

    def _claims(self, rules: list[Rule], names: list[str]) -> dict[int, list[tuple[str, dict[str, str]]]]:
        """Each tensor name goes to the most specific rule that matches it."""
        compiled = [(r, _pattern_regex(r.source)[0], _literal_length(r.source)) for r in rules]
        out: dict[int, list[tuple[str, dict[str, str]]]] = {}
        for name in names:
            hits = [(r, m, n) for r, rx, n in compiled if (m := rx.fullmatch(name)) is not None]
            if not hits:
                continue
            self.matched.update(id(r) for r, _, _ in hits)
            best = max(n for _, _, n in hits)
            top = [(r, m) for r, m, n in hits if n == best]
            if len(top) > 1:
                self.problems.append(f"ambiguous source: {name!r} is matched equally by "
                                     + " and ".join(repr(r) for r, _ in top))
                self.used.add(name)
                continue
            r, m = top[0]
            out.setdefault(id(r), []).append((name, m.groupdict()))
        return out

    def _apply_rule(self, rule: Rule, matches: list[tuple[str, dict[str, str]]]) -> None:
        if not matches:
            if not rule.optional and id(rule) not in self.matched:
                self.problems.append(f"rule matches nothing: {rule!r} (no tensor of the checkpoint "
                                     "has such a name; pass optional=True if that is expected)")
            return
        groups: dict[tuple[tuple[str, str], ...], dict[int, str]] = {}
        for name, binding in matches:
            self.used.add(name)
            key = tuple(sorted((k, v) for k, v in binding.items() if k != rule.stack))
            slot = groups.setdefault(key, {})
            if rule.stack is None:
                slot[0] = name
                continue
            value = binding[rule.stack]
            if not value.isdigit():
                self.problems.append(f"stack={rule.stack!r} needs numbers: {name!r} has "
                                     f"{{{rule.stack}}}={value!r} ({rule!r})")
                continue
            slot[int(value)] = name
        for key, by_index in groups.items():
            binding = dict(key)
            if rule.stack is not None:
                n = max(by_index) + 1 if by_index else 0
                missing = [i for i in range(n) if i not in by_index]
                if missing:
                    shown = ", ".join(rule.source.replace("{" + rule.stack + "}", str(i)).format(**binding)
                                      for i in missing[:5])
                    self.problems.append(f"incomplete stack: {rule!r} has {rule.stack}=0..{n - 1} "
                                         f"but not {len(missing)} of them ({shown})")
                    continue
                sources = tuple(by_index[i] for i in range(n))
            else:
                sources = (by_index[0],)
            for j, tpat in enumerate(rule.targets):
                self._target(tpat.format(**binding), rule, sources, rule.stack is not None,
                             rule.chain(j), rule)

    def _target(self, tname: str, rule: Rule | str, sources: tuple[str, ...], stacked: bool,
                ops: tuple[Op, ...], desc: Rule | str) -> None:
        src = sources[0]
        info = self.header.tensors[src]
        leaf = self.leaves.get(tname)
        both = f"{src!r}{' (and the other stacked sources)' if stacked else ''} -> {tname!r}"
        if leaf is None:
            self.problems.append(f"unknown target: {both}: the template has no leaf {tname!r} ({desc})")
            return
        self.failed.add(tname)  # until it is planned
        if tname in self.targets:
            self.problems.append(f"target filled twice: {tname!r} by {self.targets[tname].sources[0]!r} "
                                 f"and {src!r}")
            return
        for other in sources[1:]:
            o = self.header.tensors[other]
            if o.shape != info.shape or o.dtype != info.dtype:
                self.problems.append(f"stacked sources differ: {other!r} "
                                     f"{_describe(o.shape, o.dtype.numpy)} vs {src!r} "
                                     f"{_describe(info.shape, info.dtype.numpy)} -> {tname!r}")
                return
        src_dtype = np.dtype(info.dtype.numpy)
        try:
            shapes, chain_dtype, whole = _chain_shapes(ops, tuple(info.shape), src_dtype)
        except _OpError as exc:
            self.problems.append(f"operation does not apply: {both}: {exc} "
                                 f"(source {_describe(info.shape, src_dtype)})")
            return
        target = _Target(leaf, rule, sources, stacked, ops, shapes, src_dtype, chain_dtype,
                         "none", whole)
        got = target.out_shape
        if got is not None and got != leaf.shape:
            self.problems.append(f"wrong shape: {both}: the operations give {list(got)}, the "
                                 f"template wants {list(leaf.shape)} (source "
                                 f"{_describe(info.shape, src_dtype)}, {desc})")
            return
        if cast_kind(chain_dtype, leaf.dtype) == "lossy":
            self.problems.append(f"refused cast: {both}: {chain_dtype.name} -> {leaf.dtype.name} "
                                 "loses range or precision; write it as astype() in the rule")
            return
        # What the plan reports: source dtype -> template dtype, lossy when an astype was
        if any(isinstance(op, _Astype) for op in ops) and cast_kind(src_dtype, chain_dtype) == "lossy":
            target.cast = "lossy"
        else:
            target.cast = cast_kind(src_dtype, leaf.dtype)
        self.targets[tname] = target
        self.failed.discard(tname)

    # -- torch_to_flax ------------------------------------------------------------------

    def _torch_to_flax(self, names: list[str]) -> None:
        available = {n for n in names if n not in self.used}
        for tname in self.order:
            if tname in self.targets:
                continue
            leaf = self.leaves[tname]
            for cand, ops in _torch_candidates(tname, len(leaf.shape)):
                if cand in available:
                    available.discard(cand)
                    self.used.add(cand)
                    self._target(tname, "torch_to_flax()", (cand,), False, ops,
                                 "torch_to_flax()")
                    break
        for n in list(available):
            if n.endswith(".num_batches_tracked"):
                self.used.add(n)


_COLLECTIONS: Final = ("params", "batch_stats")
_NUMBERED: Final = re.compile(r"^(.*\D)_(\d+)$")


def _kernel_ops(ndim: int) -> tuple[Op, ...]:
    if ndim == 2:
        return (_Transpose((1, 0)),)
    if ndim == 3:
        return (_Transpose((2, 1, 0)),)
    if ndim == 4:
        return (_Transpose((2, 3, 1, 0)),)
    if ndim == 5:
        return (_Transpose((2, 3, 4, 1, 0)),)
    return ()


def _spellings(parts: list[str]) -> list[list[str]]:
    """``layers_3`` may be ``layers.3`` in PyTorch: every spelling, the template's first."""
    out: list[list[str]] = [[]]
    for p in parts:
        m = _NUMBERED.match(p)
        alts = [[p]] + ([[m.group(1), m.group(2)]] if m else [])
        out = [prev + alt for prev in out for alt in alts]
    return out


def _torch_candidates(tname: str, ndim: int) -> list[tuple[str, tuple[Op, ...]]]:
    """Source names a template leaf may have in a PyTorch checkpoint, with operations."""
    parts = tname.split(".")
    collection = parts[0] if parts[0] in _COLLECTIONS and len(parts) > 1 else None
    if collection is not None:
        parts = parts[1:]
    last = parts[-1]
    torch_last: list[tuple[str, tuple[Op, ...]]]
    if collection == "batch_stats" and last in ("mean", "var"):
        torch_last = [(f"running_{last}", ())]
    elif last == "kernel":
        torch_last = [("weight", _kernel_ops(ndim))]
    elif last in ("scale", "embedding"):
        torch_last = [("weight", ())]
    else:
        torch_last = [(last, ())]
    out = []
    for spelled in _spellings(parts[:-1]):
        for name, ops in torch_last:
            out.append((".".join([*spelled, name]), ops))
    return out


# ----------------------------------------------------------------------------- plan


def _describe(shape: Sequence[int], dtype: Any) -> str:
    return f"{np.dtype(dtype).name}{list(shape)}"


def _raise(problems: list[str]) -> None:
    lines = [f"the checkpoint does not map onto the template: {len(problems)} problem(s)"]
    lines += [f"  {p}" for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    raise TreeStructureError("\n".join(lines))


def _blocks(leaf: _Leaf) -> list[tuple[Region, list[Any]]]:
    """The distinct blocks of ``leaf`` this process holds, each with its devices."""
    full = _full(leaf.shape)
    if leaf.kind != "jax":
        return [(full, [])]
    jax = jax_module()
    sharding = leaf.sharding
    if sharding is None:
        return [(full, [jax.local_devices()[0]])]  # JAX's default device
    by_region: dict[Region, list[Any]] = {}
    for device, idx in sharding.addressable_devices_indices_map(leaf.shape).items():
        region = tuple(range(*s.indices(n)) for s, n in zip(idx, leaf.shape, strict=True))
        by_region.setdefault(region, []).append(device)
    return list(by_region.items())


def _pull(ops: Sequence[Op], shapes: Sequence[tuple[int, ...] | None],
          want: Region) -> tuple[Region, list[_Step]]:
    """Invert ``ops`` on the block ``want``: the source box and the forward steps."""
    steps: list[_Step] = []
    for k in range(len(ops) - 1, -1, -1):
        in_shape, out_shape = shapes[k], shapes[k + 1]
        assert in_shape is not None and out_shape is not None
        need, cover, forward = ops[k].pull(want, in_shape, out_shape)
        steps.append((forward, cover, want))
        want = tuple(_positive(r) for r in need)
    steps.reverse()
    return want, steps


def _residual(block: np.ndarray, cover: Region, want: Region) -> np.ndarray:
    if cover == want:
        return block
    key = []
    for c, w in zip(cover, want, strict=True):
        if c == w:
            key.append(slice(None))
            continue
        step = c.step if len(c) > 1 else 1
        start = (w[0] - c[0]) // step if len(w) else 0
        wstep = (w.step if len(w) > 1 else 1) // step
        key.append(slice(start, start + wstep * (len(w) - 1) + 1 if len(w) else start, wstep))
    return block[tuple(key)]


#: Elements of the destination's last axis copied per call when the source is transposed.
_TILE: Final = 16
#: Blocks smaller than this (elements) are copied in one call.
_TILE_MIN: Final = 1 << 14


def _copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` (cast to ``dst``'s dtype), fast for transposed sources.

    A transposed source read along the destination's rows touches one cache line per
    element; NumPy does that copy at a few hundred MB/s (less for ml_dtypes types, whose
    copy loops are generic). Copied as unsigned integers of the same width, in tiles of
    :data:`_TILE` destination columns, each tile's source lines stay in cache: measured
    4-5x faster for bf16 ``(1408, 512).T``.
    """
    if dst.dtype != src.dtype or src.size < _TILE_MIN or src.ndim < 2 or (
            src.strides[-1] == src.itemsize and src.shape[-1] > _TILE):
        np.copyto(dst, src, casting="unsafe")
        return
    if dst.dtype.itemsize in (1, 2, 4, 8) and not dst.dtype.hasobject:
        bits = np.dtype(f"u{dst.dtype.itemsize}")
        dst, src = dst.view(bits), src.view(bits)
    dst, src = _coalesce(dst, src)
    n = src.shape[-1]
    for k in range(0, n, _TILE):
        np.copyto(dst[..., k:k + _TILE], src[..., k:k + _TILE])


def _coalesce(dst: np.ndarray, src: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Views of ``dst`` and ``src`` with neighbouring axes merged wherever both arrays
    allow it (a split of heads, say), so that a tiled copy sees long rows."""
    shape, ds, ss = list(dst.shape), list(dst.strides), list(src.strides)
    j = len(shape) - 1
    while j > 0:
        if shape[j] == 1:  # a length-1 axis: its strides mean nothing
            del shape[j], ds[j], ss[j]
        elif shape[j - 1] == 1 or (ds[j - 1] == shape[j] * ds[j] and ss[j - 1] == shape[j] * ss[j]):
            shape[j - 1] *= shape[j]
            ds[j - 1], ss[j - 1] = ds[j], ss[j]
            del shape[j], ds[j], ss[j]
        j -= 1
    if len(shape) == dst.ndim:
        return dst, src
    as_strided = np.lib.stride_tricks.as_strided
    return (as_strided(dst, tuple(shape), tuple(ds), writeable=True),
            as_strided(src, tuple(shape), tuple(ss), writeable=False))


def _box(region: Region) -> tuple[slice, ...]:
    return tuple(slice(r.start, r.stop, r.step) for r in region)


def box_requests(box: Sequence[slice], shape: Sequence[int]) -> int:
    """Read requests for ``box`` of a C-ordered tensor of ``shape``: one per contiguous
    run (trailing whole axes merge into one run), as a positioned-read engine makes them."""
    lens = [len(range(*s.indices(n))) for s, n in zip(box, shape, strict=True)]
    if 0 in lens:
        return 0
    k = len(shape)
    while k > 0 and lens[k - 1] == shape[k - 1] and (box[k - 1].step or 1) == 1:
        k -= 1
    if k == 0:
        return 1
    runs = math.prod(lens[:k - 1]) if k > 1 else 1
    return runs * (lens[k - 1] if (box[k - 1].step or 1) > 1 else 1)


def _read_boxes(handle: Any, requests: Sequence[tuple[str, tuple[slice, ...]]]) -> list[np.ndarray]:
    """The NumPy contents of each ``(tensor name, box)``; the one place that reads.

    A mapped or in-memory file gives views of the tensor (``TensorReader.array``, stored
    checksums checked first when the handle verifies; packed dtypes decoded through
    ``get_slice``): no copy, the block's one copy comes after. Any other source (positioned reads, remote) reads every box of one
    file in one plan of the read engine (:meth:`~safecodec._reader.TensorReader.read_boxes`:
    runs merged within its read budget, one ``read_ranges`` call remotely).
    """
    out: list[Any] = [None] * len(requests)
    batches: dict[int, tuple[Any, list[tuple[int, Any, tuple[slice, ...]]]]] = {}
    for k, (name, box) in enumerate(requests):
        shard = handle.shard_handle(name) if hasattr(handle, "shard_handle") else handle
        reader = shard.reader
        info = reader.header.tensors[name]
        route = read_route(reader, info.dtype)
        if route in MEMORY_ROUTES:
            reader.begin([info], whole=False)  # where the route begins: checksums checked first
            out[k] = reader.array(info)[box]  # a view of the mapping
        elif reader.route in MEMORY_ROUTES:
            out[k] = np.asarray(shard.get_slice(name)[box])  # DECODE (packed): decoded
        else:
            full = box or tuple(slice(0, n, 1) for n in info.shape)
            batches.setdefault(id(reader), (reader, []))[1].append((k, info, full))
    for reader, items in batches.values():
        parts = reader.read_boxes([(info, box) for _, info, box in items])
        for (k, _, _), part in zip(items, parts, strict=True):
            out[k] = part
    return out


def _requests(t: _Target, region: Region) -> list[tuple[str, tuple[slice, ...], list[_Step]]]:
    """The reads for one block of one target: (source, box, forward steps)."""
    if any(len(r) == 0 for r in region):
        return []
    if t.whole:
        return [(s, (), []) for s in (t.sources if t.stacked else t.sources[:1])]
    rest = region[1:] if t.stacked else region
    box, steps = _pull(t.ops, t.shapes, rest)
    sources = [t.sources[i] for i in region[0]] if t.stacked else [t.sources[0]]
    return [(s, _box(box), steps) for s in sources]


@dataclass(frozen=True)
class TargetSummary:
    """What a plan reads for one template leaf, in this process."""

    target: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    cast: str  #: "none", "exact" or "lossy"
    whole: bool  #: the whole source tensor is read (fn)
    blocks: int  #: distinct blocks this process builds
    bytes: int  #: bytes read
    requests: int  #: read requests (an estimate: one per contiguous run of each box)


class Plan:
    """Boxes to read for every template leaf, built from headers only by :func:`plan`."""

    def __init__(self, handle: Any, like: Any, targets: dict[str, _Target], close: bool) -> None:
        self._handle = handle
        self._like = like
        self.targets = targets
        self._close = close
        self._rows: list[TargetSummary] | None = None  # computed once, on first use

    @property
    def header(self) -> Header:
        """The checkpoint's header the plan was made from (a sharded checkpoint's: every
        shard's tensors, the index's metadata)."""
        header: Header = self._handle.header
        return header

    def summary(self) -> dict[str, Any]:
        """Per target and in total, what this process reads.

        Returns:
            ``{"targets": [TargetSummary, ...], "total": {"bytes", "requests",
            "source_bytes"}, "casts": [...], "whole": [...], "requests_estimated": True}``:
            ``source_bytes`` is the full size of the mapped source tensors, ``casts`` one
            line per cast target (``exact`` or ``lossy``), ``whole`` the targets read
            whole (:func:`fn`). Requests are estimated as the read engine makes them:
            one per contiguous run of each box.
        """
        rows = self._summary_rows()
        tensors = self._handle.header.tensors
        src_bytes = sum(tensors[s].nbytes for s in {s for t in self.targets.values() for s in t.sources})
        return {
            "targets": list(rows),
            "total": {"bytes": sum(r.bytes for r in rows), "requests": sum(r.requests for r in rows),
                      "source_bytes": src_bytes},
            "casts": [f"{r.target}: {t.src_dtype.name} -> {r.dtype} ({r.cast})"
                      for r, t in zip(rows, self.targets.values(), strict=True) if r.cast != "none"],
            "whole": [r.target for r in rows if r.whole],
            "requests_estimated": True,
        }

    def _summary_rows(self) -> list[TargetSummary]:
        """One :class:`TargetSummary` per target (the targets never change: computed once)."""
        if self._rows is not None:
            return self._rows
        rows = []
        for name, t in self.targets.items():
            nbytes = requests = 0
            shape = tuple(t.shapes[0] or ())
            for region, _ in t.blocks:
                for _src, box, _ in _requests(t, region):
                    full = box if box else _box(_full(shape))
                    n = math.prod(len(range(*s.indices(d))) for s, d in zip(full, shape, strict=True))
                    nbytes += n * t.src_dtype.itemsize
                    requests += box_requests(full, shape)
            rows.append(TargetSummary(name, t.sources, t.leaf.shape, t.leaf.dtype.name, t.cast,
                                      t.whole, len(t.blocks), nbytes, requests))
        self._rows = rows
        return rows

    def load(self, progress: bool | Callable[[str, int], Any] = False) -> Any:
        """Read, transform and place every leaf; the template's structure and types come
        back filled.

        Args:
            progress: True for a progress bar (bytes, per target); or a callable
                ``(target name, bytes read)`` called after each target.
        """
        callback = progress if callable(progress) else None
        summary = self.summary() if progress else None  # only a progress report needs it
        total = summary["total"]["bytes"] if summary else 0
        read = {row.target: row.bytes for row in summary["targets"]} if summary else {}
        values: dict[str, Any] = {}
        try:
            def done(name: str, value: Any) -> None:
                values[name] = value
                if callback is not None:
                    callback(name, read[name])

            with ProgressBar(total, "remap", progress is True) as bar:
                _BlockLoader(self._handle, self.targets).place_all(bar, done)
        finally:
            self.close()  # the arrays handed out keep their mapping alive
        return _rebuild(self._like, values)

    def close(self) -> None:
        """Close the checkpoint (when the plan opened it); :meth:`load` does it too."""
        if self._close:
            self._handle.close()

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        rows = self._summary_rows()
        return (f"<Plan {len(self.targets)} targets, {sum(r.bytes for r in rows)} bytes, "
                f"~{sum(r.requests for r in rows)} requests>")


class _BlockLoader:
    """The load half of a :class:`Plan`: reads the boxes of every target block, runs the
    operations forward, casts, and places the blocks on their devices (or as NumPy)."""

    def __init__(self, handle: Any, targets: dict[str, _Target]) -> None:
        self._handle = handle
        self.targets = targets

    def _fill(self, t: _Target, job: tuple[np.ndarray, int | None, str, np.ndarray, list[_Step]],
              bar: ProgressBar) -> None:
        """Run the operations forward on one box's contents and cast it into its block."""
        out, i, src, part, steps = job
        nbytes = part.nbytes
        if t.whole:
            for op in t.ops:
                part = op.forward(part)
            expect = t.leaf.shape[1:] if t.stacked else t.leaf.shape
            if part.shape != tuple(expect):
                raise TreeStructureError(f"{src!r} -> {t.leaf.name!r}: the operations gave "
                                         f"{list(part.shape)}, the template wants {list(expect)}")
            if cast_kind(part.dtype, out.dtype) == "lossy":
                raise TreeStructureError(f"{src!r} -> {t.leaf.name!r}: the operations gave "
                                         f"{part.dtype.name}, and {part.dtype.name} -> "
                                         f"{out.dtype.name} loses range or precision; end the "
                                         "rule with astype()")
            part = part[_box(steps[0][2])] if steps else part
        else:
            for forward, cover, wanted in steps:
                part = _residual(forward(part), cover, wanted)
        _copy_into(out if i is None else out[i], part)
        bar.update(nbytes)

    def _jobs(self, t: _Target, region: Region,
              out: np.ndarray) -> list[tuple[np.ndarray, int | None, str, tuple[slice, ...], list[_Step]]]:
        """One job per source box of a block (per layer for stacked targets)."""
        jobs: list[tuple[np.ndarray, int | None, str, tuple[slice, ...], list[_Step]]] = []
        reads = _requests(t, region)
        for k, (src, box, steps) in enumerate(reads):
            if t.whole:  # the whole tensor; the block's part of the result is cut afterwards
                rest = region[1:] if t.stacked else region
                steps = [(lambda b: b, rest, rest)] if rest else []
            jobs.append((out, k if t.stacked else None, src, box, steps))
        return jobs

    def _direct_block(self, t: _Target, region: Region, staging: list[np.ndarray],
                      ) -> tuple[np.ndarray, bool, np.ndarray | None, int] | None:
        """One block of ``t`` as a host array for the placement to copy from, with no NumPy
        copy where the operations allow it: ``(array, may_alias, spare, source bytes)``.

        The operations run forward on views: of the mapping itself for an unstacked
        target (the placement's copy is then the block's one copy: XLA's transposing copy
        is faster than NumPy's strided one), or of a staging array for a stacked target,
        into which the layers' boxes are copied in their source order (runs of rows).
        ``may_alias``: the placement may alias the array (safecodec's own memory, or a view
        of a checkpoint that :func:`~safecodec._jax_load.aliasable_address` allows);
        ``spare``: staging memory that the caller may reuse (``staging``, one per thread)
        once the placement has copied out of it. None when an operation copies on its own
        (the target is then built by :meth:`_place`)."""
        reads = _requests(t, region)
        if not reads:
            return None
        parts = _read_boxes(self._handle, [(src, box) for src, box, _ in reads])
        nbytes = sum(p.nbytes for p in parts)
        steps = reads[0][2]
        spare: np.ndarray | None = None
        if t.stacked:
            shape = (len(parts), *parts[0].shape)
            size = math.prod(shape) * parts[0].dtype.itemsize
            memory = staging.pop() if staging else None
            if memory is None or memory.nbytes < size:
                memory = aligned_empty((size,), np.uint8)
            base = memory[:size].view(parts[0].dtype).reshape(shape)
            for k, part in enumerate(parts):
                np.copyto(base[k], part)
            view = base[0]
            for forward, cover, wanted in steps:
                view = _residual(forward(view), cover, wanted)
            offset = view.__array_interface__["data"][0] - base.ctypes.data
            if view.size == 0 or offset < 0 or not np.may_share_memory(view, base):
                return None  # an operation copied: no view to stack
            arr = np.ndarray((len(parts), *view.shape), view.dtype, buffer=base, offset=offset,
                             strides=(base.strides[0], *view.strides))
            may_alias = True
            if arr.dtype != t.leaf.dtype or not arr.flags.c_contiguous:
                spare = memory  # the placement copies out of it (or the cast below does)
        else:
            arr = parts[0]
            for forward, cover, wanted in steps:
                arr = _residual(forward(arr), cover, wanted)
            shard = (self._handle.shard_handle(reads[0][0]) if hasattr(self._handle, "shard_handle")
                     else self._handle)
            may_alias = (shard.reader.buffer is None  # a fresh read
                         or not np.may_share_memory(arr, parts[0])  # an operation copied
                         or aliasable_address(shard.reader) is not None)
        if arr.shape != tuple(len(r) for r in region):
            return None
        if arr.dtype != t.leaf.dtype:
            cast = aligned_empty(arr.shape, t.leaf.dtype)
            np.copyto(cast, arr, casting="unsafe")
            arr, may_alias = cast, True
        return arr, may_alias, spare, nbytes

    def _direct_put(self, t: _Target, region: Region, devs: list[Any], bar: ProgressBar,
                    staging: list[np.ndarray]) -> list[tuple[Any, Any]] | None:
        """One block of a JAX leaf built by :meth:`_direct_block` and put on its devices:
        ``[(device, single-device array)]``. An array JAX may not alias is copied by the
        placement, once per device; a block on several devices that JAX may not alias as
        it is (strided, unaligned, or memory that may change) is first copied once into
        aligned memory, which every CPU device then aliases. None: see ``_direct_block``."""
        got = self._direct_block(t, region, staging)
        if got is None:
            return None
        arr, may_alias, spare, nbytes = got
        put = placement()
        aligned = is_aligned(arr)  # JAX's CPU client aliases exactly these
        if (len(devs) > 1 and not aligned) or (not may_alias and (aligned or len(devs) > 1)):
            one = aligned_empty(arr.shape, arr.dtype)
            _copy_into(one, arr)
            arr = one
        committed = t.leaf.sharding is not None
        out = [(d, put.single(arr, d, committed)) for d in devs]
        if spare is not None:
            jax_module().block_until_ready([x for _, x in out])  # copied out of it: reuse it
            staging.append(spare)
        bar.update(nbytes)
        return out

    def place_all(self, bar: ProgressBar, done: Callable[[str, Any], None]) -> None:
        """Every JAX leaf that :meth:`_direct_put` can build, block by block on the thread
        pool (NumPy's copies and XLA's placement release the GIL), then the rest by
        :meth:`_place`; ``done(name, value)`` in the targets' order."""
        jax = jax_module()
        tasks = [(name, region, devs) for name, t in self.targets.items()
                 if t.leaf.kind == "jax" and not t.whole for region, devs in t.blocks]
        local = threading.local()

        def work(task: tuple[str, Region, list[Any]]) -> list[tuple[Any, Any]] | None:
            staging = getattr(local, "staging", None)
            if staging is None:
                staging = local.staging = []
            name, region, devs = task
            return self._direct_put(self.targets[name], region, devs, bar, staging)

        nbytes = sum(math.prod(len(r) for r in region) for _, region, _ in tasks)
        threads = get_threads() if nbytes >= MIN_PIECE else 1
        results = run_concurrently(work, tasks, max_workers=threads) if threads > 1 else [
            work(task) for task in tasks]
        built: dict[str, list[Any]] = {}
        for (name, _, _), got in zip(tasks, results, strict=True):
            built.setdefault(name, []).append(got)
        del results
        for name, t in self.targets.items():
            blocks = built.pop(name, None)
            leaf = t.leaf
            if blocks is None or any(b is None for b in blocks):
                bar.describe(name)
                done(name, self._place(t, bar))
            elif leaf.sharding is None:
                done(name, blocks[0][0][1])
            else:
                pieces = {d: x for block in blocks for d, x in block}
                devices = list(getattr(leaf.sharding, "_addressable_device_assignment", None)
                               or pieces)
                done(name, jax.make_array_from_single_device_arrays(
                    leaf.shape, leaf.sharding, [pieces[d] for d in devices]))

    def _place(self, t: _Target, bar: ProgressBar) -> Any:
        """Build every distinct block of ``t`` (boxes read and transformed concurrently)
        and place them: on the template's devices, or as a NumPy value."""
        leaf = t.leaf
        blocks = [(devs, aligned_empty(tuple(len(r) for r in region), leaf.dtype), region)
                  for region, devs in t.blocks]
        boxes = [job for _, out, region in blocks for job in self._jobs(t, region, out)]
        parts = _read_boxes(self._handle, [(src, box) for _, _, src, box, _ in boxes])
        jobs = [(out, i, src, part, steps)
                for (out, i, src, _, steps), part in zip(boxes, parts, strict=True)]
        del parts
        nbytes = sum(out.nbytes for _, out, _ in blocks)
        if len(jobs) > 1 and nbytes >= MIN_PIECE * len(jobs) // 16:
            # threads pay off only for large copies (as _threads decides for one copy)
            run_concurrently(lambda job: self._fill(t, job, bar), jobs, max_workers=get_threads())
        else:
            for job in jobs:
                self._fill(t, job, bar)
        if leaf.kind != "jax":
            arr = blocks[0][1]
            if leaf.kind == "numpy":
                return arr
            if leaf.kind == "numpy_scalar":
                return arr[()]
            return PY_SCALARS[leaf.kind](arr[()])
        put = placement()
        if leaf.sharding is None:
            return put.single(blocks[0][1], blocks[0][0][0], False)
        host_of = {d: out for devs, out, _ in blocks for d in devs}
        # the placement takes the shards in the sharding's own device order (as _jax_load)
        devices = list(getattr(leaf.sharding, "_addressable_device_assignment", None) or host_of)
        # one call for every device, no XLA compile (the public fallback is
        # jax.make_array_from_single_device_arrays)
        return put.sharded(leaf.shape, leaf.dtype, leaf.sharding, [host_of[d] for d in devices],
                           devices)


def plan(source: Any, rules: Rules, *, like: Any, fs: Any = None,
         storage_options: dict[str, Any] | None = None, framework: str | None = None,
         copy: bool = False) -> Plan:
    """Match ``rules`` against a checkpoint's headers and a template, and plan the reads.

    Args:
        source: A path, directory or index of a sharded checkpoint, URL, or an open handle
            (:func:`~safecodec.safe_open`, NumPy framework).
        rules: A :class:`Rules` table.
        like: The template: a tree of ``jax.ShapeDtypeStruct`` (with shardings), arrays,
            an NNX ``State``, Flax linen variables...
        fs: An fsspec filesystem on which ``source`` is a path.
        storage_options: Options for the fsspec filesystem a URL names.
        framework: None: each leaf comes back as the template says (``jax.Array`` for
            ``ShapeDtypeStruct`` and JAX array leaves, placed with their sharding; NumPy
            for NumPy leaves). ``"numpy"``: every array leaf as a NumPy array (nothing
            is placed on a device). ``"jax"``: every array leaf as a ``jax.Array`` (NumPy
            leaves of the template on JAX's default device).
        copy: Read the checkpoint with positioned reads instead of mapping it (as
            ``safe_open(copy=True)``): no leaf, JAX or NumPy, shares memory with the
            file. Without it, NumPy leaves are still fresh arrays (every block is built
            in memory of its own); only a JAX block that needs no change on CPU may alias
            the read-only mapping (the zero-copy rule of :mod:`safecodec.jax`). With an
            open handle as ``source``, the handle's own setting applies and ``copy=True``
            is refused when the handle maps its file.

    Raises:
        TreeStructureError: One error listing every unmapped source, unfilled target, rule
            that matches nothing, wrong shape and refused cast (each with both names).
        SafecodecError: ``framework`` is not None, ``"numpy"`` or ``"jax"``; or
            ``copy=True`` with an open handle that maps its file.
    """
    if framework is not None:
        fw = str(framework).lower()
        if fw not in _FRAMEWORKS:
            raise SafecodecError(f"unsupported framework {framework!r}; use 'numpy' or 'jax'")
        framework = _FRAMEWORKS[fw]
    if not isinstance(rules, Rules):
        raise SafecodecError(f"remap= takes safecodec.remap.Rules, got {type(rules).__name__}")
    if rules.inverted:
        raise SafecodecError("these rules are inverted (for save_tree); load with the "
                             "original rules")
    opened = not hasattr(source, "get_slice")
    if not opened and copy and any(getattr(r, "buffer", None) is not None for r in _readers(source)):
        raise SafecodecError("copy=True, but the open handle given maps its file: open it "
                             "with safe_open(..., copy=True), or pass the path")
    handle = (safe_open(source, "numpy", fs=fs, storage_options=storage_options, copy=copy)
              if opened else source)
    try:
        leaves = _template_leaves(like, framework)
        targets = _Planner(handle.header, rules, leaves).run()
        problems = []
        for t in targets.values():
            try:
                t.blocks = _blocks(t.leaf)
            except Exception as exc:  # whatever JAX says of a sharding that does not fit
                problems.append(f"sharding does not fit: {t.sources[0]!r} -> {t.leaf.name!r}: "
                                f"{type(exc).__name__}: {exc}"[:400])
        if problems:
            _raise(problems)
    except BaseException:
        if opened:
            handle.close()
        raise
    return Plan(handle, like, targets, opened)


#: framework= spellings (as load_tree takes them) -> the kind of every array leaf.
_FRAMEWORKS: Final = {"numpy": "numpy", "np": "numpy", "jax": "jax", "flax": "jax"}


def _readers(handle: Any) -> list[Any]:
    """The readers of an open handle (one per shard of a sharded checkpoint)."""
    if hasattr(handle, "shard_handle"):
        return [handle.shard_handle(name).reader for name in handle.header.tensors]
    return [handle.reader]


# ----------------------------------------------------------------------------- export


def _export(rules: Rules, tree: Any, metadata: Mapping[str, str] | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Apply rules to a tree's leaves on the host: inverted rules undo a load (tree names
    -> checkpoint names), plain rules run forward (tree names as sources)."""
    leaves = {leaf.name: leaf for leaf in _template_leaves(tree)}
    arrays = {n: np.asarray(leaf.value) for n, leaf in leaves.items()}
    header = rules._like if rules.inverted else None
    out: dict[str, Any] = {}
    used: set[str] = set()
    problems: list[str] = []
    explicit = [m for m in rules.maps if isinstance(m, Rule)]
    claims = _inverse_claims(explicit, arrays, header) if rules.inverted else {}
    for m in explicit:
        if rules.inverted:
            _export_inverse(m, claims.get(id(m), []), arrays, header, out, used, problems)
        else:
            _export_forward(m, arrays, out, used, problems)
    if any(isinstance(m, _TorchToFlax) for m in rules.maps):
        for name in leaves:
            if name in used:
                continue
            if not rules.inverted:
                problems.append(f"{name!r}: torch_to_flax() maps checkpoints into trees; export with "
                                "rules.inverse()")
                break
            src, ops = _torch_inverse(name, arrays[name].ndim, header)
            if src is None:
                continue
            used.add(name)
            arr = arrays[name]
            for op in ops:
                arr = op.forward(arr)
            out[src] = np.ascontiguousarray(arr)
    for name in leaves:
        if name not in used and not rules.ignored(name):
            problems.append(f"unmapped tree leaf: {name!r} (no rule exports it)")
    if problems:
        _raise(problems)
    original = visible_metadata(dict(header.raw_metadata)) if header and header.raw_metadata else None
    if metadata is not None:
        md = dict(metadata)
    elif original is not None:
        md = dict(original)
    else:
        md = {"format": "pt"} if rules.inverted else {}
    return out, md


def _export_forward(rule: Rule, arrays: dict[str, np.ndarray], out: dict[str, Any],
                    used: set[str], problems: list[str]) -> None:
    rx, _ = _pattern_regex(rule.source)
    groups: dict[tuple[tuple[str, str], ...], dict[int, str]] = {}
    for name in arrays:
        m = rx.fullmatch(name)
        if m is None:
            continue
        b = m.groupdict()
        used.add(name)
        key = tuple(sorted((k, v) for k, v in b.items() if k != rule.stack))
        groups.setdefault(key, {})[int(b[rule.stack]) if rule.stack else 0] = name
    if not groups and not rule.optional:
        problems.append(f"rule matches nothing: {rule!r}")
    for key, by_i in groups.items():
        for j, tpat in enumerate(rule.targets):
            pieces = []
            for i in sorted(by_i):
                arr = arrays[by_i[i]]
                for op in rule.chain(j):
                    arr = op.forward(arr)
                pieces.append(arr)
            out[tpat.format(**dict(key))] = np.stack(pieces) if rule.stack else pieces[0]


def _inverse_claims(rules: list[Rule], arrays: dict[str, np.ndarray],
                    header: Header | None) -> dict[int, list[str]]:
    """Each tree leaf goes to the rule whose target pattern matches it most specifically
    (with the original header: only rules whose source names it has)."""
    out: dict[int, list[str]] = {}
    compiled = [(r, j, _pattern_regex(t)[0], _literal_length(t))
                for r in rules for j, t in enumerate(r.targets)]
    for name in arrays:
        hits = []
        for r, _j, rx, n in compiled:
            m = rx.fullmatch(name)
            if m is None:
                continue
            if header is not None:
                b = dict(m.groupdict(), **({r.stack: "0"} if r.stack else {}))
                if r.source.format(**b) not in header.tensors:
                    continue
            hits.append((r, n))
        if hits:
            best = max(n for _, n in hits)
            rule = next(r for r, n in hits if n == best)
            out.setdefault(id(rule), []).append(name)
    return out


def _export_inverse(rule: Rule, names: list[str], arrays: dict[str, np.ndarray],
                    header: Header | None, out: dict[str, Any], used: set[str],
                    problems: list[str]) -> None:
    """Undo ``rule``: its targets (tree leaves ``names``) give back its sources."""
    rx = _pattern_regex(rule.targets[0])[0]
    found = False
    claimed = set(names)
    for name in names:
        m = rx.fullmatch(name)
        if m is None:
            continue
        binding = m.groupdict()
        group = [t.format(**binding) for t in rule.targets]
        if any(n not in claimed for n in group):
            problems.append(f"cannot invert {rule!r}: {name!r} is in the tree but "
                            + ", ".join(repr(n) for n in group if n not in claimed) + " is not")
            continue
        found = True
        used.update(group)
        count = arrays[group[0]].shape[0] if rule.stack else 1
        for i in range(count):
            b = dict(binding, **({rule.stack: str(i)} if rule.stack else {}))
            src = rule.source.format(**b)
            info = header.tensors.get(src) if header is not None else None
            try:
                arr = _undo(rule, [arrays[n][i] if rule.stack else arrays[n] for n in group],
                            tuple(info.shape) if info else None,
                            np.dtype(info.dtype.numpy) if info else None)
            except (SafecodecError, _OpError) as exc:
                problems.append(f"cannot invert {rule!r} for {group[0]!r} -> {src!r}: {exc}")
                continue
            if info is not None:  # the original's dtype (implicit casts undone too) and shape
                if tuple(arr.shape) != tuple(info.shape):
                    problems.append(f"wrong shape: {group[0]!r} -> {src!r} gives {list(arr.shape)}, "
                                    f"the original has {list(info.shape)}")
                    continue
                arr = arr.astype(info.dtype.numpy, copy=False)
            out[src] = arr
    if not found and not rule.optional and not names:
        problems.append(f"rule matches nothing: {rule!r} (inverted: no tree leaf named like "
                        f"{rule.targets[0]!r})")


def _undo(rule: Rule, pieces: list[np.ndarray], shape: tuple[int, ...] | None,
          dtype: np.dtype[Any] | None) -> np.ndarray:
    """The source tensor from the target pieces (one per target of the rule)."""
    ops = list(rule.ops)
    c = next((k for k, op in enumerate(ops) if isinstance(op, _ChunkPiece)), None)
    pre, post = (ops, []) if c is None else (ops[:c], ops[c + 1:])
    # Shapes and dtypes of the source at each step of the forward chain (when known).
    shapes: list[tuple[int, ...] | None] = [shape]
    dtypes: list[np.dtype[Any] | None] = [dtype]
    for op in pre:
        prev = shapes[-1]
        shapes.append(None if prev is None or op.whole else op.out_shape(prev))
        dtypes.append(None if dtypes[-1] is None else op.out_dtype(dtypes[-1]))
    restored = []
    for j, piece in enumerate(pieces):
        arr = piece
        # The shape and dtype a piece had before ``post``: re-derived from the pre-chunk shape.
        pshapes: list[tuple[int, ...] | None] = [None]
        pdtypes: list[np.dtype[Any] | None] = [dtypes[-1]]
        if c is not None and shapes[-1] is not None:
            chunk_op = ops[c]
            assert isinstance(chunk_op, _ChunkPiece)
            pshapes = [_ChunkPiece(chunk_op.axis, chunk_op.split, j).out_shape(shapes[-1])]
        for op in post:
            prev = pshapes[-1]
            pshapes.append(None if prev is None or op.whole else op.out_shape(prev))
            pdtypes.append(None if pdtypes[-1] is None else op.out_dtype(pdtypes[-1]))
        for k in range(len(post) - 1, -1, -1):
            arr = post[k].inverse(pshapes[k], pdtypes[k]).forward(arr)
        restored.append(arr)
    if c is not None:
        chunk_op = ops[c]
        assert isinstance(chunk_op, _ChunkPiece)
        arr = np.concatenate(restored, axis=chunk_op.axis)
    else:
        arr = restored[0]
    for k in range(len(pre) - 1, -1, -1):
        arr = pre[k].inverse(shapes[k], dtypes[k]).forward(arr)
    return np.ascontiguousarray(arr)


def _torch_inverse(name: str, ndim: int, header: Header | None) -> tuple[str | None, tuple[Op, ...]]:
    """The PyTorch name and the operations that turn a Flax leaf back into it."""
    cands = _torch_candidates(name, ndim)
    if header is not None:
        for cand, ops in cands:
            if cand in header.tensors:
                info = header.tensors[cand]
                inv = tuple(op.inverse(None, None) for op in reversed(ops))
                cast = (_Astype(np.dtype(info.dtype.numpy)),)
                return cand, inv + cast
        return None, ()
    cand, ops = cands[0]
    return cand, tuple(op.inverse(None, None) for op in reversed(ops))
